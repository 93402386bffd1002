"""Bad input, slow clients and floods against the real gateway process.

Every case checks what a client can observe (a clear 4xx, or a closed
connection), the error log level of what was logged, that the same worker
keeps serving everyone else, and that the worker's open file descriptors go
back to where they were: an attacker must not be able to leak a socket.

Most cases share one gateway (started once for the module) with short
timeouts, and a recording upstream that keeps exactly what the gateway sent
it, so smuggling cases can assert what reached the backend.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import h11
import pytest

from conftest import Gateway, wait_for

# -- helpers shared with test_faults.py -------------------------------------------------


def fds(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle_fds(pid: int, limit: int, timeout: float = 5.0) -> int:
    """Wait until the process holds at most `limit` fds (lingering closes take a moment)."""
    wait_for(lambda: fds(pid) <= limit, timeout)
    return fds(pid)


def baseline(pid: int) -> int:
    """The fds of an idle process, once closes in progress are done."""
    counts = []
    for _ in range(4):
        time.sleep(0.05)
        counts.append(fds(pid))
    return min(counts)


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


class Hang(AssertionError):
    """The gateway neither answered nor closed in time."""


def read_replies(sock: socket.socket, count: int = 1, method: str = "GET",
                 timeout: float = 5.0) -> tuple[list[Reply], bool]:
    """Up to `count` whole responses parsed strictly, and whether the connection then closed.

    A socket timeout is a hang and fails the test; a response cut short by a close is not
    returned (the connection counts as closed); a malformed response raises.
    """
    conn = h11.Connection(h11.CLIENT)

    def expect() -> None:
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())

    expect()
    sock.settimeout(timeout)
    replies: list[Reply] = []
    current: Reply | None = None
    while len(replies) < count:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as err:
            if "peer closed connection without sending complete message body" in str(err):
                return replies, True
            raise
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(1 << 20)
            except socket.timeout:
                raise Hang(f"no answer and no close within {timeout}s after {len(replies)} replies")
            except ConnectionResetError:
                data = b""
            if not data and conn.their_state is h11.SEND_RESPONSE and not conn.trailing_data[0]:
                return replies, True  # closed before (the next) answer
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            current = Reply(event.status_code,
                            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers])
        elif isinstance(event, h11.Data):
            current.body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            replies.append(current)
            current = None
            if len(replies) < count:
                if conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
                expect()
        elif isinstance(event, h11.ConnectionClosed):
            return replies, True
    if conn.their_state is h11.MUST_CLOSE or conn.their_state is h11.CLOSED:
        return replies, closes(sock, timeout)
    return replies, False


def closes(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the peer closes (FIN or RST); fails the test if it neither closes nor talks."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        raise Hang(f"connection still open after {timeout}s")


def exchange(port: int, data: bytes, count: int = 1, method: str = "GET", timeout: float = 5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_replies(sock, count, method, timeout)


def get(port: int, path: str = "/", timeout: float = 5.0) -> Reply:
    replies, _ = exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
                          timeout=timeout)
    assert replies, f"GET {path}: connection closed without an answer"
    return replies[0]


def new_lines(gw: Gateway, mark: int) -> list[str]:
    return gw.log_text()[mark:].splitlines()


SEVERE = re.compile(r"\[(error|crit|alert|emerg)\]")


@dataclass
class Seen:
    """One request as the recording upstream parsed it, plus the raw bytes of its connection."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    raw: bytearray = field(default_factory=bytearray)

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


