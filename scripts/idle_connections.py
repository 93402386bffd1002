"""How many idle keep-alive connections forkgw holds, and what each one costs in memory.

Starts forkgw (2 workers by default) in a temp prefix, opens N connections to it
from this process, sends one request on each so every connection is a live
keep-alive connection owned by a worker, then checks they all still answer and
reports the workers' RSS before and after, per connection.  Loopback only.

    python scripts/idle_connections.py [--connections 10000] [--workers 2]
"""

from __future__ import annotations

import argparse
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def workers_of(master: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def exchange(conns: list[socket.socket], timeout: float = 30.0) -> int:
    """Send one request on every connection and read one response each; returns the failures."""
    sel = selectors.DefaultSelector()
    for sock in conns:
        sock.sendall(REQUEST)
        sel.register(sock, selectors.EVENT_READ, bytearray())
    pending, failures = len(conns), 0
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            data = key.fileobj.recv(4096)
            buf = key.data
            if not data:
                failures += 1
            else:
                buf += data
                if not buf.endswith(b"ok"):
                    continue
            sel.unregister(key.fileobj)
            pending -= 1
    return failures + pending


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    need = args.connections + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), max(hard, need)))
    port = free_port()
    prefix = Path(tempfile.mkdtemp(prefix="forkgw-idle-"))
    (prefix / "conf").mkdir()
    (prefix / "logs").mkdir()
    (prefix / "conf" / "gateway.conf").write_text(f"""
worker_processes {args.workers};
worker_rlimit_nofile {need};
error_log logs/error.log warn;
events {{ worker_connections {need}; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ return 200 ok; }} }}
}}
""")
    proc = subprocess.Popen([sys.executable, "-m", "forkgw", "-p", str(prefix), "-c", "conf/gateway.conf"],
                            cwd=ROOT)
    conns: list[socket.socket] = []
    try:
        time.sleep(1.5)
        workers = workers_of(proc.pid)
        before = sum(rss_kb(w) for w in workers)
        start = time.monotonic()
        for _ in range(args.connections):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        failed_first = exchange(conns)
        opened = time.monotonic() - start
        time.sleep(1.0)
        after = sum(rss_kb(w) for w in workers)
        failed_again = exchange(conns)  # every idle connection still alive and answering
        per_conn = (after - before) * 1024 / max(1, args.connections)
        print(f"connections: {args.connections} over {len(workers)} workers, opened and used in {opened:.1f}s")
        print(f"failed: {failed_first} on the first request, {failed_again} on the second (after idling)")
        print(f"worker RSS: {before / 1024:.1f} MB before, {after / 1024:.1f} MB after, "
              f"{per_conn / 1024:.1f} KB per idle keep-alive connection")
        return 0 if failed_first == 0 and failed_again == 0 else 1
    finally:
        for sock in conns:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
