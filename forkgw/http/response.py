"""Writing one response: the header filter, the head, the body (filtered or not), the end.

Theory of operation.  Whatever answers a request (`return`, an error page, a
filter's local reply, an upstream) goes through the same three steps here:

    send_head -> send_body* -> end

`send_head` is nginx's header-filter phase: Server and Date first (filters
see them and may change them; an upstream's own give way to ours), then
`add_header`, then the wasm filters' on_response_headers, then the head into
h11.  A filter may answer instead (a local reply replaces the response) or
pause for a callout: then `held` queues the body chunks and the end that
arrive meanwhile, and the source is not read (the proxy checks `held`), until
the filter resumes.  A filter that reads the response body sees it chunk by
chunk and may hold its end the same way; such a body may change length, so it
goes out chunked.  The bytes go to the connection's out-buffer; the
connection writes them and decides what comes after the end.
"""

from __future__ import annotations

import h11

from forkgw.http.messages import (ADD_HEADER_STATUSES, TEXT_HTML, end_of_message, error_page, reason,
                                  server_header)
from forkgw.wasm.filter import PAUSED, LocalReply

# Response headers an upstream sends that nginx replaces with its own by default.
REPLACED_BY_GATEWAY = frozenset({b"server", b"date"})
NO_BODY_STATUSES = frozenset({204, 304})
FRAMING = (b"content-length", b"transfer-encoding")


class Gone:
    """What a Response's connection becomes once it closed, so the two do not hold each other
    (a cycle only the garbage collector frees, which lets closed connections pile up): a
    Response for a closed connection answers nothing."""

    closed = True
    stream = None
    proxy = None

    def abort(self) -> None:
        pass

    def drop_proxy(self) -> None:
        pass


GONE = Gone()


