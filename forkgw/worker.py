"""A worker process: one selector loop over raw non-blocking sockets.

Theory of operation.  The worker inherits the listening sockets and the
compiled wasm modules from the master, starts its filters (root contexts),
tells the master it is ready, then loops:

    select (until the next timer) -> run ready handlers -> expire timers

Handlers are bound methods stored as selector data: accepting, a client
connection (`http.client`), an upstream connection (`http.upstream`), and the
channel from the master, which carries one-word commands (quit, stop, reopen).
Timers are a heap with lazy deletion: an object keeps one `deadline`; a heap
entry that no longer matches it is skipped when it comes up, so moving a
deadline later costs nothing and no entry is ever searched for.

A worker never blocks, never threads a request, and never touches another
worker's state.  On `quit` it stops accepting, closes idle connections,
finishes in-flight requests and exits, by `worker_shutdown_timeout` at the
latest.  If the master dies (channel EOF) it does the same.
"""

from __future__ import annotations

import errno
import gc
import heapq
from functools import partial
import itertools
import os
import resource
import selectors
import signal
import socket
import sys
import time
from struct import pack_into
import traceback

from setproctitle import setproctitle

from forkgw.conf.model import Config, Settings
from forkgw.http.callout import dispatch as dispatch_callout
from forkgw.http.client import ClientConnection
from forkgw.http.messages import HttpDate, end_to_end
from forkgw.http.upstream import Balancer, Pool
from forkgw.log import ErrorLog
from forkgw.routing import Router
from forkgw.variables import Template, header_bytes, to_bytes, url_bytes

EXIT_BOOT_FAILED = 3  # the master must not respawn this conf's workers in a loop
ACCEPT_BACKOFF = 0.5  # seconds without accepting after EMFILE/ENFILE, as nginx does
ACCESS_LOG_FLUSH = 1.0
HEARTBEAT = 1.0


class AccessLog:
    """A buffered append-only file; flushed by the loop every second and at exit."""

    def __init__(self, path: str):
        self.path = path
        self.fd = self._open()
        self.buffer: list[str] = []

    def _open(self) -> int:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def flush(self) -> None:
        if self.buffer:
            data = "".join(self.buffer).encode("utf-8", "replace")
            self.buffer.clear()
            try:
                os.write(self.fd, data)
            except OSError:
                pass  # a full disk loses log lines, never requests

    def reopen(self) -> None:
        self.flush()
        try:
            fd = self._open()
        except OSError:
            return
        os.dup2(fd, self.fd)
        os.close(fd)


class LocationPlan:
    """Per-Settings work done once: compiled templates and opened log files."""

    __slots__ = ("logs", "proxy_headers", "proxy_header_names")

    def __init__(self, worker: "Worker", settings: Settings, formats: dict[str, str]):
        self.logs = [(worker.open_access_log(path), worker.template(formats[fmt]))
                     for path, fmt in settings.access_log]
        # nginx's defaults: Host is the proxied host, and Connection is ours to manage.
        headers = {"host": "$proxy_host"}
        for name, value in settings.proxy_set_header:
            headers[name.lower()] = value
        headers.pop("connection", None)
        headers.setdefault("expect", "")  # we answered 100-continue ourselves
        self.proxy_headers = [(name.encode("latin-1"), worker.template(value))
                              for name, value in headers.items()]
        self.proxy_header_names = frozenset(name for name, _ in self.proxy_headers)


class RequestInfo:
    """A StreamInfo read from the request's connection and state when a filter asks.

    Nothing is copied per request; the request id is drawn only if a filter reads it
    (request.id), as `$request_id` draws it only when logged.
    """

    __slots__ = ("conn", "state")
    protocol = "HTTP/1.1"
    scheme = "http"

    def __init__(self, conn, state):
        self.conn = conn
        self.state = state

    source = property(lambda self: (self.conn.remote_addr, self.conn.remote_port))
    destination = property(lambda self: (self.conn.server_addr, self.conn.server_port))
    connection_id = property(lambda self: self.conn.id)
    request_id = property(lambda self: self.state.request_id)
    start_time = property(lambda self: self.state.start_time)
    response_code = property(lambda self: self.state.status)


