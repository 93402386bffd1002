"""Shared queues: ids valid in every process, and a wake-up for the owner instead of polling.

Theory of operation:
- Queues: (namespace, name) -> id, ids valid in every process.  A queue keeps
  its owner's pid and a "notify pending" flag: an enqueue that raises the flag
  sends one datagram to the owner's wake socket (abstract unix namespace,
  named after the store and the pid, so nothing is inherited across fork);
  `ready()` drains it and takes the flags.  No polling.
- Queue items are never evicted (with lru, entries are evicted to make room
  for them) and may take at most `queue_bytes` of the arena (default: half),
  so a queue nobody consumes cannot push all shared data out: past that,
  enqueue raises StoreFull.

A queue is eight words in a fixed table (id = index + 1, never reused); its
name is kept in an arena block and its items form a singly linked list of
arena blocks, each block's second word pointing at the next item and its third
holding the item's length.  Datagrams are sent after the lock is let go.
"""

from __future__ import annotations

import socket
from typing import Callable

from .alloc import Allocator
from .errors import Empty, NotFound, StoreFull, TooLarge
from .journal import Journal
from .layout import (BLOCK_HDR, H_NQUEUES, H_QBYTES, Q_COUNT, Q_HEAD, Q_NAME, Q_NAMELEN, Q_OWNER, Q_PENDING,
                     Q_TAIL, Q_USED, Geometry, Memory)


