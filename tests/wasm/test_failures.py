"""Traps, timeouts, memory caps, boot failures, rebuilds: the worker lives on."""

import time

import pytest
import wasmtime

from forkgw.conf.model import FilterRef
from forkgw.wasm import WasmBootError
from forkgw.wasm import runtime as runtime_module
from forkgw.wasm import vm as vm_module

from .conftest import REQUEST, Wat, info, on, run_request

CRASH = [*REQUEST, (b"x-crash", b"1")]


def when_header(w: Wat, name: str, code: str) -> str:
    """Run `code` only when the request has header `name`."""
    return f"(if (i32.eqz (call $proxy_get_header_map_value (i32.const 0) {w.s(name)} (i32.const 16) (i32.const 20))) (then {code}))"


def crasher(export="proxy_on_request_headers") -> bytes:
    w = Wat()
    return w.build(on(export, when_header(w, "x-crash", "unreachable")))


def test_trap_answers_500_and_the_next_stream_gets_a_rebuilt_vm(h):
    rt = h.runtime(crasher())
    stream, reply, _ = run_request(rt, headers=CRASH)
    assert (reply.status, reply.headers, reply.body) == (500, [], b"")
    errors = h.messages("error")
    assert errors == ['*42 wasm "f" root_id "f": proxy_on_request_headers failed: '
                      "wasm trap: wasm `unreachable` instruction executed; the VM is discarded and will be rebuilt"]
    assert any("wasm backtrace" in m for m in h.messages("info"))
    assert "done=2" not in h.guest_lines()  # never call into the failed instance again
    before = len(h.guest_lines())
    _, r1, r2 = run_request(rt)
    assert r1 is None and r2 is None
    assert 'wasm "f": VM rebuilt after a failure (rebuild #1)' in h.messages("notice")
    assert h.guest_lines()[before:] == [
        "context_create=1", "vm_start=1", "configure=1",  # a new VM: new root context, vm_start again
        "context_create=2", "response_headers=2", "done=2", "log=2", "delete=2",
    ]


def test_on_error_continue_skips_the_failed_filter(h):
    rt = h.runtime({"crash": crasher(), "next": Wat().build()},
                   filters=[FilterRef(module="crash", on_error="continue"), FilterRef(module="next")])
    stream, r1, r2 = run_request(rt, headers=CRASH)
    assert r1 is None and r2 is None
    assert '*42 wasm "next" root_id "next": request_headers=2' in h.messages()
    assert not any(m.startswith('*42 wasm "crash" root_id "crash": response_headers') for m in h.messages())
    assert 'wasm "crash" root_id "crash": proxy_on_request_headers failed:' in h.log()


def test_endless_loop_is_interrupted_within_the_timeout(h):
    w = Wat()
    rt = h.runtime(w.build(on("proxy_on_request_headers", when_header(w, "x-crash", "(loop $l (br $l))"))),
                   callback_timeout=0.05)
    started = time.monotonic()
    _, reply, _ = run_request(rt, headers=CRASH)
    elapsed = time.monotonic() - started
    assert reply.status == 500
    assert 0.05 <= elapsed < 1.0
    assert "proxy_on_request_headers failed: timed out after 50 ms (wasm trap: interrupt)" in h.log()
    _, r1, _ = run_request(rt)  # the rebuilt VM serves
    assert r1 is None


def test_memory_bomb_is_capped(h):
    w = Wat()
    bomb = f"""(loop $grow
        (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1))
          (then (call $log_num {w.s("pages")} (memory.size)) unreachable))
        (br $grow))"""
    rt = h.runtime(w.build(on("proxy_on_request_headers", when_header(w, "x-crash", bomb))), memory_max=4 * 1024 * 1024)
    _, reply, _ = run_request(rt, headers=CRASH)
    assert reply.status == 500
    pages = int(next(line for line in h.guest_lines() if line.startswith("pages=")).split("=")[1])
    assert pages * 65536 <= 4 * 1024 * 1024
    assert f"(memory near its limit: {pages * 65536} of 4194304 bytes)" in h.log()


