"""One non-blocking connection in the loop: the base of the client, upstream and callout sides.

Theory of operation.  A connection owns a transport, the bytes queued for it
(`out`), its interest in the selector (`want`), and one deadline (the loop's
`Timed` protocol).  What its bytes mean is the subclass's business: the base
only moves them.  `receive()` gives what one read brought (None: nothing yet,
b"": the peer closed or failed); `send_out()` hands `out` to the kernel (an
OSError says the peer is gone).

The transport is anything that speaks the `Transport` protocol: a plain
socket does, and so does a TLS layer over one.  Nothing above this module
asks which it has.
"""

from __future__ import annotations

import selectors
from typing import Protocol

from forkgw.net.loop import Loop

READ_SIZE = 65536
EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE


class Transport(Protocol):
    """A non-blocking byte stream: a socket, or a TLS layer over one."""

    def recv(self, size: int) -> bytes: ...  # BlockingIOError: nothing yet
    def send(self, data) -> int: ...  # BlockingIOError: the kernel's buffer is full
    def shutdown(self, how: int) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int: ...


class Connection:
    __slots__ = ("loop", "sock", "out", "events", "closed", "deadline", "timer_at", "timer_queued")

    def __init__(self, loop: Loop, sock: Transport):
        self.loop = loop
        self.sock = sock
        self.out = bytearray()
        self.events = 0
        self.closed = False
        self.deadline: float | None = None
        self.timer_at = 0.0
        self.timer_queued = False

    def want(self, events: int) -> None:
        """Set the selector interest (0: none); registered on first use."""
        if self.closed or events == self.events:
            return
        selector = self.loop.selector
        if self.events == 0:
            selector.register(self.sock, events, self.on_event)
        elif events == 0:
            selector.unregister(self.sock)
        else:
            selector.modify(self.sock, events, self.on_event)
        self.events = events

    def on_event(self, mask: int) -> None:
        raise NotImplementedError

    def on_timeout(self) -> None:
        self.close()

    def set_deadline(self, seconds: float) -> None:
        self.loop.set_deadline(self, seconds)

    def receive(self) -> bytes | None:
        try:
            return self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def send_out(self) -> int:
        """Write what the kernel takes of `out`: how much it took. OSError: the peer is gone."""
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return 0
        del self.out[:sent]
        return sent

    def fail(self) -> None:
        """A bug met this connection: drop it (the loop serves on)."""
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.want(0)
        self.closed = True
        self.deadline = None
        try:
            self.sock.close()
        except OSError:
            pass
