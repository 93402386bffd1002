"""proxy_pass: one client request carried to a peer, and its response carried back.

Theory of operation.  A `ProxyRequest` takes an idle connection from its
upstream's pool or connects without blocking, writes the request head and
streams the body as it arrives, and hands the response back to its client
event by event (the client is a connection, or a callout collecting the
answer in memory: see `Downstream`).  A failure before any response byte came
back (connect refused or timed out, a stale keep-alive connection closed
under us) is retried on the next peer when `proxy_next_upstream` allows and
the request body is still held; after that the client gets 502 (or 504 on a
timeout), as nginx answers.  Back-pressure runs both ways: a slow peer pauses
the client's reading, a slow client pauses the peer's.
"""

from __future__ import annotations

import time
from typing import Protocol

import h11

from forkgw.conf.model import Upstream
from forkgw.http.balancer import Peer
from forkgw.http.messages import end_of_message, end_to_end, header_list
from forkgw.http.upstream import UpstreamConnection

NON_IDEMPOTENT = frozenset({b"POST", b"LOCK", b"PATCH"})
HIGH_WATER = 256 * 1024  # bytes queued toward a slow reader before its source pauses
REPLAY_LIMIT = 64 * 1024  # body bytes kept so a failed attempt can be replayed


class ResponseSink(Protocol):
    """Where the peer's response goes: a client's Response writer, or a callout's memory."""

    held: object  # not None while a response filter holds what comes: stop reading the peer

    def send_head(self, status: int, headers, proxied: bool, end_of_stream: bool = False) -> bool: ...
    def send_body(self, data: bytes) -> None: ...
    def end(self, trailers=()) -> None: ...
    def error(self, status: int) -> None: ...  # the exchange failed before a response came


class Downstream(Protocol):
    """What a ProxyRequest asks of the side it answers: a client connection, or a callout."""

    closed: bool
    remote_addr: str
    state: object  # the RequestState its upstream_* variables go to, or None
    on_drained: object  # called once when its out-buffer empties
    response: ResponseSink

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def out_pending(self) -> int: ...
    def flush(self) -> None: ...
    def abort(self) -> None: ...


class ProxyRequest:
    """One client request on its way to a peer and its response on the way back."""

    def __init__(self, client: Downstream, server, upstream: Upstream, request: h11.Request, settings,
                 has_body: bool, tls: tuple | None = None):
        self.client = client
        self.tls = tls  # https: (ssl context, server name to verify and send, or None)
        self.response = client.response
        self.loop = server.loop
        self.log = server.log
        self.metrics = server.metrics
        self.upstream = upstream
        self.balancer, self.pool = server.upstream_state(upstream)
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
        now = self.loop.now
        peer = self.balancer.pick(time.monotonic(), self.tried)
        if peer is None:
            self.finish_with_error(504 if self.timed_out else 502)  # nginx: the last failure decides
            return
        self.tried.add(peer)
        self.attempt_start = now
        self.addrs.append(peer.addr)
        tls = self.tls
        conn = self.pool.take(peer, tls[0] if tls else None)
        reused = conn is not None
        if conn is None:
            session = self.pool.sessions.get((peer, tls[0])) if tls and self.settings.proxy_ssl_session_reuse else None
            conn = UpstreamConnection(self.loop, peer, tls, session)
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
        self.loop.set_deadline(conn, self.settings.proxy_connect_timeout)

    def upstream_connected(self, conn: UpstreamConnection) -> None:
        conn.connected = True
        conn.requests += 1
        self.sent = True
        if self.tls:
            self.tls_established(conn)
        conn.send(self.request)
        for chunk in self.replay if self.replay is not None else self.pending:
            conn.send(h11.Data(data=chunk))
        self.pending = []
        self.client.resume_reading()
        if self.body_ended:
            conn.send(end_of_message(conn.h11, self.trailers))
        conn.flush()
        self.loop.set_deadline(conn, self.settings.proxy_read_timeout if not conn.out
                                 else self.settings.proxy_send_timeout)

    def tls_established(self, conn: UpstreamConnection) -> None:
        if self.client.state is not None:
            self.client.state.upstream_tls_version = conn.sock.version

    def keep_session(self, conn: UpstreamConnection) -> None:
        """The session to resume on the next connection to this peer (after a response: a TLS 1.3
        ticket arrives after the handshake, with the first bytes read)."""
        session = conn.session
        if session is not None:
            self.pool.sessions[(conn.peer, self.tls[0])] = session

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
            if self.metrics is not None:
                self.metrics.upstream_error(self.upstream.name)
        detail = f" ({err.errno}: {err.strerror})" if isinstance(err, OSError) and err.errno else ""
        phase = ("SSL handshaking to" if conn.handshaking else "connecting to" if not conn.connected else
                 "reading" if self.response_started else "reading response header from")
        scheme = "https" if self.tls else "http"
        self.log.error(f"{what}{detail} while {phase} upstream, client: "
                       f"{self.client.remote_addr}, upstream: \"{scheme}://{peer.addr}\"")
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
            self.loop.set_deadline(conn, self.settings.proxy_read_timeout)

    # -- response, from the peer --------------------------------------------

    def upstream_readable(self, conn: UpstreamConnection) -> None:
        data = conn.receive()
        if data is None:
            return
        conn.h11.receive_data(data)
        while not self.done and conn is self.conn:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as err:
                if self.response_started:
                    self.log.error(f"upstream sent invalid response: {err} while reading "
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
                self.response.send_body(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.response_end(conn, event.headers)
            elif isinstance(event, h11.ConnectionClosed):
                self.upstream_failed(conn, "upstream prematurely closed connection", None)
                return
            elif event is h11.PAUSED:
                break
        self.client.flush()  # one write for everything this read produced
        if conn is self.conn and not self.done:
            if self.response.held is not None:
                conn.want(0)  # a response filter waits for a callout: resumed by the client
                conn.deadline = None
                return
            if self.client.out_pending() > HIGH_WATER:
                conn.want(0)  # the client reads slowly: stop reading the peer
                self.client.on_drained = self.resume_upstream
            self.loop.set_deadline(conn, self.settings.proxy_read_timeout)

    def resume_upstream(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.resume()
            self.loop.set_deadline(self.conn, self.settings.proxy_read_timeout)

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
        self.response.send_head(event.status_code, headers, proxied=True, end_of_stream=bodiless)

    def response_end(self, conn: UpstreamConnection, trailers=()) -> None:
        self.times.append(f"{self.loop.now - self.attempt_start:.3f}")
        self.conn = None
        self.done = True
        if self.tls and self.settings.proxy_ssl_session_reuse:
            self.keep_session(conn)
        if conn.reusable() and self.pool.size > 0:
            conn.deadline = None
            self.pool.give(conn)
        else:
            conn.close()
        self.publish()
        self.response.end(trailers)

    # -- endings --------------------------------------------------------------

    def record_attempt(self, status: str) -> None:
        self.statuses.append(status)
        self.times.append(f"{self.loop.now - self.attempt_start:.3f}")

    def publish(self) -> None:
        r = self.client.state
        if r is not None:
            r.upstream_addr = ", ".join(self.addrs)
            r.upstream_status = ", ".join(self.statuses)
            r.upstream_response_time = ", ".join(self.times)

    def finish_with_error(self, status: int) -> None:
        self.done = True
        self.publish()
        self.response.error(status)

    def finish(self) -> None:
        self.done = True
        self.publish()

    def cancel(self) -> None:
        """The client went away: drop the upstream connection, it is mid-exchange."""
        self.done = True
        if self.conn is not None:
            self.conn.close()
            self.conn = None