def test_failed_allocation_is_reported_not_raised(h):
    """The guest allocator returning 0: the hostcall answers InvalidMemoryAccess (no Python error)."""
    w = Wat()
    imports = "\n".join(f'  (import "env" "{n}" (func ${n} {t}))' for n, t in (
        ("proxy_log", "(param i32 i32 i32) (result i32)"),
        ("proxy_get_header_map_pairs", "(param i32 i32 i32) (result i32)"),
    ))
    body = on("proxy_on_request_headers", f"(call $log_num {w.s('st')} (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 16) (i32.const 20)))")
    text = w.text(body, imports=imports).replace(
        '(func (export "proxy_on_memory_allocate") (param i32) (result i32) (call $alloc (local.get 0)))',
        '(func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 0))')
    rt = h.runtime(wasmtime.wat2wasm(text))
    _, r1, _ = run_request(rt)
    assert r1 is None
    assert "st=6" in h.guest_lines()


def test_trap_in_the_allocator_fails_the_filter(h):
    w = Wat()
    body = on("proxy_on_request_headers", "(drop (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 16) (i32.const 20)))")
    text = w.text(body).replace(
        '(func (export "proxy_on_memory_allocate") (param i32) (result i32) (call $alloc (local.get 0)))',
        '(func (export "proxy_on_memory_allocate") (param i32) (result i32) (call $wasi_proc_exit (i32.const 70)) (i32.const 0))')
    rt = h.runtime(wasmtime.wat2wasm(text))
    _, reply, _ = run_request(rt)
    assert reply.status == 500
    assert "proxy_on_request_headers failed: proc_exit(70)" in h.log()


def test_trap_in_response_headers_and_in_context_create(h):
    rt = h.runtime(crasher("proxy_on_response_headers"))
    stream = rt.stream(rt.filters, info())
    assert stream.on_request_headers(list(CRASH), True) is None
    reply = stream.on_response_headers(200, [], False)
    assert reply.status == 500
    stream.finish()
    w = Wat()
    rt = h.runtime(w.build(on("proxy_on_context_create", "(if (local.get 1) (then unreachable))")))
    _, reply, _ = run_request(rt)
    assert reply.status == 500
    assert "proxy_on_context_create failed" in h.log()


def test_trap_during_finish_is_contained(h):
    w = Wat()
    rt = h.runtime(w.build(on("proxy_on_log", "unreachable")))
    stream, r1, r2 = run_request(rt)
    assert r1 is None and r2 is None
    assert "proxy_on_log failed" in h.log()
    assert "delete=2" not in h.guest_lines()
    stream, r1, _ = run_request(rt)
    assert r1 is None  # served by the rebuilt VM


def test_a_failure_reaches_other_streams_in_flight(h):
    rt = h.runtime(crasher())
    s1 = rt.stream(rt.filters, info(connection_id=1))
    assert s1.on_request_headers(list(REQUEST), True) is None
    s2 = rt.stream(rt.filters, info(connection_id=2))
    assert s2.on_request_headers(list(CRASH), True).status == 500
    s2.finish()
    reply = s1.on_response_headers(200, [], False)  # its VM died meanwhile: fail closed
    assert reply.status == 500
    before = len(h.guest_lines())
    s1.finish()
    assert h.guest_lines()[before:] == []  # nothing called on the dead instance
    _, r1, _ = run_request(rt)
    assert r1 is None


def test_crash_loop_backoff_then_rebuild_from_tick(h, monkeypatch):
    monkeypatch.setattr(runtime_module, "REBUILD_DELAY_MIN", 2.0)
    rt = h.runtime(crasher())
    assert run_request(rt, headers=CRASH)[1].status == 500  # failure 1: rebuild at once
    assert run_request(rt, headers=CRASH)[1].status == 500  # rebuilt, fails again: backoff 2 s
    assert h.messages("notice").count('wasm "f": VM rebuilt after a failure (rebuild #1)') == 1
    _, reply, _ = run_request(rt)  # within the backoff: filter unavailable, fail closed, no rebuild
    assert reply.status == 500
    assert '*42 wasm "f" root_id "f": VM unavailable after a failure, request answered 500' in h.messages("warn")
    now = time.monotonic()
    deadline = rt.tick(now)
    assert now < deadline <= now + 2.0
    assert rt.tick(deadline) is None  # due: rebuilds (tick() compares with the `now` it is given)
    assert 'wasm "f": VM rebuilt after a failure (rebuild #2)' in h.messages("notice")
    _, r1, _ = run_request(rt)
    assert r1 is None


