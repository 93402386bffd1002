"""TLS to upstreams: proxy_pass https://, verification, mutual TLS, pools and session reuse.

The upstream is a real TLS server started by the test (Python's http.server
under an ssl context with certificates from the test's own CA); it answers
with what it saw of the connection: its TLS version, whether the session was
resumed, the client certificate's subject, and the client's port.
"""

from __future__ import annotations

import json
from pathlib import Path
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import wasmtime

from pki import Pki


class TlsEcho(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        tls = self.connection
        peer = tls.getpeercert() or {}
        subject = dict(pair for rdn in peer.get("subject", ()) for pair in rdn)
        body = json.dumps({
            "path": self.path, "host": self.headers.get("host"), "version": tls.version(),
            "reused": tls.session_reused, "client_cn": subject.get("commonName"),
            "client_port": self.client_address[1], "sni": getattr(tls, "sni", None),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TlsUpstream:
    def __init__(self, pki: Pki, name: str, require_client_cert: bool = False):
        cert, key = pki.issue(name)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(pki.ca))

        def remember_sni(sock, server_name, _):
            sock.sni = server_name

        context.sni_callback = remember_sni
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), TlsEcho)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path / "certs")


@pytest.fixture
def tls_upstream(pki):
    server = TlsUpstream(pki, "up.test")
    yield server
    server.close()


def conf(pki, port: int, location: str, http: str = "") -> str:
    return f"""
http {{
    {http}
    upstream tlsback {{ server 127.0.0.1:{port}; keepalive 4; }}
    server {{
        listen 127.0.0.1:{{port}};
        {location}
    }}
}}""".replace("{certs}", str(pki.folder))


def answer(gateway, path: str = "/x"):
    status, headers, body = gateway.request("GET", path)
    return status, dict(headers), (json.loads(body) if status == 200 else body)


def test_proxy_pass_https_verifies_the_upstream_and_pools_tls_connections(gateway, pki, tls_upstream):
    gateway.start(conf(pki, tls_upstream.port, """
        location / { proxy_pass https://tlsback; proxy_ssl_trusted_certificate {certs}/ca.pem;
                     proxy_ssl_name up.test; }"""))
    status, _, first = answer(gateway, "/a?b=1")
    assert status == 200, first
    assert first["path"] == "/a?b=1" and first["version"] == "TLSv1.3" and first["sni"] == "up.test"
    assert first["host"] == "tlsback"  # Host is $proxy_host, as in nginx
    _, _, second = answer(gateway)
    assert second["client_port"] == first["client_port"]  # the same kept-alive TLS connection


def test_filters_see_the_upstreams_tls_version(gateway, pki, tls_upstream):
    wat = Path(__file__).resolve().parent / "filters" / "tls_properties.wat"
    filters = gateway.write_filters(tls_properties=wasmtime.wat2wasm(wat.read_text()))
    gateway.start(f"wasm {{ module props {filters}/tls_properties.wasm; }}\n" + conf(pki, tls_upstream.port, """
        location / { proxy_pass https://tlsback; proxy_ssl_trusted_certificate {certs}/ca.pem;
                     proxy_ssl_name up.test; proxy_wasm props; }"""))
    status, headers, _ = answer(gateway)
    assert status == 200
    assert headers["x-upstream-tls"] == "TLSv1.3" and headers["x-scheme"] == "http"
    assert "x-tls-version" not in headers  # the client's side is plain HTTP


def test_an_unverified_upstream_is_refused_and_the_log_names_the_directive(gateway, pki, tls_upstream):
    gateway.start(conf(pki, tls_upstream.port, "location / { proxy_pass https://127.0.0.1:%d; }"
                       % tls_upstream.port))
    status, _, _ = answer(gateway)
    assert status == 502
    log = gateway.log_text()
    assert re.search(r"\[error\] .*upstream SSL certificate verify error: \(\d+:.*proxy_ssl_verify off.* while "
                     r"SSL handshaking to upstream, .*upstream: \"https://127\.0\.0\.1:\d+\"", log), log[-1500:]


def test_proxy_ssl_verify_off_takes_any_certificate(gateway, pki, tls_upstream):
    gateway.start(conf(pki, tls_upstream.port, "location / { proxy_pass https://tlsback; proxy_ssl_verify off; }"))
    status, _, seen = answer(gateway)
    assert status == 200 and seen["sni"] is None  # no name sent: proxy_ssl_server_name is off


