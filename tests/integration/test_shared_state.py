"""Shared data, shared queues and filter metrics across workers, through the real gateway (issue 5).

Every test runs 2 workers and spreads its traffic over many connections sent
from several threads at once, so that both workers serve (checked through the
`$pid` of each request).  The filters are WAT modules built here:

- `shared_count`: on request headers, increments shared key "hits" with CAS
  retries; with a limit as plugin config it answers 429 once the count before
  the increment reaches the limit (a rate limiter that holds across workers);
  with config `r` it only reports "hits" as the response header x-hits.
- `shared_q`: config `consume` registers queue "q" (each worker does; the last
  to register owns it) and logs every item it dequeues; config `produce`
  resolves "q" and enqueues the request's x-item header.
- `shared_metric`: a counter "wasm_requests" incremented per request.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import wait_for
from wasm.conftest import Wat

RET = "(i32.const 16) (i32.const 20)"
CAS = "(i32.const 24)"
NUM = 0x4000          # scratch for a formatted number
ROOT_MODE = 0x5000    # 4 * (root id & 15): -1 = read only, 0 = no limit, N = limit
PARENTS = 0x6000      # 4 * (context id & 1023): the root of an HTTP context


def root_slot(root: str) -> str:
    return f"(i32.add (i32.const {ROOT_MODE}) (i32.shl (i32.and {root} (i32.const 15)) (i32.const 2)))"


def parent_slot(ctx: str) -> str:
    return f"(i32.add (i32.const {PARENTS}) (i32.shl (i32.and {ctx} (i32.const 1023)) (i32.const 2)))"


PARSE_RET = """
  ;; the decimal number in the bytes the host returned at RET
  (func $atoi_ret (result i32)
    (local $p i32) (local $end i32) (local $n i32)
    (local.set $p (i32.load (i32.const 16)))
    (local.set $end (i32.add (local.get $p) (i32.load (i32.const 20))))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
      (local.set $n (i32.add (i32.mul (local.get $n) (i32.const 10))
        (i32.sub (i32.load8_u (local.get $p)) (i32.const 48))))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (br $next)))
    (local.get $n))"""

TRACK_PARENT = f"""
  (func (export "proxy_on_context_create") (param $ctx i32) (param $parent i32)
    (if (local.get $parent) (then (i32.store {parent_slot("(local.get $ctx)")} (local.get $parent)))))"""


def count_module() -> bytes:
    """The CAS counter / rate limiter / reader of shared key "hits"."""
    w = Wat()
    hits = w.s("hits")
    return w.build(PARSE_RET + TRACK_PARENT + f"""
  ;; the key exists before any traffic (a missing key is created whatever the cas,
  ;; so two workers creating it at once would both win)
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (if (i32.eq (call $proxy_get_shared_data {hits} {RET} {CAS}) (i32.const 1))
      (then (drop (call $proxy_set_shared_data {hits} {w.s("0")} (i32.const 0)))))
    (i32.const 1))
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (local $mode i32)
    (if (i32.eqz (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (local.get $size) {RET}))
      (then
        (if (i32.eq (i32.load8_u (i32.load (i32.const 16))) (i32.const 114))  ;; 'r'
          (then (local.set $mode (i32.const -1)))
          (else (local.set $mode (call $atoi_ret))))))
    (i32.store {root_slot("(local.get $root)")} (local.get $mode))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (local $limit i32) (local $n i32) (local $cas i32) (local $status i32)
    (local.set $limit (i32.load {root_slot(f"(i32.load {parent_slot('(local.get $ctx)')})")}))
    (if (i32.eq (local.get $limit) (i32.const -1)) (then (return (i32.const 0))))
    (loop $retry
      (local.set $status (call $proxy_get_shared_data {hits} {RET} {CAS}))
      (if (i32.eqz (local.get $status))
        (then (local.set $n (call $atoi_ret)) (local.set $cas (i32.load (i32.const 24))))
        (else (local.set $n (i32.const 0)) (local.set $cas (i32.const 0))))
      (if (i32.and (i32.ne (local.get $limit) (i32.const 0)) (i32.ge_u (local.get $n) (local.get $limit)))
        (then
          (drop (call $proxy_send_local_response (i32.const 429) {w.s("rate limited")} {w.s("limited")}
            (i32.const 0) (i32.const 0) (i32.const -1)))
          (return (i32.const 0))))
      (local.set $status (call $proxy_set_shared_data {hits}
        (i32.const {NUM}) (call $itoa (i32.add (local.get $n) (i32.const 1)) (i32.const {NUM}))
        (local.get $cas)))
      (br_if $retry (i32.eq (local.get $status) (i32.const 8))))
    (if (local.get $status) (then
      (call $log_num {w.s("set_failed")} (local.get $status))
      (drop (call $proxy_send_local_response (i32.const 500) {w.s("set failed")} {w.s("set failed")}
        (i32.const 0) (i32.const 0) (i32.const -1)))))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param i32 i32) (result i32)
    (if (i32.ne (i32.load {root_slot(f"(i32.load {parent_slot('(local.get $ctx)')})")}) (i32.const -1))
      (then (return (i32.const 0))))
    (if (i32.eqz (call $proxy_get_shared_data {hits} {RET} {CAS}))
      (then (drop (call $proxy_add_header_map_value (i32.const 2) {w.s("x-hits")}
        (i32.load (i32.const 16)) (i32.load (i32.const 20))))))
    (i32.const 0))""")


def queue_module() -> bytes:
    """Consumer (config `consume`) and producer (config `produce`) of queue "q"."""
    w = Wat()
    name = w.s("q")
    return w.build(TRACK_PARENT + f"""
  (global $qid (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (local $mode i32)
    (if (i32.eqz (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (local.get $size) {RET}))
      (then (local.set $mode (i32.load8_u (i32.load (i32.const 16))))))
    (i32.store {root_slot("(local.get $root)")} (local.get $mode))
    (if (i32.eq (local.get $mode) (i32.const 99))  ;; 'c'
      (then
        (if (call $proxy_register_shared_queue {name} (i32.const 24)) (then (return (i32.const 0))))
        (call $log_num {w.s("registered")} (i32.load (i32.const 24)))))
    (i32.const 1))
  (func (export "proxy_on_queue_ready") (param $root i32) (param $queue i32)
    (local $status i32) (local $size i32)
    (loop $more
      (local.set $status (call $proxy_dequeue_shared_queue (local.get $queue) {RET}))
      (if (i32.eqz (local.get $status)) (then
        (local.set $size (i32.load (i32.const 20)))
        (memory.copy (i32.const 0x100) {w.s("consumed:")})
        (memory.copy (i32.const 0x109) (i32.load (i32.const 16)) (local.get $size))
        (drop (call $proxy_log (i32.const 3) (i32.const 0x100) (i32.add (i32.const 9) (local.get $size))))
        (br $more))))
    (if (i32.ne (local.get $status) (i32.const 7)) (then (call $log_num {w.s("dequeue_failed")} (local.get $status)))))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (local $status i32)
    (if (i32.ne (i32.load {root_slot(f"(i32.load {parent_slot('(local.get $ctx)')})")}) (i32.const 112))  ;; 'p'
      (then (return (i32.const 0))))
    (if (i32.eqz (global.get $qid)) (then
      (local.set $status (call $proxy_resolve_shared_queue {w.s("shared_q")} {name} (i32.const 24)))
      (if (local.get $status) (then
        (call $log_num {w.s("resolve_failed")} (local.get $status))
        (drop (call $proxy_send_local_response (i32.const 500) {w.s("no queue")} {w.s("no queue")}
          (i32.const 0) (i32.const 0) (i32.const -1)))
        (return (i32.const 0))))
      (global.set $qid (i32.load (i32.const 24)))))
    (local.set $status (call $proxy_get_header_map_value (i32.const 0) {w.s("x-item")} {RET}))
    (if (i32.eqz (local.get $status)) (then
      (local.set $status (call $proxy_enqueue_shared_queue (global.get $qid)
        (i32.load (i32.const 16)) (i32.load (i32.const 20))))))
    (if (local.get $status) (then
      (call $log_num {w.s("enqueue_failed")} (local.get $status))
      (drop (call $proxy_send_local_response (i32.const 500) {w.s("enqueue failed")} {w.s("enqueue failed")}
        (i32.const 0) (i32.const 0) (i32.const -1)))))
    (i32.const 0))""")


def metric_module() -> bytes:
    """A counter "wasm_requests", defined at configure time and incremented per request."""
    w = Wat()
    return w.build(f"""
  (global $metric (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (if (call $proxy_define_metric (i32.const 0) {w.s("wasm_requests")} (i32.const 24))
      (then (return (i32.const 0))))
    (global.set $metric (i32.load (i32.const 24)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (local $status i32)
    (local.set $status (call $proxy_increment_metric (global.get $metric) (i64.const 1)))
    (if (local.get $status) (then (call $log_num {w.s("increment_failed")} (local.get $status))))
    (i32.const 0))""")


def start(gateway, locations: str, **modules: bytes):
    out = gateway.write_filters(**modules)
    lines = [f"    module {name} {out}/{name}.wasm;" for name in modules]
    gateway.start("wasm {\n" + "\n".join(lines) + "\n}\n" + """
http {
    log_format pids '$pid $status $request_uri';
    access_log logs/access.log pids;
    server { listen 127.0.0.1:{port};
""" + locations + """
        location = /metrics { forkgw_metrics; }
    }
}""", workers=2)
    return gateway


def burst(gateway, paths: list[str], threads: int = 8, headers=None) -> list[tuple[int, dict, bytes]]:
    """Each path on its own connection, `threads` at a time (so both workers accept)."""
    def one(i):
        return gateway.request("GET", paths[i], headers=headers(i) if headers else None)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(len(paths))))


def served_by(gateway, uri_prefix: str) -> dict[int, int]:
    """Worker pid -> requests under uri_prefix that the access log records."""
    def read():
        text = gateway.access_log.read_text() if gateway.access_log.exists() else ""
        return [line.split() for line in text.splitlines() if line.split()[2].startswith(uri_prefix)]

    counts: dict[int, int] = {}
    for pid, _, _ in read():
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


def both_workers(gateway, uri_prefix: str, total: int) -> dict[int, int]:
    """The access log shows `total` requests under uri_prefix, served by both workers."""
    pids = set(gateway.worker_pids())
    counts = wait_for(lambda: sum(served_by(gateway, uri_prefix).values()) == total
                      and served_by(gateway, uri_prefix), 5)
    assert set(counts) == pids, (counts, pids)
    return counts


def test_rate_limit_holds_across_workers(gateway):
    """The limit counts every worker's requests: one shared counter, not one per worker."""
    start(gateway, 'location /limited { return 200 "$pid"; proxy_wasm shared_count 10; }',
          shared_count=count_module())
    results = burst(gateway, [f"/limited/{i}" for i in range(30)], threads=6)
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 20, statuses
    assert all(body == b"limited" for status, _, body in results if status == 429)
    both_workers(gateway, "/limited/", 30)


def test_cas_increments_exact_under_contention(gateway):
    """200 concurrent CAS increments from both workers lose none and double none."""
    start(gateway, """
        location /count { return 200 "$pid"; proxy_wasm shared_count 0; }
        location = /read { return 200 "$pid"; proxy_wasm shared_count r; }""",
          shared_count=count_module())
    results = burst(gateway, [f"/count/{i}" for i in range(200)], threads=16)
    assert [status for status, _, _ in results] == [200] * 200
    assert "set_failed" not in gateway.log_text()
    both_workers(gateway, "/count/", 200)
    for _ in range(4):  # the same answer from whichever worker reads it
        status, headers, _ = gateway.request("GET", "/read")
        assert (status, headers.get("x-hits")) == (200, "200")


def test_queue_items_cross_workers_consumed_once(gateway):
    """Producers in both workers; the owner (the last worker to register) gets every item once, promptly."""
    start(gateway, """
        location = /consumer { return 200 "$pid"; proxy_wasm shared_q consume; }
        location /produce { return 200 "$pid"; proxy_wasm shared_q produce; }""",
          shared_q=queue_module())
    registered = [int(pid) for pid in re.findall(r"\] (\d+)#0: .*registered=1\b", gateway.log_text())]
    assert sorted(registered) == sorted(gateway.worker_pids())  # each worker registered the same queue
    n = 60
    results = burst(gateway, [f"/produce/{i}" for i in range(n)], threads=6,
                    headers=lambda i: {"x-item": f"item-{i}"})
    sent = time.monotonic()
    assert [status for status, _, _ in results] == [200] * n
    producers = both_workers(gateway, "/produce/", n)

    def consumed():
        found = re.findall(r"\] (\d+)#0: .*consumed:(\S+)", gateway.log_text())
        return found if len(found) >= n else None

    found = wait_for(consumed, 2.0)
    assert time.monotonic() - sent < 2.0
    items = sorted(item for _, item in found)
    assert items == sorted(f"item-{i}" for i in range(n))  # each exactly once
    consumers = {int(pid) for pid, _ in found}
    assert len(consumers) == 1, consumers  # only the owner gets proxy_on_queue_ready
    owner = consumers.pop()
    assert owner in registered
    assert set(producers) - {owner}  # some items crossed from the other worker
    assert not re.search(r"(dequeue|enqueue|resolve)_failed", gateway.log_text())


def test_filter_metric_summed_over_workers_on_endpoint(gateway):
    """A filter's counter is one series over all workers, next to the gateway's own metrics."""
    start(gateway, 'location /m { return 200 "$pid"; proxy_wasm shared_metric; }',
          shared_metric=metric_module())
    n = 40
    results = burst(gateway, [f"/m/{i}" for i in range(n)], threads=8)
    assert [status for status, _, _ in results] == [200] * n
    both_workers(gateway, "/m/", n)
    status, _, body = gateway.request("GET", "/metrics")
    text = body.decode()
    assert status == 200
    assert "# TYPE wasm_requests counter" in text.splitlines(), text
    assert re.search(r"^wasm_requests (\d+)$", text, re.M).group(1) == str(n), text
    assert "increment_failed" not in gateway.log_text()
    gateway_200 = re.search(r'^forkgw_http_requests_total\{status="200"\} (\d+)$', text, re.M)
    assert gateway_200 and int(gateway_200.group(1)) >= n, text  # the gateway's own series alongside