def test_failed_rebuild_is_logged_and_retried(h, monkeypatch):
    """on_configure fails on the second boot (it remembers the first one in shared data)."""
    monkeypatch.setattr(runtime_module, "REBUILD_DELAY_MIN", 0.05)
    w = Wat()
    configure = on("proxy_on_configure",
                   f"(if (i32.eqz (call $proxy_get_shared_data {w.s('booted')} (i32.const 16) (i32.const 20) (i32.const 24)))"
                   " (then (return (i32.const 0))))"
                   f" (drop (call $proxy_set_shared_data {w.s('booted')} {w.s('1')} (i32.const 0)))")
    rt = h.runtime(w.build(configure + on("proxy_on_request_headers", when_header(w, "x-crash", "unreachable"))))
    assert run_request(rt, headers=CRASH)[1].status == 500
    assert run_request(rt)[1].status == 500  # the rebuild fails
    assert any(m.endswith("proxy_on_configure returned false; next VM rebuild in 0.05s") for m in h.messages("error"))


# -- boot failures --------------------------------------------------------------------


def boot_error(h, module: bytes, **kw) -> str:
    with pytest.raises(WasmBootError) as err:
        h.runtime(module, **kw)
    return str(err.value)


def test_configure_false_and_proc_exit_in_configure(h):
    w = Wat()
    msg = boot_error(h, w.build(on("proxy_on_configure", "(return (i32.const 0))")))
    assert msg.startswith('wasm "f" root_id "f" (') and msg.endswith(".wasm): proxy_on_configure returned false")
    w = Wat()
    msg = boot_error(h, w.build(on("proxy_on_configure", "(call $wasi_proc_exit (i32.const 255))")))
    assert msg.endswith(".wasm): proxy_on_configure failed: proc_exit(255)")
    w = Wat()
    msg = boot_error(h, w.build(on("proxy_on_vm_start", "(return (i32.const 0))")))
    assert msg.endswith("proxy_on_vm_start returned false")


def test_start_functions(h):
    w = Wat()
    rt = h.runtime(w.build(f'(func (export "_start") (call $log {w.s("started")}) (call $wasi_proc_exit (i32.const 0)))'))
    assert h.guest_lines()[0] == "started"  # proc_exit(0) in _start is success
    run_request(rt)
    w = Wat()
    msg = boot_error(h, w.build('(func (export "_start") (call $wasi_proc_exit (i32.const 1)))'))
    assert msg.endswith(".wasm): _start failed: proc_exit(1)")
    w = Wat()
    msg = boot_error(h, w.build('(func (export "_initialize") unreachable)'))
    assert msg.startswith('wasm "f" (') and "_initialize failed: wasm trap: wasm `unreachable`" in msg
    w = Wat()
    h.runtime(w.build(f'(func (export "_initialize") (call $log {w.s("init")}))'
                      f' (func (export "main") (param i32 i32) (result i32) (call $log {w.s("main")}) (i32.const 0))'))
    assert "init" in h.guest_lines() and "main" in h.guest_lines()


def test_instantiation_over_the_memory_cap(h):
    msg = boot_error(h, Wat().build(), memory_max=65536)  # the module wants 2 pages
    assert "instantiation failed" in msg and 'wasm "f"' in msg


def test_endless_loop_at_boot_is_interrupted(h, monkeypatch):
    monkeypatch.setattr(vm_module, "BOOT_TIMEOUT", 0.1)
    w = Wat()
    started = time.monotonic()
    msg = boot_error(h, w.build(on("proxy_on_configure", "(loop $l (br $l))")))
    assert time.monotonic() - started < 2
    assert msg.endswith("proxy_on_configure failed: timed out after 100 ms (wasm trap: interrupt)")


def test_unknown_module_in_filters(h):
    rt = h.runtime(Wat().build(), start=False)
    with pytest.raises(WasmBootError, match='unknown wasm module "nope"'):
        rt.start([FilterRef(module="nope", where="gateway.conf:9")])
