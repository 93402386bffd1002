"""Host functions: the `env` (proxy-wasm) and WASI imports a filter calls.

Theory of operation:
- Linking follows the module's own import list (ABI doc section 0, rule 2).
  `resolve_import()` decides, at compile time in the master, how each import
  is served: a real implementation (its declared type must be exactly the ABI
  type), a fixed-status stub (any declared type: SDKs disagree on the
  signatures of calls we do not implement yet), or a rejection, which
  `compile_modules` turns into a ConfError.  `Host.link()` replays that plan in
  the worker with the import's own FuncType, through `Guest.define()` (the
  wasm boundary: raw callbacks on the fast path, the public API otherwise).
- One Host per VM instance.  Hostcalls act on `ctx`: the context whose
  callback is running (`current`), or the one the guest chose with
  proxy_set_effective_context (`effective`); both are reset after every
  top-level callback.  Root contexts have no stream: header maps are then
  unavailable (BadArgument, as the spec says).
- What a callback may read is pulled, never pushed: host functions ask one
  object, `self.input` (an inputs.CallbackInput, set by VM.invoke for one
  callback), for buffers, header maps and the callout's status.
- A host function is `method(self, *args)`: every i32 argument arrives as a
  u32 int (i64 as a signed int), and guest memory is reached through
  `self.mem` (the `Guest`), which bounds-checks every guest pointer; out of
  bounds is answered with InvalidMemoryAccess (WASI: EFAULT).  No Python
  exception leaves a host function except the deliberate guest traps
  (GuestExit, GuestAbort) and traps raised by guest code the host called (the
  allocator); a host bug is logged at [crit] and answered with InternalFailure.
- Statuses are the ones the SDKs accept (the Rust SDK panics on anything it
  does not list): e.g. proxy_log, set_property, send_local_response always
  answer OK on valid input; unsupported calls answer the "not available"
  status each SDK tolerates (grpc calls: InternalFailure; grpc stream ops:
  NotFound; foreign functions: NotFound).
- Stream control (continue, close, a local reply) only records what the
  filter asked: the stream acts on it once the callback returned, never from
  inside the host call.

Shared data, queues and metrics use `LocalShared` or `ShmShared` (shared.py).
"""

from __future__ import annotations

import os
import re
import struct
import time
import traceback
from typing import TYPE_CHECKING

import wasmtime

from . import properties
from .abi import (
    LOG_LEVEL_NAMES,
    U32,
    BufferType,
    Errno,
    MetricType,
    Status,
    decode_pairs,
    encode_pairs,
    pairs_size,
)
from .guest import GuestAbort, GuestExit, signature
from .inputs import NO_INPUT, CallbackInput

if TYPE_CHECKING:
    from .guest import Guest
    from .vm import VM

OK = Status.OK
NOT_FOUND = Status.NOT_FOUND
BAD_ARGUMENT = Status.BAD_ARGUMENT
INVALID_MEMORY_ACCESS = Status.INVALID_MEMORY_ACCESS

# The buffer types hot host functions compare with, as plain ints:
# reading an IntEnum member goes through the enum class (~0.1 µs each).
LAST_BODY = int(BufferType.HTTP_RESPONSE_BODY)  # buffer types 0 and 1 are bodies, the only editable ones
FIRST_CONFIGURATION = int(BufferType.VM_CONFIGURATION)  # 6-8 are read-only by type: BadArgument even when absent
LAST_BUFFER = int(BufferType.CALL_DATA)

# -- the import table --------------------------------------------------------
# Signatures: params ":" results, i = i32, I = i64.

