"""proxy-wasm filters through the real gateway process (issue 3, end to end).

The SDK plugins under plugins/ run unchanged; the WAT modules under
filters/ (next to this file) make one host behaviour visible each: the
callback order, `:status` rewriting, properties, failures.  They are compiled
into the gateway's prefix per test, and the conf names them with `{filters}`.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import wasmtime

from conftest import free_port, wait_for

FILTERS = Path(__file__).resolve().parent / "filters"


def build_filters(gateway) -> Path:
    return gateway.write_filters(**{wat.stem: wasmtime.wat2wasm(wat.read_text()) for wat in FILTERS.glob("*.wat")})


def start(gateway, conf: str, upstream=None, **kw):
    """Start the gateway on `conf`, with `{filters}` and `{upstream}` filled in."""
    conf = conf.replace("{filters}", str(build_filters(gateway)))
    if upstream is not None:
        conf = conf.replace("{upstream}", f"127.0.0.1:{upstream.port}")
    return gateway.start(conf, **kw)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]  # in wire order, names lower-case, repeats kept
    body: bytes
    client_port: int

    def get(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def echo(self) -> dict:
        return json.loads(self.body)


def fetch(gateway, path: str, headers: dict | None = None, method: str = "GET") -> Response:
    """One request on a fresh connection; keeps repeated headers and the client's port."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.connect()
        client_port = conn.sock.getsockname()[1]
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return Response(resp.status, [(k.lower(), v) for k, v in resp.getheaders()], body, client_port)
    finally:
        conn.close()


def upstream_header(echo: dict, name: str) -> str | None:
    return next((v for k, v in echo["headers"] if k == name), None)


# -- the seed filter, chains, inheritance ----------------------------------------------


def test_seed_filter_on_return_and_proxy_routes(gateway, upstream):
    """add_header must act on every response head: `return`, proxied, upstream errors alike."""
    start(gateway, """
wasm { module add_header {plugins}/add_header; }
http { server { listen 127.0.0.1:{port};
    location /t { return 200 "plain"; proxy_wasm add_header; }
    location /c { return 200 "plain"; proxy_wasm add_header 'another config'; }
    location /redirect { return 302 /t; proxy_wasm add_header; }
    location /p/ { proxy_pass http://{upstream}; proxy_wasm add_header; }
    location /pc/ { proxy_pass http://{upstream}; proxy_wasm add_header '{"any": "string"}'; }
    location /status/ { proxy_pass http://{upstream}; proxy_wasm add_header; }
    location /none { return 200 "unfiltered"; }
} }""", upstream)
    r = fetch(gateway, "/t")
    assert (r.status, r.body, r.all("hello")) == (200, b"plain", ["add_header"])
    r = fetch(gateway, "/c")
    assert (r.status, r.body, r.all("hello")) == (200, b"plain", ["another config"])
    r = fetch(gateway, "/redirect")
    assert (r.status, r.all("hello")) == (302, ["add_header"])
    assert r.get("location").endswith("/t")

    r = fetch(gateway, "/p/x?q=1")
    assert (r.status, r.all("hello"), r.get("x-upstream")) == (200, ["add_header"], "echo")
    assert r.echo()["path"] == "/p/x?q=1"
    r = fetch(gateway, "/pc/y")
    assert (r.status, r.all("hello")) == (200, ['{"any": "string"}'])
    r = fetch(gateway, "/status/404")  # unlike nginx's add_header, the filter sees every status
    assert (r.status, r.all("hello")) == (404, ["add_header"])
    assert fetch(gateway, "/none").get("hello") is None
    assert len(upstream.hits) == 3


def test_chain_of_two_filters_runs_in_conf_order(gateway):
    """Several proxy_wasm lines form one chain; the wire shows who ran first."""
    start(gateway, """
wasm { module add_header {plugins}/add_header; module status {filters}/status.wasm; }
http { server { listen 127.0.0.1:{port};
    location /two { return 200; proxy_wasm add_header 'first'; proxy_wasm add_header 'second'; }
    location /swap { return 200; proxy_wasm add_header 'second'; proxy_wasm add_header 'first'; }
    location /mixed { return 200; proxy_wasm status '299'; proxy_wasm add_header 'after status'; }
} }""")
    assert fetch(gateway, "/two").all("hello") == ["first", "second"]
    assert fetch(gateway, "/swap").all("hello") == ["second", "first"]
    r = fetch(gateway, "/mixed")
    assert (r.status, r.get("x-original-status"), r.all("hello")) == (299, "200", ["after status"])


