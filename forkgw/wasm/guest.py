"""The wasm boundary: calls into one instance, its host functions, its memory.

This is the only module that touches wasmtime per call.  Two implementations
share one interface:

- `FastGuest` (selected when the pinned wasmtime's private bindings have the
  shape `_probe()` checks at import): exports are called with
  `wasmtime_func_call_unchecked` over a preallocated value array per export,
  host functions are raw `wasmtime_linker_define_func_unchecked` callbacks,
  and linear memory is reached through a cached memoryview.  About 1 µs per
  call and 0.3 µs per host call, against ~10-30 µs through the public API
  (scripts/wasm_bench.py measures both).
- `Guest`, wasmtime's public API only: the fallback when the private bindings
  are missing or changed shape, or when FORKGW_WASM_BOUNDARY=public.
  tests/wasm/test_boundary.py fails loudly if the pinned version falls back.

Theory of operation:
- `Guest(store, deadline_ticks)` exists before the instance: `Host.link()`
  defines every import through `define()`, then `instantiate()` and the
  exports are looked up once.
- `call(name, *args)` runs one top-level callback under a fresh epoch
  deadline (the fast path re-arms it only when the epoch moved since it last
  did); traps propagate (the VM decides what a trap means).  Types were
  checked at link time against the module's own signatures, never per call.
- A host function receives its i32 arguments as u32 ints (i64 as signed
  ints) and returns its result (None for none).  UNWIND exceptions (and
  BaseExceptions such as KeyboardInterrupt) trap the guest and are re-raised
  by the call that entered it; any other Exception goes to the `on_bug`
  handler given to `define()`, whose value is returned to the guest (without
  one, it traps like UNWIND).
- Memory helpers take guest pointers (u32) and bounds-check every access
  against the memory size: out of bounds is None/False, never a Python
  exception.  Memory grows whenever guest code runs, but never shrinks, and
  the engine (vm.new_engine) forbids moving it: so an access inside the
  cached view is valid as is, and one beyond it asks wasmtime for the current
  size (and rebuilds the view) before answering.  Without that guarantee
  (`memory_fixed=False`, the public API) every access asks wasmtime.
- `give()` returns data to the guest the proxy-wasm way: allocate with the
  module's `proxy_on_memory_allocate` (or `malloc`), copy, then write the
  pointer and the size (u32 LE) to the two out-params.
"""

from __future__ import annotations

import ctypes
import os
import struct

import wasmtime

from .abi import U32, Status

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
U64 = 0xFFFFFFFFFFFFFFFF


class GuestExit(Exception):
    """proc_exit(code): unwinds the guest like a trap."""

    def __init__(self, code: int):
        super().__init__(f"proc_exit({code})")
        self.code = code


class GuestAbort(Exception):
    """abort()/proc_raise(): unwinds the guest like a trap."""


# Exceptions that must cross a host function untouched (they end the guest call).
UNWIND = (GuestExit, GuestAbort, wasmtime.Trap, wasmtime.WasmtimeError)

_SIG_CHARS = {"i32": "i", "i64": "I", "f32": "f", "f64": "F"}


def signature(functype: wasmtime.FuncType) -> str:
    """ "params:results", i = i32, I = i64, f = f32, F = f64, ? = anything else."""
    params = "".join(_SIG_CHARS.get(str(t), "?") for t in functype.params)
    results = "".join(_SIG_CHARS.get(str(t), "?") for t in functype.results)
    return f"{params}:{results}"


def new_guest(store: wasmtime.Store, deadline_ticks: int, memory_fixed: bool = False, epoch=None) -> "Guest":
    """The fastest boundary available for `store`.

    `memory_fixed`: the engine was built with `memory_may_move = False`, so a
    memory's base address never changes and a cached view stays valid as it grows.
    `epoch`: the engine's ticker (vm.EpochTicker), whose `ticks` count goes up
    right before each epoch increment; see FastGuest.call.
    """
    if FAST_PATH:
        return FastGuest(store, deadline_ticks, memory_fixed, epoch)
    return Guest(store, deadline_ticks)


