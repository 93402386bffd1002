"""Reload under load: HUP after HUP while clients keep sending requests.

A reload must be invisible to clients: no request fails, each response comes
whole from one conf (its body and its filter header agree), a keep-alive
connection never goes back to an older conf, and once the reload has returned
everyone sees the new conf.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time

from conftest import wait_for

CONF = """
wasm { module add_header {plugins}/add_header; }
http {
    keepalive_timeout 30s;
    server {
        listen 127.0.0.1:{port};
        location / { return 200 "vVERSION"; proxy_wasm add_header 'vVERSION'; }
    }
}
"""

WORKERS = 2
LOAD_SECONDS = 8.0
REQUEST = b"GET / HTTP/1.1\r\nHost: load\r\n\r\n"


class Failure(Exception):
    pass


class Retry(Exception):
    """The server closed a reused idle connection before sending any byte of a response."""


class Client(threading.Thread):
    """Sends requests one after another on keep-alive connections (or a fresh one each time)."""

    def __init__(self, port: int, name: str, fresh: bool = False):
        super().__init__(name=name, daemon=True)
        self.port = port
        self.fresh = fresh
        self.running = True
        self.sock: socket.socket | None = None
        self.conn_id = 0
        self.on_conn = 0  # responses received on the current connection
        self.responses: list[tuple[int, float, float, int, int]] = []  # (conn, sent, done, body v, header v)
        self.failures: list[str] = []
        self.retries = 0

    def run(self) -> None:
        while self.running:
            sent = time.monotonic()
            try:
                try:
                    body, hello, close = self.exchange()
                except Retry:
                    self.retries += 1
                    sent = time.monotonic()
                    body, hello, close = self.exchange()
            except (Failure, Retry, OSError) as err:
                self.failures.append(f"{type(err).__name__}: {err}")
                self.drop()
                continue
            self.responses.append((self.conn_id, sent, time.monotonic(), version(body), version(hello)))
            if close or self.fresh:
                self.drop()

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None

    def exchange(self) -> tuple[bytes, bytes, bool]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            self.conn_id += 1
            self.on_conn = 0
        reused = self.on_conn > 0
        received = b""
        try:
            self.sock.sendall(REQUEST)
            while b"\r\n\r\n" not in received:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError("closed by the server")
                received += chunk
        except (ConnectionResetError, BrokenPipeError) as err:
            if reused and not received:
                self.drop()
                raise Retry(str(err)) from None
            raise Failure(f"connection {self.conn_id} cut after {len(received)} bytes: {err}") from None
        except socket.timeout:
            raise Failure(f"connection {self.conn_id}: no response in 5s") from None
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 200 "):
            raise Failure(f"status line {lines[0]!r}")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"-1"))
        if length < 0:
            raise Failure(f"no content-length in {head!r}")
        while len(body) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Failure(f"connection {self.conn_id} cut in the body after {len(body)} bytes")
            body += chunk
        if len(body) != length:
            raise Failure(f"{len(body) - length} bytes past the body (pipelining was not asked for)")
        self.on_conn += 1
        return body, headers.get(b"hello", b""), headers.get(b"connection", b"").lower() == b"close"


def version(text: bytes) -> int:
    match = re.fullmatch(rb"v(\d+)", text)
    return int(match.group(1)) if match else -1


def test_reload_under_load(gateway, capsys):
    """Six HUPs (one with a broken conf) under keep-alive load: no failure, no mix, no going back."""
    gateway.allowed_errors.append('unknown directive "lisen"')
    gateway.start(CONF.replace("VERSION", "1"), workers=WORKERS)
    clients = [Client(gateway.port, f"keepalive-{i}") for i in range(3)]
    clients.append(Client(gateway.port, "fresh", fresh=True))
    started = time.monotonic()
    for client in clients:
        client.start()

    # (version written, broken?): v1 -> v2 changes the return text and the filter config
    plan = [(2, False), (3, True), (3, False), (4, False), (5, False), (6, False)]
    generation = 1
    waits: list[float] = []
    timeline: list[tuple[float, float, int]] = [(0.0, 0.0, 1)]  # (HUP sent, serving seen, version)
    final_version = 1
    final_at = 0.0
    try:
        time.sleep(0.5)
        for number, (ver, broken) in enumerate(plan, 1):
            text = CONF.replace("VERSION", str(ver))
            if broken:
                text = text.replace("listen ", "lisen ")
            gateway.write_conf(text, worker_processes=WORKERS)
            before = gateway.log_text().count("[emerg]")
            hup = time.monotonic()
            if number == len(plan):
                result = gateway.run("-s", "reload")  # returns once the new generation serves
                assert result.returncode == 0, result.stderr
            else:
                gateway.signal(signal.SIGHUP)
            if broken:
                wait_for(lambda: gateway.log_text().count("[emerg]") > before, 10)
            else:
                generation += 1
                gateway.wait_serving(generation)
                final_version = ver
            final_at = time.monotonic()
            waits.append(final_at - hup)
            timeline.append((hup, final_at, final_version))
            time.sleep(0.6)
        time.sleep(max(0.0, min(1.5, LOAD_SECONDS - (time.monotonic() - started))))
    finally:
        for client in clients:
            client.running = False
        for client in clients:
            client.join(10)
            client.drop()

    responses = [(c.name, *r) for c in clients for r in c.responses]
    failures = [f"{c.name}: {f}" for c in clients for f in c.failures]
    retries = sum(c.retries for c in clients)
    ready = [(int(g), int(w), float(s)) for g, w, s in re.findall(
        r"generation (\d+) serving with (\d+) workers \(ready in ([\d.]+)s\)", gateway.log_text())]
    with capsys.disabled():
        print(f"\nreload under load: {len(responses) + len(failures)} requests sent in "
              f"{time.monotonic() - started:.1f}s by {len(clients)} clients ({WORKERS} workers), "
              f"{len(failures)} failed, {retries} retried on a closed idle keep-alive connection, "
              f"{sum(c.conn_id for c in clients)} connections")
        print("reloads: " + ", ".join(f"gen {g}: {w} workers ready in {s:.3f}s" for g, w, s in ready[1:])
              + "; HUP to serving as seen by the test: "
              + ", ".join(f"{w:.2f}s" + (" (broken conf, rejected)" if broken else "")
                          + (" (-s reload)" if n == len(plan) else "")
                          for n, (w, (_, broken)) in enumerate(zip(waits, plan), 1)))

    assert failures == [], failures[:10]
    mixed = [r for r in responses if r[4] != r[5] or r[4] < 1]
    assert mixed == [], mixed[:10]
    for name, _, sent, done, ver, _ in responses:
        # never a conf not yet signalled; never one older than a reload done 0.2s before the request
        newest = max(v for hup, _, v in timeline if hup < done)
        oldest = max(v for _, serving, v in timeline if serving + 0.2 < sent)
        assert oldest <= ver <= newest, (name, sent, ver, timeline)
    for client in clients:
        per_conn: dict[int, int] = {}
        for conn, _, _, body_v, _ in client.responses:
            assert body_v >= per_conn.get(conn, 0), f"{client.name} connection {conn} went back to v{body_v}"
            per_conn[conn] = body_v
    late = [r for r in responses if r[2] > final_at]
    assert late, "no request after the final reload"
    stale = [r for r in late if r[4] != final_version]
    assert stale == [], stale[:10]
    assert {name for name, *_ in late} == {c.name for c in clients}
    seen = {r[4] for r in responses}
    assert seen == {1, 2, 3, 4, 5, 6}, seen
