"""Pauses past the request headers, and trailers, through the real gateway (issue 5).

The filters are WAT modules: `verdict` holds the response head while it asks
a callout server (the `upstream` echo server: /status/CODE answers CODE,
/slow/SECONDS waits first), `check_req` / `check_resp` hold the end of a body
while a callout sees it, `trailers` marks the trailers both ways.
"""

from __future__ import annotations

import http.client
import json
import socket
import time

from conftest import wait_for
from test_bodies_callouts import (
    BUILD,
    PARENTS,
    PATH_LEN,
    PATHS,
    RET,
    TARGET,
    TOKENS,
    build,
    call_headers,
    configured_path,
    fetch,
    guest,
    slot,
    start_auth,
)
from wasm.conftest import Wat

# -- the filters -------------------------------------------------------------------------


def call_out(w: Wat, body: str = "(i32.const 0) (i32.const 0)") -> str:
    """Call TARGET + this context's configured path (with `body`), remember the context by token."""
    root = f"(i32.load {slot(PARENTS, '(local.get $ctx)')})"
    build_headers, size = call_headers(w, slot(PATHS, root, 15, 64), f"(i32.load {slot(PATH_LEN, root, 15)})")
    return f"""
    {build_headers}
    (drop (call $proxy_http_call (i32.const {TARGET}) (global.get $target_len) (i32.const {BUILD}) {size}
      {body} (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 48)))
    (i32.store {slot(TOKENS, "(i32.load (i32.const 48))")} (local.get $ctx))"""


def on_answer(w: Wat, allowed: str, refused_status: int, refused_body: str) -> str:
    """The callout's answer: 2xx runs `allowed` (in the HTTP context), anything else answers locally."""
    return f"""
  (func (export "proxy_on_http_call_response") (param $root i32) (param $token i32) (param $nh i32) (param $nb i32) (param $nt i32)
    (drop (call $proxy_set_effective_context (i32.load {slot(TOKENS, "(local.get $token)")})))
    (if (i32.and (i32.ne (local.get $nh) (i32.const 0))
                 (i32.eqz (call $proxy_get_header_map_value (i32.const 6) {w.s(':status')} {RET})))
      (then (if (i32.eq (i32.load8_u (i32.load (i32.const 16))) (i32.const 50)) (then {allowed} (return)))))
    (drop (call $proxy_send_local_response (i32.const {refused_status}) {w.s('refused')} {w.s(refused_body)}
      (i32.const 0) (i32.const 0) (i32.const -1))))"""


def verdict_module() -> bytes:
    """Holds the response head for a callout; 2xx: adds x-verdict (the callout's status) and continues."""
    w = Wat()
    allowed = (f"(drop (call $proxy_add_header_map_value (i32.const 2) {w.s('x-verdict')}"
               " (i32.load (i32.const 16)) (i32.load (i32.const 20))))"
               " (drop (call $proxy_continue_stream (i32.const 1)))")
    return w.build(configured_path() + f"""
  (func (export "proxy_on_response_headers") (param $ctx i32) (param i32 i32) (result i32)
    {call_out(w)}
    (i32.const 1))
{on_answer(w, allowed, 451, 'withheld by the filter')}""")


def check_module(btype: int) -> bytes:
    """Buffers a body; at its end sends it to the callout; 2xx: appends " [checked]" and continues."""
    w = Wat()
    export = ("proxy_on_request_body", "proxy_on_response_body")[btype]
    allowed = (f"(drop (call $proxy_set_buffer_bytes (i32.const {btype}) (i32.const -1) (i32.const 0) {w.s(' [checked]')}))"
               f" (drop (call $proxy_continue_stream (i32.const {btype})))")
    body = "(i32.load (i32.const 16)) (i32.load (i32.const 20))"
    return w.build(configured_path() + f"""
  (func (export "{export}") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (local.get $eos) (then
      (drop (call $proxy_get_buffer_bytes (i32.const {btype}) (i32.const 0) (local.get $size) {RET}))
      {call_out(w, body)}))
    (i32.const 1))
{on_answer(w, allowed, 403, 'body refused')}""")


def trailers_module() -> bytes:
    """Adds x-wasm: req / resp to the request / response trailers and logs how many there were."""
    w = Wat()
    code = ""
    for export, map_type, mark in (("proxy_on_request_trailers", 1, "req"), ("proxy_on_response_trailers", 3, "resp")):
        code += f"""
  (func (export "{export}") (param $ctx i32) (param $n i32) (result i32)
    (call $log_num {w.s(f'{mark}_trailers')} (local.get $n))
    (drop (call $proxy_add_header_map_value (i32.const {map_type}) {w.s('x-wasm')} {w.s(mark)}))
    (i32.const 0))"""
    return w.build(code)


