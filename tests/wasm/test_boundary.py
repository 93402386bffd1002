"""The wasm boundary: the fast path is active on the pinned wasmtime, and both paths behave alike.

guest.py reaches into wasmtime-py's private bindings (wasmtime._bindings, Func._func,
Memory._memory, Store._context) for a ~10x cheaper call path.  If an upgrade changes
them, forkgw silently falls back to the public API and gets ~10x slower per request:
test_fast_path_is_active_on_the_pinned_wasmtime is the alarm.
"""

import gc
import time
import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import wasmtime

from forkgw.wasm import guest as boundary
from forkgw.wasm.host import Host

from . import test_failures, test_hostcalls, test_sdk_plugins, test_stream, test_wasi
from .conftest import REQUEST, Harness, Wat, on, run_request
from .test_hostcalls import OOB, RET, U32_OUT, U64_OUT, ret, st

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def pinned_wasmtime() -> str:
    match = re.search(r'"wasmtime==([^"]+)"', PYPROJECT.read_text())
    assert match, "pyproject.toml no longer pins wasmtime exactly (wasmtime==X.Y.Z): guest.py relies on its internals"
    return match.group(1)


@pytest.fixture
def public(monkeypatch):
    """VMs built in this test use wasmtime's public API."""
    monkeypatch.setattr(boundary, "FAST_PATH", False)


def vm_of(runtime):
    return next(iter(runtime.states.values())).vm


def test_fast_path_is_active_on_the_pinned_wasmtime(h, monkeypatch):
    pinned, installed = pinned_wasmtime(), version("wasmtime")
    assert installed == pinned, (
        f"wasmtime {installed} is installed, pyproject.toml pins {pinned}: install the pin, or check "
        f"forkgw/wasm/guest.py against the new version (_probe()) and then move the pin"
    )
    assert boundary.FAST_PATH_UNAVAILABLE is None, (
        f"wasmtime {installed}: the private bindings forkgw/wasm/guest.py relies on changed "
        f"({boundary.FAST_PATH_UNAVAILABLE}); forkgw runs on the public-API fallback, ~10x slower per call"
    )
    monkeypatch.setattr(boundary, "FAST_PATH", True)  # even when FORKGW_WASM_BOUNDARY=public is set
    rt = h.runtime(Wat().build())
    guest = vm_of(rt).guest
    assert type(guest) is boundary.FastGuest and guest.memory_fixed
    assert set(guest._exports) == set(guest.funcs)  # every export goes through the raw call
    run_request(rt)
    assert h.guest_lines()[-2:] == ["log=2", "delete=2"]


# -- the same results through both paths ----------------------------------------------


