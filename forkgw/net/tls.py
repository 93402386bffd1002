"""TLS as a transport: a handshake run on the loop, then a socket-like object over it.

Theory of operation.  An accepted socket on a TLS listener first belongs to a
`TlsHandshake`, a connection whose only job is the handshake: it peeks at the
first byte (a TLS record starts with 0x16; anything else is plain HTTP sent
to a TLS port, handed back untouched as nginx hands it to its HTTP code for a
400), then steps `do_handshake()` on every readiness event, wanting read or
write as OpenSSL asks, bounded by one deadline.  When the handshake is done it
hands a `TlsTransport` to whoever asked, and leaves the selector: the next
owner registers the same fd as its own.

A `TlsTransport` speaks the `Transport` protocol (recv, send, shutdown,
close, fileno), so the connection above it cannot tell it from a socket:
OpenSSL's want-read / want-write become BlockingIOError, a close_notify
becomes end of stream.  One subtlety: OpenSSL may hold decrypted bytes of a
record already read from the kernel, which no readiness event would announce,
so `recv` drains what is pending before it returns.

The server certificate is chosen during the handshake by the SNI callback of
the listener's context (`sni`): it may switch the connection to another
server's context.  Failures are the client's business: they are reported to
`on_failed` with a reason, never raised.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from typing import Callable

from forkgw.net.connection import EVENT_READ, EVENT_WRITE, Connection
from forkgw.net.loop import Loop

TLS_HANDSHAKE_RECORD = 0x16
SSLV2_HELLO = 0x80  # an old-style ClientHello still sent by some scanners


class TlsTransport:
    """A finished TLS connection, speaking the Transport protocol."""

    __slots__ = ("ssl",)

    def __init__(self, ssl_sock: ssl.SSLSocket):
        self.ssl = ssl_sock

    def recv(self, size: int) -> bytes:
        ssl_sock = self.ssl
        try:
            data = ssl_sock.recv(size)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None
        except ssl.SSLZeroReturnError:
            return b""
        if data and ssl_sock.pending():
            chunks = [data]
            while ssl_sock.pending() and len(data) < size:
                try:
                    more = ssl_sock.recv(size - len(data))
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLZeroReturnError):
                    break
                if not more:
                    break
                chunks.append(more)
            data = b"".join(chunks)
        return data

    def send(self, data) -> int:
        try:
            return self.ssl.send(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None

    def shutdown(self, how: int) -> None:
        # The socket's own shutdown: SSLSocket.shutdown would drop the TLS state and
        # read what follows as plain bytes.
        socket.socket.shutdown(self.ssl, how)

    def close(self) -> None:
        self.ssl.close()

    def fileno(self) -> int:
        return self.ssl.fileno()

    def getsockname(self):
        return self.ssl.getsockname()

    # -- what the handshake agreed on, for $ssl_* variables and filter properties --

    @property
    def version(self) -> str:
        return self.ssl.version() or ""

    @property
    def cipher(self) -> str:
        found = self.ssl.cipher()
        return found[0] if found else ""

    @property
    def server_name(self) -> str:
        return getattr(self.ssl, "sni_name", "") or ""

    @property
    def session_reused(self) -> bool:
        return self.ssl.session_reused

    @property
    def local_subject(self) -> str:
        """The subject of the certificate we sent (recorded per context when it was built)."""
        return getattr(self.ssl.context, "subject", "")

    def peer_certificate_der(self) -> bytes | None:
        return self.ssl.getpeercert(binary_form=True)

    @property
    def peer_subject(self) -> str:
        """The client certificate's subject, RFC 2253 (most specific first), as nginx and Envoy give it."""
        cert = self.ssl.getpeercert()
        return rfc2253(cert.get("subject", ())) if cert else ""

    def peer_sans(self, kind: str) -> list[str]:
        """The client certificate's subjectAltName values of one kind ("DNS", "URI")."""
        cert = self.ssl.getpeercert() or {}
        return [value for key, value in cert.get("subjectAltName", ()) if key == kind]

    def peer_digest(self, algorithm: str) -> str:
        der = self.peer_certificate_der()
        return hashlib.new(algorithm, der).hexdigest() if der else ""


