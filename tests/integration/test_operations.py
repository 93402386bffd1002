"""Operating forkgw like nginx, through the real process and real signals.

The command line (-t -T -q -v -V -g -e -s), the pid file, HUP reloads, graceful
and fast stops, log reopening, the USR2 upgrade and its rollback, a master that
dies, workers that ignore stray signals, process titles, the systemd notify and
socket-activation protocols, the unit file, and privilege dropping.
"""

from __future__ import annotations

import http.client
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import ROOT, free_port, wait_for

RETURN = """
http {
    access_log logs/access.log combined;
    server {
        listen 127.0.0.1:{port};
        location / { return 200 "$pid"; }
        location /a { return 200 "one"; }
    }
}
"""

FILTERED = """
wasm { module add_header {plugins}/add_header; }
http {
    server {
        listen 127.0.0.1:{port};
        location / { return 200 "body"; proxy_wasm add_header 'CONFIG'; }
    }
}
"""

PROXY = """
http {
    server {
        listen 127.0.0.1:{port};
        location / { proxy_pass http://127.0.0.1:{up_port}; }
    }
}
"""

# A failed generation's sibling workers are stopped with kill=True, whose deadline is "now":
# reconcile() may SIGKILL them in the same turn, logged as an [alert] with an out-of-memory hint.

WASM_FAILURE = [r"proxy_on_configure failed", r'wasm "add_header"', r"exited with code 3",
                r"exited on signal 9"]


# -- helpers -----------------------------------------------------------------------


def launch(gw, *args: str, env: dict | None = None, cmd: list[str] | None = None, **popen) -> subprocess.Popen:
    """Start forkgw on the conf already written (the fixture stops it at teardown)."""
    gw.proc = subprocess.Popen(cmd or gw.command(*args), cwd=gw.prefix, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, **popen)
    return gw.proc


def start_again(gw, body: str, workers: int = 1, **main) -> None:
    """A second start in the same prefix: wait for this master's own "serving" line."""
    gw.start(body, workers=workers, wait=False, **main)
    needle = f"{gw.proc.pid}#0: generation 1 serving"
    wait_for(lambda: needle in gw.log_text() or gw.proc.poll() is not None, 20)
    assert gw.proc.poll() is None, gw.proc.communicate()[1]


def conf_path(gw) -> str:
    return str(gw.prefix / "conf" / "gateway.conf")


