"""proxy_pass through the real process to real upstream servers."""

from __future__ import annotations

import json
import socket
import time


from conftest import free_port


def conf(*servers: int, keepalive: int = 8, extra: str = "", location: str = "") -> str:
    lines = "".join(f"server 127.0.0.1:{p};" for p in servers)
    return f"""
http {{
    access_log logs/access.log combined;
    upstream backend {{ {lines} keepalive {keepalive}; }}
    {extra}
    server {{
        listen 127.0.0.1:{{port}};
        location / {{ proxy_pass http://backend; {location} }}
        location /api/ {{ proxy_pass http://backend/v2/; }}
        location /direct/ {{ proxy_pass http://127.0.0.1:{servers[0]}; }}
        location /fwd/ {{
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header Host $host;
            proxy_set_header X-Drop "";
            proxy_pass http://backend;
        }}
    }}
}}
"""


def echo(body: bytes) -> dict:
    return json.loads(body)


def test_proxy_forwards_request_and_headers(gateway, upstream):
    gateway.start(conf(upstream.port))
    status, headers, body = gateway.request("GET", "/hello?x=1", headers={"X-Custom": "v", "Connection": "keep-alive, X-Hop", "X-Hop": "1"})
    assert status == 200
    seen = echo(body)
    assert seen["path"] == "/hello?x=1"
    names = dict(seen["headers"])
    assert names["host"] == "backend"
    assert names["x-custom"] == "v"
    assert "x-hop" not in names  # named in Connection: hop-by-hop
    assert headers["x-upstream"] == "echo"
    assert headers["server"].startswith("forkgw")  # the upstream's Server is replaced


def test_proxy_uri_replacement(gateway, upstream):
    gateway.start(conf(upstream.port))
    assert echo(gateway.request("GET", "/api/users?id=7")[2])["path"] == "/v2/users?id=7"
    assert echo(gateway.request("GET", "/direct/a/b")[2])["path"] == "/direct/a/b"


