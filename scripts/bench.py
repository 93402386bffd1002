"""forkgw beside nginx (the ceiling), a bare h11 loop (the in-language ceiling) and gunicorn.

Why it is built this way:
- Every server runs at once on loopback, idle unless loaded, and wrk loads them
  one at a time in interleaved rounds (A, B, C, A, B, C...), so machine noise
  spreads over all of them instead of landing on one.
- The proxy modes share ONE backend (an nginx `return 200 "ok"`), so only the
  proxy in front differs.
- Besides wrk's req/s and latency, the CPU time of each server's process group
  is read from /proc around every run: "server CPU µs/req" is what a request
  costs the server alone, which is steadier than throughput on a shared machine
  (wrk runs on the same cores).  "other CPU" is the machine's busy time not
  spent by the server, its backend or wrk: when it is high, the run was noisy.
- wrk keeps every connection busy, so its p99 is a saturated server's queue.
  Latency is compared at EQUAL throughput too: `hey` sends a fixed rate (a
  share of forkgw's measured req/s, so that every server sustains it) to
  forkgw, nginx and the bare h11 loop in turn, and the p99 ratios are taken
  from those runs.
- TLS modes: forkgw and nginx serve the same throwaway ECDSA P-256
  certificate, nginx with forkgw's default `ssl_protocols` and `ssl_ciphers`
  spelled out (nginx 1.22's own defaults leave out TLS 1.3).  "tls-return" is
  wrk over https on keep-alive connections; "tls-handshake" is one request
  per connection, each a full handshake.  wrk cannot load that one: with
  `Connection: close` it still resumes its previous session on every new
  connection (it `SSL_clear`s and reuses its SSL objects; the servers'
  `$ssl_session_reused` says "r" for nearly all), so it is loaded with
  `hey -disable-keepalive`, whose Go client keeps no session cache.  Before
  loading, a short hey burst to a logged location proves that none of its
  sessions was resumed.
- Every server starts in its own session and is killed as a group at the end,
  whatever happens.

    python scripts/bench.py                       # all modes, 3 rounds of 5 s
    python scripts/bench.py --duration 2 --rounds 2 --modes forkgw-return,h11-return
    python scripts/bench.py --json bench.json --profile forkgw-return
    python scripts/bench.py --fixed-rate-share 0    # skip the equal-throughput latency runs
    python scripts/bench.py --modes forkgw-return,forkgw-tls-return,forkgw-tls-handshake,nginx-tls-handshake
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "plugins"
CLK_TCK = os.sysconf("SC_CLK_TCK")
TOKEN = "secret"  # what auth_token expects; wrk sends it to every mode alike


# -- modes -------------------------------------------------------------------


@dataclass
class Mode:
    name: str
    label: str
    server: str  # key of the server that answers it
    port: str = "port"  # which of that server's ports
    proxy: bool = False  # loads the shared backend too
    expect_headers: dict = field(default_factory=dict)  # header -> value, checked before loading
    absent_headers: tuple = ()
    expect_body: bytes | None = None
    denied_without_token: bool = False  # proves the auth filter runs: 401 without the header
    tls: bool = False  # https on that port
    handshake: bool = False  # one request per connection, a full TLS handshake each (hey, not wrk)


MODES = [
    Mode("nginx-return", "nginx return 200 (ceiling)", "nginx", "return"),
    Mode("h11-return", "bare h11 loop, return 200", "h11-return"),
    Mode("gunicorn-gthread", "gunicorn gthread, trivial app", "gunicorn-gthread"),
    Mode("gunicorn-sync", "gunicorn sync, trivial app", "gunicorn-sync"),
    Mode("forkgw-return", "forkgw return 200", "forkgw-return"),
    Mode("forkgw-filter", "forkgw return 200 + add_header", "forkgw-filter",
         expect_headers={"hello": "add_header"}),
    Mode("forkgw-chain", "forkgw return 200 + 3 filters", "forkgw-chain",
         expect_headers={"hello": "add_header"}, absent_headers=("x-powered-by",), denied_without_token=True),
    Mode("nginx-proxy", "nginx proxy_pass (proxy ceiling)", "nginx", "proxy", proxy=True, expect_body=b"ok"),
    Mode("h11-proxy", "bare h11 loop, proxy", "h11-proxy", proxy=True, expect_body=b"ok"),
    Mode("forkgw-proxy", "forkgw proxy_pass", "forkgw-proxy", proxy=True, expect_body=b"ok"),
    Mode("forkgw-proxy-filter", "forkgw proxy_pass + add_header", "forkgw-proxy-filter", proxy=True,
         expect_body=b"ok", expect_headers={"hello": "add_header"}),
    Mode("nginx-tls-return", "nginx return 200 over TLS, keep-alive", "nginx", "tls", tls=True),
    Mode("forkgw-tls-return", "forkgw return 200 over TLS, keep-alive", "forkgw-tls", tls=True),
    Mode("nginx-tls-handshake", "nginx full TLS handshake per request", "nginx", "tls", tls=True, handshake=True),
    Mode("forkgw-tls-handshake", "forkgw full TLS handshake per request", "forkgw-tls", tls=True,
         handshake=True),
]
MODE = {m.name: m for m in MODES}


# -- processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apt_install(packages: list[str], **run) -> None:
    """apt-get install, as root or through sudo; update the lists first only if it fails."""
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    run.setdefault("env", dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if subprocess.run(sudo + ["apt-get", "install", "-y", *packages], **run).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update"], check=True, **run)
        subprocess.run(sudo + ["apt-get", "install", "-y", *packages], check=True, **run)


def make_certificate(folder: Path, stem: str, subject: str) -> tuple[Path, Path]:
    """A throwaway self-signed ECDSA P-256 certificate for localhost and 127.0.0.1: (cert, key)."""
    cert, key = folder / f"{stem}.pem", folder / f"{stem}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "2", "-subj", f"/CN={subject}",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return cert, key


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a server started in its own session: `sig` to the leader, then the group is killed."""
    pgid = proc.pid
    if proc.poll() is None:
        try:
            os.kill(pgid, sig)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    for _ in range(50):  # the leader is gone; its workers must follow
        if not group_pids(pgid):
            break
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.wait(5)


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 = state)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields is not None and int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Server:
    """One server's process group: started in its own session, killed as a whole."""

    def __init__(self, name: str, argv: list[str], workdir: Path, ports: dict[str, int],
                 stop_signal: int = signal.SIGTERM, env: dict | None = None, ready_log: tuple | None = None,
                 tls_ports: tuple = ()):
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.ports = ports
        self.tls_ports = tls_ports  # keys of `ports` that speak TLS
        self.stop_signal = stop_signal
        self.env = env
        self.ready_log = ready_log  # (path, text): wait for this line too (all workers up)
        self.proc: subprocess.Popen | None = None
        self.rss_start: dict[int, int] = {}

    def start(self) -> None:
        out = open(self.workdir / "stdout.log", "ab")
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=self.env)
        out.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for key, port in self.ports.items():
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
                try:
                    status, _, _ = get(port, "/", tls=key in self.tls_ports)
                    if status:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not answer on port {port} within {timeout:g}s: {self.tail()}")
                time.sleep(0.05)
        if self.ready_log:
            path, text = self.ready_log
            while text not in (path.read_text(errors="replace") if path.exists() else ""):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: no {text!r} in {path} within {timeout:g}s")
                time.sleep(0.05)

    def tail(self) -> str:
        logs = sorted(self.workdir.rglob("*.log"))
        text = "".join(p.read_text(errors="replace")[-800:] for p in logs)
        return text.strip()[-1500:] or "(no output)"

    def pids(self) -> list[int]:
        return group_pids(self.proc.pid) if self.proc else []

    def workers(self) -> list[int]:
        return [pid for pid in self.pids() if pid != self.proc.pid]

    def cpu_ticks(self) -> dict[int, int]:
        """utime + stime (all threads) of every process in the group, by pid."""
        ticks = {}
        for pid in self.pids():
            fields = proc_stat(pid)
            if fields is not None:
                ticks[pid] = int(fields[11]) + int(fields[12])
        return ticks

    def rss(self) -> dict[int, int]:
        return {pid: kb for pid in self.workers() if (kb := rss_kb(pid)) is not None}

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, self.stop_signal)


