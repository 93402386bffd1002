"""The metric registry and its handles on their own: definitions, cells, slots, lock-free updates.

A registry runs over a real shared mapping with its own journal; values are
checked both through the handles and as raw cells, and the per-process slots
with real forked processes.
"""

from __future__ import annotations

import os

import pytest
from forking import exited_ok, fork

from forkgw.shm.errors import NotFound, StoreFull, TooLarge
from forkgw.shm.handles import COUNTER, GAUGE, HISTOGRAM, Counter, Gauge, Histogram, add_wrapping, wrap64
from forkgw.shm.journal import Journal
from forkgw.shm.layout import H_NCELLS, MAX_BUCKETS, U64, Geometry, Memory
from forkgw.shm.metrics import ENVOY_BUCKETS, Metrics
from shm_parts import made_fixture

SLOTS = 4


class Parts:
    def __init__(self, max_metrics=16, metric_cells=None):
        self.g = Geometry(16 << 10, 16, 1000, "lru", None, 8, max_metrics, 32, metric_cells, SLOTS, None)
        self.mem = Memory(self.g)
        self.j = Journal(self.mem, self.g)
        self.metrics = Metrics(self.mem, self.j, self.g)

    def close(self) -> None:
        self.metrics.clear()
        self.mem.close()

    def cells(self, handle, cell: int = 0) -> list[int]:
        """The per-slot values of one of the handle's cells."""
        d = self.metrics.read_def(handle.id)
        at = self.metrics.cq + (d.cell + cell) * SLOTS
        return self.mem.Q[at:at + SLOTS].tolist()


made = made_fixture(Parts)


def test_definitions_are_one_per_name_with_consecutive_cells(made):
    p = made()
    m = p.metrics
    c = m.define(COUNTER, b"c")
    assert m.define(HISTOGRAM, "c") == c == 1  # idempotent per name, whatever the kind
    g = m.define(GAUGE, "g")
    h = m.define(HISTOGRAM, b"h", buckets=(5, 1, 1, float("inf"), 2))
    cells = [(d.cell, d.ncells) for d in (m.read_def(c), m.read_def(g), m.read_def(h))]
    assert cells == [(0, 1), (1, 2), (3, 3 + 3)]  # counter 1, gauge value+epoch, buckets+Inf+count+sum
    assert m.read_def(h).bounds == (1.0, 2.0, 5.0) and p.mem.W[H_NCELLS] == 9
    assert m.read_def(m.define(HISTOGRAM, b"envoy")).bounds == tuple(float(b) for b in ENVOY_BUCKETS)
    other = Metrics(p.mem, p.j, p.g)  # another process's registry reads the same definitions
    assert other.define(COUNTER, b"c") == c and other.read_def(h).name == b"h"


def test_definition_limits(made):
    m = made(max_metrics=2, metric_cells=4).metrics
    with pytest.raises(ValueError, match="unknown metric kind"):
        m.define(7, b"x")
    with pytest.raises(TooLarge, match="name over 32"):
        m.define(COUNTER, b"x" * 33)
    with pytest.raises(TooLarge, match="buckets"):
        m.define(HISTOGRAM, b"x", buckets=range(MAX_BUCKETS + 1))
    m.define(GAUGE, b"a")
    with pytest.raises(StoreFull, match="cells"):
        m.define(HISTOGRAM, b"b", buckets=(1,))  # 4 cells, 2 left
    m.define(GAUGE, b"b")
    with pytest.raises(StoreFull, match="2 metrics"):
        m.define(COUNTER, b"c")
    with pytest.raises(NotFound):
        m.metric(3)


def test_without_a_slot_updates_go_to_the_shared_slot(made):
    p = made()
    m = p.metrics
    c = m.series(COUNTER, "c", None, None)
    assert isinstance(c, Counter) and m.series(COUNTER, "c", None, None) is c
    c.add(3)
    assert p.cells(c) == [3, 0, 0, 0] and c.value() == 3
    with pytest.raises(ValueError):
        c.add(-1)
    h = m.series(HISTOGRAM, "h", None, (1, 10))
    for v in (0.5, 5, 50):
        h.observe(v)
    assert isinstance(h, Histogram) and h.snapshot() == ([1, 1, 1], 3, 55.5)


