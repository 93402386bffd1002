"""Key/value data, queues and metrics in shared memory, seen by every worker.

Why: proxy-wasm filters count on shared data, shared queues and metrics being
global (Envoy: all worker threads; Kong: nginx shm zones), and the gateway's
own counters must add up across workers.  The master builds one `ShmStore`
before it forks anything; its memory (a memfd mapped MAP_SHARED) is inherited
by every worker of every generation, so it outlives reloads and crashes.  Its
fd can also be handed to an exec'd master (`ShmStore.open(fd)`).

Theory of operation:
- One lock: a POSIX record lock (lockf) on the memfd.  The kernel drops it when
  the holder dies, so a SIGKILLed worker never leaves the store locked.  Such
  locks belong to a process, not a thread: threads of one process are not
  excluded from each other, so only one thread per process may use the store,
  and never from a signal handler.
- Crash consistency: every change of a structure under the lock is a u32 word
  written through `_w`, which first appends (word, old value) to an undo
  journal; committing empties it, and whoever takes the lock next and finds it
  non-empty rolls the dead holder's half-done operation back.  Bytes go only
  into blocks the same operation allocated (forgotten on rollback), or are
  overwritten in place after being copied to a one-slot byte journal.  A
  worker killed at any point leaves the store as before its operation.
- Key/value: one namespace per VM id; a chained hash table of fixed entries,
  key and value together in one block of a buddy allocator (64 B up to one
  maximum-size entry, so a value may take up to twice its size) over an arena
  of `size` bytes; freed buddies merge only when an allocation fails, so a
  steady set/enqueue/dequeue does not split and merge blocks each time.  An
  update that fits its block is written in place.  CAS: one global u32
  counter, never 0; `cas == 0` writes unconditionally; a missing key is created
  whatever the cas.
- Full store: eviction="lru" (default) drops least recently used entries
  (CLOCK, an approximate LRU: a read or an update marks an entry, a sweep
  spares marked entries once) until the new data fits, because the Rust SDK
  panics on any set_shared_data status but Ok and CasMismatch; eviction="none"
  raises StoreFull instead (Kong's `eviction=none`).  Queue items are never
  evicted (with lru, entries are evicted to make room for them) and may take
  at most `queue_bytes` of the arena (default: half), so a queue nobody
  consumes cannot push all shared data out: past that, enqueue raises StoreFull.
- Queues: (namespace, name) -> id, ids valid in every process.  A queue keeps
  its owner's pid and a "notify pending" flag: an enqueue that raises the flag
  sends one datagram to the owner's wake socket (abstract unix namespace,
  named after the store and the pid, so nothing is inherited across fork);
  `ready_queues()` drains it and takes the flags.  No polling.
- Metrics: counters, gauges, histograms; one id per name, valid everywhere.
  Values live in per-process slots (a process writes only its own slot, no
  lock) summed on read, so `Counter.add` costs ~0.2 us.  A gauge is a base
  (set by `set`, under the lock) plus the per-slot deltas of its current epoch;
  a dead worker's gauge deltas are dropped (its connections died with it),
  its counters and histograms stay.  Processes without a slot (not attached,
  or all slots taken) update a shared slot under the lock.

Wiring: the master makes the store once, before the first fork, keeps it
across reloads, and calls `detach(pid)` after reaping a worker.  A worker calls
`attach()` after fork and registers the returned socket in its selector; when
readable, `ready_queues()` (via ShmShared.take_ready() in Runtime.tick()).

The public methods are the interface a Redis-backed store would implement.
"""

from __future__ import annotations

import bisect
import fcntl
import json
import math
import mmap
import os
import re
import secrets
import socket
import weakref
import zlib

__all__ = [
    "ShmStore", "StoreError", "StoreFull", "TooLarge", "NotFound", "Empty",
    "COUNTER", "GAUGE", "HISTOGRAM", "ENVOY_BUCKETS", "SECONDS_BUCKETS",
]

COUNTER, GAUGE, HISTOGRAM = 0, 1, 2  # the proxy-wasm MetricType values
KIND_NAMES = ("counter", "gauge", "histogram")
# Filters written for Envoy record in its units (ms), so wasm histograms get its default buckets.
ENVOY_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                 60000, 300000, 600000, 1800000, 3600000)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)  # Prometheus' defaults
MAX_BUCKETS = 32

U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF


class StoreError(Exception):
    """Base of the store's errors."""


class StoreFull(StoreError):
    """No room (eviction="none", queue items, or a fixed table is full): callers map it to an error status."""


class TooLarge(StoreError, ValueError):
    """A key, value, namespace or metric name over the store's limits."""


class NotFound(StoreError, LookupError):
    """No such queue or metric."""


class Empty(StoreError):
    """Dequeue from an empty queue."""


# -- layout ------------------------------------------------------------------------

MAGIC = 0x6B776766  # "fgwk"
VERSION = 1
HEADER = 4096
# header words
H_MAGIC, H_VERSION, H_CAS, H_NENTRIES, H_FREE_ENTRY, H_CLOCK, H_NQUEUES, H_NMETRICS, \
    H_NCELLS, H_EVICTIONS, H_JLEN, H_BJOFF, H_BJLEN, H_QBYTES = range(14)
H_FREE = 16  # 32 words: head of the free list of each block order
TOKEN_AT = 256  # bytes: the store's token (names the wake sockets)
GEOMETRY_AT = 512  # bytes: the constructor arguments, JSON, for open(fd)

JOURNAL_MAX = 2048  # undo records (word, old value) per operation step
MIN_ORDER = 6  # 64-byte blocks
BLOCK_HDR = 16  # tag, next, prev/len, spare
FREE_TAG = 0xF5EE0000
USED_TAG = 0x05ED0000
TAG_MASK = 0xFFFF0000

# entry words (8): index+1 links, 0 = none
E_NEXT, E_HASH, E_CAS, E_KLEN, E_VLEN, E_BLOCK, E_FLAGS = range(7)
F_USED, F_REF = 1, 2
# queue words (8)
Q_USED, Q_OWNER, Q_PENDING, Q_HEAD, Q_TAIL, Q_COUNT, Q_NAME, Q_NAMELEN = range(8)
# metric words (8)
M_KIND, M_CELL, M_NCELLS, M_NBUCKETS, M_NAMELEN, M_LABELS = range(6)