class Worker:
    def __init__(self, config: Config, listeners: dict, compiled, channel: socket.socket,
                 log: ErrorLog, generation: int, heartbeat: tuple | None = None, shm=None):
        self.config = config
        self.http = config.http
        self.listeners = listeners  # Listen.key -> socket
        self.compiled = compiled
        self.channel = channel
        self.log = log
        self.generation = generation
        self.pid = os.getpid()
        self.selector = selectors.DefaultSelector()
        self.timers: list = []
        self.seq = itertools.count()
        self.now = time.monotonic()
        self.date = HttpDate()
        self.router = Router(self.http)
        self.connections: set[ClientConnection] = set()
        self.conn_ids = itertools.count(1)
        # $request_id: 32 hex digits like nginx's, a random half per worker and a counter,
        # unique without a system call per request.
        self.request_id_prefix = os.urandom(8).hex()
        self.request_counter = itertools.count(1)
        self.draining = False
        self.running = True
        self.accepting = False
        self.accept_resume = 0.0
        self.shutdown_deadline = 0.0
        self.upstreams = self.http.upstreams if self.http else {}
        self._upstream_state: dict[str, tuple[Balancer, Pool]] = {}
        self.callout_upstreams: dict = {}  # implicit upstreams for literal host:port callouts
        self._plans: dict[int, LocationPlan] = {}
        self._templates: dict[str, Template] = {}
        self._constant_bodies: dict[str, bytes] = {}
        self._access_logs: dict[str, AccessLog] = {}
        self._defaults: dict = {}
        self.runtime = None
        self.shm = shm  # the store every worker shares (filters' shared data, metrics)
        self.shared = None
        self.metrics = None
        self.heartbeat, slot = heartbeat if heartbeat else (bytearray(8), 0)
        self.heartbeat_offset = 8 * slot
        self.wasm_deadline: float | None = None  # when the filters next want ticks/rebuilds

    # -- boot ------------------------------------------------------------------------

    def boot(self) -> None:
        setproctitle("forkgw: worker process")
        for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGWINCH, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, lambda *_: self.start_draining())
        signal.signal(signal.SIGTERM, lambda *_: self.stop_now())
        signal.signal(signal.SIGINT, lambda *_: self.stop_now())
        signal.signal(signal.SIGUSR1, lambda *_: self.reopen())
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if self.config.worker_rlimit_nofile:
            limit = self.config.worker_rlimit_nofile
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            except (ValueError, OSError) as err:
                self.log.alert(f"setrlimit(RLIMIT_NOFILE, {limit}) failed ({err})")
        for settings in all_settings(self.config):
            self.plan(settings)  # opens the access logs while we may still be root
        self.listen_own_sockets()  # binds while we may still be root, too
        try:
            drop_privileges(self.config, self.log)
        except (KeyError, OSError) as err:
            self.log.emerg(f"cannot switch to user \"{self.config.user}\" ({err})")
            self.tell_master(f"fatal cannot switch to user {self.config.user}: {err}")
            os._exit(EXIT_BOOT_FAILED)
        self.channel.setblocking(False)
        self.selector.register(self.channel, selectors.EVENT_READ, self.on_channel)
        if self.shm is not None:
            from forkgw.metrics import GatewayMetrics
            from forkgw.wasm.shared import ShmShared

            self.shared = ShmShared(self.shm)  # binds this worker's wake-up socket for queues
            self.selector.register(self.shared.wake, selectors.EVENT_READ, self.on_wake)
            self.metrics = GatewayMetrics(self.shm)
        filters = all_filters(self.config)
        if filters:
            from forkgw.wasm import Runtime, WasmBootError

            self.runtime = Runtime(self.config.wasm, self.compiled, self.log)
            # proxy_http_call: (target, headers, body, timeout_s, on_done) -> bool, on this loop
            self.runtime.http_dispatcher = partial(dispatch_callout, self)
            if self.shared is not None:
                self.runtime.shared = self.shared
            # A stream resumed, or a tick period set, inside a request: tick on this loop turn.
            self.runtime.wakeup = lambda: setattr(self, "wasm_deadline", self.now)
            try:
                self.runtime.start(filters)
            except WasmBootError as err:
                self.log.emerg(str(err))
                self.tell_master(f"fatal {err}")
                os._exit(EXIT_BOOT_FAILED)
            self.wasm_deadline = self.runtime.tick(time.monotonic())
        for key, sock in self.listeners.items():
            self.selector.register(sock, selectors.EVENT_READ, self.acceptor(sock, key))
        # What exists now lives as long as the worker: out of the collector's sight, a full
        # collection only walks what came after (a retired VM, say) and stays cheap.
        gc.freeze()
        self.accepting = True
        pack_into("d", self.heartbeat, self.heartbeat_offset, time.monotonic())
        self.tell_master("ready")

    def on_wake(self, mask: int) -> None:
        """Another worker enqueued to a queue a filter of ours registered."""
        if self.runtime is not None:
            self.wasm_deadline = self.runtime.tick(time.monotonic())
        else:
            self.shm.ready_queues()  # nobody to tell: just drain the socket

    def listen_own_sockets(self) -> None:
        """`listen … reuseport`: a socket per worker, so the kernel spreads connections evenly.

        The inherited socket of such an address is only bound (see master.bind); a
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
        next_flush = time.monotonic() + ACCESS_LOG_FLUSH
        selector, timers = self.selector, self.timers
        while self.running:
            now = self.now = time.monotonic()
            timeout = min(next_flush - now, HEARTBEAT)
            if timers:
                timeout = min(timeout, timers[0][0] - now)
            if self.wasm_deadline is not None:
                timeout = min(timeout, self.wasm_deadline - now)
            events = selector.select(max(timeout, 0))
            self.now = now = time.monotonic()
            pack_into("d", self.heartbeat, self.heartbeat_offset, now)
            for key, mask in events:
                try:
                    key.data(mask)
                except Exception:
                    self.handler_failed(key.data)
            while timers and timers[0][0] <= now:
                deadline, _, obj = heapq.heappop(timers)
                if obj.timer_at != deadline:
                    continue
                obj.timer_queued = False
                if obj.deadline is None:
                    continue
                if obj.deadline > now:
                    self.queue_timer(obj, obj.deadline)
                else:
                    obj.deadline = None
                    try:
                        obj.on_timeout()
                    except Exception:
                        self.handler_failed(obj.on_timeout)
            if self.wasm_deadline is not None and now >= self.wasm_deadline:
                self.wasm_deadline = self.runtime.tick(now)
            if now >= next_flush:
                if self.runtime is not None:  # picks up tick periods set during requests
                    self.wasm_deadline = self.runtime.tick(now)
                next_flush = now + ACCESS_LOG_FLUSH
                self.flush_logs()
                if not self.accepting and not self.draining and now >= self.accept_resume:
                    self.enable_accept()
            if self.draining and (not self.connections or now >= self.shutdown_deadline):
                self.running = False
        self.exit()

    def handler_failed(self, handler) -> None:
        """A bug met one connection: log it loudly, drop that connection, serve on."""
        self.log.alert("unexpected error, connection dropped: "
                       + traceback.format_exc().replace("\n", " | "))
        owner = getattr(handler, "__self__", None)
        client = owner if isinstance(owner, ClientConnection) else \
            getattr(getattr(owner, "handler", None), "client", None)
        if owner is not None and owner is not client and hasattr(owner, "close"):
            owner.close()
        if client is not None:
            client.abort()

    def set_deadline(self, obj, seconds: float) -> None:
        deadline = self.now + seconds
        obj.deadline = deadline
        if not obj.timer_queued or deadline < obj.timer_at:
            self.queue_timer(obj, deadline)

    def queue_timer(self, obj, deadline: float) -> None:
        obj.timer_at = deadline
        obj.timer_queued = True
        heapq.heappush(self.timers, (deadline, next(self.seq), obj))

    # -- accepting --------------------------------------------------------------------

    def acceptor(self, listener: socket.socket, key):
        limit = self.config.worker_connections
        multi = self.config.multi_accept

        def accept(mask: int) -> None:
            if not self.accepting:
                return  # told to drain earlier in this same loop turn: the socket is closed
            while len(self.connections) < limit:
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
                conn = ClientConnection(self, sock, addr, key, next(self.conn_ids))
                self.connections.add(conn)
                if self.metrics is not None:
                    self.metrics.accepted.add(1)
                    self.metrics.connections.add(1)
                conn.on_readable()  # data usually came with the connection: skip a loop turn
                if not multi:
                    return
            self.log.warn(f"{limit} worker_connections are not enough")
            self.disable_accept(0.0)

        return accept

    def disable_accept(self, seconds: float) -> None:
        if self.accepting:
            self.accepting = False
            self.accept_resume = self.now + seconds
            for sock in self.listeners.values():
                self.selector.unregister(sock)

    def enable_accept(self) -> None:
        if len(self.connections) >= self.config.worker_connections:
            return
        self.accepting = True
        for key, sock in self.listeners.items():
            self.selector.register(sock, selectors.EVENT_READ, self.acceptor(sock, key))

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if self.metrics is not None:
            self.metrics.connections.add(-1)

    # -- what connections ask of the worker ------------------------------------------

    def default_settings(self, listen_key) -> Settings:
        server = self._defaults.get(listen_key)
        if server is None:
            server = self._defaults[listen_key] = self.router.server_for(listen_key, None)
        return server.settings

    def header_limit(self, listen_key) -> int:
        number, size = self.default_settings(listen_key).large_client_header_buffers
        return number * size

    def next_request_id(self) -> str:
        return f"{self.request_id_prefix}{next(self.request_counter):016x}"

    def plan(self, settings: Settings) -> LocationPlan:
        plan = self._plans.get(id(settings))
        if plan is None:
            plan = self._plans[id(settings)] = LocationPlan(self, settings, self.http.log_formats)
        return plan

    def template(self, text: str) -> Template:
        template = self._templates.get(text)
        if template is None:
            template = self._templates[text] = Template(text)
            for name in template.unknown:
                self.log.warn(f'unknown variable "${name}" renders empty')
        return template

    def open_access_log(self, path: str) -> AccessLog:
        log = self._access_logs.get(path)
        if log is None:
            log = self._access_logs[path] = AccessLog(path)
        return log

    def access_log(self, settings: Settings, state) -> None:
        if self.metrics is not None:
            self.metrics.request(state.status, state.end_time - state.start_time)
        for log, template in self.plan(settings).logs:
            log.buffer.append(template.render(state) + "\n")

    def proxy_headers(self, settings: Settings, state, headers) -> list[tuple[bytes, bytes]]:
        """nginx's rule: proxy_set_header lines first, then the client's end-to-end headers."""
        plan = self.plan(settings)
        out = []
        for name, template in plan.proxy_headers:
            value = template.render(state, empty="")
            if value:
                out.append((name, header_bytes(value)))
        skip = plan.proxy_header_names
        for name, value in end_to_end(headers):
            if name not in skip:
                out.append((name, value))
        for name, value in headers:
            if name == b"transfer-encoding":
                out.append((b"transfer-encoding", b"chunked"))
                break
        return out

    def render_return(self, text: str, state) -> bytes:
        template = self.template(text)
        if template.constant:
            body = self._constant_bodies.get(text)
            if body is None:
                body = self._constant_bodies[text] = text.encode("utf-8")
            return body
        return to_bytes(template.render(state, empty=""))

    def absolute_url(self, text: str, state) -> bytes:
        url = self.template(text).render(state, empty="")
        if url.startswith("/"):
            port = "" if state.server_port == 80 else f":{state.server_port}"
            url = f"http://{state.host}{port}{url}"
        return url_bytes(url)

    def upstream_state(self, upstream):
        state = self._upstream_state.get(upstream.name)
        if state is None:
            state = self._upstream_state[upstream.name] = (Balancer(upstream), Pool(self, upstream.keepalive))
        return state

    def wasm_stream(self, filters, conn: ClientConnection, state):
        return self.runtime.stream(filters, RequestInfo(conn, state))

    # -- commands from the master -------------------------------------------------------

    def on_channel(self, mask: int) -> None:
        try:
            data = self.channel.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.log.alert("master process is gone, worker exits")
            self.selector.unregister(self.channel)
            self.start_draining()
            return
        for command in data.decode().split():
            if command == "quit":
                self.start_draining()
            elif command == "stop":
                self.stop_now()
            elif command == "reopen":
                self.reopen()

    def start_draining(self) -> None:
        if self.draining:
            return
        self.draining = True
        setproctitle("forkgw: worker process is shutting down")
        self.shutdown_deadline = time.monotonic() + self.config.worker_shutdown_timeout
        if self.accepting:
            for sock in self.listeners.values():
                self.selector.unregister(sock)
        self.accepting = False
        for sock in self.listeners.values():
            sock.close()
        for _, pool in self._upstream_state.values():
            pool.close_all()
        for conn in list(self.connections):
            conn.drain()

    def stop_now(self) -> None:
        self.running = False
        self.draining = True

    def reopen(self) -> None:
        self.log.reopen()
        for log in self._access_logs.values():
            log.reopen()

    def flush_logs(self) -> None:
        for log in self._access_logs.values():
            log.flush()

    def exit(self) -> None:
        for conn in list(self.connections):
            conn.close()
        if self.runtime is not None:
            self.runtime.close()
        self.flush_logs()
        sys.stdout.flush()
        os._exit(0)


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def all_settings(config: Config):
    """Every Settings of the conf: each server's and each location's, nested ones too."""

    def walk(locations):
        for location in locations:
            yield location.settings
            yield from walk(location.locations)

    for server in config.http.servers if config.http else []:
        yield server.settings
        yield from walk(server.locations)


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
