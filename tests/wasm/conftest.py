"""Fixtures for the wasm tests: small WAT filters, a real Runtime, a real error log.

`Wat` builds a proxy-wasm module in WebAssembly text: a prelude (imports,
memory, a bump allocator, the ABI marker, log helpers) plus the callbacks a
test writes.  Callbacks the test does not write get defaults that log their
name and context id through proxy_log, so the error log records the order of
every callback.

Memory map of a test module: 0x10/0x14 = the (ptr, size) out-params RET_PTR
and RET_SIZE, 0x18 = a u32 out-param, 0x20 = a u64 out-param, 0x100.. =
scratch for formatted log lines, 0x1000.. = string constants (`Wat.s()`),
0x10000.. = heap (proxy_on_memory_allocate / malloc).
"""

from __future__ import annotations

import re
import time

import pytest
import wasmtime

from forkgw.conf.model import FilterRef, Wasm, WasmModule
from forkgw.log import ErrorLog
from forkgw.wasm import Runtime, StreamInfo, compile_modules
from watlib import BUMP_ALLOCATOR, ITOA, Constants

ENV_IMPORTS = {
    "proxy_log": "(param i32 i32 i32) (result i32)",
    "proxy_get_log_level": "(param i32) (result i32)",
    "proxy_get_current_time_nanoseconds": "(param i32) (result i32)",
    "proxy_set_tick_period_milliseconds": "(param i32) (result i32)",
    "proxy_set_effective_context": "(param i32) (result i32)",
    "proxy_done": "(result i32)",
    "proxy_get_buffer_bytes": "(param i32 i32 i32 i32 i32) (result i32)",
    "proxy_get_buffer_status": "(param i32 i32 i32) (result i32)",
    "proxy_set_buffer_bytes": "(param i32 i32 i32 i32 i32) (result i32)",
    "proxy_get_header_map_size": "(param i32 i32) (result i32)",
    "proxy_get_header_map_pairs": "(param i32 i32 i32) (result i32)",
    "proxy_set_header_map_pairs": "(param i32 i32 i32) (result i32)",
    "proxy_get_header_map_value": "(param i32 i32 i32 i32 i32) (result i32)",
    "proxy_add_header_map_value": "(param i32 i32 i32 i32 i32) (result i32)",
    "proxy_replace_header_map_value": "(param i32 i32 i32 i32 i32) (result i32)",
    "proxy_remove_header_map_value": "(param i32 i32 i32) (result i32)",
    "proxy_continue_stream": "(param i32) (result i32)",
    "proxy_close_stream": "(param i32) (result i32)",
    "proxy_send_local_response": "(param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)",
    "proxy_get_property": "(param i32 i32 i32 i32) (result i32)",
    "proxy_set_property": "(param i32 i32 i32 i32) (result i32)",
    "proxy_http_call": "(param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)",
    "proxy_grpc_call": "(param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)",
    "proxy_get_shared_data": "(param i32 i32 i32 i32 i32) (result i32)",
    "proxy_set_shared_data": "(param i32 i32 i32 i32 i32) (result i32)",
    "proxy_define_metric": "(param i32 i32 i32 i32) (result i32)",
    "proxy_increment_metric": "(param i32 i64) (result i32)",
    "proxy_record_metric": "(param i32 i64) (result i32)",
    "proxy_get_metric": "(param i32 i32) (result i32)",
    "proxy_register_shared_queue": "(param i32 i32 i32) (result i32)",
    "proxy_resolve_shared_queue": "(param i32 i32 i32 i32 i32) (result i32)",
    "proxy_enqueue_shared_queue": "(param i32 i32 i32) (result i32)",
    "proxy_dequeue_shared_queue": "(param i32 i32 i32) (result i32)",
    "proxy_call_foreign_function": "(param i32 i32 i32 i32 i32 i32) (result i32)",
    "proxy_get_configuration": "(param i32 i32) (result i32)",
    "proxy_continue_request": "(result i32)",
    "proxy_continue_response": "(result i32)",
    "proxy_clear_route_cache": "(result i32)",
    "proxy_get_status": "(param i32 i32 i32) (result i32)",
    "pthread_equal": "(param i32 i32) (result i32)",
    "emscripten_notify_memory_growth": "(param i32)",
}