# -- the public API (fallback) -----------------------------------------------


class Guest:
    """One instance through wasmtime's public API."""

    fast = False

    def __init__(self, store: wasmtime.Store, deadline_ticks: int):
        self.store = store
        self.deadline_ticks = deadline_ticks
        self.funcs: dict[str, wasmtime.Func] = {}
        self.memory: wasmtime.Memory | None = None
        self.allocator = None
        self.stale = True  # never cleared here: every access asks wasmtime
        self._view = memoryview(b"")

    def instantiate(self, linker: wasmtime.Linker, module: wasmtime.Module) -> None:
        self.bind(linker.instantiate(self.store, module))

    def bind(self, instance: wasmtime.Instance) -> None:
        for name, item in instance.exports(self.store).items():
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

    def _call_allocator(self, size: int) -> int:
        return self.allocator(self.store, size)

    def define(self, linker: wasmtime.Linker, module: str, name: str, functype: wasmtime.FuncType,
               method, on_bug=None) -> None:
        """Serve import `module.name` with `method` (see the module docstring for the contract)."""
        mask = [kind == "i" for kind in signature(functype).split(":")[0]]

        def call(*args):
            try:
                return method(*[arg & U32 if m else arg for arg, m in zip(args, mask)])
            except UNWIND:
                raise
            except Exception:
                if on_bug is None:
                    raise
                return on_bug()

        linker.define_func(module, name, functype, call)

    # -- memory ---------------------------------------------------------

    def _refresh(self) -> memoryview:
        """Linear memory as it is now (empty before the instance exists)."""
        mem = self.memory
        if mem is None:
            return memoryview(b"")
        size = mem.data_len(self.store)
        return _memory_view(ctypes.addressof(mem.data_ptr(self.store).contents), size)

    def memory_size(self) -> int:
        """The current size in bytes."""
        return len(self._refresh())

    def inside(self, ptr: int, size: int) -> bool:
        """True if [ptr, ptr+size) lies inside memory."""
        if not self.stale and ptr + size <= len(self._view):
            return True  # memory never shrinks
        return ptr + size <= len(self._refresh())

    def read(self, ptr: int, size: int) -> bytes | None:
        """Bytes [ptr, ptr+size) or None when out of bounds."""
        if size == 0:
            return b""
        view = self._view
        if self.stale or ptr + size > len(view):
            view = self._refresh()
            if ptr + size > len(view):
                return None
        return view[ptr : ptr + size].tobytes()

    def write(self, ptr: int, data: bytes) -> bool:
        size = len(data)
        view = self._view
        if self.stale or ptr + size > len(view):
            view = self._refresh()
            if ptr + size > len(view):
                return False
        if size:
            view[ptr : ptr + size] = data
        return True

    def read_u32(self, ptr: int) -> int | None:
        view = self._view
        if self.stale or ptr + 4 > len(view):
            view = self._refresh()
            if ptr + 4 > len(view):
                return None
        return _U32.unpack_from(view, ptr)[0]

    def write_u32(self, ptr: int, value: int) -> bool:
        view = self._view
        if self.stale or ptr + 4 > len(view):
            view = self._refresh()
            if ptr + 4 > len(view):
                return False
        _U32.pack_into(view, ptr, value & U32)
        return True

    def write_u64(self, ptr: int, value: int) -> bool:
        view = self._view
        if self.stale or ptr + 8 > len(view):
            view = self._refresh()
            if ptr + 8 > len(view):
                return False
        _U64.pack_into(view, ptr, value & U64)
        return True

    def writable(self, *spans: tuple[int, int]) -> bool:
        """True if every (ptr, size) span lies inside memory."""
        if not self.stale:
            length = len(self._view)
            for ptr, size in spans:
                if ptr + size > length:
                    break
            else:
                return True  # memory never shrinks
        length = len(self._refresh())
        for ptr, size in spans:
            if ptr + size > length:
                return False
        return True

    def give(self, data: bytes, ret_ptr: int, ret_size: int) -> Status:
        """Allocate guest memory for `data`, copy it, write (ptr, size) to the out-params."""
        view = self._view
        if self.stale or ret_ptr + 4 > len(view) or ret_size + 4 > len(view):
            view = self._refresh()
            if ret_ptr + 4 > len(view) or ret_size + 4 > len(view):
                return Status.INVALID_MEMORY_ACCESS
        if not data:
            self.write_u32(ret_ptr, 0)
            self.write_u32(ret_size, 0)
            return Status.OK
        ptr = self.allocate(len(data))
        if ptr is None or not self.write(ptr, data):
            return Status.INVALID_MEMORY_ACCESS
        self.write_u32(ret_ptr, ptr)
        self.write_u32(ret_size, len(data))
        return Status.OK

    def allocate(self, size: int) -> int | None:
        """Guest pointer to `size` fresh bytes, or None (no allocator, or it returned 0).

        The allocator is guest code: it may trap, which propagates like any trap.
        """
        if self.allocator is None:
            return None
        ptr = self._call_allocator(size) & U32
        return ptr or None


