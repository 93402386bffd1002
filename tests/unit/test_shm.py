"""The shared-memory store: semantics in one process, then real forked processes.

Contention, crashes (SIGKILL while holding the lock, and at every write of
an operation), queue wake-ups and metric aggregation all run in children
made with os.fork(), as the gateway's workers are.
"""

from __future__ import annotations

import ast
import os
import random
import re
import selectors
import signal
import socket
import time

import pytest
from forking import exited_ok, fork, wait

from forkgw import shm
from forkgw.shm import COUNTER, GAUGE, HISTOGRAM, Empty, NotFound, ShmStore, StoreFull, TooLarge


@pytest.fixture
def stores():
    made = []

    def make(**kw) -> ShmStore:
        store = ShmStore(**kw)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def run_all(fn, count: int, timeout: float = 15.0, together: bool = False) -> None:
    """fn(n) in count children; together: none exits before all are done (a dead one's slot is reclaimable)."""
    gate_r, gate_w = os.pipe()
    done_r, done_w = os.pipe()

    def child(n):
        os.close(gate_w)
        fn(n)
        os.write(done_w, b".")
        os.read(gate_r, 1)  # EOF once the parent lets go

    pids = [fork(child if together else fn, n) for n in range(count)]
    os.close(gate_w)
    if together:
        got = b""
        while len(got) < count:
            got += os.read(done_r, count)
    for fd in (gate_r, done_r, done_w):
        os.close(fd)
    assert all(exited_ok(pid, timeout) for pid in pids)


# -- key/value in one process --------------------------------------------------------------


def test_get_set_and_cas_semantics(stores):
    s = stores(size=1 << 20)
    assert s.get("f", b"k") is None
    c1 = s.set("f", b"k", b"v1")
    assert c1 and s.get("f", b"k") == (b"v1", c1)
    assert s.set("f", b"k", b"v2", c1 + 1) == 0  # stale cas: refused, value kept
    assert s.get("f", b"k") == (b"v1", c1)
    c2 = s.set("f", b"k", b"v3", c1)
    assert c2 > c1 and s.get("f", b"k") == (b"v3", c2)
    c3 = s.set("f", b"k", b"v4", 0)  # cas 0: unconditional
    assert c3 > c2 and s.get("f", b"k") == (b"v4", c3)
    c4 = s.set("f", b"fresh", b"x", 77)  # a missing key is created whatever the cas
    assert c4 > c3 and s.get("f", b"fresh") == (b"x", c4)
    assert s.get("g", b"k") is None  # one table per VM id
    cg = s.set("g", b"k", b"other")
    assert cg > c4 and s.get("f", b"k") == (b"v4", c3)  # CAS is global across tables
    assert s.set("f", b"", b"") and s.get("f", b"") == (b"", cg + 1)  # empty key and value
    big = bytes(range(256)) * 200
    s.set("f", b"k", big)  # grows into a bigger block
    assert s.get("f", b"k")[0] == big
    s.set("f", b"k", b"small")  # and back
    assert s.get("f", b"k")[0] == b"small"
    s._check()


def test_cas_wraps_but_is_never_zero(stores):
    s = stores(size=1 << 20)
    s._W[shm.H_CAS] = shm.U32 - 1
    assert s.set("f", b"a", b"1") == shm.U32
    assert s.set("f", b"a", b"2") == 1
    assert s.set("f", b"a", b"3", 1) == 2


def test_limits(stores):
    s = stores(size=1 << 16, max_key=8, max_value=100)
    with pytest.raises(TooLarge):
        s.set("f", b"123456789", b"v")
    assert s.get("f", b"123456789") is None
    with pytest.raises(TooLarge):
        s.set("f", b"k", b"x" * 101)
    with pytest.raises(TooLarge):
        s.set("n" * 256, b"k", b"v")
    assert s.set("f", b"12345678", b"x" * 100)
    with pytest.raises(ValueError):
        ShmStore(size=100)  # smaller than one maximum-size entry
    with pytest.raises(ValueError):
        ShmStore(size=1 << 20, eviction="slru")


