"""The gateway core through the real process: return, routing, HTTP behaviour, logs."""

from __future__ import annotations

import re
import signal
import socket
import time

from conftest import wait_for

SIMPLE = """
http {
    access_log logs/access.log combined;
    server {
        listen 127.0.0.1:{port};
        location / { return 200 "root\\n"; }
        location = /exact { return 200 "exact"; }
        location /moved { return 301 /new; }
        location /teapot { return 418; }
        location /empty { return 204; }
        location /hdr { add_header X-Added yes; add_header X-Always on always; return 200 ok; }
        location /missing { add_header X-Added yes; add_header X-Always on always; return 404; }
        location /var { return 200 "$request_method $request_uri $host"; }
    }
}
"""


def test_return_text_and_standard_headers(gateway):
    gateway.start(SIMPLE)
    status, headers, body = gateway.request("GET", "/anything")
    assert status == 200
    assert body == b"root\n"
    assert headers["server"].startswith("forkgw/")
    assert headers["content-type"] == "text/plain"
    assert headers["content-length"] == "5"
    assert re.match(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", headers["date"])


def test_exact_location_redirect_and_error_page(gateway):
    gateway.start(SIMPLE)
    assert gateway.request("GET", "/exact")[2] == b"exact"
    status, headers, body = gateway.request("GET", "/moved")
    assert status == 301
    assert headers["location"] == f"http://127.0.0.1:{gateway.port}/new"
    assert b"<h1>301 Moved Permanently</h1>" in body
    status, _, body = gateway.request("GET", "/teapot")
    assert status == 418
    status, headers, body = gateway.request("GET", "/empty")
    assert status == 204 and body == b""


def test_add_header_respects_always(gateway):
    gateway.start(SIMPLE)
    _, headers, _ = gateway.request("GET", "/hdr")
    assert headers["x-added"] == "yes" and headers["x-always"] == "on"
    status, headers, _ = gateway.request("GET", "/missing")
    assert status == 404
    assert "x-added" not in headers and headers["x-always"] == "on"


def test_variables_in_return(gateway):
    gateway.start(SIMPLE)
    _, _, body = gateway.request("GET", "/var?a=1", headers={"Host": "example.test"})
    assert body == b"GET /var?a=1 example.test"


def test_head_has_no_body(gateway):
    gateway.start(SIMPLE)
    raw = gateway.raw(b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Length: 5" in head
    assert body == b""


def test_keepalive_and_pipelining(gateway):
    gateway.start(SIMPLE)
    raw = gateway.raw(b"GET /exact HTTP/1.1\r\nHost: x\r\n\r\n"
                      b"GET /var HTTP/1.1\r\nHost: y\r\n\r\n"
                      b"GET /exact HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 OK") == 3
    assert raw.index(b"exact") < raw.index(b"GET /var y") < raw.rindex(b"exact")
    assert raw.endswith(b"exact")


def test_http10_closes_after_response(gateway):
    gateway.start(SIMPLE)
    raw = gateway.raw(b"GET /exact HTTP/1.0\r\n\r\n", timeout=3)
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"exact")


def test_malformed_request_gets_400_and_worker_lives(gateway):
    gateway.start(SIMPLE)
    raw = gateway.raw(b"GET / HTTP/1.1\r\nHost x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 Bad Request")
    raw = gateway.raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40)
    assert raw.startswith(b"HTTP/1.1 400")
    assert gateway.request("GET", "/exact")[2] == b"exact"


def test_missing_host_on_http11_is_400(gateway):
    gateway.start(SIMPLE)
    raw = gateway.raw(b"GET / HTTP/1.1\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")