def test_location_inherits_the_chain_unless_it_declares_its_own(gateway):
    """nginx's rule for array directives: a level with no proxy_wasm line takes the enclosing chain whole."""
    start(gateway, """
wasm { module add_header {plugins}/add_header; }
http {
    proxy_wasm add_header 'http';
    server { listen 127.0.0.1:{port};
        proxy_wasm add_header 'server';
        location /inherit { return 200; }
        location /own { return 200; proxy_wasm add_header 'own-1'; proxy_wasm add_header 'own-2'; }
        location /outer {
            location /outer/nested { return 200; }
            return 200;
        }
    }
    server { listen 127.0.0.1:{second_port};
        location / { return 200; }
    }
}""")
    assert fetch(gateway, "/inherit").all("hello") == ["server"]
    assert fetch(gateway, "/own").all("hello") == ["own-1", "own-2"]
    assert fetch(gateway, "/outer/nested").all("hello") == ["server"]
    status, headers, _ = gateway.request("GET", "/", port=gateway.ports["second_port"])
    assert (status, headers.get("hello")) == (200, "http")


# -- local responses, rewrites ----------------------------------------------------------


def test_auth_token_local_responses_on_return_and_proxy_routes(gateway, upstream):
    """401/403 come from the filter and never reach the upstream; the right token goes through."""
    (gateway.prefix / "auth.yaml").write_text("header: x-api-key\ntoken: from-yaml\nrealm: files\n")
    start(gateway, """
wasm { module auth_token {plugins}/auth_token; }
http { server { listen 127.0.0.1:{port};
    location /ret { return 200 "welcome"; proxy_wasm auth_token '{"header":"x-api-key","token":"secret"}'; }
    location /api/ { proxy_pass http://{upstream}; proxy_wasm auth_token '{"header":"x-api-key","token":"secret"}'; }
    location /yaml/ { proxy_pass http://{upstream}; proxy_wasm auth_token file=auth.yaml; }
} }""", upstream)
    for path in ("/ret", "/api/x"):
        r = fetch(gateway, path)
        assert (r.status, r.body) == (401, b"missing credentials\n")
        assert r.get("www-authenticate") == 'Bearer realm="forkgw"'
        r = fetch(gateway, path, {"x-api-key": "wrong"})
        assert r.status == 403
        assert r.get("www-authenticate") == 'Bearer realm="forkgw"'
    assert upstream.hits == []

    r = fetch(gateway, "/ret", {"x-api-key": "secret"})
    assert (r.status, r.body) == (200, b"welcome")
    r = fetch(gateway, "/api/x", {"x-api-key": "Bearer secret"})
    assert r.status == 200 and r.echo()["path"] == "/api/x"
    assert upstream_header(r.echo(), "x-api-key") == "Bearer secret"
    assert len(upstream.hits) == 1

    # a filter configuration read from YAML arrives as JSON
    r = fetch(gateway, "/yaml/a", {"x-api-key": "secret"})
    assert (r.status, r.get("www-authenticate")) == (403, 'Bearer realm="files"')
    assert fetch(gateway, "/yaml/a", {"x-api-key": "from-yaml"}).status == 200
    assert len(upstream.hits) == 2


def test_rewrite_changes_path_and_removes_headers_both_ways(gateway, upstream):
    """Request-map changes must reach the upstream; response-map removals must reach the client."""
    start(gateway, """
wasm { module rewrite {plugins}/rewrite; }
http { server { listen 127.0.0.1:{port};
    location /old/ {
        add_header X-Powered-By forkgw always;
        proxy_pass http://{upstream};
        proxy_wasm rewrite;
    }
    location /v1/ {
        proxy_pass http://{upstream};
        proxy_wasm rewrite '{"path":"/v1/=/","remove_request":"cookie,x-debug","remove_response":"x-upstream"}';
    }
} }""", upstream)
    r = fetch(gateway, "/old/a?b=1", {"x-internal": "1", "x-keep": "yes"})
    echo = r.echo()
    assert echo["path"] == "/new/a?b=1"
    assert upstream_header(echo, "x-original-path") == "/old/a?b=1"
    assert upstream_header(echo, "x-internal") is None
    assert upstream_header(echo, "x-keep") == "yes"
    assert r.get("x-powered-by") is None and r.get("x-upstream") == "echo"

    r = fetch(gateway, "/v1/users?id=7", {"cookie": "s=1", "x-debug": "1", "x-keep": "yes"})
    echo = r.echo()
    assert echo["path"] == "/users?id=7"
    assert [upstream_header(echo, h) for h in ("cookie", "x-debug", "x-keep")] == [None, None, "yes"]
    assert r.get("x-upstream") is None and r.get("content-type") == "application/json"


