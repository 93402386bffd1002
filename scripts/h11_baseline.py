"""The in-language ceiling: the least a Python h11 server does per request.

Forked workers share one listening socket; each runs a selectors loop over
non-blocking sockets with h11 and keep-alive, and nothing else (no routing,
logging or timers), so forkgw's own cost is whatever it adds on top of this.
With --proxy HOST:PORT each request is relayed to that backend over a
per-worker keep-alive pool instead: the floor of any Python h11 proxy.

    python scripts/h11_baseline.py --port 9000 [--workers 2] [--proxy 127.0.0.1:9001]
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import time

import h11

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_READ | selectors.EVENT_WRITE
HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-connection"}
sel: selectors.BaseSelector  # one epoll per worker, made after fork (a shared one would be one set)
pool: list[Peer] = []  # idle backend connections (proxy mode)
_date = [0, b""]


def date() -> bytes:
    """Date header value, formatted once a second (as any real server does)."""
    now = int(time.time())
    if now != _date[0]:
        _date[:] = [now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()]
    return _date[1]


class Peer:
    """One socket with its h11 state; `handler(peer, event)` gets each event."""

    def __init__(self, sock: socket.socket, role, handler):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.h, self.handler = sock, h11.Connection(role), handler
        self.out, self.closed, self.other = b"", False, None
        sel.register(sock, READ, self)

    def send(self, *events) -> None:
        data = b"".join(self.h.send(e) or b"" for e in events)
        if not self.out:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return self.close()
            data = data[sent:]
            if data:
                sel.modify(self.sock, WRITE, self)
        self.out += data

    def writable(self) -> None:
        try:
            self.out = self.out[self.sock.send(self.out):]
        except BlockingIOError:
            return
        except OSError:
            return self.close()
        if not self.out:
            sel.modify(self.sock, READ, self)

    def readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.h.receive_data(data)
        self.pump()

    def pump(self) -> None:
        while not self.closed:
            try:
                event = self.h.next_event()
            except h11.RemoteProtocolError:
                return self.close()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                return self.close()
            self.handler(self, event)

    def next_cycle(self) -> bool:
        """Ready for the next request/response on this connection; False if it closed."""
        if self.h.our_state is h11.DONE and self.h.their_state is h11.DONE:
            self.h.start_next_cycle()
            return True
        self.close()
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            sel.unregister(self.sock)
            self.sock.close()
            if self.other is not None and not self.other.closed:
                self.other.close()


def on_client(peer: Peer, event) -> None:
    """Server side: answer 200 at once, or relay to the backend."""
    if isinstance(event, h11.Request):
        peer.request = event
    elif isinstance(event, h11.EndOfMessage):
        if BACKEND is None:
            peer.send(h11.Response(status_code=200, headers=[(b"server", b"h11"), (b"date", date()),
                                                             (b"content-length", b"0")]), h11.EndOfMessage())
            peer.next_cycle()
            return
        while pool and pool[-1].closed:  # the backend closed it while idle
            pool.pop()
        up = pool.pop() if pool else Peer(socket.create_connection(BACKEND), h11.CLIENT, on_backend)
        up.other, peer.other = peer, up
        req = peer.request
        headers = [(b"host", HOST)] + [(n, v) for n, v in req.headers if n != b"host" and n not in HOP]
        up.send(h11.Request(method=req.method, target=req.target, headers=headers), h11.EndOfMessage())


def on_backend(up: Peer, event) -> None:
    """Client side: stream the backend's answer to the waiting client, then pool the connection."""
    client = up.other
    if isinstance(event, h11.Response):
        client.send(h11.Response(status_code=event.status_code,
                                 headers=[(n, v) for n, v in event.headers if n not in HOP]))
    elif isinstance(event, h11.Data):
        client.send(event)
    elif isinstance(event, h11.EndOfMessage):
        client.send(event)
        up.other = client.other = None
        if up.next_cycle():
            pool.append(up)
        if not client.closed and client.next_cycle():
            client.pump()  # a pipelined request may be waiting


def serve(listener: socket.socket) -> None:
    global sel
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sel = selectors.DefaultSelector()
    sel.register(listener, READ, None)
    while True:
        for key, mask in sel.select():
            peer = key.data
            if peer is None:
                while True:  # accept until EAGAIN; another worker may win the race
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, ConnectionAbortedError):
                        break
                    Peer(sock, h11.SERVER, on_client)
            elif mask & selectors.EVENT_WRITE and peer.out:
                peer.writable()
            elif mask & selectors.EVENT_READ:
                peer.readable()


def main() -> None:
    global BACKEND, HOST
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--proxy", metavar="HOST:PORT", help="relay every request to this backend")
    args = ap.parse_args()
    BACKEND = HOST = None
    if args.proxy:
        host, port = args.proxy.rsplit(":", 1)
        BACKEND, HOST = (host, int(port)), args.proxy.encode()
    listener = socket.create_server((args.host, args.port), backlog=4096)
    listener.setblocking(False)
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                serve(listener)
            finally:
                os._exit(0)
        children.append(pid)

    def stop(signum, frame):
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while children:
        pid, _ = os.wait()
        children.remove(pid)


BACKEND: tuple[str, int] | None = None
HOST: bytes | None = None

if __name__ == "__main__":
    main()
