"""Counter, Gauge and Histogram: what the gateway and filters hold to update a metric.

Theory of operation: a handle knows the cells of its metric and, once its
process has a slot (`_bind`), the index of its own slot's cell, so an update
is an arithmetic on a memoryview of shared memory: no lock, no call into the
registry, ~0.2 us for `Counter.add`.  A process writes only its own slot, so
no two writers race; readers sum the slots.  Cells are signed 64-bit and
wrap, as the C counters of other hosts do.

Without a slot (not attached, or all slots taken) a handle updates the shared
slot 0 under the lock, through its registry.  A gauge keeps, besides its value
cells, an epoch cell per slot: `set` bumps the epoch in slot 0, and a slot's
delta counts only while its epoch is current, so a set wins over every older
add.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from .layout import U64

if TYPE_CHECKING:
    from .metrics import Definition, Metrics

COUNTER, GAUGE, HISTOGRAM = 0, 1, 2  # the proxy-wasm MetricType values
KIND_NAMES = ("counter", "gauge", "histogram")


def wrap64(value: int) -> int:
    return ((value + (1 << 63)) & U64) - (1 << 63)


def add_wrapping(q, index: int, n: int) -> None:
    """q[index] += n in a signed 64-bit cell, wrapping as the C counters of other hosts do."""
    try:
        q[index] += n
    except ValueError:
        q[index] = wrap64(q[index] + n)


class Counter:
    """A counter; `add` writes this process's slot without the lock."""

    __slots__ = ("_metrics", "id", "kind", "_q", "_base", "_i")

    def __init__(self, metrics: "Metrics", d: "Definition"):
        self._metrics, self.id, self.kind = metrics, d.id, d.kind
        self._q = metrics.Q
        self._base = metrics.cq + d.cell * metrics.S
        self._i = 0

    def _bind(self, slot: int) -> None:
        self._i = self._base + slot if slot else 0

    def add(self, n: int = 1) -> None:
        if n < 0:
            raise ValueError("a counter never goes down")
        i = self._i
        if i:
            add_wrapping(self._q, i, n)
        else:
            self._metrics.locked_add(self._base, n)

    def value(self) -> int:
        return sum(self._q[self._base:self._base + self._metrics.S]) & U64


class Gauge:
    """A gauge: `set` (under the lock) starts a new epoch; `add` is lock-free per slot."""

    __slots__ = ("_metrics", "id", "kind", "_q", "_base", "_i", "_e", "_me")

    def __init__(self, metrics: "Metrics", d: "Definition"):
        self._metrics, self.id, self.kind = metrics, d.id, d.kind
        self._q = metrics.Q
        self._base = metrics.cq + d.cell * metrics.S  # slot 0: the base value
        self._me = self._base + metrics.S  # slot 0 of the epoch cell: the current epoch
        self._i = self._e = 0

    def _bind(self, slot: int) -> None:
        self._i = self._base + slot if slot else 0
        self._e = self._me + slot if slot else 0

    def add(self, n: int) -> None:
        i = self._i
        if i:
            q = self._q
            epoch = q[self._me]
            if q[self._e] != epoch:
                q[i] = n
                q[self._e] = epoch
            else:
                add_wrapping(q, i, n)
        else:
            self._metrics.locked_add(self._base, n)

    def set(self, value: int) -> None:
        self._metrics.gauge_set(self, value)

    def value(self) -> int:
        return self._metrics.gauge_value(self)


class Histogram:
    """A histogram with fixed buckets, count and sum (Prometheus-style); `observe` is lock-free per slot."""

    __slots__ = ("_metrics", "id", "kind", "bounds", "_q", "_d", "_base", "_i", "_S", "_count", "_sum")

    def __init__(self, metrics: "Metrics", d: "Definition"):
        self._metrics, self.id, self.kind, self.bounds = metrics, d.id, d.kind, d.bounds
        self._q, self._d, self._S = metrics.Q, metrics.D, metrics.S
        self._base = metrics.cq + d.cell * metrics.S
        self._count = (len(d.bounds) + 1) * metrics.S
        self._sum = self._count + metrics.S
        self._i = 0

    def _bind(self, slot: int) -> None:
        self._i = self._base + slot if slot else 0

    def observe(self, value) -> None:
        k = bisect.bisect_left(self.bounds, value)
        i = self._i
        if i:
            q = self._q
            q[i + k * self._S] += 1
            self._d[i + self._sum] += value
            q[i + self._count] += 1
        else:
            self._metrics.locked_observe(self, k, value)

    def snapshot(self) -> tuple[list[int], int, float]:
        """(count per bucket incl. +Inf, not cumulative; count; sum) over all slots."""
        q, S, base = self._q, self._S, self._base
        buckets = [sum(q[base + k * S:base + (k + 1) * S]) for k in range(len(self.bounds) + 1)]
        count = sum(q[base + self._count:base + self._count + S])
        total = sum(self._d[base + self._sum:base + self._sum + S])
        return buckets, count, total


HANDLES = (Counter, Gauge, Histogram)  # by kind
