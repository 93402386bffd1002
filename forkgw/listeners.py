"""The master's listening sockets: bound once, kept across reloads, handed over on upgrade.

Theory of operation.  The master holds one socket per address (`Listen.key`)
and every generation's workers inherit the ones their conf names.  A conf's
listeners are found by diffing it against what is open: an address that stays
keeps its socket, so its accept queue is never closed and no connection is
refused; a new address is bound.  Binding is all or nothing: if one address
fails, the sockets just bound are closed and the open set is untouched, so a
conf that cannot bind leaves nothing behind.  When a generation becomes
serving, every address that no starting or serving generation names is
closed (a retiring generation's workers hold copies of their own).

Sockets also arrive from outside: from systemd (`LISTEN_FDS`), or from the
old master of an upgrade, which names them in the environment as
"fd,addr,port;...".  The first conf adopts those whose address it has; the
rest are closed once that conf is loaded.

With `reuseport` the socket here only holds the address: it is bound but not
listening, so the kernel hands it no connection, and each worker listens on
a socket of its own.
"""

from __future__ import annotations

import os
import socket

from forkgw.conf.model import Config, Listen
from forkgw.errors import ConfError
from forkgw.systemd import listen_fds

INHERIT_ENV = "FORKGW_LISTENERS"  # "fd,addr,port;..." from an upgrading master

Key = tuple[str, int]


def bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if listen.reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6 and listen.addr == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((listen.addr, listen.port))
        if not listen.reuseport:
            sock.listen(listen.backlog)
    except OSError as err:
        sock.close()
        raise ConfError(f"bind() to {listen.addr}:{listen.port} failed ({err.errno}: {err.strerror})",
                        listen.where) from None
    sock.setblocking(False)
    return sock


def inherited_listeners() -> dict[Key, socket.socket]:
    """Sockets from an upgrading master (USR2) or from systemd (LISTEN_FDS)."""
    sockets = listen_fds()
    for item in filter(None, os.environ.pop(INHERIT_ENV, "").split(";")):
        fd, addr, port = item.split(",")
        try:
            sock = socket.socket(fileno=int(fd))
        except OSError:
            continue
        sock.setblocking(False)
        sockets[(addr, int(port))] = sock
    return sockets


class Listeners:
    def __init__(self) -> None:
        self.open: dict[Key, socket.socket] = {}
        self.inherited: dict[Key, socket.socket] = {}  # handed in, not yet adopted by a conf

    def inherit(self) -> None:
        self.inherited = inherited_listeners()

    def close_inherited(self) -> None:
        """Those handed to us for addresses the conf no longer has."""
        for sock in self.inherited.values():
            sock.close()
        self.inherited = {}

    def for_conf(self, config: Config) -> dict[Key, socket.socket]:
        """The sockets of a conf's addresses: same address keeps its socket, new ones are bound."""
        wanted: dict[Key, socket.socket] = {}
        fresh = []
        try:
            for listen in config.listens():
                sock = self.open.get(listen.key) or self.inherited.pop(listen.key, None)
                if sock is None:
                    sock = bind(listen)
                    fresh.append((listen.key, sock))
                elif listen.key not in self.open:
                    fresh.append((listen.key, sock))
                wanted[listen.key] = sock
        except ConfError:
            for key, sock in fresh:
                sock.close()
            raise
        self.open.update(fresh)
        return wanted

    def close_unused(self, used) -> None:
        for key in list(self.open):
            if key not in used:
                self.open.pop(key).close()

    def close_others(self, keep) -> None:
        """In a forked worker: close the sockets its generation does not listen on."""
        for key, sock in self.open.items():
            if key not in keep:
                sock.close()

    def close_all(self) -> None:
        for sock in self.open.values():
            sock.close()
        self.open.clear()

    def handover_env(self) -> dict[str, str]:
        """The environment that names our sockets to the new master of an upgrade."""
        return {INHERIT_ENV: ";".join(f"{sock.fileno()},{key[0]},{key[1]}" for key, sock in self.open.items())}

    def set_inheritable(self, inheritable: bool) -> None:
        """True only around the fork and exec of a new master."""
        for sock in self.open.values():
            sock.set_inheritable(inheritable)
