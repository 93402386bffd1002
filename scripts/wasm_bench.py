"""The cost of the wasm filter boundary alone, in µs, without a load generator.

Why: under load a filter's cost hides among HTTP parsing, the kernel and the
load generator; here one process drives forkgw's own Runtime and Stream in a
loop, so a regression at the boundary shows up by itself in a few seconds.

Each figure is the best of five timed batches (the one least disturbed by other load):
- the add_header plugin per request: request phase (context create +
  on_request_headers), response phase (on_response_headers, which adds a
  header through a host call), finish (on_done, on_log, on_delete), and how
  many guest and host calls one request makes;
- per callback: a module whose callbacks do nothing, with all six request
  callbacks exported versus only proxy_on_context_create;
- per host call: a module calling one hostcall K times from
  on_request_headers versus zero times (proxy_continue_stream = the
  transition alone, proxy_log below the log level = a bounds check,
  proxy_get_current_time_nanoseconds = an 8-byte memory write,
  proxy_get_header_map_value = memory read + guest malloc + writes);
- the floor under forkgw: the same operations through wasmtime's public API
  directly (export call, host function call, epoch deadline re-arm).

forkgw's boundary runs through wasmtime's private bindings when they have the
expected shape (forkgw/wasm/guest.py); `--boundary public` measures the
public-API fallback instead, for comparison.

    python scripts/wasm_bench.py [--time 0.15] [--json PATH] [--boundary fast|public]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import wasmtime

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from forkgw.conf import load  # noqa: E402
from forkgw.conf.model import FilterRef, Wasm, WasmModule  # noqa: E402
from forkgw.log import ErrorLog  # noqa: E402
from forkgw.wasm import Runtime, StreamInfo, compile_modules  # noqa: E402
from forkgw.wasm import guest as boundary  # noqa: E402

REQUEST = [(b":method", b"GET"), (b":path", b"/bench"), (b":authority", b"127.0.0.1"), (b":scheme", b"http"),
           (b"user-agent", b"wrk"), (b"accept", b"*/*")]
RESPONSE = [(b"content-length", b"0"), (b"content-type", b"text/plain")]
HOSTCALL_REPEAT = 50  # K host calls per on_request_headers in the host-call modules


def best_per_op(fn, budget: float, repeats: int = 5) -> float:
    """µs per operation of fn(n) (which runs n of them): best of `repeats` batches of ~budget/repeats s."""
    fn(3)  # warm up (first-call paths, caches)
    n, t = 1, 0.0
    while t < 0.02:  # calibrate
        n *= 4
        t0 = time.perf_counter()
        fn(n)
        t = time.perf_counter() - t0
    n = max(1, int(n * (budget / repeats) / t))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def info(i: int = 1) -> StreamInfo:
    return StreamInfo(source=("127.0.0.1", 40000), destination=("127.0.0.1", 8080), connection_id=i,
                      request_id=f"{i:032x}", start_time=time.time())


# -- forkgw's path -----------------------------------------------------------


class Bench:
    """A Runtime per module set, the way a worker builds it (compile, then start)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.log = ErrorLog(str(tmp / "error.log"), "error")
        self.runtimes: list[Runtime] = []

    def runtime(self, wasm: Wasm, filters: list[FilterRef]) -> Runtime:
        rt = Runtime(wasm, compile_modules(wasm), self.log)
        rt.start(filters)
        self.runtimes.append(rt)
        return rt

    def close(self) -> None:
        for rt in self.runtimes:
            rt.close()

    def seed(self) -> tuple[Runtime, list[FilterRef]]:
        """add_header loaded through a real conf, so plugin.yaml is read as in the gateway."""
        conf = self.tmp / "gateway.conf"
        conf.write_text(f"wasm {{ module add_header {REPO / 'plugins' / 'add_header'}; }}\n"
                        "http { server { listen 127.0.0.1:1; location / { return 200; "
                        "proxy_wasm add_header 'add_header'; } } }\n")
        config = load(str(conf), prefix=str(self.tmp))
        filters = [FilterRef(module="add_header", config="add_header")]
        return self.runtime(config.wasm, filters), filters

    def wat(self, name: str, text: str) -> tuple[Runtime, list[FilterRef]]:
        path = self.tmp / f"{name}.wasm"
        path.write_bytes(wasmtime.wat2wasm(text))
        wasm = Wasm()
        wasm.modules[name] = WasmModule(name=name, path=str(path), where=f"{path}:1")
        filters = [FilterRef(module=name)]
        return self.runtime(wasm, filters), filters