def get(port: int, path: str, timeout: float = 2.0, token: bool = True,
        tls: bool = False) -> tuple[int, dict, bytes]:
    if tls:  # the certificate is our throwaway one: not verified
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"} if token else {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# -- confs -------------------------------------------------------------------

NGINX_MAIN = """\
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 65s;
    keepalive_requests 100000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
{body}
}}
"""

FORKGW_MAIN = """\
worker_processes 2;
error_log {dir}/logs/error.log notice;
pid {dir}/logs/forkgw.pid;
events {{ worker_connections 4096; }}
{wasm}
http {{
    access_log off;
    keepalive_timeout 65s;
    keepalive_requests 100000;
{body}
}}
"""

# The filters each forkgw mode runs (proxy_wasm lines).
ADD_HEADER = "proxy_wasm add_header 'add_header';"
CHAIN = (f"proxy_wasm auth_token '{{\"header\":\"authorization\",\"token\":\"{TOKEN}\"}}'; "
         "proxy_wasm rewrite '{\"path\":\"/old/=/new/\",\"remove_response\":\"x-powered-by\"}'; "
         + ADD_HEADER)
FORKGW = {
    "forkgw-return": ("return 200;", ""),
    "forkgw-filter": ("return 200;", ADD_HEADER),
    "forkgw-chain": ("return 200;", CHAIN),
    "forkgw-proxy": ("proxy_pass http://backend;", ""),
    "forkgw-proxy-filter": ("proxy_pass http://backend;", ADD_HEADER),
    "forkgw-tls": ("return 200;", ""),
}

# TLS: forkgw's defaults, spelled out for nginx; a location that logs whether each session was resumed.
NGINX_TLS = ("ssl_certificate {cert}; ssl_certificate_key {key}; "
             "ssl_protocols TLSv1.2 TLSv1.3; ssl_ciphers HIGH:!aNULL:!MD5;")
REUSED_FORMAT = "    log_format reused '$ssl_session_reused $ssl_protocol $ssl_cipher';\n"
REUSED_PATH = "/reused"
REUSED_LOCATION = f"location {REUSED_PATH} {{{{ access_log {{log}} reused; return 200; }}}}"

WSGI_APP = '''\
def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "0")])
    return [b""]
'''


