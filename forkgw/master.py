"""The master process: builds generations of workers and keeps them at strength.

Theory of operation.  A generation is one parsed conf, its compiled wasm
modules, its listening sockets and its workers.  The master builds a
generation completely (parse, validate, compile, bind) before it forks a
single worker, so a bad conf never costs a running gateway anything: at start
it exits 1, on reload the serving generation goes on untouched.

The loop (gunicorn's shape): wait on a selector -> handle the signals that woke
it -> reap children -> reconcile.  Signal handlers only record the signal;
`signal.set_wakeup_fd` wakes the selector, and the loop does the work.
Reconciling compares what should run with what does: a serving generation
below strength gets workers (with a back-off when they die young); a starting
generation whose workers all said "ready" becomes serving, and only then are
the older ones told to quit; a retiring generation past its shutdown timeout
is killed.  The master never touches a request.

Listening sockets outlive generations: a reload keeps the socket of every
address that stays, so the kernel's accept queue is never closed and no
connection is refused.  An upgrade (USR2) hands them to a new master process
through the environment, as nginx does; socket activation hands them in
from systemd.
"""

from __future__ import annotations

import mmap
import os
import selectors
import struct
import signal
import socket
import sys
import time
import traceback

from setproctitle import setproctitle

from forkgw import __version__
from forkgw import conf as confmod
from forkgw.conf.model import Config, Listen
from forkgw.errors import ConfError
from forkgw.log import ErrorLog, eprint
from forkgw.shm import ShmStore
from forkgw.systemd import Notifier, listen_fds
from forkgw.worker import EXIT_BOOT_FAILED, Worker

KILL_GRACE = 3.0  # TERM: seconds before stragglers are killed
RESPAWN_MIN_LIFE = 1.0  # a worker that dies younger than this is "dying at boot"
RESPAWN_MAX_DELAY = 5.0
INHERIT_ENV = "FORKGW_LISTENERS"  # "fd,addr,port;..." from an upgrading master
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                  signal.SIGCHLD, signal.SIGUSR2, signal.SIGWINCH)


def compile_wasm(config: Config):
    """Compile every module once, here, before any fork (workers never compile)."""
    if not config.wasm.modules:
        return None
    from forkgw.wasm import compile_modules

    return compile_modules(config.wasm)


def load(path: str, prefix: str | None, extra: str | None):
    config = confmod.load(path, prefix, extra)
    return config, compile_wasm(config)


def control_path(config: Config) -> str:
    """The control socket lives beside the pid file: `logs/forkgw.pid` -> `logs/forkgw.sock`."""
    base = config.pid[:-4] if config.pid.endswith(".pid") else config.pid
    return base + ".sock"


def bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if listen.reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6 and listen.addr == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((listen.addr, listen.port))
        if not listen.reuseport:
            sock.listen(listen.backlog)
        # With reuseport the master only holds the address (bound, not listening, so the
        # kernel hands it no connection); each worker listens on a socket of its own.
    except OSError as err:
        sock.close()
        raise ConfError(f"bind() to {listen.addr}:{listen.port} failed ({err.errno}: {err.strerror})",
                        listen.where) from None
    sock.setblocking(False)
    return sock


def inherited_listeners() -> dict[tuple[str, int], socket.socket]:
    """Sockets from an upgrading master (USR2) or from systemd (LISTEN_FDS)."""
    sockets = listen_fds()
    for item in filter(None, os.environ.pop(INHERIT_ENV, "").split(";")):
        fd, addr, port = item.split(",")
        try:
            sock = socket.socket(fileno=int(fd))
        except OSError:
            continue
        sock.setblocking(False)
        sockets[(addr, int(port))] = sock
    return sockets


class WorkerHandle:
    __slots__ = ("pid", "channel", "generation", "ready", "started", "fatal", "slot", "killed")

    def __init__(self, pid: int, channel: socket.socket, generation: "Generation", slot: int):
        self.pid = pid
        self.channel = channel
        self.generation = generation
        self.ready = False
        self.started = time.monotonic()
        self.fatal = ""  # why it could not boot, as it told us
        self.killed = False  # the watchdog killed it already
        self.slot = slot


