"""Signals as events: a handler only records the signal and wakes the loop.

Python runs a signal handler between two bytecodes of whatever the main
thread is doing, so a handler that acted (closed a listener, reopened a log)
would act in the middle of an accept loop or a write.  Here the handler
appends the signal number to `pending`, `signal.set_wakeup_fd` makes the
loop's select return, and the loop takes `pending` at a safe point, after
the handlers of its turn.
"""

from __future__ import annotations

import signal
import socket


class SignalInbox:
    def __init__(self, signals):
        self.pending: list[int] = []
        self.wake, self._wake_w = socket.socketpair()
        self.wake.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.pending.append(signum)

    def on_wake(self, mask: int) -> None:
        """The wake socket is readable: empty it (the signals are in `pending` already)."""
        try:
            while self.wake.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def take(self) -> list[int]:
        taken, self.pending = self.pending, []
        return taken

    def close(self, signals) -> None:
        """In a forked child: the signals go back to their defaults, the wake socket is closed."""
        signal.set_wakeup_fd(-1)
        for sig in signals:
            signal.signal(sig, signal.SIG_DFL)
        self.wake.close()
        self._wake_w.close()
