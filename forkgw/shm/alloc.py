"""A buddy allocator over the arena, for entries and queue items alike.

Theory of operation: key and value go together in one block of a buddy
allocator (64 B up to one maximum-size entry, so a value may take up to twice
its size) over an arena of `size` bytes; freed buddies merge only when an
allocation fails, so a steady set/enqueue/dequeue does not split and merge
blocks each time.

A block starts with four words: its tag (FREE_TAG or USED_TAG, or'ed with its
order), then the next and previous block of its free list.  A used block's
owner may reuse the last three (queue items keep their next item and length
there).  Every list change goes through the journal, so a holder that dies
mid-split or mid-merge loses nothing.  When even merging leaves no room, the
allocator asks `reclaim` (the table's eviction) to free something, and tries
again.
"""

from __future__ import annotations

from typing import Callable

from .errors import StoreError, StoreFull
from .journal import Journal
from .layout import BLOCK_HDR, FREE_TAG, H_FREE, MIN_ORDER, TAG_MASK, USED_TAG, Geometry, Memory


def _nothing_to_reclaim(keep: int) -> bool:
    return False


class Allocator:
    """Blocks of 2**k bytes (k from MIN_ORDER to the geometry's top) with per-order free lists."""

    def __init__(self, mem: Memory, journal: Journal, g: Geometry,
                 reclaim: Callable[[int], bool] = _nothing_to_reclaim):
        self.W, self.journal, self.g = mem.W, journal, g
        # reclaim(keep): free something (committing), never `keep`; False when nothing can go
        self.reclaim = reclaim

    def format(self) -> None:
        """A new arena: all of it in blocks of the top order, on one free list."""
        g, W = self.g, self.W
        size = 1 << g.top
        for t in range(g.ntop):
            b = g.arena_at + t * size
            W[b >> 2] = FREE_TAG | g.top
            W[(b >> 2) + 1] = b + size if t + 1 < g.ntop else 0
            W[(b >> 2) + 2] = b - size if t else 0
        W[H_FREE + g.top] = g.arena_at

    @staticmethod
    def order(nbytes: int) -> int:
        """The order of the smallest block that holds nbytes of payload."""
        return max(MIN_ORDER, (nbytes + BLOCK_HDR - 1).bit_length())

    def _push(self, k: int, b: int) -> None:
        w = b >> 2
        head = self.W[H_FREE + k]
        if head:
            self.journal.wm(w, FREE_TAG | k, w + 1, head, w + 2, 0, (head >> 2) + 2, b, H_FREE + k, b)
        else:
            self.journal.wm(w, FREE_TAG | k, w + 1, 0, w + 2, 0, H_FREE + k, b)

    def _unlink(self, k: int, b: int) -> None:
        W, w = self.W, b >> 2
        nxt, prv = W[w + 1], W[w + 2]
        if prv:
            self.journal.w((prv >> 2) + 1, nxt)
        else:
            self.journal.w(H_FREE + k, nxt)
        if nxt:
            self.journal.w((nxt >> 2) + 2, prv)

    def take(self, k: int) -> int:
        """A block of order k, splitting a bigger one if need be; 0 (no writes then) if none is free."""
        W, top = self.W, self.g.top
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
        self.journal.w(b >> 2, USED_TAG | k)
        return b

    def free(self, b: int) -> None:
        """Back on its order's list; buddies merge later, when an allocation fails (no split/merge ping-pong)."""
        self._push(self.W[b >> 2] & 0xFF, b)

    def coalesce(self) -> bool:
        """Merge free buddies, committing each merge; True if any merged."""
        W, base, top = self.W, self.g.arena_at, self.g.top
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
                    self.journal.commit()
                    merged = True
                b = nxt
        return merged

    def alloc(self, nbytes: int, keep: int = 0) -> int:
        """A block for nbytes of payload: merging free buddies, then reclaiming (never `keep`) if that is allowed.

        Merges and reclaims commit on their own, so this must come before the
        operation's first journaled write.
        """
        if self.journal.pending():
            raise StoreError("allocation after a journaled write")
        k = self.order(nbytes)
        while True:
            b = self.take(k)
            if b:
                return b
            if self.coalesce():
                continue
            if not self.reclaim(keep):
                args = self.g.args
                raise StoreFull(f"shared store full ({args['size']} bytes, eviction={args['eviction']})")

    def free_bytes(self) -> int:
        """Bytes on the free lists (under the lock)."""
        W, free = self.W, 0
        for k in range(MIN_ORDER, self.g.top + 1):
            b = W[H_FREE + k]
            while b:
                free += 1 << k
                b = W[(b >> 2) + 1]
        return free

    def stats(self) -> dict:
        g = self.g
        return dict(arena_bytes=g.ntop << g.top, free_bytes=self.free_bytes())

    def check(self) -> dict[int, int]:
        """Assert the arena is a tiling of free and used blocks, the free lists holding exactly the free ones.

        Returns block -> tag, for the owners' checks (tests; under the lock).
        """
        g, W = self.g, self.W
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
        return blocks

    @staticmethod
    def used(blocks: dict[int, int]) -> list[int]:
        """The used blocks among check()'s result."""
        return [b for b, tag in blocks.items() if tag & TAG_MASK == USED_TAG]
