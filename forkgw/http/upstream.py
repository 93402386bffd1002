"""proxy_pass: choosing a peer, keep-alive pools, and streaming one request through.

Theory of operation.  Each worker owns its balancers and pools; nothing here is
shared across processes.  A `Balancer` runs nginx's smooth weighted round robin
over an upstream's peers and keeps the passive health (`max_fails` within
`fail_timeout` takes a peer out for `fail_timeout`).  A `ProxyRequest` carries
one client request to a peer: it takes an idle connection from the pool or
connects without blocking, writes the request head and streams the body as it
arrives, and hands the response back to the client connection event by event.
A failure before any response byte came back (connect refused or timed out, a
stale keep-alive connection closed under us) is retried on the next peer when
`proxy_next_upstream` allows and the request body is still held; after that
the client gets 502 (or 504 on a timeout), as nginx answers.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time

import h11

from forkgw.conf.model import Upstream, UpstreamServer
from forkgw.http.messages import end_of_message, end_to_end, header_list

READ_SIZE = 65536
NON_IDEMPOTENT = frozenset({b"POST", b"LOCK", b"PATCH"})
HIGH_WATER = 256 * 1024  # bytes queued toward a slow reader before its source pauses
REPLAY_LIMIT = 64 * 1024  # body bytes kept so a failed attempt can be replayed
IDLE_TIMEOUT = 60.0  # idle keep-alive connection to an upstream (nginx's default)


class Peer:
    """One `server` line of an upstream block, resolved once at worker start."""

    __slots__ = ("server", "name", "sockaddr", "family", "weight", "current", "fails", "down_until")

    def __init__(self, server: UpstreamServer):
        self.server = server
        self.name = f"{server.host}:{server.port}"
        info = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)[0]
        self.family, self.sockaddr = info[0], info[4]
        self.weight = server.weight
        self.current = 0
        self.fails = 0
        self.down_until = 0.0

    @property
    def addr(self) -> str:
        host, port = self.sockaddr[0], self.sockaddr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Balancer:
    """Smooth weighted round robin with passive health, primaries before backups."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self.primary = [Peer(s) for s in upstream.servers if not s.backup]
        self.backup = [Peer(s) for s in upstream.servers if s.backup]
        self.tries = len(self.primary) + len(self.backup)

    def pick(self, now: float, tried: set[Peer]) -> Peer | None:
        for group in (self.primary, self.backup):
            peer = self._pick_from(group, now, tried)
            if peer is not None:
                return peer
        if not tried:
            # Every peer is marked down: nginx then tries them all again rather than fail.
            for peer in self.primary + self.backup:
                peer.fails, peer.down_until = 0, 0.0
            return self._pick_from(self.primary or self.backup, now, tried)
        return None

    @staticmethod
    def _pick_from(group: list[Peer], now: float, tried: set[Peer]) -> Peer | None:
        best, total = None, 0
        for peer in group:
            if peer in tried or peer.down_until > now:
                continue
            peer.current += peer.weight
            total += peer.weight
            if best is None or peer.current > best.current:
                best = peer
        if best is not None:
            best.current -= total
        return best

    def has_untried(self, now: float, tried: set[Peer]) -> bool:
        return any(p not in tried and p.down_until <= now for p in self.primary + self.backup)

    @staticmethod
    def failed(peer: Peer, now: float) -> None:
        server = peer.server
        if server.max_fails == 0:
            return
        peer.fails += 1
        if peer.fails >= server.max_fails:
            peer.down_until = now + server.fail_timeout

    @staticmethod
    def succeeded(peer: Peer) -> None:
        peer.fails = 0
        peer.down_until = 0.0


