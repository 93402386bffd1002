"""Test harness: the real forkgw process in a temp prefix, real upstream servers.

`gateway(conf)` writes a conf (main-context defaults first, then the text the
test gives, with `{port}`-style placeholders filled by free ports), starts
`python -m forkgw` on it, waits until every worker of the first generation is
serving, and at teardown stops it and asserts that the error log holds no
`[alert]`, `[crit]` or `[emerg]` line the test did not expect.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from forkgw.conf import load

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


class Gateway:
    MAIN_DEFAULTS = {
        "worker_processes": "1",
        "pid": "logs/forkgw.pid",
        "error_log": "logs/error.log info",
        "worker_shutdown_timeout": "5s",
    }

    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.ports: dict[str, int] = {"port": self.port}
        self.allowed_errors: list[str] = []

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    @property
    def access_log(self) -> Path:
        return self.prefix / "logs" / "access.log"

    def log_text(self) -> str:
        return self.error_log.read_text() if self.error_log.exists() else ""

    def write_conf(self, body: str, **main) -> Path:
        settings = dict(self.MAIN_DEFAULTS)
        settings.update({k: str(v) for k, v in main.items()})
        head = "".join(f"{k} {v};\n" for k, v in settings.items() if v is not None)
        for name in re.findall(r"\{(\w+)\}", body):
            if name not in self.ports and name.endswith("port"):
                self.ports[name] = free_port()
        text = head + body.replace("{plugins}", str(PLUGINS))
        for name, value in self.ports.items():
            text = text.replace("{" + name + "}", str(value))
        path = self.prefix / "conf" / "gateway.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.prefix / "logs").mkdir(exist_ok=True)
        path.write_text(text)
        return path

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "forkgw", "-p", str(self.prefix), "-c", "conf/gateway.conf", *args]

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=60, cwd=self.prefix)

    def start(self, body: str, workers: int = 1, wait: bool = True, **main) -> "Gateway":
        self.write_conf(body, worker_processes=workers, **main)
        self.proc = subprocess.Popen(self.command(), cwd=self.prefix, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        if wait:
            self.wait_serving(1)
        return self

    def wait_serving(self, generation: int, timeout: float = 20.0) -> None:
        needle = f"generation {generation} serving"

        def ready():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"forkgw exited {self.proc.returncode}: {err}\n{self.log_text()}")
            return needle in self.log_text()

        wait_for(ready, timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return [int(line.split()[0]) for line in out.splitlines() if "worker process" in line]

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("forkgw did not stop on SIGTERM within 15s")

    def bad_log_lines(self) -> list[str]:
        bad = []
        for line in self.log_text().splitlines():
            if re.search(r"\[(alert|crit|emerg)\]", line) and not any(
                    re.search(p, line) for p in self.allowed_errors):
                bad.append(line)
        return bad

    # -- talking to it ------------------------------------------------------------

    def request(self, method: str = "GET", path: str = "/", headers: dict | None = None,
                body: bytes | None = None, port: int | None = None, timeout: float = 10.0, conn=None):
        """(status, lower-cased headers, body); `conn`: a keep-alive connection to reuse, left open."""
        import http.client

        own = conn is None
        if own:
            conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            if own:
                conn.close()

    def write_filters(self, **modules: bytes) -> Path:
        """NAME.wasm files in the prefix's filters/ folder, for `module` lines: the folder."""
        folder = self.prefix / "filters"
        folder.mkdir(exist_ok=True)
        for name, data in modules.items():
            (folder / f"{name}.wasm").write_bytes(data)
        return folder

    def raw(self, data: bytes, port: int | None = None, timeout: float = 5.0, shut: bool = False) -> bytes:
        """Send bytes, read until the server closes (or the timeout): for malformed input."""
        with socket.create_connection(("127.0.0.1", port or self.port), timeout=timeout) as s:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
            chunks = []
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except socket.timeout:
                pass
            return b"".join(chunks)


@pytest.fixture
def gateway(tmp_path):
    gw = Gateway(tmp_path)
    yield gw
    gw.stop()
    bad = gw.bad_log_lines()
    assert not bad, "error log has alert/crit/emerg lines:\n" + "\n".join(bad)


# -- a real upstream server ---------------------------------------------------------


class EchoHandler(BaseHTTPRequestHandler):
    """Answers with what it received, so tests can see what the gateway forwarded.

    Paths: /slow/SECONDS sleeps first; /big/BYTES answers that many bytes;
    /chunked/N answers N chunks (/trailers: 2 chunks, then trailers); /close
    answers a head then cuts the connection; /status/CODE answers that status;
    anything else echoes as JSON (request trailers included).
    """

    protocol_version = "HTTP/1.1"
    server_version = "echo"

    def log_message(self, *args):
        pass

    def body(self) -> bytes:
        self.trailers = []
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                        name, _, value = line.decode("latin-1").partition(":")
                        self.trailers.append([name.strip().lower(), value.strip()])
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def handle_any(self):
        body = self.body()
        self.server.hits.append((self.command, self.path, self.client_address[1]))
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[0] == "slow":
            time.sleep(float(parts[1]))
        if parts[0] == "big":
            size = int(parts[1])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = b"x" * 65536
            left = size
            while left > 0:
                self.wfile.write(block[: min(left, len(block))])
                left -= len(block)
            return
        if parts[0] in ("chunked", "trailers"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(int(parts[1]) if parts[0] == "chunked" else 2):
                chunk = f"chunk {i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            tail = b"x-checksum: abc\r\nx-upstream-trailer: 1\r\n" if parts[0] == "trailers" else b""
            self.wfile.write(b"0\r\n" + tail + b"\r\n")
            return
        if parts[0] == "close":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"partial")
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status = int(parts[1]) if parts[0] == "status" else 200
        payload = json.dumps({
            "method": self.command,
            "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
            "trailers": self.trailers,
            "port": self.server.server_address[1],
        }).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Upstream", "echo")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = handle_any


class Upstream:
    def __init__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
        self.server.daemon_threads = True
        self.server.hits = []
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def hits(self):
        return self.server.hits

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    up = Upstream()
    yield up
    up.close()


@pytest.fixture
def upstream2():
    up = Upstream()
    yield up
    up.close()


# -- conf files for the parser's unit tests ------------------------------------------


class ConfDir:
    """A temp prefix laid out like nginx's: PREFIX/conf/gw.conf, PREFIX/logs/..."""

    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.main = prefix / "conf" / "gw.conf"

    def write(self, text: str, name: str = "conf/gw.conf") -> Path:
        path = self.prefix / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def load(self, text: str, **kwargs):
        self.write(text)
        return load(str(self.main), **kwargs)

    def http(self, text: str):
        """Load `http { TEXT }` and return the Http."""
        return self.load("http {\n" + text + "\n}\n").http

    def where(self, line: int, name: str = "conf/gw.conf") -> str:
        return f"{self.prefix / name}:{line}"


@pytest.fixture
def confdir(tmp_path) -> ConfDir:
    return ConfDir(tmp_path)
