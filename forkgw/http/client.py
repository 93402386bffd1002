"""One client connection: h11 server state, routing, `return`, proxying, filters, logging.

Theory of operation.  The worker loop calls `on_event` when the socket is
ready; everything else happens here, in the order a request lives:

    bytes -> h11 events -> Request: pick server (Host) and location (path)
          -> request-phase filters (may answer locally)
          -> `return` answer, or a ProxyRequest to a peer
          -> response head through the header filter (add_header, wasm)
          -> body -> EndOfMessage -> done/log/delete, access log line
          -> keep-alive: next request (pipelined ones wait, h11 PAUSED)

A filter that pauses for a callout holds the request (phase "paused": the
client is not read) or the response (`held_response` queues what the peer
sends meanwhile, and the peer is not read); the stream's `on_resume` goes on.

Invariants: at most one request is in flight per connection (h11 pauses the
rest); `out` holds bytes h11 produced that the kernel has not taken yet, and
while it is above the high-water mark the source feeding it stops reading; a
connection always has one deadline that matches what it waits for.
"""

from __future__ import annotations

import re
import selectors
import socket
import time

import h11

from forkgw.http.messages import (
    ADD_HEADER_STATUSES,
    REDIRECTS,
    error_page,
    reason,
    end_of_message,
    header_list,
    server_header,
    split_pseudo,
)
from forkgw.http.upstream import HIGH_WATER, READ_SIZE, ProxyRequest
from forkgw.routing import normalize_path, proxy_uri
from forkgw.wasm.filter import PAUSED, LocalReply

LINGER_TIME = 2.0
MAX_DISCARD = 1024 * 1024  # body bytes read and dropped after answering, before giving up

# Response headers an upstream sends that nginx replaces with its own by default.
REPLACED_BY_GATEWAY = frozenset({b"server", b"date"})
NO_BODY_STATUSES = frozenset({204, 304})


_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-](?:[A-Za-z0-9_.-]*[A-Za-z0-9_-])?\.?)(?::[0-9]{1,5})?")


def valid_host(host: bytes) -> bool:
    """nginx's ngx_http_validate_host in spirit: a name or an address, a port, nothing else."""
    return _HOST.fullmatch(host) is not None and b".." not in host


def headers_too_large(headers, number: int, size: int) -> bool:
    """nginx's large_client_header_buffers: no line over `size`, all of them within number*size."""
    total = 0
    for name, value in headers:
        line = len(name) + len(value) + 4
        if line > size:
            return True
        total += line
    return total > number * size


def first_value(headers, name: str) -> str:
    """`$http_NAME` / `$sent_http_NAME`: the first value, the name matched in any case
    (our own response fields are written "Content-Type", h11 hands requests lowered)."""
    key = name.encode("latin-1")
    for n, v in headers:
        if n.lower() == key:
            return v.decode("latin-1")
    return ""


class RequestState:
    """What one request has said and been told: read by the access log and `$variables`.

    Built per request, so only what differs per request is set here; the rest are
    class-level defaults, and connection facts are read through the connection.
    """

    end_time = 0.0
    status = 0
    body_bytes_sent = 0
    bytes_sent = 0
    request_length = 0
    _request_id = None
    upstream_addr = ""
    upstream_status = ""
    upstream_response_time = ""
    proxy_host = ""
    host = ""
    response_headers: list[tuple[bytes, bytes]] = []

    def __init__(self, conn, request: h11.Request | None):
        self.conn = conn
        if request is None:  # too malformed for h11 to parse: logged as nginx logs a 400
            self.method, self.target, self.http_version, self.headers = "-", "-", "1.1", []
        else:
            self.method = request.method.decode("latin-1")
            self.target = request.target.decode("latin-1")
            self.http_version = request.http_version.decode()
            self.headers = header_list(request.headers)
        self.path, _, self.query = self.target.partition("?")
        self.start_time = time.time()
        self.connection_requests = conn.requests

    remote_addr = property(lambda self: self.conn.remote_addr)
    remote_port = property(lambda self: self.conn.remote_port)
    server_addr = property(lambda self: self.conn.server_addr)
    server_port = property(lambda self: self.conn.server_port)
    connection_id = property(lambda self: self.conn.id)
    pid = property(lambda self: self.conn.worker.pid)

    @property
    def request_id(self) -> str:
        if self._request_id is None:
            self._request_id = self.conn.worker.next_request_id()
        return self._request_id

    def header(self, name: str) -> str:
        return first_value(self.headers, name)

    def response_header(self, name: str) -> str:
        return first_value(self.response_headers, name)


