"""The first phase of a request: is its head one we answer at all?

nginx refuses, before routing, what would let a request mean two things to
two servers (both Content-Length and Transfer-Encoding, chunked HTTP/1.0), an
HTTP version it does not speak, and a Host that is not a host; after picking
the server block it bounds the head by that server's
`large_client_header_buffers`.  Each check answers a status (0: go on), so
the connection only has to act on it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import h11

_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-](?:[A-Za-z0-9_.-]*[A-Za-z0-9_-])?\.?)(?::[0-9]{1,5})?")
VERSIONS = (b"1.1", b"1.0")


class Framing(NamedTuple):
    """What the head says of the host and of the body that follows."""

    host: bytes
    length: int | None
    chunked: bool

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)


def framing(headers) -> Framing:
    host, length, chunked = b"", None, False
    for name, value in headers:
        if name == b"host":
            host = value
        elif name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    return Framing(host, length, chunked)


def valid_host(host: bytes) -> bool:
    """nginx's ngx_http_validate_host in spirit: a name or an address, a port, nothing else."""
    return _HOST.fullmatch(host) is not None and b".." not in host


def refuse_framing(request: h11.Request, f: Framing) -> int:
    """505 for a version we do not speak, 400 for ambiguous framing or a bad Host."""
    if request.http_version not in VERSIONS:
        return 505
    if f.chunked and (f.length is not None or request.http_version == b"1.0"):
        return 400  # a smuggling attempt
    if f.host and not valid_host(f.host):
        return 400
    return 0


def headers_too_large(headers, number: int, size: int) -> bool:
    """nginx's large_client_header_buffers: no line over `size`, all of them within number*size."""
    total = 0
    for name, value in headers:
        line = len(name) + len(value) + 4
        if line > size:
            return True
        total += line
    return total > number * size


def refuse_size(request: h11.Request, headers, settings, last_read: int) -> int:
    """414 for a request line, 431 for fields, over the server's large_client_header_buffers."""
    number, size = settings.large_client_header_buffers
    if len(request.target) > size:
        return 414
    if last_read > size and headers_too_large(headers, number, size):
        # h11 bounds only heads that arrive in pieces; one that came whole is checked here.
        return 431
    return 0