class UpstreamConnection:
    """A socket to one peer with its h11 client state; reused while keep-alive allows."""

    __slots__ = ("worker", "peer", "sock", "h11", "out", "handler", "connected", "deadline",
                 "timer_at", "timer_queued", "events", "closed", "pool", "requests", "idle_since")

    def __init__(self, worker, peer: Peer):
        self.worker = worker
        self.peer = peer
        self.sock = socket.socket(peer.family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h11 = h11.Connection(h11.CLIENT)
        self.out = bytearray()
        self.handler = None  # the ProxyRequest using us, or None while idle in a pool
        self.connected = False
        self.deadline = None
        self.timer_at = 0.0
        self.timer_queued = False
        self.events = 0
        self.closed = False
        self.pool = None
        self.requests = 0
        self.idle_since = 0.0

    def connect(self) -> None:
        err = self.sock.connect_ex(self.peer.sockaddr)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        self.want(selectors.EVENT_WRITE)

    def want(self, events: int) -> None:
        if self.closed or events == self.events:
            return
        selector = self.worker.selector
        if self.events == 0:
            selector.register(self.sock, events, self.on_event)
        elif events == 0:
            selector.unregister(self.sock)
        else:
            selector.modify(self.sock, events, self.on_event)
        self.events = events

    def on_event(self, mask: int) -> None:
        if self.closed:
            return  # closed earlier in this loop turn (e.g. its client reset)
        if self.handler is None:
            self.on_idle_event()
            return
        if not self.connected and mask & selectors.EVENT_WRITE:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.handler.upstream_failed(self, "connect() failed", OSError(err, os.strerror(err)))
                return
            self.connected = True
            self.handler.upstream_connected(self)
            return
        if mask & selectors.EVENT_WRITE:
            self.flush()
        if mask & selectors.EVENT_READ and not self.closed and self.handler is not None:
            self.handler.upstream_readable(self)

    def on_idle_event(self) -> None:
        """An idle pooled connection became readable: the peer closed it (or sent junk)."""
        self.close()

    def send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            self.out += data
            if self.connected:
                self.flush()

    def flush(self) -> None:
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as err:
                self.handler.upstream_failed(self, "send() failed", err)
                return
            del self.out[:sent]
        self.want(selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0))
        if not self.out and self.handler is not None:
            self.handler.upstream_drained(self)

    def recv(self) -> bytes | None:
        try:
            return self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def on_timeout(self) -> None:
        if self.handler is not None:
            self.handler.upstream_timeout(self)
        else:
            self.close()

    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def close(self) -> None:
        if self.closed:
            return
        self.want(0)
        self.closed = True
        self.deadline = None
        if self.pool is not None:
            self.pool.discard(self)
        try:
            self.sock.close()
        except OSError:
            pass