def request_loop(rt: Runtime, filters):
    def run(n: int) -> None:
        for i in range(n):
            s = rt.stream(filters, info(i))
            s.on_request_headers(list(REQUEST), True)
            s.on_response_headers(200, list(RESPONSE), False)
            s.finish()
    return run


def phases(rt: Runtime, filters, budget: float) -> dict:
    """µs per request phase: per-batch means, the batch with the best total wins."""
    clock = time.perf_counter_ns
    best = None
    for _ in range(5):
        acc, n = [0, 0, 0], 0
        end = clock() + int(budget / 5 * 1e9)
        while clock() < end or n < 20:
            t0 = clock()
            s = rt.stream(filters, info(n))
            s.on_request_headers(list(REQUEST), True)
            t1 = clock()
            s.on_response_headers(200, list(RESPONSE), False)
            t2 = clock()
            s.finish()
            t3 = clock()
            acc[0] += t1 - t0
            acc[1] += t2 - t1
            acc[2] += t3 - t2
            n += 1
        per = [a / n / 1000 for a in acc]
        per.append(sum(per))
        if best is None or per[3] < best[3]:
            best = per
    return {"request_phase": best[0], "response_phase": best[1], "finish": best[2], "total": best[3]}


def count_calls(bench: Bench) -> dict:
    """Guest calls (callbacks + allocations) and host calls per add_header request.

    Counted by wrapping forkgw's boundary (guest.py: call, the allocator call, and
    every host function as it is defined), whichever path is active.
    """
    counts = {"guest": 0, "host": 0}
    names: dict[str, int] = {}
    cls = boundary.FastGuest if boundary.FAST_PATH else boundary.Guest
    orig = {attr: getattr(cls, attr) for attr in ("call", "_call_allocator", "define")}
    own = {attr for attr in orig if attr in cls.__dict__}

    def call(self, *args, **kw):
        counts["guest"] += 1
        return orig["call"](self, *args, **kw)

    def call_allocator(self, size):
        counts["guest"] += 1
        return orig["_call_allocator"](self, size)

    def define(self, linker, module, name, functype, method, on_bug=None):
        def counted(*args):
            counts["host"] += 1
            names[name] = names.get(name, 0) + 1
            return method(*args)
        return orig["define"](self, linker, module, name, functype, counted, on_bug)

    cls.call, cls._call_allocator, cls.define = call, call_allocator, define
    try:
        rt, filters = bench.seed()
        request_loop(rt, filters)(10)
        counts.update(guest=0, host=0)
        names.clear()
        request_loop(rt, filters)(100)
    finally:
        for attr, value in orig.items():
            if attr in own:
                setattr(cls, attr, value)
            else:
                delattr(cls, attr)
    out = {k: (v / 100 if v else None) for k, v in counts.items()}
    out["host_by_name"] = {k: v / 100 for k, v in sorted(names.items(), key=lambda kv: -kv[1])}
    return out