# -- wasmtime's private bindings (the fast path) -------------------------------


def _probe():
    """(bindings, prototypes) when the private bindings have the shape this module relies on, else a reason."""
    try:
        from wasmtime import _bindings as ffi
    except ImportError as err:
        return None, f"wasmtime._bindings cannot be imported ({err})"
    for check in (_lacks_names, _changed_c_types, _changed_wrappers):
        reason = check(ffi)
        if reason is not None:
            return None, reason
    return (ffi, _prototypes(ffi)), None


def _lacks_names(ffi) -> str | None:
    names = (
        "dll wasmtime_val_raw wasm_trap_t wasmtime_error_t wasmtime_func_t wasmtime_memory_t wasmtime_context_t "
        "wasmtime_caller_t wasmtime_linker_t wasm_functype_t wasmtime_func_unchecked_callback_t "
        "_wasmtime_func_call_unchecked _wasmtime_linker_define_func_unchecked _wasmtime_memory_data "
        "_wasmtime_memory_data_size _wasmtime_context_set_epoch_deadline _wasmtime_trap_new"
    ).split()
    missing = [name for name in names if not hasattr(ffi, name)]
    return f"wasmtime._bindings lacks {', '.join(missing)}" if missing else None


def _c_signatures(ffi) -> dict:
    """The C signatures as the generated bindings declare them (they follow wasmtime's C headers).

    Our own prototypes call the same symbols with plain addresses: these must not have moved.
    """
    P, c_size_t, c_char = ctypes.POINTER, ctypes.c_size_t, ctypes.c_char
    return {
        "_wasmtime_func_call_unchecked": (
            (P(ffi.wasmtime_context_t), P(ffi.wasmtime_func_t), P(ffi.wasmtime_val_raw), c_size_t,
             P(P(ffi.wasm_trap_t))), P(ffi.wasmtime_error_t)),
        "_wasmtime_linker_define_func_unchecked": (
            (P(ffi.wasmtime_linker_t), P(c_char), c_size_t, P(c_char), c_size_t, P(ffi.wasm_functype_t),
             ffi.wasmtime_func_unchecked_callback_t, ctypes.c_void_p, ctypes.CFUNCTYPE(None, ctypes.c_void_p)),
            P(ffi.wasmtime_error_t)),
        "_wasmtime_memory_data": ((P(ffi.wasmtime_context_t), P(ffi.wasmtime_memory_t)), P(ctypes.c_uint8)),
        "_wasmtime_memory_data_size": ((P(ffi.wasmtime_context_t), P(ffi.wasmtime_memory_t)), c_size_t),
        "_wasmtime_context_set_epoch_deadline": ((P(ffi.wasmtime_context_t), ctypes.c_uint64), None),
        "_wasmtime_trap_new": ((P(c_char), c_size_t), P(ffi.wasm_trap_t)),
    }


