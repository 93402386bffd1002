"""The host functions over the shared-memory store (ShmShared), in forked workers.

A worker hands its ShmShared to Runtime(shared=...); without one the Runtime
builds `runtime.LocalShared`, which most of these tests swap for a ShmShared
over one store made before the forks, so the cases written for the per-worker
store run unchanged.
"""

from __future__ import annotations

import selectors
import time

import pytest
from forking import exited_ok, fork

from forkgw import shm
from forkgw.conf.model import FilterRef
from forkgw.log import ErrorLog
from forkgw.wasm import Runtime, compile_modules
from forkgw.wasm.abi import MetricType, Status
from forkgw.wasm.shared import ShmShared

from . import test_failures as failures
from . import test_hostcalls as hostcalls
from .conftest import Wat, on, run_request
from .test_hostcalls import RET, U32_OUT, logged, ret, st


@pytest.fixture
def store(monkeypatch):
    s = shm.ShmStore(size=1 << 20)
    monkeypatch.setattr("forkgw.wasm.runtime.LocalShared", lambda: ShmShared(s))
    yield s
    s.close()


@pytest.mark.parametrize("case", [
    hostcalls.test_shared_data_with_cas,
    hostcalls.test_metrics,
    hostcalls.test_shared_queue_and_on_queue_ready,
    failures.test_failed_rebuild_is_logged_and_retried,  # shared data outlives a VM rebuild
], ids=lambda case: case.__name__)
def test_same_statuses_as_the_per_worker_store(store, h, monkeypatch, case):
    if "monkeypatch" in case.__code__.co_varnames[:case.__code__.co_argcount]:
        case(h, monkeypatch)
    else:
        case(h)
    assert isinstance(h.runtimes[0].shared, ShmShared)


CAS_INCREMENT = """
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $cas i32)
    (loop $retry
      (if (call $proxy_get_shared_data {key} (i32.const 16) (i32.const 20) (i32.const 24)) (then unreachable))
      (local.set $cas (i32.load (i32.const 24)))
      (i32.store (i32.const 48) (i32.add (i32.load (i32.load (i32.const 16))) (i32.const 1)))
      (br_if $retry (call $proxy_set_shared_data {key} (i32.const 48) (i32.const 4) (local.get $cas))))
    (if (call $proxy_define_metric (i32.const 0) {metric} (i32.const 40)) (then unreachable))
    (if (call $proxy_increment_metric (i32.load (i32.const 40)) (i64.const 1)) (then unreachable))
    (i32.const 0))
"""


def test_filters_in_every_worker_count_exactly_with_cas(store, h):
    """The rate limiter's building block: read, add one, set with the cas, retry on mismatch."""
    w = Wat()
    conf = h.wasm({"f": w.build(CAS_INCREMENT.format(key=w.s("hits"), metric=w.s("wasm.hits")))})
    compiled = compile_modules(conf)
    store.set("f", b"hits", (0).to_bytes(4, "little"))
    workers, requests = 3, 150

    def worker():
        runtime = Runtime(conf, compiled, ErrorLog(h.log_path, "info"))
        filters = [FilterRef(module="f")]
        runtime.start(filters)
        for _ in range(requests):
            _, reply, _ = run_request(runtime, filters)
            assert reply is None
        runtime.close()

    pids = [fork(worker) for _ in range(workers)]
    assert all(exited_ok(pid, 20.0) for pid in pids)
    value, _ = store.get("f", b"hits")
    assert int.from_bytes(value, "little") == workers * requests
    assert store.get_metric(store.define_metric(MetricType.COUNTER, b"wasm.hits")) == workers * requests
    assert f"wasm_hits {workers * requests}\n" in store.render_prometheus()


def test_the_shared_state_given_at_construction_is_the_one_filters_use(h):
    """The worker hands its ShmShared to Runtime(shared=...): no per-worker default stands in for it."""
    s = shm.ShmStore(size=1 << 20)
    try:
        w = Wat()
        conf = h.wasm({"f": w.build(CAS_INCREMENT.format(key=w.s("hits"), metric=w.s("wasm.hits")))})
        s.set("f", b"hits", (0).to_bytes(4, "little"))
        shared = ShmShared(s)
        runtime = Runtime(conf, compile_modules(conf), ErrorLog(h.log_path, "info"), shared=shared)
        assert runtime.shared is shared
        filters = [FilterRef(module="f")]
        runtime.start(filters)
        try:
            for _ in range(3):
                assert run_request(runtime, filters)[1] is None
        finally:
            runtime.close()
        assert int.from_bytes(s.get("f", b"hits")[0], "little") == 3
    finally:
        s.close()