def test_eviction_none_fails_clearly_and_keeps_what_it_has(stores):
    s = stores(size=16 << 10, max_key=16, max_value=1000, eviction="none")
    stored = {}
    with pytest.raises(StoreFull):
        for n in range(1000):
            key = b"k%d" % n
            s.set("f", key, bytes([n % 256]) * 400)
            stored[key] = bytes([n % 256]) * 400
    assert len(stored) == 32  # 16 KiB of 512-byte blocks
    for key, value in stored.items():
        assert s.get("f", key)[0] == value
    assert s.set("f", b"k0", b"same size, new bytes".ljust(400, b"."))  # updates in place still work
    assert s.set("f", b"k1", b"shrinks")  # and so do smaller values
    with pytest.raises(StoreFull):
        s.set("f", b"k2", b"g" * 900)  # growing needs a free bigger block
    with pytest.raises(StoreFull):
        s.set("f", b"new", b"y")
    assert s.get("f", b"k0")[0] == b"same size, new bytes".ljust(400, b".")
    assert s.get("f", b"k1")[0] == b"shrinks" and s.get("f", b"k2")[0] == stored[b"k2"]
    s._check()
    entries = stores(size=1 << 18, eviction="none", max_entries=64)
    for n in range(64):
        entries.set("f", b"%d" % n, b"v")
    with pytest.raises(StoreFull):
        entries.set("f", b"one more", b"v")
    assert entries.stats()["entries"] == 64


def test_lru_evicts_cold_entries_and_keeps_hot_ones(stores):
    s = stores(size=16 << 10, max_key=16, max_value=1000)
    s.set("f", b"hot", b"h" * 900)
    for n in range(100):
        s.set("f", b"cold%d" % n, b"c" * 900)
        assert s.get("f", b"hot") == (b"h" * 900, 1)  # read between writes: never evicted
    assert s.get("f", b"cold99") is not None
    assert s.get("f", b"cold0") is None
    assert s.stats()["evictions"] == 100 - 15  # 16 blocks of 1 KiB: the hot entry and 15 cold ones
    s._check()


@pytest.mark.parametrize("eviction", ["lru", "none"])
def test_random_operations_match_a_model(stores, eviction):
    rng = random.Random(5)
    s = stores(size=32 << 10, max_key=32, max_value=3000, eviction=eviction, max_entries=128)
    model: dict[bytes, tuple[bytes, int]] = {}
    queue = s.register_queue("f", b"q")
    items: list[bytes] = []
    for step in range(3000):
        op = rng.random()
        key = b"k%d" % rng.randrange(60)
        if op < 0.45:
            value = os.urandom(rng.choice((0, 1, 10, 40, 100, 400, 1500, 3000)))
            current = s.get("f", key)
            if key in model and current is None:
                assert eviction == "lru"
                del model[key]
            cas = rng.choice((0, current[1] if current else 0, 12345))
            try:
                new = s.set("f", key, value, cas)
            except StoreFull:
                assert eviction == "none"
                continue
            if current is not None and cas not in (0, current[1]):
                assert new == 0
            else:
                assert new != 0
                model[key] = (value, new)
        elif op < 0.8:
            got = s.get("f", key)
            if got is None:
                assert eviction == "lru" or key not in model
                model.pop(key, None)
            else:
                assert got == model[key]
        elif op < 0.9:
            data = os.urandom(rng.randrange(200))
            try:
                s.enqueue(queue, data)
                items.append(data)
            except StoreFull:
                pass
        else:
            if items:
                assert s.dequeue(queue) == items.pop(0)
            else:
                with pytest.raises(Empty):
                    s.dequeue(queue)
        if step % 100 == 0:
            s._check()
    s._check()


# -- contention and crashes ----------------------------------------------------------------


def cas_increment(s: ShmStore, key: bytes, times: int) -> int:
    """The rate limiter's loop: read, add one, write back with the cas; retry on mismatch."""
    retries = 0
    for _ in range(times):
        while True:
            value, cas = s.get("f", key)
            if s.set("f", key, b"%d" % (int(value) + 1), cas):
                break
            retries += 1
    return retries


def test_forked_processes_increment_one_counter_exactly(stores):
    s = stores(size=1 << 20)
    s.set("f", b"hits", b"0")
    workers, times = 4, 400
    run_all(lambda n: cas_increment(s, b"hits", times), workers)
    assert s.get("f", b"hits")[0] == b"%d" % (workers * times)
    s._check()