def test_oversized_headers(gateway):
    gateway.start(SIMPLE.replace("http {", "http { large_client_header_buffers 2 1k;"))
    raw = gateway.raw(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 431")
    raw = gateway.raw(b"GET /" + b"u" * 1500 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 414")
    assert gateway.request("GET", "/exact")[0] == 200


def test_body_over_client_max_body_size_is_413(gateway):
    gateway.start(SIMPLE.replace("http {", "http { client_max_body_size 1k;"))
    status, _, _ = gateway.request("POST", "/exact", body=b"x" * 5000)
    assert status == 413
    assert gateway.request("POST", "/exact", body=b"x" * 100)[0] == 200


def test_server_name_selection(gateway):
    gateway.start("""
http {
    server { listen 127.0.0.1:{port}; server_name a.test; return 200 a; }
    server { listen 127.0.0.1:{port} default_server; server_name b.test; return 200 b; }
    server { listen 127.0.0.1:{port}; server_name *.wild.test; return 200 wild; }
    server { listen 127.0.0.1:{port}; server_name ~^re\\d+\\.test$; return 200 regex; }
}
""")
    assert gateway.request(headers={"Host": "a.test"})[2] == b"a"
    assert gateway.request(headers={"Host": "A.TEST:80"})[2] == b"a"
    assert gateway.request(headers={"Host": "x.wild.test"})[2] == b"wild"
    assert gateway.request(headers={"Host": "re42.test"})[2] == b"regex"
    assert gateway.request(headers={"Host": "unknown.test"})[2] == b"b"


def test_server_tokens_off(gateway):
    gateway.start(SIMPLE.replace("http {", "http { server_tokens off;"))
    status, headers, body = gateway.request("GET", "/teapot")
    assert headers["server"] == "forkgw"
    assert b"forkgw/" not in body


def test_access_log_combined(gateway):
    gateway.start(SIMPLE)
    gateway.request("GET", "/exact?q=1", headers={"User-Agent": "probe/1", "Referer": "http://r/"})
    gateway.stop()
    line = gateway.access_log.read_text().splitlines()[-1]
    assert re.match(
        r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "GET /exact\?q=1 HTTP/1\.1" 200 5 '
        r'"http://r/" "probe/1"$', line), line


def test_custom_log_format(gateway):
    gateway.start("""
http {
    log_format timing '$request_method $status $request_time $upstream_addr $sent_http_content_type';
    access_log logs/access.log timing;
    server { listen 127.0.0.1:{port}; return 200 ok; }
}
""")
    gateway.request("GET", "/")
    gateway.stop()
    assert re.match(r"GET 200 \d+\.\d{3} - text/plain$", gateway.access_log.read_text().splitlines()[-1])


def test_slow_client_header_timeout_closes(gateway):
    gateway.start(SIMPLE.replace("http {", "http { client_header_timeout 1s;"))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        assert s.recv(100) == b""
        assert 0.5 < time.monotonic() - start < 4
    assert gateway.request("GET", "/exact")[0] == 200


def test_idle_keepalive_timeout_closes(gateway):
    gateway.start(SIMPLE.replace("http {", "http { keepalive_timeout 1s;"))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as s:
        s.sendall(b"GET /exact HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(1000).endswith(b"exact")
        start = time.monotonic()
        assert s.recv(100) == b""
        assert 0.5 < time.monotonic() - start < 4


def test_keepalive_requests_limit(gateway):
    gateway.start(SIMPLE.replace("http {", "http { keepalive_requests 2;"))
    raw = gateway.raw(b"GET /exact HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
    assert raw.count(b"HTTP/1.1 200") == 2
    assert b"Connection: close" in raw


def test_killed_worker_is_respawned(gateway):
    gateway.start(SIMPLE, workers=2)
    gateway.allowed_errors.append(r"exited on signal 9")
    pids = wait_for(lambda: len(gateway.worker_pids()) == 2 and gateway.worker_pids())
    import os
    os.kill(pids[0], signal.SIGKILL)
    assert gateway.request("GET", "/exact")[0] == 200
    new = wait_for(lambda: (p := gateway.worker_pids()) and len(p) == 2 and pids[0] not in p and p)
    assert pids[1] in new
    for _ in range(20):
        assert gateway.request("GET", "/exact")[0] == 200
    assert f"worker process {pids[0]} exited on signal 9" in gateway.log_text()


def test_process_titles(gateway):
    gateway.start(SIMPLE, workers=2)
    import subprocess
    out = subprocess.run(["ps", "-o", "args=", "-p", str(gateway.proc.pid)], capture_output=True,
                         text=True).stdout
    assert out.startswith("forkgw: master process")
    workers = subprocess.run(["ps", "-o", "args=", "--ppid", str(gateway.proc.pid)], capture_output=True,
                             text=True).stdout.split("\n")
    assert sum(line.strip() == "forkgw: worker process" for line in workers) == 2


def test_stopped_worker_is_replaced_by_the_watchdog(gateway):
    gateway.start(SIMPLE.replace("http {", "worker_watchdog_timeout 1s;\nhttp {", 1), workers=2)
    gateway.allowed_errors += [r"is not responding", r"exited on signal 9"]
    pids = wait_for(lambda: len(gateway.worker_pids()) == 2 and gateway.worker_pids())
    import os
    os.kill(pids[0], signal.SIGSTOP)
    new = wait_for(lambda: (p := gateway.worker_pids()) and len(p) == 2 and pids[0] not in p and p, timeout=8)
    assert pids[1] in new
    assert f"worker process {pids[0]} is not responding" in gateway.log_text()
    for _ in range(10):
        assert gateway.request("GET", "/exact")[0] == 200


def test_metrics_endpoint_counts_every_worker(gateway):
    gateway.start(SIMPLE.replace('location = /exact', 'location = /metrics { forkgw_metrics; }\n        location = /exact'),
                  workers=2)
    for _ in range(20):
        assert gateway.request("GET", "/exact")[0] == 200
    for _ in range(3):
        assert gateway.request("GET", "/teapot")[0] == 418
    status, headers, body = gateway.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert re.search(r'^forkgw_http_requests_total\{status="200"\} 20$', text, re.M), text
    assert re.search(r'^forkgw_http_requests_total\{status="418"\} 3$', text, re.M)
    assert re.search(r"^forkgw_connections_accepted_total 2[4-9]$", text, re.M)
    assert re.search(r"^forkgw_request_duration_seconds_count 23$", text, re.M)
    assert "# TYPE forkgw_http_requests_total counter" in text


def test_reuseport_gives_each_worker_its_own_socket(gateway):
    gateway.start("""
http {
    server { listen 127.0.0.1:{port} reuseport; location / { return 200 "$pid"; } }
}
""", workers=2)
    pids = {gateway.request("GET", "/")[2] for _ in range(60)}
    assert len(pids) == 2  # the kernel spreads new connections over both workers' sockets
    workers = gateway.worker_pids()
    import subprocess
    listening = subprocess.run(["ss", "-ltnpH", f"sport = :{gateway.port}"], capture_output=True, text=True).stdout
    assert sum(f"pid={w}," in listening for w in workers) == 2, listening


def test_worker_cpu_affinity_auto_pins_each_worker(gateway):
    import os
    if len(os.sched_getaffinity(0)) < 2:
        import pytest
        pytest.skip("one CPU: nothing to spread")
    gateway.start(SIMPLE.replace("http {", "worker_cpu_affinity auto;\nhttp {", 1), workers=2)
    pids = wait_for(lambda: len(gateway.worker_pids()) == 2 and gateway.worker_pids())
    pinned = [os.sched_getaffinity(pid) for pid in pids]
    assert all(len(cpus) == 1 for cpus in pinned) and pinned[0] != pinned[1], pinned
    assert gateway.request("GET", "/exact")[0] == 200