def test_on_queue_ready_runs_in_the_worker_that_registered_the_queue(store, h):
    w = Wat()
    consumer = w.build(
        on("proxy_on_configure", st(w, "register", f"(call $proxy_register_shared_queue {w.s('jobs')} {U32_OUT})"))
        + on("proxy_on_queue_ready", " ".join([
            st(w, "ready", "(local.get 1)"),
            st(w, "dequeue", f"(call $proxy_dequeue_shared_queue (local.get 1) {RET})"),
            ret(w, "item"),
            st(w, "dequeue_empty", f"(call $proxy_dequeue_shared_queue (local.get 1) {RET})"),
        ])))
    w2 = Wat()
    producer = w2.build(on("proxy_on_request_headers", " ".join([
        st(w2, "resolve", f"(call $proxy_resolve_shared_queue {w2.s('consumer')} {w2.s('jobs')} {U32_OUT})"),
        st(w2, "enqueue", f"(call $proxy_enqueue_shared_queue (i32.load (i32.const 24)) {w2.s('from another worker')})"),
    ])))
    conf = h.wasm({"consumer": consumer, "producer": producer})
    compiled = compile_modules(conf)
    runtime = Runtime(conf, compiled, ErrorLog(h.log_path, "info"))
    try:
        runtime.start([FilterRef(module="consumer")])
        wake = runtime.shared.wake
        selector = selectors.DefaultSelector()
        selector.register(wake, selectors.EVENT_READ)  # what the worker's loop does
        assert runtime.tick(time.monotonic()) is None and not selector.select(0)  # idle: nothing to poll

        def producer_worker():
            other = Runtime(conf, compiled, ErrorLog(h.log_path, "info"))
            other.start([FilterRef(module="producer")])
            run_request(other, [FilterRef(module="producer")])
            other.close()

        assert exited_ok(fork(producer_worker), 20.0)
        assert selector.select(5)  # the enqueue woke this worker
        runtime.tick(time.monotonic())  # the worker's handler for a readable wake socket
        assert not selector.select(0)
        logged(h.guest_lines(), "register=0", "resolve=0", "enqueue=0", "ready=1", "dequeue=0",
               "item:from another worker", "dequeue_empty=7")
        selector.close()
    finally:
        runtime.close()


def test_statuses_when_the_store_is_full_or_the_data_too_large():
    s = shm.ShmStore(size=8 << 10, max_key=16, max_value=1000, eviction="none", max_queues=1,
                     max_metrics=1, max_metric_name=8)
    try:
        shared = ShmShared(s)
        assert shared.set_data("f", b"k" * 17, b"v", 0) == Status.BAD_ARGUMENT
        assert shared.get_data("f", b"k" * 17) is None
        assert shared.set_data("f", b"k", b"v" * 1001, 0) == Status.BAD_ARGUMENT
        for n in range(8):
            assert shared.set_data("f", b"%d" % n, b"v" * 900, 0) == Status.OK
        assert shared.set_data("f", b"full", b"v", 0) == Status.INTERNAL_FAILURE
        cas = shared.get_data("f", b"1")[1]
        assert shared.set_data("f", b"1", b"w" * 900, cas + (1 << 32)) == Status.OK  # cas is a u32
        assert shared.register_queue("f", b"q", owner=None) == 0  # no room for its name
        assert shared.enqueue(0, b"x") == Status.NOT_FOUND
        assert shared.dequeue(5) == Status.NOT_FOUND
        assert shared.define_metric(MetricType.COUNTER, b"far too long") == 0
        assert shared.increment_metric(0, 1) == Status.NOT_FOUND
        first = shared.define_metric(MetricType.GAUGE, b"g")
        assert first and shared.define_metric(MetricType.COUNTER, b"other") == 0  # table full
        assert shared.record_metric(first, (1 << 64) - 1) == Status.OK
        assert shared.get_metric(first) == (1 << 64) - 1  # u64 on the wire
        assert shared.take_ready() == [] and shared.ready == []
    finally:
        s.close()
