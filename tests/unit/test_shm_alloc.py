"""The buddy allocator on its own: splitting, lazy merging, reclaiming, and dying mid-split.

The arena here is 8 blocks of 2 KiB (orders 6 to 11); the allocator runs over
a real shared mapping with its own journal, and `reclaim` is a test function
instead of the table's eviction.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
from forking import fork, wait

from forkgw.shm.alloc import Allocator
from forkgw.shm.errors import StoreError, StoreFull
from forkgw.shm.journal import Journal
from forkgw.shm.layout import H_FREE, MIN_ORDER, USED_TAG, Geometry, Memory

TOP = 11
ARENA = 8 << TOP


@pytest.fixture
def parts():
    g = Geometry(16 << 10, 16, 1000, "lru", None, 8, 8, 32, None, 2, None)
    mem = Memory(g)
    j = Journal(mem, g)
    arena = Allocator(mem, j, g)
    arena.format()
    assert g.top == TOP and g.ntop << g.top == ARENA
    yield g, mem, j, arena
    mem.close()


def locked(j: Journal, fn, *args):
    j.acquire()
    try:
        result = fn(*args)
        j.commit()
        return result
    finally:
        j.release()


def free_list(mem: Memory, k: int) -> list[int]:
    out, b = [], mem.W[H_FREE + k]
    while b:
        out.append(b)
        b = mem.W[(b >> 2) + 1]
    return out


def test_a_new_arena_is_all_free_in_top_blocks(parts):
    g, mem, j, arena = parts
    assert free_list(mem, TOP) == [g.arena_at + t * (1 << TOP) for t in range(8)]
    assert all(not free_list(mem, k) for k in range(MIN_ORDER, TOP))
    assert arena.stats() == dict(arena_bytes=ARENA, free_bytes=ARENA)
    assert arena.used(arena.check()) == []


def test_order_is_the_smallest_block_with_room_for_the_header():
    assert [Allocator.order(n) for n in (0, 48, 49, 112, 113, 2032, 2033)] == [6, 6, 7, 7, 8, 11, 12]


def test_take_splits_a_bigger_block_and_free_does_not_merge(parts):
    g, mem, j, arena = parts
    b = locked(j, arena.take, MIN_ORDER)
    assert b == g.arena_at and mem.W[b >> 2] == USED_TAG | MIN_ORDER
    for k in range(MIN_ORDER, TOP):  # one buddy left over at each order on the way down
        assert free_list(mem, k) == [b + (1 << k)]
    assert arena.free_bytes() == ARENA - 64
    locked(j, arena.free, b)
    assert arena.free_bytes() == ARENA and len(free_list(mem, MIN_ORDER)) == 2  # merging waits
    arena.check()
    assert locked(j, arena.coalesce) is True
    assert len(free_list(mem, TOP)) == 8 and all(not free_list(mem, k) for k in range(MIN_ORDER, TOP))
    assert locked(j, arena.coalesce) is False
    arena.check()


def test_a_full_arena_asks_reclaim_then_gives_up(parts):
    g, mem, j, arena = parts
    held = [locked(j, arena.alloc, 1000) for _ in range(8)]  # 1000 bytes: one 1 KiB block each...
    held += [locked(j, arena.alloc, 1000) for _ in range(8)]  # ...two per top block
    assert arena.free_bytes() == 0
    with pytest.raises(StoreFull, match="16384 bytes, eviction=lru"):
        locked(j, arena.alloc, 10)  # the default reclaim frees nothing
    asked = []

    def reclaim(keep):
        asked.append(keep)
        if not held:
            return False
        arena.free(held.pop())
        j.commit()  # reclaim commits on its own, as the table's eviction does
        return True

    arena.reclaim = reclaim
    j.acquire()
    b = arena.alloc(2000, keep=7)  # a whole top block: reclaims one, merges nothing, reclaims another
    j.commit()
    j.release()
    assert asked == [7, 7] and mem.W[b >> 2] == USED_TAG | TOP
    arena.check()


def test_fragments_merge_when_an_allocation_needs_them(parts):
    g, mem, j, arena = parts
    small = []
    while True:
        b = locked(j, arena.take, MIN_ORDER)
        if not b:
            break
        small.append(b)
    assert len(small) == ARENA // 64 and arena.free_bytes() == 0
    for b in small:
        locked(j, arena.free, b)
    assert free_list(mem, TOP) == []
    b = locked(j, arena.alloc, 2000)
    assert mem.W[b >> 2] == USED_TAG | TOP and arena.free_bytes() == ARENA - (1 << TOP)
    arena.check()


def test_alloc_must_come_before_the_first_journaled_write(parts):
    g, mem, j, arena = parts
    j.acquire()
    j.w(g.slots_at >> 2, 1)
    with pytest.raises(StoreError, match="after a journaled write"):
        arena.alloc(10)
    j.release()


def test_random_takes_and_frees_keep_a_tiling(parts):
    g, mem, j, arena = parts
    rng = random.Random(3)
    used: dict[int, int] = {}
    for step in range(2000):
        if used and rng.random() < 0.45:
            b = rng.choice(list(used))
            locked(j, arena.free, b)
            del used[b]
        else:
            k = rng.choice((6, 6, 7, 8, 9, 11))
            try:
                b = locked(j, arena.alloc, (1 << k) - 16)
            except StoreFull:
                continue
            assert b not in used and mem.W[b >> 2] == USED_TAG | k
            used[b] = k
        if step % 50 == 0:
            blocks = arena.check()
            assert sorted(arena.used(blocks)) == sorted(used)
            assert arena.free_bytes() == ARENA - sum(1 << k for k in used.values())


def test_killed_at_any_write_of_a_split_a_free_or_a_merge_no_block_is_lost(parts):
    """Take, free and coalesce commit separately: a death rolls back only the step it interrupted."""
    g, mem, j, arena = parts
    w, wm = j.w, j.wm
    writes = [0]

    def count_w(i, v):
        writes[0] += 1
        w(i, v)

    def count_wm(*pairs):
        writes[0] += len(pairs) // 2
        wm(*pairs)

    j.w, j.wm = count_w, count_wm
    b = locked(j, arena.take, MIN_ORDER)  # splits a top block all the way down
    locked(j, arena.free, b)
    locked(j, arena.coalesce)
    j.w, j.wm = w, wm
    points = writes[0]
    assert points > 10
    for point in range(1, points + 1):
        def child():
            left = [point]

            def dying(i, v):
                left[0] -= 1
                if not left[0]:
                    os.kill(os.getpid(), signal.SIGKILL)
                w(i, v)

            j.w = dying
            j.wm = lambda *pairs: [dying(pairs[t], pairs[t + 1]) for t in range(0, len(pairs), 2)]
            locked(j, arena.take, MIN_ORDER)
            locked(j, arena.free, b)
            locked(j, arena.coalesce)

        status = wait(fork(child))
        assert os.WIFSIGNALED(status), point
        j.acquire()  # rolls the dead child's step back
        j.release()
        blocks = arena.check()
        assert arena.used(blocks) in ([], [g.arena_at])
        if arena.used(blocks):  # died after the take committed: the block is still taken, and whole
            locked(j, arena.free, g.arena_at)
        locked(j, arena.coalesce)
        assert arena.free_bytes() == ARENA and len(free_list(mem, TOP)) == 8

