"""Key/value data: a chained hash table of fixed entries, with CAS and CLOCK eviction.

Theory of operation:
- Key/value: one namespace per VM id; a chained hash table of fixed entries,
  key and value together in one arena block (see `alloc`).  An update that
  fits its block is written in place.  CAS: one global u32 counter, never 0;
  `cas == 0` writes unconditionally; a missing key is created whatever the cas.
- Full store: eviction="lru" (default) drops least recently used entries
  (CLOCK, an approximate LRU: a read or an update marks an entry, a sweep
  spares marked entries once) until the new data fits, because the Rust SDK
  panics on any set_shared_data status but Ok and CasMismatch; eviction="none"
  raises StoreFull instead (Kong's `eviction=none`).

An entry is eight words, addressed by index + 1 so that 0 can end a chain;
unused entries form a free list through E_NEXT.  The stored key is the
namespace's length and bytes, then the key: one comparison finds both.  The
reference marks (F_REF) and the clock hand are hints, written without the
journal: losing one to a crash costs an eviction choice, never consistency.
"""

from __future__ import annotations

import zlib

from .alloc import Allocator
from .errors import StoreFull, TooLarge
from .journal import Journal
from .layout import (BLOCK_HDR, E_BLOCK, E_CAS, E_FLAGS, E_HASH, E_KLEN, E_NEXT, E_VLEN, F_REF, F_USED,
                     H_CAS, H_CLOCK, H_EVICTIONS, H_FREE_ENTRY, H_NENTRIES, TAG_MASK, U32, USED_TAG,
                     Geometry, Memory)