class Generation:
    def __init__(self, number: int, config: Config, compiled, listeners: dict):
        self.number = number
        self.config = config
        self.compiled = compiled
        self.listeners = listeners
        self.workers: dict[int, WorkerHandle] = {}
        self.state = "starting"  # starting -> serving -> retiring
        self.kill_at = 0.0
        self.deaths: dict[int, tuple[int, float]] = {}  # slot -> (young deaths in a row, respawn at)
        self.failed = ""
        self.waiters: list[socket.socket] = []  # `-s reload` clients waiting for the outcome
        self.started = time.monotonic()
        # One monotonic timestamp per worker slot, written by the worker every loop turn.
        self.heartbeats = mmap.mmap(-1, 8 * max(1, config.worker_processes))

    def heartbeat_age(self, slot: int, now: float) -> float:
        return now - struct.unpack_from("d", self.heartbeats, 8 * slot)[0]

    def missing_slots(self) -> list[int]:
        taken = {w.slot for w in self.workers.values()}
        return [slot for slot in range(self.config.worker_processes) if slot not in taken]


class Master:
    def __init__(self, conf_path: str, prefix: str | None, extra: str | None, error_log: str | None):
        self.conf_path = conf_path
        self.prefix = prefix
        self.extra = extra
        self.error_log_override = error_log
        self.cwd = os.getcwd()
        self.argv = list(sys.argv[1:])
        self.log = ErrorLog("stderr", "notice")
        self.notify = Notifier()
        self.generations: list[Generation] = []
        self.listeners: dict[tuple[str, int], socket.socket] = {}
        self.inherited: dict[tuple[str, int], socket.socket] = {}
        self.selector = selectors.DefaultSelector()
        self.pending: list[int] = []
        self.stopping = ""  # "", "graceful" or "fast"
        self.stop_deadline = 0.0
        self.exit_status = 0
        self.pid_path = ""
        self.control: socket.socket | None = None
        self.control_file = ("", 0)  # (path, inode): unlinked at exit only if still ours
        self.generation_count = 0
        self.serving_conf: tuple = ()  # (config, compiled, listeners) of the newest serving generation
        self.shm: ShmStore | None = None
        self.new_master = 0  # pid of the master an upgrade started
        self.workers_stopped = False  # WINCH: serve nothing until HUP (upgrade rollback)

    # -- start -----------------------------------------------------------------------

    def start(self) -> int:
        self.inherited = inherited_listeners()
        try:
            config, compiled = load(self.conf_path, self.prefix, self.extra)
            size, eviction = config.wasm.shm_kv
            # Made once, before any fork: it outlives worker crashes and reloads.
            self.shm = ShmStore(size, eviction=eviction)
            self.open_log(config)
            listeners = self.bind_all(config)
            self.write_pid(config)
            self.open_control(config)
        except ConfError as err:
            eprint(f"[emerg] {err}")
            if self.log.path != "stderr":
                self.log.emerg(str(err))
            return 1
        for sock in self.inherited.values():
            sock.close()  # handed to us for addresses the conf no longer has
        self.inherited = {}
        program = os.path.basename(sys.argv[0])
        program = "forkgw" if program in ("__main__.py", "-m") else program
        setproctitle("forkgw: master process " + " ".join([program] + sys.argv[1:]))
        self.install_signals()
        self.log.notice(f"forkgw/{__version__} started, {config.worker_processes} worker processes")
        if os.environ.pop("FORKGW_UPGRADE", ""):
            self.notify.main_pid(os.getpid())
        self.add_generation(config, compiled, listeners)
        try:
            return self.loop()
        finally:
            self.remove_pid()
            self.close_control()

    def open_log(self, config: Config) -> None:
        path, level = config.error_log
        if self.error_log_override:
            path = self.error_log_override
        log = ErrorLog(path, level)
        self.log.close()
        self.log = log

    def bind_all(self, config: Config) -> dict:
        """Listeners for a conf: same address keeps its socket, new ones are bound."""
        wanted: dict = {}
        fresh = []
        try:
            for listen in config.listens():
                sock = self.listeners.get(listen.key) or self.inherited.pop(listen.key, None)
                if sock is None:
                    sock = bind(listen)
                    fresh.append((listen.key, sock))
                elif listen.key not in self.listeners:
                    fresh.append((listen.key, sock))
                wanted[listen.key] = sock
        except ConfError:
            for key, sock in fresh:
                sock.close()
            raise
        self.listeners.update(fresh)
        return wanted

    def write_pid(self, config: Config) -> None:
        path = config.pid
        if not path or path == self.pid_path:
            return
        try:
            with open(path) as f:
                other = int(f.read().strip() or 0)
        except (OSError, ValueError):
            other = 0
        if other and other != os.getpid() and process_is_forkgw(other):
            raise ConfError(f'pid file "{path}" names a running forkgw (pid {other})')
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
        if self.pid_path:
            self.remove_pid()
        self.pid_path = path

    def remove_pid(self) -> None:
        try:
            with open(self.pid_path) as f:
                if int(f.read().strip()) != os.getpid():
                    return
            os.unlink(self.pid_path)
        except (OSError, ValueError):
            pass

    def open_control(self, config: Config) -> None:
        """A unix socket where `forkgw -s reload` asks for a reload and waits for the outcome."""
        if not config.pid:
            return
        path = control_path(config)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)  # a leftover, or the socket of the master we are upgrading from
        except OSError:
            pass
        try:
            sock.bind(path)
            sock.listen(16)
        except OSError as err:
            sock.close()
            self.log.alert(f'control socket "{path}" failed ({err}); -s reload falls back to signals')
            return
        sock.setblocking(False)
        self.control = sock
        self.control_file = (path, os.stat(path).st_ino)
        self.selector.register(sock, selectors.EVENT_READ, self.on_control)

    def close_control(self) -> None:
        if self.control is None:
            return
        path, inode = self.control_file
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except OSError:
            pass
        try:
            self.selector.unregister(self.control)
        except (KeyError, ValueError):
            pass
        self.control.close()
        self.control = None

    def install_signals(self) -> None:
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.on_wakeup)
        for sig in MASTER_SIGNALS:
            signal.signal(sig, self.on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def on_signal(self, signum, frame) -> None:
        self.pending.append(signum)

    def on_wakeup(self, mask: int) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # -- the loop --------------------------------------------------------------------------

    def loop(self) -> int:
        while True:
            timeout = 1.0
            watchdog = self.notify.watchdog(time.monotonic())
            if watchdog is not None:
                timeout = min(timeout, max(0.0, watchdog - time.monotonic()))
            for key, mask in self.selector.select(timeout=timeout):
                key.data(mask)
            while self.pending:
                self.handle_signal(self.pending.pop(0))
            self.reap()
            status = self.reconcile()
            if status is not None:
                return status

    def handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # reap() runs every turn
        name = f"signal {signum} ({signal.Signals(signum).name}) received"
        if signum == signal.SIGHUP:
            if self.workers_stopped:
                self.log.notice(f"{name}, starting workers again")
                self.restart_workers()
            else:
                self.log.notice(f"{name}, reconfiguring")
                self.reload()
        elif signum == signal.SIGQUIT:
            self.log.notice(f"{name}, shutting down")
            self.stop("graceful")
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.log.notice(f"{name}, exiting")
            self.stop("fast")
        elif signum == signal.SIGUSR1:
            self.log.notice(f"{name}, reopening logs")
            self.log.reopen()
            if self.serving_conf:
                prepare_log_files(self.serving_conf[0], self.log)
            self.tell_all("reopen")
        elif signum == signal.SIGUSR2:
            self.log.notice(f"{name}, changing binary")
            self.upgrade()
        elif signum == signal.SIGWINCH:
            self.log.notice(f"{name}, gracefully shutting down worker processes")
            self.stop_workers()

    # -- reload ------------------------------------------------------------------------------

    def reload(self, waiter: socket.socket | None = None) -> None:
        if self.stopping:
            answer(waiter, "error the gateway is stopping")
            return
        self.notify.reloading()
        try:
            config, compiled = load(self.conf_path, self.prefix, self.extra)
            listeners = self.bind_all(config)
            self.write_pid(config)
        except Exception as err:  # a reload must never take the master down
            message = str(err) if isinstance(err, ConfError) else f"reload failed: {err!r}"
            self.log.emerg(f"{message}, the old configuration keeps serving")
            answer(waiter, f"error {message}")
            self.notify.ready(self.status_line())
            return
        for gen in self.generations:
            if gen.state == "starting":
                self.retire(gen)  # a newer reload supersedes one still starting
                self.settle(gen, "error superseded by a newer reload")
        self.open_log(config)
        gen = self.add_generation(config, compiled, listeners)
        if waiter is not None:
            gen.waiters.append(waiter)

    def add_generation(self, config: Config, compiled, listeners: dict) -> Generation:
        self.generation_count += 1
        gen = Generation(self.generation_count, config, compiled, listeners)
        self.generations.append(gen)
        for slot in gen.missing_slots():
            self.spawn(gen, slot)
        return gen

    def settle(self, gen: Generation, outcome: str) -> None:
        for waiter in gen.waiters:
            answer(waiter, outcome)
        gen.waiters = []

    def status_line(self) -> str:
        serving = [g for g in self.generations if g.state == "serving"]
        if not serving:
            return "no generation serving"
        gen = serving[-1]
        return f"generation {gen.number} serving with {len(gen.workers)} workers"

    # -- upgrade (USR2, WINCH) ------------------------------------------------------------

    def upgrade(self) -> None:
        """Start a new master from the installed forkgw, handing it our listening sockets."""
        if self.new_master:
            self.log.alert(f"the new master process {self.new_master} is still running, USR2 ignored")
            return
        if self.pid_path:
            try:
                os.replace(self.pid_path, self.pid_path + ".oldbin")
                self.pid_path += ".oldbin"
            except OSError as err:
                self.log.alert(f'rename() "{self.pid_path}" failed ({err}), USR2 ignored')
                return
        env = dict(os.environ)
        env[INHERIT_ENV] = ";".join(f"{sock.fileno()},{key[0]},{key[1]}" for key, sock in self.listeners.items())
        env["FORKGW_UPGRADE"] = "1"
        for sock in self.listeners.values():
            sock.set_inheritable(True)
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                for sig in MASTER_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                os.chdir(self.cwd)
                os.execve(sys.executable, [sys.executable, "-m", "forkgw", *self.argv], env)
            finally:
                os._exit(1)
        for sock in self.listeners.values():
            sock.set_inheritable(False)
        self.new_master = pid
        self.log.notice(f"start new binary process {pid}")

    def stop_workers(self) -> None:
        """WINCH: the old master of an upgrade lets its workers go and waits (HUP brings them back)."""
        if not self.new_master:
            self.log.notice("WINCH ignored: no upgrade in progress")
            return
        self.workers_stopped = True
        for gen in self.generations:
            if gen.state != "retiring":
                self.retire(gen)

    def restart_workers(self) -> None:
        """Rollback of an upgrade: workers again, from the conf we already hold."""
        self.workers_stopped = False
        self.add_generation(*self.serving_conf)

    def new_master_exited(self, status: int) -> None:
        self.log.notice(f"new binary process {self.new_master} exited ({describe_exit(status)})")
        self.new_master = 0
        if self.pid_path.endswith(".oldbin"):
            restored = self.pid_path[: -len(".oldbin")]
            try:
                os.replace(self.pid_path, restored)
                self.pid_path = restored
            except OSError:
                pass
        self.notify.main_pid(os.getpid())
        if not os.path.exists(self.control_file[0]):
            self.close_control()  # the new master took the path over and removed it
            self.open_control(self.serving_conf[0])

    # -- workers ------------------------------------------------------------------------------

    def spawn(self, gen: Generation, slot: int) -> None:
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                parent_end.close()
                self.become_worker(gen, child_end, slot)
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                self.log.crit("worker crashed: " + traceback.format_exc().replace("\n", " | "))
            finally:
                os._exit(status)
        child_end.close()
        parent_end.setblocking(False)
        handle = WorkerHandle(pid, parent_end, gen, slot)
        gen.workers[pid] = handle
        self.selector.register(parent_end, selectors.EVENT_READ, lambda mask, h=handle: self.on_channel(h))
        self.log.notice(f"start worker process {pid}")

    def become_worker(self, gen: Generation, channel: socket.socket, slot: int) -> None:
        """In the child: drop everything of the master's and run the worker loop."""
        signal.set_wakeup_fd(-1)
        for sig in MASTER_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()
        if self.control is not None:
            self.control.close()
        for other in self.generations:
            for handle in other.workers.values():
                handle.channel.close()
            for waiter in other.waiters:
                waiter.close()
        for key, sock in self.listeners.items():
            if key not in gen.listeners:
                sock.close()
        set_affinity(gen.config, slot, self.log)
        Worker(gen.config, gen.listeners, gen.compiled, channel, self.log, gen.number,
               (gen.heartbeats, slot), self.shm).run()

    def on_channel(self, handle: WorkerHandle) -> None:
        try:
            data = handle.channel.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(handle.channel)
            return
        for line in data.decode("utf-8", "replace").splitlines():
            if line == "ready":
                handle.ready = True
            elif line.startswith("fatal"):
                handle.fatal = line[6:]

    def tell(self, handle: WorkerHandle, command: str) -> None:
        try:
            handle.channel.send(command.encode() + b"\n")
        except OSError:
            kill(handle.pid, {"quit": signal.SIGQUIT, "stop": signal.SIGTERM, "reopen": signal.SIGUSR1}[command])

    def tell_all(self, command: str) -> None:
        for gen in self.generations:
            for handle in gen.workers.values():
                self.tell(handle, command)

    # -- the control socket ----------------------------------------------------------------------

    def on_control(self, mask: int) -> None:
        try:
            conn, _ = self.control.accept()
        except OSError:
            return
        conn.settimeout(2.0)
        try:
            command = conn.recv(256).decode("utf-8", "replace").strip()
        except OSError:
            conn.close()
            return
        conn.setblocking(False)
        if command == "reload":
            self.log.notice("reload requested on the control socket, reconfiguring")
            self.reload(conn)
        elif command == "status":
            answer(conn, f"ok {self.status_line()}")
        else:
            answer(conn, f"error unknown command {command!r}")

    # -- children --------------------------------------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.new_master:
                self.new_master_exited(status)
                continue
            self.shm.detach(pid)  # its gauges go, its counters stay
            for gen in self.generations:
                handle = gen.workers.pop(pid, None)
                if handle is not None:
                    self.worker_exited(gen, handle, status)
                    break

    def worker_exited(self, gen: Generation, handle: WorkerHandle, status: int) -> None:
        try:
            self.selector.unregister(handle.channel)
        except (KeyError, ValueError):
            pass
        handle.channel.close()
        expected = gen.state == "retiring" or self.stopping
        self.log.write("notice" if expected and status == 0 else "alert",
                       f"worker process {handle.pid} {describe_exit(status)}")
        if expected:
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_FAILED:
            gen.failed = handle.fatal or "a worker failed to start its filters"
            return
        now = time.monotonic()
        count, _ = gen.deaths.get(handle.slot, (0, 0.0))
        count = count + 1 if now - handle.started < RESPAWN_MIN_LIFE else 0
        delay = min(RESPAWN_MAX_DELAY, 0.1 * (2 ** count)) if count else 0.0
        gen.deaths[handle.slot] = (count, now + delay)

    def reconcile(self) -> int | None:
        now = time.monotonic()
        for gen in list(self.generations):
            if gen.state == "starting":
                self.check_starting(gen)
            if gen.state in ("starting", "serving") and not self.stopping:
                self.check_heartbeats(gen, now)
                for slot in gen.missing_slots():
                    _, respawn_at = gen.deaths.get(slot, (0, 0.0))
                    if now >= respawn_at:
                        self.spawn(gen, slot)
            if gen.state == "retiring":
                if not gen.workers:
                    self.generations.remove(gen)
                elif gen.kill_at and now >= gen.kill_at:
                    for handle in gen.workers.values():
                        self.log.warn(f"worker process {handle.pid} did not exit in time, killing it")
                        kill(handle.pid, signal.SIGKILL)
                    gen.kill_at = 0.0
        if self.stopping:
            if not any(g.workers for g in self.generations):
                self.log.notice("exit")
                return self.exit_status
            if self.stop_deadline and now >= self.stop_deadline:
                for gen in self.generations:
                    for handle in gen.workers.values():
                        kill(handle.pid, signal.SIGKILL)
                self.stop_deadline = 0.0
        return None

    def check_heartbeats(self, gen: Generation, now: float) -> None:
        """A ready worker whose loop stopped turning is killed; reap() then replaces it."""
        limit = gen.config.worker_watchdog_timeout
        for handle in gen.workers.values():
            if handle.ready and not handle.killed:
                age = gen.heartbeat_age(handle.slot, now)
                if age > limit:
                    self.log.alert(f"worker process {handle.pid} is not responding "
                                   f"(no heartbeat for {age:.1f}s), killing it")
                    handle.killed = True
                    kill(handle.pid, signal.SIGKILL)
                    kill(handle.pid, signal.SIGCONT)

    def check_starting(self, gen: Generation) -> None:
        serving = [g for g in self.generations if g.state == "serving"]
        if gen.failed:
            fallback = "the old configuration keeps serving" if serving else "exiting"
            self.log.emerg(f"{gen.failed}; {fallback}")
            self.retire(gen, kill=True)
            self.settle(gen, f"error {gen.failed}")
            if serving:
                self.notify.ready(self.status_line())
            else:
                self.exit_status = 1
                self.stop("fast")
            return
        if gen.workers and all(w.ready for w in gen.workers.values()) and not gen.missing_slots():
            gen.state = "serving"
            self.serving_conf = (gen.config, gen.compiled, gen.listeners)
            for old in serving:
                self.retire(old)
            self.close_unused_listeners()
            took = time.monotonic() - gen.started
            status = f"generation {gen.number} serving with {len(gen.workers)} workers"
            self.log.notice(f"{status} (ready in {took:.3f}s)")
            self.settle(gen, f"ok {status}")
            self.notify.ready(status)

    def retire(self, gen: Generation, kill: bool = False) -> None:
        gen.state = "retiring"
        gen.kill_at = time.monotonic() + (KILL_GRACE if kill else gen.config.worker_shutdown_timeout)
        for handle in gen.workers.values():
            self.tell(handle, "stop" if kill else "quit")

    def close_unused_listeners(self) -> None:
        used = set()
        for gen in self.generations:
            if gen.state != "retiring":
                used.update(gen.listeners)
        for key in list(self.listeners):
            if key not in used:
                self.listeners.pop(key).close()

    def stop(self, how: str) -> None:
        if self.stopping == "fast":
            return
        self.notify.stopping()
        self.stopping = how
        for gen in self.generations:
            self.settle(gen, "error the gateway is stopping")
        if how == "graceful":
            timeout = max((g.config.worker_shutdown_timeout for g in self.generations), default=0)
            self.stop_deadline = time.monotonic() + timeout + 1.0
            self.tell_all("quit")
        else:
            self.stop_deadline = time.monotonic() + KILL_GRACE
            for gen in self.generations:
                for handle in gen.workers.values():
                    kill(handle.pid, signal.SIGTERM)
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()


def prepare_log_files(config: Config, log: ErrorLog) -> None:
    """Create the log files workers are about to reopen, owned by the `user` they run as.

    After logrotate moved the files away, an unprivileged worker could not create
    new ones in a root-owned folder; nginx's master makes them for it, so does ours.
    """
    if not config.user or os.geteuid() != 0:
        return
    import pwd

    from forkgw.worker import all_settings

    try:
        entry = pwd.getpwnam(config.user)
    except KeyError:
        return
    paths = {path for settings in all_settings(config) for path, _ in settings.access_log}
    if config.error_log[0] != "stderr":
        paths.add(log.path)
    for path in paths:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.fchown(fd, entry.pw_uid, entry.pw_gid)
            os.close(fd)
        except OSError as err:
            log.alert(f'creating "{path}" for the workers failed ({err})')


def answer(conn: socket.socket | None, line: str) -> None:
    if conn is None:
        return
    try:
        conn.setblocking(True)
        conn.settimeout(1.0)
        conn.sendall(line.encode() + b"\n")
    except OSError:
        pass
    conn.close()


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        hint = " (killed: out of memory, or by an operator?)" if sig == signal.SIGKILL else ""
        return f"exited on signal {sig}{hint}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def set_affinity(config: Config, slot: int, log: ErrorLog) -> None:
    """worker_cpu_affinity: `auto` pins worker N to the Nth CPU; masks are nginx's bit strings."""
    value = config.worker_cpu_affinity
    if not value:
        return
    try:
        if value == "auto":
            cpus = sorted(os.sched_getaffinity(0))
            chosen = {cpus[slot % len(cpus)]}
        else:
            masks = value.split()
            mask = masks[slot % len(masks)]
            chosen = {cpu for cpu, bit in enumerate(reversed(mask)) if bit == "1"}
        os.sched_setaffinity(0, chosen)
    except OSError as err:
        log.alert(f"sched_setaffinity() failed ({err})")


def process_is_forkgw(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"forkgw" in f.read()
    except OSError:
        return False