def test_a_name_that_does_not_match_is_refused(gateway, pki, tls_upstream):
    gateway.start(conf(pki, tls_upstream.port, """
        location / { proxy_pass https://tlsback; proxy_ssl_trusted_certificate {certs}/ca.pem; }"""))
    assert answer(gateway)[0] == 502  # the certificate is for up.test, the name is "tlsback"
    assert "Hostname mismatch" in gateway.log_text() or "hostname" in gateway.log_text().lower()


def test_mutual_tls_to_the_upstream(gateway, pki):
    upstream = TlsUpstream(pki, "mtls.test", require_client_cert=True)
    try:
        pki.issue("gateway", sans=[], client=True)
        gateway.start(conf(pki, upstream.port, """
            location /none { proxy_pass https://tlsback; proxy_ssl_trusted_certificate {certs}/ca.pem;
                             proxy_ssl_name mtls.test; }
            location / { proxy_pass https://tlsback; proxy_ssl_trusted_certificate {certs}/ca.pem;
                         proxy_ssl_name mtls.test;
                         proxy_ssl_certificate {certs}/gateway.ec.pem;
                         proxy_ssl_certificate_key {certs}/gateway.ec.key; }"""))
        status, _, seen = answer(gateway)
        assert status == 200 and seen["client_cn"] == "gateway"
        assert answer(gateway, "/none")[0] == 502  # no certificate to show: the upstream refuses
    finally:
        upstream.close()


def test_sessions_are_resumed_on_new_connections(gateway, pki, tls_upstream):
    body = conf(pki, tls_upstream.port, """
        location / { proxy_pass https://tlsback; proxy_ssl_trusted_certificate {certs}/ca.pem;
                     proxy_ssl_name up.test; proxy_set_header Connection close; }""")
    gateway.start(body.replace("keepalive 4;", "keepalive 0;"))
    _, _, first = answer(gateway)
    _, _, second = answer(gateway)
    assert first["client_port"] != second["client_port"]
    assert not first["reused"] and second["reused"]


def test_session_reuse_off(gateway, pki, tls_upstream):
    body = conf(pki, tls_upstream.port, """
        location / { proxy_pass https://tlsback; proxy_ssl_trusted_certificate {certs}/ca.pem;
                     proxy_ssl_name up.test; proxy_ssl_session_reuse off; }""")
    gateway.start(body.replace("keepalive 4;", "keepalive 0;"))
    assert not answer(gateway)[2]["reused"] and not answer(gateway)[2]["reused"]


def test_t_refuses_a_client_certificate_without_its_key(gateway, pki, tls_upstream):
    pki.issue("gateway", sans=[], client=True)
    gateway.write_conf(conf(pki, tls_upstream.port, """
        location / { proxy_pass https://tlsback; proxy_ssl_certificate {certs}/gateway.ec.pem; }"""))
    out = gateway.run("-t")
    assert out.returncode == 1
    assert 'no "proxy_ssl_certificate_key" is defined' in out.stderr and "gateway.conf:" in out.stderr


def test_a_filters_callout_to_an_https_target(gateway, pki):
    """proxy_http_call("https://127.0.0.1:PORT"): TLS verified with the http level's proxy_ssl_*."""
    from test_bodies_callouts import auth_module, build

    callee = TlsUpstream(pki, "127.0.0.1")
    try:
        filters = build(gateway, auth=auth_module())
        gateway.start(f"""
wasm {{ module auth {filters}/auth.wasm https://127.0.0.1:{callee.port}; }}
http {{
    proxy_ssl_trusted_certificate {pki.folder}/ca.pem;
    server {{ listen 127.0.0.1:{{port}};
        location / {{ return 200 "welcome"; proxy_wasm auth /status/200; }}
    }}
}}""")
        assert gateway.request("GET", "/")[::2] == (200, b"welcome")
    finally:
        callee.close()


def test_proxy_ssl_protocols(gateway, pki, tls_upstream):
    gateway.start(conf(pki, tls_upstream.port, """
        location / { proxy_pass https://tlsback; proxy_ssl_trusted_certificate {certs}/ca.pem;
                     proxy_ssl_name up.test; proxy_ssl_protocols TLSv1.2; }"""))
    status, _, seen = answer(gateway)
    assert status == 200 and seen["version"] == "TLSv1.2"