CONF = """
wasm {
    module verdict {filters}/verdict.wasm authsrv;
    module check_req {filters}/check_req.wasm authsrv;
    module check_resp {filters}/check_resp.wasm authsrv;
    module trailers {filters}/trailers.wasm;
}
http {
    upstream authsrv { server {auth}; }
    server { listen 127.0.0.1:{port};
        location /held/ { proxy_pass http://{backend}; proxy_wasm verdict /status/200; }
        location /held-ret { return 200 "held and released"; proxy_wasm verdict /status/204; }
        location /held-slow/ { proxy_pass http://{backend}; proxy_wasm verdict /slow/0.6; }
        location /withheld/ { proxy_pass http://{backend}; proxy_wasm verdict /status/403; }
        location /upload/ { proxy_pass http://{backend}; proxy_wasm check_req /status/200; }
        location /upload-refused/ { proxy_pass http://{backend}; proxy_wasm check_req /status/403; }
        location /download/ { proxy_pass http://{backend}; proxy_wasm check_resp /status/200; }
        location /download-refused/ { proxy_pass http://{backend}; proxy_wasm check_resp /status/403; }
        location /marked/ { proxy_pass http://{backend}/; proxy_wasm trailers; }
        location /plain/ { proxy_pass http://{backend}/; }
    }
    server { listen 127.0.0.1:{short_port}; send_timeout 300ms;
        location / { return 200 "never"; proxy_wasm verdict /slow/1; }
    }
}"""


def start(gateway, upstream, upstream2, workers=2):
    filters = build(gateway, verdict=verdict_module(), check_req=check_module(0), check_resp=check_module(1),
                    trailers=trailers_module())
    conf = CONF.replace("{filters}", filters).replace("{auth}", f"127.0.0.1:{upstream.port}")
    return gateway.start(conf.replace("{backend}", f"127.0.0.1:{upstream2.port}"), workers=workers)


