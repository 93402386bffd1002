"""Fuzzing the host functions: every import, called with arguments a filter could make up.

One WAT module imports every host function the host provides (env and WASI, with
the types the host serves) and calls the one the request header "x-fuzz-q" (request
phase) or "x-fuzz-s" (response phase) names, with the ten argument slots that follow
(u32 index, then 10 x u64; an i32 parameter takes the low half of its slot).  It then
reports what the call returned in the header "x-status".  Hypothesis picks the
function and the arguments: pointers inside, across and past the memory, sizes up to
0xFFFFFFFF, enum values in and out of range.

Properties: every call returns (a status, or nothing for a void import); nothing is
raised in Python and nothing reaches the log at [crit] (a host function that fails
inside is a host bug); the VM is never failed, so the next request uses the same VM.

Only deliberate traps are left out: proc_exit, proc_raise and abort end the guest by
design.  The constants the module needs are copied in from passive data segments
before each use, since a fuzzed call may write anywhere in the guest's memory.
"""

from __future__ import annotations

import re
import struct
import time

import pytest
import wasmtime
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkgw.conf.model import FilterRef, Wasm, WasmModule
from forkgw.log import ErrorLog
from watlib import BUMP_ALLOCATOR, ITOA
from forkgw.wasm import LocalReply, Runtime, StreamInfo, compile_modules
from forkgw.wasm import host as host_table

DELIBERATE_TRAPS = {"proc_exit", "proc_raise", "abort"}
STUB_TYPE = "iiii:i"  # unimplemented calls accept any declared type
SLOTS = 10
TYPES = {"i": "i32", "I": "i64"}
WASI = "wasi_snapshot_preview1"


def host_functions() -> list[tuple[str, str, str]]:
    """(import module, name, signature) of every function the host provides."""
    env = dict(getattr(host_table, "ENV_IMPLEMENTED", {}))
    for name in getattr(host_table, "ENV_STUBS", {}):
        env.setdefault(name, STUB_TYPE)
    wasi = dict(getattr(host_table, "WASI_IMPLEMENTED", {}))
    for name in getattr(host_table, "WASI_STUBS", {}):
        wasi.setdefault(name, STUB_TYPE)
    funcs = [("env", n, sig) for n, sig in sorted(env.items())]
    funcs += [(WASI, n, sig) for n, sig in sorted(wasi.items())]
    return [f for f in funcs if f[1] not in DELIBERATE_TRAPS]


FUNCS = host_functions()
REQUIRED = {"proxy_get_header_map_value", "proxy_replace_header_map_value", "proxy_set_effective_context"}


def import_name(module: str, name: str) -> str:
    return f"$f_{'w' if module == WASI else 'e'}_{name}"


def build_module() -> bytes:
    imports, cases = [], []
    for index, (module, name, sig) in enumerate(FUNCS):
        params, results = sig.split(":")
        decl = "".join(f" (param {TYPES[p]})" for p in params) + "".join(f" (result {TYPES[r]})" for r in results)
        imports.append(f'  (import "{module}" "{name}" (func {import_name(module, name)}{decl}))')
        args = " ".join(
            f"(i64.load offset={8 * i} (local.get $a))" if p == "I" else f"(i32.load offset={8 * i} (local.get $a))"
            for i, p in enumerate(params))
        call = f"(call {import_name(module, name)} {args})"
        if not results:
            body = f"{call} (return (i32.const 0))"
        elif results == "I":
            body = f"(return (i32.wrap_i64 {call}))"
        else:
            body = f"(return {call})"
        cases.append(f"    (if (i32.eq (local.get $idx) (i32.const {index})) (then {body}))")
    get_value = import_name("env", "proxy_get_header_map_value")
    replace = import_name("env", "proxy_replace_header_map_value")
    effective = import_name("env", "proxy_set_effective_context")
    return wasmtime.wat2wasm("(module\n" + "\n".join(imports) + f"""
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 0x10000))
  (data $fuzz_q "x-fuzz-q")
  (data $fuzz_s "x-fuzz-s")
  (data $status "x-status")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") {BUMP_ALLOCATOR}{ITOA}  ;; the call at `idx` with the argument slots at `a`
  (func $dispatch (param $idx i32) (param $a i32) (result i32)
{chr(10).join(cases)}
    (i32.const -1))
  (func $run (param $ctx i32) (param $map i32)
    (local $ptr i32) (local $result i32)
    (global.set $heap (i32.const 0x10000))
    (if (local.get $map)
      (then (memory.init $fuzz_s (i32.const 0x100) (i32.const 0) (i32.const 8)))
      (else (memory.init $fuzz_q (i32.const 0x100) (i32.const 0) (i32.const 8))))
    (if (call {get_value} (i32.const 0) (i32.const 0x100) (i32.const 8) (i32.const 0x10) (i32.const 0x14))
      (then (return)))
    (if (i32.lt_u (i32.load (i32.const 0x14)) (i32.const {4 + 8 * SLOTS})) (then (return)))
    (local.set $ptr (i32.load (i32.const 0x10)))
    (local.set $result (call $dispatch (i32.load (local.get $ptr)) (i32.add (local.get $ptr) (i32.const 4))))
    (drop (call {effective} (local.get $ctx)))
    (memory.init $status (i32.const 0x120) (i32.const 0) (i32.const 8))
    (drop (call {replace} (local.get $map) (i32.const 0x120) (i32.const 8)
            (i32.const 0x140) (call $itoa (local.get $result) (i32.const 0x140)))))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (call $run (local.get $ctx) (i32.const 0)) (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param i32 i32) (result i32)
    (call $run (local.get $ctx) (i32.const 2)) (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))
)""")


