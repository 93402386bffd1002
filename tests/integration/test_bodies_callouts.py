"""Bodies, HTTP callouts, paused requests and ticks through the real gateway (issue 5).

The filters are WAT modules built here (with tests/wasm's `Wat` prelude) and
written into the gateway's prefix: `auth` authorizes each request by a callout
(the behaviour of the Rust SDK's http_auth_random: pause, then resume or
answer from the callout's callback), `upper` rewrites bodies as they stream,
`replace` buffers a whole body then replaces it (the Rust SDK's http_body),
`ticker` ticks at a period and calls out from its ticks (hello_world).
The callout server is the `upstream` echo server: /status/CODE answers CODE,
/slow/SECONDS waits first.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import time
from collections import defaultdict

from conftest import wait_for
from wasm.conftest import Wat, pairs_bytes
from wasm.test_bodies import body_cb, upper

RET = "(i32.const 16) (i32.const 20)"

# -- the filters -------------------------------------------------------------------------

TARGET, PATH_LEN, PATHS, PARENTS, TOKENS, BUILD = 0x8000, 0x8100, 0x8200, 0x9000, 0xA000, 0xB000


def slot(base: int, index: str, mask: int = 1023, width: int = 4) -> str:
    return f"(i32.add (i32.const {base}) (i32.mul (i32.and {index} (i32.const {mask})) (i32.const {width})))"


def vm_target() -> str:
    """on_vm_start: the VM configuration is the callout target (an upstream name or ip:port)."""
    return f"""
  (global $target_len (mut i32) (i32.const 0))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (if (i32.eqz (call $proxy_get_buffer_bytes (i32.const 6) (i32.const 0) (i32.const 64) {RET}))
      (then (memory.copy (i32.const {TARGET}) (i32.load (i32.const 16)) (i32.load (i32.const 20)))
            (global.set $target_len (i32.load (i32.const 20)))))
    (i32.const 1))"""


def call_headers(w: Wat, path_ptr: str, path_len: str) -> tuple[str, str]:
    """Code that serializes :method GET, :authority, then :path = (ptr, len) at BUILD; and the pairs' size."""
    fixed = [(b":method", b"GET"), (b":authority", b"auth.local")]
    head = struct.pack("<I", 3) + b"".join(struct.pack("<II", len(k), len(v)) for k, v in fixed)
    head += struct.pack("<II", 5, 0) + b"".join(k + b"\0" + v + b"\0" for k, v in fixed) + b":path\0"
    size_at = 4 + 8 * len(fixed) + 4
    code = f"""
    (memory.copy (i32.const {BUILD}) {w.s(head)})
    (i32.store (i32.const {BUILD + size_at}) {path_len})
    (memory.copy (i32.const {BUILD + len(head)}) {path_ptr} {path_len})
    (i32.store8 (i32.add (i32.const {BUILD + len(head)}) {path_len}) (i32.const 0))"""
    return code, f"(i32.add (i32.const {len(head) + 1}) {path_len})"


def configured_path() -> str:
    """vm_target(), and on_configure keeps the plugin config (a callout path) per root;
    contexts remember their root."""
    root_path = slot(PATHS, "(local.get $root)", 15, 64)
    return vm_target() + f"""
  (func (export "proxy_on_configure") (param $root i32) (param i32) (result i32)
    (if (i32.eqz (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const 63) {RET}))
      (then (memory.copy {root_path} (i32.load (i32.const 16)) (i32.load (i32.const 20)))
            (i32.store {slot(PATH_LEN, "(local.get $root)", 15)} (i32.load (i32.const 20)))))
    (i32.const 1))
  (func (export "proxy_on_context_create") (param $ctx i32) (param $parent i32)
    (i32.store {slot(PARENTS, "(local.get $ctx)")} (local.get $parent)))"""


