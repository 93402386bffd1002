"""proxy_http_call on the filter's side: tokens, answers, waking the requests they paused.

Theory of operation:
- This is the ABI side of HTTP callouts; the exchange itself (connect, send,
  read, time out) is the worker's transport, in forkgw/http/.
- proxy_http_call -> `HttpCalls.dispatch()`: a token unique in this worker (a
  u32 counter that skips tokens still in flight: the Rust SDK panics on a
  duplicate, and never hands the token of an abandoned call out again before
  the counter wraps), then the worker's dispatcher (`Runtime.http_dispatcher`),
  which runs the exchange on the loop and reports exactly once: a
  CalloutResult, or None on failure or timeout.
- The answer goes to proxy_on_http_call_response(root_id, token, headers,
  body size, trailers) on the ROOT context of the plugin that dispatched: the
  SDKs map the token back to their HTTP context and call
  proxy_set_effective_context.  That callback reads an `HttpCallResponse`
  (inputs.CallbackInput): map 6 (with `:status`), map 7, buffer 4 and
  proxy_get_status; a failure or timeout gives counts 0, empty maps and
  status 0.  A body its stream holds for the call is buffer 0 or 1 then,
  editable in place.
- Never re-entrant: a guest is never entered from inside a host call.  The
  dispatcher can fail at once (a refused connect on loopback) while the guest
  is still inside proxy_http_call: that answer waits in `early` until control
  is back at a safe point (the end of the stream phase or tick that made the
  call) and `settle()` delivers it.
- A call remembers the context that made it.  Once its stream is finished
  (client gone, timeout) or its VM failed, the answer only cleans up: no
  callback can reach a deleted context.
- After each delivery the stream of the call, and every stream a callback
  resumed, closed or answered through the effective context (`touched`), is
  woken (Stream.wake()).  A stream other than the one whose phase is running
  is woken from the loop instead (`soon`: the next Runtime.tick(), brought
  forward by `Runtime.wakeup` when the worker gave one), so that no worker
  code of one connection runs inside another's.
"""

from __future__ import annotations

import traceback

from .abi import U32, BufferType, MapType, Status
from .inputs import CallbackInput
from .vm import VMFailed

DEFAULT_TIMEOUT = 60.0  # seconds, for a call that gives timeout 0 (nginx's proxy_read_timeout)


class HttpCall:
    """One proxy_http_call until its answer is delivered (or only cleans up)."""

    __slots__ = ("token", "ctx", "result", "answered", "dispatching")

    def __init__(self, token: int, ctx):
        self.token = token
        self.ctx = ctx  # RootContext (ticks) or HttpContext
        self.result = None  # CalloutResult | None
        self.answered = False
        self.dispatching = True  # the dispatcher has not returned yet: an answer now is "early"


class HttpCallResponse(CallbackInput):
    """What proxy_on_http_call_response may read: the answer, and a body held for it."""

    __slots__ = ("status", "headers", "body", "trailers", "held")

    def __init__(self, result, held=None):
        self.held = held  # (buffer type, bytearray) of a body its stream holds for this call, or None
        if result is None:
            self.status, self.headers, self.body, self.trailers = 0, [], b"", []
            return
        self.status = result.status
        self.headers = [(b":status", str(result.status).encode())] + [
            (name.lower(), value) for name, value in result.headers
        ]
        self.body = bytes(result.body)
        self.trailers = [(name.lower(), value) for name, value in getattr(result, "trailers", None) or []]

    def buffer(self, buffer_type: int):
        if buffer_type == BufferType.HTTP_CALL_RESPONSE_BODY:
            return self.body
        return self.edit(buffer_type)

    def edit(self, buffer_type: int) -> bytearray | None:
        held = self.held  # a bytearray already: edited where the stream holds it
        return held[1] if held is not None and buffer_type == held[0] else None

    def header_map(self, map_type: int, ctx):
        if map_type == MapType.HTTP_CALL_RESPONSE_HEADERS:
            return self.headers
        if map_type == MapType.HTTP_CALL_RESPONSE_TRAILERS:
            return self.trailers
        return CallbackInput.header_map(self, map_type, ctx)


