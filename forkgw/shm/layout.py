"""Where everything is in the shared mapping, and the mapping itself.

Theory of operation: the layout is a pure function of the constructor
arguments, so every process that knows them computes the same offsets.  The
arguments are written as JSON into the header when the store is made, so a
process handed only the fd (`ShmStore.open(fd)`, an exec'd master) rebuilds
the same `Geometry` from the memory itself.  Everything is addressed as u32
words (`W`), except metric cells (i64 `Q`, f64 `D`); offsets stay under 4 GiB
so a u32 word can hold any of them, and 0 can mean "none" because the header
comes first.

Changing any offset, word or tag below changes the format: a store made by
one version must open in another, so bump VERSION instead.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets

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
MAX_BUCKETS = 32  # histogram bounds kept per metric

# entry words (8): index+1 links, 0 = none
E_NEXT, E_HASH, E_CAS, E_KLEN, E_VLEN, E_BLOCK, E_FLAGS = range(7)
F_USED, F_REF = 1, 2
# queue words (8)
Q_USED, Q_OWNER, Q_PENDING, Q_HEAD, Q_TAIL, Q_COUNT, Q_NAME, Q_NAMELEN = range(8)
# metric words (8)
M_KIND, M_CELL, M_NCELLS, M_NBUCKETS, M_NAMELEN, M_LABELS = range(6)

U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF


class Geometry:
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


def read_args(fd: int) -> dict:
    """The constructor arguments a store was made with, from its header."""
    with mmap.mmap(fd, HEADER, mmap.MAP_SHARED, mmap.PROT_READ) as head:
        raw = bytes(head[GEOMETRY_AT:HEADER]).split(b"\0", 1)[0]
    return json.loads(raw)


class Memory:
    """The memfd, mapped shared, with its three views and its header.

    fd None: a new, zeroed file, whose header this writes (`fresh`); the parts
    then format their own regions.  Otherwise the header must say it is a
    store of this version.
    """

    def __init__(self, g: Geometry, fd: int | None = None):
        self.fresh = fd is None
        if self.fresh:
            if hasattr(os, "memfd_create"):
                fd = os.memfd_create("forkgw-shm")
            else:  # not Linux: an unlinked file does the same
                import tempfile

                fd = os.dup(tempfile.TemporaryFile().fileno())
            os.ftruncate(fd, g.total)
        self.fd = fd
        self.mm = mmap.mmap(fd, g.total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.W = memoryview(self.mm).cast("I")
        self.Q = memoryview(self.mm).cast("q")
        self.D = memoryview(self.mm).cast("d")
        if self.fresh:
            self._format(g)
        elif self.W[H_MAGIC] != MAGIC or self.W[H_VERSION] != VERSION:
            raise ValueError("not a forkgw store")
        self.token = bytes(self.mm[TOKEN_AT:TOKEN_AT + 16]).rstrip(b"\0").decode()

    def _format(self, g: Geometry) -> None:
        W, mm = self.W, self.mm
        W[H_MAGIC], W[H_VERSION] = MAGIC, VERSION
        mm[TOKEN_AT:TOKEN_AT + 16] = f"{os.getpid():x}.{secrets.token_hex(4)}".encode().ljust(16, b"\0")[:16]
        geometry = json.dumps(g.args).encode()
        mm[GEOMETRY_AT:GEOMETRY_AT + len(geometry)] = geometry

    def close(self) -> None:
        """Unmap and close the fd; every view must go first, or the unmap fails."""
        for view in (self.W, self.Q, self.D):
            view.release()
        self.mm.close()
        os.close(self.fd)
