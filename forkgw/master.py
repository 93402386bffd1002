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
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import sys
import time
import traceback

from setproctitle import setproctitle

from forkgw import conf as confmod
from forkgw.conf.model import Config, Listen
from forkgw.errors import ConfError
from forkgw.log import ErrorLog, eprint
from forkgw.worker import EXIT_BOOT_FAILED, Worker, all_filters

KILL_GRACE = 3.0  # TERM: seconds before stragglers are killed
RESPAWN_MIN_LIFE = 1.0  # a worker that dies younger than this is "dying at boot"
RESPAWN_MAX_DELAY = 5.0


def compile_wasm(config: Config):
    """Compile every module once, here, before any fork (workers never compile)."""
    if not config.wasm.modules:
        return None
    from forkgw.wasm import compile_modules

    return compile_modules(config.wasm)


def load(path: str, prefix: str | None, extra: str | None):
    config = confmod.load(path, prefix, extra)
    return config, compile_wasm(config)


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
        sock.listen(listen.backlog)
    except OSError as err:
        sock.close()
        raise ConfError(f"bind() to {listen.addr}:{listen.port} failed ({err.errno}: {err.strerror})",
                        listen.where) from None
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


class WorkerHandle:
    __slots__ = ("pid", "channel", "generation", "ready", "started", "fatal", "slot")

    def __init__(self, pid: int, channel: socket.socket, generation: "Generation", slot: int):
        self.pid = pid
        self.channel = channel
        self.generation = generation
        self.ready = False
        self.started = time.monotonic()
        self.fatal = ""
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

    def missing_slots(self) -> list[int]:
        taken = {w.slot for w in self.workers.values()}
        return [slot for slot in range(self.config.worker_processes) if slot not in taken]


