"""What the running callback may read: buffers, header maps, a callout's status.

Theory of operation:
- Pulled, never pushed: host functions ask one object, `Host.input` (a
  `CallbackInput`), for buffers, header maps and the callout's status, so
  what a callback may read is decided where that callback is made.
  `VM.invoke(..., input=...)` sets it for that one callback and puts
  `NO_INPUT` back after it (the stream's header maps, no buffer): nothing
  stays readable past its callback.
- A body callback reads its chunk (`BufferInput`: bytes until
  proxy_set_buffer_bytes first edits it, then a bytearray in its place, which
  the body phase reads back, bodies.py); proxy_on_vm_start / proxy_on_configure read the
  configuration; proxy_on_http_call_response reads the callout's answer
  (http_calls.HttpCallResponse).
- The input belongs to the callback, not to a context: buffers and the
  answer stay readable after proxy_set_effective_context (the SDKs switch to
  the HTTP context before handing the answer over), while maps 0-3 are those
  of the effective context's stream.
"""

from __future__ import annotations

from .abi import MapType, Status

BAD_ARGUMENT = Status.BAD_ARGUMENT

# The map types header_map compares with, as plain ints: it runs for every
# header-map host call, and reading an IntEnum member goes through the enum class.
REQUEST_HEADERS = int(MapType.REQUEST_HEADERS)
REQUEST_TRAILERS = int(MapType.REQUEST_TRAILERS)
RESPONSE_HEADERS = int(MapType.RESPONSE_HEADERS)
RESPONSE_TRAILERS = int(MapType.RESPONSE_TRAILERS)


class CallbackInput:
    """What the running callback may read; this base: its stream's header maps, no buffer.

    The caller of a callback that may read more passes a subclass to
    VM.invoke; the host only ever asks, so one object answers for buffers,
    maps and status alike (see the module docstring).
    """

    __slots__ = ()
    status = 0  # proxy_get_status: the HTTP status of the callout being answered (0: none, or it failed)

    def buffer(self, buffer_type: int):
        """bytes or bytearray, or None: the buffer is not available in this callback."""
        return None

    def edit(self, buffer_type: int) -> bytearray | None:
        """The buffer as a bytearray the host edits in place (None: not available)."""
        return None

    def header_map(self, map_type: int, ctx):
        """The pairs list of map `map_type` (edited in place), or a status.

        Maps 0-3 belong to the stream of `ctx`, the effective context: the
        request map exists once the request is seen, the response map once
        the response is (BadArgument before, as for a root context).
        """
        stream = ctx.stream if ctx is not None else None
        if stream is None or map_type > RESPONSE_TRAILERS:
            return BAD_ARGUMENT
        if map_type == REQUEST_HEADERS:
            return stream.request_headers if stream.request_seen else BAD_ARGUMENT
        if map_type == RESPONSE_HEADERS:
            return stream.response_map if stream.response_map is not None else BAD_ARGUMENT
        if map_type == REQUEST_TRAILERS:
            return stream.request_trailers
        return stream.response_trailers


NO_INPUT = CallbackInput()  # between callbacks, and for callbacks that read no buffer


class BufferInput(CallbackInput):
    """One buffer: a body chunk or the configuration (read-only: the host refuses edits of types past 1)."""

    __slots__ = ("buffer_type", "data")

    def __init__(self, buffer_type: int, data: bytes | bytearray):
        self.buffer_type = buffer_type
        self.data = data  # a bytes chunk stays bytes until its first edit: the caller reads `data` back

    def buffer(self, buffer_type: int):
        return self.data if buffer_type == self.buffer_type else None

    def edit(self, buffer_type: int) -> bytearray | None:
        if buffer_type != self.buffer_type:
            return None
        data = self.data
        if type(data) is not bytearray:
            data = self.data = bytearray(data)
        return data
