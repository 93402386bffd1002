"""One request through a chain of wasm filters: phases, local replies, the end.

Theory of operation:
- `Runtime.stream()` hands out a `Stream` per request.  Each filter of the
  chain gets its HTTP context lazily, right before its first callback
  (proxy_on_context_create(C, R)), in the VM its module has *now*.
- Phases run the filters in conf order, for the request headers *and* for
  the response headers.  Envoy runs response filters in reverse; nginx and
  Kong's ngx_wasm_module run the chain in order for every phase, and forkgw
  is nginx-shaped, so we follow Kong.
- Header maps are lists of (name, value) bytes pairs, names lower-case,
  pseudo-headers first.  Names are lowered on the way in: the worker's own
  heads (`return`, error pages) say "Content-Type", and a filter asking for
  "content-type" must find it.  The request map carries :method, :path,
  :authority, :scheme; the response map carries :status, which the worker
  gets back as `stream.status` (stream.response_headers never contains
  pseudo-headers).
- A filter that calls proxy_send_local_response ends the phase: the reply is
  returned whatever the callback returned, later filters are not called.
  One local reply per stream: a second one is ignored (answered OK, logged).
- A callback returning Pause (non-zero) cannot be resumed yet (no callouts,
  no body buffering): it is logged once per filter and phase and treated as
  Continue.
- A filter whose VM traps (or is down, waiting for its rebuild): for
  on_error "fail" the phase returns LocalReply(500); for "continue" the
  filter is skipped for the rest of the stream.  A local reply recorded by
  the call that trapped is discarded.
- `finish()` runs proxy_on_done, then proxy_on_log, then proxy_on_delete for
  every context created (each step over all contexts, in chain order), once;
  contexts whose VM died are skipped (never call a failed instance).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .vm import HttpContext, Plugin, VMFailed


@dataclass
class StreamInfo:
    source: tuple[str, int]
    destination: tuple[str, int]
    connection_id: int
    request_id: str
    start_time: float  # time.time() when the request started
    protocol: str = "HTTP/1.1"
    scheme: str = "http"
    response_code: int = 0  # the worker updates it once the status is known


@dataclass
class LocalReply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


_DEAD = object()  # this filter is out of the stream (VM failed or unavailable)

# on_request_headers' answer when a filter paused the request (e.g. for a callout):
# the worker waits, and the stream calls `on_resume(LocalReply | None)` from the loop.
PAUSED = object()

ON_REQUEST_HEADERS = "proxy_on_request_headers"
ON_RESPONSE_HEADERS = "proxy_on_response_headers"


def _pseudo_first(pairs: list[tuple[bytes, bytes]]) -> None:
    """Move pseudo-headers to the front, keeping the order within each group."""
    for i, (name, _) in enumerate(pairs):
        if not name.startswith(b":"):
            rest = pairs[i:]
            if any(n.startswith(b":") for n, _ in rest):
                pairs[i:] = [p for p in rest if p[0].startswith(b":")] + [p for p in rest if not p[0].startswith(b":")]
            return


class Stream:
    """The filters' view of one request; the worker reads the maps back after each phase."""

    def __init__(self, chain: list[tuple[Plugin, bool]], info: StreamInfo, log):
        self.info = info
        self.log = log
        self.chain = chain  # (plugin, fail_closed)
        self.contexts: list = [None] * len(chain)
        self.request_headers: list[tuple[bytes, bytes]] = []
        self.request_seen = False
        self.request_trailers: list[tuple[bytes, bytes]] = []  # kept for the ABI; not forwarded yet
        self.response_map: list[tuple[bytes, bytes]] | None = None  # with :status, once known
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.response_trailers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.properties: dict = {}  # proxy_set_property scratch, shared by the chain
        self.replied = False
        self.pending: LocalReply | None = None
        self.finished = False
        # Body phases: set when a filter of the chain exports the callback (the worker then
        # buffers the request body, and sends the response chunked); on_resume: see PAUSED.
        self.wants_request_body = False
        self.wants_response_body = False
        self.on_resume = None

    # -- phases ---------------------------------------------------------------

    def on_request_headers(self, headers: list[tuple[bytes, bytes]], end_of_stream: bool) -> LocalReply | None:
        self.request_headers = [(name.lower(), value) for name, value in headers]
        self.request_seen = True
        if not self.chain:
            return None
        reply = self._run(ON_REQUEST_HEADERS, self.request_headers, end_of_stream)
        _pseudo_first(self.request_headers)
        return reply

    def on_response_headers(
        self, status: int, headers: list[tuple[bytes, bytes]], end_of_stream: bool
    ) -> LocalReply | None:
        self.status = status
        if not self.chain:
            self.response_headers = list(headers)
            return None
        self.response_map = [(b":status", str(status).encode())] + [(name.lower(), value) for name, value in headers]
        reply = self._run(ON_RESPONSE_HEADERS, self.response_map, end_of_stream)
        self._read_back_response()
        return reply

    def _read_back_response(self) -> None:
        status = None
        for name, value in self.response_map:
            if name == b":status":
                status = value
                break
        if status is not None and status != str(self.status).encode():
            code = int(status) if status.isdigit() and len(status) == 3 else 0
            if 100 <= code <= 599:
                self.status = code
            else:
                self.log.warn(f'wasm: invalid ":status" "{status.decode("latin-1")}" set by a filter, ignored')
        self.response_headers = [pair for pair in self.response_map if not pair[0].startswith(b":")]

    def _run(self, export: str, pairs: list, end_of_stream: bool) -> LocalReply | None:
        if self.pending is not None:  # produced between phases (e.g. from a tick)
            reply, self.pending = self.pending, None
            return reply
        eos = 1 if end_of_stream else 0
        for i, (plugin, fail_closed) in enumerate(self.chain):
            ctx = self._context(i, plugin)
            if ctx is None:
                if fail_closed:
                    return self._fail_reply()
                continue
            vm = ctx.vm
            if not vm.has(export):
                continue
            args = (ctx.id, len(pairs), eos)[: vm.module.arity(export)]
            try:
                action = vm.invoke(ctx, export, *args)
            except VMFailed:
                self.contexts[i] = _DEAD
                if self.pending is not None:
                    self.pending = None
                    self.replied = False
                if fail_closed:
                    return self._fail_reply()
                continue
            if self.pending is not None:
                reply, self.pending = self.pending, None
                return reply
            if action:
                self._paused(plugin, export, action)
        return None

    def _context(self, i: int, plugin: Plugin) -> HttpContext | None:
        ctx = self.contexts[i]
        if ctx is _DEAD:
            return None
        state = plugin.state
        if ctx is not None:
            if ctx.vm.failed or ctx.vm is not state.vm:
                self.contexts[i] = _DEAD
                return None
            return ctx
        vm = state.ready(time.monotonic())
        if vm is None:
            self.contexts[i] = _DEAD
            outcome = "request answered 500" if self.chain[i][1] else "filter skipped"
            self.log.warn(f"*{self.info.connection_id} {plugin.label}: VM unavailable after a failure, {outcome}")
            return None
        try:
            ctx = vm.new_http_context(plugin, self)
        except VMFailed:
            self.contexts[i] = _DEAD
            return None
        self.contexts[i] = ctx
        return ctx

    def _fail_reply(self) -> LocalReply:
        self.replied = True
        return LocalReply(500, [], b"")

    def _paused(self, plugin: Plugin, export: str, action: int) -> None:
        if export in plugin.warned:
            return
        plugin.warned.add(export)
        self.log.warn(
            f"*{self.info.connection_id} {plugin.label}: {export} returned {action} (pause), "
            "but nothing can resume the stream yet: continuing"
        )

    # -- called by the host ---------------------------------------------------

    def send_local_reply(self, ctx, status: int, headers, body: bytes, details: bytes) -> None:
        if self.finished or self.replied:
            self.log.warn(
                f"*{self.info.connection_id} {ctx.plugin.label}: local response {status} ignored: "
                "a response was already decided for this request"
            )
            return
        self.replied = True
        self.pending = LocalReply(status, headers, body)
        if self.log.enabled("info"):
            detail = f' ("{details.decode("utf-8", "replace")}")' if details else ""
            self.log.info(f"*{self.info.connection_id} {ctx.plugin.label}: local response {status}{detail}")

    # -- the end --------------------------------------------------------------

    def finish(self) -> None:
        """proxy_on_done, proxy_on_log, proxy_on_delete for every context; idempotent."""
        if self.finished:
            return
        self.finished = True
        live = [ctx for ctx in self.contexts if isinstance(ctx, HttpContext)]
        self.contexts = []
        for export in ("proxy_on_done", "proxy_on_log", "proxy_on_delete"):
            for ctx in live:
                vm = ctx.vm
                if vm.failed or not vm.has(export):
                    continue
                try:
                    vm.invoke(ctx, export, ctx.id)
                except VMFailed:
                    pass
        for ctx in live:
            ctx.vm.contexts.pop(ctx.id, None)
