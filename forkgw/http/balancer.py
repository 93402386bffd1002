"""Choosing a peer: nginx's smooth weighted round robin with passive health.

Theory of operation.  Each worker owns its balancers; nothing here is shared
across processes.  A `Balancer` runs smooth weighted round robin over an
upstream's primary peers, then its backups, and keeps the passive health:
`max_fails` failures within `fail_timeout` take a peer out for `fail_timeout`.
When every peer is out, nginx tries them all again rather than fail, and so
does this.
"""

from __future__ import annotations

import socket

from forkgw.conf.model import Upstream, UpstreamServer


class Peer:
    """One `server` line of an upstream block, resolved once at worker start."""

    __slots__ = ("server", "name", "sockaddr", "family", "weight", "current", "fails", "down_until")

    def __init__(self, server: UpstreamServer):
        self.server = server
        self.name = f"{server.host}:{server.port}"
        info = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)[0]
        self.family, self.sockaddr = info[0], info[4]
        self.weight = server.weight
        self.current = 0
        self.fails = 0
        self.down_until = 0.0

    @property
    def addr(self) -> str:
        host, port = self.sockaddr[0], self.sockaddr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Balancer:
    """Smooth weighted round robin with passive health, primaries before backups."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self.primary = [Peer(s) for s in upstream.servers if not s.backup]
        self.backup = [Peer(s) for s in upstream.servers if s.backup]
        self.tries = len(self.primary) + len(self.backup)

    def pick(self, now: float, tried: set[Peer]) -> Peer | None:
        for group in (self.primary, self.backup):
            peer = self._pick_from(group, now, tried)
            if peer is not None:
                return peer
        if not tried:
            # Every peer is marked down: nginx then tries them all again rather than fail.
            for peer in self.primary + self.backup:
                peer.fails, peer.down_until = 0, 0.0
            return self._pick_from(self.primary or self.backup, now, tried)
        return None

    @staticmethod
    def _pick_from(group: list[Peer], now: float, tried: set[Peer]) -> Peer | None:
        best, total = None, 0
        for peer in group:
            if peer in tried or peer.down_until > now:
                continue
            peer.current += peer.weight
            total += peer.weight
            if best is None or peer.current > best.current:
                best = peer
        if best is not None:
            best.current -= total
        return best

    def has_untried(self, now: float, tried: set[Peer]) -> bool:
        return any(p not in tried and p.down_until <= now for p in self.primary + self.backup)

    @staticmethod
    def failed(peer: Peer, now: float) -> None:
        server = peer.server
        if server.max_fails == 0:
            return
        peer.fails += 1
        if peer.fails >= server.max_fails:
            peer.down_until = now + server.fail_timeout

    @staticmethod
    def succeeded(peer: Peer) -> None:
        peer.fails = 0
        peer.down_until = 0.0
