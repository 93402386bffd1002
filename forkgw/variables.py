"""nginx `$variables` in log formats and `proxy_set_header` values.

A template is compiled once, at conf load, into a list of literal strings and
getter functions; rendering a line is then a join over attribute reads of the
request, with no parsing per request.  An unknown variable is an error at load
time in nginx; here it renders as "-" in logs and "" in headers, so that a conf
written for nginx with variables we lack still loads (the error log says which).
"""

from __future__ import annotations

import re
import time
from typing import Callable

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _time_local(r) -> str:
    return time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(r.start_time))


def _time_iso8601(r) -> str:
    local = time.localtime(r.start_time)
    zone = time.strftime("%z", local)
    return time.strftime("%Y-%m-%dT%H:%M:%S", local) + zone[:3] + ":" + zone[3:]


def _request_time(r) -> str:
    return f"{max(0.0, (r.end_time or time.time()) - r.start_time):.3f}"


def _client_verify(tls) -> str:
    """nginx's $ssl_client_verify: a certificate the handshake let through was verified."""
    if tls is None:
        return ""
    return "SUCCESS" if tls.peer_certificate_der() else "NONE"


def _client_subject(tls) -> str:
    return tls.peer_subject if tls is not None else ""


def _client_fingerprint(tls) -> str:
    return tls.peer_digest("sha1") if tls is not None else ""


def _forwarded_for(r) -> str:
    prior = r.header("x-forwarded-for")
    return f"{prior}, {r.remote_addr}" if prior else r.remote_addr


GETTERS: dict[str, Callable] = {
    "remote_addr": lambda r: r.remote_addr,
    "remote_port": lambda r: str(r.remote_port),
    "remote_user": lambda r: "",
    "server_addr": lambda r: r.server_addr,
    "server_port": lambda r: str(r.server_port),
    "time_local": _time_local,
    "time_iso8601": _time_iso8601,
    "msec": lambda r: f"{time.time():.3f}",
    "request": lambda r: f"{r.method} {r.target} HTTP/{r.http_version}",
    "request_method": lambda r: r.method,
    "request_uri": lambda r: r.target,
    "uri": lambda r: r.path,
    "args": lambda r: r.query,
    "query_string": lambda r: r.query,
    "scheme": lambda r: r.scheme,
    "https": lambda r: "on" if r.tls is not None else "",
    "ssl_protocol": lambda r: r.tls.version if r.tls is not None else "",
    "ssl_cipher": lambda r: r.tls.cipher if r.tls is not None else "",
    "ssl_server_name": lambda r: r.tls.server_name if r.tls is not None else "",
    "ssl_session_reused": lambda r: ("r" if r.tls.session_reused else ".") if r.tls is not None else "",
    "ssl_client_verify": lambda r: _client_verify(r.tls),
    "ssl_client_s_dn": lambda r: _client_subject(r.tls),
    "ssl_client_fingerprint": lambda r: _client_fingerprint(r.tls),
    "server_protocol": lambda r: f"HTTP/{r.http_version}",
    "host": lambda r: r.host,
    "status": lambda r: str(r.status),
    "body_bytes_sent": lambda r: str(r.body_bytes_sent),
    "bytes_sent": lambda r: str(r.bytes_sent),
    "request_length": lambda r: str(r.request_length),
    "request_time": _request_time,
    "request_id": lambda r: r.request_id,
    "connection": lambda r: str(r.connection_id),
    "connection_requests": lambda r: str(r.connection_requests),
    "pid": lambda r: str(r.pid),
    "upstream_addr": lambda r: r.upstream_addr,
    "upstream_status": lambda r: r.upstream_status,
    "upstream_response_time": lambda r: r.upstream_response_time,
    "proxy_host": lambda r: r.proxy_host,
    "proxy_add_x_forwarded_for": _forwarded_for,
    "http_referer": lambda r: r.header("referer"),
    "http_user_agent": lambda r: r.header("user-agent"),
}


def _getter(name: str) -> Callable | None:
    if name in GETTERS:
        return GETTERS[name]
    if name.startswith("http_"):
        header = name[5:].replace("_", "-")
        return lambda r: r.header(header)
    if name.startswith("sent_http_"):
        header = name[10:].replace("_", "-")
        return lambda r: r.response_header(header)
    return None


_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_NOT_URL = re.compile(rb"[\x00-\x20\x7f-\xff]")


def to_bytes(text: str) -> bytes:
    """Rendered text back to the client's own bytes (paths that were not UTF-8 included)."""
    return text.encode("utf-8", "surrogateescape")


def header_bytes(text: str) -> bytes:
    """A rendered header value: control characters escaped, so it cannot break the head."""
    return _CONTROL.sub(lambda m: b"%%%02X" % m.group()[0], to_bytes(text))


def url_bytes(text: str) -> bytes:
    """A rendered URL for a Location header: spaces, controls and non-ASCII escaped."""
    return _NOT_URL.sub(lambda m: b"%%%02X" % m.group()[0], to_bytes(text))


class Template:
    """A compiled `$var` string; `render(request, empty="-")` fills it in."""

    __slots__ = ("parts", "unknown", "text", "constant")

    def __init__(self, text: str):
        self.text = text
        self.parts: list[str | Callable] = []
        self.unknown: list[str] = []
        pos = 0
        for m in _VAR.finditer(text):
            if m.start() > pos:
                self.parts.append(text[pos:m.start()])
            name = m.group(1) or m.group(2)
            getter = _getter(name)
            if getter is None:
                self.unknown.append(name)
                getter = lambda r: ""  # noqa: E731 - an unknown variable renders empty
            self.parts.append(getter)
            pos = m.end()
        if pos < len(text):
            self.parts.append(text[pos:])
        self.constant = all(isinstance(p, str) for p in self.parts)

    def render(self, request, empty: str = "-") -> str:
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                out.append(part(request) or empty)
        return "".join(out)

