"""One request through a chain of wasm filters: phases, bodies, pauses, the end.

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
  proxy_close_stream is a local reply 502 with "connection: close": the
  nearest HTTP/1.1 gets to a reset while keeping the access log line.
- Pausing: a filter that returns Pause from a headers phase (request or
  response), or at the end of a body, while one of its HTTP callouts is in
  flight, holds the stream there.  The phase returns PAUSED, the worker waits
  (request: it stops reading the client, bounded by client_header_timeout or
  client_body_timeout; response: it holds the head or the end of the body and
  stops reading the peer, bounded by send_timeout), and the stream later
  calls `on_resume(result)` from the loop, never from inside a host call:
  - proxy_continue_stream(0 for a request phase, 1 for a response phase;
    0.1.0: proxy_continue_request / proxy_continue_response): the remaining
    filters run; one may pause again (the worker keeps waiting, no on_resume
    yet) or answer; then on_resume(the phase's result);
  - a local response sent from the callout callback (effective context):
    on_resume(that reply); proxy_close_stream: on_resume(LocalReply(502));
  - none of these after the answer to its last call in flight: resumed
    anyway (Kong's rule), logged at [warn];
  - its VM failed meanwhile: on_error decides (500, or skip and resume).
  A phase's result: None or a LocalReply for headers, the body bytes to pass
  on or a LocalReply for a body.  While a body is held, the callout callback
  can read and edit it (buffer 0 or 1).  When the outcome is known before the
  phase returns (a call that failed at once), it is returned directly instead
  of PAUSED.  A Pause with no call in flight cannot be resumed: logged once
  per filter and phase, treated as Continue.  Trailers are never held.
- Bodies: the worker feeds `on_request_body` / `on_response_body` every
  chunk and a last call with end_of_stream (data may be empty), and only
  for chains that need it (`wants_request_body`, `wants_response_body`,
  computed once per chain by Runtime._wants: every SDK exports every
  callback, so a module must also be able to change a body, or the conf
  say `inspect_bodies on`).  A call answers the bytes to pass on now (b""
  while a filter buffers), a LocalReply (for a response body the worker can
  only cut the connection; a request body over `body_buffer_size` while a
  filter buffers it is a 413), or, at the end of a body, PAUSED.  How the
  filters buffer, edit and hold a body is the stream's `Bodies` (bodies.py).
- Trailers (HTTP/1.1 chunked trailers): after the body's end_of_stream call,
  `on_request_trailers` / `on_response_trailers` run the chain over map 1 /
  map 3 and hand the (edited) trailers back to forward.
- A filter whose VM traps (or is down, waiting for its rebuild): for
  on_error "fail" the phase returns LocalReply(500); for "continue" the
  filter is skipped for the rest of the stream (a body it held goes on
  unfiltered).  A local reply recorded by the call that trapped is
  discarded.
- `finish()` runs proxy_on_done, then proxy_on_log, then proxy_on_delete for
  every context created (each step over all contexts, in chain order), once;
  contexts whose VM died are skipped (never call a failed instance).  The
  answers of callouts still in flight then only clean up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .abi import BufferType
from .bodies import Bodies
from .phases import (
    DIRECTION,
    ON_REQUEST_BODY,
    ON_REQUEST_HEADERS,
    ON_REQUEST_TRAILERS,
    ON_RESPONSE_BODY,
    ON_RESPONSE_HEADERS,
    ON_RESPONSE_TRAILERS,
    PAUSED,
    LocalReply,
)
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
    tls: object = None  # what the TLS handshake agreed on (net.tls.TlsTransport), or None


_DEAD = object()  # this filter is out of the stream (VM failed or unavailable)
_UNDECIDED = object()  # a paused request's outcome, while not known

_END = ("proxy_on_done", "proxy_on_log", "proxy_on_delete")  # finish(), in this order


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

    # State only pauses and bodies use: class defaults, so a plain request never sets them.
    paused_at: int | None = None  # index of the filter whose Pause holds the stream
    paused_phase = ON_REQUEST_HEADERS  # the phase it holds (a DIRECTION key)
    paused_eos = False
    resume_requested = False
    inline = False  # woken inside on_request_headers: the outcome is returned, not sent to on_resume
    outcome = _UNDECIDED
    bodies: Bodies | None = None  # created by the first body chunk the filters get
    # Per-request state whose start value is immutable: class defaults too (set when it changes).
    request_seen = False
    response_map: list[tuple[bytes, bytes]] | None = None  # with :status, once known
    status = 0
    replied = False
    pending: LocalReply | None = None
    finished = False
    on_resume = None  # see PAUSED
    _request_in: list | None = None  # the request map as the filters got it (request_changed)
    _status_pair: tuple | None = None  # the :status pair this host put first in response_map

    def __init__(self, chain: list[tuple[Plugin, bool]], info: StreamInfo, log, runtime=None,
                 wants: tuple[bool, bool] = (False, False)):
        self.info = info
        self.log = log
        self.chain = chain  # (plugin, fail_closed)
        self.runtime = runtime
        self.http_calls = runtime.http_calls if runtime is not None else None
        self.contexts: list = [None] * len(chain)
        self.request_headers: list[tuple[bytes, bytes]] = []
        self.request_trailers: list[tuple[bytes, bytes]] = []
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.response_trailers: list[tuple[bytes, bytes]] = []
        self.properties: dict = {}  # proxy_set_property scratch, shared by the chain
        # Body phases: set when the chain needs them (Runtime._wants; the worker then holds
        # the request body, and sends the response chunked).
        self.wants_request_body, self.wants_response_body = wants

    # -- phases ---------------------------------------------------------------

    def on_request_headers(self, headers: list[tuple[bytes, bytes]], end_of_stream: bool):
        """None (go on), a LocalReply, or PAUSED (wait for on_resume)."""
        pairs = self.request_headers = [(name.lower(), value) for name, value in headers]
        self.request_seen = True
        if not self.chain:
            return None
        self._request_in = pairs.copy()
        reply = self._settled(self._run(ON_REQUEST_HEADERS, pairs, end_of_stream))
        if self.request_headers != self._request_in:  # as given (pseudo-headers first) unless changed
            _pseudo_first(self.request_headers)
        return reply

    def request_changed(self) -> bool:
        """Whether the request map differs from what the filters were given (the worker then rebuilds)."""
        return self._request_in is None or self.request_headers != self._request_in

    def on_response_headers(self, status: int, headers: list[tuple[bytes, bytes]], end_of_stream: bool):
        """None (go on: read `status` and `response_headers`), a LocalReply, or PAUSED."""
        self.status = status
        if not self.chain:
            self.response_headers = list(headers)
            return None
        first = self._status_pair = (b":status", str(status).encode())
        self.response_map = [first] + [(name.lower(), value) for name, value in headers]
        reply = self._settled(self._run(ON_RESPONSE_HEADERS, self.response_map, end_of_stream))
        if reply is not PAUSED:
            self._read_back_response()
        return reply

    def on_request_trailers(self, trailers: list[tuple[bytes, bytes]]):
        """The trailers to forward (as the filters left them), or a LocalReply."""
        self.request_trailers = [(name.lower(), value) for name, value in trailers]
        return self._trailers(ON_REQUEST_TRAILERS, self.request_trailers)

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]):
        self.response_trailers = [(name.lower(), value) for name, value in trailers]
        return self._trailers(ON_RESPONSE_TRAILERS, self.response_trailers)

    def _trailers(self, export: str, pairs: list[tuple[bytes, bytes]]):
        if not self.chain:
            return pairs
        reply = self._settled(self._run(export, pairs, True))
        return pairs if reply is None else reply

    def on_request_body(self, data: bytes, end_of_stream: bool):
        """bytes to pass on now (b"" while a filter buffers), or a LocalReply."""
        return self._body(0, ON_REQUEST_BODY, data, end_of_stream)

    def on_response_body(self, data: bytes, end_of_stream: bool):
        """bytes to send now (b"" while a filter buffers), or a LocalReply."""
        return self._body(1, ON_RESPONSE_BODY, data, end_of_stream)

    def _read_back_response(self) -> None:
        pairs = self.response_map
        if pairs and pairs[0] is self._status_pair:  # the first :status is still ours: unchanged
            self.response_headers = [pair for pair in pairs if not pair[0].startswith(b":")]
            return
        status = None
        for name, value in pairs:
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

    def _run(self, export: str, pairs: list, end_of_stream: bool, start: int = 0):
        """Run the filters from `start`: None, a LocalReply, or PAUSED (headers phases only)."""
        if self.pending is not None:  # produced between phases (e.g. from a tick)
            reply, self.pending = self.pending, None
            return reply
        eos = 1 if end_of_stream else 0
        contexts = self.contexts
        for i, (plugin, fail_closed) in enumerate(self.chain[start:] if start else self.chain, start):
            ctx = contexts[i]
            if ctx is None or ctx is _DEAD or ctx.vm.failed or ctx.vm is not plugin.state.vm:
                ctx = self._context(i, plugin)
                if ctx is None:
                    if fail_closed:
                        return self._fail_reply()
                    continue
            vm = ctx.vm
            arity = vm.arities.get(export)
            if arity is None:  # not exported
                continue
            args = (ctx.id, len(pairs), eos)[:arity]
            try:
                action = vm.invoke(ctx, export, *args)
            except VMFailed:
                self._failed(i)
                if fail_closed:
                    return self._fail_reply()
                continue
            if self.pending is not None:
                reply, self.pending = self.pending, None
                return reply
            if action:
                if export in DIRECTION:
                    if ctx.calls:  # its callout's answer can resume the stream
                        self._hold(i, export, end_of_stream)
                        return PAUSED
                    self._paused(plugin, export, action, "nothing can resume the stream yet")
                else:
                    self._paused(plugin, export, action, "trailers are never held")
        return None

    # -- the chain's contexts and failures (bodies.py walks the chain with these too) --

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
        vm = state.vm
        if vm is None or vm.failed:
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

    def _failed(self, i: int) -> None:
        """Filter i's VM trapped: it is out of the stream, and a reply its call recorded is void."""
        self.contexts[i] = _DEAD
        if self.pending is not None:
            self.pending = None
            self.replied = False

    def _fail_reply(self) -> LocalReply:
        self.replied = True
        return LocalReply(500, [], b"")

    def _paused(self, plugin: Plugin, export: str, action: int, why: str) -> None:
        if export in plugin.warned:
            return
        plugin.warned.add(export)
        self.log.warn(
            f"*{self.info.connection_id} {plugin.label}: {export} returned {action} (pause), "
            f"but {why}: continuing"
        )

    # -- pause and resume -------------------------------------------------------

    def _hold(self, i: int, export: str, end_of_stream: bool) -> None:
        self.paused_at = i
        self.paused_phase = export
        self.paused_eos = end_of_stream

    def _settled(self, result):
        """A phase's result, once what its callbacks set off has been delivered (see _settle)."""
        http_calls = self.http_calls
        if result is PAUSED or http_calls is not None and (http_calls.early or http_calls.touched):
            return self._settle(result)
        return result

    def _settle(self, reply):
        """Deliver what this phase's callbacks set off (calls that failed at once, wake-ups).

        Runs inside the phase: if that already decides a paused request, the
        phase returns the outcome instead of PAUSED.  A reply recorded for the
        stream meanwhile becomes the phase's reply.
        """
        self.inline = True
        try:
            self.http_calls.settle(self)
        finally:
            self.inline = False
        if reply is PAUSED:
            if self.paused_at is not None:
                return PAUSED
            reply, self.outcome = self.outcome, _UNDECIDED
            if reply is _UNDECIDED:
                reply = None
        if not isinstance(reply, LocalReply) and self.pending is not None:
            reply, self.pending = self.pending, None
        return reply

    def held_body(self):
        """(buffer type, buffer) of a body held for a callout: its answer's callback may edit it."""
        if self.paused_at is None or self.paused_phase not in (ON_REQUEST_BODY, ON_RESPONSE_BODY):
            return None
        phase = 0 if self.paused_phase == ON_REQUEST_BODY else 1
        held = self.bodies.held(phase, self.paused_at)
        return None if held is None else (BufferType(phase), held)

    def wake(self) -> None:
        """Act on what callbacks did to this paused stream (see the module docstring)."""
        resume, self.resume_requested = self.resume_requested, False
        i = self.paused_at
        if i is None or self.finished:
            return
        if self.pending is not None:  # a local response, or proxy_close_stream
            reply, self.pending = self.pending, None
            self._complete(reply)
            return
        ctx = self.contexts[i]
        plugin, fail_closed = self.chain[i]
        if not isinstance(ctx, HttpContext) or ctx.vm.failed or ctx.vm is not plugin.state.vm:
            self.contexts[i] = _DEAD
            if fail_closed:
                self._complete(self._fail_reply())
                return
            resume = True
        elif not resume and not ctx.calls:
            if "auto-resume" not in plugin.warned:  # Kong's rule; said once per filter
                plugin.warned.add("auto-resume")
                self.log.warn(f"*{self.info.connection_id} {plugin.label}: neither resumed nor answered the request "
                              "after its last http callout: resuming it")
            resume = True
        if resume:
            self.paused_at = None
            result = self._resume(i)
            if result is not PAUSED:
                self._complete(result)

    def _resume(self, i: int):
        """The held phase goes on past filter i."""
        export, eos = self.paused_phase, self.paused_eos
        if export == ON_REQUEST_HEADERS:
            reply = self._run(export, self.request_headers, eos, i + 1)
            _pseudo_first(self.request_headers)
            return reply
        if export == ON_RESPONSE_HEADERS:
            reply = self._run(export, self.response_map, eos, i + 1)
            if reply is not PAUSED:
                self._read_back_response()
            return reply
        return self.bodies.resume(0 if export == ON_REQUEST_BODY else 1, export, i, eos)

    def _complete(self, reply) -> None:
        """The paused phase has its result: tell the worker, or the phase still running."""
        self.paused_at = None
        if self.inline:
            self.outcome = reply
            return
        callback = self.on_resume
        if callback is not None:
            callback(reply)

    # -- bodies -------------------------------------------------------------------

    def _body(self, phase: int, export: str, data: bytes, end: bool):
        if self.pending is not None:  # produced since the last phase (a callout's answer, a tick)
            reply, self.pending = self.pending, None
            return reply
        if not self.chain:
            return data
        bodies = self.bodies
        if bodies is None:
            bodies = self.bodies = Bodies(self)
        out = self._settled(bodies.filter(phase, export, data, end))
        return b"" if out is None else out

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
        if self.paused_at is not None:
            self.http_calls.touch(self)

    def continue_stream(self, direction: int) -> None:
        """proxy_continue_stream(0 request, 1 response): resume a phase of that direction held by a pause."""
        if self.paused_at is not None and not self.finished and DIRECTION[self.paused_phase] == direction:
            self.resume_requested = True
            self.http_calls.touch(self)

    def close(self, ctx) -> None:
        """proxy_close_stream: a 502 and the connection closed (see the module docstring)."""
        self.send_local_reply(ctx, 502, [(b"connection", b"close")], b"", b"proxy_close_stream")

    # -- the end --------------------------------------------------------------

    def finish(self) -> None:
        """proxy_on_done, proxy_on_log, proxy_on_delete for every context; idempotent."""
        if self.finished:
            return
        self.finished = True
        self.on_resume = None
        if self.paused_at is not None:
            self.paused_at = None
        if self.bodies is not None:
            self.bodies = None
        live = [ctx for ctx in self.contexts if isinstance(ctx, HttpContext)]
        self.contexts = []
        for export in _END:
            for ctx in live:
                vm = ctx.vm
                if vm.failed or export not in vm.arities:
                    continue
                try:
                    vm.invoke(ctx, export, ctx.id)
                except VMFailed:
                    pass
        for ctx in live:
            ctx.vm.contexts.pop(ctx.id, None)
        for ctx in live:
            ctx.plugin.state.recycle_if_grown()
        http_calls = self.http_calls
        if http_calls is not None and (http_calls.early or http_calls.touched):
            http_calls.settle(self)