class ClientConnection:
    __slots__ = ("worker", "sock", "id", "remote_addr", "remote_port", "server_addr",
                 "server_port", "listen_key", "h11", "out", "events", "closed", "deadline",
                 "timer_at", "timer_queued", "state", "proxy", "stream", "settings", "requests",
                 "read_paused", "on_drained", "keepalive", "head_sent", "phase", "discarded",
                 "is_head", "response_status", "pipelined", "last_read", "held", "held_body", "body_filter",
                 "processing", "held_response")

    def __init__(self, worker, sock: socket.socket, addr, listen_key, conn_id: int):
        self.worker = worker
        self.sock = sock
        self.id = conn_id
        self.remote_addr, self.remote_port = (addr[0], addr[1]) if isinstance(addr, tuple) else ("unix:", 0)
        local = sock.getsockname()
        self.server_addr, self.server_port = (local[0], local[1]) if isinstance(local, tuple) else ("unix:", 0)
        self.listen_key = listen_key
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=worker.header_limit(listen_key))
        self.out = bytearray()
        self.events = 0
        self.closed = False
        self.deadline = None
        self.timer_at = 0.0
        self.timer_queued = False
        self.state: RequestState | None = None
        self.proxy: ProxyRequest | None = None
        self.stream = None  # the wasm filter chain's per-request state
        self.settings = worker.default_settings(listen_key)
        self.requests = 0
        self.read_paused = False
        self.on_drained = None
        self.keepalive = True
        self.head_sent = False
        self.phase = "head"  # head | body | wait | done | linger
        self.discarded = 0
        self.is_head = False
        self.response_status = 0
        self.pipelined = False
        self.last_read = 0
        self.held = None  # (location, request, headers, host) while filters read the request body
        self.held_body = bytearray()
        self.body_filter = False
        self.processing = False
        self.held_response = None  # what waits while a response filter is paused: body chunks, [trailers]
        self.want(selectors.EVENT_READ)
        worker.set_deadline(self, self.settings.client_header_timeout)

    # -- selector plumbing ------------------------------------------------------

    def want(self, events: int) -> None:
        if self.closed or events == self.events:
            return
        if self.events == 0:
            self.worker.selector.register(self.sock, events, self.on_event)
        elif events == 0:
            self.worker.selector.unregister(self.sock)
        else:
            self.worker.selector.modify(self.sock, events, self.on_event)
        self.events = events

    def update_interest(self) -> None:
        reading = self.phase == "linger" or not (self.read_paused or self.pipelined)
        self.want((selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if self.out else 0))

    def on_event(self, mask: int) -> None:
        if self.closed:
            return  # closed earlier in this loop turn (e.g. by its upstream's failure)
        if mask & selectors.EVENT_WRITE:
            self.flush()
        if mask & selectors.EVENT_READ and not self.closed:
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

    @property
    def answered(self) -> bool:
        """A response is under way: its head is on the wire, or held by a paused filter."""
        return self.head_sent or self.held_response is not None

    # -- reading ------------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.last_read = len(data)
        if self.phase == "linger":
            if not data:
                self.close()
            return
        if not data and self.phase in ("wait", "done") and self.h11.their_state is h11.DONE:
            self.client_gone()
            return
        if self.phase == "head" and self.deadline is not None and self.requests and data:
            self.worker.set_deadline(self, self.settings.client_header_timeout)
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
            while not self.closed and self.phase != "paused":  # paused: the rest waits in h11
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
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE) or self.answered:
            self.close()
            return
        self.worker.log.info(f"client sent invalid request: {err}, client: {self.remote_addr}")
        self.keepalive = False
        self.drop_proxy()  # a body that broke off mid-way: the upstream exchange is void
        if self.state is None:
            self.state = RequestState(self, None)
        self.phase = "done"
        self.is_head = False
        self.respond(status, [(b"Content-Type", b"text/html")], error_page(status, self.settings.server_tokens),
                     filters=False)

    # -- a request arrives ------------------------------------------------------

    def start_request(self, request: h11.Request) -> None:
        worker = self.worker
        self.requests += 1
        self.head_sent = False
        self.discarded = 0
        self.response_status = 0
        self.body_filter = False
        state = self.state = RequestState(self, request)
        self.is_head = request.method == b"HEAD"
        host = b""
        length = None
        chunked = False
        for name, value in state.headers:
            if name == b"host":
                host = value
            elif name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        if chunked and (length is not None or request.http_version == b"1.0") \
                or request.http_version not in (b"1.1", b"1.0") or host and not valid_host(host):
            # Ambiguous framing (a smuggling attempt), an HTTP version we do not speak, or a
            # Host that is not a host name: nginx refuses all three.
            self.keepalive = False
            self.respond_error(505 if request.http_version not in (b"1.1", b"1.0") else 400)
            return
        state.host = host.decode("latin-1").split(":", 1)[0].lower() if host else self.server_addr
        has_body = chunked or bool(length)
        self.phase = "body" if has_body else "wait"
        server = worker.router.server_for(self.listen_key, state.host)
        self.settings = server.settings
        if self.requests >= self.settings.keepalive_requests or worker.draining:
            self.keepalive = False
        number, size = self.settings.large_client_header_buffers
        if len(request.target) > size:
            self.keepalive = False
            self.respond_error(414)
            return
        if self.last_read > size and headers_too_large(state.headers, number, size):
            # h11 bounds only heads that arrive in pieces; one that came whole is checked here.
            self.keepalive = False
            self.respond_error(431)
            return
        normalized = normalize_path(request.target)
        if normalized is None:
            self.respond_error(400)
            return
        state.path, state.query = normalized
        if server.ret is not None:
            self.respond_return(server.ret)
            return
        location = worker.router.location_for(server, state.path)
        if location is None:
            self.respond_error(404)
            return
        settings = self.settings = location.settings
        limit = settings.client_max_body_size
        if limit and length is not None and length > limit:
            self.worker.log.error(f"client intended to send too large body: {length} bytes, "
                                  f"client: {self.remote_addr}, request: \"{state.method} {state.target}\"")
            self.keepalive = False
            self.respond_error(413)
            return
        if not settings.filters:
            self.dispatch(location, request, state.headers, host, has_body)
            return
        pseudo = [(b":method", request.method), (b":path", request.target),
                  (b":authority", host), (b":scheme", b"http")]
        self.stream = worker.wasm_stream(settings.filters, self, state)
        reply = self.stream.on_request_headers(pseudo + state.headers, not has_body)
        if reply is PAUSED:
            self.wait_for_filters(lambda reply: self.request_headers_filtered(reply, location, request, has_body, host),
                                  self.settings.client_header_timeout)
        else:
            self.request_headers_filtered(reply, location, request, has_body, host)

    def request_headers_filtered(self, reply, location, request: h11.Request, has_body: bool, host: bytes) -> None:
        if reply is not None:
            self.send_local_reply(reply)
        else:
            self.request_filtered(location, request, has_body, host)

    def request_filtered(self, location, request: h11.Request, has_body: bool, host: bytes) -> None:
        """The request-phase filters let it through: answer, or first read the body they want."""
        request, headers, host = self.apply_request_changes(request, host)
        if has_body and self.stream.wants_request_body:
            # nginx buffers request bodies before proxying by default; here it lets the
            # filters see (and change) the whole body before anything is answered.
            self.held = (location, request, headers, host)
            self.held_body = bytearray()
            self.worker.set_deadline(self, self.settings.client_body_timeout)
            return
        self.dispatch(location, request, headers, host, has_body)

    def dispatch(self, location, request, headers, host, has_body: bool, body: bytes | None = None,
                 trailers=()) -> None:
        """The content phase: `return`, or `proxy_pass` (with a body held for filters, if any)."""
        if location.ret is not None:
            self.respond_return(location.ret)
        elif location.metrics and self.worker.metrics is not None:
            self.respond(200, [(b"Content-Type", b"text/plain; version=0.0.4")], self.worker.metrics.render())
        elif location.proxy_pass is not None:
            self.start_proxy(location, request, headers, host, has_body)
            if body is not None and self.proxy is not None:
                self.proxy.body_data(body)
                self.proxy.body_end(trailers)
        else:
            self.respond_error(404)

    def wait_for_filters(self, then, timeout: float) -> None:
        """A filter paused the request (for a callout): stop reading, wait at most `timeout`, then `then(result)`."""
        self.phase = "paused"
        self.pause_reading()
        self.worker.set_deadline(self, timeout)

        def resumed(result) -> None:
            if self.closed or self.stream is None or self.phase != "paused":
                return
            self.resume_reading()
            self.phase = "body" if self.h11.their_state is h11.SEND_BODY else "wait"
            self.deadline = None
            then(result)
            if not self.closed:
                self.process()  # body bytes that waited in h11's buffer

        self.stream.on_resume = resumed

    def apply_request_changes(self, request: h11.Request, host: bytes):
        """Rebuild the request from the map the request-phase filters left behind.

        A map the filters left as they got it (pseudo-headers from `request`, :authority
        `host`) gives back `request` itself: nothing to re-validate.
        """
        if not self.stream.wants_request_body and not self.stream.request_changed():
            return request, self.state.headers, host
        method, target, host, headers = split_pseudo(self.stream.request_headers, request.method,
                                                     request.target)
        if target != request.target:
            normalized = normalize_path(target)
            if normalized is not None:
                self.state.path, self.state.query = normalized
        if self.stream.wants_request_body:
            # The body reaches the upstream whole, with its final length (see request_end).
            headers = [h for h in headers if h[0] not in (b"content-length", b"transfer-encoding")]
        rebuilt = h11.Request(method=method, target=target, headers=headers, http_version=request.http_version)
        return rebuilt, headers, host

    def start_proxy(self, location, request, headers, host, has_body: bool) -> None:
        upstream = self.worker.upstreams[location.proxy_pass.upstream]
        state = self.state
        state.proxy_host = location.proxy_pass.upstream
        target = proxy_uri(location, location.proxy_pass, state.path,
                                              request.target.decode("latin-1"))
        outgoing = self.worker.proxy_headers(location.settings, state, headers)
        # proxy_uri keeps the raw target (latin-1 round-trips its bytes) or escapes to ASCII.
        # The client's method and fields (parsed by h11) and proxy_set_header values (escaped
        # when rendered) skip h11's re-validation, unless a filter rewrote the request.
        trusted = self.stream is None or not self.stream.request_changed()
        upstream_request = h11.Request(method=request.method, target=target.encode("latin-1"),
                                       headers=outgoing, _parsed=trusted)
        if has_body and self.h11.they_are_waiting_for_100_continue:
            self.out += self.h11.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
            self.flush()
        self.proxy = ProxyRequest(self, upstream, upstream_request, location.settings, has_body)
        self.proxy.start()
        if self.phase == "body":
            self.worker.set_deadline(self, self.settings.client_body_timeout)
        elif not self.out:
            self.deadline = None

    def request_body(self, data: bytes) -> None:
        state = self.state
        if state is None:  # answered already: the rest of the body is read and dropped
            self.discarded += len(data)
            if self.discarded > MAX_DISCARD:
                self.close()
            return
        state.request_length += len(data)
        limit = self.settings.client_max_body_size
        if limit and state.request_length > limit and not self.answered:
            self.keepalive = False
            self.drop_proxy()
            self.worker.log.error(f"client intended to send too large chunked body: "
                                  f"{state.request_length} bytes, client: {self.remote_addr}")
            self.respond_error(413)
            return
        if self.held is not None:
            self.filter_request_body(data, False)
        elif self.proxy is not None and not self.proxy.done:
            self.proxy.body_data(data)
            self.worker.set_deadline(self, self.settings.client_body_timeout)
        else:
            self.discarded += len(data)
            if self.discarded > MAX_DISCARD and self.phase == "done":
                self.keepalive = False
                self.close()

    def filter_request_body(self, data: bytes, end: bool, trailers=()) -> None:
        out = self.stream.on_request_body(data, end)
        if out is PAUSED:  # the whole body waits for a filter's callout
            self.wait_for_filters(lambda out: self.request_body_filtered(out, end, trailers),
                                  self.settings.client_body_timeout)
            return
        self.request_body_filtered(out, end, trailers)

    def request_body_filtered(self, out, end: bool, trailers) -> None:
        if isinstance(out, LocalReply):
            self.held = None
            self.keepalive = False
            self.send_local_reply(out)
            return
        self.held_body += out
        if not end:
            self.worker.set_deadline(self, self.settings.client_body_timeout)
            return
        if trailers:
            trailers = self.stream.on_request_trailers(trailers)
            if isinstance(trailers, LocalReply):
                self.held = None
                self.send_local_reply(trailers)
                return
        (location, request, headers, host), self.held = self.held, None
        body = bytes(self.held_body)
        self.held_body = bytearray()
        # The body goes on whole with its final length, or chunked if trailers follow it.
        framing = (b"transfer-encoding", b"chunked") if trailers else (b"content-length", str(len(body)).encode())
        self.phase = "wait"
        self.deadline = None
        self.dispatch(location, request, headers + [framing], host, bool(body) or bool(trailers), body, trailers)

    def request_end(self, trailers=()) -> None:
        if self.held is not None:
            self.filter_request_body(b"", True, trailers)
            return
        if trailers and self.stream is not None and self.state is not None:
            trailers = self.stream.on_request_trailers(trailers)
            if isinstance(trailers, LocalReply):
                if not self.answered:
                    self.keepalive = False
                    self.send_local_reply(trailers)
                    return
                trailers = []  # answered already: too late for a local response
        if self.proxy is not None and not self.proxy.done:
            self.proxy.body_end(trailers)
        if self.phase == "body":
            self.phase = "wait"
            if not self.out:
                self.deadline = None
        if self.phase == "done" and self.h11.our_state is h11.DONE:
            self.next_cycle()

    # -- answering ------------------------------------------------------------------

    def respond_return(self, ret) -> None:
        status, text = ret
        if status in REDIRECTS or (text is None and status >= 300 and status != 304):
            headers = [(b"Content-Type", b"text/html")]
            if text is not None:
                headers.append((b"Location", self.worker.absolute_url(text, self.state)))
            self.respond(status, headers, error_page(status, self.settings.server_tokens))
            return
        body = self.worker.render_return(text, self.state) if text else b""
        self.respond(status, [(b"Content-Type", b"text/plain")] if text else [], body)

    def respond_error(self, status: int) -> None:
        if self.answered:
            self.abort()
            return
        if self.proxy is not None:
            self.proxy = None
        self.respond(status, [(b"Content-Type", b"text/html")], error_page(status, self.settings.server_tokens))

    def send_local_reply(self, reply) -> None:
        self.drop_proxy()
        headers = [(n.lower(), v) for n, v in reply.headers
                   if n.lower() not in (b"content-length", b"transfer-encoding")]
        self.respond(reply.status, headers, reply.body, filters=False)

    def respond(self, status: int, headers: list, body: bytes, filters: bool = True) -> None:
        """A whole answer made here (return, error page, local reply): head, body, end."""
        headers.append((b"Content-Length", str(len(body)).encode()))
        if not self.send_response_head(status, headers, proxied=False, filters=filters,
                                       end_of_stream=not body or self.is_head):
            return
        self.send_body(body)
        self.end_response()

    def send_response_head(self, status: int, headers: list, proxied: bool, filters: bool = True,
                           end_of_stream: bool = False) -> bool:
        """The header-filter phase, then the head on the wire. False: answered otherwise.

        Server and Date go in first, so filters see them and may change or remove them;
        an upstream's own Server and Date give way to ours, as in nginx.
        """
        if self.closed or self.answered:
            return False
        settings = self.settings
        head = [(b"Server", server_header(settings.server_tokens)), (b"Date", self.worker.date.now())]
        if proxied:
            head.extend(h for h in headers if h[0] not in REPLACED_BY_GATEWAY)
        else:
            head.extend(headers)
        if settings.add_header:
            for add in settings.add_header:
                if add.always or status in ADD_HEADER_STATUSES:
                    head.append((add.name.encode("latin-1"), add.value.encode("latin-1")))
        if filters and self.stream is not None:
            self.state.status = status
            reply = self.stream.on_response_headers(status, head, end_of_stream)
            if reply is PAUSED:  # the body and the end queue up behind the head
                self.hold_response(self.response_headers_filtered)
                return True
            return self.response_headers_filtered(reply)
        return self.write_head(status, head, filtered=False)

    def response_headers_filtered(self, reply) -> bool:
        if reply is not None:
            self.drop_proxy()
            self.send_local_reply(reply)
            return False
        return self.write_head(self.stream.status, self.stream.response_headers, filtered=True)

    def write_head(self, status: int, head: list, filtered: bool) -> bool:
        settings = self.settings
        self.body_filter = (filtered and self.stream.wants_response_body
                            and not self.is_head and status not in NO_BODY_STATUSES)
        if status in NO_BODY_STATUSES or self.body_filter:
            # A filtered body may change length: it goes out chunked (close-delimited to 1.0).
            head = [h for h in head if h[0].lower() not in (b"content-length", b"transfer-encoding")]
        self.head_sent = True
        self.response_status = status
        self.state.status = status
        self.state.response_headers = head
        if not self.keepalive:
            head.append((b"Connection", b"close"))
        # Our own fields, h11-parsed upstream fields and what filters wrote (the wasm host
        # refuses what HTTP/1.1 would) skip h11's re-validation; add_header's are checked.
        trusted = not settings.add_header
        try:
            data = self.h11.send(h11.Response(status_code=status, headers=head, reason=reason(status),
                                              _parsed=trusted))
        except h11.LocalProtocolError as err:
            self.worker.log.error(f"invalid response head ({err}), client: {self.remote_addr}")
            self.head_sent = False
            self.keepalive = False
            self.drop_proxy()
            self.respond(502, [(b"Content-Type", b"text/html")], error_page(502, settings.server_tokens),
                         filters=False)
            return False
        self.state.bytes_sent += len(data)
        self.out += data
        return True

    def hold_response(self, then) -> None:
        """A response filter paused for a callout: what follows queues up until `then(result)` says go on.

        The peer is not read meanwhile (see ProxyRequest.upstream_readable), so the
        queue holds at most what one read brought; send_timeout bounds the wait.
        """
        self.held_response = []
        self.worker.set_deadline(self, self.settings.send_timeout)

        def released(result) -> None:
            if self.closed or self.held_response is None:
                return
            queued, self.held_response = self.held_response, None
            self.deadline = None
            if not then(result):
                return  # answered otherwise: what queued belongs to a response that is gone
            for n, item in enumerate(queued):
                if self.closed:
                    return
                if self.held_response is not None:  # held again (the end of the body)
                    self.held_response[:0] = queued[n:]
                    return
                if type(item) is list:
                    self.end_response(item)
                else:
                    self.send_body(item)
            if self.closed:
                return
            if self.proxy is not None and not self.proxy.done:
                self.proxy.resume_upstream()
            elif self.phase == "body":
                self.worker.set_deadline(self, self.settings.client_body_timeout)
            self.flush()

        self.stream.on_resume = released

    def send_body(self, data: bytes, end: bool = False) -> None:
        if self.held_response is not None:
            self.held_response.append(data)
            return
        if self.body_filter and self.stream is not None:
            data = self.filter_response_body(data, end)
        self.write_body(data)

    def write_body(self, data: bytes) -> None:
        if self.closed or not data or self.is_head or self.response_status in NO_BODY_STATUSES:
            return
        try:
            out = self.h11.send(h11.Data(data=data))
        except h11.LocalProtocolError:
            self.abort()
            return
        self.state.body_bytes_sent += len(data)
        self.state.bytes_sent += len(out)
        self.out += out  # written by end_response, or by the proxy after each read

    def filter_response_body(self, data: bytes, end: bool) -> bytes:
        return self.response_body_filtered(self.stream.on_response_body(data, end))

    def response_body_filtered(self, out) -> bytes:
        if isinstance(out, LocalReply):
            # The head is on the wire already: nothing to answer with but a cut connection.
            self.worker.log.error(f"a filter answered {out.status} after the response head was sent, "
                                  f"connection closed, client: {self.remote_addr}")
            self.abort()
            return b""
        return out

    def end_response(self, trailers=()) -> None:
        """The response is complete: the body filters' end, the trailers, then the next request."""
        if self.closed:
            return
        if self.held_response is not None:
            self.held_response.append(list(trailers))
            return
        if self.body_filter and self.stream is not None:
            out = self.stream.on_response_body(b"", True)
            if out is PAUSED:  # the end of the body waits for a filter's callout
                self.hold_response(lambda out: self.response_body_ended(out, trailers))
                return
            self.response_body_ended(out, trailers)
        else:
            self.finish_response(trailers)

    def response_body_ended(self, out, trailers) -> bool:
        self.write_body(self.response_body_filtered(out))
        if not self.closed:
            self.finish_response(trailers)
        return not self.closed

    def finish_response(self, trailers) -> None:
        """The end of the message, with trailers where the framing carries them (chunked); then the next request."""
        if trailers and self.stream is not None:
            trailers = self.stream.on_response_trailers(trailers)
            if isinstance(trailers, LocalReply):
                self.response_body_filtered(trailers)  # too late to answer: the connection is cut
                return
        try:
            self.out += self.h11.send(end_of_message(self.h11, trailers))
        except h11.LocalProtocolError:
            self.abort()
            return
        self.proxy = None
        self.phase = "done"
        self.finish_request()
        if self.h11.our_state is h11.MUST_CLOSE or not self.keepalive:
            self.flush()
            if not self.closed and not self.out:
                self.linger()
            return
        if self.h11.their_state is h11.DONE:
            self.next_cycle()
        else:
            # The client is still sending a body we do not need: read and drop it.
            if self.h11.they_are_waiting_for_100_continue:
                self.keepalive = False
                self.flush()
                if not self.out:
                    self.linger()
                return
            self.worker.set_deadline(self, self.settings.client_body_timeout)
            self.flush()

    def next_cycle(self) -> None:
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            self.keepalive = False
            self.linger()
            return
        self.phase = "head"
        self.pipelined = False
        self.flush()
        if self.closed:
            return
        if self.worker.draining:
            if not self.out:
                self.close()
            else:
                self.keepalive = False
            return
        self.worker.set_deadline(self, self.settings.keepalive_timeout)
        self.process()  # a pipelined request may be buffered already

    def finish_request(self) -> None:
        state = self.state
        if state is None:
            return
        state.end_time = time.time()
        if not state.status:
            state.status = self.response_status
        self.stream_done()
        self.worker.access_log(self.settings, state)
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
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.client_gone()
                return
            if sent:
                del self.out[:sent]
                self.worker.set_deadline(self, self.settings.send_timeout) if self.out else None
        if not self.out:
            if self.on_drained is not None:
                callback, self.on_drained = self.on_drained, None
                callback()
            if self.phase == "done" and (self.h11.our_state is h11.MUST_CLOSE or not self.keepalive):
                self.linger()
                return
            if self.phase == "wait" and self.proxy is not None:
                self.deadline = None
        elif len(self.out) > HIGH_WATER and self.deadline is None:
            self.worker.set_deadline(self, self.settings.send_timeout)
        self.update_interest()

    # -- endings ------------------------------------------------------------------------

    def on_timeout(self) -> None:
        if self.phase == "paused" or self.held_response is not None:
            what = "request" if self.phase == "paused" else "response"
            self.worker.log.error(f"filters did not resume the {what} in time, client: {self.remote_addr}")
            self.keepalive = False
            self.phase = "wait"
            self.held_response = None
            if self.head_sent:
                self.abort()
                return
            self.drop_proxy()
            # Not through the response filters: the stream is still paused in one of its phases.
            self.respond(504, [(b"Content-Type", b"text/html")], error_page(504, self.settings.server_tokens),
                         filters=False)
        elif self.out:
            self.worker.log.info(f"client timed out (110: Connection timed out) while sending response "
                                 f"to client, client: {self.remote_addr}")
            self.abort()
        elif self.phase == "body":
            self.worker.log.info(f"client timed out (110: Connection timed out) while reading client "
                                 f"request body, client: {self.remote_addr}")
            self.keepalive = False
            self.drop_proxy()
            self.respond_error(408)
        elif self.phase == "head" and self.requests == 0 or self.h11.their_state is not h11.IDLE:
            if self.h11.trailing_data[0] or self.h11.their_state is not h11.IDLE:
                self.worker.log.info(f"client timed out (110: Connection timed out) while reading "
                                     f"client request headers, client: {self.remote_addr}")
            self.close()
        else:
            self.close()  # idle keep-alive connection, or lingering close

    def client_gone(self) -> None:
        """The client closed or reset: stop the upstream side, finish the filters, log 499."""
        self.drop_proxy()
        if self.state is not None:
            if not self.head_sent:
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
        self.phase = "linger"
        self.read_paused = False
        self.worker.set_deadline(self, LINGER_TIME)
        self.want(selectors.EVENT_READ)

    def drain(self) -> None:
        """Graceful stop: idle keep-alive connections close now, the rest after one answer.

        A connection that has not sent its first request yet is not idle: its request
        may be in the socket buffer already, so it is read and answered (bounded by
        client_header_timeout), as nginx does.
        """
        self.keepalive = False
        if self.phase == "head" and self.requests and not self.h11.trailing_data[0] \
                and self.h11.their_state is h11.IDLE:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.want(0)
        self.closed = True
        self.deadline = None
        self.stream_done()
        try:
            self.sock.close()
        except OSError:
            pass
        self.worker.connection_closed(self)
