"""Soak: minutes of mixed traffic against a real forkgw, reloaded on a timer, with bad clients.

Why it is built this way:
- forkgw runs from a temp prefix with a conf of its own: `return` routes, a route
  filtered by the add_header plugin, and proxied routes (one filtered) to a small
  keep-alive backend this script starts; the backend closes idle connections after a
  second, so an idle gateway holds no pooled socket and fd counts compare exactly.
- Good clients (threads) mix keep-alive, fresh connections, pipelining, bodies and
  every route, and check each answer (status, body, the filter's header).  Requests a
  reused keep-alive connection left unanswered when the server closed it between two
  answers (a reload retiring the worker that held it) are sent again on a new
  connection, as HTTP clients do (RFC 9112 9.3.1); every other error is a failure.
- A bad client injects malformed requests, binary noise, slowloris heads, resets,
  oversized bodies and header bombs; each must get its 4xx or its close in time (an
  unexpected outcome is a failure too), and none counts as a request.
- The master gets a HUP every --reload-every seconds; each reload must bring a new
  generation to serving.
- Worker RSS and the fds of master and workers are read from /proc while the gateway
  is idle (traffic paused, connections closed): after the warm-up, and at the end.  Exit status 1 if a request failed, if any
  fd count grew, or if worker RSS grew by more than 5%.

    python scripts/soak.py                       # 2 minutes, 2 workers, a reload a minute
    python scripts/soak.py --minutes 10 --workers 4 --reload-every 30
    python scripts/soak.py --short               # 20 s, a reload every 5 s (the CI form)
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h11

REPO = Path(__file__).resolve().parent.parent
RSS_LIMIT = 0.05

CONF = """
worker_processes {workers};
pid logs/forkgw.pid;
error_log logs/error.log notice;
worker_shutdown_timeout 10s;
wasm {{ module add_header {plugins}/add_header; }}
events {{ worker_connections 1024; }}
http {{
    access_log logs/access.log combined;
    keepalive_timeout 30s;
    client_header_timeout 2s;
    client_body_timeout 2s;
    client_max_body_size 64k;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "hello\\n"; }}
        location /t {{ return 200 "filtered"; proxy_wasm add_header 'soak'; }}
        location /api/ {{ proxy_pass http://backend; proxy_wasm add_header 'soak'; }}
        location /raw/ {{ proxy_pass http://backend/; }}
    }}
}}
"""


# -- the backend ------------------------------------------------------------------------


class Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 1.0  # idle keep-alive connections close after a second

    def log_message(self, *args):
        pass

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (socket.timeout, ConnectionError):
            self.close_connection = True

    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer(f"backend {self.path}".encode())

    def do_POST(self):
        size = int(self.headers.get("content-length") or 0)
        data = self.rfile.read(size)
        self.answer(str(len(data)).encode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- one HTTP/1.1 connection -----------------------------------------------------------


class Closed(Exception):
    """The server closed before the first byte of an answer."""


class Lost(Exception):
    """A new connection closed before the first byte of its answer."""


class Conn:
    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.used = 0
        self.closing = False  # the server ends the connection after the answers it gave

    def exchange(self, requests: list[tuple[str, str, bytes]]) -> list[tuple[int, dict, bytes]]:
        """Send the requests pipelined; return the answers (status, headers, body) given.

        Fewer answers than requests: the server closed the connection between two answers
        (RFC 9112 9.3.2: the client retries the rest).  A close inside an answer raises.
        """
        wire = b""
        for method, path, body in requests:
            head = f"{method} {path} HTTP/1.1\r\nHost: soak\r\n"
            if body:
                head += f"Content-Length: {len(body)}\r\n"
            wire += head.encode() + b"\r\n" + body
        try:
            self.sock.sendall(wire)
        except (BrokenPipeError, ConnectionResetError):
            raise Closed("send failed")
        parser = h11.Connection(h11.CLIENT)
        answers = []
        for method, _, _ in requests:
            parser.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
            parser.send(h11.EndOfMessage())
            status, headers, body = 0, {}, b""
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = self.sock.recv(65536)
                    except ConnectionResetError:
                        data = b""
                    if not data and parser.their_state is h11.SEND_RESPONSE and not parser.trailing_data[0]:
                        self.closing = True  # closed between two answers
                        if not answers:
                            raise Closed("closed before answering")
                        self.used += len(answers)
                        return answers
                    parser.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
            answers.append((status, headers, body))
            if parser.their_state is h11.DONE:
                parser.start_next_cycle()
            else:
                self.closing = True
                break
        self.used += len(answers)
        return answers

    def close(self) -> None:
        self.sock.close()


# -- good clients ------------------------------------------------------------------------


def check(path: str, method: str, sent: bytes, answer) -> str | None:
    status, headers, body = answer
    if status != 200:
        return f"{method} {path}: status {status}"
    if path == "/":
        ok = body == b"hello\n"
    elif path.startswith("/t"):
        ok = body == b"filtered" and headers.get("hello") == "soak"
    elif path.startswith("/api/"):
        want = str(len(sent)).encode() if method == "POST" else f"backend {path}".encode()
        ok = body == want and headers.get("hello") == "soak"
    else:
        ok = body == f"backend {path[4:]}".encode()
    return None if ok else f"{method} {path}: unexpected answer {headers} {body[:80]!r}"


class Client(threading.Thread):
    def __init__(self, port: int, seed: int, stats: "Stats"):
        super().__init__(daemon=True)
        self.port = port
        self.rng = random.Random(seed)
        self.stats = stats
        self.running = True
        self.paused = threading.Event()
        self.conn: Conn | None = None

    def pick(self) -> list[tuple[str, str, bytes]]:
        i = self.rng.randrange(1 << 30)
        kind = self.rng.random()
        if kind < 0.25:
            return [("GET", "/", b"")]
        if kind < 0.45:
            return [("GET", f"/t/{i}", b"")]
        if kind < 0.70:
            return [("GET", f"/api/item/{i}?q={i % 7}", b"")]
        if kind < 0.80:
            return [("GET", f"/raw/thing/{i}", b"")]
        if kind < 0.90:
            return [("POST", "/api/echo", os.urandom(self.rng.randrange(1, 8192)))]
        return [("GET", f"/t/pipe/{i}/{n}", b"") if n % 2 else ("GET", f"/api/pipe/{i}/{n}", b"")
                for n in range(self.rng.randrange(2, 8))]

    def run(self) -> None:
        while self.running:
            if self.paused.is_set():
                self.drop()
                time.sleep(0.05)
                continue
            requests = self.pick()
            fresh = self.rng.random() < 0.3
            if fresh:
                self.drop()
            try:
                answers = self.send(requests)
            except Lost as err:
                self.stats.lost(f"{requests[0][0]} {requests[0][1]}: {err}")
                self.drop()
                continue
            except Exception as err:  # noqa: BLE001 - every client error is a failure
                self.stats.fail(f"{requests[0][0]} {requests[0][1]}: {err!r}")
                self.drop()
                continue
            for (method, path, body), answer in zip(requests, answers):
                problem = check(path, method, body, answer)
                if problem:
                    self.stats.fail(problem)
                else:
                    self.stats.ok(path, len(requests) > 1, fresh)
            if fresh:
                self.drop()
        self.drop()

    def send(self, requests):
        reused = self.conn is not None and self.conn.used > 0
        if self.conn is None:
            self.conn = Conn(self.port)
        try:
            answers = self.conn.exchange(requests)
        except Closed as err:
            self.drop()
            if not reused:
                raise Lost(str(err)) from None
            self.stats.retry()
            self.conn = Conn(self.port)
            try:
                answers = self.conn.exchange(requests)
            except Closed as err:
                raise Lost(str(err)) from None
        if self.conn.closing:  # the server ends the connection after these answers
            self.drop()
        if len(answers) < len(requests):  # the rest were never answered: send them again
            self.stats.retry()
            answers += self.send(requests[len(answers):])
        return answers

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# -- the bad client ------------------------------------------------------------------------


def rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def first_status(sock: socket.socket, timeout: float) -> int | None:
    """The status of the first answer, or None if the server closed without one."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
    except ConnectionResetError:
        return None
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    return int(match.group(1)) if match else -1