def test_bound_handles_write_only_their_own_slot(made):
    p = made()
    m = p.metrics
    c, g, h = (m.series(kind, name, {"k": "v"}, b) for kind, name, b in
               ((COUNTER, "c", None), (GAUGE, "g", None), (HISTOGRAM, "h", (1.0,))))
    m.bind(2)
    c.add(5)
    g.add(-4)
    h.observe(3)
    assert p.cells(c) == [0, 0, 5, 0] and p.cells(g) == [0, 0, -4, 0]
    assert p.cells(h, 1) == [0, 0, 1, 0]  # the +Inf bucket
    m.bind(0)  # back to the shared slot: under the lock
    c.add(1)
    assert p.cells(c) == [1, 0, 5, 0] and c.value() == 6 and g.value() == -4
    d = m.read_def(c.id)
    assert d.name == b'c{k="v"}' and d.labels_at == 1


def test_cells_wrap_as_signed_64_bit():
    q = memoryview(bytearray(16)).cast("q")
    q[0] = (1 << 63) - 1
    add_wrapping(q, 0, 2)
    assert q[0] == -(1 << 63) + 1
    assert wrap64(1 << 64) == 0 and wrap64(-1) == -1 and wrap64((1 << 63)) == -(1 << 63)


def test_a_counter_reads_as_unsigned_after_it_wraps(made):
    p = made()
    c = p.metrics.series(COUNTER, "c", None, None)
    c.add((1 << 63) - 1)
    c.add(2)
    assert c.value() == ((1 << 63) + 1) & U64


def test_a_gauge_set_starts_a_new_epoch(made):
    p = made()
    m = p.metrics
    g = m.series(GAUGE, "g", None, None)
    assert isinstance(g, Gauge)
    m.bind(1)
    g.add(5)
    g.set(2)
    assert g.value() == 2  # the slot's delta belongs to the old epoch
    g.add(3)
    assert g.value() == 5 and p.cells(g) == [2, 3, 0, 0]
    assert m.gauge_value(g, locked=False) == 5


def test_slots_across_processes(made):
    p = made()
    m = p.metrics
    m.define(COUNTER, b"c")
    m.define(GAUGE, b"g")
    r, w = os.pipe()
    go_r, go_w = os.pipe()

    def child(n):
        os.close(go_w)  # EOF on go_r once the parent lets go
        slot = m.attach(os.getpid())
        m.metric(1).add(10)
        m.metric(2).add(n + 1)
        os.write(w, bytes([slot, n]))
        os.read(go_r, 1)  # stay alive until every child has a slot

    try:
        pids = [fork(child, n) for n in range(SLOTS)]  # one more process than there are slots
        reports = [tuple(os.read(r, 2)) for _ in pids]
    finally:
        os.close(go_w)
    assert sorted(slot for slot, _ in reports) == [0, 1, 2, 3]  # slot 0 is shared, never handed out
    assert m.stats()["slots_used"] == SLOTS - 1
    assert all(exited_ok(pid) for pid in pids)
    assert m.metric(1).value() == 40 and m.metric(2).value() == 1 + 2 + 3 + 4
    assert m.attach(os.getpid()) == 1  # the dead children's slots are free again...
    assert m.stats()["slots_used"] == 1 and m.slot == 1
    assert m.metric(1).value() == 40  # ...their counts stay, their gauge deltas are dropped
    assert m.metric(2).value() == sum(n + 1 for slot, n in reports if slot == 0)
    m.metric(1).add(1)
    assert p.cells(m.metric(1))[1] == 10 + 1  # the slot's new process adds to the count its predecessor left
    m.detach(os.getpid())
    assert m.stats()["slots_used"] == 0
    for fd in (r, w, go_r):
        os.close(fd)


def test_render_reads_every_slot(made):
    p = made()
    m = p.metrics
    m.bind(3)
    m.series(COUNTER, "hits", {"code": 200}, None).add(2)
    m.bind(0)
    m.series(COUNTER, "hits", {"code": 200}, None).add(1)
    m.series(GAUGE, "open", None, None).add(-1)
    assert m.render() == '# TYPE hits counter\nhits{code="200"} 3\n# TYPE open gauge\nopen -1\n'
