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

The master orchestrates; what it holds lives beside it, one module each: the
records of a generation and its workers (generation.py), the listening
sockets (listeners.py), the pid file (pidfile.py) and the control socket that
answers `forkgw -s reload` (control.py).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time
import traceback

from setproctitle import setproctitle

from forkgw import __version__
from forkgw import conf as confmod
from forkgw import tls
from forkgw.conf.model import Config
from forkgw.control import ControlSocket, answer
from forkgw.errors import ConfError
from forkgw.generation import Generation, GenState, WorkerHandle
from forkgw.listeners import Listeners
from forkgw.log import ErrorLog, eprint
from forkgw.net.signals import SignalInbox
from forkgw.pidfile import PidFile
from forkgw.shm import ShmStore
from forkgw.systemd import Notifier
from forkgw.worker import EXIT_BOOT_FAILED, Worker

KILL_GRACE = 3.0  # TERM: seconds before stragglers are killed
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                  signal.SIGCHLD, signal.SIGUSR2, signal.SIGWINCH)


def compile_wasm(config: Config):
    """Compile every module once, here, before any fork (workers never compile)."""
    if not config.wasm.modules:
        return None
    from forkgw.wasm import compile_modules

    return compile_modules(config.wasm)


def load(path: str, prefix: str | None, extra: str | None):
    """Everything a generation needs before fork: the conf, its TLS contexts, its compiled filters."""
    config = confmod.load(path, prefix, extra)
    tls.build(config)
    return config, compile_wasm(config)


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
        self.listeners = Listeners()
        self.selector = selectors.DefaultSelector()
        self.signals: SignalInbox | None = None
        self.stopping = ""  # "", "graceful" or "fast"
        self.stop_deadline = 0.0
        self.exit_status = 0
        self.pidfile = PidFile()
        self.control = ControlSocket(self.selector, self.on_control)
        self.generation_count = 0
        self.serving_conf: tuple = ()  # (config, compiled, listeners) of the newest serving generation
        self.shm: ShmStore | None = None
        self.new_master = 0  # pid of the master an upgrade started
        self.workers_stopped = False  # WINCH: serve nothing until HUP (upgrade rollback)

    # -- start -----------------------------------------------------------------------

    def start(self) -> int:
        self.listeners.inherit()
        try:
            config, compiled = load(self.conf_path, self.prefix, self.extra)
            size, eviction = config.wasm.shm_kv
            # Made once, before any fork: it outlives worker crashes and reloads.
            self.shm = ShmStore(size, eviction=eviction)
            self.open_log(config)
            listeners = self.listeners.for_conf(config)
            self.pidfile.write(config.pid)
            self.control.open(config, self.log)
        except ConfError as err:
            eprint(f"[emerg] {err}")
            if self.log.path != "stderr":
                self.log.emerg(str(err))
            return 1
        self.listeners.close_inherited()
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
            self.pidfile.remove()
            self.control.close()

    def open_log(self, config: Config) -> None:
        path, level = config.error_log
        if self.error_log_override:
            path = self.error_log_override
        log = ErrorLog(path, level)
        self.log.close()
        self.log = log

    def install_signals(self) -> None:
        self.signals = SignalInbox(MASTER_SIGNALS)
        self.selector.register(self.signals.wake, selectors.EVENT_READ, self.signals.on_wake)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    # -- the loop --------------------------------------------------------------------------

    def loop(self) -> int:
        while True:
            timeout = 1.0
            watchdog = self.notify.watchdog(time.monotonic())
            if watchdog is not None:
                timeout = min(timeout, max(0.0, watchdog - time.monotonic()))
            for key, mask in self.selector.select(timeout=timeout):
                key.data(mask)
            for signum in self.signals.take():
                self.handle_signal(signum)
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
            listeners = self.listeners.for_conf(config)
            self.pidfile.write(config.pid)
        except Exception as err:  # a reload must never take the master down
            message = str(err) if isinstance(err, ConfError) else f"reload failed: {err!r}"
            self.log.emerg(f"{message}, the old configuration keeps serving")
            answer(waiter, f"error {message}")
            self.notify.ready(self.status_line())
            return
        for gen in self.generations:
            if gen.state == GenState.STARTING:
                self.retire(gen)  # a newer reload supersedes one still starting
                gen.settle("error superseded by a newer reload")
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

    def status_line(self) -> str:
        serving = [g for g in self.generations if g.state == GenState.SERVING]
        if not serving:
            return "no generation serving"
        return serving[-1].status()

    # -- upgrade (USR2, WINCH) ------------------------------------------------------------

    def upgrade(self) -> None:
        """Start a new master from the installed forkgw, handing it our listening sockets."""
        if self.new_master:
            self.log.alert(f"the new master process {self.new_master} is still running, USR2 ignored")
            return
        try:
            self.pidfile.set_aside()
        except OSError as err:
            self.log.alert(f'rename() "{self.pidfile.path}" failed ({err}), USR2 ignored')
            return
        env = {**os.environ, **self.listeners.handover_env(), "FORKGW_UPGRADE": "1"}
        self.listeners.set_inheritable(True)
        pid = os.fork()
        if pid == 0:
            try:
                self.signals.close(MASTER_SIGNALS)
                os.chdir(self.cwd)
                os.execve(sys.executable, [sys.executable, "-m", "forkgw", *self.argv], env)
            finally:
                os._exit(1)
        self.listeners.set_inheritable(False)
        self.new_master = pid
        self.log.notice(f"start new binary process {pid}")

    def stop_workers(self) -> None:
        """WINCH: the old master of an upgrade lets its workers go and waits (HUP brings them back)."""
        if not self.new_master:
            self.log.notice("WINCH ignored: no upgrade in progress")
            return
        self.workers_stopped = True
        for gen in self.generations:
            if gen.state != GenState.RETIRING:
                self.retire(gen)

    def restart_workers(self) -> None:
        """Rollback of an upgrade: workers again, from the conf we already hold."""
        self.workers_stopped = False
        self.add_generation(*self.serving_conf)

    def new_master_exited(self, status: int) -> None:
        self.log.notice(f"new binary process {self.new_master} exited ({describe_exit(status)})")
        self.new_master = 0
        self.pidfile.restore()
        self.notify.main_pid(os.getpid())
        if self.control.taken_over():
            self.control.close()
            self.control.open(self.serving_conf[0], self.log)

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
        self.signals.close(MASTER_SIGNALS)
        self.selector.close()
        self.control.drop()
        for other in self.generations:
            other.drop()
        self.listeners.close_others(gen.listeners)
        set_affinity(gen.config, slot, self.log)
        Worker(gen.config, gen.listeners, gen.compiled, channel, self.log, gen.number,
               (gen.heartbeats, slot), self.shm).run()

    def on_channel(self, handle: WorkerHandle) -> None:
        if not handle.read_channel():
            self.selector.unregister(handle.channel)

    def tell_all(self, command: str) -> None:
        for gen in self.generations:
            for handle in gen.workers.values():
                handle.tell(command)

    # -- commands on the control socket ------------------------------------------------------------

    def on_control(self, command: str, conn: socket.socket) -> None:
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
        expected = gen.state == GenState.RETIRING or self.stopping
        self.log.write("notice" if expected and status == 0 else "alert",
                       f"worker process {handle.pid} {describe_exit(status)}")
        if expected:
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_FAILED:
            gen.failed = handle.fatal or "a worker failed to start its filters"
            return
        gen.count_death(handle, time.monotonic())

    def reconcile(self) -> int | None:
        now = time.monotonic()
        for gen in list(self.generations):
            if gen.state == GenState.STARTING:
                self.check_starting(gen)
            if gen.state in (GenState.STARTING, GenState.SERVING) and not self.stopping:
                self.check_heartbeats(gen, now)
                for slot in gen.slots_to_fill(now):
                    self.spawn(gen, slot)
            if gen.state == GenState.RETIRING:
                if not gen.workers:
                    self.generations.remove(gen)
                elif gen.kill_at and now >= gen.kill_at:
                    for handle in gen.workers.values():
                        self.log.warn(f"worker process {handle.pid} did not exit in time, killing it")
                        handle.kill(signal.SIGKILL)
                    gen.kill_at = 0.0
        if self.stopping:
            if not any(g.workers for g in self.generations):
                self.log.notice("exit")
                return self.exit_status
            if self.stop_deadline and now >= self.stop_deadline:
                for gen in self.generations:
                    for handle in gen.workers.values():
                        handle.kill(signal.SIGKILL)
                self.stop_deadline = 0.0
        return None

    def check_heartbeats(self, gen: Generation, now: float) -> None:
        """A ready worker whose loop stopped turning is killed; reap() then replaces it."""
        for handle, age in gen.stalled(now):
            self.log.alert(f"worker process {handle.pid} is not responding "
                           f"(no heartbeat for {age:.1f}s), killing it")
            handle.killed = True
            handle.kill(signal.SIGKILL)
            handle.kill(signal.SIGCONT)

    def check_starting(self, gen: Generation) -> None:
        serving = [g for g in self.generations if g.state == GenState.SERVING]
        if gen.failed:
            fallback = "the old configuration keeps serving" if serving else "exiting"
            self.log.emerg(f"{gen.failed}; {fallback}")
            self.retire(gen, kill=True)
            gen.settle(f"error {gen.failed}")
            if serving:
                self.notify.ready(self.status_line())
            else:
                self.exit_status = 1
                self.stop("fast")
            return
        if gen.workers and all(w.ready for w in gen.workers.values()) and not gen.missing_slots():
            gen.state = GenState.SERVING
            self.serving_conf = (gen.config, gen.compiled, gen.listeners)
            for old in serving:
                self.retire(old)
            in_use = {key for g in self.generations if g.state != GenState.RETIRING for key in g.listeners}
            self.listeners.close_unused(in_use)
            took = time.monotonic() - gen.started
            status = gen.status()
            self.log.notice(f"{status} (ready in {took:.3f}s)")
            gen.settle(f"ok {status}")
            self.notify.ready(status)

    def retire(self, gen: Generation, kill: bool = False) -> None:
        gen.state = GenState.RETIRING
        gen.kill_at = time.monotonic() + (KILL_GRACE if kill else gen.config.worker_shutdown_timeout)
        for handle in gen.workers.values():
            handle.tell("stop" if kill else "quit")

    def stop(self, how: str) -> None:
        if self.stopping == "fast":
            return
        self.notify.stopping()
        self.stopping = how
        for gen in self.generations:
            gen.settle("error the gateway is stopping")
        if how == "graceful":
            timeout = max((g.config.worker_shutdown_timeout for g in self.generations), default=0)
            self.stop_deadline = time.monotonic() + timeout + 1.0
            self.tell_all("quit")
        else:
            self.stop_deadline = time.monotonic() + KILL_GRACE
            for gen in self.generations:
                for handle in gen.workers.values():
                    handle.kill(signal.SIGTERM)
        self.listeners.close_all()


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


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        hint = " (killed: out of memory, or by an operator?)" if sig == signal.SIGKILL else ""
        return f"exited on signal {sig}{hint}"
    return f"exited with code {os.WEXITSTATUS(status)}"


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
