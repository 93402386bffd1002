"""The key/value table on its own: key encoding, CAS, block moves, CLOCK eviction, crashes.

The table runs over a real shared mapping with its own journal and allocator
(wired as the store wires them: the allocator reclaims by evicting), and no
queues or metrics.
"""

from __future__ import annotations

import os
import signal

import pytest
from forking import exited_ok, fork, wait

from forkgw.shm.alloc import Allocator
from forkgw.shm.errors import StoreFull, TooLarge
from forkgw.shm.journal import Journal
from forkgw.shm.layout import E_BLOCK, E_FLAGS, F_REF, F_USED, H_CAS, H_JLEN, U32, Geometry, Memory
from forkgw.shm.table import Table
from shm_parts import made_fixture


class Parts:
    def __init__(self, eviction="lru", max_entries=None, size=16 << 10):
        self.g = Geometry(size, 16, 1000, eviction, max_entries, 8, 8, 32, None, 2, None)
        self.mem = Memory(self.g)
        self.j = Journal(self.mem, self.g)
        self.arena = Allocator(self.mem, self.j, self.g)
        self.table = Table(self.mem, self.j, self.arena, self.g)
        self.arena.reclaim = self.table.evict
        self.arena.format()
        self.table.format()

    def close(self) -> None:
        self.mem.close()

    def entry(self, i: int) -> int:
        return self.table.ew + (i << 3) - 8

    def check(self) -> None:
        self.j.acquire()
        try:
            blocks = self.arena.check()
            assert sorted(self.table.check(blocks)) == sorted(self.arena.used(blocks))
        finally:
            self.j.release()

    def index(self, ns, key: bytes) -> int:
        import zlib

        ck = self.table.key(ns, key)
        return self.table.lookup(ck, zlib.crc32(ck))


made = made_fixture(Parts)


def test_keys_carry_their_namespace(made):
    t = made().table
    assert t.key("vm", b"k") == b"\x02vmk" == t.key(b"vm", b"k")
    assert t.key("", b"") == b"\x00"
    assert t.key("a", b"bc") != t.key("ab", b"c")  # the length byte keeps namespaces apart
    with pytest.raises(TooLarge, match="namespace"):
        t.key("n" * 256, b"k")
    with pytest.raises(TooLarge, match="key over 16 bytes"):
        t.key("f", b"x" * 17)


def test_cas_is_global_never_zero_and_a_mismatch_writes_nothing(made):
    p = made()
    t, W = p.table, p.mem.W
    c1 = t.set("a", b"k", b"1")
    c2 = t.set("b", b"k", b"2")
    assert (c1, c2) == (1, 2) and W[H_CAS] == 2
    assert t.set("a", b"k", b"x", c2) == 0 and W[H_JLEN] == 0 and t.get("a", b"k") == (b"1", 1)
    assert t.set("a", b"missing", b"m", 12345) == 3  # created whatever the cas
    W[H_CAS] = U32
    assert t.set("a", b"k", b"w", 1) == 1  # wraps past 0
    assert t.get("a", b"too long key ....") is None  # over max_key: simply not there
    with pytest.raises(TooLarge, match="value over 1000"):
        t.set("a", b"k", b"v" * 1001)
    p.check()


def test_updates_stay_in_place_move_up_or_shrink_when_they_can(made):
    p = made()
    t, W = p.table, p.mem.W
    t.set("f", b"k", b"v" * 40)  # 2+1+40 + header: a 64-byte block
    i = p.index("f", b"k")
    e = p.entry(i)
    blk = W[e + E_BLOCK]
    t.set("f", b"k", b"w" * 45)
    assert W[e + E_BLOCK] == blk  # same size class: written in place
    t.set("f", b"k", b"g" * 400)
    grown = W[e + E_BLOCK]
    assert grown != blk and W[grown >> 2] & 0xFF == 9  # 3 + 400 + header: 512 bytes
    t.set("f", b"k", b"s")
    assert W[e + E_BLOCK] != grown and W[W[e + E_BLOCK] >> 2] & 0xFF == 6
    assert t.get("f", b"k")[0] == b"s" and p.index("f", b"k") == i
    p.check()


