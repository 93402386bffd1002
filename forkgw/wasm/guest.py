"""The wasm boundary: calls into one instance and reads/writes its memory.

This is the only module that touches wasmtime objects per call, so a faster
call path (e.g. wasmtime's raw bindings) can replace `Guest.call` and the
memory helpers without the rest of the host noticing.

Theory of operation:
- Exports are looked up once, at construction; `call(name, *args)` runs one
  top-level callback under a fresh epoch deadline and lets traps propagate
  (the VM decides what a trap means).
- Memory helpers take `cx`: the `Caller` inside a host function (or the
  Store outside one).  Every (ptr, len) is u32-masked by the caller and
  bounds-checked here against the *current* memory size, because memory can
  grow during any guest call; nothing is cached across guest calls.
- `give()` returns data to the guest the proxy-wasm way: allocate with the
  module's `proxy_on_memory_allocate` (or `malloc`), copy, then write the
  pointer and the size (u32 LE) to the two out-params.
"""

from __future__ import annotations

import ctypes
import struct

import wasmtime

from .abi import U32, Status

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Guest:
    def __init__(self, store: wasmtime.Store, instance: wasmtime.Instance, deadline_ticks: int):
        self.store = store
        self.deadline_ticks = deadline_ticks
        self.funcs: dict[str, wasmtime.Func] = {}
        self.memory: wasmtime.Memory | None = None
        for name, item in instance.exports(store).items():
            if isinstance(item, wasmtime.Func):
                self.funcs[name] = item
            elif isinstance(item, wasmtime.Memory) and name == "memory":
                self.memory = item
        self.allocator = self.funcs.get("proxy_on_memory_allocate") or self.funcs.get("malloc")

    def has(self, name: str) -> bool:
        return name in self.funcs

    def call(self, name: str, *args: int):
        """Run export `name` as a top-level callback; raises on trap."""
        self.store.set_epoch_deadline(self.deadline_ticks)
        return self.funcs[name](self.store, *args)

    # -- memory ---------------------------------------------------------

    def memory_size(self, cx) -> int:
        return self.memory.data_len(cx)

    def _base(self, cx) -> tuple[int, int]:
        mem = self.memory
        return ctypes.addressof(mem.data_ptr(cx).contents), mem.data_len(cx)

    def read(self, cx, ptr: int, size: int) -> bytes | None:
        """Bytes [ptr, ptr+size) or None when out of bounds."""
        if size == 0:
            return b""
        base, length = self._base(cx)
        if ptr + size > length:
            return None
        return ctypes.string_at(base + ptr, size)

    def write(self, cx, ptr: int, data: bytes) -> bool:
        size = len(data)
        base, length = self._base(cx)
        if ptr + size > length:
            return False
        if size:
            ctypes.memmove(base + ptr, data, size)
        return True

    def read_u32(self, cx, ptr: int) -> int | None:
        data = self.read(cx, ptr, 4)
        return None if data is None else _U32.unpack(data)[0]

    def write_u32(self, cx, ptr: int, value: int) -> bool:
        return self.write(cx, ptr, _U32.pack(value & U32))

    def write_u64(self, cx, ptr: int, value: int) -> bool:
        return self.write(cx, ptr, _U64.pack(value & 0xFFFFFFFFFFFFFFFF))

    def writable(self, cx, *spans: tuple[int, int]) -> bool:
        """True if every (ptr, size) span lies inside memory."""
        length = self.memory.data_len(cx)
        return all(ptr + size <= length for ptr, size in spans)

    def give(self, cx, data: bytes, ret_ptr: int, ret_size: int) -> Status:
        """Allocate guest memory for `data`, copy it, write (ptr, size) to the out-params."""
        if not self.writable(cx, (ret_ptr, 4), (ret_size, 4)):
            return Status.INVALID_MEMORY_ACCESS
        if not data:
            self.write(cx, ret_ptr, b"\0\0\0\0")
            self.write(cx, ret_size, b"\0\0\0\0")
            return Status.OK
        ptr = self.allocate(cx, len(data))
        if ptr is None or not self.write(cx, ptr, data):
            return Status.INVALID_MEMORY_ACCESS
        self.write(cx, ret_ptr, _U32.pack(ptr))
        self.write(cx, ret_size, _U32.pack(len(data)))
        return Status.OK

    def allocate(self, cx, size: int) -> int | None:
        """Guest pointer to `size` fresh bytes, or None (no allocator, or it returned 0).

        The allocator is guest code: it may trap, which propagates like any trap.
        """
        if self.allocator is None:
            return None
        ptr = self.allocator(cx, size) & U32
        return ptr or None