WASI_IMPORTS = {
    "fd_write": "(param i32 i32 i32 i32) (result i32)",
    "proc_exit": "(param i32)",
    "clock_time_get": "(param i32 i64 i32) (result i32)",
    "random_get": "(param i32 i32) (result i32)",
    "environ_sizes_get": "(param i32 i32) (result i32)",
    "args_sizes_get": "(param i32 i32) (result i32)",
    "fd_fdstat_get": "(param i32 i32) (result i32)",
    "poll_oneoff": "(param i32 i32 i32 i32) (result i32)",
    "sched_yield": "(result i32)",
    "fd_prestat_get": "(param i32 i32) (result i32)",
    "path_open": "(param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)",
}

PRELUDE = r"""
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 0x10000))
  (func $alloc """ + BUMP_ALLOCATOR + ITOA + r"""  ;; log "tag=<n>" at info
  (func $log_num (param $tag i32) (param $tag_len i32) (param $n i32)
    (memory.copy (i32.const 0x100) (local.get $tag) (local.get $tag_len))
    (i32.store8 (i32.add (i32.const 0x100) (local.get $tag_len)) (i32.const 61))
    (drop (call $proxy_log (i32.const 2) (i32.const 0x100)
      (i32.add (i32.add (local.get $tag_len) (i32.const 1))
        (call $itoa (local.get $n) (i32.add (i32.const 0x101) (local.get $tag_len)))))))
  ;; log a constant string at info
  (func $log (param $ptr i32) (param $len i32)
    (drop (call $proxy_log (i32.const 2) (local.get $ptr) (local.get $len))))
  ;; log "tag:" followed by the bytes the host returned in RET_PTR/RET_SIZE
  (func $log_ret (param $tag i32) (param $tag_len i32)
    (local $size i32)
    (local.set $size (i32.load (i32.const 0x14)))
    (memory.copy (i32.const 0x100) (local.get $tag) (local.get $tag_len))
    (i32.store8 (i32.add (i32.const 0x100) (local.get $tag_len)) (i32.const 58))
    (memory.copy (i32.add (i32.const 0x101) (local.get $tag_len)) (i32.load (i32.const 0x10)) (local.get $size))
    (drop (call $proxy_log (i32.const 2) (i32.const 0x100)
      (i32.add (i32.add (local.get $tag_len) (i32.const 1)) (local.get $size)))))
"""

# (export name, params (0.2.x), params (0.1.0), result) of the defaults
DEFAULT_CALLBACKS = [
    ("proxy_on_context_create", 2, 2, None),
    ("proxy_on_vm_start", 2, 2, 1),
    ("proxy_on_configure", 2, 2, 1),
    ("proxy_on_request_headers", 3, 2, 0),
    ("proxy_on_response_headers", 3, 2, 0),
    ("proxy_on_done", 1, 1, 1),
    ("proxy_on_log", 1, 1, None),
    ("proxy_on_delete", 1, 1, None),
]


class Wat(Constants):
    """A test filter in WAT: `s()` places string constants, `build()` assembles the module."""

    def __init__(self, abi: str = "0_2_1"):
        super().__init__()
        self.abi = abi

    def text(self, body: str = "", defaults: bool = True, imports: str | None = None, prelude: bool = True) -> str:
        parts = ["(module"]
        if imports is None:
            parts += [f'  (import "env" "{n}" (func ${n} {t}))' for n, t in ENV_IMPORTS.items()]
            parts += [
                f'  (import "wasi_snapshot_preview1" "{n}" (func $wasi_{n} {t}))' for n, t in WASI_IMPORTS.items()
            ]
        else:
            parts.append(imports)
        if prelude:
            parts.append(PRELUDE)
            parts.append('  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (call $alloc (local.get 0)))')
        parts.append(f'  (func (export "proxy_abi_version_{self.abi}"))')
        if defaults:
            for name, params, params010, result in DEFAULT_CALLBACKS:
                if f'"{name}"' in body:
                    continue
                count = params010 if self.abi == "0_1_0" else params
                short = name[len("proxy_on_"):]
                ret = " (result i32)" if result is not None else ""
                value = f" (i32.const {result})" if result is not None else ""
                parts.append(
                    f'  (func (export "{name}") (param{" i32" * count}){ret}'
                    f" (call $log_num {self.s(short)} (local.get 0)){value})"
                )
        parts.append(body)
        parts.extend(self.segments())
        parts.append(")")
        return "\n".join(parts)

    def build(self, body: str = "", **kw) -> bytes:
        return wasmtime.wat2wasm(self.text(body, **kw))


def pairs_bytes(pairs: list[tuple[bytes, bytes]]) -> bytes:
    from forkgw.wasm.abi import encode_pairs

    return encode_pairs(pairs)