def _changed_c_types(ffi) -> str | None:
    """A reason when a signature or struct we call with raw addresses changed: that would corrupt, not fail."""
    for name, (argtypes, restype) in _c_signatures(ffi).items():
        fn = getattr(ffi, name)
        got = tuple(fn.argtypes or ())
        if got != argtypes or fn.restype is not restype:
            return f"wasmtime._bindings.{name} changed its C signature"
    P, c_size_t = ctypes.POINTER, ctypes.c_size_t
    cb = ffi.wasmtime_func_unchecked_callback_t
    if cb._restype_ is not c_size_t or tuple(cb._argtypes_) != (
        ctypes.c_void_p, P(ffi.wasmtime_caller_t), P(ffi.wasmtime_val_raw), c_size_t
    ):
        return "wasmtime._bindings.wasmtime_func_unchecked_callback_t changed shape"
    if ctypes.sizeof(ffi.wasmtime_val_raw) != 16 or ctypes.sizeof(ffi.wasmtime_func_t) != 16:
        return "wasmtime_val_raw_t or wasmtime_func_t changed size"
    return None


def _changed_wrappers(ffi) -> str | None:
    """A reason when wasmtime's Python objects no longer hold the C handles FastGuest reads out of them."""
    checks = (
        (wasmtime.Func, "_func", ffi.wasmtime_func_t),
        (wasmtime.Memory, "_memory", ffi.wasmtime_memory_t),
    )
    for cls, attr, typ in checks:
        if getattr(cls, "__annotations__", {}).get(attr) is not typ:
            return f"wasmtime.{cls.__name__}.{attr} is no longer a {typ.__name__}"
    for cls, attr in ((wasmtime.Store, "_context"), (wasmtime.Linker, "ptr"), (wasmtime.FuncType, "ptr"),
                      (wasmtime.Trap, "_from_ptr"), (wasmtime.WasmtimeError, "_from_ptr")):
        if not callable(getattr(cls, attr, None)):
            return f"wasmtime.{cls.__name__}.{attr} is gone"
    return None


def _prototypes(ffi) -> dict:
    vp, c_size_t, dll, C = ctypes.c_void_p, ctypes.c_size_t, ffi.dll, ctypes.CFUNCTYPE
    protos = {
        # CFUNCTYPE releases the GIL while wasm runs, so the epoch ticker thread can interrupt it
        "call": C(vp, vp, vp, vp, c_size_t, vp)(("wasmtime_func_call_unchecked", dll)),
        "deadline": C(None, vp, ctypes.c_uint64)(("wasmtime_context_set_epoch_deadline", dll)),
        "data": C(vp, vp, vp)(("wasmtime_memory_data", dll)),
        "data_size": C(c_size_t, vp, vp)(("wasmtime_memory_data_size", dll)),
        "trap_new": C(vp, ctypes.c_char_p, c_size_t)(("wasmtime_trap_new", dll)),
    }
    for name in ("call", "deadline", "data_size"):
        # per-call prototypes take prebuilt ctypes arguments of exactly the declared types:
        # no argtypes means no per-call conversion
        protos[name].argtypes = None
    return protos


_probed, FAST_PATH_UNAVAILABLE = _probe()
FAST_PATH = _probed is not None and os.environ.get("FORKGW_WASM_BOUNDARY", "fast") != "public"

# A host callback sees the raw value array as u32 words: an i32 argument k is word 4k.
_HOST_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t)
_NO_FINALIZER = ctypes.cast(0, ctypes.CFUNCTYPE(None, ctypes.c_void_p))
_HOST_TRAP = b"host function raised"
_RAW_FORMAT = {"i": "I12x", "I": "Q8x", "f": "f12x", "F": "d8x"}  # one 16-byte wasmtime_val_raw
_RESULT_FORMAT = {"i": "i12x", "I": "q8x", "f": "f12x", "F": "d8x"}  # signed, as the public API returns
_MASK = {"i": U32, "I": U64}