class Response:
    __slots__ = ("conn", "head_sent", "status", "body_filter", "held", "is_head")

    def __init__(self, conn):
        self.conn = conn
        self.reset(False)

    def reset(self, is_head: bool) -> None:
        self.head_sent = False
        self.status = 0
        self.body_filter = False
        self.held = None  # what waits while a response filter is paused: body chunks, [trailers]
        self.is_head = is_head

    @property
    def answered(self) -> bool:
        """A response is under way: its head is on the wire, or held by a paused filter."""
        return self.head_sent or self.held is not None

    # -- the head ---------------------------------------------------------------------

    def respond(self, status: int, headers: list, body: bytes, filters: bool = True) -> None:
        """A whole answer made here (return, error page, local reply): head, body, end."""
        headers.append((b"Content-Length", str(len(body)).encode()))
        if self.send_head(status, headers, proxied=False, filters=filters,
                          end_of_stream=not body or self.is_head):
            self.send_body(body)
            self.end()

    def error(self, status: int) -> None:
        """nginx's page for `status`; a response under way already can only be cut."""
        conn = self.conn
        if self.answered:
            conn.abort()
            return
        conn.proxy = None
        self.respond(status, [TEXT_HTML], error_page(status, conn.settings.server_tokens))

    def filters_timed_out(self) -> None:
        """A paused filter never resumed: 504 if nothing was sent yet, else a cut connection."""
        conn = self.conn
        self.held = None
        if self.head_sent:
            conn.abort()
            return
        conn.drop_proxy()
        # Not through the response filters: the stream is still paused in one of its phases.
        self.respond(504, [TEXT_HTML], error_page(504, conn.settings.server_tokens), filters=False)

    def local_reply(self, reply) -> None:
        """A filter's proxy_send_local_response: it replaces whatever was on its way."""
        self.conn.drop_proxy()
        headers = [(n.lower(), v) for n, v in reply.headers if n.lower() not in FRAMING]
        self.respond(reply.status, headers, reply.body, filters=False)

    def send_head(self, status: int, headers: list, proxied: bool, filters: bool = True,
                  end_of_stream: bool = False) -> bool:
        """The header-filter phase, then the head on the wire. False: answered otherwise."""
        conn = self.conn
        if conn.closed or self.answered:
            return False
        settings = conn.settings
        head = [(b"Server", server_header(settings.server_tokens)), (b"Date", conn.server.date.now())]
        if proxied:
            head.extend(h for h in headers if h[0] not in REPLACED_BY_GATEWAY)
        else:
            head.extend(headers)
        if settings.add_header:
            for add in settings.add_header:
                if add.always or status in ADD_HEADER_STATUSES:
                    head.append((add.name.encode("latin-1"), add.value.encode("latin-1")))
        stream = conn.stream
        if filters and stream is not None:
            conn.state.status = status
            reply = stream.on_response_headers(status, head, end_of_stream)
            if reply is PAUSED:  # the body and the end queue up behind the head
                self.hold(self._headers_filtered)
                return True
            return self._headers_filtered(reply)
        return self._write_head(status, head, filtered=False)

    def _headers_filtered(self, reply) -> bool:
        conn = self.conn
        if reply is not None:
            conn.drop_proxy()
            self.local_reply(reply)
            return False
        return self._write_head(conn.stream.status, conn.stream.response_headers, filtered=True)

    def _write_head(self, status: int, head: list, filtered: bool) -> bool:
        conn = self.conn
        settings = conn.settings
        self.body_filter = (filtered and conn.stream.wants_response_body
                            and not self.is_head and status not in NO_BODY_STATUSES)
        if status in NO_BODY_STATUSES or self.body_filter:
            # A filtered body may change length: it goes out chunked (close-delimited to 1.0).
            head = [h for h in head if h[0].lower() not in FRAMING]
        self.head_sent = True
        self.status = status
        state = conn.state
        state.status = status
        state.response_headers = head
        if not conn.keepalive:
            head.append((b"Connection", b"close"))
        # Our own fields, h11-parsed upstream fields and what filters wrote (the wasm host
        # refuses what HTTP/1.1 would) skip h11's re-validation; add_header's are checked.
        trusted = not settings.add_header
        try:
            data = conn.h11.send(h11.Response(status_code=status, headers=head, reason=reason(status),
                                              _parsed=trusted))
        except h11.LocalProtocolError as err:
            conn.server.log.error(f"invalid response head ({err}), client: {conn.remote_addr}")
            self.head_sent = False
            conn.keepalive = False
            conn.drop_proxy()
            self.respond(502, [TEXT_HTML], error_page(502, settings.server_tokens),
                         filters=False)
            return False
        state.bytes_sent += len(data)
        conn.out += data
        return True

    def hold(self, then) -> None:
        """A response filter paused for a callout: what follows queues until `then(result)` says go on.

        The peer is not read meanwhile (see ProxyRequest.upstream_readable), so the
        queue holds at most what one read brought; send_timeout bounds the wait.
        """
        conn = self.conn
        self.held = []
        conn.set_deadline(conn.settings.send_timeout)

        def released(result) -> None:
            if conn.closed or self.held is None:
                return
            queued, self.held = self.held, None
            conn.deadline = None
            if then(result):
                self._release(queued)

        conn.stream.on_resume = released

    def _release(self, queued: list) -> None:
        conn = self.conn
        for n, item in enumerate(queued):
            if conn.closed:
                return
            if self.held is not None:  # held again (the end of the body)
                self.held[:0] = queued[n:]
                return
            if type(item) is list:
                self.end(item)
            else:
                self.send_body(item)
        if not conn.closed:
            conn.response_released()

    # -- the body and the end -------------------------------------------------------

    def send_body(self, data: bytes, end: bool = False) -> None:
        if self.held is not None:
            self.held.append(data)
            return
        if self.body_filter and self.conn.stream is not None:
            data = self._body_filtered(self.conn.stream.on_response_body(data, end))
        self._write_body(data)

    def _write_body(self, data: bytes) -> None:
        conn = self.conn
        if conn.closed or not data or self.is_head or self.status in NO_BODY_STATUSES:
            return
        try:
            out = conn.h11.send(h11.Data(data=data))
        except h11.LocalProtocolError:
            conn.abort()
            return
        state = conn.state
        state.body_bytes_sent += len(data)
        state.bytes_sent += len(out)
        conn.out += out  # written by end(), or by the proxy after each read

    def _body_filtered(self, out) -> bytes:
        if isinstance(out, LocalReply):
            conn = self.conn
            # The head is on the wire already: nothing to answer with but a cut connection.
            conn.server.log.error(f"a filter answered {out.status} after the response head was sent, "
                                  f"connection closed, client: {conn.remote_addr}")
            conn.abort()
            return b""
        return out

    def end(self, trailers=()) -> None:
        """The response is complete: the body filters' end, the trailers, then the connection goes on."""
        conn = self.conn
        if conn.closed:
            return
        if self.held is not None:
            self.held.append(list(trailers))
            return
        if self.body_filter and conn.stream is not None:
            out = conn.stream.on_response_body(b"", True)
            if out is PAUSED:  # the end of the body waits for a filter's callout
                self.hold(lambda out: self._body_ended(out, trailers))
                return
            self._body_ended(out, trailers)
        else:
            self._finish(trailers)

    def _body_ended(self, out, trailers) -> bool:
        self._write_body(self._body_filtered(out))
        if not self.conn.closed:
            self._finish(trailers)
        return not self.conn.closed

    def _finish(self, trailers) -> None:
        """The end of the message, with trailers where the framing carries them (chunked)."""
        conn = self.conn
        if trailers and conn.stream is not None:
            trailers = conn.stream.on_response_trailers(trailers)
            if isinstance(trailers, LocalReply):
                self._body_filtered(trailers)  # too late to answer: the connection is cut
                return
        try:
            conn.out += conn.h11.send(end_of_message(conn.h11, trailers))
        except h11.LocalProtocolError:
            conn.abort()
            return
        conn.response_done()
