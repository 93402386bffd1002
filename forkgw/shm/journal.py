"""The store's one lock, and the undo journal that makes a dead holder harmless.

Theory of operation:
- One lock: a POSIX record lock (lockf) on the memfd.  The kernel drops it when
  the holder dies, so a SIGKILLed worker never leaves the store locked.  Such
  locks belong to a process, not a thread: threads of one process are not
  excluded from each other, so only one thread per process may use the store,
  and never from a signal handler.
- Crash consistency: every change of a structure under the lock is a u32 word
  written through `w`, which first appends (word, old value) to an undo
  journal; committing empties it, and whoever takes the lock next and finds it
  non-empty rolls the dead holder's half-done operation back.  Bytes go only
  into blocks the same operation allocated (forgotten on rollback), or are
  overwritten in place after being copied to a one-slot byte journal.  A
  worker killed at any point leaves the store as before its operation.

Every part writes its structures through one `Journal`, so one object holds
the whole write path: wrapping its `w`, `wm`, `overwrite` and `commit` sees
every point at which a holder can die.
"""

from __future__ import annotations

import fcntl

from .errors import StoreError
from .layout import H_BJLEN, H_BJOFF, H_JLEN, JOURNAL_MAX, Geometry, Memory


class Journal:
    """The lock over the whole store and the undo log of the operation holding it."""

    def __init__(self, mem: Memory, g: Geometry):
        self.fd, self.W, self.mm = mem.fd, mem.W, mem.mm
        self.jw = g.journal_at >> 2
        self.bj = g.bytejournal_at

    def acquire(self) -> None:
        """Take the lock; a non-empty journal means the last holder died mid-operation."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        W = self.W
        if W[H_JLEN] or W[H_BJLEN]:
            self.recover()

    def release(self) -> None:
        W = self.W
        if W[H_JLEN] or W[H_BJLEN]:
            self.recover()  # an exception before commit: undo
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def unlock(self) -> None:
        """Release after an operation that wrote nothing (at most hints): no journal to look at."""
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def pending(self) -> bool:
        """True once the current operation made a journaled write (it is no longer free to commit early)."""
        return bool(self.W[H_JLEN])

    def commit(self) -> None:
        W = self.W
        W[H_JLEN] = 0  # the commit point
        W[H_BJLEN] = 0

    def recover(self) -> None:
        """Undo the uncommitted operation of a holder that died (or raised)."""
        W, mm = self.W, self.mm
        n = W[H_JLEN]
        if n:  # BJLEN is only ever set after a journaled write, so JLEN == 0 means committed
            size = W[H_BJLEN]
            if size:
                at, src = W[H_BJOFF], self.bj
                mm[at:at + size] = mm[src:src + size]
            j = self.jw
            for r in range(n - 1, -1, -1):
                W[W[j + 2 * r]] = W[j + 2 * r + 1]
        W[H_BJLEN] = 0
        W[H_JLEN] = 0

    def w(self, i: int, v: int) -> None:
        """Write word i under the journal."""
        W = self.W
        n = W[H_JLEN]
        if n >= JOURNAL_MAX:
            raise StoreError("journal overflow")
        j = self.jw + 2 * n
        W[j] = i
        W[j + 1] = W[i]
        W[H_JLEN] = n + 1
        W[i] = v

    def wm(self, *pairs: int) -> None:
        """Write several words under the journal: (index, value, index, value, ...)."""
        W = self.W
        n = W[H_JLEN]
        count = len(pairs) >> 1
        if n + count > JOURNAL_MAX:
            raise StoreError("journal overflow")
        j = self.jw + 2 * n
        for t in range(0, 2 * count, 2):
            i = pairs[t]
            W[j] = i
            W[j + 1] = W[i]
            j += 2
        W[H_JLEN] = n + count
        for t in range(0, 2 * count, 2):
            W[pairs[t]] = pairs[t + 1]

    def overwrite(self, p: int, data: bytes) -> None:
        """Write data over live bytes, keeping the old ones for recover.

        Only after a journaled write: with the journal empty the operation
        counts as committed and the saved bytes are ignored.
        """
        mm, W, n = self.mm, self.W, len(data)
        bj = self.bj
        mm[bj:bj + n] = mm[p:p + n]
        W[H_BJOFF] = p
        W[H_BJLEN] = n
        mm[p:p + n] = data

    def check(self) -> None:
        """Assert nothing is left uncommitted (tests; under the lock)."""
        assert self.W[H_JLEN] == 0 and self.W[H_BJLEN] == 0