class _Export:
    """One export, ready to call: its value array, its C arguments, the (un)packing of its signature."""

    __slots__ = ("func", "buf", "view", "cargs", "nparams", "kinds", "pack", "unpack", "nresults")

    def __init__(self, func: wasmtime.Func, params: str, results: str, ctx, trap):
        self.func = func  # keeps the wasmtime_func_t alive
        slots = max(len(params), len(results), 1)
        self.buf = (ctypes.c_ubyte * (16 * slots))()  # args in, results out
        self.view = memoryview(self.buf).cast("B")
        # wasmtime_func_call_unchecked(context, func, args_and_results, len, &trap)
        self.cargs = (ctx, ctypes.c_void_p(ctypes.addressof(func._func)), ctypes.c_void_p(ctypes.addressof(self.buf)),
                      ctypes.c_size_t(slots), trap)
        self.nparams = len(params)
        self.kinds = params
        self.pack = struct.Struct("<" + "".join(_RAW_FORMAT[k] for k in params)).pack_into
        self.unpack = struct.Struct("<" + "".join(_RESULT_FORMAT[k] for k in results)).unpack_from
        self.nresults = len(results)


class _NeverTicks:
    """No ticker known: a count that always differs, so every call re-arms."""

    @property
    def ticks(self) -> object:
        return object()


