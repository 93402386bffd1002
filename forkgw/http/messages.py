"""What every response carries, built once: status lines, error pages, hop-by-hop rules.

Kept apart from the connection code so the bytes a client sees for a 404 or a
502 are decided in one place, the way nginx's `ngx_http_special_response.c`
decides them.
"""

from __future__ import annotations

import time
from http import HTTPStatus

import h11
from h11._writers import ChunkedWriter

from forkgw import __version__

REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}

# Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus the
# framing headers the other side's h11 connection sets for itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Statuses nginx's add_header applies to without `always`.
ADD_HEADER_STATUSES = frozenset({200, 201, 204, 206, 301, 302, 303, 304, 307, 308})

REDIRECTS = frozenset({301, 302, 303, 307, 308})

TEXT_HTML = (b"Content-Type", b"text/html")  # of every page made here


def reason(status: int) -> bytes:
    return REASONS.get(status, b"")


SERVER_WITH_VERSION = f"forkgw/{__version__}".encode()


def server_header(tokens: bool) -> bytes:
    return SERVER_WITH_VERSION if tokens else b"forkgw"


def error_page(status: int, tokens: bool, detail: str = "") -> bytes:
    """nginx's built-in page for 3xx/4xx/5xx answers that carry no text of their own.

    A `detail` is nginx's for its TLS-specific 400s ("The plain HTTP request was sent to
    HTTPS port"): it titles the page and stands under the status line.
    """
    heading = f"{status} {reason(status).decode()}".strip()
    title = f"{status} {detail}" if detail else heading
    server = server_header(tokens).decode()
    extra = f"<center>{detail}</center>\r\n" if detail else ""
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{heading}</h1></center>\r\n{extra}<hr><center>{server}</center>\r\n"
        f"</body>\r\n</html>\r\n"
    ).encode()


class HttpDate:
    """The Date header value, formatted at most once a second."""

    __slots__ = ("second", "value")

    def __init__(self):
        self.second = -1
        self.value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second)).encode()
        return self.value


def connection_tokens(headers) -> set[bytes]:
    """Header names listed in `Connection:`, which are hop-by-hop too."""
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            names.update(token.strip().lower() for token in value.split(b","))
    return names


def header_list(headers: h11._headers.Headers) -> list[tuple[bytes, bytes]]:
    """h11's parsed fields as a plain list, in one pass: h11 hands each (name, value) out
    through a Python-level __getitem__, which every later pass over them would pay again."""
    return [(name, value) for _, name, value in headers._full_items]


def end_to_end(headers) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers (those named by Connection included)."""
    listed = connection_tokens(headers)
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in listed]


def split_pseudo(headers, method: bytes, path: bytes):
    """A filter's header map back to HTTP/1.1: (method, path, authority, other headers)."""
    authority, rest = b"", []
    for name, value in headers:
        if name == b":method":
            method = value
        elif name == b":path":
            path = value
        elif name == b":authority":
            authority = value
        elif not name.startswith(b":"):
            rest.append((name, value))
    return method, path, authority, rest


def sends_chunked(conn: h11.Connection) -> bool:
    """Whether `conn` frames the body it sends chunked: only then can trailers follow it."""
    return type(conn._writer) is ChunkedWriter  # h11 keeps its framing decision private


def end_of_message(conn: h11.Connection, trailers) -> h11.EndOfMessage:
    """The end of a body sent on `conn`, with `trailers` where the framing can carry them."""
    return h11.EndOfMessage(headers=trailers) if trailers and sends_chunked(conn) else h11.EndOfMessage()