class Table:
    """The entries, their hash buckets and the namespaces' key encoding."""

    def __init__(self, mem: Memory, journal: Journal, arena: Allocator, g: Geometry):
        self.W, self.mm, self.journal, self.arena, self.g = mem.W, mem.mm, journal, arena, g
        self.bw = g.buckets_at >> 2
        self.bmask = g.nbuckets - 1
        self.ew = g.entries_at >> 2
        self.lru = g.lru
        self._ns: dict = {}  # namespace -> encoded prefix

    def format(self) -> None:
        """A new table: CAS at 0, every entry on the free list."""
        W, n = self.W, self.g.max_entries
        W[H_CAS] = 0
        nexts = memoryview(bytearray(4 * n)).cast("I")
        for i in range(n - 1):
            nexts[i] = i + 2
        W[self.ew:self.ew + 8 * n:8] = nexts
        W[H_FREE_ENTRY] = 1

    def key(self, ns, key: bytes) -> bytes:
        """The stored form of (namespace, key); TooLarge over the limits (queue names use it too)."""
        prefix = self._ns.get(ns)
        if prefix is None:
            raw = ns.encode() if isinstance(ns, str) else bytes(ns)
            if len(raw) > 255:
                raise TooLarge("namespace over 255 bytes")
            prefix = self._ns[ns] = bytes((len(raw),)) + raw
        if len(key) > self.g.max_key:
            raise TooLarge(f"key over {self.g.max_key} bytes")
        return prefix + key

    def lookup(self, ck: bytes, h: int) -> int:
        """The entry (index + 1) of stored key ck with hash h, or 0 (under the lock)."""
        W, mm, n = self.W, self.mm, len(ck)
        i = W[self.bw + (h & self.bmask)]
        while i:
            e = self.ew + (i << 3) - 8
            if W[e + E_HASH] == h and W[e + E_KLEN] == n:
                p = W[e + E_BLOCK] + BLOCK_HDR
                if mm[p:p + n] == ck:
                    return i
            i = W[e]
        return 0

    def get(self, ns, key: bytes) -> tuple[bytes, int] | None:
        """(value, cas) of key in namespace ns, or None."""
        try:
            ck = self.key(ns, key)
        except TooLarge:
            return None
        h = zlib.crc32(ck)
        W, mm, n = self.W, self.mm, len(ck)
        self.journal.acquire()
        try:  # lookup() inlined: this is the hottest read
            i = W[self.bw + (h & self.bmask)]
            while i:
                e = self.ew + (i << 3) - 8
                if W[e + E_HASH] == h and W[e + E_KLEN] == n:
                    p = W[e + E_BLOCK] + BLOCK_HDR
                    if mm[p:p + n] == ck:
                        if self.lru:
                            W[e + E_FLAGS] = F_USED | F_REF  # a hint: not journaled
                        p += n
                        return mm[p:p + W[e + E_VLEN]], W[e + E_CAS]
                i = W[e]
            return None
        finally:
            self.journal.unlock()

    def set(self, ns, key: bytes, value: bytes, cas: int = 0) -> int:
        """Store value; its new cas, or 0 if cas != 0 and differs from the current one."""
        ck = self.key(ns, key)
        if len(value) > self.g.max_value:
            raise TooLarge(f"value over {self.g.max_value} bytes")
        h = zlib.crc32(ck)
        self.journal.acquire()
        try:
            i = self.lookup(ck, h)
            if i:
                new_cas = self._update(i, ck, value, cas)
                if not new_cas:
                    return 0
            else:
                new_cas = self._insert(ck, h, value)
            self.journal.commit()
            return new_cas
        finally:
            self.journal.release()

    def _update(self, i: int, ck: bytes, value: bytes, cas: int) -> int:
        """Into a new block if the size class changes (and one is free), else in place."""
        W, mm = self.W, self.mm
        nk, nv = len(ck), len(value)
        e = self.ew + (i << 3) - 8
        if cas and W[e + E_CAS] != cas:
            return 0
        blk = W[e + E_BLOCK]
        k = W[blk >> 2] & 0xFF
        want = self.arena.order(nk + nv)
        new = 0
        if want != k:
            if want > k:
                new = self.arena.alloc(nk + nv, keep=i)
            else:
                new = self.arena.take(want)  # shrink if there is room, else stay in place
        new_cas = W[H_CAS] % U32 + 1
        if new:
            mm[new + BLOCK_HDR:new + BLOCK_HDR + nk + nv] = ck + value
            self.journal.wm(H_CAS, new_cas, e + E_CAS, new_cas, e + E_VLEN, nv, e + E_BLOCK, new)
            self.arena.free(blk)
        else:
            self.journal.wm(H_CAS, new_cas, e + E_CAS, new_cas, e + E_VLEN, nv)
            self.journal.overwrite(blk + BLOCK_HDR + nk, value)
        if self.lru:
            W[e + E_FLAGS] = F_USED | F_REF
        return new_cas

    def _insert(self, ck: bytes, h: int, value: bytes) -> int:
        """A free entry (evicting for one if allowed), a block, then one journaled write of all the links."""
        W, mm = self.W, self.mm
        nk, nv = len(ck), len(value)
        while not W[H_FREE_ENTRY]:
            if not self.evict(0):
                raise StoreFull(f"shared store full ({self.g.max_entries} entries, eviction=none)")
        blk = self.arena.alloc(nk + nv)
        mm[blk + BLOCK_HDR:blk + BLOCK_HDR + nk + nv] = ck + value
        i = W[H_FREE_ENTRY]
        e = self.ew + (i << 3) - 8
        b = self.bw + (h & self.bmask)
        new_cas = W[H_CAS] % U32 + 1
        self.journal.wm(H_FREE_ENTRY, W[e + E_NEXT], e + E_NEXT, W[b], e + E_HASH, h, e + E_KLEN, nk,
                        e + E_VLEN, nv, e + E_BLOCK, blk, e + E_FLAGS, F_USED, e + E_CAS, new_cas,
                        b, i, H_NENTRIES, W[H_NENTRIES] + 1, H_CAS, new_cas)
        return new_cas

    def evict(self, keep: int) -> bool:
        """Drop one cold entry other than `keep` (CLOCK) and commit; False if nothing can go."""
        if not self.lru:
            return False
        W, n, ew = self.W, self.g.max_entries, self.ew
        hand = W[H_CLOCK] % n
        for _ in range(2 * n + 1):
            e = ew + 8 * hand
            i, hand = hand + 1, (hand + 1) % n
            flags = W[e + E_FLAGS]
            if not flags & F_USED or i == keep:
                continue
            if flags & F_REF:
                W[e + E_FLAGS] = F_USED  # second chance (a hint, not journaled)
                continue
            W[H_CLOCK] = hand
            self.remove(i)
            W[H_EVICTIONS] = (W[H_EVICTIONS] + 1) & U32
            self.journal.commit()
            return True
        return False

    def remove(self, i: int) -> None:
        """Unchain entry i, free its block and put it back on the free list (journaled, not committed)."""
        W, j = self.W, self.journal
        e = self.ew + (i << 3) - 8
        link = self.bw + (W[e + E_HASH] & self.bmask)
        while W[link] != i:
            link = self.ew + (W[link] << 3) - 8 + E_NEXT
        j.w(link, W[e + E_NEXT])
        self.arena.free(W[e + E_BLOCK])
        j.w(e + E_FLAGS, 0)
        j.w(e + E_NEXT, W[H_FREE_ENTRY])
        j.w(H_FREE_ENTRY, i)
        j.w(H_NENTRIES, W[H_NENTRIES] - 1)

    def stats(self) -> dict:
        W = self.W
        return dict(entries=W[H_NENTRIES], max_entries=self.g.max_entries, evictions=W[H_EVICTIONS])

    def check(self, blocks: dict[int, int]) -> list[int]:
        """Assert each entry is reachable once from its bucket and the free list holds the rest.

        blocks: the arena's block -> tag; returns the blocks the entries use
        (tests; under the lock).
        """
        W, mm, g = self.W, self.mm, self.g
        used, seen = [], set()
        for bucket in range(g.nbuckets):
            i = W[self.bw + bucket]
            while i:
                assert i not in seen
                seen.add(i)
                e = self.ew + (i << 3) - 8
                assert W[e + E_FLAGS] & F_USED and W[e + E_HASH] & self.bmask == bucket
                blk = W[e + E_BLOCK]
                assert blocks.get(blk, 0) & TAG_MASK == USED_TAG
                assert self.arena.order(W[e + E_KLEN] + W[e + E_VLEN]) <= blocks[blk] & 0xFF
                p = blk + BLOCK_HDR
                assert zlib.crc32(mm[p:p + W[e + E_KLEN]]) == W[e + E_HASH]
                used.append(blk)
                i = W[e + E_NEXT]
        assert len(seen) == W[H_NENTRIES]
        i, nfree = W[H_FREE_ENTRY], 0
        while i:
            assert i not in seen and not W[self.ew + (i << 3) - 8 + E_FLAGS]
            nfree += 1
            i = W[self.ew + (i << 3) - 8 + E_NEXT]
        assert nfree + len(seen) == g.max_entries
        return used