class Pool:
    """Idle keep-alive connections to one upstream, at most `keepalive` of them (LIFO)."""

    def __init__(self, worker, size: int):
        self.worker = worker
        self.size = size
        self.idle: list[UpstreamConnection] = []

    def take(self, peer: Peer) -> UpstreamConnection | None:
        for i in range(len(self.idle) - 1, -1, -1):
            conn = self.idle[i]
            if conn.peer is peer:
                del self.idle[i]
                conn.pool = None
                conn.deadline = None
                return conn
        return None

    def give(self, conn: UpstreamConnection) -> None:
        if self.size <= 0 or not conn.reusable():
            conn.close()
            return
        conn.h11.start_next_cycle()
        conn.handler = None
        conn.pool = self
        conn.want(selectors.EVENT_READ)
        self.idle.append(conn)
        self.worker.set_deadline(conn, IDLE_TIMEOUT)
        while len(self.idle) > self.size:
            self.idle[0].close()

    def discard(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close_all(self) -> None:
        for conn in list(self.idle):
            conn.close()


class ProxyRequest:
    """One client request on its way to a peer and its response on the way back."""

    def __init__(self, client, upstream: Upstream, request: h11.Request, settings, has_body: bool):
        self.client = client
        self.worker = client.worker
        self.upstream = upstream
        self.balancer, self.pool = self.worker.upstream_state(upstream)
        self.request = request
        self.settings = settings
        self.tried: set[Peer] = set()
        self.conn: UpstreamConnection | None = None
        self.replay: list[bytes] | None = []  # the body so far, while small enough to resend
        self.replay_size = 0
        self.pending: list[bytes] = []  # body chunks waiting for the connection to open
        self.body_ended = not has_body
        self.trailers: list = []  # the request's, once its body ended (kept for a retry)
        self.response_started = False
        self.sent = False  # the request went out to some peer (a retry would resend it)
        self.timed_out = False  # the last attempt failed on a timeout
        self.done = False
        self.attempt_start = 0.0
        self.addrs: list[str] = []
        self.statuses: list[str] = []
        self.times: list[str] = []

    # -- attempts ---------------------------------------------------------

    def start(self) -> None:
        now = self.worker.now
        peer = self.balancer.pick(time.monotonic(), self.tried)
        if peer is None:
            self.finish_with_error(504 if self.timed_out else 502)  # nginx: the last failure decides
            return
        self.tried.add(peer)
        self.attempt_start = now
        self.addrs.append(peer.addr)
        conn = self.pool.take(peer)
        reused = conn is not None
        if conn is None:
            conn = UpstreamConnection(self.worker, peer)
        conn.handler = self
        self.conn = conn
        if reused:
            self.upstream_connected(conn)
            return
        try:
            conn.connect()
        except OSError as err:
            self.upstream_failed(conn, "connect() failed", err)
            return
        self.worker.set_deadline(conn, self.settings.proxy_connect_timeout)

    def upstream_connected(self, conn: UpstreamConnection) -> None:
        conn.connected = True
        conn.requests += 1
        self.sent = True
        conn.send(self.request)
        for chunk in self.replay if self.replay is not None else self.pending:
            conn.send(h11.Data(data=chunk))
        self.pending = []
        self.client.resume_reading()
        if self.body_ended:
            conn.send(end_of_message(conn.h11, self.trailers))
        conn.want(selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0))
        conn.flush()
        self.worker.set_deadline(conn, self.settings.proxy_read_timeout if not conn.out
                                 else self.settings.proxy_send_timeout)

    def retryable(self, timeout: bool, status: int = 0) -> bool:
        allowed = self.settings.proxy_next_upstream
        if "off" in allowed or self.response_started or self.client.closed:
            return False
        if self.replay is None:
            return False  # part of the body is gone already: cannot replay
        if self.sent and self.request.method in NON_IDEMPOTENT and "non_idempotent" not in allowed:
            return False  # nginx never sends a POST twice unless told to
        return status != 0 or ("timeout" if timeout else "error") in allowed

    def upstream_failed(self, conn: UpstreamConnection, what: str, err: Exception | None,
                        timeout: bool = False, count_failure: bool = True) -> None:
        if conn is not self.conn or self.done:
            conn.close()
            return
        peer = conn.peer
        self.timed_out = timeout
        stale = conn.requests > 1 and not self.response_started and not timeout
        conn.close()
        self.conn = None
        self.record_attempt("502" if not timeout else "504")
        if count_failure and not stale:
            self.balancer.failed(peer, time.monotonic())
            if self.worker.metrics is not None:
                self.worker.metrics.upstream_error(self.upstream.name)
        detail = f" ({err.errno}: {err.strerror})" if isinstance(err, OSError) and err.errno else ""
        phase = ("connecting to" if not conn.connected else
                 "reading" if self.response_started else "reading response header from")
        self.worker.log.error(f"{what}{detail} while {phase} upstream, client: "
                              f"{self.client.remote_addr}, upstream: \"http://{peer.addr}\"")
        if stale:
            self.tried.discard(peer)  # a closed keep-alive connection says nothing about the peer
            self.start()
            return
        if self.retryable(timeout):
            self.start()
            return
        if self.response_started:
            self.client.abort()
            self.finish()
            return
        self.finish_with_error(504 if timeout else 502)

    def upstream_timeout(self, conn: UpstreamConnection) -> None:
        self.upstream_failed(conn, "upstream timed out", None, timeout=True)

    # -- request body, from the client --------------------------------------

    def body_data(self, data: bytes) -> None:
        if self.replay is not None:
            self.replay.append(data)
            self.replay_size += len(data)
            if self.replay_size > REPLAY_LIMIT:
                self.replay = None  # too large to hold: no retry from here on
        if self.conn is not None and self.conn.connected:
            self.conn.send(h11.Data(data=data))
            if len(self.conn.out) > HIGH_WATER:
                self.client.pause_reading()
        else:
            self.pending.append(data)
            if len(self.pending) > 4 and sum(map(len, self.pending)) > HIGH_WATER:
                self.client.pause_reading()

    def body_end(self, trailers=()) -> None:
        if self.body_ended:
            return  # no body: the request went out whole with its EndOfMessage
        self.body_ended = True
        self.trailers = list(trailers)
        if self.conn is not None and self.conn.connected:
            self.conn.send(end_of_message(self.conn.h11, self.trailers))

    def upstream_drained(self, conn: UpstreamConnection) -> None:
        self.client.resume_reading()
        if not self.response_started:
            self.worker.set_deadline(conn, self.settings.proxy_read_timeout)

    # -- response, from the peer --------------------------------------------

    def upstream_readable(self, conn: UpstreamConnection) -> None:
        data = conn.recv()
        if data is None:
            return
        conn.h11.receive_data(data)
        while not self.done and conn is self.conn:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as err:
                if self.response_started:
                    self.worker.log.error(f"upstream sent invalid response: {err} while reading "
                                          f"upstream, client: {self.client.remote_addr}")
                    conn.close()
                    self.conn = None
                    self.client.abort()
                    self.finish()
                    return
                self.upstream_failed(conn, "upstream sent invalid header", err)
                return
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Response):
                self.response_head(conn, event)
            elif isinstance(event, h11.Data):
                self.client.send_body(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.response_end(conn, event.headers)
            elif isinstance(event, h11.ConnectionClosed):
                self.upstream_failed(conn, "upstream prematurely closed connection", None)
                return
            elif event is h11.PAUSED:
                break
        self.client.flush()  # one write for everything this read produced
        if conn is self.conn and not self.done:
            if self.client.held_response is not None:
                conn.want(0)  # a response filter waits for a callout: resumed by the client
                conn.deadline = None
                return
            if self.client.out_pending() > HIGH_WATER:
                conn.want(0)  # the client reads slowly: stop reading the peer
                self.client.on_drained = self.resume_upstream
            self.worker.set_deadline(conn, self.settings.proxy_read_timeout)

    def resume_upstream(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.want(selectors.EVENT_READ | (selectors.EVENT_WRITE if self.conn.out else 0))
            self.worker.set_deadline(self.conn, self.settings.proxy_read_timeout)

    def response_head(self, conn: UpstreamConnection, event: h11.Response) -> None:
        status = event.status_code
        if f"http_{status}" in self.settings.proxy_next_upstream and self.retryable(False, status) \
                and self.balancer.has_untried(time.monotonic(), self.tried):
            # nginx's proxy_next_upstream http_XXX: this answer is dropped for the next peer's
            # (and the last peer's answer, whatever it is, goes to the client).
            self.record_attempt(str(status))
            conn.close()
            self.conn = None
            if status not in (403, 404):  # nginx does not count those against the peer
                self.balancer.failed(conn.peer, time.monotonic())
            self.start()
            return
        self.response_started = True
        self.balancer.succeeded(conn.peer)
        self.statuses.append(str(event.status_code))
        headers = end_to_end(header_list(event.headers))
        bodiless = self.request.method == b"HEAD" or event.status_code in (204, 304) or \
            (b"content-length", b"0") in headers
        self.client.send_response_head(event.status_code, headers, proxied=True, end_of_stream=bodiless)

    def response_end(self, conn: UpstreamConnection, trailers=()) -> None:
        self.times.append(f"{self.worker.now - self.attempt_start:.3f}")
        self.conn = None
        self.done = True
        if conn.reusable() and self.pool.size > 0:
            conn.deadline = None
            self.pool.give(conn)
        else:
            conn.close()
        self.publish()
        self.client.end_response(trailers)

    # -- endings --------------------------------------------------------------

    def record_attempt(self, status: str) -> None:
        self.statuses.append(status)
        self.times.append(f"{self.worker.now - self.attempt_start:.3f}")

    def publish(self) -> None:
        r = self.client.state
        if r is not None:
            r.upstream_addr = ", ".join(self.addrs)
            r.upstream_status = ", ".join(self.statuses)
            r.upstream_response_time = ", ".join(self.times)

    def finish_with_error(self, status: int) -> None:
        self.done = True
        self.publish()
        self.client.respond_error(status)

    def finish(self) -> None:
        self.done = True
        self.publish()

    def cancel(self) -> None:
        """The client went away: drop the upstream connection, it is mid-exchange."""
        self.done = True
        if self.conn is not None:
            self.conn.close()
            self.conn = None