def hostcall_tour(w: Wat) -> str:
    """Host calls of every shape, in and out of bounds, with u32 values past 2^31, and a memory growth."""
    big = 3 * 65536  # more than the test module's 2 initial pages: the allocator grows memory
    return " ".join([
        st(w, "log", f"(call $proxy_log (i32.const 2) {w.s('hello')})"),
        st(w, "log_hidden_oob", f"(call $proxy_log (i32.const 0) {OOB} (i32.const 8))"),
        st(w, "level", f"(call $proxy_get_log_level {U32_OUT})"),
        st(w, "level_value", "(i32.load (i32.const 24))"),
        st(w, "time", f"(call $proxy_get_current_time_nanoseconds {U64_OUT})"),
        st(w, "time_oob", "(call $proxy_get_current_time_nanoseconds (i32.const -4))"),
        st(w, "path", f"(call $proxy_get_header_map_value (i32.const 0) {w.s(':path')} {RET})"), ret(w, "path"),
        st(w, "hugemap", f"(call $proxy_get_header_map_value (i32.const -1) {w.s(':path')} {RET})"),
        st(w, "oobkey", f"(call $proxy_get_header_map_value (i32.const 0) {OOB} (i32.const 4) {RET})"),
        st(w, "add", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('x-tour')} {w.s('yes')})"),
        st(w, "size", "(call $proxy_get_header_map_size (i32.const 0) (i32.const 24))"),
        st(w, "size_value", "(i32.load (i32.const 24))"),
        st(w, "pairs", f"(call $proxy_get_header_map_pairs (i32.const 0) {RET})"),
        st(w, "pairs_len", "(i32.load (i32.const 20))"),
        st(w, "big", f"(call $proxy_get_header_map_value (i32.const 0) {w.s('x-big')} {RET})"),
        st(w, "big_len", "(i32.load (i32.const 20))"),
        st(w, "big_last", f"(i32.load8_u (i32.add (i32.load (i32.const 16)) (i32.const {big - 1})))"),
        st(w, "pages", "(memory.size)"),
        st(w, "prop", f"(call $proxy_get_property {w.s('request' + chr(0) + 'path')} {RET})"), ret(w, "prop"),
        st(w, "set_prop", f"(call $proxy_set_property {w.s('tour')} {w.s('v')})"),
        st(w, "define", f"(call $proxy_define_metric (i32.const 0) {w.s('tour_total')} (i32.const 24))"),
        st(w, "incr", "(call $proxy_increment_metric (i32.load (i32.const 24)) (i64.const -2))"),  # signed
        st(w, "incr2", "(call $proxy_increment_metric (i32.load (i32.const 24)) (i64.const 5))"),
        st(w, "metric", f"(call $proxy_get_metric (i32.load (i32.const 24)) {U64_OUT})"),
        st(w, "metric_value", "(i32.wrap_i64 (i64.load (i32.const 32)))"),
        st(w, "set_shared", f"(call $proxy_set_shared_data {w.s('k')} {w.s('v')} (i32.const 0))"),
        st(w, "get_shared", f"(call $proxy_get_shared_data {w.s('k')} {RET} (i32.const 28))"), ret(w, "shared"),
        st(w, "clock", f"(call $wasi_clock_time_get (i32.const 1) (i64.const -1) {U64_OUT})"),
        st(w, "stub", "(call $proxy_http_call (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)"
                      " (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))"),
        st(w, "eq", "(call $pthread_equal (i32.const -1) (i32.const -1))"),
        st(w, "cont", "(call $proxy_continue_stream (i32.const -1))"),
    ])


BIG = [(b"x-big", b"b" * (3 * 65536))]


def tour(h) -> tuple[list[str], list, list]:
    w = Wat()
    rt = h.runtime(w.build(on("proxy_on_request_headers", hostcall_tour(w))))
    stream, r1, r2 = run_request(rt, headers=REQUEST + BIG)
    return h.guest_lines(), stream.request_headers, [r1, r2]


def test_both_paths_give_identical_results(h, tmp_path_factory, monkeypatch):
    fast = tour(h)
    with monkeypatch.context() as m:
        m.setattr(boundary, "FAST_PATH", False)
        other = Harness(tmp_path_factory.mktemp("public"))
        try:
            public = tour(other)
            assert type(vm_of(other.runtimes[0]).guest) is boundary.Guest
        finally:
            other.close()
    assert fast == public
    lines = fast[0]
    for item in ("log=0", "log_hidden_oob=6", "level=0", "level_value=2", "time=0", "time_oob=6", "path=0",
                 "path:/a/b?x=1&y=2", "hugemap=2", "oobkey=6", "add=0", "pairs=0", "big=0",
                 f"big_len={3 * 65536}", "big_last=98", "prop=0", "prop:/a/b?x=1&y=2", "set_prop=0", "define=0",
                 "incr=2", "incr2=0", "metric=0", "metric_value=5", "set_shared=0", "get_shared=0", "shared:v",
                 "clock=0", "stub=10", "eq=1", "cont=2"):
        assert item in lines, f"{item!r} not in {lines}"
    assert int(next(line for line in lines if line.startswith("pages=")).split("=")[1]) > 2


def test_memory_growth_keeps_the_base_and_the_view_follows(h):
    if not boundary.FAST_PATH:
        pytest.skip("public-API boundary selected")
    w = Wat()
    rt = h.runtime(w.build(on("proxy_on_request_headers", hostcall_tour(w))))
    guest = vm_of(rt).guest
    before = guest._base, guest.memory_size()
    run_request(rt, headers=REQUEST + BIG)
    assert guest.memory_size() > before[1]
    assert guest._base == before[0] and not guest.stale  # the engine forbids moving memory
    assert len(guest._view) == guest.memory_size()
    assert "big_last=98" in h.guest_lines()


