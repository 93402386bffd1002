"""A stream's body phases: what each filter holds back, the bound, a hold at the end.

Theory of operation:
- The stream (filter.py) creates its `Bodies` with the first chunk its
  filters get, and hands it every chunk of either direction.  `Bodies` walks
  the chain with the stream's own contexts, failure handling and holds: a
  trap, a local reply or a hold for a callout works as in a headers phase,
  and the stream settles the result the same way.
- Each filter that exports the callback has its own buffer per phase, read
  and edited as BufferType 0 / 1 (prepend, append, replace), with body_size =
  its size.  Continue passes the (edited) buffer to the next filter and,
  after the last, back to the worker; Pause (or StopIterationAndBuffer:
  anything non-zero) keeps it, the call returns b"", and the next chunk is
  appended.  At end_of_stream everything goes on, unless the filter that
  paused has a callout in flight: then the stream holds the end of the body
  (PAUSED) and the callout's callback can read and edit what is held.  A
  Pause there with no callout in flight is logged once and treated as
  Continue.
- A paused body buffer is bounded by `wasm { body_buffer_size }`.  Past it,
  a request body is answered 413; a response body passes through (its head
  is on the wire already): what was buffered goes on unmodified, then the
  rest, and that filter is not called again for this body.  Filters that
  stream (Continue) are never limited.
- A filter whose VM fails leaves the body: what it held goes on unfiltered
  (on_error "continue"), or the phase answers 500 (on_error "fail").  A local
  reply recorded by a body callback ends the phase, and nothing held is
  passed on.
"""

from __future__ import annotations

from .abi import BufferType
from .inputs import BufferInput
from .phases import PAUSED, LocalReply
from .vm import Plugin, VMFailed

TOO_LARGE = b"request body too large for the filters\n"
DEFAULT_LIMIT = 1 << 20  # body_buffer_size for a stream built without a runtime


class _Body:
    """One body phase: what each filter holds back, and who no longer filters it."""

    __slots__ = ("held", "passing", "warned")

    def __init__(self):
        self.held: dict[int, bytearray] = {}  # filter index -> its paused buffer
        self.passing: set[int] = set()  # filters past body_buffer_size: the body goes by them
        self.warned = False


class Bodies:
    """The request (0) and response (1) body phases of one stream."""

    __slots__ = ("stream", "phases")

    def __init__(self, stream):
        self.stream = stream
        self.phases = (_Body(), _Body())

    def held(self, phase: int, i: int) -> bytearray | None:
        """What filter i holds of body `phase` (the buffer itself: a callout's callback edits it in place)."""
        return self.phases[phase].held.get(i)

    def resume(self, phase: int, export: str, i: int, end: bool):
        """A held body goes on past filter i: what it held, through the filters after it."""
        held = self.phases[phase].held.pop(i, b"")
        return self.filter(phase, export, bytes(held), end, i + 1)

    def filter(self, phase: int, export: str, data: bytes, end: bool, start: int = 0):
        """Run the filters from `start` over a chunk: bytes to pass on (b"" while one holds), a LocalReply, PAUSED."""
        stream = self.stream
        body = self.phases[phase]
        buffer_type = BufferType.HTTP_REQUEST_BODY if phase == 0 else BufferType.HTTP_RESPONSE_BODY
        limit = stream.runtime.wasm.body_buffer_size if stream.runtime is not None else DEFAULT_LIMIT
        eos = 1 if end else 0
        chain = stream.chain
        for i, (plugin, fail_closed) in enumerate(chain[start:] if start else chain, start):
            if i in body.passing:
                continue
            ctx = stream._context(i, plugin)
            if ctx is None:
                held = body.held.pop(i, None)
                if fail_closed:
                    return stream._fail_reply()
                if held:
                    data = bytes(held) + data  # what it held goes on unfiltered
                continue
            vm = ctx.vm
            if not vm.has(export):
                continue
            buf = body.held.get(i)  # a bytearray while it buffers; else this chunk, bytes until edited
            if buf is None:
                buf = data
            elif len(buf) + len(data) > limit:
                data = self._over_limit(phase, plugin, body, i, buf, data, limit)
                if isinstance(data, LocalReply):
                    return data
                continue
            else:
                buf += data
            chunk = BufferInput(buffer_type, buf)
            try:
                action = vm.invoke(ctx, export, ctx.id, len(buf), eos, input=chunk)
            except VMFailed:
                stream._failed(i)
                body.held.pop(i, None)
                if fail_closed:
                    return stream._fail_reply()
                data = bytes(buf)
                continue
            data = self._after_call(i, plugin, export, body, chunk.data, action, end, ctx.calls)
            if type(data) is not bytes:  # the phase's answer: a LocalReply or PAUSED
                return data
            if not data and not end:
                return b""
        return data

    def _over_limit(self, phase: int, plugin: Plugin, body: _Body, i: int, buf: bytearray, data: bytes,
                    limit: int):
        """Filter i's held body would pass body_buffer_size: a 413, or (response) it stops filtering."""
        stream = self.stream
        del body.held[i]
        if phase == 0:
            stream.log.error(f"*{stream.info.connection_id} {plugin.label}: request body over body_buffer_size "
                             f"({limit} bytes) while the filter buffers it: answered 413")
            body.held.clear()
            stream.replied = True
            return LocalReply(413, [(b"content-type", b"text/plain")], TOO_LARGE)
        if not body.warned:
            body.warned = True
            stream.log.warn(f"*{stream.info.connection_id} {plugin.label}: response body over body_buffer_size "
                            f"({limit} bytes) while the filter buffers it: passed through unfiltered")
        body.passing.add(i)
        return bytes(buf) + data

    def _after_call(self, i: int, plugin: Plugin, export: str, body: _Body, buf, action: int, end: bool,
                    calls: int):
        """What filter i's body callback leaves: bytes to go on with (b"" while it holds), or the phase's answer."""
        stream = self.stream
        if stream.pending is not None:
            reply, stream.pending = stream.pending, None
            body.held.clear()
            return reply
        if action and (not end or calls):
            # Held: the next chunk is appended, or (at the end) its callout's answer resumes it.
            body.held[i] = buf if type(buf) is bytearray else bytearray(buf)
            if not end:
                return b""
            stream._hold(i, export, end)
            return PAUSED
        if action:
            stream._paused(plugin, export + " at end of stream", action, "the body is complete")
        body.held.pop(i, None)
        return buf if type(buf) is bytes else bytes(buf)
