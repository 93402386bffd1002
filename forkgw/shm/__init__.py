"""Key/value data, queues and metrics in shared memory, seen by every worker.

Why: proxy-wasm filters count on shared data, shared queues and metrics being
global (Envoy: all worker threads; Kong: nginx shm zones), and the gateway's
own counters must add up across workers.  The master builds one `ShmStore`
before it forks anything; its memory (a memfd mapped MAP_SHARED) is inherited
by every worker of every generation, so it outlives reloads and crashes.  Its
fd can also be handed to an exec'd master (`ShmStore.open(fd)`).

Theory of operation, one part per module, each with its own invariants:
- `layout`: where everything is, computed from the constructor arguments
  (kept in the header, so `open(fd)` finds them); the mapping itself.
- `journal`: the one lock (lockf: the kernel drops it when its holder dies)
  and the undo journal that rolls a dead holder's half-done operation back.
- `alloc`: the buddy allocator over the arena, for entries and queue items.
- `table`: key/value entries in a chained hash table; CAS; CLOCK eviction.
- `queues`: queues by (namespace, name), items in the arena, wake sockets.
- `metrics`, `handles`, `prometheus`: metric definitions and per-process
  slots; the lock-free Counter/Gauge/Histogram; the text exposition.
- `store`: `ShmStore`, composing them for one process.

Wiring: the master makes the store once, before the first fork, keeps it
across reloads, and calls `detach(pid)` after reaping a worker.  A worker calls
`attach()` after fork and registers the returned socket in its selector; when
readable, `ready_queues()` (via ShmShared.take_ready() in Runtime.tick()).

The public methods are the interface a Redis-backed store would implement.
"""

from __future__ import annotations

from .errors import Empty, NotFound, StoreError, StoreFull, TooLarge
from .handles import COUNTER, GAUGE, HISTOGRAM, KIND_NAMES, Counter, Gauge, Histogram
from .layout import (BLOCK_HDR, E_BLOCK, E_CAS, E_FLAGS, E_HASH, E_KLEN, E_NEXT, E_VLEN, F_REF, F_USED,
                     FREE_TAG, GEOMETRY_AT, H_BJLEN, H_BJOFF, H_CAS, H_CLOCK, H_EVICTIONS, H_FREE,
                     H_FREE_ENTRY, H_JLEN, H_MAGIC, H_NCELLS, H_NENTRIES, H_NMETRICS, H_NQUEUES, H_QBYTES,
                     H_VERSION, HEADER, JOURNAL_MAX, M_CELL, M_KIND, M_LABELS, M_NAMELEN, M_NBUCKETS, M_NCELLS,
                     MAGIC, MAX_BUCKETS, MIN_ORDER, Q_COUNT, Q_HEAD, Q_NAME, Q_NAMELEN, Q_OWNER, Q_PENDING,
                     Q_TAIL, Q_USED, TAG_MASK, TOKEN_AT, U32, U64, USED_TAG, VERSION)
from .metrics import ENVOY_BUCKETS, SECONDS_BUCKETS
from .prometheus import sanitize_name
from .store import ShmStore

__all__ = [
    "ShmStore", "StoreError", "StoreFull", "TooLarge", "NotFound", "Empty",
    "COUNTER", "GAUGE", "HISTOGRAM", "ENVOY_BUCKETS", "SECONDS_BUCKETS",
]