def test_status_rewritten_to_204_answers_without_a_body(gateway, upstream):
    """A filter may answer 204 (or 304) in place of a response that had a body."""
    start(gateway, """
wasm { module status {filters}/status.wasm; }
http { server { listen 127.0.0.1:{port};
    location /ret { return 200 "body"; proxy_wasm status '204'; }
    location /p/ { proxy_pass http://{upstream}; proxy_wasm status '204'; }
} }""", upstream)
    for path in ("/ret", "/p/x"):
        r = fetch(gateway, path)
        assert (r.status, r.body, r.get("x-original-status")) == (204, b"", "200")


def test_method_change_reaches_the_upstream(gateway, upstream):
    """`:method` written by a request-phase filter is the method the upstream gets."""
    start(gateway, """
wasm { module probe {filters}/probe.wasm; }
http { server { listen 127.0.0.1:{port};
    location / { proxy_pass http://{upstream}; proxy_wasm probe; }
} }""", upstream)
    echo = fetch(gateway, "/thing/1", {"x-method-override": "DELETE"}).echo()
    assert (echo["method"], echo["path"]) == ("DELETE", "/thing/1")
    assert upstream_header(echo, "x-method-override") is None
    assert fetch(gateway, "/thing/2").echo()["method"] == "GET"


def test_filters_can_remove_the_server_header(gateway):
    """rewrite's default config removes `server`, as plugins/README.md promises the client."""
    start(gateway, """
wasm { module rewrite {plugins}/rewrite; }
http { server { listen 127.0.0.1:{port};
    location /old/ { return 200; proxy_wasm rewrite; }
} }""")
    r = fetch(gateway, "/old/x")
    assert r.status == 200 and r.get("server") is None


def test_status_rewrite_and_local_response_from_the_response_phase(gateway, upstream):
    """`:status` is writable in the header filter; a local reply there replaces the upstream response."""
    start(gateway, """
wasm { module status {filters}/status.wasm; module probe {filters}/probe.wasm; }
http { server { listen 127.0.0.1:{port};
    location /ret { return 200 "body stays"; proxy_wasm status '418'; }
    location /status/ { proxy_pass http://{upstream}; proxy_wasm status '203'; }
    location /probe/ { proxy_pass http://{upstream}; proxy_wasm probe; }
} }""", upstream)
    r = fetch(gateway, "/ret")
    assert (r.status, r.body, r.get("x-original-status")) == (418, b"body stays", "200")
    r = fetch(gateway, "/status/404")
    assert (r.status, r.get("x-original-status"), r.get("x-upstream")) == (203, "404", "echo")
    assert r.echo()["path"] == "/status/404"

    r = fetch(gateway, "/probe/x")
    assert (r.status, r.get("x-probe")) == (200, "passed")
    r = fetch(gateway, "/probe/x", {"x-probe": "reply"})
    assert (r.status, r.body) == (503, b"replaced by probe\n")
    assert r.get("x-upstream") is None and r.get("x-probe") is None
    assert len(upstream.hits) == 3  # the upstream answered; its response was discarded
    assert fetch(gateway, "/probe/x").status == 200  # the connection pool and the VM are fine


# -- the end of every stream ----------------------------------------------------------------

LIFECYCLE_LINE = re.compile(r'wasm "lifecycle" root_id "lifecycle": (\w+) (\d+)(?: (\d+))?$')


