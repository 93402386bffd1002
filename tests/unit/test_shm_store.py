"""The store as composed: its interface names, what a forked child forgets, attach and detach.

The semantics of each operation are tested in test_shm.py (through the store)
and in the tests of each part; these check the wiring between them.
"""

from __future__ import annotations

import os

from forking import exited_ok, fork

from forkgw import shm
from forkgw.shm import ShmStore


def test_the_interface_names_import_from_the_package():
    assert shm.__all__ == ["ShmStore", "StoreError", "StoreFull", "TooLarge", "NotFound", "Empty",
                           "COUNTER", "GAUGE", "HISTOGRAM", "ENVOY_BUCKETS", "SECONDS_BUCKETS"]
    for name in shm.__all__ + ["Counter", "Gauge", "Histogram", "sanitize_name", "KIND_NAMES", "MAX_BUCKETS",
                               "U32", "U64", "H_CAS", "H_NQUEUES", "H_NMETRICS", "Q_HEAD", "BLOCK_HDR"]:
        assert getattr(shm, name) is not None, name
    assert issubclass(shm.TooLarge, ValueError) and issubclass(shm.NotFound, LookupError)
    assert all(issubclass(e, shm.StoreError) for e in (shm.StoreFull, shm.TooLarge, shm.NotFound, shm.Empty))
    assert (shm.COUNTER, shm.GAUGE, shm.HISTOGRAM) == (0, 1, 2)


def test_a_forked_child_has_no_slot_and_no_wake_socket_until_it_attaches():
    s = ShmStore(size=1 << 20, slots=4)
    try:
        wake = s.attach()
        assert s.attach() is wake and s._metrics.slot == 1
        counter = s.counter("c")

        def child():
            assert s._pid == os.getpid() and s._metrics.slot == 0 and s._queues.wake is None
            counter.add(1)  # the shared slot, under the lock: never the parent's slot
            assert s.attach() is not wake and s._metrics.slot == 2
            counter.add(10)

        assert exited_ok(fork(child))
        assert counter.value() == 11 and s._metrics.slot == 1 and s._queues.wake is wake
        qid = s.register_queue("f", b"q")
        assert s.resolve_queue("f", b"q") == qid
        s.detach()
        assert s._metrics.slot == 0 and s._queues.wake is None and wake.fileno() == -1
        counter.add(1)
        assert counter.value() == 12
    finally:
        s.close()


def test_two_stores_over_one_fd_share_everything():
    s = ShmStore(size=1 << 20, max_key=32, max_value=1000, eviction="none")
    again = ShmStore.open(os.dup(s.fileno()))
    try:
        assert again._g.args == s._g.args and again._token == s._token
        s.set("f", b"k", b"v")
        qid = s.register_queue("f", b"q", pid=1)
        s.enqueue(qid, b"item")
        s.counter("c", {"a": 1}).add(2)
        assert again.get("f", b"k") == s.get("f", b"k")
        assert again.resolve_queue("f", b"q") == qid and again.dequeue(qid) == b"item"
        assert again.counter("c", {"a": 1}).value() == 2 and again.render_prometheus() == s.render_prometheus()
        assert again.stats() == s.stats()
        again._check()
    finally:
        again.close()
        s.close()