class Fuzz:
    """A real Runtime over the fuzz module, logging to a real file read incrementally."""

    def __init__(self, tmp):
        path = tmp / "fuzz.wasm"
        path.write_bytes(build_module())
        conf = Wasm()
        conf.modules["fuzz"] = WasmModule(name="fuzz", path=str(path), where="fuzz.conf:1")
        self.log_path = tmp / "error.log"
        self.runtime = Runtime(conf, compile_modules(conf), ErrorLog(str(self.log_path), "info"))
        self.filters = [FilterRef(module="fuzz")]
        self.runtime.start(self.filters)
        self.offset = 0
        self.count = 0

    def new_log(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        return data.decode("utf-8", "replace")

    def stream(self):
        self.count += 1
        info = StreamInfo(source=("192.0.2.1", 40000), destination=("127.0.0.1", 8080),
                          connection_id=self.count, request_id=f"fuzz-{self.count}", start_time=time.time())
        return self.runtime.stream(self.filters, info)


REQUEST = [(b":method", b"GET"), (b":path", b"/fuzz?x=1"), (b":authority", b"fuzz.test"), (b":scheme", b"http"),
           (b"user-agent", b"fuzz"), (b"x-multi", b"one"), (b"x-multi", b"two")]
RESPONSE = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
STATUSES = {0, 1, 2, 3, 4, 6, 7, 8, 10, 12}  # proxy-wasm Status
ERRNOS = {0, 8, 21, 28, 52, 58, 70, 76}  # WASI errno the host answers
ANSWERS = STATUSES | ERRNOS | {1}  # pthread_equal: 0 or 1


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    harness = Fuzz(tmp_path_factory.mktemp("fuzz"))
    yield harness
    harness.runtime.close()


def header_value(pairs, name: bytes) -> bytes | None:
    return next((v for k, v in pairs if k == name), None)


def run(fuzz: Fuzz, index: int, args: list[int], phase: str):
    """One request with the fuzz header; the call's answer, the stream's replies."""
    payload = struct.pack("<I", index) + b"".join(struct.pack("<Q", a & 0xFFFFFFFFFFFFFFFF) for a in args)
    stream = fuzz.stream()
    try:
        if phase == "request":
            reply = stream.on_request_headers(REQUEST + [(b"x-fuzz-q", payload)], True)
            answer = header_value(stream.request_headers, b"x-status")
        else:
            assert stream.on_request_headers(REQUEST + [(b"x-fuzz-s", payload)], True) is None
            reply = stream.on_response_headers(200, list(RESPONSE), False)
            answer = header_value(stream.response_headers, b"x-status")
    finally:
        stream.finish()
    return answer, reply


POINTERS = [0, 1, 3, 4, 7, 8, 0x10, 0x14, 0x100, 0x1000, 0xFFFC, 0x10000, 0x1FFF8, 0x1FFFC, 0x1FFFF,
            0x20000, 0x20004, 0x7FFFFFFF, 0x80000000, 0xFFFF0000, 0xFFFFFFF0, 0xFFFFFFFC, 0xFFFFFFFF]
slot = st.one_of(
    st.sampled_from(POINTERS),
    st.integers(0, 16),  # enum values, small sizes, context ids
    st.integers(0, 0x20000),  # anywhere in the memory
    st.integers(0, 0xFFFFFFFF),
    st.integers(-(2 ** 63), 2 ** 63 - 1),  # i64 parameters
)


def test_the_module_imports_every_host_function(fuzz):
    """The fuzz target covers the whole host table (a new host function is fuzzed too)."""
    names = {name for _, name, _ in FUNCS}
    assert REQUIRED <= names
    assert len(FUNCS) >= 60
    answer, reply = run(fuzz, FUNCS.index(("env", "proxy_get_log_level", "i:i")), [0x200] * SLOTS, "request")
    assert (answer, reply) == (b"0", None)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, len(FUNCS) - 1), args=st.lists(slot, min_size=SLOTS, max_size=SLOTS),
       phase=st.sampled_from(["request", "response"]))
def test_every_host_call_returns_a_status_and_the_vm_stays_usable(fuzz, index, args, phase):
    module, name, sig = FUNCS[index]
    answer, reply = run(fuzz, index, args, phase)
    log = fuzz.new_log()
    if name == "proxy_log" and args[0] & 0xFFFFFFFF == 5 and answer == b"0":
        # the filter itself logged at critical level: that one line is its own, not the host's
        assert len(re.findall(r"\[crit\]", log)) == 1, f"{name}{tuple(args)}: {log[-2000:]}"
        log = re.sub(r"[^\n]*\[crit\][^\n]*", "", log)
    assert not re.search(r"\[(crit|alert|emerg)\]", log), f"{name}{tuple(args)}: {log[-2000:]}"
    assert " failed: " not in log, f"{name}{tuple(args)} failed the VM: {log[-2000:]}"
    assert answer is not None, f"{name}{tuple(args)} in the {phase} phase: no answer (reply {reply})"
    value = int(answer)
    if sig.endswith(":i"):
        assert value in ANSWERS, f"{name}{tuple(args)} answered {value}"
    assert reply is None or (isinstance(reply, LocalReply) and reply.status != 500) or \
        name in ("proxy_send_local_response", "proxy_close_stream"), (name, args, reply)
    # the VM is the same and works: a plain request goes through untouched
    stream = fuzz.stream()
    assert stream.on_request_headers(list(REQUEST), True) is None
    assert stream.on_response_headers(200, list(RESPONSE), False) is None
    stream.finish()
    assert " failed: " not in fuzz.new_log()