# WAT modules for the isolated costs: only the imports they use (forkgw links by the module's list).
WAT_HEAD = """(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $hval (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $cont (param i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0x100) "user-agent")
  (global $heap (mut i32) (i32.const 0x10000))
  (func (export "malloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (local.get $ptr) (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (local.get $ptr))
  (func (export "proxy_abi_version_0_2_0"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
"""
WAT_REST = """
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))
"""
HOSTCALLS = {
    "none": "",
    "proxy_continue_stream (no memory access)": "(drop (call $cont (i32.const 0)))",
    "proxy_log (below level)": "(drop (call $log (i32.const 0) (i32.const 0x100) (i32.const 10)))",
    "proxy_get_current_time_nanoseconds": "(drop (call $now (i32.const 0x20)))",
    "proxy_get_header_map_value": "(drop (call $hval (i32.const 0) (i32.const 0x100) (i32.const 10) "
                                  "(i32.const 0x10) (i32.const 0x14)))",
}


def hostcall_module(call: str, repeat: int) -> str:
    body = f"""
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $i i32)
    (global.set $heap (i32.const 0x10000))
    (block $out (loop $next
      (br_if $out (i32.ge_u (local.get $i) (i32.const {repeat if call else 0})))
      {call}
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (i32.const 0))"""
    return WAT_HEAD + body + WAT_REST + ")"


# Only proxy_on_context_create: the same request with none of the five other callbacks.
BARE_MODULE = WAT_HEAD + ")"


# -- wasmtime's public API, for reference ------------------------------------


def public_api(budget: float) -> dict:
    engine = wasmtime.Engine(wasmtime.Config())
    store = wasmtime.Store(engine)
    module = wasmtime.Module(engine, """(module
      (import "" "h" (func $h))
      (import "" "hc" (func $hc))
      (memory (export "memory") 1)
      (func (export "nop"))
      (func (export "loop_h") (param $n i32)
        (block $o (loop $l (br_if $o (i32.eqz (local.get $n))) (call $h)
          (local.set $n (i32.sub (local.get $n) (i32.const 1))) (br $l))))
      (func (export "loop_hc") (param $n i32)
        (block $o (loop $l (br_if $o (i32.eqz (local.get $n))) (call $hc)
          (local.set $n (i32.sub (local.get $n) (i32.const 1))) (br $l)))))""")
    payload = bytes(64)
    memory_box = []

    def hc(caller):
        mem = memory_box[0]
        mem.write(caller, mem.read(caller, 0, 64), 64)

    linker = wasmtime.Linker(engine)
    linker.define_func("", "h", wasmtime.FuncType([], []), lambda: None)
    linker.define_func("", "hc", wasmtime.FuncType([], []), hc, access_caller=True)
    inst = linker.instantiate(store, module)
    ex = inst.exports(store)
    nop, loop_h, loop_hc, memory = ex["nop"], ex["loop_h"], ex["loop_hc"], ex["memory"]
    memory_box.append(memory)

    def calls(n):
        for _ in range(n):
            nop(store)

    def writes(n):
        for _ in range(n):
            memory.write(store, payload, 128)

    def reads(n):
        for _ in range(n):
            memory.read(store, 128, 192)

    ecfg = wasmtime.Config()
    ecfg.epoch_interruption = True
    estore = wasmtime.Store(wasmtime.Engine(ecfg))

    def rearm(n):
        for _ in range(n):
            estore.set_epoch_deadline(100)

    return {
        "export call (Func.__call__)": best_per_op(calls, budget),
        "host function call": best_per_op(lambda n: loop_h(store, n), budget),
        "host function call with Caller + 64 B read/write": best_per_op(lambda n: loop_hc(store, n), budget),
        "Memory.write 64 B": best_per_op(writes, budget),
        "Memory.read 64 B": best_per_op(reads, budget),
        "set_epoch_deadline": best_per_op(rearm, budget),
    }