class BadClient(threading.Thread):
    """Injects the abuse a gateway meets on the internet; checks each gets its 4xx or close."""

    def __init__(self, port: int, seed: int, stats: "Stats"):
        super().__init__(daemon=True)
        self.port = port
        self.rng = random.Random(seed)
        self.stats = stats
        self.running = True
        self.paused = threading.Event()
        self.slow: list[tuple[socket.socket, float]] = []

    def run(self) -> None:
        while self.running:
            self.reap_slow()
            if self.paused.is_set():
                time.sleep(0.05)
                continue
            kind = self.rng.choice(["malformed", "noise", "slowloris", "reset", "oversize", "header-bomb"])
            try:
                problem = getattr(self, kind.replace("-", "_"))()
            except OSError as err:
                problem = f"{kind}: {err!r}"
            self.stats.injected(kind, problem)
            time.sleep(self.rng.uniform(0.05, 0.15))
        for sock, _ in self.slow:
            sock.close()

    def expect(self, data: bytes, statuses: set, kind: str) -> str | None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(data)
            status = first_status(sock, 5)
        return None if status in statuses else f"{kind}: answered {status}, expected {sorted(statuses, key=str)}"

    def malformed(self):
        line = self.rng.choice([b"GET / HTTP/1.1 junk", b"G(T / HTTP/1.1", b"GET /a b HTTP/1.1", b"GET /"])
        return self.expect(line + b"\r\nHost: x\r\n\r\n", {400}, "malformed")

    def noise(self):
        data = bytes(self.rng.randrange(1, 256) for _ in range(self.rng.randrange(16, 512)))
        return self.expect(data.replace(b" ", b"_") + b"\r\n\r\n", {400, None}, "noise")

    def slowloris(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        self.slow.append((sock, time.monotonic() + 4.0))  # client_header_timeout is 2s
        return None

    def reap_slow(self) -> None:
        now = time.monotonic()
        for sock, deadline in list(self.slow):
            sock.setblocking(False)
            try:
                closed = sock.recv(4096) == b""
            except BlockingIOError:
                closed = False
            except ConnectionResetError:
                closed = True
            if closed:
                self.slow.remove((sock, deadline))
                sock.close()
            elif now > deadline:
                self.slow.remove((sock, deadline))
                sock.close()
                self.stats.injected("slowloris", "slowloris: still open after client_header_timeout")

    def reset(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(self.rng.choice([b"GET / HTTP/1.1\r\nHo", b"POST / HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Length: 1000\r\n\r\npartial"]))
        time.sleep(0.01)
        rst(sock)
        return None

    def oversize(self):
        return self.expect(b"POST /api/big HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 4096,
                           {413}, "oversize")

    def header_bomb(self):
        return self.expect(b"GET / HTTP/1.1\r\nHost: x\r\nX-Bomb: " + b"b" * 20000 + b"\r\n\r\n",
                           {431, 400}, "header-bomb")


# -- counting --------------------------------------------------------------------------------


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.failures: list[str] = []
        self.retries = 0
        self.kinds = {"keep-alive": 0, "fresh": 0, "pipelined": 0, "proxied": 0, "filtered": 0}
        self.bad = 0
        self.bad_by_kind: dict[str, int] = {}
        self.lost_at: list[tuple[float, str]] = []
        self.reloads: list[tuple[float, float]] = []  # (HUP sent, new generation serving)

    def ok(self, path: str, pipelined: bool, fresh: bool) -> None:
        with self.lock:
            self.requests += 1
            self.kinds["fresh" if fresh else "keep-alive"] += 1
            self.kinds["pipelined"] += pipelined
            self.kinds["proxied"] += path.startswith(("/api/", "/raw/"))
            self.kinds["filtered"] += path.startswith(("/t", "/api/"))

    def fail(self, why: str) -> None:
        with self.lock:
            self.requests += 1
            self.failures.append(why)

    def lost(self, what: str) -> None:
        with self.lock:
            self.requests += 1
            self.lost_at.append((time.monotonic(), what))

    def during_reload(self) -> tuple[list[str], list[str]]:
        """Lost requests split: (around a reload, at any other time)."""
        near, other = [], []
        for at, what in self.lost_at:
            hit = any(start - 0.5 <= at <= end + 1.0 for start, end in self.reloads)
            (near if hit else other).append(what)
        return near, other

    def retry(self) -> None:
        with self.lock:
            self.retries += 1

    def injected(self, kind: str, problem: str | None) -> None:
        with self.lock:
            if problem:
                self.failures.append(f"bad client {problem}")
            else:
                self.bad += 1
                self.bad_by_kind[kind] = self.bad_by_kind.get(kind, 0) + 1


# -- the gateway ---------------------------------------------------------------------------


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return -1


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def children(pid: int) -> list[tuple[int, str]]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [(int(line.split()[0]), line.split(None, 1)[1]) for line in out.splitlines() if line.strip()]


class Gateway:
    def __init__(self, prefix: Path, workers: int, backend: int):
        self.prefix = prefix
        self.workers = workers
        self.port = free_port()
        (prefix / "conf").mkdir(parents=True)
        (prefix / "logs").mkdir()
        (prefix / "conf" / "gateway.conf").write_text(CONF.format(
            workers=workers, plugins=REPO / "plugins", backend=backend, port=self.port))
        self.log = prefix / "logs" / "error.log"
        self.proc: subprocess.Popen | None = None
        self.generation = 1

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "forkgw", "-p", str(self.prefix), "-c", "conf/gateway.conf"],
                                     cwd=self.prefix, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.wait_serving(1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_serving(self, generation: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while f"generation {generation} serving" not in self.log_text():
            if self.proc.poll() is not None:
                raise SystemExit(f"forkgw exited {self.proc.returncode}: {self.proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"generation {generation} not serving after {timeout}s")
            time.sleep(0.05)

    def reload(self) -> None:
        self.generation += 1
        self.proc.send_signal(signal.SIGHUP)
        self.wait_serving(self.generation)

    def settle(self, timeout: float = 15.0) -> list[int]:
        """Worker pids once exactly `workers` serve and no retiring one is left."""
        deadline = time.monotonic() + timeout
        while True:
            kids = children(self.proc.pid)
            if len(kids) == self.workers and all(title.endswith("worker process") for _, title in kids):
                return sorted(pid for pid, _ in kids)
            if time.monotonic() > deadline:
                raise SystemExit(f"workers did not settle: {kids}")
            time.sleep(0.1)

    def snapshot(self) -> dict:
        workers = self.settle()
        return {
            "master_fds": fds(self.proc.pid),
            "master_rss": rss_kb(self.proc.pid),
            "worker_fds": [fds(pid) for pid in workers],
            "worker_rss": [rss_kb(pid) for pid in workers],
        }

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the run -------------------------------------------------------------------------------


def idle(clients, seconds: float = 3.0) -> None:
    """Stop the traffic and let every connection close (keep-alive, pooled, lingering)."""
    for client in clients:
        client.paused.set()
    time.sleep(seconds)


def resume(clients) -> None:
    for client in clients:
        client.paused.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reload-every", type=float, default=60.0, help="seconds between HUPs")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--short", action="store_true", help="~20 s with a reload every 5 s (for CI)")
    parser.add_argument("--workdir", help="the gateway's prefix goes in a temp folder under it")
    parser.add_argument("--keep", action="store_true", help="keep the prefix (conf, logs) afterwards")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tolerate-drain-closes", action="store_true",
                        help="do not count as failures the requests of new connections a retiring worker closed "
                             "unanswered around a reload (reported as lost either way)")
    args = parser.parse_args(argv)
    warmup = 3.0 if args.short else 10.0
    duration = 17.0 if args.short else args.minutes * 60  # of measured traffic, after the warm-up
    reload_every = 5.0 if args.short else args.reload_every
    reloads_due = int(duration // reload_every) if reload_every > 0 else 0

    backend = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    backend.daemon_threads = True
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    prefix = Path(tempfile.mkdtemp(prefix="forkgw-soak-", dir=args.workdir))
    gateway = Gateway(prefix, args.workers, backend.server_address[1])
    stats = Stats()
    clients: list = []
    reloads = 0
    try:
        gateway.start()
        clients = [Client(gateway.port, args.seed * 1000 + i, stats) for i in range(args.clients)]
        clients.append(BadClient(gateway.port, args.seed, stats))
        print(f"soak: {warmup:g}s of warm-up then {duration:g}s, {args.workers} workers, "
              f"a reload every {reload_every:g}s, "
              f"{args.clients} clients and a bad one, prefix {prefix}", flush=True)
        for client in clients:
            client.start()
        time.sleep(warmup)
        idle(clients)
        start = gateway.snapshot()
        resume(clients)
        began = time.monotonic()
        for n in range(1, reloads_due + 1):  # the last one may fall on the very end: fine, it is measured
            time.sleep(max(0.0, began + n * reload_every - time.monotonic()))
            hup = time.monotonic()
            gateway.reload()
            stats.reloads.append((hup, time.monotonic()))
            reloads += 1
        time.sleep(max(0.0, began + duration - time.monotonic()))
        idle(clients)
        end = gateway.snapshot()
    finally:
        for client in clients:
            client.running = False
            client.paused.clear()
        for client in clients:
            client.join(10)
        gateway.stop()
        backend.shutdown()

    log = gateway.log_text()
    severe = re.findall(r"\[(alert|crit|emerg)\]", log)
    worker_rss = (sum(start["worker_rss"]), sum(end["worker_rss"]))
    growth = (worker_rss[1] - worker_rss[0]) / worker_rss[0] if worker_rss[0] else 0.0
    fd_growth = (end["master_fds"] - start["master_fds"]) + (sum(end["worker_fds"]) - sum(start["worker_fds"]))
    kinds = ", ".join(f"{k} {v}" for k, v in stats.kinds.items())
    print(f"requests: {stats.requests} ({kinds})")
    near, other = stats.during_reload()
    failures = stats.failures + [f"lost: {what}" for what in other]
    if not args.tolerate_drain_closes:
        failures += [f"lost around a reload: {what}" for what in near]
    print(f"failures: {len(failures)}")
    for failure in failures[:20]:
        print(f"  {failure}")
    print(f"lost: {len(near) + len(other)} requests on new connections closed without an answer "
          f"({len(near)} around a reload)")
    injected = ", ".join(f"{k} {v}" for k, v in sorted(stats.bad_by_kind.items()))
    print(f"injected: {stats.bad} bad requests, all answered as expected ({injected})")
    print(f"retries: {stats.retries} (keep-alive connections a reload closed before answering everything)")
    print(f"reloads: {reloads}")
    print(f"worker rss: start {worker_rss[0]} kB, end {worker_rss[1]} kB ({growth:+.1%}); "
          f"master rss: start {start['master_rss']} kB, end {end['master_rss']} kB")
    print(f"fds: master start {start['master_fds']} end {end['master_fds']}; "
          f"workers start {start['worker_fds']} end {end['worker_fds']}")
    print(f"error log: {len(severe)} alert/crit/emerg lines")
    problems = []
    if failures:
        problems.append(f"{len(failures)} failures")
    if fd_growth > 0:
        problems.append(f"fds grew by {fd_growth}")
    if growth > RSS_LIMIT:
        problems.append(f"worker RSS grew {growth:.1%} (limit {RSS_LIMIT:.0%})")
    print("result: " + ("FAIL (" + "; ".join(problems) + ")" if problems else "ok"))
    if not args.keep:
        shutil.rmtree(prefix, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