class Queues:
    """The queue table, the items, and this process's wake socket.

    key: (namespace, name) -> stored name, the table's encoding; token: the
    store's, naming the wake sockets of every process that uses it.
    """

    def __init__(self, mem: Memory, journal: Journal, arena: Allocator, g: Geometry,
                 key: Callable[[object, bytes], bytes], token: str):
        self.W, self.mm, self.journal, self.arena, self.g = mem.W, mem.mm, journal, arena, g
        self.key, self.token = key, token
        self.qw = g.queues_at >> 2
        self.wake: socket.socket | None = None
        self._tx: socket.socket | None = None
        self._ids: dict[bytes, int] = {}

    def _find(self, ck: bytes) -> int:
        W, mm = self.W, self.mm
        for qid in range(1, W[H_NQUEUES] + 1):
            q = self.qw + 8 * (qid - 1)
            if W[q + Q_NAMELEN] == len(ck):
                p = W[q + Q_NAME] + BLOCK_HDR
                if mm[p:p + len(ck)] == ck:
                    return qid
        return 0

    def register(self, ns, name: bytes, pid: int) -> int:
        """Create or open queue (ns, name) and make pid its owner; pending items follow the ownership."""
        ck = self.key(ns, name)
        W, j = self.W, self.journal
        notify = False
        j.acquire()
        try:
            qid = self._find(ck)
            if not qid:
                if W[H_NQUEUES] >= self.g.max_queues:
                    raise StoreFull(f"shared queue table full ({self.g.max_queues} queues)")
                blk = self.arena.alloc(len(ck))
                self.mm[blk + BLOCK_HDR:blk + BLOCK_HDR + len(ck)] = ck
                qid = W[H_NQUEUES] + 1
                q = self.qw + 8 * (qid - 1)
                for word, value in ((Q_USED, 1), (Q_OWNER, pid), (Q_PENDING, 0), (Q_HEAD, 0), (Q_TAIL, 0),
                                    (Q_COUNT, 0), (Q_NAME, blk), (Q_NAMELEN, len(ck))):
                    j.w(q + word, value)
                j.w(H_NQUEUES, qid)
            else:
                q = self.qw + 8 * (qid - 1)
                notify = bool(W[q + Q_PENDING]) and W[q + Q_OWNER] != pid
                j.w(q + Q_OWNER, pid)
            j.commit()
        finally:
            j.release()
        self._ids[ck] = qid
        if notify:
            self.notify(pid)
        return qid

    def resolve(self, ns, name: bytes) -> int:
        """The id of queue (ns, name); NotFound if nobody registered it."""
        ck = self.key(ns, name)
        qid = self._ids.get(ck)
        if qid:
            return qid
        self.journal.acquire()
        try:
            qid = self._find(ck)
        finally:
            self.journal.release()
        if not qid:
            raise NotFound("no such queue")
        self._ids[ck] = qid
        return qid

    def _queue(self, qid: int) -> int:
        if not 1 <= qid <= self.W[H_NQUEUES]:
            raise NotFound("no such queue")
        return self.qw + 8 * (qid - 1)

    def enqueue(self, qid: int, data: bytes) -> None:
        """Append data; the owner's wake socket gets a datagram if it had nothing pending."""
        if len(data) > self.g.max_value:
            raise TooLarge(f"queue item over {self.g.max_value} bytes")
        W, j = self.W, self.journal
        need = 1 << self.arena.order(len(data))
        j.acquire()
        try:
            q = self._queue(qid)
            if W[H_QBYTES] + need > self.g.queue_bytes:
                raise StoreFull(f"shared queues full ({self.g.queue_bytes} bytes)")
            blk = self.arena.alloc(len(data))
            self.mm[blk + BLOCK_HDR:blk + BLOCK_HDR + len(data)] = data
            w = blk >> 2
            tail = W[q + Q_TAIL]
            owner = W[q + Q_OWNER]
            notify = not W[q + Q_PENDING]
            j.wm(w + 1, 0, w + 2, len(data), ((tail >> 2) + 1) if tail else q + Q_HEAD, blk,
                 q + Q_TAIL, blk, q + Q_COUNT, W[q + Q_COUNT] + 1, q + Q_PENDING, 1,
                 H_QBYTES, W[H_QBYTES] + need)
            j.commit()
        finally:
            j.release()
        if notify and owner:
            self.notify(owner)

    def dequeue(self, qid: int) -> bytes:
        """Pop the oldest item; Empty if none, NotFound if no such queue."""
        W, j = self.W, self.journal
        j.acquire()
        try:
            q = self._queue(qid)
            head = W[q + Q_HEAD]
            if not head:
                raise Empty("queue is empty")
            w = head >> 2
            data = self.mm[head + BLOCK_HDR:head + BLOCK_HDR + W[w + 2]]
            nxt = W[w + 1]
            qbytes = W[H_QBYTES] - (1 << (W[w] & 0xFF))
            if nxt:
                j.wm(q + Q_HEAD, nxt, q + Q_COUNT, W[q + Q_COUNT] - 1, H_QBYTES, qbytes)
            else:
                j.wm(q + Q_HEAD, 0, q + Q_TAIL, 0, q + Q_COUNT, W[q + Q_COUNT] - 1, H_QBYTES, qbytes)
            self.arena.free(head)
            j.commit()
            return data
        finally:
            j.release()

    def size(self, qid: int) -> int:
        return self.W[self._queue(qid) + Q_COUNT]

    def ready(self, pid: int) -> list[int]:
        """Ids of pid's queues that got items since the last call; drains the wake socket first."""
        sock = self.wake
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
        W, j, ready = self.W, self.journal, []
        j.acquire()
        try:
            for qid in range(1, W[H_NQUEUES] + 1):
                q = self.qw + 8 * (qid - 1)
                if W[q + Q_PENDING] and W[q + Q_OWNER] == pid:
                    j.w(q + Q_PENDING, 0)
                    ready.append(qid)
            j.commit()
        finally:
            j.release()
        return ready

    # -- wake sockets -----------------------------------------------------------------------

    def wake_name(self, pid: int) -> bytes:
        return f"\0forkgw-{self.token}-{pid}".encode()

    def notify(self, pid: int) -> None:
        """One datagram to pid's wake socket; never blocks, never fails."""
        tx = self._tx
        if tx is None:
            tx = self._tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            tx.setblocking(False)
        try:
            tx.sendto(b"!", self.wake_name(pid))
        except OSError:
            pass  # owner gone (its successor re-registers) or its buffer full (it has wake-ups to read)

    def bind(self, pid: int) -> socket.socket:
        """This process's wake socket, bound under pid's name (once per process)."""
        if self.wake is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind(self.wake_name(pid))
            self.wake = sock
        return self.wake

    def unbind(self) -> None:
        """Close the wake socket (a new child must not read its parent's wake-ups)."""
        if self.wake is not None:
            self.wake.close()
            self.wake = None

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> dict:
        W = self.W
        return dict(queues=W[H_NQUEUES], queue_bytes=W[H_QBYTES], max_queue_bytes=self.g.queue_bytes)

    def check(self) -> list[int]:
        """Assert each queue's count, tail and the byte total; returns the blocks queues use (tests; locked)."""
        W, used, qbytes = self.W, [], 0
        for qid in range(1, W[H_NQUEUES] + 1):
            q = self.qw + 8 * (qid - 1)
            used.append(W[q + Q_NAME])
            b, count, last = W[q + Q_HEAD], 0, 0
            while b:
                used.append(b)
                qbytes += 1 << (W[b >> 2] & 0xFF)
                count += 1
                last, b = b, W[(b >> 2) + 1]
            assert count == W[q + Q_COUNT] and last == W[q + Q_TAIL]
        assert qbytes == W[H_QBYTES]
        return used
