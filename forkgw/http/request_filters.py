"""The request phases of the filter chain: the head, then (if a filter asks) the whole body.

Theory of operation.  For a location with filters, the connection hands the
request to a `RequestFilters`: on_request_headers runs over the head with its
pseudo-headers; the filters may let it through, answer it (a local reply), or
pause it for a callout (the connection stops reading until they resume).  A
request let through is rebuilt from the map the filters left, unless they
left it as it came.  If a filter wants the request body, the body is held
here whole, through on_request_body and the trailers, before the content
phase sees it with its final length: nginx buffers request bodies before
proxying by default, and this lets filters see and change the whole of it.
The filter chain is reached only through its interface (`Stream`).
"""

from __future__ import annotations

import h11

from forkgw.http import content
from forkgw.http.messages import split_pseudo
from forkgw.routing import normalize_path
from forkgw.wasm.filter import PAUSED, LocalReply


class RequestFilters:
    __slots__ = ("conn", "stream", "location", "request", "host", "has_body", "headers", "body")

    def __init__(self, conn, stream, location, request: h11.Request, host: bytes, has_body: bool):
        self.conn = conn
        self.stream = stream
        self.location = location
        self.request = request
        self.host = host
        self.has_body = has_body
        self.headers = None
        self.body = bytearray()

    def start(self, headers) -> None:
        request = self.request
        pseudo = [(b":method", request.method), (b":path", request.target),
                  (b":authority", self.host), (b":scheme", b"http" if self.conn.tls is None else b"https")]
        reply = self.stream.on_request_headers(pseudo + headers, not self.has_body)
        if reply is PAUSED:
            self.conn.wait_for_filters(self._headers_filtered, self.conn.settings.client_header_timeout)
        else:
            self._headers_filtered(reply)

    def _headers_filtered(self, reply) -> None:
        conn = self.conn
        if reply is not None:
            conn.response.local_reply(reply)
            return
        self._rebuild()
        if self.has_body and self.stream.wants_request_body:
            conn.body_holder = self
            conn.set_deadline(conn.settings.client_body_timeout)
            return
        content.dispatch(conn, self.location, self.request, self.headers, self.host, self.has_body)

    def _rebuild(self) -> None:
        """The request from the map the filters left behind; as it came if they left it so."""
        stream, request = self.stream, self.request
        if not stream.wants_request_body and not stream.request_changed():
            self.headers = self.conn.state.headers
            return
        method, target, self.host, headers = split_pseudo(stream.request_headers, request.method,
                                                          request.target)
        if target != request.target:
            normalized = normalize_path(target)
            if normalized is not None:
                self.conn.state.path, self.conn.state.query = normalized
        if stream.wants_request_body:
            # The body reaches the upstream whole, with its final length (see _body_filtered).
            headers = [h for h in headers if h[0] not in (b"content-length", b"transfer-encoding")]
        self.headers = headers
        self.request = h11.Request(method=method, target=target, headers=headers,
                                   http_version=request.http_version)

    def body_data(self, data: bytes, end: bool, trailers=()) -> None:
        """A piece of the held body (end: the last one, with the trailers)."""
        out = self.stream.on_request_body(data, end)
        if out is PAUSED:  # the whole body waits for a filter's callout
            self.conn.wait_for_filters(lambda out: self._body_filtered(out, end, trailers),
                                       self.conn.settings.client_body_timeout)
            return
        self._body_filtered(out, end, trailers)

    def _body_filtered(self, out, end: bool, trailers) -> None:
        conn = self.conn
        if isinstance(out, LocalReply):
            conn.body_holder = None
            conn.keepalive = False
            conn.response.local_reply(out)
            return
        self.body += out
        if not end:
            conn.set_deadline(conn.settings.client_body_timeout)
            return
        if trailers:
            trailers = self.stream.on_request_trailers(trailers)
            if isinstance(trailers, LocalReply):
                conn.body_holder = None
                conn.response.local_reply(trailers)
                return
        conn.body_holder = None
        body = bytes(self.body)
        # The body goes on whole with its final length, or chunked if trailers follow it.
        framing = (b"transfer-encoding", b"chunked") if trailers else (b"content-length", str(len(body)).encode())
        conn.body_complete()
        content.dispatch(conn, self.location, self.request, self.headers + [framing], self.host,
                         bool(body) or bool(trailers), body, trailers)