def line_of(path, needle: str) -> int:
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def state(pid: int) -> str | None:
    """The process state letter from /proc, None when the pid is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()[0]


def gone(pid: int) -> bool:
    return state(pid) in (None, "Z", "X")


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def workers_of(master: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(master)], capture_output=True, text=True).stdout
    return sorted(int(line.split()[0]) for line in out.splitlines()
                  if "worker process" in line and not gone(int(line.split()[0])))


def read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def terminate(pid: int) -> None:
    """Stop a master that is not our child (an upgrade's new master) and its workers."""
    if not pid or gone(pid):
        return
    kids = workers_of(pid)
    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: gone(pid), 10)
    except AssertionError:
        for p in [pid, *kids]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def get(port: int, path: str = "/", timeout: float = 5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class ClientLoop:
    """Fresh connections one after another; every error is a refused or broken request."""

    def __init__(self, port: int):
        self.port = port
        self.ok = 0
        self.errors: list[str] = []
        self.bodies: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while self.running:
            try:
                status, _, body = get(self.port, "/")
                if status == 200:
                    self.ok += 1
                    self.bodies.append(body)
                else:
                    self.errors.append(f"status {status}")
            except OSError as err:
                self.errors.append(repr(err))
            time.sleep(0.005)

    def stop(self):
        self.running = False
        self.thread.join(10)


# -- the command line ----------------------------------------------------------------


def test_t_prints_nginx_success_lines(gateway):
    """Scripts and ExecStartPre grep nginx's exact two lines."""
    gateway.write_conf(RETURN)
    result = gateway.run("-t")
    assert result.returncode == 0, result.stderr
    path = conf_path(gateway)
    assert result.stderr.splitlines() == [
        f"forkgw: the configuration file {path} syntax is ok",
        f"forkgw: configuration file {path} test is successful",
    ]


def test_t_names_the_file_it_tested_from_another_folder(gateway, tmp_path_factory):
    """With -p, a relative -c is under the prefix; the message must name that file."""
    gateway.write_conf(RETURN)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    result = subprocess.run(gateway.command("-t"), capture_output=True, text=True, timeout=60, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert f"the configuration file {conf_path(gateway)} syntax is ok" in result.stderr


def test_t_broken_conf_names_file_and_line(gateway):
    """A typo is reported with its place, and the test fails with exit 1."""
    gateway.write_conf(RETURN.replace("listen ", "lisen "))
    path = conf_path(gateway)
    result = gateway.run("-t")
    assert result.returncode == 1
    line = line_of(path, "lisen")
    assert re.search(rf'^forkgw: \[emerg\] unknown directive "lisen".* in {re.escape(path)}:{line}$',
                     result.stderr, re.M), result.stderr
    assert result.stderr.splitlines()[-1] == f"forkgw: configuration file {path} test failed"


def test_T_dumps_the_conf_with_its_includes(gateway):
    """-T shows every file read, each under nginx's `# configuration file` header."""
    gateway.write_conf(RETURN.replace("http {", "http {\n    include servers/*.conf;"))
    extra = gateway.prefix / "conf" / "servers" / "extra.conf"
    extra.parent.mkdir()
    extra.write_text(f"server {{ listen 127.0.0.1:{free_port()}; "
                     "location / { return 200 included; } }\n")
    result = gateway.run("-T")
    assert result.returncode == 0, result.stderr
    main = Path(conf_path(gateway))
    assert f"# configuration file {main}:\n{main.read_text()}" in result.stdout
    assert f"# configuration file {extra}:\n{extra.read_text()}" in result.stdout
    assert "test is successful" in result.stderr


def test_q_silences_success_but_not_errors(gateway):
    """`forkgw -t -q` in ExecStartPre prints only when something is wrong."""
    gateway.write_conf(RETURN)
    quiet = gateway.run("-t", "-q")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    gateway.write_conf(RETURN.replace("listen ", "lisen "))
    broken = gateway.run("-t", "-q")
    assert broken.returncode == 1
    assert 'unknown directive "lisen"' in broken.stderr and "test failed" in broken.stderr


def test_v_and_V_show_versions(gateway):
    """-V names the parts a bug report needs: Python, h11, wasmtime."""
    import forkgw
    import h11

    short = gateway.run("-v")
    assert short.returncode == 0
    assert short.stderr.strip() == f"forkgw version: forkgw/{forkgw.__version__}"
    full = gateway.run("-V")
    assert full.returncode == 0
    assert f"forkgw version: forkgw/{forkgw.__version__}" in full.stderr
    assert f"python: {sys.version.split()[0]}" in full.stderr
    assert f"h11: {h11.__version__}" in full.stderr
    assert f"wasmtime: {version('wasmtime')}" in full.stderr


def test_g_sets_main_directives(gateway):
    """-g directives count as if written at the top of the conf."""
    path = gateway.write_conf(RETURN)
    path.write_text(re.sub(r"^worker_processes .*\n", "", path.read_text(), flags=re.M))
    launch(gateway, "-g", "worker_processes 2;")
    gateway.wait_serving(1)
    assert len(gateway.worker_pids()) == 2
    assert "generation 1 serving with 2 workers" in gateway.log_text()


def test_e_sets_the_error_log(gateway):
    """-e overrides the conf's error_log, relative to the prefix."""
    gateway.write_conf(RETURN)
    launch(gateway, "-e", "logs/other.log")
    other = gateway.prefix / "logs" / "other.log"
    wait_for(lambda: other.exists() and "generation 1 serving" in other.read_text(), 20)
    assert "generation 1 serving" not in gateway.log_text()


def test_start_with_a_bad_conf_exits_1_with_the_place(gateway):
    """A gateway that cannot start says why and where, and leaves no pid file."""
    gateway.write_conf(RETURN.replace("listen ", "lisen "))
    path = conf_path(gateway)
    proc = launch(gateway)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert re.search(rf'^forkgw: \[emerg\] unknown directive "lisen".* in {re.escape(path)}:{line_of(path, "lisen")}$',
                     err, re.M), err
    assert not (gateway.prefix / "logs" / "forkgw.pid").exists()
    gateway.allowed_errors.append("unknown directive")


# -- pid file ------------------------------------------------------------------------


def test_pid_file_written_guarded_and_removed(gateway):
    """The pid file names the master, refuses a second master, and goes away with it."""
    gateway.start(RETURN)
    pid_file = gateway.prefix / "logs" / "forkgw.pid"
    assert read_pid(pid_file) == gateway.proc.pid
    second = gateway.prefix / "conf" / "second.conf"
    second.write_text(Path(conf_path(gateway)).read_text().replace(str(gateway.port), str(free_port())))
    refused = subprocess.run([sys.executable, "-m", "forkgw", "-p", str(gateway.prefix), "-c", "conf/second.conf"],
                             capture_output=True, text=True, timeout=30, cwd=gateway.prefix)
    assert refused.returncode == 1
    assert re.search(rf'\[emerg\] pid file .*forkgw\.pid.* {gateway.proc.pid}', refused.stderr), refused.stderr
    assert read_pid(pid_file) == gateway.proc.pid
    assert gateway.request()[0] == 200
    gateway.allowed_errors.append("names a running forkgw")
    gateway.signal(signal.SIGQUIT)
    assert gateway.proc.wait(15) == 0
    assert not pid_file.exists()
    assert not (gateway.prefix / "logs" / "forkgw.sock").exists()


# -- HUP -----------------------------------------------------------------------------


def test_hup_makes_a_route_change_visible(gateway):
    gateway.start(RETURN)
    assert gateway.request("GET", "/a")[2] == b"one"
    gateway.write_conf(RETURN.replace('location /a { return 200 "one"; }', 'location /a { return 200 "two"; }'))
    gateway.signal(signal.SIGHUP)
    gateway.wait_serving(2)
    assert {gateway.request("GET", "/a")[2] for _ in range(5)} == {b"two"}


def test_hup_with_a_broken_conf_keeps_the_old_one(gateway):
    """The property operators rely on most: a bad reload costs nothing."""
    gateway.start(RETURN, workers=2)
    pids = gateway.worker_pids()
    gateway.write_conf(RETURN.replace("listen ", "lisen "), worker_processes=2)
    gateway.allowed_errors.append("unknown directive")
    gateway.signal(signal.SIGHUP)
    path = re.escape(conf_path(gateway))
    wait_for(lambda: re.search(rf'\[emerg\] .*unknown directive "lisen".* in {path}:\d+', gateway.log_text()), 10)
    assert gateway.request("GET", "/a")[2] == b"one"
    wait_for(lambda: gateway.worker_pids() == pids, 5)  # the new generation's workers are gone
    assert "generation 2 serving" not in gateway.log_text()


def test_hup_with_a_failing_filter_keeps_the_old_generation(gateway):
    """A conf that parses but whose filter aborts at configure must not replace the old one."""
    gateway.start(FILTERED.replace("CONFIG", "v1"), workers=2)
    pids = gateway.worker_pids()
    gateway.allowed_errors.extend(WASM_FAILURE)
    gateway.write_conf(FILTERED.replace("CONFIG", ""), worker_processes=2)
    gateway.signal(signal.SIGHUP)
    wait_for(lambda: "the old configuration keeps serving" in gateway.log_text(), 15)
    for _ in range(6):
        status, headers, body = gateway.request()
        assert (status, headers.get("hello"), body) == (200, "v1", b"body")
    wait_for(lambda: gateway.worker_pids() == pids, 5)  # the new generation's workers are gone
    assert "generation 2 serving" not in gateway.log_text()


# -- -s ------------------------------------------------------------------------------


def test_s_reload_returns_once_the_new_conf_serves(gateway):
    """`-s reload` exiting 0 means every new connection sees the new conf."""
    gateway.start(RETURN, workers=2)
    gateway.write_conf(RETURN.replace('"one"', '"two"'), worker_processes=2)
    result = gateway.run("-s", "reload")
    assert result.returncode == 0, result.stderr
    bodies = [gateway.request("GET", "/a")[2] for _ in range(20)]
    assert "reload requested on the control socket" in gateway.log_text()
    assert set(bodies) == {b"two"}, bodies


def test_s_reload_with_a_broken_conf_exits_1(gateway):
    """A rejected conf is the reloader's failure, with nginx's message."""
    gateway.start(RETURN)
    gateway.write_conf(RETURN.replace("listen ", "lisen "))
    gateway.allowed_errors.append("unknown directive")
    result = gateway.run("-s", "reload")
    assert result.returncode == 1
    assert re.search(rf'\[emerg\] unknown directive "lisen".* in {re.escape(conf_path(gateway))}:\d+',
                     result.stderr), result.stderr
    assert gateway.request("GET", "/a")[2] == b"one"


def test_s_reload_reports_a_filter_that_fails_in_the_new_workers(gateway):
    """Only the master knows the new workers failed: the answer comes over the control socket."""
    gateway.start(FILTERED.replace("CONFIG", "v1"))
    gateway.allowed_errors.extend(WASM_FAILURE)
    gateway.write_conf(FILTERED.replace("CONFIG", ""))
    result = gateway.run("-s", "reload")
    assert result.returncode == 1
    assert re.search(r"\[emerg\] .*proxy_on_configure failed", result.stderr), result.stderr
    assert gateway.request()[1].get("hello") == "v1"


def test_s_reopen_quit_and_stop(gateway):
    """The other -s commands reach the master named by the pid file."""
    gateway.start(RETURN)
    log = gateway.access_log
    wait_for(lambda: gateway.request()[0] == 200 and log.exists() and log.read_text(), 5)
    log.rename(log.with_name("access.log.1"))
    assert gateway.run("-s", "reopen").returncode == 0
    wait_for(lambda: "reopening logs" in gateway.log_text(), 5)
    gateway.request("GET", "/after-reopen")
    wait_for(lambda: log.exists() and "/after-reopen" in log.read_text(), 5)
    assert gateway.run("-s", "quit").returncode == 0
    assert gateway.proc.wait(15) == 0
    start_again(gateway, RETURN)
    started = time.monotonic()
    assert gateway.run("-s", "stop").returncode == 0
    assert gateway.proc.wait(10) == 0
    assert time.monotonic() - started < 5


# -- stopping ------------------------------------------------------------------------


def slow_request(gateway, path: str, result: dict) -> threading.Thread:
    def run():
        try:
            result["response"] = gateway.request("GET", path, timeout=15)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_quit_finishes_a_slow_in_flight_request(gateway, upstream):
    """Graceful stop: the request already started completes, then the master exits 0."""
    gateway.ports["up_port"] = upstream.port
    gateway.start(PROXY)
    worker = gateway.worker_pids()[0]
    result: dict = {}
    thread = slow_request(gateway, "/slow/2", result)
    wait_for(lambda: upstream.hits, 5)
    gateway.signal(signal.SIGQUIT)
    wait_for(lambda: title(worker) == "forkgw: worker process is shutting down", 3)
    ps = subprocess.run(["ps", "-o", "args=", "-p", str(worker)], capture_output=True, text=True).stdout
    assert ps.strip() == "forkgw: worker process is shutting down"
    thread.join(10)
    status, headers, body = result["response"]
    assert status == 200 and b'"/slow/2"' in body
    assert headers.get("connection") == "close"
    assert gateway.proc.wait(10) == 0
    assert gone(worker)


def test_term_stops_fast(gateway, upstream):
    """Fast stop does not wait for in-flight requests."""
    gateway.ports["up_port"] = upstream.port
    gateway.start(PROXY)
    result: dict = {}
    slow_request(gateway, "/slow/8", result)
    wait_for(lambda: upstream.hits, 5)
    started = time.monotonic()
    gateway.signal(signal.SIGTERM)
    assert gateway.proc.wait(10) == 0
    assert time.monotonic() - started < 2.5


def test_worker_shutdown_timeout_bounds_a_drain(gateway, upstream):
    """A request slower than worker_shutdown_timeout is cut, and the stop stays on time."""
    gateway.ports["up_port"] = upstream.port
    gateway.start(PROXY, worker_shutdown_timeout="1s")
    result: dict = {}
    thread = slow_request(gateway, "/slow/6", result)
    wait_for(lambda: upstream.hits, 5)
    started = time.monotonic()
    gateway.signal(signal.SIGQUIT)
    gateway.proc.wait(10)
    elapsed = time.monotonic() - started
    assert 0.8 < elapsed < 3.0, elapsed
    thread.join(5)
    assert "error" in result, result


# -- USR1 ----------------------------------------------------------------------------


def test_usr1_reopens_a_rotated_access_log(gateway):
    """logrotate's move-then-signal: new lines land in a fresh file, none are lost."""
    gateway.start(RETURN, workers=2)
    log = gateway.access_log
    gateway.request("GET", "/before")
    wait_for(lambda: log.exists() and "/before" in log.read_text(), 5)
    rotated = log.with_name("access.log.1")
    log.rename(rotated)
    gateway.signal(signal.SIGUSR1)
    wait_for(lambda: "reopening logs" in gateway.log_text(), 5)
    time.sleep(0.3)  # the workers read the command from their channel
    for i in range(10):
        gateway.request("GET", f"/after/{i}")
    wait_for(lambda: log.exists() and all(f"/after/{i} " in log.read_text() for i in range(10)), 5)
    assert "/after/" not in rotated.read_text()
    assert "/before" in rotated.read_text()


# -- USR2 and WINCH ------------------------------------------------------------------


def served_by(body: bytes) -> int:
    """The master of the worker that answered (the body is the worker's $pid)."""
    return parent(int(body))


def test_usr2_upgrade_hands_over_without_refusing_a_connection(gateway):
    """nginx's binary upgrade: a new master takes the same sockets; the old one bows out."""
    gateway.start(RETURN, workers=2)
    old = gateway.proc.pid
    logs = gateway.prefix / "logs"
    client = ClientLoop(gateway.port)
    new = 0
    try:
        gateway.signal(signal.SIGUSR2)
        wait_for(lambda: read_pid(logs / "forkgw.pid.oldbin") == old and read_pid(logs / "forkgw.pid") not in (0, old), 10)
        new = read_pid(logs / "forkgw.pid")
        assert parent(new) == old
        wait_for(lambda: f"{new}#0: generation 1 serving with 2 workers" in gateway.log_text(), 20)
        assert len(workers_of(new)) == 2
        wait_for(lambda: served_by(get(gateway.port)[2]) == new, 5)

        gateway.signal(signal.SIGWINCH)
        wait_for(lambda: not workers_of(old), 10)
        assert {served_by(get(gateway.port)[2]) for _ in range(10)} == {new}

        gateway.signal(signal.SIGQUIT)
        assert gateway.proc.wait(10) == 0
        assert not (logs / "forkgw.pid.oldbin").exists()
        assert read_pid(logs / "forkgw.pid") == new
        assert {served_by(get(gateway.port)[2]) for _ in range(10)} == {new}
        client.stop()
        assert client.errors == [], client.errors[:5]
        assert client.ok > 20
        # the control socket now belongs to the new master
        assert gateway.run("-s", "reload").returncode == 0
        assert f"{new}#0: generation 2 serving" in gateway.log_text()
    finally:
        client.stop()
        terminate(new)


def test_usr2_rollback_brings_the_old_master_back(gateway):
    """nginx's rollback: HUP the old master for workers, QUIT the new one, the old serves on."""
    gateway.start(RETURN, workers=2)
    old = gateway.proc.pid
    logs = gateway.prefix / "logs"
    new = 0
    try:
        gateway.signal(signal.SIGUSR2)
        wait_for(lambda: read_pid(logs / "forkgw.pid") not in (0, old), 10)
        new = read_pid(logs / "forkgw.pid")
        wait_for(lambda: f"{new}#0: generation 1 serving" in gateway.log_text(), 20)
        gateway.signal(signal.SIGWINCH)
        wait_for(lambda: not workers_of(old), 10)
        gateway.signal(signal.SIGHUP)
        wait_for(lambda: len(workers_of(old)) == 2, 3)
        os.kill(new, signal.SIGQUIT)
        wait_for(lambda: gone(new), 10)
        wait_for(lambda: read_pid(logs / "forkgw.pid") == old, 5)
        assert not (logs / "forkgw.pid.oldbin").exists()
        assert {served_by(get(gateway.port)[2]) for _ in range(10)} == {old}
        assert gateway.run("-s", "reload").returncode == 0
    finally:
        terminate(new)


# -- a master that dies, workers that ignore stray signals ------------------------------


def test_workers_exit_when_the_master_is_killed(gateway):
    """Orphaned workers must not hold the port: they see the channel close and leave."""
    gateway.start(RETURN, workers=2)
    workers = gateway.worker_pids()
    gateway.allowed_errors.append("master process is gone")
    gateway.signal(signal.SIGKILL)
    gateway.proc.wait(5)
    wait_for(lambda: all(gone(pid) for pid in workers), 5)
    start_again(gateway, RETURN, workers=2)
    assert gateway.request("GET", "/a")[2] == b"one"


def test_quit_and_a_new_connection_in_one_loop_turn(gateway):
    """A worker told to quit must neither accept on its closed listener nor serve a newer client."""
    gateway.start(RETURN)
    old = gateway.worker_pids()[0]
    new = 0
    os.kill(old, signal.SIGSTOP)  # holds the quit and the new connection for one loop turn
    try:
        gateway.write_conf(RETURN.replace('"one"', '"two"'))
        gateway.signal(signal.SIGHUP)
        gateway.wait_serving(2)
        new = next(pid for pid in gateway.worker_pids() if pid != old)
        os.kill(new, signal.SIGSTOP)  # keeps the connection in the shared accept queue
        client = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        client.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.1)
        os.kill(old, signal.SIGCONT)
        wait_for(lambda: gone(old), 10)
        os.kill(new, signal.SIGCONT)
        response = b""
        while chunk := client.recv(65536):
            response += chunk
        client.close()
    finally:
        for pid in (old, new):
            if pid and not gone(pid):
                os.kill(pid, signal.SIGCONT)
    assert response.endswith(b"\r\n\r\ntwo"), response
    assert "Bad file descriptor" not in gateway.log_text()


def test_workers_ignore_hup_usr2_and_winch(gateway):
    """`pkill -HUP forkgw` reaches the workers too; they must serve on, unchanged."""
    gateway.start(RETURN, workers=2)
    workers = gateway.worker_pids()
    for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGWINCH):
        for pid in workers:
            os.kill(pid, sig)
    time.sleep(0.5)
    assert gateway.worker_pids() == workers
    assert all(title(pid) == "forkgw: worker process" for pid in workers)
    seen = {int(gateway.request()[2]) for _ in range(20)}
    assert seen <= set(workers)
    assert "generation 2" not in gateway.log_text()


