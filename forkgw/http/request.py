"""What one request has said and been told, as the access log, `$variables` and filters read it.

Built per request, so only what differs per request is set on it; the rest
are class-level defaults, and connection facts are read through the
connection when asked.  Nothing here is copied for a reader that never asks.
"""

from __future__ import annotations

import time

import h11

from forkgw.http.messages import header_list


def first_value(headers, name: str) -> str:
    """`$http_NAME` / `$sent_http_NAME`: the first value, the name matched in any case
    (our own response fields are written "Content-Type", h11 hands requests lowered)."""
    key = name.encode("latin-1")
    for n, v in headers:
        if n.lower() == key:
            return v.decode("latin-1")
    return ""


class RequestState:
    end_time = 0.0
    status = 0
    body_bytes_sent = 0
    bytes_sent = 0
    request_length = 0
    _request_id = None
    upstream_addr = ""
    upstream_status = ""
    upstream_response_time = ""
    upstream_tls_version = ""
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
    pid = property(lambda self: self.conn.server.pid)
    tls = property(lambda self: self.conn.tls)  # the TLS transport, or None
    scheme = property(lambda self: "http" if self.conn.tls is None else "https")

    @property
    def request_id(self) -> str:
        if self._request_id is None:
            self._request_id = self.conn.server.next_request_id()
        return self._request_id

    def header(self, name: str) -> str:
        return first_value(self.headers, name)

    def response_header(self, name: str) -> str:
        return first_value(self.response_headers, name)


class RequestInfo:
    """The StreamInfo filters read (source, destination, ids, times), from the request when asked.

    The request id is drawn only if a filter reads it (request.id), as
    `$request_id` draws it only when logged.
    """

    __slots__ = ("conn", "state")
    protocol = "HTTP/1.1"

    def __init__(self, conn, state: RequestState):
        self.conn = conn
        self.state = state

    source = property(lambda self: (self.conn.remote_addr, self.conn.remote_port))
    destination = property(lambda self: (self.conn.server_addr, self.conn.server_port))
    connection_id = property(lambda self: self.conn.id)
    request_id = property(lambda self: self.state.request_id)
    start_time = property(lambda self: self.state.start_time)
    response_code = property(lambda self: self.state.status)
    scheme = property(lambda self: self.state.scheme)
    tls = property(lambda self: self.conn.tls)
    upstream_tls_version = property(lambda self: self.state.upstream_tls_version)
