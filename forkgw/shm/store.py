"""ShmStore: the parts composed over one mapping, behind the interface the gateway uses.

Theory of operation: every part works on the same mapping and writes through
the same `Journal`, so an operation of any part is atomic with respect to a
crash.  The store adds what belongs to no one part: which process this is.
Its pid (queue ownership, slots, wake socket names) is fixed here, and after
a fork the child's copy forgets its parent's slot and wake socket
(`os.register_at_fork`), so a child never writes its parent's slot or reads
its wake-ups.  Attaching takes a slot (metrics) and binds a wake socket
(queues); detaching gives both back.  The id-based metric verbs
(`increment`, `record`, `get_metric`: proxy-wasm's, with Envoy's meaning) are
here, over the registry's handles, so a filter's update costs what a handle's
does.

The allocator evicts entries when the arena is full (`reclaim`), so the table
is wired into it after both exist.
"""

from __future__ import annotations

import os
import socket
import weakref

from .alloc import Allocator
from .handles import COUNTER, GAUGE, HISTOGRAM, Counter, Gauge, Histogram
from .journal import Journal
from .layout import Geometry, Memory, read_args
from .metrics import SECONDS_BUCKETS, Metrics
from .queues import Queues
from .table import Table

_stores: "weakref.WeakSet[ShmStore]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_stores):
        store._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ShmStore:
    """Shared data, queues and metrics for every process forked after it was made.

    size: bytes of the arena holding keys+values and queue items (rounded down
    to a multiple of the largest block); max_key/max_value: per key and value
    (and queue item); eviction: "lru" or "none"; queue_bytes: the most queue
    items may take (default: half the arena).  The tables (entries, queues,
    metrics, metric cells x slots) are sized by the other arguments and come
    on top.
    """

    def __init__(self, size: int = 8 << 20, max_key: int = 256, max_value: int = 64 << 10,
                 eviction: str = "lru", *, max_entries: int | None = None, max_queues: int = 256,
                 max_metrics: int = 1024, max_metric_name: int = 256, metric_cells: int | None = None,
                 slots: int = 64, queue_bytes: int | None = None, _fd: int | None = None):
        g = self._g = Geometry(size, max_key, max_value, eviction, max_entries, max_queues,
                               max_metrics, max_metric_name, metric_cells, slots, queue_bytes)
        mem = self._mem = Memory(g, _fd)
        self._fd, self._mm, self._W, self._token = mem.fd, mem.mm, mem.W, mem.token
        self._journal = Journal(mem, g)
        self._arena = Allocator(mem, self._journal, g)
        self._table = Table(mem, self._journal, self._arena, g)
        self._arena.reclaim = self._table.evict
        self._queues = Queues(mem, self._journal, self._arena, g, self._table.key, mem.token)
        self._metrics = Metrics(mem, self._journal, g)
        self._handles = self._metrics.handles  # the id-based verbs: one dict lookup, then the handle
        if mem.fresh:
            self._arena.format()
            self._table.format()
        self._pid = os.getpid()
        _stores.add(self)

    @classmethod
    def open(cls, fd: int) -> "ShmStore":
        """The store behind an inherited fd (e.g. after the master exec'd itself)."""
        return cls(**read_args(fd), _fd=fd)

    def fileno(self) -> int:
        """The memfd: mapping and lock (pass it on, inheritable, to an exec'd master)."""
        return self._fd

    def close(self) -> None:
        """Unmap and close in this process (tests; the gateway keeps it for life)."""
        _stores.discard(self)
        self._queues.unbind()
        self._metrics.clear()
        self._mem.close()

    def _forked(self) -> None:
        """In a new child: no slot, no wake socket until it attaches."""
        self._pid = os.getpid()
        self._queues.unbind()
        self._metrics.bind(0)

    # -- key/value -----------------------------------------------------------------------------

    def get(self, ns, key: bytes) -> tuple[bytes, int] | None:
        """(value, cas) of key in namespace ns, or None."""
        return self._table.get(ns, key)

    def set(self, ns, key: bytes, value: bytes, cas: int = 0) -> int:
        """Store value; returns its new cas (never 0), or 0 if cas != 0 and differs from the current one.

        A key that does not exist is created whatever cas says.  TooLarge over
        the limits; StoreFull when it cannot fit (eviction="none").
        """
        return self._table.set(ns, key, value, cas)

    # -- queues --------------------------------------------------------------------------------

    def register_queue(self, ns, name: bytes, pid: int | None = None) -> int:
        """Create or open queue (ns, name) and make `pid` (default: this process) its owner."""
        return self._queues.register(ns, name, pid or self._pid)

    def resolve_queue(self, ns, name: bytes) -> int:
        """The id of queue (ns, name); NotFound if nobody registered it."""
        return self._queues.resolve(ns, name)

    def enqueue(self, qid: int, data: bytes) -> None:
        """Append data; the owner's wake socket gets a datagram if it had nothing pending."""
        self._queues.enqueue(qid, data)

    def dequeue(self, qid: int) -> bytes:
        """Pop the oldest item; Empty if none, NotFound if no such queue."""
        return self._queues.dequeue(qid)

    def queue_size(self, qid: int) -> int:
        return self._queues.size(qid)

    def ready_queues(self) -> list[int]:
        """Ids of this process's queues that got items since the last call; drains the wake socket."""
        return self._queues.ready(self._pid)

    # -- this process ----------------------------------------------------------------------------

    def attach(self) -> socket.socket:
        """In a worker, after fork: take a metrics slot and bind this process's wake socket.

        Returns the non-blocking datagram socket to register for reading in the
        worker's selector; when readable, call ready_queues().  Idempotent.
        """
        if self._queues.wake is not None:
            return self._queues.wake
        self._metrics.attach(self._pid)
        return self._queues.bind(self._pid)

    def detach(self, pid: int | None = None) -> None:
        """Free the slot of pid (default: this process): the master calls it after reaping a worker.

        The gone worker's gauge deltas are dropped, its counters and histograms kept.
        """
        me = pid is None or pid == self._pid
        self._metrics.detach(self._pid if pid is None else pid)
        if me:
            self._metrics.bind(0)
            self._queues.unbind()

    # -- metrics ---------------------------------------------------------------------------------

    def define_metric(self, kind: int, name: bytes | str, buckets=None, *, _labels_at: int = 0) -> int:
        """The id of metric `name` (created if new: idempotent per name, whatever the kind)."""
        return self._metrics.define(kind, name, buckets, _labels_at)

    def metric(self, mid: int):
        """The Counter/Gauge/Histogram handle of id mid; NotFound if undefined."""
        return self._metrics.metric(mid)

    def increment(self, mid: int, delta: int) -> None:
        """Counter/gauge += delta; ValueError for a histogram or a negative counter delta."""
        handle = self._handles.get(mid) or self._metrics.metric(mid)
        if handle.kind == HISTOGRAM:
            raise ValueError("cannot increment a histogram")
        handle.add(delta)

    def record(self, mid: int, value) -> None:
        """Gauge = value, histogram sample, counter += value (as Envoy does)."""
        handle = self._handles.get(mid) or self._metrics.metric(mid)
        kind = handle.kind
        if kind == GAUGE:
            handle.set(value)
        elif kind == HISTOGRAM:
            handle.observe(value)
        else:
            handle.add(value)

    def get_metric(self, mid: int) -> int:
        """The value aggregated over all processes; ValueError for a histogram."""
        handle = self._handles.get(mid) or self._metrics.metric(mid)
        if handle.kind == HISTOGRAM:
            raise ValueError("a histogram has no single value")
        return handle.value()

    def counter(self, name: str, labels=None) -> Counter:
        """The counter series name{labels}; keep the handle, `.add(n)` costs ~0.2 us."""
        return self._metrics.series(COUNTER, name, labels, None)

    def gauge(self, name: str, labels=None) -> Gauge:
        return self._metrics.series(GAUGE, name, labels, None)

    def histogram(self, name: str, labels=None, buckets=SECONDS_BUCKETS) -> Histogram:
        return self._metrics.series(HISTOGRAM, name, labels, tuple(buckets))

    def render_prometheus(self) -> str:
        """All metrics in the Prometheus text format (0.0.4): # TYPE lines, histogram _bucket/_sum/_count."""
        return self._metrics.render()

    # -- introspection ---------------------------------------------------------------------------

    def stats(self) -> dict:
        """Occupancy, for logs and the gateway's own gauges."""
        g = self._g
        self._journal.acquire()
        try:
            return dict(**self._table.stats(), **self._arena.stats(), **self._queues.stats(),
                        **self._metrics.stats(), mapped_bytes=g.total, eviction=g.args["eviction"])
        finally:
            self._journal.release()

    def _check(self) -> None:
        """Assert every structural invariant (tests: after crashes and random operations)."""
        self._journal.acquire()
        try:
            self._journal.check()
            blocks = self._arena.check()
            used = self._table.check(blocks) + self._queues.check()
            assert sorted(used) == sorted(self._arena.used(blocks))
        finally:
            self._journal.release()
