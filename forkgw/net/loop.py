"""The event loop of one worker: a selector, a timer heap, the clock.

Theory of operation.  Handlers are callables stored as selector data; a turn
is: select until the next timer -> run the handlers of ready sockets -> expire
due timers.  A handler that raises is reported to `on_failure` with the
handler, and the loop goes on: a bug costs one connection, not the worker.

Timers are a heap with lazy deletion.  An object that wants a timer follows
the `Timed` protocol: it keeps one `deadline` (None: no timer), and the heap
entry it was queued under (`timer_at`, `timer_queued`).  Moving a deadline
later costs nothing (the old entry is skipped, then requeued, when it comes
up); clearing it is `obj.deadline = None`.  No entry is ever searched for.
Dead entries would keep their objects (a closed connection and its buffers)
alive until their time came, so memory would follow connection rate times
timeout: when the heap has doubled since it was last compacted, the entries
of cleared deadlines are dropped in one pass (amortized O(1) per timer).

`now` is the monotonic time read once per turn, before handlers run: what a
handler measures against it is at most one turn stale, and it saves a system
call per use.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import time
from typing import Callable, Protocol


class Timed(Protocol):
    """What the loop needs of an object with a deadline."""

    deadline: float | None  # when on_timeout is due; None: no timer
    timer_at: float  # the heap entry it is queued under
    timer_queued: bool

    def on_timeout(self) -> None: ...


COMPACT_MIN = 1024  # heap entries below which dead ones are left to expire


class Loop:
    __slots__ = ("selector", "timers", "seq", "now", "on_failure", "compact_at")

    def __init__(self, on_failure: Callable[[object], None]):
        self.selector = selectors.DefaultSelector()
        self.timers: list = []
        self.compact_at = COMPACT_MIN
        self.seq = itertools.count()
        self.now = time.monotonic()
        self.on_failure = on_failure

    def set_deadline(self, obj: Timed, seconds: float) -> None:
        deadline = self.now + seconds
        obj.deadline = deadline
        if not obj.timer_queued or deadline < obj.timer_at:
            self._queue(obj, deadline)

    def _queue(self, obj: Timed, deadline: float) -> None:
        obj.timer_at = deadline
        obj.timer_queued = True
        heapq.heappush(self.timers, (deadline, next(self.seq), obj))
        if len(self.timers) >= self.compact_at:
            self._compact()

    def _compact(self) -> None:
        """Drop the entries whose object no longer waits for them (moved or cleared deadlines)."""
        live = []
        for entry in self.timers:
            obj = entry[2]
            if obj.timer_at != entry[0]:
                continue  # a later entry of the same object stands for it
            if obj.deadline is None:
                obj.timer_queued = False
                continue
            live.append(entry)
        heapq.heapify(live)
        self.timers = live
        self.compact_at = max(COMPACT_MIN, 2 * len(live))

    def next_timer(self) -> float | None:
        return self.timers[0][0] if self.timers else None

    def turn(self, timeout: float) -> float:
        """One turn: wait at most `timeout` seconds, run handlers and due timers; the new `now`."""
        events = self.selector.select(max(timeout, 0))
        self.now = now = time.monotonic()
        for key, mask in events:
            try:
                key.data(mask)
            except Exception:
                self.on_failure(key.data)
        while self.timers and self.timers[0][0] <= now:  # (a timeout may queue, and so compact)
            deadline, _, obj = heapq.heappop(self.timers)
            if obj.timer_at != deadline:
                continue
            obj.timer_queued = False
            if obj.deadline is None:
                continue
            if obj.deadline > now:
                self._queue(obj, obj.deadline)
            else:
                obj.deadline = None
                try:
                    obj.on_timeout()
                except Exception:
                    self.on_failure(obj.on_timeout)
        return now
