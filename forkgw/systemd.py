"""systemd integration without libsystemd: sd_notify datagrams and socket activation.

Both protocols are small and stable (sd_notify(3), sd_listen_fds(3)), so they are
spoken here directly: a datagram of `KEY=VALUE` lines to the unix socket named by
NOTIFY_SOCKET (a leading "@" means the abstract namespace), and listening
sockets handed over as fds 3.. when LISTEN_PID names this process.
"""

from __future__ import annotations

import os
import socket
import time

LISTEN_FDS_START = 3


class Notifier:
    """Sends state changes to the service manager; every call is a no-op outside systemd."""

    def __init__(self, environ=os.environ):
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        applies = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and applies else 0.0
        self.next_watchdog = 0.0

    def send(self, **fields) -> None:
        if self.sock is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self.sock.sendto(message, self.address)
        except OSError:
            pass  # the manager went away: nothing to tell

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6),
                  STATUS="reloading")

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping")

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def main_pid(self, pid: int) -> None:
        self.send(MAINPID=pid)

    def watchdog(self, now: float) -> float | None:
        """Pings the watchdog at half its interval; returns when to ping next."""
        if not self.watchdog_interval:
            return None
        if now >= self.next_watchdog:
            self.send(WATCHDOG=1)
            self.next_watchdog = now + self.watchdog_interval
        return self.next_watchdog


def listen_fds(environ=os.environ) -> dict[tuple[str, int], socket.socket]:
    """Sockets passed by socket activation, keyed by the address each is bound to.

    LISTEN_FDNAMES, where given, may name a socket `ADDR_PORT` (or `PORT`) to match a
    `listen` line whose address differs from the bound one (for example a wildcard bind).
    """
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    sockets: dict[tuple[str, int], socket.socket] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        sock.setblocking(False)
        sock.set_inheritable(True)
        key = parse_key(names[i]) if i < len(names) else None
        if key is None:
            bound = sock.getsockname()
            key = (bound[0], bound[1]) if isinstance(bound, tuple) else (str(bound), 0)
        sockets[key] = sock
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    return sockets


def parse_key(name: str) -> tuple[str, int] | None:
    """`8080`, `127.0.0.1_8080` (systemd forbids ":" in names) or `[::]:80` -> (addr, port)."""
    cut = max(name.rfind(":"), name.rfind("_"))
    addr, port = (name[:cut], name[cut + 1:]) if cut >= 0 else ("", name)
    if not port.isdigit():
        return None
    return (addr.strip("[]") or "0.0.0.0", int(port))