DN_KEYS = {"commonName": "CN", "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
           "organizationName": "O", "organizationalUnitName": "OU", "domainComponent": "DC",
           "streetAddress": "STREET", "userId": "UID"}


def rfc2253(subject) -> str:
    """A name as Python's ssl module decodes it ((((key, value),), ...), least specific first)
    in RFC 2253 text."""
    names = [f"{DN_KEYS.get(key, key)}={value}" for rdn in subject for key, value in rdn]
    return ",".join(reversed(names))


def handshake_step(conn: Connection) -> bool:
    """One step of `conn`'s non-blocking handshake: True once done; False while OpenSSL waits
    (the connection's interest set to what it waits for). A failure raises (SSLError, OSError)."""
    try:
        conn.sock.do_handshake()
    except ssl.SSLWantReadError:
        conn.want(EVENT_READ)
        return False
    except ssl.SSLWantWriteError:
        conn.want(EVENT_WRITE)
        return False
    return True


def sni_callback(ssl_sock: ssl.SSLSocket, name: str | None, context: ssl.SSLContext) -> None:
    """The client named a server: remember the name, and switch to that server's context."""
    ssl_sock.sni_name = name or ""
    chosen = ssl_sock.choose_context(name)
    if chosen is not None and chosen is not context:
        ssl_sock.context = chosen


class TlsHandshake(Connection):
    __slots__ = ("context", "choose_context", "on_done", "on_plain", "on_failed", "peeked")

    def __init__(self, loop: Loop, sock: socket.socket, context: ssl.SSLContext, timeout: float,
                 choose_context: Callable[[str | None], ssl.SSLContext | None],
                 on_done: Callable[[TlsTransport], None], on_plain: Callable[[socket.socket], None],
                 on_failed: Callable[[str], None]):
        super().__init__(loop, sock)
        self.context = context
        self.choose_context = choose_context
        self.on_done = on_done
        self.on_plain = on_plain
        self.on_failed = on_failed
        self.peeked = False
        self.set_deadline(timeout)
        self.want(EVENT_READ)

    def on_event(self, mask: int) -> None:
        if self.closed:
            return
        if not self.peeked:
            self.peek()
        else:
            self.step()

    def peek(self) -> None:
        try:
            first = self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self.fail(f"recv() failed ({err.errno}: {err.strerror}) while SSL handshaking")
            return
        if not first:
            self.fail("client closed connection while SSL handshaking")
            return
        self.peeked = True
        if first[0] not in (TLS_HANDSHAKE_RECORD, SSLV2_HELLO):
            on_plain = self.on_plain
            self.hand_over()
            on_plain(self.sock)
            return
        self.want(0)  # the SSLSocket below is registered anew under its own fd object
        try:
            self.sock = self.context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        except OSError as err:  # SSLError too: the client reset before its hello was read
            self.fail(f"SSL handshake not started ({getattr(err, 'reason', None) or err.strerror or err})")
            return
        self.sock.choose_context = self.choose_context  # read by sni_callback
        self.step()

    def step(self) -> None:
        try:
            done = handshake_step(self)
        except ssl.SSLError as err:
            self.fail(f"SSL_do_handshake() failed ({err.reason or err.strerror or err}) while SSL handshaking")
        except OSError as err:
            self.fail(f"SSL_do_handshake() failed ({err.errno}: {err.strerror}) while SSL handshaking")
        else:
            if done:
                on_done = self.on_done
                self.hand_over()
                on_done(TlsTransport(self.sock))

    def hand_over(self) -> None:
        """Leave the selector and the timers without closing: the socket has a new owner."""
        self.want(0)
        self.closed = True
        self.deadline = None
        self.forget()

    def forget(self) -> None:
        """Drop the callbacks: they hold this handshake (through their closure), a cycle."""
        self.choose_context = self.on_done = self.on_plain = self.on_failed = None
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.choose_context = None

    def on_timeout(self) -> None:
        self.fail("client timed out (110: Connection timed out) while SSL handshaking")

    def fail(self, reason: str = "unexpected error while SSL handshaking") -> None:
        self.close()
        on_failed, self.on_failed = self.on_failed, None
        self.forget()
        if on_failed is not None:
            on_failed(reason)