# -- main --------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time", type=float, default=0.15, help="seconds per measurement (default 0.15)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--boundary", choices=("fast", "public"), default="fast",
                    help="forkgw's wasm boundary to measure (default: fast, when available)")
    args = ap.parse_args()
    if args.boundary == "public":
        boundary.FAST_PATH = False
    path = ("fast (wasmtime private bindings)" if boundary.FAST_PATH else
            f"public API ({boundary.FAST_PATH_UNAVAILABLE or 'asked for'})")
    budget = args.time
    started = time.perf_counter()
    out: dict = {"wasmtime": getattr(wasmtime, "__version__", None) or _dist_version("wasmtime"), "boundary": path}

    with tempfile.TemporaryDirectory(prefix="forkgw-wasm-bench-") as tmp:
        bench = Bench(Path(tmp))
        try:
            rt, filters = bench.seed()
            s = rt.stream(filters, info())
            s.on_request_headers(list(REQUEST), True)
            s.on_response_headers(200, list(RESPONSE), False)
            s.finish()
            if (b"hello", b"add_header") not in s.response_headers:  # a filter that did nothing is no result
                raise SystemExit(f"add_header did not add its header: {s.response_headers}")
            out["add_header"] = phases(rt, filters, budget * 3)
            out["add_header"]["total (loop)"] = best_per_op(request_loop(rt, filters), budget)
            out["add_header_calls"] = count_calls(bench)

            rt_all, f_all = bench.wat("callbacks", hostcall_module("", 0))
            rt_bare, f_bare = bench.wat("bare", BARE_MODULE)
            all6 = best_per_op(request_loop(rt_all, f_all), budget)
            bare = best_per_op(request_loop(rt_bare, f_bare), budget)
            out["callbacks"] = {"request, 6 empty callbacks": all6, "request, context_create only": bare,
                                "per callback": (all6 - bare) / 5}

            out["hostcalls"] = {}
            for label, call in HOSTCALLS.items():
                if not call:
                    continue
                rt_k, f_k = bench.wat(label.split()[0], hostcall_module(call, HOSTCALL_REPEAT))
                with_k = best_per_op(request_loop(rt_k, f_k), budget)
                out["hostcalls"][label] = (with_k - all6) / HOSTCALL_REPEAT
            log_lines = (Path(tmp) / "error.log").read_text()
        finally:
            bench.close()
    out["public_api"] = public_api(budget)
    out["elapsed_s"] = round(time.perf_counter() - started, 2)

    calls = out["add_header_calls"]
    print(f"wasm boundary, µs (best of 5; wasmtime {out['wasmtime']}, python {sys.version.split()[0]}; "
          f"forkgw boundary: {path})")
    a = out["add_header"]
    print(f"\nadd_header plugin, one request: {a['total']:.1f} µs "
          f"({a['total (loop)']:.1f} µs in a tight loop)")
    print(f"  request phase (context create + on_request_headers)   {a['request_phase']:7.1f}")
    print(f"  response phase (on_response_headers + add header)     {a['response_phase']:7.1f}")
    print(f"  finish (on_done + on_log + on_delete)                 {a['finish']:7.1f}")
    print(f"  guest calls per request (callbacks + allocations)     "
          f"{'n/a' if calls['guest'] is None else format(calls['guest'], '7.1f')}")
    print(f"  host calls per request                                "
          f"{'n/a' if calls['host'] is None else format(calls['host'], '7.1f')}")
    if calls["host_by_name"]:
        print("    " + ", ".join(f"{k} x{v:g}" for k, v in calls["host_by_name"].items()))
    c = out["callbacks"]
    print("\nper callback (module with empty callbacks)")
    print(f"  request with 6 empty callbacks                        {c['request, 6 empty callbacks']:7.1f}")
    print(f"  request with proxy_on_context_create only             {c['request, context_create only']:7.1f}")
    print(f"  => one callback through forkgw                        {c['per callback']:7.1f}")
    print(f"\nper host call (K={HOSTCALL_REPEAT} calls in on_request_headers vs none)")
    for label, value in out["hostcalls"].items():
        print(f"  {label:<54}{value:7.2f}")
    print("\nwasmtime public API, for reference")
    for label, value in out["public_api"].items():
        print(f"  {label:<54}{value:7.2f}")
    print(f"\n({out['elapsed_s']:.1f} s)")
    if log_lines.strip():
        print("error log of the runs (last lines):\n" + "\n".join(log_lines.strip().splitlines()[-5:]), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