class Lab:
    """Builds the servers the selected modes need, in one temp dir, and tears them all down."""

    def __init__(self, root: Path, args):
        self.root = root
        self.args = args
        self.servers: dict[str, Server] = {}
        self.nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.backend_port: int | None = None
        self.cert: tuple[Path, Path] | None = None

    def certificate(self) -> tuple[Path, Path]:
        """The throwaway ECDSA P-256 certificate every TLS server uses: (cert, key)."""
        if self.cert is None:
            self.cert = make_certificate(self.dir("certs"), "bench", "localhost")
        return self.cert

    def dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)  # nginx workers may run as nobody
        return path

    def build(self, modes: list[Mode]) -> list[Server]:
        needed = list(dict.fromkeys(m.server for m in modes))
        if any(m.proxy for m in modes):
            self.backend_port = free_port()
            body = f'    server {{ listen 127.0.0.1:{self.backend_port}; location / {{ return 200 "ok"; }} }}'
            self.add_nginx("backend", {"port": self.backend_port}, workers=2, body=body)
        for name in needed:
            if name == "nginx":
                ports = {m.port: free_port() for m in modes if m.server == "nginx"}
                blocks = []
                if "return" in ports:
                    blocks.append(f"    server {{ listen 127.0.0.1:{ports['return']}; location / {{ return 200; }} }}")
                if "proxy" in ports:
                    blocks.append(
                        f"    upstream backend {{ server 127.0.0.1:{self.backend_port}; keepalive 32; }}\n"
                        f"    server {{ listen 127.0.0.1:{ports['proxy']}; location / {{ proxy_pass http://backend; "
                        'proxy_http_version 1.1; proxy_set_header Connection ""; } }')
                if "tls" in ports:
                    cert, key = self.certificate()
                    reused = REUSED_LOCATION.format(log=self.root / "nginx" / "reused.log")
                    blocks.append(REUSED_FORMAT + f"    server {{ listen 127.0.0.1:{ports['tls']} ssl; "
                                  + NGINX_TLS.format(cert=cert, key=key)
                                  + f"\n        location / {{ return 200; }} {reused} }}")
                self.add_nginx("nginx", ports, workers=2, body="\n".join(blocks), tls_ports=("tls",))
            elif name.startswith("forkgw-"):
                self.add_forkgw(name, tls=any(m.tls for m in modes if m.server == name))
            elif name.startswith("h11-"):
                port = free_port()
                argv = [sys.executable, str(REPO / "scripts" / "h11_baseline.py"), "--port", str(port),
                        "--workers", "2"]
                if name == "h11-proxy":
                    argv += ["--proxy", f"127.0.0.1:{self.backend_port}"]
                self.servers[name] = Server(name, argv, self.dir(name), {"port": port}, env=self.env)
            elif name.startswith("gunicorn-"):
                port = free_port()
                workdir = self.dir(name)
                (workdir / "app.py").write_text(WSGI_APP)
                kind = name.split("-", 1)[1]
                argv = [sys.executable, "-m", "gunicorn", "-w", "2", "-k", kind, "-b", f"127.0.0.1:{port}",
                        "--chdir", str(workdir), "--error-logfile", str(workdir / "error.log"),
                        "--log-level", "warning", "--keep-alive", "65", "app:app"]
                if kind == "gthread":
                    argv[5:5] = ["--threads", str(self.args.gthread_threads)]
                self.servers[name] = Server(name, argv, workdir, {"port": port}, stop_signal=signal.SIGINT)
        return list(self.servers.values())

    def add_nginx(self, name: str, ports: dict, workers: int, body: str, tls_ports: tuple = ()) -> None:
        workdir = self.dir(name)
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_MAIN.format(workers=workers, dir=workdir, body=body))
        argv = [self.nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]
        self.servers[name] = Server(name, argv, workdir, ports, tls_ports=tls_ports)

    def add_forkgw(self, name: str, tls: bool = False) -> None:
        workdir = self.dir(name)
        (workdir / "conf").mkdir(exist_ok=True)
        (workdir / "logs").mkdir(exist_ok=True)
        port = free_port()
        action, filters = FORKGW[name]
        modules = [m for m in ("add_header", "rewrite", "auth_token") if f"proxy_wasm {m} " in filters]
        wasm = ("wasm {\n" + "".join(f"    module {m} {PLUGINS / m};\n" for m in modules) + "}") if modules else ""
        body = ""
        if "proxy_pass" in action:
            body += f"    upstream backend {{ server 127.0.0.1:{self.backend_port}; keepalive 32; }}\n"
        if tls:  # nothing but the certificate: forkgw's default protocols and ciphers
            cert, key = self.certificate()
            body += (REUSED_FORMAT + f"    server {{\n        listen 127.0.0.1:{port} ssl;\n"
                     f"        ssl_certificate {cert};\n        ssl_certificate_key {key};\n"
                     f"        location / {{ {action} {filters} }}\n"
                     f"        {REUSED_LOCATION.format(log=workdir / 'logs' / 'reused.log')}\n    }}")
        else:
            body += (f"    server {{\n        listen 127.0.0.1:{port};\n"
                     f"        location / {{ {action} {filters} }}\n    }}")
        (workdir / "conf" / "gateway.conf").write_text(FORKGW_MAIN.format(dir=workdir, wasm=wasm, body=body))
        argv = [sys.executable, "-m", "forkgw", "-p", str(workdir), "-c", "conf/gateway.conf"]
        self.servers[name] = Server(name, argv, workdir, {"port": port}, env=self.env,
                                    ready_log=(workdir / "logs" / "error.log", "generation 1 serving"),
                                    tls_ports=("port",) if tls else ())

    def reused_log(self, server: str) -> Path:
        """Where a TLS server logs $ssl_session_reused for REUSED_PATH."""
        workdir = self.servers[server].workdir
        return workdir / "reused.log" if server == "nginx" else workdir / "logs" / "reused.log"

    def stop_all(self) -> None:
        for server in reversed(list(self.servers.values())):
            try:
                server.stop()
            except Exception as err:  # keep stopping the others
                print(f"warning: stopping {server.name}: {err!r}", file=sys.stderr)


