"""One client connection: bytes to requests, requests through their phases, keep-alive.

Theory of operation.  The loop calls `on_event` when the socket is ready.
Bytes go into h11; each event it gives back moves the request along its
phases, each in its own module, in the order a request meets them:

    head (admission: framing, limits, smuggling rules; routing: server,
    location) -> request_filters (the filter chain, when the location has one)
    -> content (`return`, `/metrics`, or proxy_pass through proxy.py)
    -> response (header filter, head, body, end) -> the access log line
    -> keep-alive: the next request (pipelined ones wait, h11 PAUSED)

`phase` says what the connection waits for (the `Phase` enum); the deadline
always matches it.  Invariants: at most one request is in flight per
connection (h11 pauses the rest); `out` holds bytes h11 produced that the
kernel has not taken yet, and while it is above the high-water mark the
source feeding it stops reading.
"""

from __future__ import annotations

import enum
import socket
from time import time as time_now

import h11

from forkgw.http import head
from forkgw.http.messages import TEXT_HTML, error_page
from forkgw.http.proxy import HIGH_WATER
from forkgw.http.request import RequestState
from forkgw.http.response import GONE, Response
from forkgw.net.connection import EVENT_READ, EVENT_WRITE, Connection
from forkgw.wasm.filter import LocalReply

LINGER_TIME = 2.0
MAX_DISCARD = 1024 * 1024  # body bytes read and dropped after answering, before giving up


class Phase(enum.Enum):
    HEAD = "head"  # waiting for a request head (the first, or the next on keep-alive)
    BODY = "body"  # reading a request body
    PAUSED = "paused"  # a request filter waits for a callout: the client is not read
    WAIT = "wait"  # the request is in; its answer is being made
    DONE = "done"  # answered; what the client still sends is read and dropped
    LINGER = "linger"  # half-closed: draining the client so our answer is not reset


HEAD, BODY, PAUSED, WAIT, DONE, LINGER = Phase