class Master:
    def __init__(self, conf_path: str, prefix: str | None, extra: str | None, error_log: str | None):
        self.conf_path = conf_path
        self.prefix = prefix
        self.extra = extra
        self.error_log_override = error_log
        self.log = ErrorLog("stderr", "notice")
        self.generations: list[Generation] = []
        self.listeners: dict[tuple[str, int], socket.socket] = {}
        self.selector = selectors.DefaultSelector()
        self.pending: list[int] = []
        self.stopping = ""  # "", "graceful" or "fast"
        self.stop_deadline = 0.0
        self.pid_path = ""
        self.generation_count = 0

    # -- start -----------------------------------------------------------------------

    def start(self) -> int:
        try:
            config, compiled = load(self.conf_path, self.prefix, self.extra)
            self.open_log(config)
            listeners = self.bind_all(config)
            self.write_pid(config)
        except ConfError as err:
            eprint(f"[emerg] {err}")
            self.log.emerg(str(err)) if self.log.path != "stderr" else None
            return 1
        setproctitle("forkgw: master process " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
        self.install_signals()
        self.log.notice(f"forkgw/{__import__('forkgw').__version__} started, "
                        f"{config.worker_processes} worker processes")
        self.add_generation(config, compiled, listeners)
        try:
            return self.loop()
        finally:
            self.remove_pid()

    def open_log(self, config: Config) -> None:
        path, level = config.error_log
        if self.error_log_override:
            path = self.error_log_override
        log = ErrorLog(path, level)
        if self.log is not None:
            self.log.close()
        self.log = log

    def bind_all(self, config: Config) -> dict:
        """Listeners for a conf: same address keeps its socket, new ones are bound."""
        wanted: dict = {}
        fresh = []
        try:
            for listen in config.listens():
                sock = self.listeners.get(listen.key)
                if sock is None:
                    sock = bind(listen)
                    fresh.append((listen.key, sock))
                wanted[listen.key] = sock
        except ConfError:
            for _, sock in fresh:
                sock.close()
            raise
        self.listeners.update(fresh)
        return wanted

    def write_pid(self, config: Config) -> None:
        path = config.pid
        if not path:
            return
        try:
            with open(path) as f:
                other = int(f.read().strip() or 0)
            if other and other != os.getpid() and process_is_forkgw(other):
                raise ConfError(f'pid file "{path}" names a running forkgw (pid {other})')
        except (OSError, ValueError):
            pass
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
        self.pid_path = path

    def remove_pid(self) -> None:
        try:
            with open(self.pid_path) as f:
                if int(f.read().strip()) != os.getpid():
                    return
            os.unlink(self.pid_path)
        except (OSError, ValueError):
            pass

    def install_signals(self) -> None:
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.on_wakeup)
        for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                    signal.SIGCHLD, signal.SIGUSR2, signal.SIGWINCH):
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
            for key, mask in self.selector.select(timeout=1.0):
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
        if signum == signal.SIGHUP:
            self.log.notice("signal 1 (SIGHUP) received, reconfiguring")
            self.reload()
        elif signum == signal.SIGQUIT:
            self.log.notice("signal 3 (SIGQUIT) received, shutting down")
            self.stop("graceful")
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.log.notice(f"signal {signum} ({signal.Signals(signum).name}) received, exiting")
            self.stop("fast")
        elif signum == signal.SIGUSR1:
            self.log.notice("signal 10 (SIGUSR1) received, reopening logs")
            self.log.reopen()
            self.tell_all("reopen")
        else:
            self.log.notice(f"signal {signum} ({signal.Signals(signum).name}) received, ignored")

    def reload(self) -> None:
        if self.stopping:
            return
        try:
            config, compiled = load(self.conf_path, self.prefix, self.extra)
            listeners = self.bind_all(config)
        except ConfError as err:
            self.log.emerg(f"{err}, the old configuration keeps serving")
            return
        except Exception as err:  # a reload must never take the master down
            self.log.emerg(f"reload failed: {err!r}, the old configuration keeps serving")
            return
        for gen in self.generations:
            if gen.state == "starting":
                self.retire(gen)  # a newer reload supersedes one still starting
        self.open_log(config)
        self.write_pid(config)
        self.add_generation(config, compiled, listeners)

    def add_generation(self, config: Config, compiled, listeners: dict) -> None:
        self.generation_count += 1
        gen = Generation(self.generation_count, config, compiled, listeners)
        self.generations.append(gen)
        for slot in gen.missing_slots():
            self.spawn(gen, slot)

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
        for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                    signal.SIGCHLD, signal.SIGUSR2, signal.SIGWINCH):
            signal.signal(sig, signal.SIG_DFL)
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()
        for other in self.generations:
            for handle in other.workers.values():
                handle.channel.close()
        for key, sock in self.listeners.items():
            if key not in gen.listeners:
                sock.close()
        set_affinity(gen.config, slot, self.log)
        Worker(gen.config, gen.listeners, gen.compiled, channel, self.log, gen.number).run()

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
            try:
                os.kill(handle.pid, {"quit": signal.SIGQUIT, "stop": signal.SIGTERM,
                                     "reopen": signal.SIGUSR1}[command])
            except ProcessLookupError:
                pass

    def tell_all(self, command: str) -> None:
        for gen in self.generations:
            for handle in gen.workers.values():
                self.tell(handle, command)

    # -- children --------------------------------------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
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
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            how = f"exited on signal {sig}"
            if sig == signal.SIGKILL:
                how += " (killed: out of memory, or by an operator?)"
        else:
            how = f"exited with code {os.WEXITSTATUS(status)}"
        expected = gen.state == "retiring" or self.stopping
        self.log.write("notice" if expected and status == 0 else "alert",
                       f"worker process {handle.pid} {how}")
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
        serving = [g for g in self.generations if g.state == "serving"]
        for gen in list(self.generations):
            if gen.state == "starting":
                if gen.failed:
                    self.log.emerg(f"{gen.failed}; " + ("the old configuration keeps serving"
                                                       if serving else "exiting"))
                    self.retire(gen, kill=True)
                    if not serving:
                        self.stop("fast")
                        self.exit_status = 1
                    continue
                if gen.workers and all(w.ready for w in gen.workers.values()) and not gen.missing_slots():
                    gen.state = "serving"
                    for old in serving:
                        self.retire(old)
                    self.close_unused_listeners()
                    self.log.notice(f"generation {gen.number} serving with {len(gen.workers)} workers")
            if gen.state in ("starting", "serving") and not self.stopping:
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
                return getattr(self, "exit_status", 0)
            if self.stop_deadline and now >= self.stop_deadline:
                for gen in self.generations:
                    for handle in gen.workers.values():
                        kill(handle.pid, signal.SIGKILL)
                self.stop_deadline = 0.0
        return None

    def retire(self, gen: Generation, kill: bool = False) -> None:
        gen.state = "retiring"
        gen.kill_at = time.monotonic() + (0.0 if kill else gen.config.worker_shutdown_timeout)
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
        self.stopping = how
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