class FastGuest(Guest):
    """One instance through the private bindings: raw calls, raw host callbacks, a cached memory view."""

    fast = True

    def __init__(self, store: wasmtime.Store, deadline_ticks: int, memory_fixed: bool = False, epoch=None):
        ffi, protos = _probed
        self._epoch = epoch if epoch is not None else _NeverTicks()
        super().__init__(store, deadline_ticks)
        self.memory_fixed = memory_fixed
        self.stale = not memory_fixed  # a memory that may move is looked up on every access
        self._ffi = ffi
        self._raw_call = protos["call"]
        self._set_deadline = protos["deadline"]
        self._data = protos["data"]
        self._data_size = protos["data_size"]
        self._trap_new = protos["trap_new"]
        self._ctx = ctypes.c_void_p(ctypes.cast(store._context(), ctypes.c_void_p).value)
        self._trap = ctypes.c_void_p()  # out-param of every call, NULL unless it trapped
        self._trap_ref = ctypes.c_void_p(ctypes.addressof(self._trap))
        self._mem = None  # c_void_p to the wasmtime_memory_t
        self._exports: dict[str, _Export] = {}
        self._alloc: _Export | None = None
        self._callbacks: list = []  # the C thunks: wasmtime holds their addresses for the store's life
        store._forkgw_callbacks = self._callbacks  # ... so they live exactly as long as the store
        self.pending: BaseException | None = None  # raised by a host function, re-raised by the call
        self._view = memoryview(b"")
        self._base = 0

    @property
    def deadline_ticks(self) -> int:
        return self._ticks.value

    @deadline_ticks.setter
    def deadline_ticks(self, ticks: int) -> None:
        self._ticks = ctypes.c_uint64(ticks)
        self._armed = None  # the next call arms the new deadline

    def instantiate(self, linker: wasmtime.Linker, module: wasmtime.Module) -> None:
        try:
            instance = linker.instantiate(self.store, module)  # the start function may call host functions
        except UNWIND:
            self._reraise_pending()
            raise
        self.bind(instance)

    def bind(self, instance: wasmtime.Instance) -> None:
        super().bind(instance)
        for name, func in self.funcs.items():
            params, results = signature(func.type(self.store)).split(":")
            if "?" not in params + results and isinstance(getattr(func, "_func", None), self._ffi.wasmtime_func_t):
                self._exports[name] = _Export(func, params, results, self._ctx, self._trap_ref)
        allocator = self.allocator
        if allocator is not None:
            self._alloc = next((e for e in self._exports.values() if e.func is allocator), None)
        if self.memory is not None and isinstance(getattr(self.memory, "_memory", None), self._ffi.wasmtime_memory_t):
            self._mem = ctypes.c_void_p(ctypes.addressof(self.memory._memory))

    # -- calls ------------------------------------------------------------

    def call(self, name: str, *args: int):
        """Run export `name` as a top-level callback; raises on trap."""
        export = self._exports.get(name)
        if export is None:  # an export with reference types: never a proxy-wasm callback
            return self._public(super().call, name, *args)
        # The deadline is "ticks from now": re-arming only matters once the epoch moved.  The
        # ticker bumps its count before the epoch, and the count is read before arming, so an
        # unchanged count means at most one increment since arming: the callback keeps at least
        # deadline_ticks - 1 ticks, as it would right after arming.
        ticks = self._epoch.ticks
        if ticks != self._armed:
            self._set_deadline(self._ctx, self._ticks)
            self._armed = ticks
        # _invoke() inlined: this is the per-callback path
        try:
            export.pack(export.view, 0, *args)
        except struct.error:
            self._pack_checked(export, args)
        err = self._raw_call(*export.cargs)
        if err or self._trap.value:
            self._raise(err)
        if export.nresults == 1:
            return export.unpack(export.view)[0]
        return list(export.unpack(export.view)) if export.nresults else None

    def _call_allocator(self, size: int) -> int:
        if self._alloc is None:
            return self._public(super()._call_allocator, size)
        return self._invoke(self._alloc, (size,))

    def _public(self, fn, *args):
        """A call through the public API, whose trap may come from one of our raw host functions."""
        try:
            return fn(*args)
        except UNWIND:
            self._reraise_pending()
            raise

    def _invoke(self, export: _Export, args):
        """Call `export` (no new deadline: nested in a callback); raises on trap."""
        try:
            export.pack(export.view, 0, *args)
        except struct.error:
            self._pack_checked(export, args)
        err = self._raw_call(*export.cargs)
        if err or self._trap.value:
            self._raise(err)
        if export.nresults == 1:
            return export.unpack(export.view)[0]
        return list(export.unpack(export.view)) if export.nresults else None

    @staticmethod
    def _pack_checked(export: _Export, args) -> None:
        """The arguments did not pack: a wrong count (the public API's error) or values to wrap like wasm."""
        if len(args) != export.nparams:
            raise wasmtime.WasmtimeError(
                f"too {'many' if len(args) > export.nparams else 'few'} parameters provided: "
                f"given {len(args)}, expected {export.nparams}"
            )
        export.pack(export.view, 0, *[a & _MASK.get(k, U64) if isinstance(a, int) else a
                                      for a, k in zip(args, export.kinds)])

    def _raise(self, err) -> None:
        """Turn a failed call into the exception the public API would raise."""
        ffi = self._ffi
        exc: BaseException
        if err:
            exc = wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t)))
        else:
            exc = wasmtime.Trap._from_ptr(ctypes.cast(self._trap.value, ctypes.POINTER(ffi.wasm_trap_t)))
            self._trap.value = None
        self._reraise_pending()
        raise exc

    def _reraise_pending(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            raise pending

    # -- host functions ---------------------------------------------------

    def define(self, linker: wasmtime.Linker, module: str, name: str, functype: wasmtime.FuncType,
               method, on_bug=None) -> None:
        """Serve import `module.name` with `method` (see the module docstring for the contract)."""
        params, results = signature(functype).split(":")
        if params == "i" * len(params) and results in ("", "i"):
            callback = self._i32_callback(method, len(params), results == "i", on_bug)
        else:
            callback = self._generic_callback(method, params, results, on_bug)
        thunk = _HOST_CALLBACK(callback)
        self._callbacks.append(thunk)
        m, n = module.encode(), name.encode()
        err = self._ffi._wasmtime_linker_define_func_unchecked(
            linker.ptr(), m, len(m), n, len(n), functype.ptr(),
            ctypes.cast(thunk, self._ffi.wasmtime_func_unchecked_callback_t), None, _NO_FINALIZER,
        )
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)

    def _i32_callback(self, method, nparams: int, has_result: bool, on_bug):
        """The common shape: i32 params, an i32 result or none; args read straight from the array."""
        factory = _I32_FACTORIES.get((nparams, has_result))
        if factory is None:
            factory = _I32_FACTORIES[nparams, has_result] = _i32_factory(nparams, has_result)
        return factory(method, self._host_failed, on_bug)

    def _generic_callback(self, method, params: str, results: str, on_bug):
        """Any other signature (i64, floats, references): decode and encode through struct."""
        failed = self._host_failed
        fmt = struct.Struct("<" + "".join(
            {"i": "I12x", "I": "q8x", "f": "f12x", "F": "d8x"}.get(k, "16x") for k in params
        ))
        refs = [i for i, k in enumerate(params) if k == "?"]

        def callback(env, caller, p, n):
            try:
                args = list(fmt.unpack(ctypes.string_at(ctypes.addressof(p.contents), fmt.size)))
                for i in refs:
                    args.insert(i, None)
                _put_results(p, results, method(*args))
                return 0
            except BaseException as err:
                return failed(err, p, on_bug, results)

        return callback

    def _host_failed(self, err: BaseException, p, on_bug, results: str) -> int:
        """A host function raised: answer on_bug()'s value, or trap the guest and keep `err` for the call."""
        try:
            if on_bug is not None and isinstance(err, Exception) and not isinstance(err, UNWIND):
                _put_results(p, results, on_bug())
                return 0
        except BaseException as bug:
            err = bug
        self.pending = err
        return self._trap_new(_HOST_TRAP, len(_HOST_TRAP))

    # -- memory -----------------------------------------------------------

    def _refresh(self) -> memoryview:
        """The view, rebuilt if the memory grew since it was taken (or on every access if it may move)."""
        if self._mem is None:
            if self.memory is None:
                return self._view
            self.stale = True  # a memory without the expected struct: ask the public API every time
            return super()._refresh()
        size = self._data_size(self._ctx, self._mem)
        view = self._view
        if size != len(view) or self.stale:
            base = self._data(self._ctx.value, self._mem.value)
            if self._base and base != self._base and not self.stale:
                self.stale = True  # it moved after all: stop trusting any cached view
            self._base = base
            view = self._view = _memory_view(base, size)
        return view


