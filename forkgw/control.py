"""The control socket: `forkgw -s reload` asks the master and hears whether the reload worked.

Theory of operation.  A signal carries no answer (nginx's `-s reload` exits 0
even when the new conf is rejected), so the master also listens on a unix
socket beside its pid file: `logs/forkgw.pid` -> `logs/forkgw.sock`.  A client
sends one line, a command; the master answers one line, `ok ...` or
`error ...`, and closes the connection.  `status` is answered at once;
`reload` once its outcome is known: at once if the conf is rejected, else
when the new generation serves or fails, so meanwhile the connection waits
with that generation.  Without a pid file there is no control socket; when
there is none, or it cannot be opened, `-s reload` falls back to the signal.

The path outlives masters: the new master of an upgrade unlinks the old one's
socket and binds its own.  So a master unlinks the path at exit only if it is
still the inode it bound, and when the new master of an upgrade has gone (and
took the path with it) the old one binds the path again.
"""

from __future__ import annotations

import os
import selectors
import socket
from typing import Callable

from forkgw.conf.model import Config
from forkgw.log import ErrorLog


def control_path(config: Config) -> str:
    """The control socket lives beside the pid file: `logs/forkgw.pid` -> `logs/forkgw.sock`."""
    base = config.pid[:-4] if config.pid.endswith(".pid") else config.pid
    return base + ".sock"


def answer(conn: socket.socket | None, line: str) -> None:
    """Send the one-line answer and close; a client that went away costs nothing."""
    if conn is None:
        return
    try:
        conn.setblocking(True)
        conn.settimeout(1.0)
        conn.sendall(line.encode() + b"\n")
    except OSError:
        pass
    conn.close()


class ControlSocket:
    def __init__(self, selector: selectors.BaseSelector, on_command: Callable[[str, socket.socket], None]):
        self.selector = selector
        self.on_command = on_command  # it owns the connection: it must answer() it, now or later
        self.sock: socket.socket | None = None
        self.file = ("", 0)  # (path, inode): unlinked at exit only if still ours

    def open(self, config: Config, log: ErrorLog) -> None:
        if not config.pid:
            return
        path = control_path(config)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)  # a leftover, or the socket of the master we are upgrading from
        except OSError:
            pass
        try:
            sock.bind(path)
            sock.listen(16)
        except OSError as err:
            sock.close()
            log.alert(f'control socket "{path}" failed ({err}); -s reload falls back to signals')
            return
        sock.setblocking(False)
        self.sock = sock
        self.file = (path, os.stat(path).st_ino)
        self.selector.register(sock, selectors.EVENT_READ, self.on_accept)

    def close(self) -> None:
        if self.sock is None:
            return
        path, inode = self.file
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except OSError:
            pass
        try:
            self.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.sock = None

    def drop(self) -> None:
        """In a forked worker: close our copy of the socket; the path stays the master's."""
        if self.sock is not None:
            self.sock.close()

    def taken_over(self) -> bool:
        """Our path is gone: the new master of an upgrade bound it, and removed it at its exit."""
        return not os.path.exists(self.file[0])

    def on_accept(self, mask: int) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.settimeout(2.0)
        try:
            command = conn.recv(256).decode("utf-8", "replace").strip()
        except OSError:
            conn.close()
            return
        conn.setblocking(False)
        self.on_command(command, conn)
