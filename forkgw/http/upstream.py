"""Connections to upstream peers, and the keep-alive pools that hold them between requests.

Theory of operation.  An `UpstreamConnection` is a socket to one peer with
its h11 client state.  While a request uses it, its `handler` (a
ProxyRequest) hears of every event: connected, readable, drained, failed,
timed out.  Between requests it idles in its upstream's `Pool` (LIFO, at
most `keepalive` of them), where any readable event means the peer closed it
or sent junk, and it is dropped.  Pools belong to one worker.

For `proxy_pass https://` the connection carries its TLS context and the
name to verify: once TCP is up it runs the handshake on the loop (resuming
the last session with that peer when it has one), then swaps its socket for
a TlsTransport, and only then is its handler told it is connected.  A pool
hands a connection out only for the same peer and the same TLS context.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl

import h11

from forkgw.http.balancer import Peer
from forkgw.net.connection import EVENT_READ, EVENT_WRITE, Connection
from forkgw.net.loop import Loop
from forkgw.net.tls import TlsTransport, handshake_step

IDLE_TIMEOUT = 60.0  # idle keep-alive connection to an upstream (nginx's default)


class UpstreamConnection(Connection):
    __slots__ = ("peer", "h11", "handler", "connected", "pool", "requests", "tls_context", "handshake")

    def __init__(self, loop: Loop, peer: Peer, tls: tuple | None = None, session=None):
        sock = socket.socket(peer.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(loop, sock)
        self.peer = peer
        self.h11 = h11.Connection(h11.CLIENT)
        self.handler = None  # the ProxyRequest using us, or None while idle in a pool
        self.connected = False
        self.pool: Pool | None = None
        self.requests = 0
        # https: (context, server name) picks the pool's connections; the handshake, with the
        # session to resume, runs once the TCP connection is up.
        self.tls_context = tls[0] if tls else None
        self.handshake = (tls[0], tls[1], session) if tls else None

    def connect(self) -> None:
        err = self.sock.connect_ex(self.peer.sockaddr)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        self.want(EVENT_WRITE)

    def on_event(self, mask: int) -> None:
        if self.closed:
            return  # closed earlier in this loop turn (e.g. its client reset)
        handler = self.handler
        if handler is None:
            self.close()  # idle in a pool: the peer closed it (or sent junk)
            return
        if not self.connected:
            if self.handshaking:
                self.step_handshake()
            elif mask & EVENT_WRITE:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    handler.upstream_failed(self, "connect() failed", OSError(err, os.strerror(err)))
                elif self.handshake is not None:
                    self.start_handshake()
                else:
                    self.connected = True
                    handler.upstream_connected(self)
            return
        if mask & EVENT_WRITE:
            self.flush()
        if mask & EVENT_READ and not self.closed and self.handler is not None:
            self.handler.upstream_readable(self)

    def start_handshake(self) -> None:
        context, name, session = self.handshake
        self.want(0)  # the SSLSocket is registered anew under its own object
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=name, session=session,
                                            do_handshake_on_connect=False)
        except (OSError, ValueError) as err:
            self.handler.upstream_failed(self, "SSL handshake not started", err)
            return
        self.step_handshake()

    def step_handshake(self) -> None:
        try:
            done = handshake_step(self)
        except ssl.SSLCertVerificationError as err:
            self.handler.upstream_failed(
                self, f"upstream SSL certificate verify error: ({err.verify_code}:{err.verify_message}; "
                "proxy_ssl_verify off turns the check off)", None)
        except OSError as err:
            reason = getattr(err, "reason", None) or err.strerror or str(err)
            self.handler.upstream_failed(self, f"SSL_do_handshake() failed ({reason})", None)
        else:
            if done:
                self.sock = TlsTransport(self.sock)
                self.connected = True
                self.handler.upstream_connected(self)

    @property
    def handshaking(self) -> bool:
        return type(self.sock) is ssl.SSLSocket

    @property
    def session(self):
        """The TLS session to resume on the next connection to this peer, if any."""
        return self.sock.ssl.session if type(self.sock) is TlsTransport else None

    def send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            self.out += data
            if self.connected:
                self.flush()

    def flush(self) -> None:
        if self.out:
            try:
                self.send_out()
            except OSError as err:
                self.handler.upstream_failed(self, "send() failed", err)
                return
        self.want(EVENT_READ | (EVENT_WRITE if self.out else 0))
        if not self.out and self.handler is not None:
            self.handler.upstream_drained(self)

    def resume(self) -> None:
        """Read again after a pause (a slow client, a held response)."""
        self.want(EVENT_READ | (EVENT_WRITE if self.out else 0))

    def on_timeout(self) -> None:
        if self.handler is not None:
            self.handler.upstream_timeout(self)
        else:
            self.close()

    def fail(self) -> None:
        handler = self.handler
        self.close()
        if handler is not None:
            handler.client.abort()

    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self.pool is not None:
            self.pool.discard(self)


class Pool:
    """Idle keep-alive connections to one upstream, at most `size` of them (LIFO)."""

    def __init__(self, loop: Loop, size: int):
        self.loop = loop
        self.size = size
        self.idle: list[UpstreamConnection] = []
        self.sessions: dict = {}  # (peer, TLS context) -> the last TLS session made with it

    def take(self, peer: Peer, tls_context=None) -> UpstreamConnection | None:
        for i in range(len(self.idle) - 1, -1, -1):
            conn = self.idle[i]
            if conn.peer is peer and conn.tls_context is tls_context:
                del self.idle[i]
                conn.pool = None
                conn.deadline = None
                return conn
        return None

    def give(self, conn: UpstreamConnection) -> None:
        if self.size <= 0 or not conn.reusable():
            conn.close()
            return
        conn.h11.start_next_cycle()
        conn.handler = None
        conn.pool = self
        conn.want(EVENT_READ)
        self.idle.append(conn)
        self.loop.set_deadline(conn, IDLE_TIMEOUT)
        while len(self.idle) > self.size:
            self.idle[0].close()

    def discard(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close_all(self) -> None:
        for conn in list(self.idle):
            conn.close()