def auth_module() -> bytes:
    """Each request: a callout to TARGET + the plugin config (a path); 2xx -> resume with x-auth, else 403.

    A 204 answer makes it do nothing at all (the host resumes: Kong's rule); a failed
    call (counts 0) answers 503.  Logs paused=<ctx>, answer=<ctx>, done/log/delete.
    """
    w = Wat()
    root_path = slot(PATHS, "(local.get $root)", 15, 64)
    build, size = call_headers(w, root_path, "(local.get $plen)")
    local = pairs_bytes([(b"x-denied-by", b"auth")])
    return w.build(configured_path() + f"""
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (local $root i32) (local $plen i32) (local $status i32)
    (local.set $root (i32.load {slot(PARENTS, "(local.get $ctx)")}))
    (local.set $plen (i32.load {slot(PATH_LEN, "(local.get $root)", 15)}))
    {build}
    (local.set $status (call $proxy_http_call (i32.const {TARGET}) (global.get $target_len)
      (i32.const {BUILD}) {size} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 1000) (i32.const 48)))
    (if (local.get $status) (then
      (call $log_num {w.s('dispatch_failed')} (local.get $status))
      (drop (call $proxy_send_local_response (i32.const 500) {w.s('no callout')} {w.s('no callout')}
        (i32.const 0) (i32.const 0) (i32.const -1)))
      (return (i32.const 0))))
    (i32.store {slot(TOKENS, "(i32.load (i32.const 48))")} (local.get $ctx))
    (call $log_num {w.s('paused')} (local.get $ctx))
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param $root i32) (param $token i32) (param $nh i32) (param $nb i32) (param $nt i32)
    (local $ctx i32) (local $p i32)
    (local.set $ctx (i32.load {slot(TOKENS, "(local.get $token)")}))
    (call $log_num {w.s('answer')} (local.get $ctx))
    (drop (call $proxy_set_effective_context (local.get $ctx)))
    (if (i32.eqz (local.get $nh)) (then
      (drop (call $proxy_send_local_response (i32.const 503) {w.s('auth down')} {w.s('auth unavailable')}
        (i32.const 0) (i32.const 0) (i32.const -1)))
      (return)))
    (if (i32.eqz (call $proxy_get_header_map_value (i32.const 6) {w.s(':status')} {RET})) (then
      (local.set $p (i32.load (i32.const 16)))
      (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 50)) (then
        (if (i32.eq (i32.load8_u (i32.add (local.get $p) (i32.const 2))) (i32.const 52)) (then
          (call $log {w.s('nothing')})
          (return)))
        (drop (call $proxy_add_header_map_value (i32.const 0) {w.s('x-auth')} {w.s('granted')}))
        (drop (call $proxy_continue_stream (i32.const 0)))
        (return)))))
    (drop (call $proxy_send_local_response (i32.const 403) {w.s('denied')} {w.s('access denied')}
      {w.s(local)} (i32.const -1))))""")


def upper_module() -> bytes:
    """Streams both bodies uppercased, and appends a marker at the end (the length changes)."""
    w = Wat()
    tail = {0: w.s(" [REQ-FILTERED]"), 1: w.s("\n[RESP-FILTERED]\n")}
    code = ""
    for export, btype in (("proxy_on_request_body", 0), ("proxy_on_response_body", 1)):
        code += body_cb(export, upper(btype) + f"""
    (if (local.get $eos) (then (drop (call $proxy_set_buffer_bytes (i32.const {btype}) (i32.const -1) (i32.const 0)
      {tail[btype]}))))""")
    return w.build(code)


def replace_module(response: bool = True) -> bytes:
    """Pauses each body until its end, then replaces it with "replaced N bytes (first 'c')"."""
    w = Wat()
    code = ""
    for export, btype in (("proxy_on_request_body", 0), ("proxy_on_response_body", 1))[: 2 if response else 1]:
        code += body_cb(export, f"""
    (local $n i32)
    (if (local.get $eos) (then
      (memory.copy (i32.const {BUILD}) {w.s('replaced ')})
      (local.set $n (i32.add (i32.const {BUILD + 9}) (call $itoa (local.get $size) (i32.const {BUILD + 9}))))
      (memory.copy (local.get $n) {w.s(" bytes (first '")})
      (local.set $n (i32.add (local.get $n) (i32.const 15)))
      (drop (call $proxy_get_buffer_bytes (i32.const {btype}) (i32.const 0) (i32.const 1) {RET}))
      (i32.store8 (local.get $n) (i32.load8_u (i32.load (i32.const 16))))
      (i32.store (i32.add (local.get $n) (i32.const 1)) (i32.const 0x0a2927))
      (drop (call $proxy_set_buffer_bytes (i32.const {btype}) (i32.const 0) (local.get $size)
        (i32.const {BUILD}) (i32.sub (i32.add (local.get $n) (i32.const 4)) (i32.const {BUILD}))))))""",
            "(i32.eqz (local.get $eos))")
    return w.build(code)