class ClientConnection(Connection):
    __slots__ = ("server", "id", "remote_addr", "remote_port", "server_addr", "server_port",
                 "listen_key", "h11", "state", "proxy", "stream", "settings", "requests",
                 "read_paused", "on_drained", "keepalive", "phase", "discarded", "pipelined",
                 "last_read", "processing", "response", "body_holder", "tls", "plain_on_tls")

    def __init__(self, server, sock, addr, listen_key, conn_id: int, tls=None, plain_on_tls: bool = False):
        super().__init__(server.loop, sock)
        self.tls = tls  # what the TLS handshake agreed on (the transport), or None
        self.plain_on_tls = plain_on_tls  # plain HTTP on a TLS port: every request gets nginx's 400
        self.server = server
        self.id = conn_id
        self.remote_addr, self.remote_port = (addr[0], addr[1]) if isinstance(addr, tuple) else ("unix:", 0)
        local = sock.getsockname()
        self.server_addr, self.server_port = (local[0], local[1]) if isinstance(local, tuple) else ("unix:", 0)
        self.listen_key = listen_key
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=server.header_limit(listen_key))
        self.state: RequestState | None = None
        self.proxy = None  # the ProxyRequest carrying this request to a peer
        self.stream = None  # the filter chain's per-request state
        self.settings = server.default_settings(listen_key)
        self.requests = 0
        self.read_paused = False
        self.on_drained = None
        self.keepalive = True
        self.phase = HEAD
        self.discarded = 0
        self.pipelined = False
        self.last_read = 0
        self.processing = False
        self.response = Response(self)
        self.body_holder = None  # the RequestFilters reading the whole request body, while they do
        self.want(EVENT_READ)
        self.set_deadline(self.settings.client_header_timeout)

    # -- selector plumbing ------------------------------------------------------

    def update_interest(self) -> None:
        reading = self.phase is LINGER or not (self.read_paused or self.pipelined)
        self.want((EVENT_READ if reading else 0) | (EVENT_WRITE if self.out else 0))

    def on_event(self, mask: int) -> None:
        if self.closed:
            return  # closed earlier in this loop turn (e.g. by its upstream's failure)
        if mask & EVENT_WRITE:
            self.flush()
        if mask & EVENT_READ and not self.closed:
            self.on_readable()

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.update_interest()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.update_interest()

    def out_pending(self) -> int:
        return len(self.out)

    # -- reading ------------------------------------------------------------------

    def on_readable(self) -> None:
        data = self.receive()
        if data is None:
            return
        self.last_read = len(data)
        phase = self.phase
        if phase is LINGER:
            if not data:
                self.close()
            return
        if not data and (phase is WAIT or phase is DONE) and self.h11.their_state is h11.DONE:
            self.client_gone()
            return
        if phase is HEAD and self.deadline is not None and self.requests and data:
            self.set_deadline(self.settings.client_header_timeout)
        try:
            self.h11.receive_data(data)
        except RuntimeError:
            self.close()
            return
        self.process()

    def process(self) -> None:
        if self.processing:
            return  # an answer finished inside the loop below: it goes on with the next request
        self.processing = True
        try:
            while not self.closed and self.phase is not PAUSED:  # paused: the rest waits in h11
                try:
                    event = self.h11.next_event()
                except h11.RemoteProtocolError as err:
                    self.bad_request(err)
                    return
                if event is h11.NEED_DATA:
                    break
                if event is h11.PAUSED:
                    self.pipelined = True  # the next request waits until this one is answered
                    break
                if isinstance(event, h11.Request):
                    self.start_request(event)
                elif isinstance(event, h11.Data):
                    self.request_body(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self.request_end(event.headers)
                elif isinstance(event, h11.ConnectionClosed):
                    self.client_gone()
                    return
        finally:
            self.processing = False
        self.update_interest()

    def bad_request(self, err: h11.RemoteProtocolError) -> None:
        status = err.error_status_hint or 400
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE) or self.response.answered:
            self.close()
            return
        self.server.log.info(f"client sent invalid request: {err}, client: {self.remote_addr}")
        self.keepalive = False
        self.drop_proxy()  # a body that broke off mid-way: the upstream exchange is void
        if self.state is None:
            self.state = RequestState(self, None)
        self.phase = DONE
        self.response.is_head = False
        self.response.respond(status, [TEXT_HTML], error_page(status, self.settings.server_tokens),
                              filters=False)

    # -- a request arrives ------------------------------------------------------

    def start_request(self, request: h11.Request) -> None:
        self.requests += 1
        self.discarded = 0
        self.response.reset(request.method == b"HEAD")
        self.state = RequestState(self, request)
        head.start(self, request)

    def request_has_body(self, has_body: bool) -> None:
        self.phase = BODY if has_body else WAIT

    def refuse(self, status: int) -> None:
        """An error that ends the connection after its answer (the head or body is not to be trusted)."""
        self.keepalive = False
        self.response.error(status)

    def wait_for_filters(self, then, timeout: float) -> None:
        """A filter paused the request (for a callout): stop reading, wait at most `timeout`, then `then(result)`."""
        self.phase = PAUSED
        self.pause_reading()
        self.set_deadline(timeout)

        def resumed(result) -> None:
            if self.closed or self.stream is None or self.phase is not PAUSED:
                return
            self.resume_reading()
            self.phase = BODY if self.h11.their_state is h11.SEND_BODY else WAIT
            self.deadline = None
            then(result)
            if not self.closed:
                self.process()  # body bytes that waited in h11's buffer

        self.stream.on_resume = resumed

    def request_body(self, data: bytes) -> None:
        state = self.state
        if state is None:  # answered already: the rest of the body is read and dropped
            self.discarded += len(data)
            if self.discarded > MAX_DISCARD:
                self.close()
            return
        state.request_length += len(data)
        limit = self.settings.client_max_body_size
        if limit and state.request_length > limit and not self.response.answered:
            self.drop_proxy()
            self.server.log.error(f"client intended to send too large chunked body: "
                                  f"{state.request_length} bytes, client: {self.remote_addr}")
            self.refuse(413)
            return
        if self.body_holder is not None:
            self.body_holder.body_data(data, False)
        elif self.proxy is not None and not self.proxy.done:
            self.proxy.body_data(data)
            self.set_deadline(self.settings.client_body_timeout)
        else:
            self.discarded += len(data)
            if self.discarded > MAX_DISCARD and self.phase is DONE:
                self.keepalive = False
                self.close()

    def request_end(self, trailers=()) -> None:
        if self.body_holder is not None:
            self.body_holder.body_data(b"", True, trailers)
            return
        if trailers and self.stream is not None and self.state is not None:
            trailers = self.stream.on_request_trailers(trailers)
            if isinstance(trailers, LocalReply):
                if not self.response.answered:
                    self.keepalive = False
                    self.response.local_reply(trailers)
                    return
                trailers = []  # answered already: too late for a local response
        if self.proxy is not None and not self.proxy.done:
            self.proxy.body_end(trailers)
        if self.phase is BODY:
            self.body_complete()
        if self.phase is DONE and self.h11.our_state is h11.DONE:
            self.next_cycle()

    def body_complete(self) -> None:
        """The whole request is in: nothing to wait for from the client until the answer is out."""
        self.phase = WAIT
        if not self.out:
            self.deadline = None

    def proxy_started(self) -> None:
        if self.phase is BODY:
            self.set_deadline(self.settings.client_body_timeout)
        elif not self.out:
            self.deadline = None

    # -- answering (the Downstream a ProxyRequest talks to) ------------------------

    def response_released(self) -> None:
        """A held response went on: read its source again, and write what it queued."""
        if self.proxy is not None and not self.proxy.done:
            self.proxy.resume_upstream()
        elif self.phase is BODY:
            self.set_deadline(self.settings.client_body_timeout)
        self.flush()

    # -- after the response -----------------------------------------------------------

    def response_done(self) -> None:
        """The response's end is in `out`: log the request, then close or take the next one."""
        self.proxy = None
        self.phase = DONE
        self.finish_request()
        if self.h11.our_state is h11.MUST_CLOSE or not self.keepalive:
            self.flush()
            if not self.closed and not self.out:
                self.linger()
            return
        if self.h11.their_state is h11.DONE:
            self.next_cycle()
        elif self.h11.they_are_waiting_for_100_continue:
            # The client still holds a body we do not need and never asked for: close after the answer.
            self.keepalive = False
            self.flush()
            if not self.out:
                self.linger()
        else:
            # The client is still sending a body we do not need: read and drop it.
            self.set_deadline(self.settings.client_body_timeout)
            self.flush()

    def next_cycle(self) -> None:
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            self.keepalive = False
            self.linger()
            return
        self.phase = HEAD
        self.pipelined = False
        self.flush()
        if self.closed:
            return
        if self.server.draining:
            if not self.out:
                self.close()
            else:
                self.keepalive = False
            return
        self.set_deadline(self.settings.keepalive_timeout)
        self.process()  # a pipelined request may be buffered already

    def finish_request(self) -> None:
        """The log phase: filters' done/log/delete, then the access log line."""
        state = self.state
        if state is None:
            return
        state.end_time = time_now()
        if not state.status:
            state.status = self.response.status
        self.stream_done()
        self.server.access_log(self.settings, state)
        self.state = None

    def stream_done(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.finish()

    # -- writing ----------------------------------------------------------------------

    def flush(self) -> None:
        if self.closed:
            return
        if self.out:
            try:
                sent = self.send_out()
            except OSError:
                self.client_gone()
                return
            if sent and self.out:
                self.set_deadline(self.settings.send_timeout)
        if not self.out:
            if self.on_drained is not None:
                callback, self.on_drained = self.on_drained, None
                callback()
            if self.phase is DONE and (self.h11.our_state is h11.MUST_CLOSE or not self.keepalive):
                self.linger()
                return
            if self.phase is WAIT and self.proxy is not None:
                self.deadline = None
        elif len(self.out) > HIGH_WATER and self.deadline is None:
            self.set_deadline(self.settings.send_timeout)
        self.update_interest()

    # -- endings ------------------------------------------------------------------------

    def on_timeout(self) -> None:
        if self.phase is PAUSED or self.response.held is not None:
            what = "request" if self.phase is PAUSED else "response"
            self.server.log.error(f"filters did not resume the {what} in time, client: {self.remote_addr}")
            self.keepalive = False
            self.phase = WAIT
            self.response.filters_timed_out()
        elif self.out:
            self.log_timeout("sending response to client")
            self.abort()
        elif self.phase is BODY:
            self.log_timeout("reading client request body")
            self.drop_proxy()
            self.refuse(408)
        elif self.phase is HEAD and self.requests == 0 or self.h11.their_state is not h11.IDLE:
            if self.h11.trailing_data[0] or self.h11.their_state is not h11.IDLE:
                self.log_timeout("reading client request headers")
            self.close()
        else:
            self.close()  # idle keep-alive connection, or lingering close

    def log_timeout(self, doing: str) -> None:
        self.server.log.info(f"client timed out (110: Connection timed out) while {doing}, "
                             f"client: {self.remote_addr}")

    def client_gone(self) -> None:
        """The client closed or reset: stop the upstream side, finish the filters, log 499."""
        self.drop_proxy()
        if self.state is not None:
            if not self.response.head_sent:
                self.state.status = 499
            self.finish_request()
        self.close()

    def drop_proxy(self) -> None:
        """Stop an exchange with an upstream that this client no longer needs."""
        if self.proxy is not None:
            self.proxy.cancel()
            self.proxy = None

    def abort(self) -> None:
        """Cut the connection mid-response, as nginx does when an upstream fails late."""
        self.keepalive = False
        self.drop_proxy()
        self.finish_request()
        self.close()

    fail = abort  # a bug met this connection: cut it, the worker serves on

    def linger(self) -> None:
        """Half-close and drain what the client still sends, so our answer is not reset."""
        if self.closed:
            return
        if self.out:
            self.keepalive = False
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.phase = LINGER
        self.read_paused = False
        self.set_deadline(LINGER_TIME)
        self.want(EVENT_READ)

    def drain(self) -> None:
        """Graceful stop: idle keep-alive connections close now, the rest after one answer.

        A connection that has not sent its first request yet is not idle: its request
        may be in the socket buffer already, so it is read and answered (bounded by
        client_header_timeout), as nginx does.
        """
        self.keepalive = False
        if self.phase is HEAD and self.requests and not self.h11.trailing_data[0] \
                and self.h11.their_state is h11.IDLE:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self.stream_done()
        self.response.conn = GONE
        self.server.connection_closed(self)
