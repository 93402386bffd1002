"""The lock and the undo journal, on their own: rollback order, the byte journal, dead holders.

Each test writes scratch words of the arena (nothing else runs on it) through
a Journal over a real shared mapping; crashes are real SIGKILLs of forked
children.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from forking import exited_ok, fork, wait

from forkgw.shm.errors import StoreError
from forkgw.shm.journal import Journal
from forkgw.shm.layout import H_BJLEN, H_JLEN, JOURNAL_MAX, Geometry, Memory


@pytest.fixture
def parts():
    g = Geometry(16 << 10, 16, 1000, "lru", None, 8, 8, 32, None, 2, None)
    mem = Memory(g)
    yield g, mem, Journal(mem, g)
    mem.close()


def scratch(g: Geometry, n: int) -> list[int]:
    return [(g.arena_at >> 2) + 8 * k for k in range(n)]


def test_recover_undoes_in_reverse_order(parts):
    g, mem, j = parts
    a, b, c = scratch(g, 3)
    mem.W[a], mem.W[b], mem.W[c] = 1, 2, 3
    j.acquire()
    j.w(a, 10)
    j.wm(b, 20, a, 11, c, 30)  # a written twice: rollback must restore 1, not 10
    assert j.pending() and (mem.W[a], mem.W[b], mem.W[c]) == (11, 20, 30)
    j.recover()
    assert not j.pending() and (mem.W[a], mem.W[b], mem.W[c]) == (1, 2, 3)
    j.release()


def test_commit_keeps_the_writes(parts):
    g, mem, j = parts
    a, p = scratch(g, 1)[0], g.arena_at + 64
    mem.mm[p:p + 4] = b"old!"
    j.acquire()
    j.w(a, 5)
    j.overwrite(p, b"new!")
    j.commit()
    assert not j.pending() and mem.W[H_BJLEN] == 0
    j.release()
    j.acquire()  # nothing to recover: the next holder changes nothing
    assert mem.W[a] == 5 and mem.mm[p:p + 4] == b"new!"
    j.check()
    j.release()


def test_release_without_commit_rolls_back(parts):
    """An operation that raises between writes leaves nothing behind."""
    g, mem, j = parts
    a, p = scratch(g, 1)[0], g.arena_at + 64
    mem.mm[p:p + 5] = b"kept."
    with pytest.raises(RuntimeError):
        j.acquire()
        try:
            j.w(a, 99)
            j.overwrite(p, b"lost!")
            raise RuntimeError("half done")
        finally:
            j.release()
    assert mem.W[a] == 0 and mem.mm[p:p + 5] == b"kept."
    assert mem.W[H_JLEN] == 0 and mem.W[H_BJLEN] == 0


def test_the_byte_journal_counts_only_after_a_journaled_write(parts):
    """With the journal empty the operation is committed: saved bytes are ignored, not copied back."""
    g, mem, j = parts
    p = g.arena_at + 64
    mem.mm[p:p + 3] = b"abc"
    j.acquire()
    j.overwrite(p, b"xyz")
    j.release()
    assert mem.mm[p:p + 3] == b"xyz" and mem.W[H_BJLEN] == 0


def test_overflow_writes_nothing(parts):
    g, mem, j = parts
    a, b = scratch(g, 2)
    j.acquire()
    with pytest.raises(StoreError, match="overflow"):
        j.wm(*[a, 1] * (JOURNAL_MAX + 1))
    assert mem.W[a] == 0 and mem.W[H_JLEN] == 0
    j.wm(*[a, 1] * (JOURNAL_MAX - 1))
    j.w(b, 2)
    with pytest.raises(StoreError, match="overflow"):
        j.w(b, 3)
    assert mem.W[b] == 2 and mem.W[H_JLEN] == JOURNAL_MAX
    j.release()
    assert mem.W[a] == 0 and mem.W[b] == 0


def test_a_dead_holder_blocks_nobody_and_its_writes_are_undone(parts):
    g, mem, j = parts
    a, p = scratch(g, 1)[0], g.arena_at + 64
    mem.mm[p:p + 6] = b"before"
    r, w = os.pipe()

    def holder():
        j.acquire()
        j.w(a, 42)
        j.overwrite(p, b"during")
        os.write(w, b"!")
        time.sleep(60)

    def waiter():
        j.acquire()  # blocks until the holder dies, then rolls it back
        assert mem.W[a] == 0 and mem.mm[p:p + 6] == b"before"
        j.release()

    pid = fork(holder)
    assert os.read(r, 1) == b"!"
    assert mem.W[a] == 42 and mem.mm[p:p + 6] == b"during"  # visible, not committed
    waiting = fork(waiter)
    time.sleep(0.2)
    assert os.waitpid(waiting, os.WNOHANG) == (0, 0)
    os.kill(pid, signal.SIGKILL)
    wait(pid)
    assert exited_ok(waiting, 5)
    assert mem.W[a] == 0 and mem.mm[p:p + 6] == b"before" and mem.W[H_JLEN] == 0
    os.close(r)
    os.close(w)


def test_killed_before_any_step_means_before_and_after_commit_means_after(parts):
    g, mem, j = parts
    a, b, c = scratch(g, 3)
    p = g.arena_at + 512
    mem.mm[p:p + 4] = b"was."
    steps = [lambda: j.w(a, 1), lambda: j.wm(b, 2, c, 3), lambda: j.overwrite(p, b"now."), j.commit]

    def state():
        j.acquire()
        try:
            return mem.W[a], mem.W[b], mem.W[c], bytes(mem.mm[p:p + 4])
        finally:
            j.release()

    before, after = (0, 0, 0, b"was."), (1, 2, 3, b"now.")
    for point in range(len(steps) + 1):
        def child():
            j.acquire()
            for n, step in enumerate(steps):
                if n == point:
                    os.kill(os.getpid(), signal.SIGKILL)
                step()
            os.kill(os.getpid(), signal.SIGKILL)  # committed, but still holding the lock

        status = wait(fork(child))
        assert os.WIFSIGNALED(status)
        assert state() == (after if point == len(steps) else before), point
        if point == len(steps):  # back to before, for the next point
            j.acquire()
            j.wm(a, 0, b, 0, c, 0)
            j.commit()
            mem.mm[p:p + 4] = b"was."
            j.release()
