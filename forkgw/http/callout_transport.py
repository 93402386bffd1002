"""The transport of HTTP callouts: the requests a filter makes (proxy_http_call), on the loop.

The ABI side (tokens, proxy_on_http_call_response) is the wasm host's; this
is the network side.  A callout is a ProxyRequest whose downstream is a
`Callout` collecting the response in memory instead of a socket writing it out, so callouts share the
proxy's balancing, keep-alive pools, passive health and timeouts.  The target
names an `upstream` block (Envoy's cluster model) or is a literal
`host:port`; the whole exchange is bounded by the filter's timeout, and the
filter hears back exactly once: a CalloutResult, or None on any failure.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, replace
from typing import Callable

import h11

from forkgw.conf.model import Settings, Upstream, UpstreamServer
from forkgw.conf.values import split_host_port
from forkgw.http.messages import split_pseudo
from forkgw.http.proxy import ProxyRequest

MAX_CALLOUT_BODY = 16 * 1024 * 1024


@dataclass
class CalloutResult:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)


class Callout:
    """Stands where a client connection stands for a ProxyRequest (a Downstream), and is its
    own ResponseSink: the answer is kept in memory."""

    closed = False
    remote_addr = "callout"
    state = None
    on_drained = None
    held = None  # nothing holds a callout's response

    def __init__(self, log, on_done: Callable[[CalloutResult | None], None]):
        self.log = log
        self.on_done = on_done
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.proxy: ProxyRequest | None = None
        self.deadline = None
        self.timer_at = 0.0
        self.timer_queued = False
        self.response = self

    def finish(self, result: CalloutResult | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadline = None
        self.proxy = self.response = None  # break the cycles: no garbage-collector pauses
        callback, self.on_done = self.on_done, None
        callback(result)

    # what a ProxyRequest asks of its client
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def out_pending(self) -> int:
        return 0

    def flush(self) -> None:
        pass

    def send_head(self, status: int, headers, proxied: bool, end_of_stream: bool = False) -> bool:
        self.status, self.headers = status, headers
        return True

    def send_body(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > MAX_CALLOUT_BODY:
            self.abort()

    def end(self, trailers=()) -> None:
        self.finish(CalloutResult(self.status, self.headers, bytes(self.body), list(trailers)))

    def error(self, status: int) -> None:
        self.finish(None)

    def abort(self) -> None:
        if self.proxy is not None:
            self.proxy.cancel()
        self.finish(None)

    def on_timeout(self) -> None:
        self.log.warn("http callout timed out")
        self.abort()

    fail = abort  # a bug met the exchange: the filter hears of a failure


def callout_upstream(server, target: str) -> Upstream | None:
    """An upstream block by name, or an implicit one for a literal host:port."""
    upstreams = server.upstreams
    if target in upstreams:
        return upstreams[target]
    cached = server.callout_upstreams.get(target)
    if cached is not None:
        return cached
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None  # names would need a blocking lookup on the loop: upstream blocks only
    upstream = Upstream(name=target, servers=[UpstreamServer(host, int(port))], keepalive=8)
    server.callout_upstreams[target] = upstream
    return upstream


def dispatch(server, target: str, headers: list[tuple[bytes, bytes]], body: bytes,
             timeout: float, on_done: Callable[[CalloutResult | None], None]) -> bool:
    """Start a callout; False when the target is unknown (the filter gets BadArgument).

    A target written `https://NAME` speaks TLS, verified with the http level's proxy_ssl_*
    settings (HttpServer.callout_context), the name being NAME's host.
    """
    tls = None
    if target.startswith("https://"):
        target = target[len("https://"):]
        split = split_host_port(target)
        tls = (server.callout_context(), split[0] if split and split[0] else target)
    upstream = callout_upstream(server, target)
    if upstream is None or tls is not None and tls[0] is None:
        return False
    method, path, authority, rest = split_pseudo(headers, b"GET", b"/")
    rest = [h for h in rest if h[0] not in (b"content-length", b"transfer-encoding")]
    rest.insert(0, (b"host", authority or target.encode()))
    if body or method in (b"POST", b"PUT", b"PATCH"):
        rest.append((b"content-length", str(len(body)).encode()))
    request = h11.Request(method=method, target=path, headers=rest)
    settings = replace(Settings(), proxy_connect_timeout=timeout, proxy_read_timeout=timeout,
                       proxy_send_timeout=timeout)
    callout = Callout(server.log, on_done)
    proxy = callout.proxy = ProxyRequest(callout, server, upstream, request, settings, has_body=bool(body),
                                         tls=tls)
    server.loop.set_deadline(callout, timeout)
    proxy.start()
    if body and not callout.closed:
        proxy.body_data(body)
        proxy.body_end()
    return True
