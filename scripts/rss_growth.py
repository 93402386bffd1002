"""Worker RSS under a million requests through the seed filter: the memory target.

The target: a worker with the seed filter (the AssemblyScript add_header plugin)
loaded stays <= 30 MB RSS, and its RSS grows < 5% over 1M requests (no leak in
contexts, allocations or guest memory).

Why it is built this way:
- One worker (`worker_processes 1`) carries all the load, so its RSS is the whole
  story; the location is `return 200` + the add_header filter, as on /t of
  conf/gateway.conf, with `access_log off` so no log buffer is measured.
- A warm-up comes first: caches, the allocator's arenas and the first VM recycle
  settle there, and growth is measured against the RSS after it.
- wrk runs in slices of a few seconds until each batch's request count is reached,
  so every wrk call is bounded in time; VmRSS is read from /proc between batches.
- A worker respawn would reset RSS and hide a leak, so the worker's pid is checked
  after every batch; a socket error or non-2xx answer invalidates the run too.
- The AssemblyScript SDK leaks a little guest memory per request; forkgw renews
  such a VM past `vm_recycle_memory` (default 512k).  `--recycle 0` turns that off
  to show the leak; the "VM recycled" notices in the error log are counted.
- forkgw starts in its own session and its group is killed at the end, whatever
  happens.  Loopback only.

    python scripts/rss_growth.py                           # 1M requests after 100k of warm-up
    python scripts/rss_growth.py --recycle 0 --requests 300000
    python scripts/rss_growth.py --requests 200000 --batch 50000 --json rss.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "plugins"
RSS_TARGET_MB = 30.0
GROWTH_TARGET_PCT = 5.0
SLICE_MAX_S = 5.0  # longest single wrk call

CONF = """\
worker_processes 1;
error_log {dir}/error.log notice;
pid {dir}/forkgw.pid;
events {{ worker_connections 1024; }}
wasm {{
    module add_header {plugins}/add_header;
{recycle}}}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        location /t {{
            return 200 "ok";
            proxy_wasm add_header 'add_header';
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def children_of(pid: int) -> list[int]:
    """Pids whose parent is pid, from /proc/*/stat."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def ensure_wrk() -> None:
    """CI starts from a bare machine: install wrk when missing."""
    if shutil.which("wrk"):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(sudo + ["apt-get", "install", "-y", "wrk"], env=env).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update"], env=env, check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "wrk"], env=env, check=True)


def wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> int:
    """Wait for generation 1 to serve; returns its single worker's pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"forkgw exited with {proc.returncode}: {tail(log)}")
        text = log.read_text(errors="replace") if log.exists() else ""
        workers = children_of(proc.pid)
        if "generation 1 serving" in text and len(workers) == 1:
            return workers[0]
        time.sleep(0.05)
    raise RuntimeError(f"forkgw not serving with one worker within {timeout:g}s: {tail(log)}")


def tail(log: Path) -> str:
    return (log.read_text(errors="replace")[-1500:].strip() if log.exists() else "") or "(no log)"


def check_filter(port: int) -> str | None:
    """Why /t is not the filtered answer (a fast wrong answer measures nothing), or None."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/t")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return f"status {resp.status}: {body[:80]!r}"
        if resp.getheader("hello") != "add_header":
            return f"header hello: {resp.getheader('hello')!r}, expected 'add_header'"
    except OSError as err:
        return f"request failed: {err}"
    finally:
        conn.close()
    return None


def run_wrk(port: int, seconds: float, connections: int) -> dict:
    """One bounded wrk call: requests done, and errors or non-2xx answers."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", f"http://127.0.0.1:{port}/t"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    out = {"requests": 0, "errors": 0, "non2xx": 0}
    if m := re.search(r"(\d+) requests in", proc.stdout):
        out["requests"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", proc.stdout):
        out["errors"] = sum(int(g) for g in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", proc.stdout):
        out["non2xx"] = int(m.group(1))
    if proc.returncode != 0 or not out["requests"]:
        out["errors"] += 1
        out["failure"] = (proc.stderr or proc.stdout).strip()[-300:] or f"wrk exited {proc.returncode}"
    return out


class Load:
    """Runs wrk in slices until a request count is reached, keeping the totals."""

    def __init__(self, port: int, connections: int, deadline: float):
        self.port = port
        self.connections = connections
        self.deadline = deadline
        self.requests = 0
        self.errors = 0
        self.non2xx = 0
        self.rate = 5000.0  # req/s guess, replaced by the measured one after the first slice
        self.failures: list[str] = []

    def until(self, total: int) -> None:
        while self.requests < total:
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"time limit reached at {self.requests:,} requests")
            seconds = min(SLICE_MAX_S, max(1.0, round((total - self.requests) / self.rate)))
            started = time.monotonic()
            r = run_wrk(self.port, seconds, self.connections)
            self.requests += r["requests"]
            self.errors += r["errors"]
            self.non2xx += r["non2xx"]
            if "failure" in r:
                self.failures.append(r["failure"])
                raise RuntimeError(f"wrk failed: {r['failure']}")
            self.rate = max(100.0, r["requests"] / max(0.5, time.monotonic() - started))


def mb(kb: int) -> float:
    return kb / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1_000_000, help="measured requests (default 1,000,000)")
    ap.add_argument("--batch", type=int, default=100_000, help="requests between RSS reads (default 100,000)")
    ap.add_argument("--warmup", type=int, default=100_000, help="requests before the baseline RSS (default 100,000)")
    ap.add_argument("--connections", type=int, default=20, help="wrk -c (default 20)")
    ap.add_argument("--recycle", metavar="SIZE",
                    help="vm_recycle_memory SIZE in the wasm block (default: unset, i.e. 512k)")
    ap.add_argument("--time-limit", type=float, default=900.0, help="give up after this many seconds (default 900)")
    ap.add_argument("--json", metavar="PATH", help="write the batches and the verdicts as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (conf, error log)")
    args = ap.parse_args()

    ensure_wrk()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    root = Path(tempfile.mkdtemp(prefix="forkgw-rss-"))
    log = root / "error.log"
    port = free_port()
    recycle = f"    vm_recycle_memory {args.recycle};\n" if args.recycle is not None else ""
    (root / "gw.conf").write_text(CONF.format(dir=root, plugins=PLUGINS, port=port, recycle=recycle))
    started = time.monotonic()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "settings": vars(args).copy(), "batches": []}
    with open(root / "stdout.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "forkgw", "-p", str(root), "-c", str(root / "gw.conf")],
                                cwd=root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    problems: list[str] = []
    try:
        worker = wait_ready(proc, log)
        why = check_filter(port)
        if why:
            raise RuntimeError(f"/t is not the filtered answer: {why}")
        start_kb = rss_kb(worker)
        print(f"forkgw worker {worker} on 127.0.0.1:{port}, vm_recycle_memory {args.recycle or '(default 512k)'}; "
              f"RSS at start {mb(start_kb):.1f} MB", file=sys.stderr)

        load = Load(port, args.connections, started + args.time_limit)
        load.until(args.warmup)
        base_kb = rss_kb(worker)
        warm = load.requests
        print(f"after {warm:,} warm-up requests: RSS {mb(base_kb):.1f} MB, {load.rate:,.0f} req/s")
        print(f"{'requests':>10}  {'RSS MB':>7}  {'growth MB':>9}  {'growth':>7}")
        samples = []
        target = warm
        try:
            while load.requests - warm < args.requests:
                target = min(target + args.batch, warm + args.requests)
                load.until(target)
                kb = rss_kb(worker)
                if children_of(proc.pid) != [worker] or kb is None:
                    problems.append(f"worker {worker} replaced by {children_of(proc.pid)}: the run is invalid")
                    break
                done = load.requests - warm
                growth_pct = 100 * (kb - base_kb) / base_kb
                samples.append(kb)
                report["batches"].append({"requests": done, "rss_kb": kb, "growth_pct": round(growth_pct, 2)})
                print(f"{done:>10,}  {mb(kb):>7.1f}  {mb(kb - base_kb):>+9.2f}  {growth_pct:>+6.1f}%", flush=True)
        except TimeoutError as err:
            problems.append(str(err))
        if load.errors or load.non2xx:
            problems.append(f"wrk saw {load.errors} socket errors and {load.non2xx} non-2xx answers")
        if len(samples) < 1:
            problems.append("no batch completed")

        recycled = log.read_text(errors="replace").count("VM recycled")
        final_kb = samples[-1] if samples else base_kb
        max_kb = max(samples, default=base_kb)
        final_pct = 100 * (final_kb - base_kb) / base_kb
        max_pct = 100 * (max_kb - base_kb) / base_kb
        rss_ok = mb(max_kb) <= RSS_TARGET_MB
        growth_ok = final_pct < GROWTH_TARGET_PCT
        measured = load.requests - warm
        elapsed = time.monotonic() - started
        report |= {
            "worker_pid": worker, "rss_start_kb": start_kb, "rss_after_warmup_kb": base_kb, "rss_max_kb": max_kb,
            "rss_final_kb": final_kb, "growth_final_pct": round(final_pct, 2), "growth_max_pct": round(max_pct, 2),
            "warmup_requests": warm, "measured_requests": measured, "wrk_errors": load.errors,
            "wrk_non2xx": load.non2xx, "vm_recycled": recycled, "rss_target_ok": rss_ok,
            "growth_target_ok": growth_ok, "problems": problems, "elapsed_s": round(elapsed, 1),
        }

        verdict = lambda ok: "ok" if ok else "MISSED"  # noqa: E731
        print()
        print(f"{measured:,} requests after {warm:,} of warm-up, one worker, {elapsed:.0f}s, "
              f"vm_recycle_memory {args.recycle or '(default 512k)'}")
        print(f"RSS: start {mb(start_kb):.1f} MB, after warm-up {mb(base_kb):.1f} MB, "
              f"max {mb(max_kb):.1f} MB, final {mb(final_kb):.1f} MB")
        print(f"growth vs after warm-up: final {final_pct:+.1f}%, max {max_pct:+.1f}%")
        print(f"target worker RSS <= {RSS_TARGET_MB:g} MB: max {mb(max_kb):.1f} MB  {verdict(rss_ok)}")
        print(f"target growth < {GROWTH_TARGET_PCT:g}% over the run: final {final_pct:+.1f}%  {verdict(growth_ok)}")
        print(f"'VM recycled' notices in the error log: {recycled}")
        for problem in problems:
            print(f"INVALID: {problem}")
    finally:
        stop(proc)
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if rss_ok and growth_ok and not problems else 1


def stop(proc: subprocess.Popen) -> None:
    """TERM the master, then KILL whatever is left of its session's group."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(5)


if __name__ == "__main__":
    sys.exit(main())