def test_a_worker_killed_while_holding_the_lock_blocks_nobody(stores):
    s = stores(size=1 << 20)
    s.set("f", b"k", b"before")
    r, w = os.pipe()

    def hold():
        s._journal.acquire()
        os.write(w, b"locked")
        time.sleep(60)

    holder = fork(hold)
    assert os.read(r, 6) == b"locked"
    waiter = fork(lambda: s.set("f", b"k", b"after"))  # blocks on the lock
    time.sleep(0.2)
    assert os.waitpid(waiter, os.WNOHANG) == (0, 0)
    os.kill(holder, signal.SIGKILL)
    wait(holder)
    assert exited_ok(waiter, 5)
    assert s.get("f", b"k")[0] == b"after"
    s._check()
    os.close(r)
    os.close(w)


def die_at(s: ShmStore, point: int, counter: list) -> None:
    """In a child: SIGKILL itself before its point-th journaled word write or commit."""
    journal = s._journal
    w, commit = journal.w, journal.commit

    def tick():
        counter[0] += 1
        if counter[0] == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def w_(i, v):
        tick()
        w(i, v)

    def wm_(*pairs):
        for t in range(0, len(pairs), 2):
            w_(pairs[t], pairs[t + 1])

    def commit_():
        tick()
        commit()

    journal.w, journal.wm, journal.commit = w_, wm_, commit_


def queue_items(s: ShmStore, qid: int) -> list[bytes]:
    W, q = s._W, s._queues.qw + 8 * (qid - 1)
    out, b = [], W[q + shm.Q_HEAD]
    while b:
        out.append(bytes(s._mm[b + shm.BLOCK_HDR:b + shm.BLOCK_HDR + W[(b >> 2) + 2]]))
        b = W[(b >> 2) + 1]
    return out


def prepared(eviction: str = "lru") -> tuple[ShmStore, int]:
    s = ShmStore(size=16 << 10, max_key=16, max_value=1000, eviction=eviction, max_entries=64)
    for n in range(5):
        s.set("f", b"k%d" % n, b"%d" % n * 100)
    q = s.register_queue("f", b"q")
    s.enqueue(q, b"first")
    s.enqueue(q, b"second")
    return s, q


OPERATIONS = {
    # name: (operation, [acceptable (key -> value) / queue states])
    "insert": lambda s, q: s.set("f", b"new", b"n" * 300),
    "update in place": lambda s, q: s.set("f", b"k1", b"u" * 100),
    "update grows": lambda s, q: s.set("f", b"k1", b"g" * 900),
    "insert evicting": lambda s, q: [s.set("f", b"x%d" % n, b"e" * 900) for n in range(8)],
    "enqueue": lambda s, q: s.enqueue(q, b"third"),
    "dequeue": lambda s, q: s.dequeue(q),
    "register": lambda s, q: s.register_queue("f", b"other"),
    "define": lambda s, q: s.define_metric(COUNTER, b"m"),
}


def snapshot(s: ShmStore, q: int):
    return ({k: s.get("f", k) for k in [b"k%d" % n for n in range(5)] + [b"new"]},
            queue_items(s, q), s._W[shm.H_NQUEUES], s._W[shm.H_NMETRICS])