def test_proxy_set_header(gateway, upstream):
    gateway.start(conf(upstream.port))
    body = gateway.request("GET", "/fwd/x", headers={"Host": "site.test", "X-Forwarded-For": "10.1.1.1",
                                                      "X-Drop": "gone"})[2]
    names = dict(echo(body)["headers"])
    assert names["host"] == "site.test"
    assert names["x-real-ip"] == "127.0.0.1"
    assert names["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
    assert "x-drop" not in names


def test_request_and_response_bodies(gateway, upstream):
    gateway.start(conf(upstream.port))
    payload = bytes(range(256)) * 4000  # 1 MB, every byte value
    status, _, body = gateway.request("POST", "/upload", body=payload)
    assert status == 200
    assert echo(body)["body"].encode("latin-1") == payload
    status, headers, body = gateway.request("GET", "/big/5000000")
    assert status == 200 and len(body) == 5_000_000 and headers["content-length"] == "5000000"


def test_chunked_both_ways(gateway, upstream):
    gateway.start(conf(upstream.port))
    req = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    raw = gateway.raw(req)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"200 OK" in head
    assert b'"body": "hello world"' in body
    raw = gateway.raw(b"GET /chunked/50 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body.count(b"chunk ") == 50 and body.endswith(b"0\r\n\r\n")


def test_upstream_keepalive_reuses_connections(gateway, upstream):
    gateway.start(conf(upstream.port))
    for _ in range(10):
        assert gateway.request("GET", "/k")[0] == 200
    ports = {hit[2] for hit in upstream.hits}
    assert len(ports) == 1, ports


def test_without_keepalive_each_request_connects(gateway, upstream):
    gateway.start(conf(upstream.port, keepalive=0))
    for _ in range(3):
        assert gateway.request("GET", "/k")[0] == 200
    assert len({hit[2] for hit in upstream.hits}) == 3


def test_round_robin(gateway, upstream, upstream2):
    gateway.start(conf(upstream.port, upstream2.port))
    ports = [echo(gateway.request("GET", "/rr")[2])["port"] for _ in range(10)]
    assert ports.count(upstream.port) == 5 and ports.count(upstream2.port) == 5


def test_weights(gateway, upstream, upstream2):
    body = conf(upstream.port, upstream2.port).replace(f"server 127.0.0.1:{upstream.port};",
                                                       f"server 127.0.0.1:{upstream.port} weight=3;")
    gateway.start(body)
    ports = [echo(gateway.request("GET", "/w")[2])["port"] for _ in range(8)]
    assert ports.count(upstream.port) == 6


def test_upstream_down_is_502_and_next_upstream(gateway, upstream):
    dead = free_port()
    gateway.start(conf(dead, upstream.port))
    gateway.allowed_errors.append("connect")
    for _ in range(4):
        status, _, body = gateway.request("GET", "/x")
        assert status == 200
        assert echo(body)["port"] == upstream.port
    assert "connect() failed (111: Connection refused) while connecting to upstream" in gateway.log_text()


def test_all_down_is_502(gateway):
    gateway.start(conf(free_port()))
    status, headers, body = gateway.request("GET", "/x")
    assert status == 502
    assert b"502 Bad Gateway" in body
    assert gateway.request("GET", "/x")[0] == 502


def test_slow_upstream_is_504(gateway, upstream):
    gateway.start(conf(upstream.port, extra="proxy_read_timeout 500ms; proxy_next_upstream error;"))
    start = time.monotonic()
    status, _, _ = gateway.request("GET", "/slow/3")
    assert status == 504
    assert time.monotonic() - start < 2.5
    assert "upstream timed out" in gateway.log_text()
    assert gateway.request("GET", "/fast")[0] == 200


def test_upstream_cut_mid_response_closes_client(gateway, upstream):
    gateway.start(conf(upstream.port))
    raw = gateway.raw(b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"partial")
    assert gateway.request("GET", "/after")[0] == 200


def test_expect_100_continue(gateway, upstream):
    gateway.start(conf(upstream.port))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as s:
        s.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b"data")
        data = b""
        while b'"body": "data"' not in data:
            chunk = s.recv(65536)
            assert chunk
            data += chunk


def test_head_through_proxy(gateway, upstream):
    gateway.start(conf(upstream.port))
    raw = gateway.raw(b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""


def test_upstream_error_status_passes_through(gateway, upstream):
    gateway.start(conf(upstream.port))
    assert gateway.request("GET", "/status/503")[0] == 503
    assert gateway.request("GET", "/status/404")[0] == 404


def test_access_log_records_upstream(gateway, upstream):
    gateway.start(conf(upstream.port, extra=(
        "log_format up '$status $upstream_addr $upstream_status'; access_log logs/up.log up;")))
    gateway.request("GET", "/x")
    gateway.stop()
    line = (gateway.prefix / "logs" / "up.log").read_text().splitlines()[-1]
    assert line == f"200 127.0.0.1:{upstream.port} 200"


def test_next_upstream_on_http_status(gateway, upstream, upstream2):
    """proxy_next_upstream http_503: a 503 is dropped for the next peer's answer; the last one stands."""
    body = conf(upstream.port, upstream2.port, extra="proxy_next_upstream error timeout http_503;")
    for port in (upstream.port, upstream2.port):  # no passive health: both peers every time
        body = body.replace(f"server 127.0.0.1:{port};", f"server 127.0.0.1:{port} max_fails=0;")
    gateway.start(body)
    for _ in range(4):
        status, _, body = gateway.request("GET", "/status/503")
        assert status == 503  # both peers answer 503: the last answer goes to the client
    hits = len(upstream.hits) + len(upstream2.hits)
    assert hits == 8  # every request tried both peers


def test_post_is_not_retried_after_it_was_sent(gateway, upstream, upstream2):
    """nginx never sends a non-idempotent request twice unless proxy_next_upstream says non_idempotent."""
    body = conf(upstream.port, upstream2.port, extra="proxy_next_upstream error timeout http_503;")
    gateway.start(body)
    status, _, _ = gateway.request("POST", "/status/503", body=b"x")
    assert status == 503
    assert len(upstream.hits) + len(upstream2.hits) == 1