def ticker_module(period_ms: int) -> bytes:
    """Ticks every period (set in on_configure); each tick calls TARGET /status/200 and logs the answer."""
    w = Wat()
    build, size = call_headers(w, w.s("/status/200").split(") ", 1)[0] + ")", "(i32.const 11)")
    return w.build(vm_target() + f"""
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $proxy_set_tick_period_milliseconds (i32.const {period_ms}))) (i32.const 1))
  (func (export "proxy_on_tick") (param $root i32)
    (call $log_num {w.s('tick')} (local.get $root))
    {build}
    (call $log_num {w.s('tick_call')} (call $proxy_http_call (i32.const {TARGET}) (global.get $target_len)
      (i32.const {BUILD}) {size} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 1000) (i32.const 48))))
  (func (export "proxy_on_http_call_response") (param $root i32) (param $token i32) (param $nh i32) (param $nb i32) (param $nt i32)
    (if (i32.eqz (call $proxy_get_header_map_value (i32.const 6) {w.s(':status')} {RET}))
      (then (call $log_ret {w.s('tick_answer')}))))""")


def build(gateway, **modules: bytes) -> str:
    return str(gateway.write_filters(**modules))


def guest(gateway, what: str, sep: str = "=") -> list[tuple[int, str]]:
    """(worker pid, value) of every `what=value` (or `what:value`) a filter logged."""
    return [(int(pid), value) for pid, value in
            re.findall(r"\] (\d+)#0: .*?: " + re.escape(what + sep) + r"(\S+)", gateway.log_text())]


def fetch(gateway, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
          conn: http.client.HTTPConnection | None = None, port: int | None = None):
    return gateway.request(method, path, headers=headers, body=body, port=port, conn=conn)


AUTH_CONF = """
wasm {
    module auth {filters}/auth.wasm authsrv;
    module auth_down {filters}/auth.wasm 127.0.0.1:{closed_port};
}
http {
    upstream authsrv { server {auth}; }
    server { listen 127.0.0.1:{port};
        location /allowed/ { proxy_pass http://{backend}; proxy_wasm auth /status/200; }
        location /ret { return 200 "welcome"; proxy_wasm auth /status/200; }
        location /kong { return 200 "resumed"; proxy_wasm auth /status/204; }
        location /denied/ { proxy_pass http://{backend}; proxy_wasm auth /status/403; }
        location /slow { return 200 "too late"; proxy_wasm auth /slow/3; }
        location /hold { return 200 "held"; proxy_wasm auth /slow/0.6; }
        location /down { return 200 "unreachable"; proxy_wasm auth_down /status/200; }
        location /plain { return 200 "welcome"; }
    }
    server { listen 127.0.0.1:{short_port}; client_header_timeout 300ms;
        location / { return 200 "never"; proxy_wasm auth /slow/1; }
    }
}"""


def start_auth(gateway, upstream, upstream2, workers=2):
    conf = AUTH_CONF.replace("{filters}", build(gateway, auth=auth_module()))
    conf = conf.replace("{auth}", f"127.0.0.1:{upstream.port}").replace("{backend}", f"127.0.0.1:{upstream2.port}")
    return gateway.start(conf, workers=workers)


# -- callouts ---------------------------------------------------------------------------


def test_auth_by_callout_allowed_denied_timeout_and_down(gateway, upstream, upstream2):
    start_auth(gateway, upstream, upstream2)
    for i in range(10):  # both workers, fresh connections
        status, headers, body = fetch(gateway, "GET", f"/allowed/item{i}")
        assert status == 200, body
        echo = json.loads(body)
        assert echo["path"] == f"/allowed/item{i}"
        assert ["x-auth", "granted"] in echo["headers"]  # added from the callout's callback
    assert fetch(gateway, "GET", "/ret")[::2] == (200, b"welcome")
    status, headers, body = fetch(gateway, "GET", "/kong")
    assert (status, body) == (200, b"resumed")
    assert "neither resumed nor answered the request after its last http callout" in gateway.log_text()

    backend_hits = len(upstream2.hits)
    status, headers, body = fetch(gateway, "GET", "/denied/x")
    assert (status, body, headers.get("x-denied-by")) == (403, b"access denied", "auth")
    assert len(upstream2.hits) == backend_hits  # never proxied

    started = time.monotonic()
    status, _, body = fetch(gateway, "GET", "/slow")
    assert (status, body) == (503, b"auth unavailable")
    assert 0.9 <= time.monotonic() - started < 2.5  # the filter's 1000 ms timeout
    assert "http callout timed out" in gateway.log_text()

    status, _, body = fetch(gateway, "GET", "/down")
    assert (status, body) == (503, b"auth unavailable")

    # keep-alive: several paused requests in a row on one connection
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        for _ in range(5):
            assert fetch(gateway, "GET", "/ret", conn=conn)[::2] == (200, b"welcome")
        assert fetch(gateway, "GET", "/denied/y", conn=conn)[0] == 403
    finally:
        conn.close()
    assert len(upstream.hits) >= 15