def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes (the requests say Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def chunked_post(path: str, trailers: bytes, version: bytes = b"1.1") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/" + version + b"\r\nHost: t\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n" + trailers + b"\r\n")


def echoed(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return json.loads(body)


# -- response head and body ends held for a callout ---------------------------------------


def test_response_head_is_held_until_the_callout_answers(gateway, upstream, upstream2):
    start(gateway, upstream, upstream2)
    pids = sorted(gateway.worker_pids())
    for i in range(6):  # both workers, fresh connections
        status, headers, body = fetch(gateway, "GET", f"/held/item{i}")
        assert status == 200 and headers["x-verdict"] == "200", (status, headers)
        assert json.loads(body)["path"] == f"/held/item{i}"
        assert int(headers["content-length"]) == len(body)  # the upstream's framing went through unchanged
    status, headers, body = fetch(gateway, "GET", "/held-ret")
    assert (status, headers["x-verdict"], body) == (200, "204", b"held and released")
    status, headers, body = fetch(gateway, "GET", "/withheld/x")
    assert (status, body) == (451, b"withheld by the filter")
    assert "x-verdict" not in headers and "x-upstream" not in headers
    # keep-alive goes on after held responses, local replies included
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    for path in ("/held/a", "/withheld/b", "/held-ret", "/held/c"):
        status, headers, _ = fetch(gateway, "GET", path, conn=conn)
        assert status in (200, 451)
    conn.close()
    assert sorted(gateway.worker_pids()) == pids  # no worker died on the way


def test_a_held_response_is_bounded_by_send_timeout(gateway, upstream, upstream2):
    start(gateway, upstream, upstream2, workers=1)
    status, _, _ = fetch(gateway, "GET", "/", port=gateway.ports["short_port"])
    assert status == 504
    assert "filters did not resume the response in time" in gateway.log_text()
    status, _, body = fetch(gateway, "GET", "/held-ret")
    assert (status, body) == (200, b"held and released")


def test_client_gone_while_the_response_is_held(gateway, upstream, upstream2):
    """done/log/delete run for a request whose client left while its response head waited."""
    start(gateway, upstream, upstream2, workers=1)
    pids = sorted(gateway.worker_pids())
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", gateway.port))
        s.sendall(b"GET /held-slow/x HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)  # the upstream answered; the head waits for the callout (0.6 s)
        s.close()
    contexts = {ctx for _, ctx in guest(gateway, "request_headers")}
    wait_for(lambda: len(contexts) == 3 and contexts <= {ctx for _, ctx in guest(gateway, "delete")}, timeout=5)
    time.sleep(0.8)  # the callouts' late answers only clean up
    for kind in ("done", "log"):
        assert contexts <= {ctx for _, ctx in guest(gateway, kind)}, kind
    status, headers, _ = fetch(gateway, "GET", "/held/after")
    assert status == 200 and headers["x-verdict"] == "200"
    assert sorted(gateway.worker_pids()) == pids


def test_end_of_request_body_is_held_for_a_callout_that_may_extend_it(gateway, upstream, upstream2):
    start(gateway, upstream, upstream2)
    for size in (5, 70_000):
        payload = b"p" * size
        status, _, body = fetch(gateway, "POST", "/upload/x", body=payload)
        seen = json.loads(body)
        assert status == 200 and seen["body"] == payload.decode() + " [checked]"
        assert dict(seen["headers"])["content-length"] == str(size + 10)
    # the callout saw the body
    assert any(hit[0] == "GET" and hit[1] == "/status/200" for hit in upstream.hits)
    status, _, body = fetch(gateway, "POST", "/upload-refused/x", body=b"bad body")
    assert (status, body) == (403, b"body refused")
    assert not any(hit[1] == "/upload-refused/x" for hit in upstream2.hits)


def test_end_of_response_body_is_held_for_a_callout(gateway, upstream, upstream2):
    start(gateway, upstream, upstream2)
    pids = sorted(gateway.worker_pids())
    status, headers, body = fetch(gateway, "GET", "/download/x")
    assert status == 200 and body.endswith(b"} [checked]"), body
    assert json.loads(body[: -len(" [checked]")])["path"] == "/download/x"
    # refused after the head went out: nothing to answer with but a cut connection
    response = exchange(gateway.port, b"GET /download-refused/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 ") and not response.endswith(b"0\r\n\r\n")
    assert "a filter answered 403 after the response head was sent" in gateway.log_text()
    assert sorted(gateway.worker_pids()) == pids  # no worker died on the way


def test_request_body_waits_in_the_buffer_while_the_headers_are_paused(gateway, upstream, upstream2):
    """Body bytes that arrive with a head held by a callout are kept for after the resume."""
    start_auth(gateway, upstream, upstream2)
    head = b"POST /allowed/b HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 11\r\n\r\n"
    response = exchange(gateway.port, head + b"hello world")
    assert response.startswith(b"HTTP/1.1 200 ")
    assert echoed(response)["body"] == "hello world"


# -- trailers -----------------------------------------------------------------------------


def test_trailers_go_both_ways_through_the_filters(gateway, upstream, upstream2):
    start(gateway, upstream, upstream2)
    response = exchange(gateway.port, chunked_post("/marked/echo", b"X-Sum: 42\r\n"))
    seen = echoed(response)
    assert seen["body"] == "hello world"
    assert seen["trailers"] == [["x-sum", "42"], ["x-wasm", "req"]]
    response = exchange(gateway.port, b"GET /marked/trailers HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert b"chunk 0\n" in response and b"chunk 1\n" in response
    assert response.endswith(b"0\r\nx-checksum: abc\r\nx-upstream-trailer: 1\r\nx-wasm: resp\r\n\r\n"), response
    log = gateway.log_text()
    assert "req_trailers=1" in log and "resp_trailers=2" in log


def test_trailers_pass_without_filters_and_are_dropped_where_framing_cannot_carry_them(gateway, upstream, upstream2):
    start(gateway, upstream, upstream2, workers=1)
    pids = sorted(gateway.worker_pids())
    assert echoed(exchange(gateway.port, chunked_post("/plain/echo", b"X-Sum: 42\r\n")))["trailers"] == [["x-sum", "42"]]
    response = exchange(gateway.port, b"GET /plain/trailers HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert response.endswith(b"0\r\nx-checksum: abc\r\nx-upstream-trailer: 1\r\n\r\n")
    # HTTP/1.0 gets the body close-delimited: the trailers have nowhere to go
    response = exchange(gateway.port, b"GET /marked/trailers HTTP/1.0\r\nHost: t\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"chunk 1\n")
    assert b"x-checksum" not in response
    assert sorted(gateway.worker_pids()) == pids  # no worker died on the way
