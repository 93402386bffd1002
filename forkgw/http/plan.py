"""Work done once per block of settings, not per request: compiled templates, opened logs.

A `LocationPlan` is built for each server's and location's Settings when the
worker starts (while it may still be root, so access logs open), and then
only read: the proxied request's headers are its templates rendered, and the
access log line is its log templates rendered.
"""

from __future__ import annotations

import os

from forkgw.conf.model import Settings
from forkgw.http.messages import end_to_end
from forkgw.variables import header_bytes


class AccessLog:
    """A buffered append-only file; flushed by the loop every second and at exit."""

    def __init__(self, path: str):
        self.path = path
        self.fd = self._open()
        self.buffer: list[str] = []

    def _open(self) -> int:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def flush(self) -> None:
        if self.buffer:
            data = "".join(self.buffer).encode("utf-8", "replace")
            self.buffer.clear()
            try:
                os.write(self.fd, data)
            except OSError:
                pass  # a full disk loses log lines, never requests

    def reopen(self) -> None:
        self.flush()
        try:
            fd = self._open()
        except OSError:
            return
        os.dup2(fd, self.fd)
        os.close(fd)


class LocationPlan:
    __slots__ = ("logs", "proxy_headers", "proxy_header_names")

    def __init__(self, settings: Settings, formats: dict[str, str], template, open_log):
        self.logs = [(open_log(path), template(formats[fmt])) for path, fmt in settings.access_log]
        # nginx's defaults: Host is the proxied host, and Connection is ours to manage.
        headers = {"host": "$proxy_host"}
        for name, value in settings.proxy_set_header:
            headers[name.lower()] = value
        headers.pop("connection", None)
        headers.setdefault("expect", "")  # we answered 100-continue ourselves
        self.proxy_headers = [(name.encode("latin-1"), template(value)) for name, value in headers.items()]
        self.proxy_header_names = frozenset(name for name, _ in self.proxy_headers)

    def upstream_headers(self, state, headers) -> list[tuple[bytes, bytes]]:
        """nginx's rule: proxy_set_header lines first, then the client's end-to-end headers."""
        out = []
        for name, template in self.proxy_headers:
            value = template.render(state, empty="")
            if value:
                out.append((name, header_bytes(value)))
        skip = self.proxy_header_names
        for name, value in end_to_end(headers):
            if name not in skip:
                out.append((name, value))
        for name, value in headers:
            if name == b"transfer-encoding":
                out.append((b"transfer-encoding", b"chunked"))
                break
        return out

    def log(self, state) -> None:
        for log, template in self.logs:
            log.buffer.append(template.render(state) + "\n")