class Harness:
    """A real Runtime over real compiled modules, logging to a real file."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.log_path = str(tmp_path / "error.log")
        self.runtimes: list[Runtime] = []
        self.count = 0

    def wasm(self, modules: dict[str, bytes], **kw) -> Wasm:
        conf = Wasm(**kw)
        for name, data in modules.items():
            self.count += 1
            path = self.tmp_path / f"{name}-{self.count}.wasm"
            path.write_bytes(data)
            conf.modules[name] = WasmModule(name=name, path=str(path), where=f"gateway.conf:{self.count}")
        return conf

    def runtime(
        self,
        module: bytes | dict[str, bytes],
        filters: list[FilterRef] | None = None,
        level: str = "info",
        vm_config: str = "",
        start: bool = True,
        http_dispatcher=None,
        wakeup=None,
        **kw,
    ) -> Runtime:
        modules = module if isinstance(module, dict) else {"f": module}
        conf = self.wasm(modules, **kw)
        for mod in conf.modules.values():
            mod.vm_config = vm_config
        compiled = compile_modules(conf)
        runtime = Runtime(conf, compiled, ErrorLog(self.log_path, level), http_dispatcher=http_dispatcher,
                          wakeup=wakeup)
        self.runtimes.append(runtime)
        runtime.filters = filters if filters is not None else [FilterRef(module=name) for name in modules]
        if start:
            runtime.start(runtime.filters)
        return runtime

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def messages(self, level: str | None = None, exclude: str | None = None) -> list[str]:
        """The message part of each log line (after 'PID#0: ') at `level` (or any but `exclude`)."""
        out = []
        for line in self.log().splitlines():
            m = re.match(r"\S+ \S+ \[(\w+)\] \d+#0: (.*)", line)
            if m and (level is None or m.group(1) == level) and m.group(1) != exclude:
                out.append(m.group(2))
        return out

    def guest_lines(self) -> list[str]:
        """What filters logged: the text after 'wasm "..." root_id "...": '."""
        out = []
        for msg in self.messages(exclude="notice"):
            m = re.match(r'(?:\*\d+ )?wasm "[^"]*"(?: root_id "[^"]*")?: (.*)', msg)
            if m:
                out.append(m.group(1))
        return out

    def close(self):
        for runtime in self.runtimes:
            runtime.close()


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def info(**kw) -> StreamInfo:
    base = dict(
        source=("192.0.2.7", 51234),
        destination=("127.0.0.1", 8080),
        connection_id=42,
        request_id="req-1",
        start_time=time.time(),
    )
    base.update(kw)
    return StreamInfo(**base)


REQUEST = [
    (b":method", b"GET"),
    (b":path", b"/a/b?x=1&y=2"),
    (b":authority", b"example.com"),
    (b":scheme", b"http"),
    (b"user-agent", b"curl/8"),
    (b"accept", b"*/*"),
    (b"x-multi", b"one"),
    (b"x-multi", b"two"),
]

RESPONSE = [(b"content-type", b"text/plain"), (b"content-length", b"5")]


def run_request(runtime, filters=None, headers=None, **kw):
    """One full exchange: request headers, response headers, finish; returns the stream and replies."""
    stream = runtime.stream(filters if filters is not None else runtime.filters, info(**kw))
    r1 = stream.on_request_headers(list(headers or REQUEST), True)
    r2 = None
    if r1 is None:
        r2 = stream.on_response_headers(200, list(RESPONSE), False)
    stream.finish()
    return stream, r1, r2




def on(export: str, code: str, abi: str = "0_2_1") -> str:
    """A callback export running `code`; stream/bool callbacks then return 0/1 (Continue/true)."""
    params = {
        "proxy_on_request_headers": 2 if abi == "0_1_0" else 3,
        "proxy_on_response_headers": 2 if abi == "0_1_0" else 3,
        "proxy_on_vm_start": 2,
        "proxy_on_configure": 2,
        "proxy_on_context_create": 2,
        "proxy_on_tick": 1,
        "proxy_on_queue_ready": 2,
        "proxy_on_done": 1,
        "proxy_on_log": 1,
        "proxy_on_delete": 1,
    }[export]
    result = {
        "proxy_on_request_headers": "0",
        "proxy_on_response_headers": "0",
        "proxy_on_vm_start": "1",
        "proxy_on_configure": "1",
        "proxy_on_done": "1",
    }.get(export)
    ret = " (result i32)" if result is not None else ""
    tail = f" (i32.const {result})" if result is not None else ""
    return f'  (func (export "{export}") (param{" i32" * params}){ret}\n    {code}{tail})'