_stores: "weakref.WeakSet[ShmStore]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_stores):
        store._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _wrap64(value: int) -> int:
    return ((value + (1 << 63)) & U64) - (1 << 63)


def _add_wrapping(q, index: int, n: int) -> None:
    """q[index] += n in a signed 64-bit cell, wrapping as the C counters of other hosts do."""
    try:
        q[index] += n
    except ValueError:
        q[index] = _wrap64(q[index] + n)


_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


def sanitize_name(name: str) -> str:
    """A Prometheus metric name: [a-zA-Z_:][a-zA-Z0-9_:]*, anything else becomes '_'."""
    name = _NAME_BAD.sub("_", name)
    return name if name and not name[0].isdigit() else "_" + name


def _label_block(labels) -> str:
    if not labels:
        return ""
    items = sorted((labels.items() if isinstance(labels, dict) else labels))
    parts = []
    for key, value in items:
        key = _LABEL_BAD.sub("_", str(key))
        if not key or key[0].isdigit():
            key = "_" + key
        value = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{key}="{value}"')
    return "{" + ",".join(parts) + "}"


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        if math.isnan(value):
            return "NaN"
        return repr(value)
    return str(value)


class _Geometry:
    """Where everything is, from the constructor arguments (the same in every process)."""

    def __init__(self, size, max_key, max_value, eviction, max_entries, max_queues, max_metrics,
                 max_metric_name, metric_cells, slots, queue_bytes):
        if eviction not in ("lru", "none"):
            raise ValueError(f'eviction must be "lru" or "none", not {eviction!r}')
        if not 2 <= slots <= 4096:
            raise ValueError("slots must be 2..4096")
        self.args = dict(size=size, max_key=max_key, max_value=max_value, eviction=eviction,
                         max_entries=max_entries, max_queues=max_queues, max_metrics=max_metrics,
                         max_metric_name=max_metric_name, metric_cells=metric_cells, slots=slots,
                         queue_bytes=queue_bytes)
        self.max_key, self.max_value, self.lru = max_key, max_value, eviction == "lru"
        self.max_payload = 1 + 255 + max(max_key, 0) + max_value  # namespace prefix + key + value
        self.top = max(MIN_ORDER, (self.max_payload + BLOCK_HDR - 1).bit_length())
        self.ntop = size >> self.top
        if self.ntop < 1:
            raise ValueError(f"size {size} is smaller than one maximum-size entry ({1 << self.top} bytes)")
        self.max_entries = max_entries or max(64, size // 256)
        self.queue_bytes = (self.ntop << self.top) // 2 if queue_bytes is None else queue_bytes
        self.max_queues, self.max_metrics, self.max_name = max_queues, max_metrics, max_metric_name
        self.metric_cells = metric_cells or 8 * max_metrics
        self.slots = slots
        off = HEADER

        def take(nbytes: int, align: int = 8) -> int:
            nonlocal off
            off = (off + align - 1) // align * align
            at, off = off, off + nbytes
            return at

        self.slots_at = take(4 * slots)
        self.journal_at = take(8 * JOURNAL_MAX)
        self.nbuckets = 1 << max(4, (self.max_entries - 1).bit_length())
        self.buckets_at = take(4 * self.nbuckets)
        self.entries_at = take(32 * self.max_entries)
        self.queues_at = take(32 * max_queues)
        self.metrics_at = take(32 * max_metrics)
        self.names_at = take(max_metrics * max_metric_name)
        self.bounds_at = take(8 * MAX_BUCKETS * max_metrics)
        self.bytejournal_at = take(1 << self.top)
        self.cells_at = take(8 * slots * self.metric_cells, 64)
        self.arena_at = take(self.ntop << self.top, 4096)
        self.total = (off + 4095) // 4096 * 4096
        if self.total >= 1 << 32:
            raise ValueError("the store must stay under 4 GiB")


class _Def:
    """A metric's definition as read from the store (never changes once defined)."""

    __slots__ = ("id", "kind", "cell", "ncells", "bounds", "name", "labels_at")


# -- metric handles --------------------------------------------------------------------


class Counter:
    """A counter; `add` writes this process's slot without the lock."""

    __slots__ = ("store", "id", "kind", "_q", "_base", "_i")

    def __init__(self, store: "ShmStore", d: _Def):
        self.store, self.id, self.kind = store, d.id, d.kind
        self._q = store._Q
        self._base = store._cq + d.cell * store._S
        self._i = 0

    def _bind(self, slot: int) -> None:
        self._i = self._base + slot if slot else 0

    def add(self, n: int = 1) -> None:
        if n < 0:
            raise ValueError("a counter never goes down")
        i = self._i
        if i:
            _add_wrapping(self._q, i, n)
        else:
            self.store._locked_add(self._base, n)

    def value(self) -> int:
        return sum(self._q[self._base:self._base + self.store._S]) & U64


class Gauge:
    """A gauge: `set` (under the lock) starts a new epoch; `add` is lock-free per slot."""

    __slots__ = ("store", "id", "kind", "_q", "_base", "_i", "_e", "_me")

    def __init__(self, store: "ShmStore", d: _Def):
        self.store, self.id, self.kind = store, d.id, d.kind
        self._q = store._Q
        self._base = store._cq + d.cell * store._S  # slot 0: the base value
        self._me = self._base + store._S  # slot 0 of the epoch cell: the current epoch
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
                _add_wrapping(q, i, n)
        else:
            self.store._locked_add(self._base, n)

    def set(self, value: int) -> None:
        self.store._gauge_set(self, value)

    def value(self) -> int:
        return self.store._gauge_value(self)


class Histogram:
    """A histogram with fixed buckets, count and sum (Prometheus-style); `observe` is lock-free per slot."""

    __slots__ = ("store", "id", "kind", "bounds", "_q", "_d", "_base", "_i", "_S", "_count", "_sum")

    def __init__(self, store: "ShmStore", d: _Def):
        self.store, self.id, self.kind, self.bounds = store, d.id, d.kind, d.bounds
        self._q, self._d, self._S = store._Q, store._D, store._S
        self._base = store._cq + d.cell * store._S
        self._count = (len(d.bounds) + 1) * store._S
        self._sum = self._count + store._S
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
            self.store._locked_observe(self, k, value)

    def snapshot(self) -> tuple[list[int], int, float]:
        """(count per bucket incl. +Inf, not cumulative; count; sum) over all slots."""
        q, S, base = self._q, self._S, self._base
        buckets = [sum(q[base + k * S:base + (k + 1) * S]) for k in range(len(self.bounds) + 1)]
        count = sum(q[base + self._count:base + self._count + S])
        total = sum(self._d[base + self._sum:base + self._sum + S])
        return buckets, count, total


# -- the store -----------------------------------------------------------------------------


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
        g = self._g = _Geometry(size, max_key, max_value, eviction, max_entries, max_queues,
                                max_metrics, max_metric_name, metric_cells, slots, queue_bytes)
        fresh = _fd is None
        if fresh:
            if hasattr(os, "memfd_create"):
                _fd = os.memfd_create("forkgw-shm")
            else:  # not Linux: an unlinked file does the same
                import tempfile

                _fd = os.dup(tempfile.TemporaryFile().fileno())
            os.ftruncate(_fd, g.total)
        self._fd = _fd
        self._mm = mmap.mmap(_fd, g.total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._W = memoryview(self._mm).cast("I")
        self._Q = memoryview(self._mm).cast("q")
        self._D = memoryview(self._mm).cast("d")
        self._S = g.slots
        self._sw = g.slots_at >> 2
        self._jw = g.journal_at >> 2
        self._bw = g.buckets_at >> 2
        self._bmask = g.nbuckets - 1
        self._ew = g.entries_at >> 2
        self._qw = g.queues_at >> 2
        self._mw = g.metrics_at >> 2
        self._cq = g.cells_at >> 3
        self._lru = g.lru
        if fresh:
            self._format()
        elif self._W[H_MAGIC] != MAGIC or self._W[H_VERSION] != VERSION:
            raise ValueError("not a forkgw store")
        self._token = bytes(self._mm[TOKEN_AT:TOKEN_AT + 16]).rstrip(b"\0").decode()
        self._pid = os.getpid()
        self._slot = 0
        self._wake: socket.socket | None = None
        self._tx: socket.socket | None = None
        self._ns: dict = {}  # namespace -> encoded prefix
        self._queue_ids: dict[bytes, int] = {}
        self._metric_ids: dict[bytes, int] = {}
        self._defs: dict[int, _Def] = {}
        self._handles: dict[int, object] = {}
        self._series: dict = {}
        _stores.add(self)

    @classmethod
    def open(cls, fd: int) -> "ShmStore":
        """The store behind an inherited fd (e.g. after the master exec'd itself)."""
        with mmap.mmap(fd, HEADER, mmap.MAP_SHARED, mmap.PROT_READ) as head:
            raw = bytes(head[GEOMETRY_AT:HEADER]).split(b"\0", 1)[0]
        return cls(**json.loads(raw), _fd=fd)

    def fileno(self) -> int:
        """The memfd: mapping and lock (pass it on, inheritable, to an exec'd master)."""
        return self._fd

    def _format(self) -> None:
        g, W, mm = self._g, self._W, self._mm
        W[H_MAGIC], W[H_VERSION], W[H_CAS] = MAGIC, VERSION, 0
        mm[TOKEN_AT:TOKEN_AT + 16] = f"{os.getpid():x}.{secrets.token_hex(4)}".encode().ljust(16, b"\0")[:16]
        geometry = json.dumps(g.args).encode()
        mm[GEOMETRY_AT:GEOMETRY_AT + len(geometry)] = geometry
        n = g.max_entries
        nexts = memoryview(bytearray(4 * n)).cast("I")
        for i in range(n - 1):
            nexts[i] = i + 2
        W[self._ew:self._ew + 8 * n:8] = nexts
        W[H_FREE_ENTRY] = 1
        size = 1 << g.top
        for t in range(g.ntop):
            b = g.arena_at + t * size
            W[b >> 2] = FREE_TAG | g.top
            W[(b >> 2) + 1] = b + size if t + 1 < g.ntop else 0
            W[(b >> 2) + 2] = b - size if t else 0
        W[H_FREE + g.top] = g.arena_at

    def close(self) -> None:
        """Unmap and close in this process (tests; the gateway keeps it for life)."""
        _stores.discard(self)
        if self._wake is not None:
            self._wake.close()
            self._wake = None
        for view in (self._W, self._Q, self._D):
            view.release()
        self._handles.clear()
        self._series.clear()
        self._mm.close()
        os.close(self._fd)

    def _forked(self) -> None:
        """In a new child: no slot, no wake socket until it attaches."""
        self._pid = os.getpid()
        if self._wake is not None:
            self._wake.close()
            self._wake = None
        self._set_slot(0)

    # -- lock and journal ------------------------------------------------------------------

    def _acquire(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        W = self._W
        if W[H_JLEN] or W[H_BJLEN]:
            self._recover()

    def _release(self) -> None:
        W = self._W
        if W[H_JLEN] or W[H_BJLEN]:
            self._recover()  # an exception before commit: undo
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _commit(self) -> None:
        W = self._W
        W[H_JLEN] = 0  # the commit point
        W[H_BJLEN] = 0

    def _recover(self) -> None:
        """Undo the uncommitted operation of a holder that died (or raised)."""
        W, mm = self._W, self._mm
        n = W[H_JLEN]
        if n:  # BJLEN is only ever set after a journaled write, so JLEN == 0 means committed
            size = W[H_BJLEN]
            if size:
                at, src = W[H_BJOFF], self._g.bytejournal_at
                mm[at:at + size] = mm[src:src + size]
            j = self._jw
            for r in range(n - 1, -1, -1):
                W[W[j + 2 * r]] = W[j + 2 * r + 1]
        W[H_BJLEN] = 0
        W[H_JLEN] = 0

    def _w(self, i: int, v: int) -> None:
        """Write word i under the journal."""
        W = self._W
        n = W[H_JLEN]
        if n >= JOURNAL_MAX:
            raise StoreError("journal overflow")
        j = self._jw + 2 * n
        W[j] = i
        W[j + 1] = W[i]
        W[H_JLEN] = n + 1
        W[i] = v

    def _wm(self, *pairs: int) -> None:
        """Write several words under the journal: (index, value, index, value, ...)."""
        W = self._W
        n = W[H_JLEN]
        count = len(pairs) >> 1
        if n + count > JOURNAL_MAX:
            raise StoreError("journal overflow")
        j = self._jw + 2 * n
        for t in range(0, 2 * count, 2):
            i = pairs[t]
            W[j] = i
            W[j + 1] = W[i]
            j += 2
        W[H_JLEN] = n + count
        for t in range(0, 2 * count, 2):
            W[pairs[t]] = pairs[t + 1]

    def _overwrite(self, p: int, data: bytes) -> None:
        """Write data over live bytes, keeping the old ones for _recover.

        Only after a journaled write: with the journal empty the operation
        counts as committed and the saved bytes are ignored.
        """
        mm, W, n = self._mm, self._W, len(data)
        bj = self._g.bytejournal_at
        mm[bj:bj + n] = mm[p:p + n]
        W[H_BJOFF] = p
        W[H_BJLEN] = n
        mm[p:p + n] = data

    # -- buddy allocator ------------------------------------------------------------------

    def _push(self, k: int, b: int) -> None:
        w = b >> 2
        head = self._W[H_FREE + k]
        if head:
            self._wm(w, FREE_TAG | k, w + 1, head, w + 2, 0, (head >> 2) + 2, b, H_FREE + k, b)
        else:
            self._wm(w, FREE_TAG | k, w + 1, 0, w + 2, 0, H_FREE + k, b)

    def _unlink(self, k: int, b: int) -> None:
        W, w = self._W, b >> 2
        nxt, prv = W[w + 1], W[w + 2]
        if prv:
            self._w((prv >> 2) + 1, nxt)
        else:
            self._w(H_FREE + k, nxt)
        if nxt:
            self._w((nxt >> 2) + 2, prv)

    @staticmethod
    def _order(nbytes: int) -> int:
        return max(MIN_ORDER, (nbytes + BLOCK_HDR - 1).bit_length())

    def _take(self, k: int) -> int:
        """A block of order k, or 0 (no writes then)."""
        W, top = self._W, self._g.top
        j = k
        while j <= top and not W[H_FREE + j]:
            j += 1
        if j > top:
            return 0
        b = W[H_FREE + j]
        self._unlink(j, b)
        while j > k:
            j -= 1
            self._push(j, b + (1 << j))
        self._w(b >> 2, USED_TAG | k)
        return b

    def _free(self, b: int) -> None:
        """Back on its order's list; buddies merge later, when an allocation fails (no split/merge ping-pong)."""
        self._push(self._W[b >> 2] & 0xFF, b)

    def _coalesce(self) -> bool:
        """Merge free buddies, committing each merge; True if any merged."""
        W, base, top = self._W, self._g.arena_at, self._g.top
        merged = False
        for k in range(MIN_ORDER, top):
            b = W[H_FREE + k]
            while b:
                nxt = W[(b >> 2) + 1]
                buddy = base + ((b - base) ^ (1 << k))
                if W[buddy >> 2] == FREE_TAG | k:
                    if buddy == nxt:
                        nxt = W[(nxt >> 2) + 1]
                    self._unlink(k, b)
                    self._unlink(k, buddy)
                    self._push(k + 1, min(b, buddy))
                    self._commit()
                    merged = True
                b = nxt
        return merged

    def _alloc(self, nbytes: int, protect: int = 0) -> int:
        """A block for nbytes of payload: merging free buddies, then evicting if the policy allows.

        Merges and evictions commit on their own, so this must come before the
        operation's first journaled write.
        """
        if self._W[H_JLEN]:
            raise StoreError("allocation after a journaled write")
        k = self._order(nbytes)
        while True:
            b = self._take(k)
            if b:
                return b
            if self._coalesce():
                continue
            if not self._evict(protect):
                args = self._g.args
                raise StoreFull(f"shared store full ({args['size']} bytes, eviction={args['eviction']})")

    # -- key/value ---------------------------------------------------------------------------

    def _key(self, ns, key: bytes) -> bytes:
        prefix = self._ns.get(ns)
        if prefix is None:
            raw = ns.encode() if isinstance(ns, str) else bytes(ns)
            if len(raw) > 255:
                raise TooLarge("namespace over 255 bytes")
            prefix = self._ns[ns] = bytes((len(raw),)) + raw
        if len(key) > self._g.max_key:
            raise TooLarge(f"key over {self._g.max_key} bytes")
        return prefix + key

    def _lookup(self, ck: bytes, h: int) -> int:
        W, mm, n = self._W, self._mm, len(ck)
        i = W[self._bw + (h & self._bmask)]
        while i:
            e = self._ew + (i << 3) - 8
            if W[e + E_HASH] == h and W[e + E_KLEN] == n:
                p = W[e + E_BLOCK] + BLOCK_HDR
                if mm[p:p + n] == ck:
                    return i
            i = W[e]
        return 0

    def get(self, ns, key: bytes) -> tuple[bytes, int] | None:
        """(value, cas) of key in namespace ns, or None."""
        try:
            ck = self._key(ns, key)
        except TooLarge:
            return None
        h = zlib.crc32(ck)
        W, mm, n = self._W, self._mm, len(ck)
        self._acquire()
        try:
            i = W[self._bw + (h & self._bmask)]
            while i:
                e = self._ew + (i << 3) - 8
                if W[e + E_HASH] == h and W[e + E_KLEN] == n:
                    p = W[e + E_BLOCK] + BLOCK_HDR
                    if mm[p:p + n] == ck:
                        if self._lru:
                            W[e + E_FLAGS] = F_USED | F_REF  # a hint: not journaled
                        p += n
                        return mm[p:p + W[e + E_VLEN]], W[e + E_CAS]
                i = W[e]
            return None
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def set(self, ns, key: bytes, value: bytes, cas: int = 0) -> int:
        """Store value; returns its new cas (never 0), or 0 if cas != 0 and differs from the current one.

        A key that does not exist is created whatever cas says.  TooLarge over
        the limits; StoreFull when it cannot fit (eviction="none").
        """
        ck = self._key(ns, key)
        if len(value) > self._g.max_value:
            raise TooLarge(f"value over {self._g.max_value} bytes")
        h = zlib.crc32(ck)
        W, mm = self._W, self._mm
        nk, nv = len(ck), len(value)
        self._acquire()
        try:
            i = self._lookup(ck, h)
            if i:
                e = self._ew + (i << 3) - 8
                if cas and W[e + E_CAS] != cas:
                    return 0
                blk = W[e + E_BLOCK]
                k = W[blk >> 2] & 0xFF
                want = self._order(nk + nv)
                new = 0
                if want != k:
                    if want > k:
                        new = self._alloc(nk + nv, protect=i)
                    else:
                        new = self._take(want)  # shrink if there is room, else stay in place
                new_cas = W[H_CAS] % U32 + 1
                if new:
                    mm[new + BLOCK_HDR:new + BLOCK_HDR + nk + nv] = ck + value
                    self._wm(H_CAS, new_cas, e + E_CAS, new_cas, e + E_VLEN, nv, e + E_BLOCK, new)
                    self._free(blk)
                else:
                    self._wm(H_CAS, new_cas, e + E_CAS, new_cas, e + E_VLEN, nv)
                    self._overwrite(blk + BLOCK_HDR + nk, value)
                if self._lru:
                    W[e + E_FLAGS] = F_USED | F_REF
            else:
                while not W[H_FREE_ENTRY]:
                    if not self._evict(0):
                        raise StoreFull(f"shared store full ({self._g.max_entries} entries, eviction=none)")
                blk = self._alloc(nk + nv)
                mm[blk + BLOCK_HDR:blk + BLOCK_HDR + nk + nv] = ck + value
                i = W[H_FREE_ENTRY]
                e = self._ew + (i << 3) - 8
                b = self._bw + (h & self._bmask)
                new_cas = W[H_CAS] % U32 + 1
                self._wm(H_FREE_ENTRY, W[e + E_NEXT], e + E_NEXT, W[b], e + E_HASH, h, e + E_KLEN, nk,
                         e + E_VLEN, nv, e + E_BLOCK, blk, e + E_FLAGS, F_USED, e + E_CAS, new_cas,
                         b, i, H_NENTRIES, W[H_NENTRIES] + 1, H_CAS, new_cas)
            self._commit()
            return new_cas
        finally:
            self._release()

    def _evict(self, protect: int) -> bool:
        """Drop one cold entry (CLOCK) and commit; False if nothing can go."""
        if not self._lru:
            return False
        W, n, ew = self._W, self._g.max_entries, self._ew
        hand = W[H_CLOCK] % n
        for _ in range(2 * n + 1):
            e = ew + 8 * hand
            i, hand = hand + 1, (hand + 1) % n
            flags = W[e + E_FLAGS]
            if not flags & F_USED or i == protect:
                continue
            if flags & F_REF:
                W[e + E_FLAGS] = F_USED  # second chance (a hint, not journaled)
                continue
            W[H_CLOCK] = hand
            self._remove(i)
            W[H_EVICTIONS] = (W[H_EVICTIONS] + 1) & U32
            self._commit()
            return True
        return False

    def _remove(self, i: int) -> None:
        W = self._W
        e = self._ew + (i << 3) - 8
        link = self._bw + (W[e + E_HASH] & self._bmask)
        while W[link] != i:
            link = self._ew + (W[link] << 3) - 8 + E_NEXT
        self._w(link, W[e + E_NEXT])
        self._free(W[e + E_BLOCK])
        self._w(e + E_FLAGS, 0)
        self._w(e + E_NEXT, W[H_FREE_ENTRY])
        self._w(H_FREE_ENTRY, i)
        self._w(H_NENTRIES, W[H_NENTRIES] - 1)

    # -- queues ------------------------------------------------------------------------------

    def _find_queue(self, ck: bytes) -> int:
        W, mm = self._W, self._mm
        for qid in range(1, W[H_NQUEUES] + 1):
            q = self._qw + 8 * (qid - 1)
            if W[q + Q_NAMELEN] == len(ck):
                p = W[q + Q_NAME] + BLOCK_HDR
                if mm[p:p + len(ck)] == ck:
                    return qid
        return 0

    def register_queue(self, ns, name: bytes, pid: int | None = None) -> int:
        """Create or open queue (ns, name) and make `pid` (default: this process) its owner."""
        ck = self._key(ns, name)
        pid = pid or self._pid
        W = self._W
        notify = False
        self._acquire()
        try:
            qid = self._find_queue(ck)
            if not qid:
                if W[H_NQUEUES] >= self._g.max_queues:
                    raise StoreFull(f"shared queue table full ({self._g.max_queues} queues)")
                blk = self._alloc(len(ck))
                self._mm[blk + BLOCK_HDR:blk + BLOCK_HDR + len(ck)] = ck
                qid = W[H_NQUEUES] + 1
                q = self._qw + 8 * (qid - 1)
                for word, value in ((Q_USED, 1), (Q_OWNER, pid), (Q_PENDING, 0), (Q_HEAD, 0), (Q_TAIL, 0),
                                    (Q_COUNT, 0), (Q_NAME, blk), (Q_NAMELEN, len(ck))):
                    self._w(q + word, value)
                self._w(H_NQUEUES, qid)
            else:
                q = self._qw + 8 * (qid - 1)
                notify = bool(W[q + Q_PENDING]) and W[q + Q_OWNER] != pid
                self._w(q + Q_OWNER, pid)
            self._commit()
        finally:
            self._release()
        self._queue_ids[ck] = qid
        if notify:
            self._notify(pid)
        return qid

    def resolve_queue(self, ns, name: bytes) -> int:
        """The id of queue (ns, name); NotFound if nobody registered it."""
        ck = self._key(ns, name)
        qid = self._queue_ids.get(ck)
        if qid:
            return qid
        self._acquire()
        try:
            qid = self._find_queue(ck)
        finally:
            self._release()
        if not qid:
            raise NotFound("no such queue")
        self._queue_ids[ck] = qid
        return qid

    def _queue(self, qid: int) -> int:
        if not 1 <= qid <= self._W[H_NQUEUES]:
            raise NotFound("no such queue")
        return self._qw + 8 * (qid - 1)

    def enqueue(self, qid: int, data: bytes) -> None:
        """Append data; the owner's wake socket gets a datagram if it had nothing pending."""
        if len(data) > self._g.max_value:
            raise TooLarge(f"queue item over {self._g.max_value} bytes")
        W = self._W
        need = 1 << self._order(len(data))
        self._acquire()
        try:
            q = self._queue(qid)
            if W[H_QBYTES] + need > self._g.queue_bytes:
                raise StoreFull(f"shared queues full ({self._g.queue_bytes} bytes)")
            blk = self._alloc(len(data))
            self._mm[blk + BLOCK_HDR:blk + BLOCK_HDR + len(data)] = data
            w = blk >> 2
            tail = W[q + Q_TAIL]
            owner = W[q + Q_OWNER]
            notify = not W[q + Q_PENDING]
            self._wm(w + 1, 0, w + 2, len(data), ((tail >> 2) + 1) if tail else q + Q_HEAD, blk,
                     q + Q_TAIL, blk, q + Q_COUNT, W[q + Q_COUNT] + 1, q + Q_PENDING, 1,
                     H_QBYTES, W[H_QBYTES] + need)
            self._commit()
        finally:
            self._release()
        if notify and owner:
            self._notify(owner)

    def dequeue(self, qid: int) -> bytes:
        """Pop the oldest item; Empty if none, NotFound if no such queue."""
        W = self._W
        self._acquire()
        try:
            q = self._queue(qid)
            head = W[q + Q_HEAD]
            if not head:
                raise Empty("queue is empty")
            w = head >> 2
            data = self._mm[head + BLOCK_HDR:head + BLOCK_HDR + W[w + 2]]
            nxt = W[w + 1]
            qbytes = W[H_QBYTES] - (1 << (W[w] & 0xFF))
            if nxt:
                self._wm(q + Q_HEAD, nxt, q + Q_COUNT, W[q + Q_COUNT] - 1, H_QBYTES, qbytes)
            else:
                self._wm(q + Q_HEAD, 0, q + Q_TAIL, 0, q + Q_COUNT, W[q + Q_COUNT] - 1, H_QBYTES, qbytes)
            self._free(head)
            self._commit()
            return data
        finally:
            self._release()

    def queue_size(self, qid: int) -> int:
        return self._W[self._queue(qid) + Q_COUNT]

    # -- wake-ups and slots -----------------------------------------------------------------

    def _wake_name(self, pid: int) -> bytes:
        return f"\0forkgw-{self._token}-{pid}".encode()

    def _notify(self, pid: int) -> None:
        tx = self._tx
        if tx is None:
            tx = self._tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            tx.setblocking(False)
        try:
            tx.sendto(b"!", self._wake_name(pid))
        except OSError:
            pass  # owner gone (its successor re-registers) or its buffer full (it has wake-ups to read)

    def attach(self) -> socket.socket:
        """In a worker, after fork: take a metrics slot and bind this process's wake socket.

        Returns the non-blocking datagram socket to register for reading in the
        worker's selector; when readable, call ready_queues().  Idempotent.
        """
        if self._wake is not None:
            return self._wake
        pid, W, sw = self._pid, self._W, self._sw
        slot = 0
        self._acquire()
        try:
            for s in range(1, self._S):
                owner = W[sw + s]
                if owner and (owner == pid or not _alive(owner)):
                    self._clear_slot(s)  # its process is gone (a pid equal to ours is a dead predecessor)
                    owner = 0
                if not owner and not slot:
                    slot = s
            if slot:
                self._w(sw + slot, pid)
            self._commit()
        finally:
            self._release()
        self._set_slot(slot)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(self._wake_name(pid))
        self._wake = sock
        return sock

    def detach(self, pid: int | None = None) -> None:
        """Free the slot of pid (default: this process): the master calls it after reaping a worker.

        The gone worker's gauge deltas are dropped, its counters and histograms kept.
        """
        me = pid is None or pid == self._pid
        pid = self._pid if pid is None else pid
        W, sw = self._W, self._sw
        self._acquire()
        try:
            for s in range(1, self._S):
                if W[sw + s] == pid:
                    self._clear_slot(s)
            self._commit()
        finally:
            self._release()
        if me:
            self._set_slot(0)
            if self._wake is not None:
                self._wake.close()
                self._wake = None

    def _clear_slot(self, s: int) -> None:
        for d in self._all_defs_locked():
            if d.kind == GAUGE:
                self._Q[self._cq + d.cell * self._S + s] = 0
        self._w(self._sw + s, 0)

    def _set_slot(self, slot: int) -> None:
        self._slot = slot
        for handle in self._handles.values():
            handle._bind(slot)

    def ready_queues(self) -> list[int]:
        """Ids of this process's queues that got items since the last call; drains the wake socket."""
        sock = self._wake
        if sock is not None:
            woken = False
            while True:
                try:
                    sock.recv(16)
                except (BlockingIOError, InterruptedError):
                    break
                woken = True
            if not woken:
                return []
        W, pid, ready = self._W, self._pid, []
        self._acquire()
        try:
            for qid in range(1, W[H_NQUEUES] + 1):
                q = self._qw + 8 * (qid - 1)
                if W[q + Q_PENDING] and W[q + Q_OWNER] == pid:
                    self._w(q + Q_PENDING, 0)
                    ready.append(qid)
            self._commit()
        finally:
            self._release()
        return ready

    # -- metrics -------------------------------------------------------------------------------

    def define_metric(self, kind: int, name: bytes | str, buckets=None, *, _labels_at: int = 0) -> int:
        """The id of metric `name` (created if new: idempotent per name, whatever the kind)."""
        raw = name.encode() if isinstance(name, str) else bytes(name)
        mid = self._metric_ids.get(raw)
        if mid:
            return mid
        if kind not in (COUNTER, GAUGE, HISTOGRAM):
            raise ValueError(f"unknown metric kind {kind}")
        g = self._g
        if len(raw) > g.max_name:
            raise TooLarge(f"metric name over {g.max_name} bytes")
        bounds = ()
        if kind == HISTOGRAM:
            bounds = tuple(sorted({float(b) for b in (buckets or ENVOY_BUCKETS) if not math.isinf(float(b))}))
            if len(bounds) > MAX_BUCKETS:
                raise TooLarge(f"more than {MAX_BUCKETS} buckets")
        ncells = (1, 2, len(bounds) + 3)[kind]
        W, mm = self._W, self._mm
        self._acquire()
        try:
            mid = 0
            for d in self._all_defs_locked():
                if d.name == raw:
                    mid = d.id
                    break
            if not mid:
                mid, cell = W[H_NMETRICS] + 1, W[H_NCELLS]
                if mid > g.max_metrics or cell + ncells > g.metric_cells:
                    raise StoreFull(f"metric table full ({g.max_metrics} metrics, {g.metric_cells} cells)")
                at = g.names_at + (mid - 1) * g.max_name
                mm[at:at + len(raw)] = raw
                for n, bound in enumerate(bounds):
                    self._D[(g.bounds_at >> 3) + (mid - 1) * MAX_BUCKETS + n] = bound
                m = self._mw + 8 * (mid - 1)
                for word, value in ((M_KIND, kind + 1), (M_CELL, cell), (M_NCELLS, ncells),
                                    (M_NBUCKETS, len(bounds)), (M_NAMELEN, len(raw)), (M_LABELS, _labels_at)):
                    self._w(m + word, value)
                self._w(H_NCELLS, cell + ncells)
                self._w(H_NMETRICS, mid)
            self._commit()
        finally:
            self._release()
        self._metric_ids[raw] = mid
        return mid

    def _read_def(self, mid: int) -> _Def:
        d = self._defs.get(mid)
        if d is None:
            g, W = self._g, self._W
            m = self._mw + 8 * (mid - 1)
            d = _Def()
            d.id, d.kind, d.cell, d.ncells = mid, W[m + M_KIND] - 1, W[m + M_CELL], W[m + M_NCELLS]
            at = g.names_at + (mid - 1) * g.max_name
            d.name = bytes(self._mm[at:at + W[m + M_NAMELEN]])
            d.labels_at = W[m + M_LABELS]
            b = (g.bounds_at >> 3) + (mid - 1) * MAX_BUCKETS
            d.bounds = tuple(self._D[b:b + W[m + M_NBUCKETS]])
            self._defs[mid] = d
        return d

    def _all_defs_locked(self) -> list[_Def]:
        return [self._read_def(mid) for mid in range(1, self._W[H_NMETRICS] + 1)]

    def metric(self, mid: int):
        """The Counter/Gauge/Histogram handle of id mid; NotFound if undefined."""
        handle = self._handles.get(mid)
        if handle is not None:
            return handle
        self._acquire()
        try:
            if not 1 <= mid <= self._W[H_NMETRICS]:
                raise NotFound("no such metric")
            d = self._read_def(mid)
        finally:
            self._release()
        handle = (Counter, Gauge, Histogram)[d.kind](self, d)
        handle._bind(self._slot)
        self._handles[mid] = handle
        return handle

    def increment(self, mid: int, delta: int) -> None:
        """Counter/gauge += delta; ValueError for a histogram or a negative counter delta."""
        handle = self._handles.get(mid) or self.metric(mid)
        if handle.kind == HISTOGRAM:
            raise ValueError("cannot increment a histogram")
        handle.add(delta)

    def record(self, mid: int, value) -> None:
        """Gauge = value, histogram sample, counter += value (as Envoy does)."""
        handle = self._handles.get(mid) or self.metric(mid)
        kind = handle.kind
        if kind == GAUGE:
            handle.set(value)
        elif kind == HISTOGRAM:
            handle.observe(value)
        else:
            handle.add(value)

    def get_metric(self, mid: int) -> int:
        """The value aggregated over all processes; ValueError for a histogram."""
        handle = self._handles.get(mid) or self.metric(mid)
        if handle.kind == HISTOGRAM:
            raise ValueError("a histogram has no single value")
        return handle.value()

    def _series_handle(self, kind: int, name: str, labels, buckets):
        key = (kind, name, tuple(labels.items()) if isinstance(labels, dict) else tuple(labels or ()), buckets)
        handle = self._series.get(key)
        if handle is None:
            block = _label_block(labels)
            full = (name + block).encode()
            mid = self.define_metric(kind, full, buckets, _labels_at=len(name.encode()) if block else 0)
            handle = self._series[key] = self.metric(mid)
        return handle

    def counter(self, name: str, labels=None) -> Counter:
        """The counter series name{labels}; keep the handle, `.add(n)` costs ~0.2 us."""
        return self._series_handle(COUNTER, name, labels, None)

    def gauge(self, name: str, labels=None) -> Gauge:
        return self._series_handle(GAUGE, name, labels, None)

    def histogram(self, name: str, labels=None, buckets=SECONDS_BUCKETS) -> Histogram:
        return self._series_handle(HISTOGRAM, name, labels, tuple(buckets))

    def _locked_add(self, index: int, n: int) -> None:
        self._acquire()
        try:
            _add_wrapping(self._Q, index, n)
        finally:
            self._release()

    def _locked_observe(self, h: Histogram, k: int, value) -> None:
        self._acquire()
        try:
            self._Q[h._base + k * h._S] += 1
            self._D[h._base + h._sum] += value
            self._Q[h._base + h._count] += 1
        finally:
            self._release()

    def _gauge_set(self, g: Gauge, value: int) -> None:
        Q = self._Q
        self._acquire()
        try:
            Q[g._me] = _wrap64(Q[g._me] + 1)  # slot deltas of older epochs stop counting
            Q[g._base] = _wrap64(value)
        finally:
            self._release()

    def _gauge_value(self, g: Gauge, locked: bool = True) -> int:
        Q, S = self._Q, self._S
        if locked:
            self._acquire()
        try:
            epoch = Q[g._me]
            deltas = Q[g._base + 1:g._base + S].tolist()
            epochs = Q[g._me + 1:g._me + S].tolist()
            return _wrap64(Q[g._base] + sum(d for d, e in zip(deltas, epochs) if e == epoch))
        finally:
            if locked:
                self._release()

    # -- exposition ---------------------------------------------------------------------------

    def render_prometheus(self) -> str:
        """All metrics in the Prometheus text format (0.0.4): # TYPE lines, histogram _bucket/_sum/_count."""
        self._acquire()
        try:
            defs = self._all_defs_locked()
        finally:
            self._release()
        groups: dict[str, tuple[int, list[str]]] = {}
        for d in defs:
            handle = self._handles.get(d.id) or self.metric(d.id)
            cut = d.labels_at or len(d.name)
            base = sanitize_name(d.name[:cut].decode("utf-8", "replace"))
            labels = d.name[cut:].decode("utf-8", "replace")
            group = groups.get(base)
            if group is not None and group[0] != d.kind:
                base = f"{base}_{KIND_NAMES[d.kind]}"  # one name, one type
                group = groups.get(base)
            if group is None:
                group = groups[base] = (d.kind, [])
            lines = group[1]
            if d.kind == COUNTER:
                lines.append(f"{base}{labels} {handle.value()}")
            elif d.kind == GAUGE:
                lines.append(f"{base}{labels} {self._gauge_value(handle, locked=False)}")
            else:
                buckets, count, total = handle.snapshot()
                inner = labels[1:-1] + "," if labels else ""
                running = 0
                for bound, n in zip(d.bounds + (math.inf,), buckets):
                    running += n
                    lines.append(f'{base}_bucket{{{inner}le="{_fmt(bound)}"}} {running}')
                lines.append(f"{base}_sum{labels} {_fmt(total)}")
                lines.append(f"{base}_count{labels} {count}")
        out = []
        for base, (kind, lines) in groups.items():
            out.append(f"# TYPE {base} {KIND_NAMES[kind]}")
            out.extend(lines)
        return "\n".join(out) + "\n" if out else ""

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> dict:
        """Occupancy, for logs and the gateway's own gauges."""
        g, W = self._g, self._W
        self._acquire()
        try:
            free = 0
            for k in range(MIN_ORDER, g.top + 1):
                b = W[H_FREE + k]
                while b:
                    free += 1 << k
                    b = W[(b >> 2) + 1]
            slots = sum(1 for s in range(1, self._S) if W[self._sw + s])
            return dict(entries=W[H_NENTRIES], max_entries=g.max_entries, evictions=W[H_EVICTIONS],
                        arena_bytes=g.ntop << g.top, free_bytes=free, queues=W[H_NQUEUES],
                        queue_bytes=W[H_QBYTES], max_queue_bytes=g.queue_bytes,
                        metrics=W[H_NMETRICS], metric_cells=W[H_NCELLS], slots_used=slots,
                        mapped_bytes=g.total, eviction=g.args["eviction"])
        finally:
            self._release()

    def _check(self) -> None:
        """Assert every structural invariant (tests: after crashes and random operations)."""
        g, W, mm = self._g, self._W, self._mm
        self._acquire()
        try:
            assert W[H_JLEN] == 0 and W[H_BJLEN] == 0
            # arena: a tiling of free and used blocks; free lists hold exactly the free ones
            blocks, free, b, end = {}, set(), g.arena_at, g.arena_at + (g.ntop << g.top)
            while b < end:
                tag = W[b >> 2]
                k = tag & 0xFF
                assert tag & TAG_MASK in (FREE_TAG, USED_TAG) and MIN_ORDER <= k <= g.top, (b, hex(tag))
                assert (b - g.arena_at) % (1 << k) == 0
                blocks[b] = tag
                if tag & TAG_MASK == FREE_TAG:
                    free.add(b)
                b += 1 << k
            assert b == end
            listed = set()
            for k in range(32):
                b, prev = W[H_FREE + k], 0
                while b:
                    assert blocks.get(b) == FREE_TAG | k and b not in listed
                    assert W[(b >> 2) + 2] == prev
                    listed.add(b)
                    prev, b = b, W[(b >> 2) + 1]
            assert listed == free
            # entries: reachable once from their bucket, free list holds the rest
            used_blocks, seen = [], set()
            for bucket in range(g.nbuckets):
                i = W[self._bw + bucket]
                while i:
                    assert i not in seen
                    seen.add(i)
                    e = self._ew + (i << 3) - 8
                    assert W[e + E_FLAGS] & F_USED and W[e + E_HASH] & self._bmask == bucket
                    blk = W[e + E_BLOCK]
                    assert blocks.get(blk, 0) & TAG_MASK == USED_TAG
                    assert self._order(W[e + E_KLEN] + W[e + E_VLEN]) <= blocks[blk] & 0xFF
                    p = blk + BLOCK_HDR
                    assert zlib.crc32(mm[p:p + W[e + E_KLEN]]) == W[e + E_HASH]
                    used_blocks.append(blk)
                    i = W[e + E_NEXT]
            assert len(seen) == W[H_NENTRIES]
            i, nfree = W[H_FREE_ENTRY], 0
            while i:
                assert i not in seen and not W[self._ew + (i << 3) - 8 + E_FLAGS]
                nfree += 1
                i = W[self._ew + (i << 3) - 8 + E_NEXT]
            assert nfree + len(seen) == g.max_entries
            qbytes = 0
            for qid in range(1, W[H_NQUEUES] + 1):
                q = self._qw + 8 * (qid - 1)
                used_blocks.append(W[q + Q_NAME])
                b, count, last = W[q + Q_HEAD], 0, 0
                while b:
                    used_blocks.append(b)
                    qbytes += 1 << (W[b >> 2] & 0xFF)
                    count += 1
                    last, b = b, W[(b >> 2) + 1]
                assert count == W[q + Q_COUNT] and last == W[q + Q_TAIL]
            assert qbytes == W[H_QBYTES]
            assert sorted(used_blocks) == sorted(b for b, tag in blocks.items() if tag & TAG_MASK == USED_TAG)
        finally:
            self._release()