def test_host_callbacks_survive_garbage_collection(h):
    rt = h.runtime(Wat().build())
    gc.collect()
    for _ in range(3):
        run_request(rt)
    assert h.guest_lines().count("delete=2") == 1 and "delete=4" in h.guest_lines()


@pytest.mark.parametrize("path", ["fast", "public"])
def test_a_host_bug_answers_internal_failure_and_logs_crit(h, monkeypatch, path):
    monkeypatch.setattr(boundary, "FAST_PATH", path == "fast" and boundary.FAST_PATH)

    def broken(self, *args):
        raise KeyError("boom")

    monkeypatch.setattr(Host, "proxy_get_property", broken)
    w = Wat()
    code = st(w, "prop", f"(call $proxy_get_property {w.s('x')} {RET})")
    rt = h.runtime(w.build(on("proxy_on_request_headers", code)))
    _, r1, _ = run_request(rt)
    assert r1 is None and "prop=10" in h.guest_lines()
    assert any("host function proxy_get_property failed" in m for m in h.messages("crit"))
    assert "KeyError: 'boom'" in h.log()  # with the traceback
    run_request(rt)  # the VM is intact
    assert h.guest_lines().count("prop=10") == 2


@pytest.mark.parametrize("path", ["fast", "public"])
def test_an_exit_nested_in_the_allocator_unwinds_every_level(h, monkeypatch, path):
    """proc_exit from a host function the allocator calls, inside a host function: one clean failure."""
    monkeypatch.setattr(boundary, "FAST_PATH", path == "fast" and boundary.FAST_PATH)
    w = Wat()
    code = f"(drop (call $proxy_get_header_map_pairs (i32.const 0) {RET}))"
    text = w.text(on("proxy_on_request_headers", code)).replace(
        '(func (export "proxy_on_memory_allocate") (param i32) (result i32) (call $alloc (local.get 0)))',
        '(func (export "proxy_on_memory_allocate") (param i32) (result i32)'
        ' (if (i32.load8_u (i32.const 0x2000)) (then (call $wasi_proc_exit (i32.const 3))))'
        ' (i32.store8 (i32.const 0x2000) (i32.const 1))'
        ' (call $alloc (local.get 0)))')
    rt = h.runtime(wasmtime.wat2wasm(text))
    _, r1, _ = run_request(rt)  # the first allocation passes
    assert r1 is None
    _, r1, _ = run_request(rt)  # the second exits from inside the allocator
    assert r1.status == 500
    assert "proxy_on_request_headers failed: proc_exit(3); the VM is discarded" in h.log()
    assert vm_of(rt).guest is None or vm_of(rt).failed
    _, r1, _ = run_request(rt)  # the rebuilt VM serves
    assert r1 is None


# -- the existing host-call, WASI, failure and SDK suites through the public API --------------


def _suite():
    for module in (test_hostcalls, test_wasi, test_failures, test_stream, test_sdk_plugins):
        for name, fn in vars(module).items():
            if name.startswith("test_") and callable(fn) and fn.__module__ == module.__name__:
                params = set(inspect.signature(fn).parameters)
                if params <= {"h", "monkeypatch"} and not hasattr(fn, "pytestmark"):
                    yield pytest.param(fn, id=f"{module.__name__.rsplit('.', 1)[1]}::{name}")


@pytest.mark.parametrize("test", list(_suite()))
def test_suite_through_the_public_api(test, h, monkeypatch, public):
    kwargs = {"h": h, "monkeypatch": monkeypatch}
    test(**{name: kwargs[name] for name in inspect.signature(test).parameters})


