"""The WASI imports filters need: stdout/stderr to the error log, clocks, randomness, exits, stubs."""

import struct
import time

from .conftest import Wat, on, run_request
from .test_hostcalls import OOB, U64_OUT, lines_of, logged, st


def iovecs(w: Wat, *chunks: bytes) -> str:
    """'(i32.const iovs) (i32.const count)' for chunks placed in memory."""
    spans = [w.place(chunk) for chunk in chunks]
    addr, _ = w.place(b"".join(struct.pack("<II", a, n) for a, n in spans))
    return f"(i32.const {addr}) (i32.const {len(spans)})"


def test_fd_write_goes_to_the_error_log_line_by_line(h):
    def code(w):
        return " ".join([
            st(w, "out", f"(call $wasi_fd_write (i32.const 1) {iovecs(w, b'hello' + bytes([10]) + b'wor', b'ld' + bytes([10]) + b'tail')} (i32.const 24))"),
            st(w, "written", "(i32.load (i32.const 24))"),
            st(w, "err", f"(call $wasi_fd_write (i32.const 2) {iovecs(w, b'panicked at lib.rs' + bytes([10]))} (i32.const 24))"),
            st(w, "badfd", f"(call $wasi_fd_write (i32.const 5) {iovecs(w, b'x')} (i32.const 24))"),
            st(w, "oob_iovs", f"(call $wasi_fd_write (i32.const 1) {OOB} (i32.const 2) (i32.const 24))"),
            st(w, "oob_buf", f"(call $wasi_fd_write (i32.const 1) (i32.const {w.place(struct.pack('<II', 0xFFFFFFF0, 100))[0]}) (i32.const 1) (i32.const 24))"),
        ])

    lines = lines_of(h, "proxy_on_request_headers", code)
    logged(lines, "stdout: hello", "stdout: world", "out=0", "written=16", "err=0", "badfd=8", "oob_iovs=21",
           "oob_buf=21", "stdout: tail")  # the partial line is flushed when the callback ends
    assert any(m.endswith('wasm "f" root_id "f": stderr: panicked at lib.rs') for m in h.messages("error"))


def test_clocks_random_environment(h):
    def code(w):
        return " ".join([
            st(w, "realtime", f"(call $wasi_clock_time_get (i32.const 0) (i64.const 1) {U64_OUT})"),
            st(w, "secs", "(i32.wrap_i64 (i64.div_u (i64.load (i32.const 32)) (i64.const 1000000000)))"),
            st(w, "monotonic", f"(call $wasi_clock_time_get (i32.const 1) (i64.const 1) {U64_OUT})"),
            st(w, "badclock", f"(call $wasi_clock_time_get (i32.const 9) (i64.const 1) {U64_OUT})"),
            st(w, "clock_oob", f"(call $wasi_clock_time_get (i32.const 0) (i64.const 1) {OOB})"),
            st(w, "random", "(call $wasi_random_get (i32.const 0x200) (i32.const 64))"),
            st(w, "random_nonzero", "(i64.ne (i64.or (i64.load (i32.const 0x200)) (i64.load (i32.const 0x208))) (i64.const 0))"),
            st(w, "random_oob", f"(call $wasi_random_get {OOB} (i32.const 64))"),
            "(i64.store (i32.const 24) (i64.const -1))",
            st(w, "environ", "(call $wasi_environ_sizes_get (i32.const 24) (i32.const 28))"),
            st(w, "environ_count", "(i32.load (i32.const 24))"),
            st(w, "args", "(call $wasi_args_sizes_get (i32.const 24) (i32.const 28))"),
            st(w, "args_size", "(i32.load (i32.const 28))"),
            st(w, "args_oob", f"(call $wasi_args_sizes_get {OOB} (i32.const 28))"),
            st(w, "fdstat", "(call $wasi_fd_fdstat_get (i32.const 1) (i32.const 0x300))"),
            st(w, "filetype", "(i32.load8_u (i32.const 0x300))"),
            st(w, "fdstat_bad", "(call $wasi_fd_fdstat_get (i32.const 7) (i32.const 0x300))"),
            st(w, "prestat", "(call $wasi_fd_prestat_get (i32.const 3) (i32.const 0x300))"),
            st(w, "path_open", "(call $wasi_path_open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 0x300))"),
            st(w, "yield", "(call $wasi_sched_yield)"),
        ])

    lines = lines_of(h, "proxy_on_request_headers", code)
    logged(lines, "realtime=0", "monotonic=0", "badclock=28", "clock_oob=21", "random=0", "random_nonzero=1",
           "random_oob=21", "environ=0", "environ_count=0", "args=0", "args_size=0", "args_oob=21", "fdstat=0",
           "filetype=2", "fdstat_bad=8", "prestat=8", "path_open=8", "yield=0")
    secs = int(next(line for line in lines if line.startswith("secs=")).split("=")[1])
    assert abs(secs - time.time()) < 5


def test_poll_oneoff_fires_every_subscription_at_once(h):
    def code(w):
        subs = struct.pack("<QB7xQQQH6x", 0xABCD, 0, 1, 10**9, 0, 0) + struct.pack("<QB7xQQQH6x", 7, 0, 1, 10**9, 0, 0)
        addr, _ = w.place(subs)
        return " ".join([
            st(w, "poll", f"(call $wasi_poll_oneoff (i32.const {addr}) (i32.const 0x400) (i32.const 2) (i32.const 24))"),
            st(w, "nevents", "(i32.load (i32.const 24))"),
            st(w, "userdata", "(i32.load (i32.const 0x400))"),
            st(w, "userdata2", "(i32.load (i32.const 0x420))"),
            st(w, "none", f"(call $wasi_poll_oneoff (i32.const {addr}) (i32.const 0x400) (i32.const 0) (i32.const 24))"),
            st(w, "oob", f"(call $wasi_poll_oneoff {OOB} (i32.const 0x400) (i32.const 1) (i32.const 24))"),
        ])

    started = time.monotonic()
    lines = lines_of(h, "proxy_on_request_headers", code)
    assert time.monotonic() - started < 1  # the 1 s sleep did not block the worker
    logged(lines, "poll=0", "nevents=2", f"userdata={0xABCD}", "userdata2=7", "none=28", "oob=21")


def test_proc_exit_traps_with_its_code(h):
    w = Wat()
    rt = h.runtime(w.build(on("proxy_on_request_headers", "(call $wasi_proc_exit (i32.const 3))")))
    _, reply, _ = run_request(rt)
    assert reply.status == 500
    assert 'wasm "f" root_id "f": proxy_on_request_headers failed: proc_exit(3)' in h.log()


def test_assemblyscript_abort_traps_with_its_message(h):
    w = Wat()
    message = "boom".encode("utf-16-le")
    where = "index.ts".encode("utf-16-le")
    m_addr, _ = w.place(struct.pack("<I", len(message)) + message)
    f_addr, _ = w.place(struct.pack("<I", len(where)) + where)
    imports = "\n".join(f'  (import "env" "{n}" (func ${n} {t}))' for n, t in (
        ("proxy_log", "(param i32 i32 i32) (result i32)"),)) + '\n  (import "env" "abort" (func $abort (param i32 i32 i32 i32)))'
    code = f"(call $abort (i32.const {m_addr + 4}) (i32.const {f_addr + 4}) (i32.const 12) (i32.const 5))"
    rt = h.runtime(w.build(on("proxy_on_request_headers", code), imports=imports))
    _, reply, _ = run_request(rt)
    assert reply.status == 500
    assert "proxy_on_request_headers failed: abort: boom at index.ts:12:5" in h.log()
