"""The HTTP side of a worker: what every connection is given, and nothing it must reach past.

Theory of operation.  The worker loop hands each accepted socket to
`HttpServer.accept`; from then on a connection asks this object, and only
this object, for policy: which server and location (the Router), what a
block of settings compiled to (its LocationPlan), the upstreams' balancers
and pools, a request id, the Date, the filter chain for a request, and
whether the worker is draining.  It also keeps the set of open client
connections (TLS handshakes in progress included), so the loop can count
them, drain them and close them without knowing what they speak.

On a TLS listener an accepted socket first goes through a TlsHandshake
(net.tls); its transport then serves HTTP like a plain socket, and plain
HTTP sent to it is answered with nginx's 400.
"""

from __future__ import annotations

import itertools
import os
import socket

from forkgw import tls
from forkgw.conf.model import Config, Settings
from forkgw.errors import ConfError
from forkgw.http import callout_transport
from forkgw.http.balancer import Balancer
from forkgw.http.client import ClientConnection
from forkgw.http.messages import HttpDate
from forkgw.http.plan import AccessLog, LocationPlan
from forkgw.http.request import RequestInfo
from forkgw.http.upstream import Pool
from forkgw.log import ErrorLog
from forkgw.net.connection import EVENT_READ
from forkgw.net.loop import Loop
from forkgw.net.tls import TlsHandshake
from forkgw.routing import Router
from forkgw.variables import Template, to_bytes, url_bytes