ENV_IMPLEMENTED = {
    "proxy_log": "iii:i",
    "proxy_get_log_level": "i:i",
    "proxy_get_current_time_nanoseconds": "i:i",
    "proxy_set_tick_period_milliseconds": "i:i",
    "proxy_set_effective_context": "i:i",
    "proxy_done": ":i",
    "proxy_get_configuration": "ii:i",
    "proxy_get_buffer_bytes": "iiiii:i",
    "proxy_set_buffer_bytes": "iiiii:i",
    "proxy_get_buffer_status": "iii:i",
    "proxy_get_header_map_size": "ii:i",
    "proxy_get_header_map_pairs": "iii:i",
    "proxy_set_header_map_pairs": "iii:i",
    "proxy_get_header_map_value": "iiiii:i",
    "proxy_add_header_map_value": "iiiii:i",
    "proxy_replace_header_map_value": "iiiii:i",
    "proxy_remove_header_map_value": "iii:i",
    "proxy_continue_stream": "i:i",
    "proxy_close_stream": "i:i",
    "proxy_continue_request": ":i",
    "proxy_continue_response": ":i",
    "proxy_clear_route_cache": ":i",
    "proxy_send_local_response": "iiiiiiii:i",
    "proxy_get_property": "iiii:i",
    "proxy_set_property": "iiii:i",
    "proxy_get_status": "iii:i",
    "proxy_get_shared_data": "iiiii:i",
    "proxy_set_shared_data": "iiiii:i",
    "proxy_register_shared_queue": "iii:i",
    "proxy_resolve_shared_queue": "iiiii:i",
    "proxy_enqueue_shared_queue": "iii:i",
    "proxy_dequeue_shared_queue": "iii:i",
    "proxy_define_metric": "iiii:i",
    "proxy_increment_metric": "iI:i",
    "proxy_record_metric": "iI:i",
    "proxy_get_metric": "ii:i",
    "proxy_http_call": "iiiiiiiiii:i",
    "proxy_dispatch_http_call": "iiiiiiiiii:i",
    "emscripten_notify_memory_growth": "i:",
    "pthread_equal": "ii:i",
}

# Not implemented yet: any declared type, this status (what the SDKs tolerate).
ENV_STUBS = {
    "proxy_grpc_call": Status.INTERNAL_FAILURE,
    "proxy_grpc_stream": Status.INTERNAL_FAILURE,
    "proxy_grpc_send": Status.NOT_FOUND,  # no such token
    "proxy_grpc_cancel": Status.NOT_FOUND,
    "proxy_grpc_close": Status.NOT_FOUND,
    "proxy_call_foreign_function": Status.NOT_FOUND,  # no foreign functions registered
}

WASI_MODULES = ("wasi_snapshot_preview1", "wasi_unstable")

WASI_IMPLEMENTED = {
    "args_get": "ii:i",
    "args_sizes_get": "ii:i",
    "environ_get": "ii:i",
    "environ_sizes_get": "ii:i",
    "clock_res_get": "ii:i",
    "clock_time_get": "iIi:i",
    "fd_write": "iiii:i",
    "fd_read": "iiii:i",
    "fd_close": "i:i",
    "fd_fdstat_get": "ii:i",
    "fd_fdstat_set_flags": "ii:i",
    "fd_prestat_get": "ii:i",
    "fd_prestat_dir_name": "iii:i",
    "fd_seek": "iIii:i",
    "poll_oneoff": "iiii:i",
    "proc_exit": "i:",
    "proc_raise": "i:i",
    "sched_yield": ":i",
    "random_get": "ii:i",
}

# The rest of wasip1: any declared type; no file, socket or directory exists here.
WASI_STUBS = {
    name: Errno.BADF
    for name in (
        "fd_advise fd_allocate fd_datasync fd_fdstat_set_rights fd_filestat_get "
        "fd_filestat_set_size fd_filestat_set_times fd_pread fd_pwrite fd_readdir "
        "fd_renumber fd_sync fd_tell path_create_directory path_filestat_get "
        "path_filestat_set_times path_link path_open path_readlink path_remove_directory "
        "path_rename path_symlink path_unlink_file sock_accept sock_recv sock_send "
        "sock_shutdown"
    ).split()
}

def _pretty(sig: str) -> str:
    names = {"i": "i32", "I": "i64", "f": "f32", "F": "f64", "?": "ref"}
    params, results = sig.split(":")
    return f"({', '.join(names[c] for c in params)}) -> ({', '.join(names[c] for c in results)})"


def resolve_import(module: str, name: str, functype) -> tuple[str, object]:
    """How the host serves one import: ("impl", method) | ("stub", status) | ("abort", None).

    Raises ValueError with a readable reason when the host does not provide it.
    """
    if not isinstance(functype, wasmtime.FuncType):
        raise ValueError(f'import "{module}.{name}" is not a function; the host provides only functions')
    sig = signature(functype)
    if module == "env":
        if name in ENV_IMPLEMENTED:
            want = ENV_IMPLEMENTED[name]
            if sig != want:
                raise ValueError(
                    f'import "env.{name}" has type {_pretty(sig)}, the host provides {_pretty(want)}'
                )
            return "impl", name
        if name in ENV_STUBS:
            return "stub", ENV_STUBS[name]
        if name == "abort":  # AssemblyScript (4 args) and emscripten (none) disagree on the type
            return "abort", None
        raise ValueError(f'import "env.{name}" is not provided by the host')
    if module in WASI_MODULES:
        if name in WASI_IMPLEMENTED:
            want = WASI_IMPLEMENTED[name]
            if sig != want:
                raise ValueError(
                    f'import "{module}.{name}" has type {_pretty(sig)}, the host provides {_pretty(want)}'
                )
            return "impl", "wasi_" + name
        if name in WASI_STUBS:
            return "stub", WASI_STUBS[name]
        raise ValueError(f'import "{module}.{name}" is not provided by the host')
    raise ValueError(f'import "{module}.{name}" is not provided by the host (unknown module "{module}")')


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _bad_header(name: bytes, value: bytes) -> bool:
    """What HTTP/1.1 would refuse: a name that is not a token (pseudo-headers: after their
    colon), a value with control characters.  Refused here, a header never reaches the
    wire, and the worker need not validate what the filters hand back."""
    return _TOKEN.fullmatch(name[1:] if name[:1] == b":" else name) is None or \
        _CONTROL.search(value) is not None


