"""Metric definitions, and the per-process slots their values live in.

Theory of operation: counters, gauges, histograms; one id per name, valid
everywhere.  Values live in per-process slots (a process writes only its own
slot, no lock) summed on read, so `Counter.add` costs ~0.2 us.  A gauge is a
base (set by `set`, under the lock) plus the per-slot deltas of its current
epoch; a dead worker's gauge deltas are dropped (its connections died with
it), its counters and histograms stay.  Processes without a slot (not
attached, or all slots taken) update a shared slot under the lock.

A definition (kind, first cell, cell count, bucket bounds, name) is written
once under the journal and never changes, so each process caches what it has
read.  A metric takes consecutive cells (a counter 1, a gauge 2: value and
epoch, a histogram its buckets + Inf, count and sum), each cell one i64 (or
f64, for a sum) per slot.  The slot table holds the pid of each slot's
process; slot 0 is the shared one and is never handed out.
"""

from __future__ import annotations

import math
import os

from .errors import NotFound, StoreFull, TooLarge
from .handles import COUNTER, GAUGE, HANDLES, HISTOGRAM, Gauge, Histogram, add_wrapping, wrap64
from .journal import Journal
from .layout import (H_NCELLS, H_NMETRICS, M_CELL, M_KIND, M_LABELS, M_NAMELEN, M_NBUCKETS, M_NCELLS,
                     MAX_BUCKETS, Geometry, Memory)
from .prometheus import Sample, label_block, render

# Filters written for Envoy record in its units (ms), so wasm histograms get its default buckets.
ENVOY_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                 60000, 300000, 600000, 1800000, 3600000)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)  # Prometheus' defaults


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class Definition:
    """A metric's definition as read from the store (never changes once defined)."""

    __slots__ = ("id", "kind", "cell", "ncells", "bounds", "name", "labels_at")