def test_client_gone_while_paused_and_worker_timeout(gateway, upstream, upstream2):
    """done/log/delete run for a request whose client left, or that the worker timed out while paused."""
    start_auth(gateway, upstream, upstream2, workers=1)
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", gateway.port))
        s.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.1)
        s.close()  # while the callout (0.6 s) is in flight
    status, _, body = fetch(gateway, "GET", "/hold")  # another request meanwhile: fine
    assert (status, body) == (200, b"held")

    # the worker's client_header_timeout (300 ms) ends the wait: 504; the callout's late answer only cleans up
    status, _, _ = fetch(gateway, "GET", "/", port=gateway.ports["short_port"])
    assert status == 504

    def all_finished():
        paused = {ctx for _, ctx in guest(gateway, "paused")}
        deleted = {ctx for _, ctx in guest(gateway, "delete")}
        return len(paused) == 5 and paused <= deleted
    wait_for(all_finished, timeout=5)
    time.sleep(1.2)  # the timed-out request's callout (1 s) comes back
    paused = [ctx for _, ctx in guest(gateway, "paused")]
    answered = [ctx for _, ctx in guest(gateway, "answer")]
    assert paused[-1] not in answered  # no callback for a deleted context
    for kind in ("done", "log", "delete"):
        assert set(paused) <= {ctx for _, ctx in guest(gateway, kind)}, kind
    assert "filters did not resume the request in time" in gateway.log_text()
    for _ in range(3):
        assert fetch(gateway, "GET", "/ret")[::2] == (200, b"welcome")


def test_callout_overhead(gateway, upstream, upstream2):
    """Requests with a callout against the same route without filters, same run (printed for the record)."""
    start_auth(gateway, upstream, upstream2, workers=1)

    def timed(path: str, n: int) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        try:
            fetch(gateway, "GET", path, conn=conn)
            started = time.perf_counter()
            for _ in range(n):
                assert fetch(gateway, "GET", path, conn=conn)[0] == 200
            return (time.perf_counter() - started) / n
        finally:
            conn.close()

    rounds = [(timed("/plain", 200), timed("/ret", 200)) for _ in range(3)]
    plain = min(r[0] for r in rounds)
    callout = min(r[1] for r in rounds)
    print(f"\ncallout overhead: {plain * 1e6:.0f} us per request without filters, {callout * 1e6:.0f} us with "
          f"an auth callout (+{(callout - plain) * 1e6:.0f} us; the echo server's own time included)")
    assert callout > plain


# -- bodies ---------------------------------------------------------------------------------


BODY_CONF = """
wasm {
    module upper {filters}/upper.wasm;
    module replace {filters}/replace.wasm;
    module replace_req {filters}/replace_req.wasm;
    body_buffer_size 64k;
}
http { server { listen 127.0.0.1:{port};
    location /upper/ { proxy_pass http://{backend}/; proxy_wasm upper; }
    location /replace/ { proxy_pass http://{backend}/; proxy_wasm replace; }
    location /reqonly/ { proxy_pass http://{backend}/; proxy_wasm replace_req; }
    location /chain/ { proxy_pass http://{backend}/; proxy_wasm replace; proxy_wasm upper; }
    location /ret { return 200 "hello from return"; proxy_wasm upper; }
} }"""


def start_bodies(gateway, upstream, workers=2):
    conf = BODY_CONF.replace("{filters}", build(gateway, upper=upper_module(), replace=replace_module(),
                                         replace_req=replace_module(response=False)))
    return gateway.start(conf.replace("{backend}", f"127.0.0.1:{upstream.port}"), workers=workers)