@pytest.mark.parametrize("name", OPERATIONS)
def test_a_worker_killed_at_any_write_leaves_the_store_as_before(name):
    op = OPERATIONS[name]
    # how many kill points the operation has
    s, q = prepared()
    counter = [0]
    die_at(s, -1, counter)
    op(s, q)
    points = counter[0]
    after = snapshot(s, q)
    s.close()
    assert points > 0
    for point in range(1, points + 1):
        s, q = prepared()
        before = snapshot(s, q)
        pid = fork(lambda: (die_at(s, point, [0]), op(s, q)))
        status = wait(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (name, point)
        s._check()  # recovers (rolls back) first, then checks everything
        now = snapshot(s, q)
        if name == "insert evicting":  # each eviction commits: old entries may be gone, none corrupt
            assert all(v is None or v == before[0][k] for k, v in now[0].items())
            assert now[1:] == before[1:]
        else:
            assert now in (before, after), (name, point)
        s.set("f", b"k2", b"still works")
        s.close()


def test_a_torn_in_place_write_is_undone():
    s, q = prepared()
    old = s.get("f", b"k1")
    original = s._journal.overwrite

    def torn(p, data):
        half = len(data) // 2
        original(p, data[:half] + b"?" * (len(data) - half))  # as if killed mid-copy
        os.kill(os.getpid(), signal.SIGKILL)

    def child():
        s._journal.overwrite = torn
        s.set("f", b"k1", b"new value, same size".ljust(100, b"!"))

    status = wait(fork(child))
    assert os.WIFSIGNALED(status)
    assert s.get("f", b"k1") == old
    s._check()
    s.close()


# -- queues -----------------------------------------------------------------------------------


def test_queue_semantics(stores):
    s = stores(size=1 << 20)
    q = s.register_queue("f", b"jobs")
    assert s.register_queue("f", b"jobs") == q
    assert s.resolve_queue("f", b"jobs") == q
    other = s.register_queue("g", b"jobs")
    assert other != q and s.resolve_queue("g", b"jobs") == other
    with pytest.raises(NotFound):
        s.resolve_queue("f", b"nope")
    with pytest.raises(NotFound):
        s.enqueue(999, b"x")
    with pytest.raises(NotFound):
        s.dequeue(999)
    with pytest.raises(Empty):
        s.dequeue(q)
    for n in range(5):
        s.enqueue(q, b"item%d" % n)
    assert s.queue_size(q) == 5
    s.register_queue("f", b"jobs")  # registering again keeps the data
    assert [s.dequeue(q) for _ in range(5)] == [b"item%d" % n for n in range(5)]
    with pytest.raises(Empty):
        s.dequeue(q)
    s._check()


def test_queue_items_cannot_push_all_shared_data_out(stores):
    s = stores(size=16 << 10, max_key=16, max_value=1000)  # queue items: 8 KiB at most
    for n in range(8):
        s.set("f", b"k%d" % n, b"v" * 900)
    q = s.register_queue("f", b"nobody reads it")
    with pytest.raises(StoreFull):
        for _ in range(100):
            s.enqueue(q, b"i" * 900)
    assert s.queue_size(q) == 8 and s.stats()["queue_bytes"] == 8 << 10
    assert sum(s.get("f", b"k%d" % n) is not None for n in range(8)) >= 6  # half the arena is theirs
    s.dequeue(q)
    s.enqueue(q, b"room again")
    s._check()


def readable(sock: socket.socket, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(timeout))


def test_an_enqueue_in_another_process_wakes_the_owner(stores):
    s = stores(size=1 << 20)
    wake = s.attach()
    q = s.register_queue("consumer", b"jobs")
    assert s.ready_queues() == [] and not readable(wake, 0)

    def producer():
        sent = []
        notify = s._queues.notify
        s._queues.notify = lambda pid: (sent.append(pid), notify(pid))
        qid = s.resolve_queue("consumer", b"jobs")  # another VM's queue
        for n in range(3):
            s.enqueue(qid, b"job%d" % n)
        assert sent == [os.getppid()]  # three enqueues, one wake-up

    assert exited_ok(fork(producer))
    assert readable(wake, 2)
    assert s.ready_queues() == [q]
    assert s.ready_queues() == []  # taken
    assert [s.dequeue(q) for _ in range(3)] == [b"job0", b"job1", b"job2"]
    assert not readable(wake, 0)


def test_registering_again_moves_the_wake_ups_to_the_new_owner(stores):
    s = stores(size=1 << 20)
    wake = s.attach()
    q = s.register_queue("f", b"jobs")
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()

    def new_owner():
        child_wake = s.attach()
        assert s.register_queue("f", b"jobs") == q
        os.write(to_parent_w, b"registered")
        assert readable(child_wake, 5)
        assert s.ready_queues() == [q]
        assert s.dequeue(q) == b"for the child"
        os.read(to_child_r, 1)
        s.enqueue(q, b"pending")  # nobody here reads it: it moves with the ownership
        os.write(to_parent_w, b"P")

    pid = fork(new_owner)
    assert os.read(to_parent_r, 10) == b"registered"
    s.enqueue(q, b"for the child")
    os.write(to_child_w, b"x")
    assert os.read(to_parent_r, 1) == b"P"
    assert exited_ok(pid)
    assert not readable(wake, 0.1)  # the parent no longer owns it
    s.detach(pid)
    s.register_queue("f", b"jobs")  # back to the parent, which had an item pending
    assert readable(wake, 2)
    assert s.ready_queues() == [q] and s.dequeue(q) == b"pending"
    for fd in (to_child_r, to_child_w, to_parent_r, to_parent_w):
        os.close(fd)


# -- metrics ----------------------------------------------------------------------------------


def test_metric_semantics_in_one_process(stores):
    s = stores(size=1 << 20)
    c = s.define_metric(COUNTER, b"requests")
    assert s.define_metric(COUNTER, b"requests") == c
    assert s.define_metric(GAUGE, b"requests") == c  # idempotent per name
    s.increment(c, 5)
    s.record(c, 2)  # Envoy: a counter's record adds
    assert s.get_metric(c) == 7
    with pytest.raises(ValueError):
        s.increment(c, -1)
    g = s.define_metric(GAUGE, "inflight")
    s.record(g, 9)
    s.increment(g, -2)
    assert s.get_metric(g) == 7
    s.increment(g, -10)
    assert s.get_metric(g) == -3
    h = s.define_metric(HISTOGRAM, b"latency")
    s.record(h, 12)
    with pytest.raises(ValueError):
        s.get_metric(h)
    with pytest.raises(ValueError):
        s.increment(h, 1)
    for bad in (0, 999, -1):
        with pytest.raises(NotFound):
            s.increment(bad, 1)
        with pytest.raises(NotFound):
            s.get_metric(bad)
    with pytest.raises(TooLarge):
        s.define_metric(COUNTER, b"x" * 257)
    assert s.counter("hits", {"code": 200}) is s.counter("hits", {"code": 200})
    assert s.counter("hits", {"b": 1, "a": 2}).id == s.counter("hits", {"a": 2, "b": 1}).id
    assert s.histogram("h", buckets=(1, 2)).bounds == (1.0, 2.0)


def test_metrics_add_up_across_processes(stores):
    s = stores(size=1 << 20, slots=4)  # 3 lock-free slots: the 4th and 5th child share slot 0
    s.define_metric(COUNTER, b"early")
    r, w = os.pipe()

    def worker(n):
        s.attach()
        counter = s.counter("forkgw_requests_total", {"status": "200"})
        ids = (s.define_metric(COUNTER, b"wasm.calls"), counter.id, s.define_metric(COUNTER, b"early"))
        os.write(w, repr((ids, s._metrics.slot, n)).encode().ljust(64))
        hist = s.histogram("forkgw_request_seconds")
        gauge = s.gauge("forkgw_active_connections")
        for _ in range(1000):
            counter.add()
            s.increment(ids[0], 2)
            hist.observe(0.02)
            gauge.add(1)
            gauge.add(-1)
        gauge.add(n + 1)  # n+1 connections still open when it exits
        hist.observe(100)

    run_all(worker, 5, together=True)
    reports = [ast.literal_eval(os.read(r, 64).decode().strip()) for _ in range(5)]
    assert len({ids for ids, _, _ in reports}) == 1  # every process got the same ids
    assert sorted(slot for _, slot, _ in reports) == [0, 0, 1, 2, 3]
    counter = s.counter("forkgw_requests_total", {"status": "200"})
    assert counter.value() == 5000
    assert s.get_metric(s.define_metric(COUNTER, b"wasm.calls")) == 10000
    buckets, count, total = s.histogram("forkgw_request_seconds").snapshot()
    assert count == 5005 and sum(buckets) == 5005 and buckets[-1] == 5
    assert total == pytest.approx(5000 * 0.02 + 500)
    gauge = s.gauge("forkgw_active_connections")
    assert gauge.value() == 1 + 2 + 3 + 4 + 5
    text = s.render_prometheus()
    assert 'forkgw_requests_total{status="200"} 5000' in text
    assert "wasm_calls 10000" in text
    # the master reaps them: their connections went with them, their counts stay
    for slot in range(1, 4):
        s.detach(s._W[s._metrics.sw + slot])
    assert gauge.value() == sum(n + 1 for _, slot, n in reports if slot == 0)
    assert counter.value() == 5000 and s.stats()["slots_used"] == 0
    gauge.set(42)
    assert gauge.value() == 42
    os.close(r)
    os.close(w)


def test_a_gauge_set_in_one_process_wins_over_older_deltas(stores):
    s = stores(size=1 << 20)
    gauge = s.gauge("g")

    def add(n):
        s.attach()
        s.gauge("g").add(10)

    run_all(add, 2, together=True)
    assert gauge.value() == 20
    gauge.set(5)
    assert gauge.value() == 5
    run_all(add, 1)
    assert gauge.value() == 15


def test_attach_reclaims_the_slots_of_dead_processes(stores):
    s = stores(size=1 << 20, slots=3)
    run_all(lambda n: (s.attach(), s.gauge("g").add(1), s.counter("c").add(1)), 4, together=True)
    assert s.stats()["slots_used"] == 2  # two children held the slots, two used the shared one
    assert s.counter("c").value() == 4 and s.gauge("g").value() == 4
    s.attach()  # nobody detached them: attach finds them dead
    assert s.stats()["slots_used"] == 1 and s._metrics.slot
    assert s.gauge("g").value() == 2 and s.counter("c").value() == 4


def test_prometheus_text(stores):
    s = stores(size=1 << 20)
    s.counter("forkgw_requests_total", {"status": 200, "server": 'a"b\\c\nd'}).add(3)
    s.counter("forkgw_requests_total", {"status": 404}).add()
    s.gauge("forkgw_active_connections").add(-2)
    hist = s.histogram("forkgw_upstream_seconds", {"upstream": "api"}, buckets=(0.1, 1))
    for v in (0.05, 0.5, 0.5, 7):
        hist.observe(v)
    s.define_metric(COUNTER, b"wasm.my-filter/calls")
    s.define_metric(GAUGE, b"9lives")
    s.define_metric(GAUGE, b"forkgw_requests_total")  # same family name, other type: renamed
    wasm_hist = s.define_metric(HISTOGRAM, b"envoy.latency")
    s.record(wasm_hist, 30)
    text = s.render_prometheus()
    lines = text.splitlines()
    assert text.endswith("\n")
    assert lines.count("# TYPE forkgw_requests_total counter") == 1
    assert 'forkgw_requests_total{server="a\\"b\\\\c\\nd",status="200"} 3' in lines
    assert 'forkgw_requests_total{status="404"} 1' in lines
    assert "# TYPE forkgw_active_connections gauge" in lines and "forkgw_active_connections -2" in lines
    at = lines.index("# TYPE forkgw_upstream_seconds histogram")
    assert lines[at + 1:at + 6] == [
        'forkgw_upstream_seconds_bucket{upstream="api",le="0.1"} 1',
        'forkgw_upstream_seconds_bucket{upstream="api",le="1.0"} 3',
        'forkgw_upstream_seconds_bucket{upstream="api",le="+Inf"} 4',
        f'forkgw_upstream_seconds_sum{{upstream="api"}} {0.05 + 0.5 + 0.5 + 7!r}',
        'forkgw_upstream_seconds_count{upstream="api"} 4',
    ]
    assert "wasm_my_filter_calls 0" in lines and "# TYPE wasm_my_filter_calls counter" in lines
    assert "_9lives 0" in lines
    assert "# TYPE forkgw_requests_total_gauge gauge" in lines
    assert 'envoy_latency_bucket{le="25.0"} 0' in lines and 'envoy_latency_bucket{le="50.0"} 1' in lines
    sample = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? \S+$')
    for line in lines:
        assert line.startswith("# TYPE ") or sample.match(line), line


# -- plumbing ---------------------------------------------------------------------------------


def test_an_execd_master_reopens_the_store_from_its_fd(stores):
    s = stores(size=1 << 20)
    s.set("f", b"k", b"v")
    s.counter("c").add(2)
    again = ShmStore.open(os.dup(s.fileno()))
    try:
        assert again.get("f", b"k") == s.get("f", b"k")
        assert again.counter("c").value() == 2
        assert again._token == s._token  # wake sockets keep their names
        again.set("f", b"k", b"w")
        assert s.get("f", b"k")[0] == b"w"
    finally:
        again.close()


def test_stats(stores):
    s = stores(size=1 << 20, eviction="none")
    s.set("f", b"k", b"v")
    st = s.stats()
    assert st["entries"] == 1 and st["eviction"] == "none"
    assert 0 < st["arena_bytes"] - st["free_bytes"] <= 64
