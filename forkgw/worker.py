"""A worker process: one event loop over raw non-blocking sockets.

Theory of operation.  The worker inherits the listening sockets and the
compiled wasm modules from the master, starts its filters (root contexts),
tells the master it is ready, then turns its loop (`net.loop`):

    select (until the next timer) -> run ready handlers -> expire timers
    -> act on signals and the master's commands -> filters' ticks, log flush

It knows no HTTP: an accepted socket goes to `http.server.HttpServer`, which
is all the worker asks of the request path (count, drain, close, flush and
reopen logs).  What the worker owns is the lifecycle: boot, the master's
channel (one-word commands: quit, stop, reopen) and signals (the same three
commands), both recorded when they arrive and acted on between two turns,
never inside a handler, so nothing is closed under code using it; the
heartbeat the master's watchdog reads, accept gating under `worker_connections`
and EMFILE, and the filters' ticks.

A worker never blocks, never threads a request, and never touches another
worker's state.  On `quit` it stops accepting, closes idle connections,
finishes in-flight requests and exits, by `worker_shutdown_timeout` at the
latest.  If the master dies (channel EOF) it does the same.
"""

from __future__ import annotations

import errno
import gc
import os
import resource
import selectors
import signal
import socket
import sys
import time
import traceback
from struct import pack_into

from setproctitle import setproctitle

from forkgw.conf.model import Config, walk_locations
from forkgw.http.server import HttpServer
from forkgw.log import ErrorLog
from forkgw.net.loop import Loop
from forkgw.net.signals import SignalInbox