_view_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_view_from_memory.restype = ctypes.py_object
_view_from_memory.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PyBUF_WRITE = 0x200


def _memory_view(base: int, size: int) -> memoryview:
    """A writable view of [base, base+size); the caller keeps the memory alive while it is used."""
    if not size or not base:
        return memoryview(b"")
    return _view_from_memory(base, size, _PyBUF_WRITE)


_I32_FACTORIES: dict = {}


def _i32_factory(nparams: int, has_result: bool):
    """A callback maker for one i32 shape, with the argument reads spelled out (p[0], p[4], ...).

    Spelled out rather than looped or star-called: a host call's Python overhead is
    most of its cost, and this is the path every proxy-wasm host call takes.
    """
    args = ", ".join(f"p[{4 * k}]" for k in range(nparams))
    store = "p[0] = " if has_result else ""
    results = "i" if has_result else ""
    source = (
        "def factory(method, failed, on_bug):\n"
        "    def callback(env, caller, p, n):\n"
        "        try:\n"
        f"            {store}method({args})\n"
        "            return 0\n"
        "        except BaseException as err:\n"
        f"            return failed(err, p, on_bug, {results!r})\n"
        "    return callback\n"
    )
    namespace: dict = {}
    exec(compile(source, f"<host callback {nparams}:{results}>", "exec"), namespace)
    return namespace["factory"]


def _put_results(p, results: str, value) -> None:
    """Write a host function's result(s) into the raw value array (unlisted kinds: zero)."""
    if not results:
        return
    values = [value] if len(results) == 1 else list(value)
    raw = b"".join(
        struct.pack("<" + _RAW_FORMAT[k], v & _MASK[k] if k in _MASK else v) if k in _RAW_FORMAT else bytes(16)
        for k, v in zip(results, values)
    )
    ctypes.memmove(ctypes.addressof(p.contents), raw, len(raw))