def raw(gateway, request: bytes) -> tuple[bytes, bytes]:
    """(head, body) of a response read until the server closes."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_body_rewrite_both_ways(gateway, upstream):
    start_bodies(gateway, upstream)
    status, headers, body = fetch(gateway, "POST", "/upper/echo", b"hello world",
                                  {"content-type": "text/plain"})
    assert status == 200
    assert headers.get("transfer-encoding") == "chunked" and "content-length" not in headers
    assert body.endswith(b"\n[RESP-FILTERED]\n")
    echo = json.loads(body[: -len(b"\n[RESP-FILTERED]\n")].lower())
    assert echo["body"] == "hello world [req-filtered]"  # the upstream got the new body...
    assert ["content-length", str(len("HELLO WORLD [REQ-FILTERED]"))] in echo["headers"]  # ...with its length
    assert b'"BODY": "HELLO WORLD [REQ-FILTERED]"' in body

    # a chunked request body, several chunks, framed again with its new length
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(b"POST /upper/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                  b"5\r\nabcde\r\n3\r\nfgh\r\n0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert b'"BODY": "ABCDEFGH [REQ-FILTERED]"' in data and b'"CONTENT-LENGTH", "23"' in data

    # HTTP/1.0: no chunked encoding, the body ends with the connection
    head, body = raw(gateway, b"GET /ret HTTP/1.0\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert b"content-length" not in head.lower()
    assert body == b"HELLO FROM RETURN\n[RESP-FILTERED]\n"

    # a 1 MB response through the streaming filter, intact; chunked framing holds on keep-alive
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        for size in (1048576, 10, 70000):
            status, headers, body = fetch(gateway, "GET", f"/upper/big/{size}", conn=conn)
            assert status == 200 and body == b"X" * size + b"\n[RESP-FILTERED]\n"
    finally:
        conn.close()
    status, headers, body = fetch(gateway, "HEAD", "/upper/x")
    assert status == 200 and body == b""


def test_buffering_filter_replaces_whole_bodies_and_the_bound(gateway, upstream):
    """Pause until end_of_stream, then replace the whole body (the Rust SDK's http_body), both ways."""
    start_bodies(gateway, upstream)
    payload = b"secret " * 2000  # 14000 bytes: several reads
    status, headers, body = fetch(gateway, "POST", "/reqonly/echo", payload)
    assert status == 200
    echo = json.loads(body)
    assert echo["body"] == "replaced 14000 bytes (first 's')\n"  # what the upstream received...
    assert ["content-length", "33"] in echo["headers"]  # ...with its new length
    assert headers["content-length"] == str(len(body))  # no response filter: the upstream's framing

    status, headers, body = fetch(gateway, "POST", "/replace/echo", payload)
    size = int(re.fullmatch(rb"replaced (\d+) bytes \(first '\{'\)\n", body).group(1))
    assert status == 200 and headers.get("transfer-encoding") == "chunked" and size > 33

    # two body filters: the second sees what the first let go
    status, _, body = fetch(gateway, "PUT", "/chain/x", b"abc" * 1000)
    assert status == 200
    assert re.fullmatch(rb"REPLACED \d+ BYTES \(FIRST '\{'\)\n\n\[RESP-FILTERED\]\n", body), body

    # request body over body_buffer_size (64k) while the filter buffers it: 413
    status, _, body = fetch(gateway, "POST", "/replace/echo", b"y" * 100_000)
    assert status == 413
    assert "request body over body_buffer_size (65536 bytes)" in gateway.log_text()

    # a response over the bound passes through unmodified; under it, it is replaced
    status, headers, body = fetch(gateway, "GET", "/replace/big/200000")
    assert status == 200 and body == b"x" * 200000
    assert "response body over body_buffer_size (65536 bytes)" in gateway.log_text()
    status, _, body = fetch(gateway, "GET", "/replace/big/50000")
    assert (status, body) == (200, b"replaced 50000 bytes (first 'x')\n")


# -- ticks ------------------------------------------------------------------------------------


def test_ticks_fire_at_the_period_in_every_worker_and_call_out(gateway, upstream):
    conf = f"""
wasm {{ module ticker {build(gateway, ticker=ticker_module(100))}/ticker.wasm 127.0.0.1:{upstream.port}; }}
http {{ server {{ listen 127.0.0.1:{{port}}; location / {{ return 200; proxy_wasm ticker; }} }} }}"""
    gateway.start(conf, workers=2)

    def counts():
        ticks = defaultdict(int)
        for pid, _ in guest(gateway, "tick"):
            ticks[pid] += 1
        return ticks

    wait_for(lambda: len(counts()) == 2)
    before = counts()
    time.sleep(1.0)
    after = counts()
    assert set(after) == set(before)
    for pid in after:
        assert 6 <= after[pid] - before[pid] <= 13, (before, after)  # a 100 ms period, in each worker
    ticks = after
    answers = guest(gateway, "tick_answer", ":")
    assert answers and {value for _, value in answers} == {"200"}
    assert {pid for pid, _ in answers} == set(ticks)
    assert all(value == "0" for _, value in guest(gateway, "tick_call"))