# -- wrk ---------------------------------------------------------------------

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text: str) -> dict:
    out = {"requests": 0, "rps": 0.0, "p50_ms": None, "p99_ms": None, "errors": 0, "non2xx": 0}
    if m := re.search(r"(\d+) requests in", text):
        out["requests"] = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        if m := re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
            out[key] = float(m.group(1)) * UNITS[m.group(2)]
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        out["errors"] = sum(int(g) for g in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        out["non2xx"] = int(m.group(1))
    return out


def parse_hey(text: str) -> dict:
    out = {"requests": 0, "rps": 0.0, "p50_ms": None, "p99_ms": None, "errors": 0, "non2xx": 0}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        if m := re.search(rf"^\s+{pct}% in ([\d.]+) secs", text, re.M):
            out[key] = float(m.group(1)) * 1000
    statuses = re.findall(r"\[(\d+)\]\s+(\d+) responses", text)
    out["requests"] = sum(int(n) for _, n in statuses)
    out["non2xx"] = sum(int(n) for code, n in statuses if not code.startswith("2"))
    _, _, failures = text.partition("Error distribution:")
    out["errors"] = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s", failures, re.M))
    return out


def run_hey(args, port: int, rate: float) -> dict:
    """A fixed request rate (hey: -q per connection), for latency at equal throughput."""
    conns = args.fixed_rate_connections
    cmd = ["hey", "-z", f"{args.duration:g}s", "-c", str(conns), "-q", f"{rate / conns:.1f}",
           "-H", f"Authorization: Bearer {TOKEN}", f"http://127.0.0.1:{port}/"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60)
    result = parse_hey(proc.stdout)
    if proc.returncode != 0 or not result["rps"]:
        result["error"] = (proc.stderr or proc.stdout).strip()[-300:] or f"hey exited {proc.returncode}"
    return result


# forkgw mode -> (the nginx mode its latency is held against, the bare h11 mode beside it)
FIXED_RATE_GROUPS = {"forkgw-return": ("nginx-return", "h11-return"), "forkgw-proxy": ("nginx-proxy", "h11-proxy")}


def fixed_rate_latency(args, lab, live: list[Mode], med: dict) -> dict:
    """p50/p99 of forkgw, nginx and the bare h11 loop at one fixed rate, interleaved over the rounds."""
    names = {m.name for m in live}
    out = {}
    for ours, (nginx, bare) in FIXED_RATE_GROUPS.items():
        if ours not in names or nginx not in names or not med[ours]["rps"]:
            continue
        rate = round(med[ours]["rps"] * args.fixed_rate_share, -2)
        group = [ours, nginx] + ([bare] if bare in names else [])
        runs = {name: [] for name in group}
        for _ in range(args.rounds):
            for name in group:
                time.sleep(1.0)
                m = MODE[name]
                r = run_hey(args, lab.servers[m.server].ports[m.port], rate)
                runs[name].append(r)
                print(f"  fixed {rate:,.0f}/s {name:<20} {r['rps']:>10,.0f} req/s  p50 {fmt(r['p50_ms'], '.2f')} ms"
                      f"  p99 {fmt(r['p99_ms'], '.2f')} ms" + (f"  ERROR {r['error']}" if "error" in r else ""),
                      file=sys.stderr)
        out[ours] = {"rate": rate, "nginx": nginx, "bare": bare if bare in names else None, "runs": runs}
        for key in ("p50_ms", "p99_ms"):
            out[ours][key] = {n: median([r[key] for r in rs if "error" not in r]) for n, rs in runs.items()}
    return out


def fixed_rate_ratios(fixed: dict) -> list[dict]:
    rows = []
    for ours, f in fixed.items():
        p99 = f["p99_ms"]
        for other, target in ((f["nginx"], 2.0), (f["bare"], None)):
            if other and p99[ours] and p99.get(other):
                value = p99[ours] / p99[other]
                rows.append({"what": f"p99 {ours} / {other} at {f['rate']:,.0f} req/s each", "value": value,
                             "unit": "x", "target": target, "sense": "<=",
                             "ok": None if target is None else value <= target})
    return rows


def print_fixed_rate(fixed: dict) -> None:
    if not fixed:
        return
    print("\nLatency at equal throughput (hey, fixed rate, median of rounds):")
    for f in fixed.values():
        for name in f["runs"]:
            print(f"  {name:<20} {f['rate']:>8,.0f} req/s  p50 {fmt(f['p50_ms'][name], '.2f')} ms"
                  f"  p99 {fmt(f['p99_ms'][name], '.2f')} ms")


def machine_busy() -> int:
    """Busy jiffies of the whole machine (user + nice + system)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return int(fields[0]) + int(fields[1]) + int(fields[2])


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_mode(args, lab, mode: Mode, duration: float) -> dict:
    """One load run: wrk, or for the full-handshake modes hey with a new connection per request."""
    server = lab.servers[mode.server]
    url = f"{'https' if mode.tls else 'http'}://127.0.0.1:{server.ports[mode.port]}/"
    auth = ["-H", f"Authorization: Bearer {TOKEN}"]
    if mode.handshake:
        cmd = ["hey", "-z", f"{duration:g}s", "-c", str(args.connections), "-t", "5", "-disable-keepalive",
               *auth, url]
        return run_load(cmd, parse_hey, duration, server, None)
    cmd = ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{duration:g}s", "--latency",
           "--timeout", "5s", *auth, url]
    return run_load(cmd, parse_wrk, duration, server, lab.servers.get("backend") if mode.proxy else None)


def run_load(cmd: list[str], parse, duration: float, server: Server, backend: Server | None) -> dict:
    """Run the load generator; its numbers, and the CPU the server, its backend, the generator and the rest used."""
    s0, b0, m0, w0 = server.cpu_ticks(), backend.cpu_ticks() if backend else {}, machine_busy(), children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    s1, b1, m1, w1 = server.cpu_ticks(), backend.cpu_ticks() if backend else {}, machine_busy(), children_cpu()
    result = parse(proc.stdout)
    if proc.returncode != 0 or not result["requests"]:
        result["error"] = (proc.stderr or proc.stdout).strip()[-300:] or f"{cmd[0]} exited {proc.returncode}"
    per_pid = {pid: t - s0.get(pid, 0) for pid, t in s1.items()}
    server_s, backend_s = sum(per_pid.values()) / CLK_TCK, (sum(b1.values()) - sum(b0.values())) / CLK_TCK
    busy = sorted(per_pid.values(), reverse=True)
    # share of the busiest process: 0.5 = two workers evenly loaded, 1.0 = one did everything
    result["busiest_share"] = busy[0] / sum(busy) if busy and sum(busy) else None
    wrk_s = w1 - w0
    elapsed_cpu = duration * ncpus()
    result["server_cpu_us"] = server_s * 1e6 / result["requests"] if result["requests"] else None
    result["backend_cpu_us"] = backend_s * 1e6 / result["requests"] if result["requests"] and backend else None
    result["wrk_cpu_pct"] = 100 * wrk_s / elapsed_cpu
    other = (m1 - m0) / CLK_TCK - server_s - backend_s - wrk_s
    result["other_cpu_pct"] = max(0.0, 100 * other / elapsed_cpu)
    return result


def ncpus() -> int:
    return len(os.sched_getaffinity(0))


# -- report ------------------------------------------------------------------


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    good = [r for r in runs if "error" not in r]
    keys = ("rps", "p50_ms", "p99_ms", "server_cpu_us", "backend_cpu_us", "other_cpu_pct", "wrk_cpu_pct",
            "busiest_share")
    out = {k: median([r[k] for r in good]) for k in keys}
    out["rps_min"] = min((r["rps"] for r in good), default=None)
    out["rps_max"] = max((r["rps"] for r in good), default=None)
    out["errors"] = sum(r["errors"] for r in runs)
    out["non2xx"] = sum(r["non2xx"] for r in runs)
    out["failed_runs"] = len(runs) - len(good)
    out["us_per_req"] = ncpus() * 1e6 / out["rps"] if out["rps"] else None  # CPU-saturated estimate
    return out


def ratios(med: dict) -> list[dict]:
    """The comparisons the issues set targets for, and a few beside them (only those whose modes ran)."""
    rows = []

    def val(mode, key):
        return (med.get(mode) or {}).get(key)

    def ratio(label, a, b, key="rps", target=None, sense=">="):
        x, y = val(a, key), val(b, key)
        if x and y:
            rows.append({"what": label, "value": x / y, "unit": "x", "target": target, "sense": sense})

    def cost(label, a, b, key, target=None):
        x, y = val(a, key), val(b, key)
        if x is not None and y is not None:
            rows.append({"what": label, "value": x - y, "unit": "µs", "target": target, "sense": "<="})

    ratio("forkgw return / bare h11 return", "forkgw-return", "h11-return", target=0.9)
    ratio("forkgw return / gunicorn gthread", "forkgw-return", "gunicorn-gthread", target=2.0)
    ratio("forkgw return / nginx return", "forkgw-return", "nginx-return")
    ratio("forkgw return+filter / forkgw return", "forkgw-filter", "forkgw-return", target=0.6)
    cost("add_header cost per request (2 cores / req/s)", "forkgw-filter", "forkgw-return", "us_per_req", 25)
    cost("add_header cost per request (server CPU)", "forkgw-filter", "forkgw-return", "server_cpu_us", 25)
    ratio("forkgw 3-filter chain / forkgw return", "forkgw-chain", "forkgw-return")
    cost("3-filter chain cost per request (2 cores / req/s)", "forkgw-chain", "forkgw-return", "us_per_req")
    cost("3-filter chain cost per request (server CPU)", "forkgw-chain", "forkgw-return", "server_cpu_us")
    ratio("forkgw proxy / bare h11 proxy", "forkgw-proxy", "h11-proxy", target=0.9)
    ratio("forkgw proxy+filter / bare h11 proxy", "forkgw-proxy-filter", "h11-proxy", target=0.6)
    ratio("forkgw proxy / nginx proxy", "forkgw-proxy", "nginx-proxy")
    cost("add_header cost when proxying (server CPU)", "forkgw-proxy-filter", "forkgw-proxy", "server_cpu_us", 25)
    ratio("p99 forkgw return / nginx return (saturated)", "forkgw-return", "nginx-return", "p99_ms")
    ratio("p99 forkgw proxy / nginx proxy (saturated)", "forkgw-proxy", "nginx-proxy", "p99_ms")
    ratio("bare h11 return / nginx return", "h11-return", "nginx-return")
    ratio("forkgw TLS keep-alive return / forkgw plain return", "forkgw-tls-return", "forkgw-return", target=0.75)
    ratio("forkgw TLS keep-alive return / nginx TLS keep-alive", "forkgw-tls-return", "nginx-tls-return")
    ratio("nginx TLS keep-alive return / nginx plain return", "nginx-tls-return", "nginx-return")
    ratio("forkgw full TLS handshakes/s / nginx's", "forkgw-tls-handshake", "nginx-tls-handshake", target=0.5)
    ratio("server CPU per full handshake, forkgw / nginx", "forkgw-tls-handshake", "nginx-tls-handshake",
          "server_cpu_us", sense="<=")
    for row in rows:
        t = row["target"]
        row["ok"] = None if t is None else (row["value"] >= t if row["sense"] == ">=" else row["value"] <= t)
    return rows


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(modes: list[Mode], med: dict, errors: dict) -> None:
    head = ("mode", "req/s", "min-max", "p50 ms", "p99 ms", "µs/req*", "server CPU µs/req", "other CPU")
    rows = []
    for m in modes:
        s = med.get(m.name)
        if s is None:
            rows.append((m.label, "n/a", "", "", "", "", "", errors.get(m.name, "")[:70]))
            continue
        note = ""
        if s["errors"] or s["non2xx"] or s["failed_runs"]:
            note = f"  [{s['errors']} socket errors, {s['non2xx']} non-2xx, {s['failed_runs']} failed runs]"
        server_cpu = fmt(s["server_cpu_us"], ".1f")
        if s["backend_cpu_us"] is not None:
            server_cpu += f" (+{s['backend_cpu_us']:.1f} backend)"
        rows.append((m.label, fmt(s["rps"], ",.0f"), f"{fmt(s['rps_min'], '.0f')}-{fmt(s['rps_max'], '.0f')}",
                     fmt(s["p50_ms"], ".2f"), fmt(s["p99_ms"], ".2f"), fmt(s["us_per_req"], ".1f"),
                     server_cpu, fmt(s["other_cpu_pct"], ".0f") + "%" + note))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = "  ".join("{:<%d}" % widths[0] if i == 0 else "{:>%d}" % w for i, w in enumerate(widths))
    print(line.format(*head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line.format(*r))
    print(f"* µs/req = {ncpus()} cores x 1e6 / req/s (CPU-saturated estimate, includes wrk's share); "
          "server CPU = the server's process group only, measured from /proc")
    if any(m.handshake for m in modes):
        print("  full-handshake modes: hey -disable-keepalive, a new connection and a full handshake per request "
              "(no resumption, checked), so req/s = handshakes/s and µs/req includes hey's share")


def print_ratios(rows: list[dict]) -> None:
    if not rows:
        return
    print()
    width = max(len(r["what"]) for r in rows)
    for r in rows:
        value = f"{r['value']:.2f}x" if r["unit"] == "x" else f"{r['value']:+.1f} µs"
        target = ""
        if r["target"] is not None:
            unit = "x" if r["unit"] == "x" else " µs"
            target = f"  target {r['sense']} {r['target']:g}{unit}  {'ok' if r['ok'] else 'MISSED'}"
        print(f"  {r['what']:<{width}}  {value:>9}{target}")


# -- profile -----------------------------------------------------------------


def profile(args, lab: Lab, mode: Mode, out_dir: Path) -> dict:
    """One extra wrk run while sampling the mode's workers; top functions by self and total time."""
    if not shutil.which("py-spy"):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    server = lab.servers[mode.server]
    raw = out_dir / f"profile-{mode.name}.txt"
    duration = max(2, int(args.duration))
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(server.proc.pid), "--subprocesses", "--nonblocking",
                            "--rate", "250", "--duration", str(duration + 1), "--format", "raw", "-o", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(1.0)
        result = run_mode(args, lab, mode, duration)
        _, err = spy.communicate(timeout=60)
    finally:
        if spy.poll() is None:
            os.killpg(spy.pid, signal.SIGKILL)
            spy.wait()
    if not raw.exists():
        return {"error": f"py-spy wrote nothing: {(err or '').strip()[-300:]}"}
    total, self_time, incl = 0, {}, {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if " (" in f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        short = [re.sub(r"\(([^)]*?)(:\d+)?\)$", lambda m: "(" + m.group(1).rsplit("/", 1)[-1] + ")", f)
                 for f in frames]
        self_time[short[-1]] = self_time.get(short[-1], 0) + n
        for f in set(short):
            incl[f] = incl.get(f, 0) + n
    def top(d, cap=1.0):
        ranked = [(k, 100 * v / total) for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v <= cap * total]
        return ranked[:args.profile_top]

    return {"mode": mode.name, "samples": total, "rps": result.get("rps"), "raw": str(raw),
            "self": top(self_time) if total else [], "total": top(incl, 0.9) if total else []}


def print_profile(p: dict) -> None:
    print()
    if "error" in p:
        print(f"profile: {p['error']}")
        return
    print(f"profile of {p['mode']} ({p['samples']} samples at {fmt(p['rps'], ',.0f')} req/s; stacks in {p['raw']})")
    for title, key in (("self time", "self"), ("total time, function and callees "
                                              "(frames in over 90% of samples, the loop, left out)", "total")):
        print(f"  top by {title}:")
        for name, pct in p[key]:
            print(f"    {pct:5.1f}%  {name}")


# -- main --------------------------------------------------------------------


def ensure_tools(modes: list[Mode]) -> None:
    """CI starts from a bare machine: install what the selected modes need."""
    apt = []
    has_nginx = shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")
    if any(m.proxy or m.server == "nginx" for m in modes) and not has_nginx:
        apt.append("nginx-light")
    if not shutil.which("wrk"):
        apt.append("wrk")
    if not shutil.which("hey"):
        apt.append("hey")
    if any(m.tls for m in modes) and not shutil.which("openssl"):
        apt.append("openssl")
    if apt:
        apt_install(apt)
    if any(m.server.startswith("gunicorn") for m in modes):
        try:
            import gunicorn  # noqa: F401
        except ImportError:
            subprocess.run([sys.executable, "-m", "pip", "install", "gunicorn"], check=True)


def check(mode: Mode, port: int) -> str | None:
    """Why the mode does not answer as it should (a fast wrong answer is no result), or None."""
    try:
        status, headers, body = get(port, "/", tls=mode.tls)
    except OSError as err:
        return f"request failed: {err}"
    if status != 200:
        return f"status {status}: {body[:80]!r}"
    for name, value in mode.expect_headers.items():
        if headers.get(name) != value:
            return f"header {name}: {headers.get(name)!r}, expected {value!r}"
    for name in mode.absent_headers:
        if name in headers:
            return f"header {name} should be absent"
    if mode.expect_body is not None and body != mode.expect_body:
        return f"body {body[:80]!r}, expected {mode.expect_body!r}"
    if mode.denied_without_token:
        try:
            status, _, _ = get(port, "/", token=False, tls=mode.tls)
        except OSError as err:
            return f"request without a token failed: {err}"
        if status != 401:
            return f"status {status} without a token, expected 401"
    return None


def check_full_handshakes(lab: Lab, mode: Mode, requests: int = 100) -> tuple[str | None, str]:
    """(why not, what was seen): were a burst of the mode's client connections all full handshakes?

    The same client as the runs (hey, no keep-alive) asks REUSED_PATH, where the server logs
    $ssl_session_reused ("r" resumed, "." full handshake), the protocol and the cipher.
    """
    log = lab.reused_log(mode.server)
    before = len(log.read_text().splitlines()) if log.exists() else 0
    url = f"https://127.0.0.1:{lab.servers[mode.server].ports[mode.port]}{REUSED_PATH}"
    proc = subprocess.run(["hey", "-n", str(requests), "-c", "4", "-disable-keepalive", url],
                          capture_output=True, text=True, timeout=60)
    deadline = time.monotonic() + 5  # forkgw flushes its access log once a second
    while True:
        lines = (log.read_text().splitlines() if log.exists() else [])[before:]
        if len(lines) >= requests or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not lines:
        return f"no request logged in {log} (hey: {(proc.stderr or proc.stdout).strip()[-200:]})", ""
    reused = sum(line.startswith("r") for line in lines)
    agreed = ", ".join(f"{n} {what}" for what, n in Counter(line.split(" ", 1)[-1] for line in lines).items())
    seen = (f"{len(lines) - reused} of {len(lines)} connections were full handshakes "
            f"($ssl_session_reused; {agreed})")
    if reused:
        return f"{reused} of {len(lines)} connections resumed a session: not full handshakes", seen
    return None, seen


def log_problems(server: Server) -> list[str]:
    path = server.workdir / "logs" / "error.log"
    if not path.exists():
        return []
    return [line for line in path.read_text(errors="replace").splitlines()
            if re.search(r"\[(error|crit|alert|emerg)\]", line)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="modes: " + ", ".join(m.name for m in MODES))
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all modes (default 3)")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of unrecorded load per mode first (default 1)")
    ap.add_argument("--modes", help="comma-separated subset, in this order")
    ap.add_argument("--gthread-threads", type=int, default=4, help="threads per gunicorn gthread worker (default 4)")
    ap.add_argument("--fixed-rate-share", type=float, default=0.25,
                    help="equal-throughput latency runs at this share of forkgw's req/s (0: skip; default 0.25)")
    ap.add_argument("--fixed-rate-connections", type=int, default=10, help="hey -c for those runs (default 10)")
    ap.add_argument("--json", metavar="PATH", help="write every run, medians, ratios and RSS as JSON")
    ap.add_argument("--profile", metavar="MODE", action="append", default=[],
                    help="after the rounds, sample MODE's workers during one more run (py-spy)")
    ap.add_argument("--profile-top", type=int, default=15, help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (confs, logs, profiles)")
    args = ap.parse_args()

    names = args.modes.split(",") if args.modes else [m.name for m in MODES]
    unknown = [n for n in names + args.profile if n not in MODE]
    if unknown:
        ap.error(f"unknown mode(s): {', '.join(unknown)}; known: {', '.join(MODE)}")
    modes = [MODE[n] for n in names]
    profiled = [MODE[n] for n in args.profile if n not in names]
    if profiled:
        ap.error("--profile needs the mode in --modes too")

    ensure_tools(modes)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    root = Path(tempfile.mkdtemp(prefix="forkgw-bench-"))
    lab = Lab(root, args)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "settings": {k: getattr(args, k) for k in ("duration", "rounds", "connections", "threads", "warmup",
                                                    "gthread_threads")} | {"modes": names},
        "runs": {n: [] for n in names},
        "errors": {},
    }
    started = time.monotonic()
    try:
        servers = lab.build(modes)
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
            server.rss_start = server.rss()
        live = []
        report["full_handshakes"] = {}
        for m in modes:
            why = check(m, lab.servers[m.server].ports[m.port])
            if not why and m.handshake:
                why, seen = check_full_handshakes(lab, m)
                report["full_handshakes"][m.name] = seen
                print(f"{m.name}: {seen or why}", file=sys.stderr)
            if why:
                report["errors"][m.name] = why
                print(f"skipping {m.name}: {why}", file=sys.stderr)
            else:
                live.append(m)
        total = len(live) * (args.rounds * (args.duration + 1) + args.warmup + 1)
        print(f"{len(live)} modes x {args.rounds} rounds x {args.duration:g}s, wrk -t{args.threads} "
              f"-c{args.connections}, {ncpus()} cpus, load {report['machine']['loadavg']}; ~{total:.0f}s",
              file=sys.stderr)
        if args.warmup > 0:
            for m in live:
                run_mode(args, lab, m, args.warmup)
        for rnd in range(args.rounds):
            for m in live:
                time.sleep(1.0)  # let the previous run's connections close
                r = run_mode(args, lab, m, args.duration)
                r["round"] = rnd + 1
                report["runs"][m.name].append(r)
                print(f"  round {rnd + 1} {m.name:<20} {r['rps']:>10,.0f} req/s  p99 {fmt(r['p99_ms'], '.2f')} ms"
                      f"  server {fmt(r['server_cpu_us'], '.1f')} µs/req  other {r['other_cpu_pct']:.0f}%"
                      + f"  busiest process {fmt(r['busiest_share'], '.0%')}"
                      + (f"  ERROR {r['error']}" if "error" in r else ""), file=sys.stderr)
        med = {m.name: summarize(report["runs"][m.name]) for m in live}
        report["median"] = med
        report["fixed_rate"] = fixed_rate_latency(args, lab, live, med) if args.fixed_rate_share > 0 else {}
        report["ratios"] = ratios(med) + fixed_rate_ratios(report["fixed_rate"])
        report["rss_kb"] = {name: {"start": s.rss_start, "end": s.rss()} for name, s in lab.servers.items()}
        report["forkgw_log_problems"] = {name: lines[-5:] for name, s in lab.servers.items()
                                         if name.startswith("forkgw") and (lines := log_problems(s))}
        report["profiles"] = [profile(args, lab, MODE[n], root) for n in args.profile]
        report["machine"]["loadavg_after"] = loadavg()
        report["elapsed_s"] = round(time.monotonic() - started, 1)

        print()
        print(f"{report['date']}  {report['machine']['cpu']} x{ncpus()}  python {platform.python_version()}  "
              f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, median of {args.rounds} rounds")
        print()
        print_table(modes, med, report["errors"])
        print_fixed_rate(report["fixed_rate"])
        print_ratios(report["ratios"])
        print_rss(report["rss_kb"])
        for name, lines in report["forkgw_log_problems"].items():
            print(f"\n{name} error log ({len(lines)} of the problem lines):")
            for line in lines:
                print("  " + line[:200])
        for p in report["profiles"]:
            print_profile(p)
    finally:
        lab.stop_all()
        if args.keep or args.profile:
            print(f"\nkept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def print_rss(rss: dict) -> None:
    rows = [(name, v) for name, v in rss.items() if name.startswith("forkgw") and v["end"]]
    if not rows:
        return
    print("\nforkgw worker RSS (VmRSS, MB): after start -> after the runs")
    for name, v in rows:
        parts = []
        for pid, kb in sorted(v["end"].items()):
            before = v["start"].get(pid)
            parts.append(f"{fmt(before / 1024 if before else None, '.1f')} -> {kb / 1024:.1f}")
        print(f"  {name:<20} " + ", ".join(parts))


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cpus": ncpus(), "mem_gib": round(mem, 1), "kernel": platform.release(),
            "python": platform.python_version(), "loadavg": loadavg()}


if __name__ == "__main__":
    sys.exit(main())
