"""Proxy-Wasm ABI constants and byte formats (no wasmtime here).

Everything on the wire is little-endian and every i32 the guest hands us is
really a u32: wasmtime-py gives signed ints, so callers mask with `U32`.

Header maps travel as "pairs": u32 count, then (u32 name_len, u32 value_len)
per pair, then `name\\0value\\0` per pair.  `decode_pairs` is strict (the
guest wrote it, it may lie) and returns None on anything malformed;
`encode_pairs` is what the host writes back.
"""

from __future__ import annotations

import struct
from enum import IntEnum

U32 = 0xFFFFFFFF

ABI_MARKERS = {
    "proxy_abi_version_0_1_0": "0.1.0",
    "proxy_abi_version_0_2_0": "0.2.0",
    "proxy_abi_version_0_2_1": "0.2.1",
}

MAX_PAIRS = 1024  # cpp-host's limits for guest-supplied maps
MAX_PAIRS_BYTES = 1024 * 1024


class Status(IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_ARGUMENT = 2
    SERIALIZATION_FAILURE = 3
    PARSE_FAILURE = 4
    INVALID_MEMORY_ACCESS = 6
    EMPTY = 7
    CAS_MISMATCH = 8
    INTERNAL_FAILURE = 10
    UNIMPLEMENTED = 12


class LogLevel(IntEnum):
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5


# proxy log level -> error log level (nginx names)
LOG_LEVEL_NAMES = ("debug", "debug", "info", "warn", "error", "crit")


class MapType(IntEnum):
    REQUEST_HEADERS = 0
    REQUEST_TRAILERS = 1
    RESPONSE_HEADERS = 2
    RESPONSE_TRAILERS = 3
    GRPC_RECEIVE_INITIAL_METADATA = 4
    GRPC_RECEIVE_TRAILING_METADATA = 5
    HTTP_CALL_RESPONSE_HEADERS = 6
    HTTP_CALL_RESPONSE_TRAILERS = 7


class BufferType(IntEnum):
    HTTP_REQUEST_BODY = 0
    HTTP_RESPONSE_BODY = 1
    DOWNSTREAM_DATA = 2
    UPSTREAM_DATA = 3
    HTTP_CALL_RESPONSE_BODY = 4
    GRPC_RECEIVE_BUFFER = 5
    VM_CONFIGURATION = 6
    PLUGIN_CONFIGURATION = 7
    CALL_DATA = 8


class StreamType(IntEnum):
    HTTP_REQUEST = 0
    HTTP_RESPONSE = 1
    DOWNSTREAM = 2
    UPSTREAM = 3


class MetricType(IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


class Errno(IntEnum):
    """The WASI errno values the host returns."""

    SUCCESS = 0
    BADF = 8
    FAULT = 21
    INVAL = 28
    NOSYS = 52
    NOTSUP = 58
    SPIPE = 70


_U32 = struct.Struct("<I")
_U32X2 = struct.Struct("<II")


def encode_pairs(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """Serialize a header map; an empty map is b"" (the host then returns ptr 0, size 0)."""
    if not pairs:
        return b""
    head = [_U32.pack(len(pairs))]
    body = []
    for name, value in pairs:
        head.append(_U32X2.pack(len(name), len(value)))
        body.append(name + b"\0" + value + b"\0")
    return b"".join(head) + b"".join(body)


def pairs_size(pairs: list[tuple[bytes, bytes]]) -> int:
    """len(encode_pairs(pairs)) without building it."""
    if not pairs:
        return 0
    return 4 + sum(10 + len(name) + len(value) for name, value in pairs)


def decode_pairs(buf: bytes) -> list[tuple[bytes, bytes]] | None:
    """Parse guest-written pairs; None if malformed.  b"" and b"\\0" are the empty map."""
    size = len(buf)
    if size == 0 or buf == b"\0":
        return []
    if size < 4 or size > MAX_PAIRS_BYTES:
        return None
    (count,) = _U32.unpack_from(buf, 0)
    if count > MAX_PAIRS:
        return None
    off = 4 + 8 * count
    if off > size:
        return None
    out = []
    for i in range(count):
        name_len, value_len = _U32X2.unpack_from(buf, 4 + 8 * i)
        end = off + name_len + 1 + value_len + 1
        if end > size or buf[off + name_len] != 0 or buf[end - 1] != 0:
            return None
        out.append((buf[off : off + name_len], buf[off + name_len + 1 : end - 1]))
        off = end
    return out


def split_path(raw: bytes) -> tuple[bytes, ...]:
    """A property path: NUL-separated segments (SDKs) or dotted (`request.path`).

    A trailing NUL is ignored.  In the dotted spelling `request.headers.x.y`
    names the header "x.y": everything after `headers.` is one segment.
    """
    raw = raw.rstrip(b"\0")
    if not raw:
        return ()
    if b"\0" in raw:
        return tuple(raw.split(b"\0"))
    parts = raw.split(b".", 2)
    if len(parts) == 3 and parts[1] == b"headers":
        return tuple(parts)
    return tuple(raw.split(b"."))