class HttpCalls:
    """The calls in flight in one worker, and the streams waiting to be woken."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.inflight: dict[int, HttpCall] = {}
        self.next_token = 1
        self.early: list[HttpCall] = []  # answered inside proxy_http_call, not delivered yet
        self.touched: list = []  # streams a callback resumed, closed or answered
        self.soon: list = []  # streams to wake from the loop

    # -- dispatch (a host function) ----------------------------------------------

    def _token(self) -> int:
        token = self.next_token
        while token in self.inflight:
            token = token % U32 + 1
        self.next_token = token % U32 + 1
        return token

    def dispatch(self, ctx, target: str, headers, body: bytes, timeout_ms: int) -> int | Status:
        """Start a call for `ctx`: its token, or BadArgument (unknown target) / InternalFailure."""
        dispatcher = self.runtime.http_dispatcher
        call = HttpCall(self._token(), ctx)
        self.inflight[call.token] = call
        timeout = timeout_ms / 1000.0 if timeout_ms else DEFAULT_TIMEOUT
        try:
            started = dispatcher(target, headers, body, timeout, lambda result: self._answered(call, result))
        except Exception:
            self.runtime.log.crit(f"{ctx.plugin.label}: http callout dispatch failed: "
                                  + traceback.format_exc().replace("\n", " | "))
            started = None
        call.dispatching = False
        if not started:
            self.inflight.pop(call.token, None)
            return Status.BAD_ARGUMENT if started is False else Status.INTERNAL_FAILURE
        if ctx.stream is not None:
            ctx.calls += 1
        if call.answered:
            self.early.append(call)
        return call.token

    def _answered(self, call: HttpCall, result) -> None:
        if call.answered:
            return
        call.answered = True
        call.result = result
        if call.dispatching:
            return  # dispatch() queues it once the guest is out of proxy_http_call
        self.early.append(call)
        self.settle()  # from the loop

    # -- delivery ------------------------------------------------------------------

    def settle(self, current=None) -> None:
        """Deliver early answers and wake touched streams.

        `current`: the stream whose phase is running (woken inline: its phase
        returns the outcome); None when called from the loop, where every
        stream may be woken at once.
        """
        while self.early or self.touched or (current is None and self.soon):
            if self.early:
                self._deliver(self.early.pop(0))
            touched, self.touched = self.touched, []
            for stream in touched:
                if current is None or stream is current:
                    stream.wake()
                elif stream not in self.soon:
                    self.soon.append(stream)
                    wakeup = self.runtime.wakeup
                    if wakeup is not None:
                        wakeup()
            if current is None and self.soon and not self.early and not self.touched:
                soon, self.soon = self.soon, []
                for stream in soon:
                    stream.wake()

    def _deliver(self, call: HttpCall) -> None:
        self.inflight.pop(call.token, None)
        ctx = call.ctx
        stream = ctx.stream
        if stream is not None:
            ctx.calls -= 1
            if stream.finished:
                return  # the request is over: its context is gone
            self.touch(stream)
        root = ctx.root
        vm = root.vm
        if vm.failed or vm.roots.get(root.plugin.key) is not root or not vm.has("proxy_on_http_call_response"):
            return
        response = HttpCallResponse(call.result, stream.held_body() if stream is not None else None)
        try:
            vm.invoke(root, "proxy_on_http_call_response", root.id, call.token, len(response.headers),
                      len(response.body), len(response.trailers), input=response)
        except VMFailed:  # logged already; the stream sees its filter dead when woken
            pass

    def touch(self, stream) -> None:
        """A callback resumed, closed or answered `stream`: wake it at the next safe point."""
        if stream not in self.touched:
            self.touched.append(stream)