EXIT_BOOT_FAILED = 3  # the master must not respawn this conf's workers in a loop
ACCEPT_BACKOFF = 0.5  # seconds without accepting after EMFILE/ENFILE, as nginx does
HOUSEKEEPING = 1.0  # access-log flush, accept resume, tick periods set during requests
HEARTBEAT = 1.0
SIGNALS = (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
IGNORED = (signal.SIGHUP, signal.SIGUSR2, signal.SIGWINCH, signal.SIGPIPE)
COMMANDS = {"quit": "start_draining", "stop": "stop_now", "reopen": "reopen"}
SIGNAL_COMMANDS = {signal.SIGQUIT: "quit", signal.SIGTERM: "stop", signal.SIGINT: "stop",
                   signal.SIGUSR1: "reopen"}


class Worker:
    def __init__(self, config: Config, listeners: dict, compiled, channel: socket.socket,
                 log: ErrorLog, generation: int, heartbeat: tuple | None = None, shm=None):
        self.config = config
        self.listeners = listeners  # Listen.key -> socket
        self.compiled = compiled
        self.channel = channel
        self.log = log
        self.generation = generation
        self.loop = Loop(self.handler_failed)
        self.server: HttpServer | None = None
        self.signals: SignalInbox | None = None
        self.commands: list[str] = []  # from the master's channel, acted on between turns
        self.draining = False
        self.running = True
        self.accepting = False
        self.accept_resume = 0.0
        self.shutdown_deadline = 0.0
        self.runtime = None
        self.shm = shm  # the store every worker shares (filters' shared data, metrics)
        self.shared = None
        self.heartbeat, slot = heartbeat if heartbeat else (bytearray(8), 0)
        self.heartbeat_offset = 8 * slot
        self.wasm_deadline: float | None = None  # when the filters next want ticks/rebuilds

    # -- boot ------------------------------------------------------------------------

    def boot(self) -> None:
        setproctitle("forkgw: worker process")
        for sig in IGNORED:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.signals = SignalInbox(SIGNALS)
        self.register(self.signals.wake, self.signals.on_wake)
        self.raise_fd_limit()
        metrics = self.attach_shared()
        self.server = HttpServer(self.config, self.loop, self.log, metrics)
        self.server.prepare(all_settings(self.config))  # opens the access logs while we may still be root
        self.listen_own_sockets()  # binds while we may still be root, too
        try:
            drop_privileges(self.config, self.log)
        except (KeyError, OSError) as err:
            self.fail_boot(f"cannot switch to user \"{self.config.user}\" ({err})",
                           f"cannot switch to user {self.config.user}: {err}")
        self.channel.setblocking(False)
        self.register(self.channel, self.on_channel)
        self.start_filters()
        self.enable_accept(force=True)
        # What exists now lives as long as the worker: out of the collector's sight, a full
        # collection only walks what came after (a retired VM, say) and stays cheap.
        gc.freeze()
        self.beat(time.monotonic())
        self.tell_master("ready")

    def register(self, sock, handler) -> None:
        self.loop.selector.register(sock, selectors.EVENT_READ, handler)

    def fail_boot(self, logged: str, told: str) -> None:
        self.log.emerg(logged)
        self.tell_master(f"fatal {told}")
        os._exit(EXIT_BOOT_FAILED)

    def raise_fd_limit(self) -> None:
        limit = self.config.worker_rlimit_nofile
        if limit:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            except (ValueError, OSError) as err:
                self.log.alert(f"setrlimit(RLIMIT_NOFILE, {limit}) failed ({err})")

    def attach_shared(self):
        """The store all workers share: this worker's wake-up socket for queues, and the metrics."""
        if self.shm is None:
            return None
        from forkgw.metrics import GatewayMetrics
        from forkgw.wasm.shared import ShmShared

        self.shared = ShmShared(self.shm)
        self.register(self.shared.wake, self.on_queue_wake)
        return GatewayMetrics(self.shm)

    def start_filters(self) -> None:
        filters = all_filters(self.config)
        if not filters:
            return
        from forkgw.wasm import Runtime, WasmBootError

        # A stream resumed, or a tick period set, inside a request: tick on this loop turn.
        self.runtime = Runtime(self.config.wasm, self.compiled, self.log, shared=self.shared,
                               http_dispatcher=self.server.call_out, wakeup=self.wake_filters)
        self.server.set_runtime(self.runtime)
        try:
            self.runtime.start(filters)
        except WasmBootError as err:
            self.fail_boot(str(err), str(err))
        self.wasm_deadline = self.runtime.tick(time.monotonic())

    def wake_filters(self) -> None:
        self.wasm_deadline = self.loop.now

    def on_queue_wake(self, mask: int) -> None:
        """Another worker enqueued to a queue a filter of ours registered."""
        if self.runtime is not None:
            self.wasm_deadline = self.runtime.tick(time.monotonic())
        else:
            self.shm.ready_queues()  # nobody to tell: just drain the socket

    def listen_own_sockets(self) -> None:
        """`listen … reuseport`: a socket per worker, so the kernel spreads connections evenly.

        The inherited socket of such an address is only bound (see listeners.bind); a
        socket handed over by systemd is listening already and is used as it is.
        """
        for listen in self.config.listens():
            inherited = self.listeners.get(listen.key)
            if not listen.reuseport or inherited is None or is_listening(inherited):
                continue
            own = socket.socket(inherited.family, socket.SOCK_STREAM)
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if inherited.family == socket.AF_INET6:
                own.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            own.bind((listen.addr, listen.port))
            own.listen(listen.backlog)
            own.setblocking(False)
            inherited.close()
            self.listeners = {**self.listeners, listen.key: own}

    def tell_master(self, message: str) -> None:
        try:
            self.channel.send(message.encode() + b"\n")
        except OSError:
            pass

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        self.boot()
        loop, server = self.loop, self.server
        next_housekeeping = time.monotonic() + HOUSEKEEPING
        while self.running:
            now = time.monotonic()
            timeout = min(next_housekeeping - now, HEARTBEAT)
            next_timer = loop.next_timer()
            if next_timer is not None:
                timeout = min(timeout, next_timer - now)
            if self.wasm_deadline is not None:
                timeout = min(timeout, self.wasm_deadline - now)
            now = loop.turn(timeout)
            self.beat(now)
            if self.signals.pending or self.commands:
                self.act_on_commands()
            if self.wasm_deadline is not None and now >= self.wasm_deadline:
                self.wasm_deadline = self.runtime.tick(now)
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING
                self.housekeeping(now)
            if self.draining and (not server.connections or now >= self.shutdown_deadline):
                self.running = False
        self.exit()

    def beat(self, now: float) -> None:
        pack_into("d", self.heartbeat, self.heartbeat_offset, now)

    def housekeeping(self, now: float) -> None:
        if self.runtime is not None:  # picks up tick periods set during requests
            self.wasm_deadline = self.runtime.tick(now)
        self.server.flush_logs()
        if not self.accepting and not self.draining and now >= self.accept_resume:
            self.enable_accept()

    def handler_failed(self, handler) -> None:
        """A bug met one connection: log it loudly, drop that connection, serve on."""
        self.log.alert("unexpected error, connection dropped: "
                       + traceback.format_exc().replace("\n", " | "))
        fail = getattr(getattr(handler, "__self__", None), "fail", None)
        if fail is not None:
            fail()

    # -- accepting --------------------------------------------------------------------

    def acceptor(self, listener: socket.socket, key):
        limit = self.config.worker_connections
        multi = self.config.multi_accept
        server, signals, commands = self.server, self.signals, self.commands

        def accept(mask: int) -> None:
            if commands or signals.pending:
                return  # a quit may be among them: a newer generation takes the connection
            while len(server.connections) < limit:
                try:
                    sock, addr = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as err:
                    if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self.log.alert(f"accept() failed ({err.errno}: {err.strerror})")
                        self.disable_accept(ACCEPT_BACKOFF)
                        return
                    if err.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                        continue
                    raise
                sock.setblocking(False)
                if sock.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                server.accept(sock, addr, key)
                if not multi:
                    return
            self.log.warn(f"{limit} worker_connections are not enough")
            self.disable_accept(0.0)

        return accept

    def disable_accept(self, seconds: float) -> None:
        if self.accepting:
            self.accepting = False
            self.accept_resume = self.loop.now + seconds
            for sock in self.listeners.values():
                self.loop.selector.unregister(sock)

    def enable_accept(self, force: bool = False) -> None:
        if not force and len(self.server.connections) >= self.config.worker_connections:
            return
        self.accepting = True
        for key, sock in self.listeners.items():
            self.register(sock, self.acceptor(sock, key))

    # -- commands: from the master's channel, or signals ---------------------------------

    def on_channel(self, mask: int) -> None:
        try:
            data = self.channel.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.log.alert("master process is gone, worker exits")
            self.loop.selector.unregister(self.channel)
            self.commands.append("quit")
            return
        self.commands.extend(data.decode().split())

    def act_on_commands(self) -> None:
        """Between two turns, never inside a handler: a listener is not closed under its accept."""
        commands = [SIGNAL_COMMANDS[signum] for signum in self.signals.take()] + self.commands
        self.commands.clear()  # the same list the acceptors watch
        for command in commands:
            method = COMMANDS.get(command)
            if method is not None:
                getattr(self, method)()

    def start_draining(self) -> None:
        if self.draining:
            return
        self.draining = True
        setproctitle("forkgw: worker process is shutting down")
        self.shutdown_deadline = time.monotonic() + self.config.worker_shutdown_timeout
        if self.accepting:
            for sock in self.listeners.values():
                self.loop.selector.unregister(sock)
        self.accepting = False
        for sock in self.listeners.values():
            sock.close()
        self.server.drain()

    def stop_now(self) -> None:
        self.running = False
        self.draining = True

    def reopen(self) -> None:
        self.log.reopen()
        self.server.reopen_logs()

    def exit(self) -> None:
        self.server.close_all()
        if self.runtime is not None:
            self.runtime.close()
        self.server.flush_logs()
        sys.stdout.flush()
        os._exit(0)


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def all_settings(config: Config):
    """Every Settings of the conf: each server's and each location's, nested ones too."""
    for server in config.http.servers if config.http else []:
        yield server.settings
        for location in walk_locations(server.locations):
            yield location.settings


def all_filters(config: Config) -> list:
    """Every distinct proxy_wasm line of the conf, in the order they first appear."""
    seen: dict[tuple, object] = {}
    for settings in all_settings(config):
        for ref in settings.filters:
            seen.setdefault((ref.module, ref.config, ref.root_id, ref.on_error), ref)
    return list(seen.values())


def drop_privileges(config: Config, log: ErrorLog) -> None:
    """`user`: workers of a master started as root run as that user, as nginx's do."""
    if not config.user:
        return
    if os.geteuid() != 0:
        log.warn('the "user" directive makes sense only if the master process runs with '
                 'super-user privileges, ignored')
        return
    import grp
    import pwd

    entry = pwd.getpwnam(config.user)
    gid = grp.getgrnam(config.group).gr_gid if config.group else entry.pw_gid
    os.setgroups([])
    os.initgroups(config.user, gid)
    os.setgid(gid)
    os.setuid(entry.pw_uid)