def test_clock_spares_a_referenced_entry_once_and_never_the_kept_one(made):
    p = made(max_entries=64)
    t, W = p.table, p.mem.W
    for key in (b"a", b"b", b"c", b"d"):
        t.set("f", key, key)  # entries 1..4, unmarked: an insert is not a use
    ia, ib, ic, id_ = (p.index("f", k) for k in (b"a", b"b", b"c", b"d"))
    assert [W[p.entry(i) + E_FLAGS] for i in (ia, ib, ic, id_)] == [F_USED] * 4
    assert t.get("f", b"b") == (b"b", 2) and W[p.entry(ib) + E_FLAGS] == F_USED | F_REF  # a read marks
    t.set("f", b"d", b"D")
    assert W[p.entry(id_) + E_FLAGS] == F_USED | F_REF  # and so does an update

    def evict(keep=0):
        p.j.acquire()
        try:
            return t.evict(keep)
        finally:
            p.j.release()

    assert evict() and t.get("f", b"a") is None  # the hand starts at the first entry
    assert evict() and t.get("f", b"c") is None  # b spared (its mark cleared), c goes
    assert W[p.entry(ib) + E_FLAGS] == F_USED
    assert evict(keep=ib) and t.get("f", b"d") is None  # d spared once, then taken on the next turn
    assert not evict(keep=ib) and t.get("f", b"b") == (b"b", 2)
    assert t.stats()["evictions"] == 3
    p.check()


def test_a_full_table_evicts_with_lru_and_refuses_with_none(made):
    lru = made()
    for n in range(40):
        lru.table.set("f", b"k%d" % n, b"x" * 900)  # 1 KiB blocks, 16 fit
    assert sum(lru.table.get("f", b"k%d" % n) is not None for n in range(40)) == 16
    assert lru.table.stats()["evictions"] == 24
    lru.check()
    none = made(eviction="none", max_entries=64, size=1 << 18)
    for n in range(64):
        none.table.set("f", b"%d" % n, b"v")
    with pytest.raises(StoreFull, match="64 entries, eviction=none"):
        none.table.set("f", b"one more", b"v")
    assert none.table.stats() == dict(entries=64, max_entries=64, evictions=0)
    none.check()


def test_remove_returns_the_entry_and_its_block(made):
    p = made()
    t = p.table
    t.set("f", b"k", b"v" * 300)
    free = p.arena.free_bytes()
    p.j.acquire()
    t.remove(p.index("f", b"k"))
    p.j.commit()
    p.j.release()
    assert t.get("f", b"k") is None and t.stats()["entries"] == 0
    assert p.arena.free_bytes() == free + 512
    p.check()


def test_forked_writers_with_cas_lose_no_update(made):
    p = made(size=1 << 20)
    t = p.table
    t.set("f", b"n", b"0")

    def add(times):
        for _ in range(times):
            while True:
                value, cas = t.get("f", b"n")
                if t.set("f", b"n", b"%d" % (int(value) + 1), cas):
                    break

    pids = [fork(add, 300) for _ in range(3)]
    assert all(exited_ok(pid, 15) for pid in pids)
    assert t.get("f", b"n")[0] == b"900"
    p.check()


@pytest.mark.parametrize("grow", [False, True])
def test_killed_at_any_write_of_a_set_the_table_is_consistent(made, grow):
    """A set into a full table evicts (each eviction commits), allocates, then links: any death is safe."""

    def fill() -> Parts:
        p = made()
        for n in range(16):
            p.table.set("f", b"k%d" % n, b"%d" % n * 300)  # 16 x 1 KiB: full
        return p

    new = (b"k3", b"g" * 900) if grow else (b"new", b"n" * 900)
    for point in range(1, 200):
        p = fill()
        before = {b"k%d" % n: p.table.get("f", b"k%d" % n) for n in range(16)}

        def child():
            w, commit = p.j.w, p.j.commit
            left = [point]

            def tick():
                left[0] -= 1
                if not left[0]:
                    os.kill(os.getpid(), signal.SIGKILL)

            p.j.w = lambda i, v: (tick(), w(i, v))
            p.j.wm = lambda *pairs: [p.j.w(pairs[t], pairs[t + 1]) for t in range(0, len(pairs), 2)]
            p.j.commit = lambda: (tick(), commit())
            p.table.set("f", *new)

        status = wait(fork(child))
        p.check()
        now = {k: p.table.get("f", k) for k in before}
        if not os.WIFSIGNALED(status):  # past the last write: the set is done
            assert p.table.get("f", new[0])[0] == new[1]
            break
        assert all(v is None or v == before[k] for k, v in now.items() if k != new[0]), point
        got = p.table.get("f", new[0])
        assert got == before.get(new[0]) or got[0] == new[1], point  # all or nothing (the grown key is kept)
    else:
        raise AssertionError("the set never completed")