class Recorder:
    """An upstream on a raw socket that records every request and misbehaves on request.

    Paths: /big/N answers N bytes; /slow/S waits S seconds first; /garbage answers bytes
    that are not HTTP; /reset resets the connection instead of answering; /reset-mid
    sends a head and part of the body, then resets; /close closes without a word;
    anything else answers 200 "ok".  /reset-all resets every connection it holds (a
    pool of idle keep-alive connections goes stale), then answers.
    """

    def __init__(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        self.port = self.listener.getsockname()[1]
        self.seen: list[Seen] = []
        self.accepted = 0
        self.errors: list[str] = []
        self.live: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.running = True
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self) -> None:
        while self.running:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.live.add(sock)
            threading.Thread(target=self.serve, args=(sock,), daemon=True).start()

    def serve(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        raw = bytearray()
        current: Seen | None = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = sock.recv(65536)
                    raw += data
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    current = Seen(event.method, event.target, list(event.headers), raw=raw)
                elif isinstance(event, h11.Data):
                    current.body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    with self.lock:
                        self.seen.append(current)
                    if not self.answer(sock, conn, current):
                        return
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except h11.RemoteProtocolError as err:
            self.errors.append(f"{err}: {bytes(raw)[:200]!r}")
        except OSError:
            pass
        finally:
            with self.lock:
                self.live.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def answer(self, sock: socket.socket, conn: h11.Connection, req: Seen) -> bool:
        parts = req.target.decode("latin-1").split("?")[0].strip("/").split("/")
        if parts[0] == "slow":
            time.sleep(float(parts[1]))
        if parts[0] == "garbage":
            sock.sendall(b"\x00\x17\x03 this is not HTTP at all\r\n\r\n")
            return False
        if parts[0] == "reset":
            reset(sock)
            return False
        if parts[0] == "close":
            sock.shutdown(socket.SHUT_RDWR)
            return False
        if parts[0] == "reset-mid":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"p" * 5000)
            time.sleep(0.1)
            reset(sock)
            return False
        if parts[0] == "reset-all":
            with self.lock:
                others = [s for s in self.live if s is not sock]
            for other in others:
                try:
                    reset(other)
                except OSError:
                    pass
        if parts[0] == "big":
            size = int(parts[1])
            sock.sendall(conn.send(h11.Response(status_code=200, headers=[("Content-Length", str(size))])))
            block = b"b" * 65536
            left = size
            while left > 0:
                sock.sendall(block[: min(left, len(block))])
                left -= len(block)
            return False  # body written raw: this connection is not reused
        body = b"ok"
        sock.sendall(conn.send(h11.Response(status_code=200, headers=[("Content-Length", str(len(body))),
                                                                       ("X-Port", str(self.port))]))
                     + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        return True

    def close(self) -> None:
        self.running = False
        self.listener.close()
        with self.lock:
            for sock in list(self.live):
                try:
                    sock.close()
                except OSError:
                    pass


# -- the shared gateway ------------------------------------------------------------------

CONF = """
events { worker_connections 512; }
http {
    client_max_body_size 1k;
    client_header_timeout 1s;
    client_body_timeout 1s;
    send_timeout 1s;
    keepalive_timeout 10s;
    keepalive_requests 10000;
    proxy_read_timeout 5s;
    log_format brief '$status $request_method $request_uri';
    access_log logs/access.log brief;
    server {
        listen 127.0.0.1:{port};
        location / { return 200 "root\\n"; }
        location = /pid { return 200 "$pid"; }
        location /echo { return 200 "$request_uri"; }
        location /p/ { proxy_pass http://127.0.0.1:UPSTREAM/; }
    }
}
"""


class Shared:
    def __init__(self, gw: Gateway, rec: Recorder):
        self.gw = gw
        self.rec = rec
        self.port = gw.port
        self.pid = gw.worker_pids()[0]
        get(self.port, "/")  # warm: the first request opens nothing new afterwards
        self.base_fds = baseline(self.pid)

    def serving(self) -> None:
        """The same worker answers a plain request at once, and holds no more fds than at start."""
        began = time.monotonic()
        reply = get(self.port, "/pid")
        assert reply.status == 200 and reply.body == str(self.pid).encode(), reply
        assert time.monotonic() - began < 1.0
        assert self.gw.worker_pids() == [self.pid]
        settle_fds(self.pid, self.base_fds)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    rec = Recorder()
    gw = Gateway(tmp_path_factory.mktemp("abuse"))
    gw.start(CONF.replace("UPSTREAM", str(rec.port)))
    try:
        yield Shared(gw, rec)
    finally:
        gw.stop()
        rec.close()
    bad = gw.bad_log_lines()
    assert not bad, "error log has alert/crit/emerg lines:\n" + "\n".join(bad)


# -- bad input -------------------------------------------------------------------------------

H = b"Host: x\r\n"
POST_P = b"POST /p/x HTTP/1.1\r\nHost: x\r\n"
# (id, bytes, expected status, a log line at [info] naming the parse error?)
BAD_INPUT = [
    ("no-version", b"GET /\r\n\r\n", 400, True),
    ("one-word-line", b"GARBAGE\r\n\r\n", 400, True),
    ("junk-after-version", b"GET / HTTP/1.1 junk\r\n" + H + b"\r\n", 400, True),
    ("bad-method-char", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("header-without-colon", b"GET / HTTP/1.1\r\n" + H + b"Broken\r\n\r\n", 400, True),
    ("space-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A : a\r\n\r\n", 400, True),
    ("space-in-name", b"GET / HTTP/1.1\r\n" + H + b"X A: a\r\n\r\n", 400, True),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400, True),
    ("bare-cr", b"GET / HTTP/1.1\r\nHost: x\rX-Injected: y\r\n\r\n", 400, True),
    ("non-ascii-name", "GET / HTTP/1.1\r\nHost: x\r\nX-é: a\r\n\r\n".encode(), 400, True),
    ("missing-host-1.1", b"GET / HTTP/1.1\r\n\r\n", 400, True),
    ("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, True),
    ("conflicting-content-length", POST_P + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400, True),
    ("content-length-hex", POST_P + b"Content-Length: 0x3\r\n\r\nabc", 400, True),
    ("content-length-plus", POST_P + b"Content-Length: +3\r\n\r\nabc", 400, True),
    ("content-length-negative", POST_P + b"Content-Length: -1\r\n\r\n", 400, True),
    ("content-length-huge", POST_P + b"Content-Length: 99999999999999999999999999\r\n\r\n", 400, True),
    ("content-length-two-numbers", POST_P + b"Content-Length: 3 3\r\n\r\nabc", 400, True),
    ("te-gzip", POST_P + b"Transfer-Encoding: gzip\r\n\r\n", 501, True),
    ("te-identity", POST_P + b"Transfer-Encoding: identity\r\n\r\n", 501, True),
    ("te-chunked-twice", POST_P + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 501, True),
    ("te-two-headers", POST_P + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501, True),
    ("nul-bytes", b"\x00" * 64 + b"\r\n\r\n", 400, True),
    ("binary-noise", bytes(range(1, 256)) + b"\r\n\r\n", 400, True),
    ("tls-client-hello", bytes.fromhex("16030100c4010000c00303") + bytes(range(32)) + b"\x00\x00\x02\x13\x01"
                                                                                 b"\x01\x00\r\n\r\n", 400, True),
    ("dotdot-escapes-root", b"GET /../etc/passwd HTTP/1.1\r\n" + H + b"\r\n", 400, False),
    ("encoded-dotdot", b"GET /%2e%2e/etc/passwd HTTP/1.1\r\n" + H + b"\r\n", 400, False),
    ("dotdot-after-segment", b"GET /a/../../etc HTTP/1.1\r\n" + H + b"\r\n", 400, False),
    ("dotdot-on-proxy-route", b"GET /p/../../x HTTP/1.1\r\n" + H + b"\r\n", 400, False),
    ("bad-percent", b"GET /%zz HTTP/1.1\r\n" + H + b"\r\n", 400, False),
    ("encoded-nul", b"GET /a%00b HTTP/1.1\r\n" + H + b"\r\n", 400, False),
    ("asterisk-form", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", 400, False),
    ("uri-10k", b"GET /" + b"u" * 10000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414, False),
    ("uri-20k", b"GET /p/" + b"u" * 20000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414, False),
    ("header-9k", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, False),
    ("5000-headers", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(5000)) + b"\r\n",
     431, False),
    ("http-2.0", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505, False),
    ("host-with-slashes", b"GET / HTTP/1.1\r\nHost: ../../etc\r\n\r\n", 400, False),
    ("host-with-ctl", b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n", 400, False),
]


@pytest.mark.parametrize("name, data, status, logged", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_gets_a_clear_4xx_and_the_worker_serves_on(shared, name, data, status, logged):
    """Each malformed request: its status; a request h11 cannot parse, or one whose head or
    body was not read whole, then closes; nothing reaches the upstream; a parse error is
    logged at [info] (the client's fault: never [error] or worse)."""
    mark = len(shared.gw.log_text())
    hits = len(shared.rec.seen)
    with socket.create_connection(("127.0.0.1", shared.port)) as sock:
        sock.sendall(data)
        replies, closed = read_replies(sock, timeout=4)
        assert replies and replies[0].status == status, (name, replies)
        if logged or status in (413, 414, 431):
            assert closed and replies[0].get("connection") == "close"
        if not closed:  # kept alive: the connection must still be usable
            sock.sendall(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
            again, _ = read_replies(sock, timeout=2)
            assert again[0].body == str(shared.pid).encode()
    assert len(shared.rec.seen) == hits, shared.rec.seen[hits:]
    lines = new_lines(shared.gw, mark)
    assert not [line for line in lines if SEVERE.search(line)], lines
    if logged:
        assert any("[info]" in line and "client sent invalid request" in line for line in lines), lines
    shared.serving()


BAD_CHUNKS = [
    b"zz\r\nabc\r\n0\r\n\r\n",  # size not hex
    b"-3\r\nabc\r\n0\r\n\r\n",  # negative size
    b"3\r\nabcX\r\n0\r\n\r\n",  # no CRLF after the data
    b"3\r\nabc\r\n0\r\nTrailer-Without-Colon\r\n\r\n",  # broken trailer
]


@pytest.fixture
def fresh(gateway):
    """The shared gateway's conf on a gateway of its own, for cases that disturb it."""
    rec = Recorder()
    gateway.start(CONF.replace("UPSTREAM", str(rec.port)).replace("proxy_read_timeout 5s", "proxy_read_timeout 1s"))
    try:
        yield Shared(gateway, rec)
    finally:
        rec.close()


def test_malformed_chunked_body_on_a_proxied_route_is_400(fresh):
    """The head went upstream already when the body turns out malformed: the client gets 400
    and a close, the upstream never gets a complete request."""
    for chunks in BAD_CHUNKS:
        replies, closed = exchange(fresh.port, POST_P + b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
        assert replies[0].status == 400 and closed, chunks
    assert fresh.rec.seen == []
    assert fresh.gw.worker_pids() == [fresh.pid]


def test_a_request_cut_mid_body_releases_the_upstream_connection_at_once(fresh):
    """Whether its body is malformed, half-closed or reset, a proxied request that dies in
    its body leaves nothing behind: the upstream socket (opened with the head) is closed at
    once, not when proxy_read_timeout fires with an [error] about the upstream."""
    mark = len(fresh.gw.log_text())
    for chunks in BAD_CHUNKS:
        exchange(fresh.port, POST_P + b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
    with socket.create_connection(("127.0.0.1", fresh.port)) as sock:
        sock.sendall(POST_P + b"Content-Length: 100\r\n\r\nhalf a body")
        time.sleep(0.05)
        sock.shutdown(socket.SHUT_WR)
        read_replies(sock, timeout=3)
    send_then_reset(fresh.port, POST_P + b"Content-Length: 1000\r\n\r\n" + b"z" * 10)
    time.sleep(0.3)
    leaked = fds(fresh.pid) - fresh.base_fds
    time.sleep(1.2)
    lines = [line for line in new_lines(fresh.gw, mark) if SEVERE.search(line)]
    assert leaked <= 0 and lines == [], (leaked, lines)


def test_a_path_that_is_not_utf8_renders_in_return_and_headers(gateway):
    """`/caf%e9` decodes to a byte that is not UTF-8, `/%e2%82%ac` to a character beyond
    latin-1: $uri in a `return` text and in a redirect's Location must come out as the
    client's bytes (escaped where a header needs it), never crash the request."""
    gateway.start("""
http {
    client_header_timeout 1s;
    server {
        listen 127.0.0.1:{port};
        location / { return 200 "uri=$uri"; }
        location /go/ { return 302 /to$uri; }
    }
}
""")
    replies, _ = exchange(gateway.port, b"GET /caf%e9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=3)
    assert replies and replies[0].status == 200 and replies[0].body == b"uri=/caf\xe9", replies
    for path in (b"/go/%ff", b"/go/%e2%82%ac"):  # not UTF-8; UTF-8 beyond latin-1
        replies, _ = exchange(gateway.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                              timeout=3)
        assert replies and replies[0].status == 302, (path, replies)
    assert "[alert]" not in gateway.log_text()


# -- request smuggling: what the upstream receives -----------------------------------------


@pytest.mark.parametrize("data", [
    pytest.param(POST_P + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                 id="cl-then-te"),
    pytest.param(POST_P + b"Transfer-Encoding: chunked\r\nContent-Length: 30\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                 id="te-then-cl"),
    pytest.param(b"POST /p/x HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                 id="http-1.0-chunked"),
])
def test_ambiguous_framing_is_refused_and_never_forwarded(shared, data):
    """A request whose length two parties could read differently is the smuggling vector:
    it is answered 400 and closed, and the upstream never sees it."""
    hits = len(shared.rec.seen)
    replies, closed = exchange(shared.port, data, timeout=4)
    time.sleep(0.2)
    forwarded = shared.rec.seen[hits:]
    assert not forwarded, [bytes(s.raw) for s in forwarded]
    assert replies and replies[0].status == 400 and closed
    shared.serving()


def test_what_the_upstream_receives_for_repeated_and_folded_headers(shared):
    """Identical Content-Length lines collapse into one; an obs-fold reaches the upstream as
    one line joined by a space (RFC 9112 5.2), never as a raw continuation line; an
    absolute-form target does not choose the upstream's Host."""
    hits = len(shared.rec.seen)
    replies, _ = exchange(shared.port, POST_P + b"Content-Length: 3\r\nContent-Length: 3\r\n"
                          b"Connection: close\r\n\r\nabc")
    assert replies[0].status == 200
    seen = shared.rec.seen[hits]
    assert seen.header(b"content-length") == [b"3"] and seen.body == b"abc"
    assert bytes(seen.raw).lower().count(b"content-length") == 1

    replies, _ = exchange(shared.port, b"GET /p/fold HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n"
                          b"Connection: close\r\n\r\n")
    assert replies[0].status in (200, 400)
    if replies[0].status == 200:
        seen = shared.rec.seen[-1]
        assert seen.header(b"x-folded") == [b"a b"]
        assert b"\r\n  b" not in bytes(seen.raw)

    replies, _ = exchange(shared.port, b"GET http://evil.test/p/abs HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\n\r\n")
    assert replies[0].status == 200
    seen = shared.rec.seen[-1]
    assert seen.target == b"/abs" and seen.header(b"host") == [f"127.0.0.1:{shared.rec.port}".encode()]
    shared.serving()


def test_bodies_over_client_max_body_size_on_a_proxied_route(shared):
    """413 before anything is forwarded when Content-Length says so; a chunked body is cut
    at the limit (nginx logs both at [error]); either way the upstream gets no request."""
    mark = len(shared.gw.log_text())
    hits = len(shared.rec.seen)
    replies, closed = exchange(shared.port, POST_P + b"Content-Length: 5000\r\n\r\n" + b"x" * 5000)
    assert replies[0].status == 413 and closed
    assert len(shared.rec.seen) == hits

    chunk = b"400\r\n" + b"c" * 1024 + b"\r\n"
    replies, closed = exchange(shared.port, POST_P + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3
                               + b"0\r\n\r\n")
    assert replies[0].status == 413 and closed
    time.sleep(0.2)
    assert len(shared.rec.seen) == hits, "a cut chunked body must not reach the upstream as complete"

    # a chunk size beyond any limit: refused, or closed when the body stops coming
    began = time.monotonic()
    replies, closed = exchange(shared.port, POST_P + b"Transfer-Encoding: chunked\r\n\r\n"
                               b"ffffffffffffffffffff\r\nabc", timeout=5)
    assert closed and (not replies or replies[0].status in (400, 408, 413))
    assert time.monotonic() - began < 3.5
    lines = new_lines(shared.gw, mark)
    assert sum("[error]" in line and "too large" in line for line in lines) == 2, lines
    assert len(shared.rec.seen) == hits
    replies, _ = exchange(shared.port, POST_P + b"Content-Length: 1000\r\nConnection: close\r\n\r\n" + b"y" * 1000)
    assert replies[0].status == 200 and shared.rec.seen[-1].body == b"y" * 1000
    shared.serving()


# -- slow clients ----------------------------------------------------------------------------


def test_slowloris_headers_are_cut_at_client_header_timeout(shared):
    """Ten clients trickling a head one byte at a time are closed once client_header_timeout
    (1s, for the whole head) runs out, however often they send; others are served meanwhile."""
    mark = len(shared.gw.log_text())
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200
    socks = [socket.create_connection(("127.0.0.1", shared.port)) for _ in range(10)]
    began = time.monotonic()
    closed_at: dict[int, float] = {}
    sent = 0
    try:
        while len(closed_at) < len(socks) and time.monotonic() - began < 4:
            for i, sock in enumerate(socks):
                if i in closed_at:
                    continue
                try:
                    sock.send(head[sent:sent + 1])
                except OSError:
                    closed_at[i] = time.monotonic() - began
                    continue
                ready, _, _ = select.select([sock], [], [], 0)
                if ready:
                    try:
                        data = sock.recv(100)
                    except OSError:
                        data = b""
                    assert data == b"", data
                    closed_at[i] = time.monotonic() - began
            sent += 1
            if sent == 3:
                reply = get(shared.port, "/pid", timeout=1)
                assert reply.body == str(shared.pid).encode()
            time.sleep(0.1)
    finally:
        for sock in socks:
            sock.close()
    assert len(closed_at) == len(socks), closed_at
    assert all(0.8 < t < 3.0 for t in closed_at.values()), closed_at
    lines = new_lines(shared.gw, mark)
    assert sum("[info]" in line and "while reading client request headers" in line for line in lines) == 10
    assert not [line for line in lines if SEVERE.search(line)], lines
    shared.serving()


@pytest.mark.parametrize("path", ["/", "/p/slow-body"])
def test_a_body_that_stops_coming_gets_408_or_a_close(shared, path):
    """client_body_timeout bounds a body that stalls, on a return and on a proxied route;
    the upstream side of a proxied one is let go too."""
    mark = len(shared.gw.log_text())
    hits = len(shared.rec.seen)
    with socket.create_connection(("127.0.0.1", shared.port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode() + b"0123456789")
        began = time.monotonic()
        replies, closed = read_replies(sock, timeout=5)
        took = time.monotonic() - began
    if path == "/":  # answered at once (nothing reads the body), then dropped while it stalls
        assert replies[0].status == 200
    else:
        assert closed and (not replies or replies[0].status == 408), replies
        assert 0.8 < took < 3.0, took
        lines = new_lines(shared.gw, mark)
        assert any("[info]" in line and "while reading client request body" in line for line in lines), lines
        assert len(shared.rec.seen) == hits  # the upstream never got a whole request
    shared.serving()


def test_a_reader_that_never_reads_is_closed_by_send_timeout(shared):
    """A client that asks for 64 MB and never reads: after send_timeout (1s) without progress
    the gateway closes both sides; meanwhile everyone else is served at once."""
    mark = len(shared.gw.log_text())
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", shared.port))
    sock.sendall(b"GET /p/big/67108864 HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        for _ in range(5):
            time.sleep(0.3)
            reply = get(shared.port, "/pid", timeout=1)
            assert reply.body == str(shared.pid).encode()
        wait_for(lambda: any("while sending response to client" in line
                             for line in new_lines(shared.gw, mark)), timeout=6)
        settle_fds(shared.pid, shared.base_fds)
        sock.settimeout(5)
        received = 0
        try:
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    break
                received += len(data)
        except ConnectionResetError:
            pass
        assert received < 67108864
    finally:
        sock.close()
    lines = new_lines(shared.gw, mark)
    assert any("[info]" in line and "timed out" in line and "while sending response to client" in line
               for line in lines), lines
    assert not [line for line in lines if SEVERE.search(line)], lines
    shared.serving()


def test_half_closed_clients(shared):
    """A client that shuts its sending side after the request still gets the answers that
    are ready, then a close; mid-head or mid-body it gets a 400 or a close, never a hang."""
    def half(data: bytes, count: int = 1, pause: float = 0.0):
        with socket.create_connection(("127.0.0.1", shared.port)) as sock:
            sock.sendall(data)
            time.sleep(pause)  # (at once, see the connect race below)
            sock.shutdown(socket.SHUT_WR)
            replies, closed = read_replies(sock, count, timeout=4)
            return replies, closed or closes(sock, 4)

    replies, closed = half(b"GET /echo/half HTTP/1.1\r\nHost: x\r\n\r\n")
    assert replies[0].body == b"/echo/half" and closed
    replies, closed = half(b"GET /echo/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /echo/2 HTTP/1.1\r\nHost: x\r\n\r\n", 2)
    assert [r.body for r in replies] == [b"/echo/1", b"/echo/2"] and closed
    replies, closed = half(b"GET /p/slow/0.3 HTTP/1.1\r\nHost: x\r\n\r\n", pause=0.1)
    assert closed and (not replies or replies[0].status == 200)
    replies, closed = half(b"GET / HTTP/1.1\r\nHo")
    assert closed and (not replies or replies[0].status == 400)
    replies, closed = half(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf a body")
    assert closed and (not replies or replies[0].status in (200, 400))
    time.sleep(0.4)  # the slow upstream answers into a request that is gone
    shared.serving()


def send_then_reset(port: int, data: bytes, read: int = 0, wait: float = 0.1) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(data)
    got = 0
    while got < read:
        got += len(sock.recv(65536))
    time.sleep(wait)
    reset(sock)


UPSTREAM_ERRORS = re.compile(r"\[error\] .*(upstream prematurely closed|while reading upstream|"
                             r"while reading response header from upstream)")


def test_reset_connections_mid_request_and_mid_response(shared):
    """RSTs at every stage (in the head, in the body, while the upstream thinks, while the
    response streams) are contained: no worker crash, fds and upstream sockets released,
    the aborted request logged as 499."""
    mark = len(shared.gw.log_text())
    send_then_reset(shared.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: ")
    send_then_reset(shared.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"z" * 10)
    send_then_reset(shared.port, b"GET /p/slow/0.6 HTTP/1.1\r\nHost: x\r\n\r\n", wait=0.3)
    send_then_reset(shared.port, b"GET /p/big/33554432 HTTP/1.1\r\nHost: x\r\n\r\n", read=200000)
    send_then_reset(shared.port, b"GET /echo/reset HTTP/1.1\r\nHost: x\r\n\r\n" * 50, wait=0)
    time.sleep(1.2)  # the slow upstream answers into a dropped request; the access log flushes
    shared.serving()
    lines = new_lines(shared.gw, mark)
    assert not [line for line in lines if SEVERE.search(line) and not UPSTREAM_ERRORS.search(line)], lines
    assert "499 GET /p/slow/0.6" in shared.gw.access_log.read_text()


def test_reset_right_after_the_request_while_the_upstream_connects(fresh):
    """A client that sends a proxied request and resets or half-closes at once: its upstream
    connection is dropped while connecting; the event loop must not trip over it."""
    mark = len(fresh.gw.log_text())
    for _ in range(25):
        send_then_reset(fresh.port, b"GET /p/reset-race HTTP/1.1\r\nHost: x\r\n\r\n", wait=0)
        with socket.create_connection(("127.0.0.1", fresh.port)) as sock:
            sock.sendall(b"GET /p/half-race HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            read_replies(sock, timeout=3)
    time.sleep(0.3)
    fresh.serving()
    assert not [line for line in new_lines(fresh.gw, mark) if SEVERE.search(line)]


# -- floods ------------------------------------------------------------------------------------


def test_pipelined_flood_to_a_return_route_is_answered_in_order(fresh):
    """500 pipelined requests in one write: every one answered, in order, on one connection."""
    requests = b"".join(b"GET /echo/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(500))
    replies, _ = exchange(fresh.port, requests, count=500, timeout=3)
    assert [r.body for r in replies] == [b"/echo/%d" % i for i in range(500)]
    assert "[alert]" not in fresh.gw.log_text()


def test_pipelined_flood_through_the_proxy_is_answered_in_order(shared):
    """200 pipelined requests to a proxied route, and 100 to a return route: all answered in
    order on the same connection, and forwarded in order."""
    requests = b"".join(b"GET /echo/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(100))
    replies, _ = exchange(shared.port, requests, count=100, timeout=10)
    assert [r.body for r in replies] == [b"/echo/%d" % i for i in range(100)]
    hits = len(shared.rec.seen)
    requests = b"".join(b"GET /p/pipe/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(200))
    replies, _ = exchange(shared.port, requests, count=200, timeout=10)
    assert [r.status for r in replies] == [200] * 200
    assert [s.target for s in shared.rec.seen[hits:]] == [b"/pipe/%d" % i for i in range(200)]
    shared.serving()


def test_many_connections_at_once(shared):
    """200 simultaneous connections, each with a request: all answered, all released."""
    socks = []
    try:
        for i in range(200):
            sock = socket.create_connection(("127.0.0.1", shared.port))
            sock.sendall(b"GET /echo/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % i)
            socks.append(sock)
        for i, sock in enumerate(socks):
            replies, closed = read_replies(sock, timeout=10)
            assert replies[0].body == b"/echo/%d" % i and closed
    finally:
        for sock in socks:
            sock.close()
    shared.serving()


FLOOD_CONF = """
events { worker_connections 20; }
http {
    keepalive_timeout 30s;
    server {
        listen 127.0.0.1:{port};
        location / { return 200 "$pid"; }
    }
}
"""


def test_more_connections_than_worker_connections(gateway):
    """With 20 connections held, new ones wait in the listen queue (never a reset); the
    held ones are served as before; when they go, the waiting ones are served."""
    gateway.start(FLOOD_CONF)
    pid = gateway.worker_pids()[0]
    get(gateway.port)
    base = settle_fds(pid, fds(pid))
    held = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_replies(sock)[0][0].status == 200
        held.append(sock)
    waiting = []
    for _ in range(10):
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        waiting.append(sock)
    time.sleep(0.5)
    assert not select.select(waiting, [], [], 0)[0], "a connection beyond worker_connections was served"
    for sock in held:  # existing connections are unharmed
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        replies, closed = read_replies(sock, timeout=2)
        assert replies[0].body == str(pid).encode() and not closed
    assert fds(pid) <= base + 20
    for sock in held:
        sock.close()
    for sock in waiting:
        replies, closed = read_replies(sock, timeout=5)
        assert replies[0].status == 200 and closed
        sock.close()
    assert "[warn]" in gateway.log_text() and "20 worker_connections are not enough" in gateway.log_text()
    settle_fds(pid, base)
    assert get(gateway.port).body == str(pid).encode()
    assert gateway.worker_pids() == [pid]


def test_emfile_at_accept_backs_off_and_serves_on(gateway):
    """Out of file descriptors: accept() fails (logged), the worker backs off instead of
    spinning, and serves again once descriptors are free."""
    gateway.allowed_errors.append(r"accept\(\) failed \(24: Too many open files\)")
    gateway.start(FLOOD_CONF.replace("worker_connections 20", "worker_connections 1000")
                  .replace("events {", "worker_rlimit_nofile 48;\nevents {"))
    pid = gateway.worker_pids()[0]
    get(gateway.port)
    base = settle_fds(pid, fds(pid))
    socks = []
    try:
        for _ in range(80):
            socks.append(socket.create_connection(("127.0.0.1", gateway.port)))
        wait_for(lambda: "Too many open files" in gateway.log_text(), timeout=5)
        for sock in socks[:5]:
            sock.close()
        socks = socks[5:]
        cpu = sum(map(int, open(f"/proc/{pid}/stat").read().split()[13:15]))
        time.sleep(1.0)
        spent = sum(map(int, open(f"/proc/{pid}/stat").read().split()[13:15])) - cpu
        assert spent < 50, f"{spent} ticks of CPU in 1s while out of fds: the accept loop spins"
    finally:
        for sock in socks:
            sock.close()
    settle_fds(pid, base, timeout=8)
    wait_for(lambda: get(gateway.port, timeout=2).body == str(pid).encode(), timeout=5)
    assert gateway.worker_pids() == [pid]
