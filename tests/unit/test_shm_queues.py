"""Shared queues on their own: ids, FIFO order, the byte cap, wake-ups across processes, crashes.

The queues run over a real shared mapping with a journal and an allocator
that never evicts; queue names are encoded by a function of the test's own, as
any (namespace, name) encoding will do.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket

import pytest
from forking import exited_ok, fork, wait

from forkgw.shm.alloc import Allocator
from forkgw.shm.errors import Empty, NotFound, StoreFull, TooLarge
from forkgw.shm.journal import Journal
from forkgw.shm.layout import Geometry, Memory
from forkgw.shm.queues import Queues
from shm_parts import made_fixture


def key(ns, name: bytes) -> bytes:
    return ns.encode() + b"\0" + name


class Parts:
    def __init__(self, max_queues=8, queue_bytes=None):
        self.g = Geometry(16 << 10, 16, 1000, "none", None, max_queues, 8, 32, None, 2, queue_bytes)
        self.mem = Memory(self.g)
        self.j = Journal(self.mem, self.g)
        self.arena = Allocator(self.mem, self.j, self.g)
        self.arena.format()
        self.queues = Queues(self.mem, self.j, self.arena, self.g, key, self.mem.token)

    def close(self) -> None:
        self.queues.unbind()
        self.mem.close()

    def check(self) -> None:
        self.j.acquire()
        try:
            blocks = self.arena.check()
            assert sorted(self.queues.check()) == sorted(self.arena.used(blocks))
        finally:
            self.j.release()

    def items(self, qid: int) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.queues.dequeue(qid))
            except Empty:
                return out


made = made_fixture(Parts)


def readable(sock: socket.socket, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(timeout))


def test_ids_are_per_name_and_never_reused(made):
    q = made(max_queues=2).queues
    me = os.getpid()
    a = q.register("vm", b"jobs", me)
    assert q.register("vm", b"jobs", me) == a == 1
    b = q.register("other", b"jobs", me)
    assert b == 2 and q.resolve("other", b"jobs") == b
    with pytest.raises(NotFound):
        q.resolve("vm", b"nope")
    with pytest.raises(StoreFull, match="2 queues"):
        q.register("vm", b"third", me)
    for bad in (0, 3):
        with pytest.raises(NotFound):
            q.size(bad)


def test_items_come_out_in_order(made):
    p = made()
    q = p.queues
    qid = q.register("vm", b"jobs", os.getpid())
    with pytest.raises(Empty):
        q.dequeue(qid)
    for n in range(10):
        q.enqueue(qid, b"item%d" % n * n)
    assert q.size(qid) == 10 and q.stats()["queue_bytes"] == 10 * 64  # up to 48 bytes: 64-byte blocks
    p.check()
    assert p.items(qid) == [b"item%d" % n * n for n in range(10)]
    assert q.size(qid) == 0 and q.stats()["queue_bytes"] == 0
    with pytest.raises(TooLarge):
        q.enqueue(qid, b"x" * 1001)
    p.check()


def test_queue_items_may_take_only_their_share_of_the_arena(made):
    p = made(queue_bytes=1024)
    q = p.queues
    qid = q.register("vm", b"jobs", os.getpid())
    for _ in range(8):
        q.enqueue(qid, b"x" * 100)  # 128-byte blocks
    assert q.stats() == dict(queues=1, queue_bytes=1024, max_queue_bytes=1024)
    with pytest.raises(StoreFull, match="1024 bytes"):
        q.enqueue(qid, b"y")
    q.dequeue(qid)
    q.enqueue(qid, b"y")  # room again
    assert q.size(qid) == 8
    p.check()


def test_an_enqueue_elsewhere_sends_the_owner_one_wake_up(made):
    p = made()
    q = p.queues
    me = os.getpid()
    wake = q.bind(me)
    assert q.bind(me) is wake
    qid = q.register("consumer", b"jobs", me)
    assert q.ready(me) == [] and not readable(wake, 0)

    def producer():
        q.unbind()  # a child must not read its parent's wake-ups
        sent = []
        notify = q.notify
        q.notify = lambda pid: (sent.append(pid), notify(pid))
        other = q.resolve("consumer", b"jobs")
        for n in range(3):
            q.enqueue(other, b"job%d" % n)
        assert sent == [me]

    assert exited_ok(fork(producer))
    assert readable(wake, 2)
    assert q.ready(me) == [qid] and q.ready(me) == []
    assert not readable(wake, 0)  # ready() drained the one datagram
    assert p.items(qid) == [b"job0", b"job1", b"job2"]


def test_ready_takes_only_this_owners_flags(made):
    q = made().queues
    me = os.getpid()
    mine = q.register("a", b"q", me)
    theirs = q.register("b", b"q", 999999999)  # nobody listens there: the wake-up is dropped quietly
    q.enqueue(mine, b"1")
    q.enqueue(theirs, b"2")
    assert q.ready(me) == [mine]
    assert q.ready(999999999) == [theirs]


def test_a_new_owner_gets_the_wake_up_its_predecessor_never_read(made):
    q = made().queues
    me = os.getpid()
    qid = q.register("vm", b"jobs", 999999999)
    q.enqueue(qid, b"waiting")
    wake = q.bind(me)
    assert not readable(wake, 0.05)
    assert q.register("vm", b"jobs", me) == qid
    assert readable(wake, 2) and q.ready(me) == [qid]
    q.unbind()
    assert q.wake is None
    q.notify(me)  # to a socket that is gone: no error


@pytest.mark.parametrize("op", ["enqueue", "dequeue", "register"])
def test_killed_at_any_write_the_queue_is_as_before_or_after(made, op):
    def prepared() -> tuple[Parts, int]:
        p = made()
        qid = p.queues.register("vm", b"jobs", os.getpid())
        p.queues.enqueue(qid, b"first")
        p.queues.enqueue(qid, b"second")
        return p, qid

    run = {"enqueue": lambda q, qid: q.enqueue(qid, b"third"), "dequeue": lambda q, qid: q.dequeue(qid),
           "register": lambda q, qid: q.register("vm", b"other", 4242)}[op]

    def state(p, qid):
        p.j.acquire()
        try:
            W, at = p.mem.W, p.queues.qw
            return p.queues.stats(), bytes(W[at:at + 16].tobytes())
        finally:
            p.j.release()

    p, qid = prepared()
    before = state(p, qid)
    run(p.queues, qid)
    after = state(p, qid)
    for point in range(1, 30):
        p, qid = prepared()

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
            run(p.queues, qid)

        status = wait(fork(child))
        p.check()
        assert state(p, qid) in (before, after), point
        if not os.WIFSIGNALED(status):
            assert state(p, qid) == after
            break
    else:
        raise AssertionError("the operation never completed")