_REQUIRED_PSEUDO = frozenset((b":method", b":path", b":authority"))
_FDSTAT_STDIO = struct.pack("<BxHxxxxQQ", 2, 0, 0xFFFFFFFFFFFFFFFF, 0)  # character device
_MAX_OUTPUT_LINE = 4096


class Host:
    """The import implementations for one VM instance."""

    def __init__(self, vm: "VM", mem: "Guest"):
        self.vm = vm
        self.mem = mem  # the instance's memory (and allocator), bounds-checked
        self.log = vm.log
        self.current = None  # context whose callback runs
        self.effective = None  # set by proxy_set_effective_context
        self.input: CallbackInput = NO_INPUT  # what the running callback may read (VM.invoke sets it)
        self.output = {1: b"", 2: b""}  # partial stdout/stderr lines
        self.warned: set[str] = set()
        self.log_level = next(
            (lvl for lvl, name in enumerate(LOG_LEVEL_NAMES) if self.log.enabled(name)), 5
        )
        self.v010 = vm.abi == "0.1.0"

    @property
    def ctx(self):
        return self.effective or self.current

    # -- linking -------------------------------------------------------------

    def link(self, linker: wasmtime.Linker, plan) -> None:
        """Define every import of the plan; types were checked once, at compile time."""
        define = self.mem.define
        for module, name, functype, (kind, arg) in plan:
            if kind == "impl":
                define(linker, module, name, functype, getattr(self, arg), self._guard(name, bool(functype.results)))
            elif kind == "stub":
                define(linker, module, name, functype, self._stub(module, name, int(arg), functype))
            else:
                define(linker, module, name, functype, self._abort)

    def _guard(self, name: str, has_result: bool):
        """What a host bug answers (called inside the `except`): never let it become a guest trap."""

        def on_bug():
            self.log.crit(f"{self.label()}: host function {name} failed: {traceback.format_exc()}")
            return Status.INTERNAL_FAILURE if has_result else None

        return on_bug

    def _stub(self, module: str, name: str, status: int, functype):
        results = [str(t) for t in functype.results]
        zeros = [0.0 if t in ("f32", "f64") else 0 if t in ("i32", "i64") else None for t in results]
        if not results:
            value = None
        elif results == ["i32"]:
            value = status
        else:
            value = zeros if len(zeros) > 1 else zeros[0]

        def call(*args):
            if name not in self.warned and module == "env":
                self.warned.add(name)
                self.log.warn(f"{self.label()}: {name} is not supported yet, answering status {status}")
            return value

        return call

    def _abort(self, *args):
        message = "abort()"
        if len(args) == 4:  # AssemblyScript abort(message, file, line, column)
            msg = self._as_string(args[0])
            where = self._as_string(args[1])
            message = f"abort: {msg} at {where}:{args[2]}:{args[3]}"
        raise GuestAbort(message)

    def _as_string(self, ptr: int) -> str:
        """An AssemblyScript string (UTF-16LE, byte length at ptr-4), best effort."""
        if ptr < 4:
            return "?"
        size = self.mem.read_u32(ptr - 4)
        if size is None or size > 4096:
            return "?"
        data = self.mem.read(ptr, size)
        return "?" if data is None else data.decode("utf-16-le", "replace")

    # -- helpers -------------------------------------------------------------

    def label(self) -> str:
        ctx = self.ctx
        return ctx.plugin.label if ctx is not None else self.vm.label

    def guest_log(self, level: str, text: str) -> None:
        ctx = self.ctx
        prefix = ""
        if ctx is not None and ctx.stream is not None:
            prefix = f"*{ctx.stream.info.connection_id} "
        text = text.replace("\r", "\\r").replace("\n", "\\n")
        self.log.write(level, f"{prefix}{self.label()}: {text}")

    def flush_output(self) -> None:
        if not (self.output[1] or self.output[2]):
            return  # the common case, after every callback
        for fd in (1, 2):
            if self.output[fd]:
                data, self.output[fd] = self.output[fd], b""
                self._emit(fd, data)

    def _emit(self, fd: int, line: bytes) -> None:
        level = "info" if fd == 1 else "error"
        if self.log.enabled(level):
            name = "stdout" if fd == 1 else "stderr"
            self.guest_log(level, f"{name}: {line.decode('utf-8', 'replace')}")

    # -- env: logging, time, contexts ----------------------------------------

    def proxy_log(self, level, ptr, size):
        if level > 5:
            return BAD_ARGUMENT
        if level < self.log_level:  # below the error log's level: only the bounds are checked
            return OK if self.mem.inside(ptr, size) else INVALID_MEMORY_ACCESS
        name = LOG_LEVEL_NAMES[level]
        data = self.mem.read(ptr, size)
        if data is None:
            return INVALID_MEMORY_ACCESS
        self.guest_log(name, data.decode("utf-8", "replace"))
        return OK

    def proxy_get_log_level(self, ret):
        return OK if self.mem.write_u32(ret, self.log_level) else INVALID_MEMORY_ACCESS

    def proxy_get_current_time_nanoseconds(self, ret):
        return OK if self.mem.write_u64(ret, time.time_ns()) else INVALID_MEMORY_ACCESS

    def proxy_set_tick_period_milliseconds(self, period):
        ctx = self.ctx
        if ctx is None:
            return BAD_ARGUMENT
        ctx.root.set_tick_period(period / 1000.0)
        runtime = self.vm.runtime
        if runtime is not None and runtime.wakeup is not None:
            runtime.wakeup()  # the worker's next deadline may now be this tick
        return OK

    def proxy_set_effective_context(self, context_id):
        ctx = self.vm.contexts.get(context_id)
        if ctx is None:
            return BAD_ARGUMENT
        self.effective = ctx
        return OK

    def proxy_done(self):
        return OK  # root contexts are never asked to finish yet, so nothing is pending

    # -- env: configuration and buffers ---------------------------------------

    def proxy_get_configuration(self, ret_ptr, ret_size):
        """0.1.0: the VM config in on_vm_start, the plugin config in on_configure; OK and empty otherwise."""
        source = self.input
        data = source.buffer(BufferType.PLUGIN_CONFIGURATION)
        if data is None:
            data = source.buffer(BufferType.VM_CONFIGURATION) or b""
        return self.mem.give(data, ret_ptr, ret_size)

    def proxy_get_buffer_bytes(self, buffer_type, start, max_size, ret_ptr, ret_size):
        if buffer_type > LAST_BUFFER:
            return BAD_ARGUMENT
        data = self.input.buffer(buffer_type)
        if data is None:
            return NOT_FOUND
        if type(data) is bytearray:  # an edited body: slice a view, not a copy
            data = memoryview(data)
        return self.mem.give(data[start : start + max_size], ret_ptr, ret_size)

    def proxy_get_buffer_status(self, buffer_type, ret_length, ret_flags):
        if buffer_type > LAST_BUFFER:
            return BAD_ARGUMENT
        data = self.input.buffer(buffer_type)
        if data is None:
            return NOT_FOUND
        mem = self.mem
        if not mem.writable((ret_length, 4), (ret_flags, 4)):
            return INVALID_MEMORY_ACCESS
        mem.write_u32(ret_length, len(data))
        mem.write_u32(ret_flags, 0)
        return OK

    def proxy_set_buffer_bytes(self, buffer_type, start, size, data_ptr, data_size):
        """start 0 and size 0 prepend, start at or past the end appends, anything else replaces."""
        if buffer_type > LAST_BUFFER:
            return BAD_ARGUMENT
        data = self.mem.read(data_ptr, data_size)
        if data is None:
            return INVALID_MEMORY_ACCESS
        if buffer_type > LAST_BODY:  # never editable: BadArgument, or NotFound if absent
            if buffer_type >= FIRST_CONFIGURATION or self.input.buffer(buffer_type) is not None:
                return BAD_ARGUMENT
            return NOT_FOUND
        buf = self.input.edit(buffer_type)  # a chunk is bytes until its first edit: then a bytearray in its place
        if buf is None:
            return NOT_FOUND
        length = len(buf)
        if start == 0 and size == 0:
            buf[0:0] = data
        elif start >= length:
            buf += data
        else:
            buf[start : min(start + size, length)] = data
        return OK

    # -- env: header maps (the running callback's input decides which exist) --

    def proxy_get_header_map_size(self, map_type, ret_size):
        pairs = self.input.header_map(map_type, self.effective or self.current)
        if isinstance(pairs, Status):
            return pairs
        ok = self.mem.write_u32(ret_size, pairs_size(pairs))
        return OK if ok else INVALID_MEMORY_ACCESS

    def proxy_get_header_map_pairs(self, map_type, ret_ptr, ret_size):
        pairs = self.input.header_map(map_type, self.effective or self.current)
        if isinstance(pairs, Status):
            return pairs
        return self.mem.give(encode_pairs(pairs), ret_ptr, ret_size)

    def proxy_set_header_map_pairs(self, map_type, ptr, size):
        pairs = self.input.header_map(map_type, self.effective or self.current)
        if isinstance(pairs, Status):
            return pairs
        data = self.mem.read(ptr, size)
        if data is None:
            return INVALID_MEMORY_ACCESS
        new = decode_pairs(data)
        if new is None or any(_bad_header(name, value) for name, value in new):
            return BAD_ARGUMENT
        pairs[:] = [(name.lower(), value) for name, value in new]
        return OK

    def proxy_get_header_map_value(self, map_type, key_ptr, key_size, ret_ptr, ret_size):
        pairs = self.input.header_map(map_type, self.effective or self.current)
        if isinstance(pairs, Status):
            return pairs
        key = self.mem.read(key_ptr, key_size)
        if key is None:
            return INVALID_MEMORY_ACCESS
        key = key.lower()
        for name, value in pairs:
            if name == key:
                return self.mem.give(value, ret_ptr, ret_size)
        if self.v010:  # 0.1.0: a missing key is an empty value
            return self.mem.give(b"", ret_ptr, ret_size)
        return NOT_FOUND

    def _key_value(self, key_ptr, key_size, value_ptr, value_size):
        mem = self.mem
        key = mem.read(key_ptr, key_size)
        value = mem.read(value_ptr, value_size)
        if key is None or value is None:
            return INVALID_MEMORY_ACCESS
        if _bad_header(key, value):
            return BAD_ARGUMENT
        return key.lower(), value

    def proxy_add_header_map_value(self, map_type, key_ptr, key_size, value_ptr, value_size):
        pairs = self.input.header_map(map_type, self.effective or self.current)
        if isinstance(pairs, Status):
            return pairs
        kv = self._key_value(key_ptr, key_size, value_ptr, value_size)
        if isinstance(kv, Status):
            return kv
        pairs.append(kv)
        return OK

    def proxy_replace_header_map_value(self, map_type, key_ptr, key_size, value_ptr, value_size):
        pairs = self.input.header_map(map_type, self.effective or self.current)
        if isinstance(pairs, Status):
            return pairs
        kv = self._key_value(key_ptr, key_size, value_ptr, value_size)
        if isinstance(kv, Status):
            return kv
        key = kv[0]
        for i, (name, _) in enumerate(pairs):
            if name == key:
                pairs[i] = kv
                pairs[i + 1 :] = [pair for pair in pairs[i + 1 :] if pair[0] != key]
                return OK
        pairs.append(kv)
        return OK

    def proxy_remove_header_map_value(self, map_type, key_ptr, key_size):
        pairs = self.input.header_map(map_type, self.effective or self.current)
        if isinstance(pairs, Status):
            return pairs
        key = self.mem.read(key_ptr, key_size)
        if key is None:
            return INVALID_MEMORY_ACCESS
        key = key.lower()
        pairs[:] = [pair for pair in pairs if pair[0] != key]
        return OK

    # -- env: stream control ---------------------------------------------------

    def proxy_continue_stream(self, stream_type):
        """Request (0) or response (1): resume a phase of that direction held by a pause."""
        if stream_type > 3:
            return BAD_ARGUMENT
        if stream_type < 2:
            self._continue(stream_type)
        return OK

    def _continue(self, direction: int):
        ctx = self.ctx
        stream = ctx.stream if ctx is not None else None
        if stream is not None:
            stream.continue_stream(direction)

    def proxy_close_stream(self, stream_type):
        if stream_type > 3:
            return BAD_ARGUMENT
        ctx = self.ctx
        if ctx is not None and ctx.stream is not None:
            ctx.stream.close(ctx)
        return OK

    def proxy_continue_request(self):
        self._continue(0)
        return OK

    def proxy_continue_response(self):
        self._continue(1)
        return OK

    def proxy_clear_route_cache(self):
        return OK

    def proxy_send_local_response(
        self, status, details_ptr, details_size, body_ptr, body_size, headers_ptr, headers_size, grpc
    ):
        mem = self.mem
        details = mem.read(details_ptr, details_size)
        body = mem.read(body_ptr, body_size)
        raw_headers = mem.read(headers_ptr, headers_size)
        if details is None or body is None or raw_headers is None:
            return INVALID_MEMORY_ACCESS
        ctx = self.ctx
        if ctx is None or ctx.stream is None:
            return BAD_ARGUMENT
        headers = decode_pairs(raw_headers)
        if headers is None or not 200 <= status <= 599:
            return BAD_ARGUMENT
        headers = [
            (name.lower(), value)
            for name, value in headers
            if not name.startswith(b":") and not _bad_header(name, value)
        ]
        if grpc != U32:  # -1: no gRPC status
            headers.append((b"grpc-status", str(grpc).encode()))
        ctx.stream.send_local_reply(ctx, status, headers, body, details)
        return OK

    def proxy_get_status(self, ret_code, ret_ptr, ret_size):
        """The callout's HTTP status during proxy_on_http_call_response (0: it failed); else 0."""
        mem = self.mem
        if not mem.write_u32(ret_code, self.input.status):
            return INVALID_MEMORY_ACCESS
        return mem.give(b"", ret_ptr, ret_size)

    # -- env: HTTP callouts ------------------------------------------------------

    def proxy_http_call(self, upstream_ptr, upstream_size, headers_ptr, headers_size, body_ptr, body_size,
                        trailers_ptr, trailers_size, timeout_ms, ret_token):
        return self._http_call("proxy_http_call", upstream_ptr, upstream_size, headers_ptr, headers_size,
                               body_ptr, body_size, trailers_ptr, trailers_size, timeout_ms, ret_token)

    def proxy_dispatch_http_call(self, upstream_ptr, upstream_size, headers_ptr, headers_size, body_ptr,
                                 body_size, trailers_ptr, trailers_size, timeout_ms, ret_token):
        return self._http_call("proxy_dispatch_http_call", upstream_ptr, upstream_size, headers_ptr,
                               headers_size, body_ptr, body_size, trailers_ptr, trailers_size, timeout_ms,
                               ret_token)

    def _http_call(self, name, upstream_ptr, upstream_size, headers_ptr, headers_size, body_ptr, body_size,
                   trailers_ptr, trailers_size, timeout_ms, ret_token):
        """Start a callout; the token goes to ret_token (0 first, as cpp-host, to check the pointer).

        BadArgument: an unknown upstream (neither an `upstream` block nor a
        literal ip:port), headers that do not parse or lack :method, :path or
        :authority.  Trailers are accepted and dropped (HTTP/1.1 callouts).
        """
        runtime = self.vm.runtime
        if runtime is None or runtime.http_dispatcher is None:  # no worker loop to run it on
            return self._unsupported(name, Status.INTERNAL_FAILURE)
        mem = self.mem
        upstream = mem.read(upstream_ptr, upstream_size)
        raw_headers = mem.read(headers_ptr, headers_size)
        body = mem.read(body_ptr, body_size)
        raw_trailers = mem.read(trailers_ptr, trailers_size)
        if upstream is None or raw_headers is None or body is None or raw_trailers is None:
            return INVALID_MEMORY_ACCESS
        if not mem.write_u32(ret_token, 0):
            return INVALID_MEMORY_ACCESS
        headers = decode_pairs(raw_headers)
        ctx = self.ctx
        if headers is None or decode_pairs(raw_trailers) is None or ctx is None:
            return BAD_ARGUMENT
        headers = [(key.lower(), value) for key, value in headers]
        if not _REQUIRED_PSEUDO <= {key for key, _ in headers} or any(_bad_header(k, v) for k, v in headers):
            return BAD_ARGUMENT
        try:
            target = upstream.decode("ascii")
        except UnicodeDecodeError:
            return BAD_ARGUMENT
        token = runtime.http_calls.dispatch(ctx, target, headers, body, timeout_ms)
        if isinstance(token, Status):
            if token == BAD_ARGUMENT and f"upstream {target}" not in self.warned:
                self.warned.add(f"upstream {target}")
                self.log.warn(f'{self.label()}: {name}: unknown upstream "{target}" (an upstream block or ip:port)')
            return token
        mem.write_u32(ret_token, token)
        return OK

    def _unsupported(self, name: str, status: int) -> int:
        if name not in self.warned:
            self.warned.add(name)
            self.log.warn(f"{self.label()}: {name} is not supported yet, answering status {int(status)}")
        return status

    # -- env: properties -------------------------------------------------------

    def proxy_get_property(self, path_ptr, path_size, ret_ptr, ret_size):
        mem = self.mem
        path = mem.read(path_ptr, path_size)
        if path is None:
            return INVALID_MEMORY_ACCESS
        value = properties.get(self.ctx, path)
        if value is None:
            return NOT_FOUND
        return mem.give(value, ret_ptr, ret_size)

    def proxy_set_property(self, path_ptr, path_size, value_ptr, value_size):
        mem = self.mem
        path = mem.read(path_ptr, path_size)
        value = mem.read(value_ptr, value_size)
        if path is None or value is None:
            return INVALID_MEMORY_ACCESS
        if self.ctx is None:
            return BAD_ARGUMENT
        properties.put(self.ctx, path, value)
        return OK

    # -- env: shared data, queues, metrics (per worker, see shared.py) ---------

    def proxy_get_shared_data(self, key_ptr, key_size, ret_ptr, ret_size, ret_cas):
        mem = self.mem
        key = mem.read(key_ptr, key_size)
        if key is None or not mem.writable((ret_cas, 4)):
            return INVALID_MEMORY_ACCESS
        found = self.vm.shared.get_data(self.vm.vm_id, key)
        if found is None:
            return NOT_FOUND
        value, cas = found
        status = mem.give(value, ret_ptr, ret_size)
        if status == OK:
            mem.write_u32(ret_cas, cas)
        return status

    def proxy_set_shared_data(self, key_ptr, key_size, value_ptr, value_size, cas):
        mem = self.mem
        key = mem.read(key_ptr, key_size)
        value = mem.read(value_ptr, value_size)
        if key is None or value is None:
            return INVALID_MEMORY_ACCESS
        return self.vm.shared.set_data(self.vm.vm_id, key, value, cas)

    def proxy_register_shared_queue(self, name_ptr, name_size, ret_id):
        mem = self.mem
        name = mem.read(name_ptr, name_size)
        if name is None or not mem.writable((ret_id, 4)):
            return INVALID_MEMORY_ACCESS
        ctx = self.ctx
        if ctx is None:
            return BAD_ARGUMENT
        queue_id = self.vm.shared.register_queue(self.vm.vm_id, name, ctx.root)
        mem.write_u32(ret_id, queue_id)
        return OK

    def proxy_resolve_shared_queue(self, vm_id_ptr, vm_id_size, name_ptr, name_size, ret_id):
        mem = self.mem
        vm_id = mem.read(vm_id_ptr, vm_id_size)
        name = mem.read(name_ptr, name_size)
        if vm_id is None or name is None or not mem.writable((ret_id, 4)):
            return INVALID_MEMORY_ACCESS
        queue_id = self.vm.shared.resolve_queue(vm_id.decode("utf-8", "replace") or self.vm.vm_id, name)
        if queue_id is None:
            return NOT_FOUND
        mem.write_u32(ret_id, queue_id)
        return OK

    def proxy_enqueue_shared_queue(self, queue_id, data_ptr, data_size):
        data = self.mem.read(data_ptr, data_size)
        if data is None:
            return INVALID_MEMORY_ACCESS
        return self.vm.shared.enqueue(queue_id, data)

    def proxy_dequeue_shared_queue(self, queue_id, ret_ptr, ret_size):
        mem = self.mem
        if not mem.writable((ret_ptr, 4), (ret_size, 4)):
            return INVALID_MEMORY_ACCESS
        found = self.vm.shared.dequeue(queue_id)
        if isinstance(found, Status):
            return found
        return mem.give(found, ret_ptr, ret_size)

    def proxy_define_metric(self, metric_type, name_ptr, name_size, ret_id):
        mem = self.mem
        name = mem.read(name_ptr, name_size)
        if name is None or not mem.writable((ret_id, 4)):
            return INVALID_MEMORY_ACCESS
        if metric_type > MetricType.HISTOGRAM:
            return BAD_ARGUMENT
        mem.write_u32(ret_id, self.vm.shared.define_metric(metric_type, name))
        return OK

    def proxy_increment_metric(self, metric_id, delta):
        return self.vm.shared.increment_metric(metric_id, delta)

    def proxy_record_metric(self, metric_id, value):
        return self.vm.shared.record_metric(metric_id, value & 0xFFFFFFFFFFFFFFFF)

    def proxy_get_metric(self, metric_id, ret_value):
        mem = self.mem
        if not mem.writable((ret_value, 8)):
            return INVALID_MEMORY_ACCESS
        found = self.vm.shared.get_metric(metric_id)
        if isinstance(found, Status):
            return found
        mem.write_u64(ret_value, found)
        return OK

    # -- env: emscripten extras ------------------------------------------------

    def emscripten_notify_memory_growth(self, index):
        return None

    def pthread_equal(self, a, b):
        return 1 if a == b else 0

    # -- WASI ----------------------------------------------------------------

    def wasi_args_sizes_get(self, ret_count, ret_size):
        mem = self.mem
        if not mem.writable((ret_count, 4), (ret_size, 4)):
            return Errno.FAULT
        mem.write_u32(ret_count, 0)
        mem.write_u32(ret_size, 0)
        return Errno.SUCCESS

    def wasi_args_get(self, argv, argv_buf):
        return Errno.SUCCESS

    wasi_environ_sizes_get = wasi_args_sizes_get
    wasi_environ_get = wasi_args_get

    def wasi_clock_res_get(self, clock_id, ret):
        if clock_id > 3:
            return Errno.INVAL
        return Errno.SUCCESS if self.mem.write_u64(ret, 1000) else Errno.FAULT

    _CLOCKS = (time.time_ns, time.monotonic_ns, time.process_time_ns, time.thread_time_ns)

    def wasi_clock_time_get(self, clock_id, precision, ret):
        if clock_id > 3:
            return Errno.INVAL
        now = self._CLOCKS[clock_id]()
        return Errno.SUCCESS if self.mem.write_u64(ret, now) else Errno.FAULT

    def wasi_fd_write(self, fd, iovs, iovs_len, ret_written):
        mem = self.mem
        raw = mem.read(iovs, 8 * iovs_len)
        if raw is None:
            return Errno.FAULT
        chunks = []
        for buf_ptr, buf_len in struct.iter_unpack("<II", raw):
            data = mem.read(buf_ptr, buf_len)
            if data is None:
                return Errno.FAULT
            chunks.append(data)
        data = b"".join(chunks)
        if fd not in (1, 2):
            return Errno.BADF
        if not mem.write_u32(ret_written, len(data)):
            return Errno.FAULT
        pending = self.output[fd] + data
        *lines, rest = pending.split(b"\n")
        for line in lines:
            self._emit(fd, line)
        if len(rest) > _MAX_OUTPUT_LINE:
            self._emit(fd, rest)
            rest = b""
        self.output[fd] = rest
        return Errno.SUCCESS

    def wasi_fd_read(self, fd, iovs, iovs_len, ret_read):
        if fd != 0:
            return Errno.BADF
        return Errno.SUCCESS if self.mem.write_u32(ret_read, 0) else Errno.FAULT  # EOF

    def wasi_fd_close(self, fd):
        return Errno.SUCCESS if fd <= 2 else Errno.BADF

    def wasi_fd_fdstat_get(self, fd, ret):
        if fd > 2:
            return Errno.BADF
        return Errno.SUCCESS if self.mem.write(ret, _FDSTAT_STDIO) else Errno.FAULT

    def wasi_fd_fdstat_set_flags(self, fd, flags):
        return Errno.SUCCESS if fd <= 2 else Errno.BADF

    def wasi_fd_prestat_get(self, fd, ret):
        return Errno.BADF  # no preopened directories

    def wasi_fd_prestat_dir_name(self, fd, path, path_len):
        return Errno.BADF

    def wasi_fd_seek(self, fd, offset, whence, ret):
        return Errno.SPIPE if fd <= 2 else Errno.BADF

    def wasi_poll_oneoff(self, subs, events, nsubs, ret_nevents):
        """Every subscription fires at once: a worker must not sleep inside a filter."""
        if nsubs == 0:
            return Errno.INVAL
        mem = self.mem
        raw = mem.read(subs, 48 * nsubs)
        if raw is None or not mem.writable((events, 32 * nsubs), (ret_nevents, 4)):
            return Errno.FAULT
        out = b"".join(
            struct.pack("<QHB5xQH6x", *struct.unpack_from("<Q", raw, 48 * i), 0, raw[48 * i + 8], 0, 0)
            for i in range(nsubs)
        )
        mem.write(events, out)
        mem.write_u32(ret_nevents, nsubs)
        return Errno.SUCCESS

    def wasi_proc_exit(self, code):
        raise GuestExit(code)

    def wasi_proc_raise(self, signal):
        raise GuestAbort(f"proc_raise({signal})")

    def wasi_sched_yield(self):
        return Errno.SUCCESS

    def wasi_random_get(self, buf, size):
        if not self.mem.writable((buf, size)):
            return Errno.FAULT
        self.mem.write(buf, os.urandom(size))
        return Errno.SUCCESS