def lifecycle_events(gateway) -> dict[int, list[str]]:
    """Callbacks per HTTP context, in log order, from what the lifecycle filter logged."""
    events: dict[int, list[str]] = {}
    for line in gateway.log_text().splitlines():
        m = LIFECYCLE_LINE.search(line)
        if not m:
            continue
        what, ctx, parent = m.group(1), int(m.group(2)), m.group(3)
        if what == "create" and parent == "0":
            continue  # the root context
        events.setdefault(ctx, []).append(what)
    return events


def test_done_log_delete_for_every_request(gateway, upstream):
    """The Go SDKs end streams in proxy_on_log: it must run after local replies, 502s, aborts and failures."""
    down = free_port()
    start(gateway, """
wasm { module lifecycle {filters}/lifecycle.wasm; module auth_token {plugins}/auth_token;
       module probe {filters}/probe.wasm; }
http { server { listen 127.0.0.1:{port};
    location /ok { return 200; proxy_wasm lifecycle; }
    location /deny { return 200; proxy_wasm lifecycle; proxy_wasm auth_token 'secret'; }
    location /down/ { proxy_pass http://127.0.0.1:%d; proxy_wasm lifecycle; }
    location /slow/ { proxy_pass http://{upstream}; proxy_wasm lifecycle; }
    location /fail { return 200; proxy_wasm lifecycle; proxy_wasm probe; }
} }""" % down, upstream)
    assert fetch(gateway, "/ok").status == 200
    assert fetch(gateway, "/deny").status == 401
    assert fetch(gateway, "/down/x").status == 502
    assert fetch(gateway, "/fail", {"x-probe": "trap"}).status == 500
    with socket.create_connection(("127.0.0.1", gateway.port)) as s:
        s.sendall(b"GET /slow/2 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: upstream.hits, timeout=5)  # the request is at the upstream: now go away

    def all_deleted():
        events = lifecycle_events(gateway)
        return len(events) == 5 and all(e[-1] == "delete" for e in events.values()) and events

    events = wait_for(all_deleted, timeout=5)
    ok, deny, down_, fail, aborted = (events[ctx] for ctx in sorted(events))
    answered = ["create", "request_headers", "response_headers", "done", "log", "delete"]
    assert ok == answered
    assert deny == ["create", "request_headers", "done", "log", "delete"]
    assert down_ == answered  # the 502 error page went through the header filter
    assert fail == ["create", "request_headers", "done", "log", "delete"]
    assert aborted == ["create", "request_headers", "done", "log", "delete"]


# -- failing filters ------------------------------------------------------------------------

FAILURES = {
    "trap": "proxy_on_request_headers failed: wasm trap: wasm `unreachable` instruction executed",
    "loop": "proxy_on_request_headers failed: timed out after 50 ms",
    "memory": "(memory near its limit:",
}


@pytest.mark.parametrize("fault", sorted(FAILURES))
def test_failing_filter_fails_one_request_and_the_worker_serves_on(gateway, upstream, fault):
    """A trap, a runaway loop or a memory bomb costs one request (500, or passes with
    on_error=continue), is logged at [error] with the filter's name, and the same
    worker answers the next request with a rebuilt VM."""
    start(gateway, """
wasm {
    module probe {filters}/probe.wasm;
    module probe_open {filters}/probe.wasm;
    callback_timeout 50ms;
    memory_max 16m;
}
http { server { listen 127.0.0.1:{port};
    location /closed { return 200 "ok"; proxy_wasm probe; }
    location /open/ { proxy_pass http://{upstream}; proxy_wasm probe_open on_error=continue; }
} }""", upstream)
    workers = gateway.worker_pids()
    assert len(workers) == 1

    began = time.monotonic()
    r = fetch(gateway, "/closed", {"x-probe": fault})
    assert r.status == 500
    assert time.monotonic() - began < 3
    errors = [line for line in gateway.log_text().splitlines() if "[error]" in line and 'wasm "probe"' in line]
    assert errors and FAILURES[fault] in errors[0], gateway.log_text()
    r = fetch(gateway, "/closed")
    assert (r.status, r.body, r.get("x-probe")) == (200, b"ok", "passed")

    r = fetch(gateway, "/open/x", {"x-probe": fault})
    assert (r.status, r.get("x-upstream")) == (200, "echo")
    assert r.get("x-probe") is None  # skipped for the rest of that request
    assert any("[error]" in line and 'wasm "probe_open"' in line for line in gateway.log_text().splitlines())
    r = fetch(gateway, "/open/y")
    assert (r.status, r.get("x-probe")) == (200, "passed")

    assert gateway.worker_pids() == workers
    assert "exited" not in gateway.log_text()


# -- start failures ---------------------------------------------------------------------------


@pytest.mark.parametrize("module, reason", [
    ("unknown_import", 'import "env.proxy_teleport" is not provided by the host'),
    ("no_abi_marker", "is not a proxy-wasm module (no proxy_abi_version_0_1_0"),
])
def test_bad_module_is_rejected_by_test_and_by_start(gateway, module, reason):
    """Caught while compiling in the master: no worker is forked for it."""
    filters = build_filters(gateway)
    gateway.write_conf("""
wasm { module bad %s/%s.wasm; }
http { server { listen 127.0.0.1:{port}; location / { return 200; proxy_wasm bad; } } }
""" % (filters, module))
    wasm_file = f"{filters}/{module}.wasm"
    expected = f'[emerg] wasm module "bad": "{wasm_file}"'

    line = gateway.prefix.joinpath("conf/gateway.conf").read_text().splitlines().index(
        f"wasm {{ module bad {wasm_file}; }}") + 1

    tested = gateway.run("-t")
    assert tested.returncode == 1
    assert expected in tested.stderr and reason in tested.stderr
    assert f"gateway.conf:{line}" in tested.stderr

    gateway.proc = None
    proc = gateway.run()
    assert proc.returncode == 1
    assert expected in proc.stderr and reason in proc.stderr
    assert "start worker process" not in gateway.log_text()


def test_empty_config_that_aborts_the_filter_stops_the_start(gateway):
    """add_header (SDK 0.1.8) calls proc_exit in proxy_on_configure without a config: the master
    must exit 1 with the reason, not respawn workers in a loop."""
    gateway.allowed_errors += [r"\[emerg\].*add_header.*proc_exit\(255\)", r"\[crit\].*add_header",
                               r"\[alert\].*exited with code 3"]
    start(gateway, """
wasm { module add_header {plugins}/add_header; }
http { server { listen 127.0.0.1:{port};
    location /t { return 200; proxy_wasm add_header ''; }
} }""", wait=False)
    assert gateway.proc.wait(15) == 1
    log = gateway.log_text()
    assert re.search(r'\[emerg\] .*wasm "add_header" root_id "add_header" \(\S+/plugins/add_header/release\.wasm\): '
                     r"proxy_on_configure failed: proc_exit\(255\); exiting", log), log
    assert log.count("start worker process") == 1


# -- properties -----------------------------------------------------------------------------


def test_properties_seen_by_a_filter(gateway, upstream):
    """What proxy_get_property answers for a real connection and request (values encoded as
    documented in forkgw/wasm/properties.py: strings raw, integers 8-byte little-endian)."""
    start(gateway, """
wasm { module props {filters}/properties.wasm; }
http { server { listen 127.0.0.1:{port};
    location /p/ { proxy_pass http://{upstream}; proxy_wasm props root_id=custom_root; }
    location /ret { return 201 "made"; proxy_wasm props; }
} }""", upstream)
    r = fetch(gateway, "/p/a/b?x=1&y=2", {"x-client": "tester"})
    assert r.status == 200
    got = dict((k, v) for k, v in r.headers if k.startswith("x-") and k != "x-upstream")
    request_id = got.pop("x-request-id")
    connection_id = got.pop("x-connection-id")
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert connection_id.isdigit()
    assert got == {
        "x-request-path": "/p/a/b?x=1&y=2",
        "x-url-path": "/p/a/b",
        "x-query": "x=1&y=2",
        "x-host": f"127.0.0.1:{gateway.port}",
        "x-method": "GET",
        "x-scheme": "http",
        "x-protocol": "HTTP/1.1",
        "x-request-time-size": "8",
        "x-client": "tester",
        "x-source-address": f"127.0.0.1:{r.client_port}",
        "x-source-port": str(r.client_port),
        "x-destination-address": f"127.0.0.1:{gateway.port}",
        "x-destination-port": str(gateway.port),
        "x-response-code": "200",
        "x-response-type": "application/json",
        "x-plugin-root-id": "custom_root",
        "x-plugin-name": "props",
        "x-plugin-vm-id": "props",
    }

    r = fetch(gateway, "/ret?k=v", {"host": "example.test"})
    assert (r.status, r.body) == (201, b"made")
    assert (r.get("x-response-code"), r.get("x-plugin-root-id"), r.get("x-host")) == ("201", "props", "example.test")
    assert (r.get("x-query"), r.get("x-response-type")) == ("k=v", "text/plain")
    assert r.get("x-request-id") != request_id and r.get("x-missing") is None


def test_reload_with_a_failing_module_keeps_the_old_filters_serving(gateway):
    """A reload is refused like a start (bad module, or a filter that fails to configure),
    and the running generation keeps answering with its filters."""
    good = """
wasm { module add_header {plugins}/add_header; }
http { server { listen 127.0.0.1:{port}; location /t { return 200; proxy_wasm add_header 'old'; } } }"""
    start(gateway, good)
    assert fetch(gateway, "/t").all("hello") == ["old"]
    filters = build_filters(gateway)
    gateway.allowed_errors += [r"\[emerg\].*proxy_teleport", r"\[emerg\].*proc_exit\(255\)",
                               r"\[crit\].*add_header", r"\[alert\].*exited with code 3"]

    gateway.write_conf(good.replace("}\nhttp", "module bad %s/unknown_import.wasm; }\nhttp" % filters)
                       .replace("'old'", "'old'; proxy_wasm bad"))
    gateway.signal(signal.SIGHUP)
    wait_for(lambda: "proxy_teleport" in gateway.log_text())
    assert re.search(r'\[emerg\] .*wasm module "bad": .*unknown_import\.wasm.*proxy_teleport', gateway.log_text())
    assert fetch(gateway, "/t").all("hello") == ["old"]

    gateway.write_conf(good.replace("'old'", "''"))
    gateway.signal(signal.SIGHUP)
    wait_for(lambda: "proc_exit(255); the old configuration keeps serving" in gateway.log_text())
    assert fetch(gateway, "/t").all("hello") == ["old"]
    assert gateway.proc.poll() is None


def test_filter_calls_time_and_traps_on_the_metrics_endpoint(gateway):
    """Per filter and phase: callbacks counted and timed, traps counted, across workers."""
    start(gateway, """
wasm { module add_header {plugins}/add_header; module probe {filters}/probe.wasm; }
http { server { listen 127.0.0.1:{port};
    location = /metrics { forkgw_metrics; }
    location /t { return 200; proxy_wasm add_header 'add_header'; }
    location /fail { return 200; proxy_wasm probe; }
} }""", workers=2)
    gateway.allowed_errors.append("wasm trap")
    for _ in range(12):
        assert fetch(gateway, "/t").status == 200
    assert fetch(gateway, "/fail", {"x-probe": "trap"}).status == 500
    text = fetch(gateway, "/metrics").body.decode()
    labels = 'filter="add_header",phase="response_headers",root_id="add_header"'
    assert re.search(r'^forkgw_wasm_calls_total\{%s\} 12$' % labels, text, re.M), text
    micros = re.search(r'^forkgw_wasm_microseconds_total\{%s\} (\d+)$' % labels, text, re.M)
    assert micros and int(micros.group(1)) > 0
    assert re.search(r'^forkgw_wasm_traps_total\{filter="probe",root_id="probe"\} 1$', text, re.M), text


def test_a_vm_grown_past_its_mark_is_recycled_between_requests(gateway):
    """A leaking filter stays bounded: its VM is replaced once it passes vm_recycle_memory,
    and no request fails for it (it would at memory_max)."""
    start(gateway, """
wasm { module leaky {filters}/leaky.wasm; vm_recycle_memory 1m; memory_max 2m; }
http { server { listen 127.0.0.1:{port};
    location /t { return 200 ok; proxy_wasm leaky; }
} }""")
    pid = gateway.worker_pids()[0]
    for _ in range(60):  # ~60 pages: past 1m several times, and past memory_max without recycling
        assert fetch(gateway, "/t").status == 200
    assert gateway.log_text().count("VM recycled at") >= 3
    assert gateway.worker_pids() == [pid]