class HttpServer:
    def __init__(self, config: Config, loop: Loop, log: ErrorLog, metrics=None):
        self.config = config
        self.http = config.http
        self.loop = loop
        self.log = log
        self.metrics = metrics
        self.runtime = None  # the wasm filters, once started (set_runtime)
        self.pid = os.getpid()
        self.date = HttpDate()
        self.router = Router(self.http)
        self.upstreams = self.http.upstreams if self.http else {}
        self.callout_upstreams: dict = {}  # implicit upstreams for literal host:port callouts
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self._conn_ids = itertools.count(1)
        # $request_id: 32 hex digits like nginx's, a random half per worker and a counter,
        # unique without a system call per request.
        self._request_id_prefix = os.urandom(8).hex()
        self._request_counter = itertools.count(1)
        self._upstream_state: dict[str, tuple[Balancer, Pool]] = {}
        self._plans: dict[int, LocationPlan] = {}
        self._templates: dict[str, Template] = {}
        self._constant_bodies: dict[str, bytes] = {}
        self._access_logs: dict[str, AccessLog] = {}
        self._defaults: dict = {}
        self._callout_tls = None  # see callout_context
        # A TLS listener's handshake starts with its default server's context (SNI may switch it).
        self._tls_contexts = {listen.key: self.router.server_for(listen.key, None).ssl_context
                              for listen in config.listens() if listen.ssl}

    # -- the worker's side -------------------------------------------------------

    def prepare(self, all_settings) -> None:
        """Compile every block's plan now: the access logs open while we may still be root."""
        for settings in all_settings:
            self.plan(settings)

    def set_runtime(self, runtime) -> None:
        self.runtime = runtime

    def callout_context(self):
        """The TLS context of filters' callouts to https targets (the http level's proxy_ssl_*),
        made on first use; None (logged) when it cannot be."""
        if self._callout_tls is None:
            try:
                self._callout_tls = tls.client_context(self.http.settings, {}, "")
            except ConfError as err:
                self.log.error(f"no TLS for callouts: {err}")
                self._callout_tls = False
        return self._callout_tls or None

    def call_out(self, target: str, headers, body: bytes, timeout: float, on_done) -> bool:
        """proxy_http_call on this loop: False when the target names no upstream."""
        return callout_transport.dispatch(self, target, headers, body, timeout, on_done)

    def accept(self, sock: socket.socket, addr, listen_key) -> None:
        if self.metrics is not None:
            self.metrics.accepted.add(1)
            self.metrics.connections.add(1)
        context = self._tls_contexts.get(listen_key)
        if context is None:
            self._serve(sock, addr, listen_key, None, False)
        else:
            self._handshake(sock, addr, listen_key, context)

    def _handshake(self, sock: socket.socket, addr, listen_key, context) -> None:
        """A TLS listener's connection: the handshake first (SNI picks the server's context),
        then HTTP over its transport; plain HTTP sent to it gets nginx's 400."""

        def choose(name: str | None):
            return self.router.server_for(listen_key, name.lower() if name else None).ssl_context

        def failed(reason: str) -> None:
            self.connection_closed(handshake)
            self.log.info(f"{reason}, client: {addr[0] if isinstance(addr, tuple) else addr}")

        def done(transport) -> None:
            self.connections.discard(handshake)
            self._serve(transport, addr, listen_key, transport, False)

        def plain(raw) -> None:
            self.connections.discard(handshake)
            self._serve(raw, addr, listen_key, None, True)

        timeout = self.default_settings(listen_key).client_header_timeout
        handshake = TlsHandshake(self.loop, sock, context, timeout, choose, done, plain, failed)
        self.connections.add(handshake)
        handshake.on_event(EVENT_READ)  # the ClientHello usually came with the connection

    def _serve(self, transport, addr, listen_key, tls, plain_on_tls: bool) -> None:
        conn = ClientConnection(self, transport, addr, listen_key, next(self._conn_ids), tls, plain_on_tls)
        self.connections.add(conn)
        conn.on_readable()  # data usually came with the connection: skip a loop turn

    def connection_closed(self, conn) -> None:
        self.connections.discard(conn)
        if self.metrics is not None:
            self.metrics.connections.add(-1)

    def drain(self) -> None:
        """Graceful stop: idle keep-alive connections close, the rest after their answer."""
        self.draining = True
        for _, pool in self._upstream_state.values():
            pool.close_all()
        for conn in list(self.connections):
            if isinstance(conn, ClientConnection):
                conn.drain()  # a TLS handshake finishes, and its connection answers once

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close()

    def flush_logs(self) -> None:
        for log in self._access_logs.values():
            log.flush()

    def reopen_logs(self) -> None:
        for log in self._access_logs.values():
            log.reopen()

    # -- what connections ask -----------------------------------------------------

    def default_settings(self, listen_key) -> Settings:
        server = self._defaults.get(listen_key)
        if server is None:
            server = self._defaults[listen_key] = self.router.server_for(listen_key, None)
        return server.settings

    def header_limit(self, listen_key) -> int:
        number, size = self.default_settings(listen_key).large_client_header_buffers
        return number * size

    def next_request_id(self) -> str:
        return f"{self._request_id_prefix}{next(self._request_counter):016x}"

    def plan(self, settings: Settings) -> LocationPlan:
        plan = self._plans.get(id(settings))
        if plan is None:
            plan = self._plans[id(settings)] = LocationPlan(settings, self.http.log_formats,
                                                            self.template, self._open_access_log)
        return plan

    def template(self, text: str) -> Template:
        template = self._templates.get(text)
        if template is None:
            template = self._templates[text] = Template(text)
            for name in template.unknown:
                self.log.warn(f'unknown variable "${name}" renders empty')
        return template

    def _open_access_log(self, path: str) -> AccessLog:
        log = self._access_logs.get(path)
        if log is None:
            log = self._access_logs[path] = AccessLog(path)
        return log

    def access_log(self, settings: Settings, state) -> None:
        if self.metrics is not None:
            self.metrics.request(state.status, state.end_time - state.start_time)
        self.plan(settings).log(state)

    def render_return(self, text: str, state) -> bytes:
        template = self.template(text)
        if template.constant:
            body = self._constant_bodies.get(text)
            if body is None:
                body = self._constant_bodies[text] = text.encode("utf-8")
            return body
        return to_bytes(template.render(state, empty=""))

    def absolute_url(self, text: str, state) -> bytes:
        url = self.template(text).render(state, empty="")
        if url.startswith("/"):
            scheme = state.scheme
            port = "" if state.server_port == (443 if scheme == "https" else 80) else f":{state.server_port}"
            url = f"{scheme}://{state.host}{port}{url}"
        return url_bytes(url)

    def upstream_state(self, upstream):
        state = self._upstream_state.get(upstream.name)
        if state is None:
            state = self._upstream_state[upstream.name] = (Balancer(upstream), Pool(self.loop, upstream.keepalive))
        return state

    def stream(self, filters, conn: ClientConnection, state):
        """The filter chain's per-request state, seeing the request through a StreamInfo."""
        return self.runtime.stream(filters, RequestInfo(conn, state))