def test_process_titles(gateway):
    """`ps` tells the master from its workers."""
    gateway.start(RETURN, workers=2)
    assert title(gateway.proc.pid) == f"forkgw: master process forkgw -p {gateway.prefix} -c conf/gateway.conf"
    assert [title(pid) for pid in gateway.worker_pids()] == ["forkgw: worker process"] * 2


# -- systemd -------------------------------------------------------------------------


class NotifySocket:
    """The service manager's end of sd_notify: a real unix datagram socket."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def expect(self, predicate, timeout: float = 10.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching notification in {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(message)
            if predicate(message):
                return message

    def close(self):
        self.sock.close()


def test_sd_notify_ready_reloading_stopping(gateway, tmp_path):
    """Type=notify: systemd learns when forkgw is ready, reloading, ready again and stopping."""
    notify = NotifySocket(tmp_path / "notify")
    try:
        gateway.write_conf(RETURN)
        launch(gateway, env={**os.environ, "NOTIFY_SOCKET": notify.path})
        ready = notify.expect(lambda m: m.get("READY") == "1")
        assert ready.get("STATUS"), ready
        gateway.wait_serving(1)
        gateway.signal(signal.SIGHUP)
        reloading = notify.expect(lambda m: m.get("RELOADING") == "1")
        now = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
        assert abs(int(reloading["MONOTONIC_USEC"]) - now) < 5e6, reloading
        again = notify.expect(lambda m: m.get("READY") == "1")
        assert "generation 2" in again.get("STATUS", ""), again
        gateway.signal(signal.SIGTERM)
        notify.expect(lambda m: m.get("STOPPING") == "1")
        assert gateway.proc.wait(10) == 0
    finally:
        notify.close()


def test_sd_notify_watchdog(gateway, tmp_path):
    """With WATCHDOG_USEC, pings come at half the interval, again and again."""
    notify = NotifySocket(tmp_path / "notify")
    try:
        gateway.write_conf(RETURN)
        launch(gateway, env={**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
        notify.expect(lambda m: m.get("READY") == "1")
        started = time.monotonic()
        for _ in range(5):
            notify.expect(lambda m: m.get("WATCHDOG") == "1", timeout=1.0)
        assert time.monotonic() - started < 1.5  # 5 pings at 0.1s, with room for a busy machine
    finally:
        notify.close()


def test_socket_activation(gateway):
    """A socket bound by the service manager (fd 3, LISTEN_FDS=1) is the one served."""
    gateway.write_conf(RETURN)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", gateway.port))
    listener.listen(64)
    try:
        fd = listener.fileno()
        command = " ".join(f"'{arg}'" for arg in gateway.command())
        launch(gateway, cmd=["sh", "-c", f"LISTEN_PID=$$ LISTEN_FDS=1 exec {command}"],
               preexec_fn=lambda: os.dup2(fd, 3), pass_fds=(3,))
        gateway.wait_serving(1)
        assert gateway.request("GET", "/a")[2] == b"one"
        assert os.stat(f"/proc/{gateway.proc.pid}/fd/3").st_ino == os.fstat(fd).st_ino
    finally:
        listener.close()
    assert gateway.request("GET", "/a")[2] == b"one"  # forkgw holds the socket now


def test_systemd_units_verify(tmp_path):
    """The shipped unit files pass systemd-analyze verify (with the installed forkgw's path)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    forkgw = shutil.which("forkgw")
    assert forkgw, "the forkgw command is not installed (pip install -e .)"
    service = ROOT / "scripts" / "forkgw.service"
    sock = ROOT / "scripts" / "forkgw.socket"
    assert service.exists() and sock.exists()
    text = service.read_text()
    assert "Type=notify" in text and "KillSignal=SIGQUIT" in text
    # verify checks that ExecStart's binary exists: point it at this machine's forkgw
    (tmp_path / "forkgw.service").write_text(text.replace("/usr/local/bin/forkgw", forkgw))
    shutil.copy(sock, tmp_path / "forkgw.socket")
    result = subprocess.run([analyze, "verify", "forkgw.service", "forkgw.socket"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


# -- user ----------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_user_nobody_runs_workers_unprivileged(gateway):
    """`user nobody;` as root: the master keeps root, the workers run as nobody and serve."""
    nobody = pwd.getpwnam("nobody")
    gateway.start(RETURN, workers=2, user="nobody")
    workers = gateway.worker_pids()
    for pid in workers:
        status = Path(f"/proc/{pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
        gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
        assert uids == [str(nobody.pw_uid)] * 4
        assert gids == [str(nobody.pw_gid)] * 4
    master_uid = re.search(r"^Uid:\s+(\d+)", Path(f"/proc/{gateway.proc.pid}/status").read_text(), re.M).group(1)
    assert master_uid == "0"
    seen = {int(gateway.request()[2]) for _ in range(10)}
    assert seen <= set(workers)
    wait_for(lambda: gateway.access_log.exists() and "GET / " in gateway.access_log.read_text(), 5)



@pytest.fixture
def open_gateway():
    """A gateway whose prefix an unprivileged worker can reach (pytest's tmp dirs are 0700)."""
    import tempfile

    from conftest import Gateway

    prefix = Path(tempfile.mkdtemp(prefix="forkgw-ops-"))
    prefix.chmod(0o755)
    gw = Gateway(prefix)
    yield gw
    gw.stop()
    bad = gw.bad_log_lines()
    shutil.rmtree(prefix, ignore_errors=True)
    assert not bad, "error log has alert/crit/emerg lines:\n" + "\n".join(bad)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_user_nobody_workers_reopen_rotated_logs(open_gateway):
    """logrotate with `user nobody;`: the workers must still get a fresh access.log."""
    gateway = open_gateway
    gateway.allowed_errors.append(r'\[alert\] .*reopen ".*" failed')
    gateway.start(RETURN, workers=1, user="nobody")
    log = gateway.access_log
    gateway.request("GET", "/before")
    wait_for(lambda: log.exists() and "/before" in log.read_text(), 5)
    log.rename(log.with_name("access.log.1"))
    gateway.signal(signal.SIGUSR1)
    wait_for(lambda: "reopening logs" in gateway.log_text(), 5)
    time.sleep(0.3)
    gateway.request("GET", "/after")
    wait_for(lambda: log.exists() and "/after" in log.read_text(), 3)