class Metrics:
    """The metric registry of one process: definitions, handles, series and this process's slot."""

    def __init__(self, mem: Memory, journal: Journal, g: Geometry):
        self.W, self.Q, self.D, self.mm = mem.W, mem.Q, mem.D, mem.mm
        self.journal, self.g = journal, g
        self.S = g.slots
        self.sw = g.slots_at >> 2
        self.mw = g.metrics_at >> 2
        self.cq = g.cells_at >> 3
        self.slot = 0
        self._ids: dict[bytes, int] = {}
        self._defs: dict[int, Definition] = {}
        self.handles: dict[int, object] = {}  # by id; the store's id-based verbs read it directly
        self._series: dict = {}

    # -- definitions -------------------------------------------------------------------------

    def _bounds(self, kind: int, buckets) -> tuple:
        if kind != HISTOGRAM:
            return ()
        bounds = tuple(sorted({float(b) for b in (buckets or ENVOY_BUCKETS) if not math.isinf(float(b))}))
        if len(bounds) > MAX_BUCKETS:
            raise TooLarge(f"more than {MAX_BUCKETS} buckets")
        return bounds

    def define(self, kind: int, name: bytes | str, buckets=None, labels_at: int = 0) -> int:
        """The id of metric `name` (created if new: idempotent per name, whatever the kind)."""
        raw = name.encode() if isinstance(name, str) else bytes(name)
        mid = self._ids.get(raw)
        if mid:
            return mid
        if kind not in (COUNTER, GAUGE, HISTOGRAM):
            raise ValueError(f"unknown metric kind {kind}")
        g, W, j = self.g, self.W, self.journal
        if len(raw) > g.max_name:
            raise TooLarge(f"metric name over {g.max_name} bytes")
        bounds = self._bounds(kind, buckets)
        ncells = (1, 2, len(bounds) + 3)[kind]
        j.acquire()
        try:
            mid = next((d.id for d in self.all_defs_locked() if d.name == raw), 0)
            if not mid:
                mid, cell = W[H_NMETRICS] + 1, W[H_NCELLS]
                if mid > g.max_metrics or cell + ncells > g.metric_cells:
                    raise StoreFull(f"metric table full ({g.max_metrics} metrics, {g.metric_cells} cells)")
                at = g.names_at + (mid - 1) * g.max_name
                self.mm[at:at + len(raw)] = raw
                for n, bound in enumerate(bounds):
                    self.D[(g.bounds_at >> 3) + (mid - 1) * MAX_BUCKETS + n] = bound
                m = self.mw + 8 * (mid - 1)
                for word, value in ((M_KIND, kind + 1), (M_CELL, cell), (M_NCELLS, ncells),
                                    (M_NBUCKETS, len(bounds)), (M_NAMELEN, len(raw)), (M_LABELS, labels_at)):
                    j.w(m + word, value)
                j.w(H_NCELLS, cell + ncells)
                j.w(H_NMETRICS, mid)
            j.commit()
        finally:
            j.release()
        self._ids[raw] = mid
        return mid

    def read_def(self, mid: int) -> Definition:
        """Metric mid's definition (cached: it never changes); mid must exist."""
        d = self._defs.get(mid)
        if d is None:
            g, W = self.g, self.W
            m = self.mw + 8 * (mid - 1)
            d = Definition()
            d.id, d.kind, d.cell, d.ncells = mid, W[m + M_KIND] - 1, W[m + M_CELL], W[m + M_NCELLS]
            at = g.names_at + (mid - 1) * g.max_name
            d.name = bytes(self.mm[at:at + W[m + M_NAMELEN]])
            d.labels_at = W[m + M_LABELS]
            b = (g.bounds_at >> 3) + (mid - 1) * MAX_BUCKETS
            d.bounds = tuple(self.D[b:b + W[m + M_NBUCKETS]])
            self._defs[mid] = d
        return d

    def all_defs_locked(self) -> list[Definition]:
        return [self.read_def(mid) for mid in range(1, self.W[H_NMETRICS] + 1)]

    # -- handles -----------------------------------------------------------------------------

    def metric(self, mid: int):
        """The Counter/Gauge/Histogram handle of id mid, bound to this process's slot; NotFound if undefined."""
        handle = self.handles.get(mid)
        if handle is not None:
            return handle
        self.journal.acquire()
        try:
            if not 1 <= mid <= self.W[H_NMETRICS]:
                raise NotFound("no such metric")
            d = self.read_def(mid)
        finally:
            self.journal.release()
        handle = HANDLES[d.kind](self, d)
        handle._bind(self.slot)
        self.handles[mid] = handle
        return handle

    def series(self, kind: int, name: str, labels, buckets):
        """The handle of series name{labels}, defined on first use and cached by its arguments."""
        key = (kind, name, tuple(labels.items()) if isinstance(labels, dict) else tuple(labels or ()), buckets)
        handle = self._series.get(key)
        if handle is None:
            block = label_block(labels)
            full = (name + block).encode()
            mid = self.define(kind, full, buckets, labels_at=len(name.encode()) if block else 0)
            handle = self._series[key] = self.metric(mid)
        return handle

    # -- the locked paths of the handles -------------------------------------------------------

    def locked_add(self, index: int, n: int) -> None:
        self.journal.acquire()
        try:
            add_wrapping(self.Q, index, n)
        finally:
            self.journal.release()

    def locked_observe(self, h: Histogram, k: int, value) -> None:
        self.journal.acquire()
        try:
            self.Q[h._base + k * h._S] += 1
            self.D[h._base + h._sum] += value
            self.Q[h._base + h._count] += 1
        finally:
            self.journal.release()

    def gauge_set(self, g: Gauge, value: int) -> None:
        Q = self.Q
        self.journal.acquire()
        try:
            Q[g._me] = wrap64(Q[g._me] + 1)  # slot deltas of older epochs stop counting
            Q[g._base] = wrap64(value)
        finally:
            self.journal.release()

    def gauge_value(self, g: Gauge, locked: bool = True) -> int:
        Q, S = self.Q, self.S
        if locked:
            self.journal.acquire()
        try:
            epoch = Q[g._me]
            deltas = Q[g._base + 1:g._base + S].tolist()
            epochs = Q[g._me + 1:g._me + S].tolist()
            return wrap64(Q[g._base] + sum(d for d, e in zip(deltas, epochs) if e == epoch))
        finally:
            if locked:
                self.journal.release()

    # -- slots ---------------------------------------------------------------------------------

    def attach(self, pid: int) -> int:
        """Take a free slot for pid (reclaiming those of dead processes) and bind the handles to it; 0 if none."""
        W, sw, j = self.W, self.sw, self.journal
        slot = 0
        j.acquire()
        try:
            for s in range(1, self.S):
                owner = W[sw + s]
                if owner and (owner == pid or not _alive(owner)):
                    self._clear_slot(s)  # its process is gone (a pid equal to ours is a dead predecessor)
                    owner = 0
                if not owner and not slot:
                    slot = s
            if slot:
                j.w(sw + slot, pid)
            j.commit()
        finally:
            j.release()
        self.bind(slot)
        return slot

    def detach(self, pid: int) -> None:
        """Free pid's slot: its gauge deltas are dropped, its counters and histograms kept."""
        W, sw, j = self.W, self.sw, self.journal
        j.acquire()
        try:
            for s in range(1, self.S):
                if W[sw + s] == pid:
                    self._clear_slot(s)
            j.commit()
        finally:
            j.release()

    def _clear_slot(self, s: int) -> None:
        for d in self.all_defs_locked():
            if d.kind == GAUGE:
                self.Q[self.cq + d.cell * self.S + s] = 0
        self.journal.w(self.sw + s, 0)

    def bind(self, slot: int) -> None:
        """Make slot (0: the shared one) this process's, for every handle it holds."""
        self.slot = slot
        for handle in self.handles.values():
            handle._bind(slot)

    # -- reading -------------------------------------------------------------------------------

    def render(self) -> str:
        """All metrics in the Prometheus text format, values read lock-free (gauges included)."""
        self.journal.acquire()
        try:
            defs = self.all_defs_locked()
        finally:
            self.journal.release()
        samples = []
        for d in defs:
            handle = self.handles.get(d.id) or self.metric(d.id)
            if d.kind == COUNTER:
                value = handle.value()
            elif d.kind == GAUGE:
                value = self.gauge_value(handle, locked=False)
            else:
                value = handle.snapshot()
            samples.append(Sample(d.name, d.labels_at, d.kind, d.bounds, value))
        return render(samples)

    def stats(self) -> dict:
        W = self.W
        return dict(metrics=W[H_NMETRICS], metric_cells=W[H_NCELLS],
                    slots_used=sum(1 for s in range(1, self.S) if W[self.sw + s]))

    def clear(self) -> None:
        """Forget the handles (the store is closing: their views go with it)."""
        self.handles.clear()
        self._series.clear()