def test_a_memory_that_moves_is_looked_up_on_every_access(h, monkeypatch):
    """An engine that lets memory move (not forkgw's): the fast path must not trust a cached view."""
    if not boundary.FAST_PATH:
        pytest.skip("public-API boundary selected")
    from forkgw.wasm import vm as vm_module

    def moving_engine():
        config = wasmtime.Config()
        config.parallel_compilation = False
        config.epoch_interruption = True
        config.memory_reservation = 0  # no reservation: every growth reallocates
        config.memory_guard_size = 0
        config.memory_reservation_for_growth = 0
        config.memory_may_move = True
        return wasmtime.Engine(config)

    real_new_guest = boundary.new_guest
    monkeypatch.setattr(vm_module, "new_engine", moving_engine)
    monkeypatch.setattr(vm_module, "new_guest",
                        lambda store, ticks, memory_fixed, epoch: real_new_guest(store, ticks, False, epoch))
    w = Wat()
    rt = h.runtime(w.build(on("proxy_on_request_headers", hostcall_tour(w))))
    guest = vm_of(rt).guest
    assert guest.stale and not guest.memory_fixed
    guest.memory_size()
    before = guest._base
    _, r1, _ = run_request(rt, headers=REQUEST + BIG)
    assert r1 is None
    assert "big_last=98" in h.guest_lines() and "big_len=196608" in h.guest_lines()
    guest.memory_size()
    assert guest._base != before  # it did move, and every access followed it


@pytest.mark.parametrize("path", ["fast", "public"])
def test_stubs_and_abort_of_any_declared_type(h, monkeypatch, path):
    """Signatures outside the i32 shape go through the generic encoding: i64, f64, two results, no result.

    Stubs answer zeros of the declared types (their status only fits a lone i32 result).
    """
    monkeypatch.setattr(boundary, "FAST_PATH", path == "fast" and boundary.FAST_PATH)
    w = Wat()
    imports = "\n".join([
        '  (import "env" "proxy_log" (func $proxy_log (param i32 i32 i32) (result i32)))',
        '  (import "env" "proxy_grpc_cancel" (func $cancel (param i64) (result i64)))',
        '  (import "env" "proxy_grpc_close" (func $close (param f64) (result f64)))',
        '  (import "env" "proxy_grpc_send" (func $send (param i32) (result i32 i64)))',
        '  (import "env" "proxy_grpc_stream" (func $stream (param i64)))',
        '  (import "env" "abort" (func $abort (param i32 i32 i32 i32)))',
    ])
    code = " ".join([
        st(w, "cancel", "(i32.wrap_i64 (call $cancel (i64.const -1)))"),
        st(w, "close", "(i32.trunc_f64_s (call $close (f64.const 2.5)))"),
        st(w, "send", "(call $send (i32.const 1)) (drop)"),
        "(call $stream (i64.const 7))",
        st(w, "after", "(i32.const 1)"),
        "(if (i32.eqz (i32.load8_u (i32.const 0x2000)))"
        " (then (i32.store8 (i32.const 0x2000) (i32.const 1))"
        f" (call $abort (i32.const {w.place(b'')[0] + 4}) (i32.const 0) (i32.const 12) (i32.const 34))))",
    ])
    rt = h.runtime(wasmtime.wat2wasm(w.text(on("proxy_on_request_headers", code), imports=imports)))
    _, r1, _ = run_request(rt)
    assert r1.status == 500
    logged = h.guest_lines()
    for item in ("cancel=0", "close=0", "send=0", "after=1"):
        assert item in logged, f"{item!r} not in {logged}"
    assert "proxy_on_request_headers failed: abort:  at ?:12:34" in h.log()


def test_an_endless_loop_after_many_quick_callbacks_is_interrupted_in_time(h):
    """The deadline is re-armed only when the epoch moved: a callback still gets the whole timeout, no more."""
    w = Wat()
    loop = test_failures.when_header(w, "x-crash", "(loop $l (br $l))")
    rt = h.runtime(w.build(on("proxy_on_request_headers", loop)), callback_timeout=0.05, level="error")
    until = time.monotonic() + 0.3  # many ticks, many callbacks armed or not
    while time.monotonic() < until:
        _, r1, _ = run_request(rt)
        assert r1 is None
    started = time.monotonic()
    _, reply, _ = run_request(rt, headers=test_failures.CRASH)
    elapsed = time.monotonic() - started
    assert reply.status == 500
    assert 0.05 <= elapsed < 1.0
    assert "timed out after 50 ms (wasm trap: interrupt)" in h.log()
