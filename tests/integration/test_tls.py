"""TLS at the edge: ssl listeners, SNI, client certificates, resumption, bad handshakes.

Every test makes its own CA and certificates (tests/pki.py) and talks to the
real gateway with real TLS clients: Python's ssl module, curl and openssl
s_client.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import wasmtime

from conftest import wait_for
from pki import Pki

TLS = """
http {
    access_log logs/access.log combined;
    ssl_certificate     {certs}/a.test.ec.pem;
    ssl_certificate_key {certs}/a.test.ec.key;
    server {
        listen 127.0.0.1:{port} ssl;
        listen 127.0.0.1:{plain_port};
        server_name a.test;
        location / { return 200 "a $scheme $https $ssl_protocol $ssl_server_name $ssl_session_reused $pid"; }
        location /redirect { return 301 https://$host$request_uri; }
        location /cipher { return 200 "$ssl_cipher"; }
    }
    server {
        listen 127.0.0.1:{port} ssl;
        server_name b.test;
        ssl_certificate     {certs}/b.test.ec.pem;
        ssl_certificate_key {certs}/b.test.ec.key;
        location / { return 200 "b $ssl_server_name"; }
    }
}
"""


@pytest.fixture
def pki(tmp_path):
    pki = Pki(tmp_path / "certs")
    for name in ("a.test", "b.test"):
        pki.issue(name)
    return pki


def start(gateway, pki, body: str = TLS, **kwargs):
    return gateway.start(body.replace("{certs}", str(pki.folder)), **kwargs)


def client_context(pki, **kwargs) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.set_alpn_protocols(["http/1.1"])
    for key, value in kwargs.items():
        setattr(context, key, value)
    return context


def https(gateway, pki, name: str = "a.test", path: str = "/", context=None, session=None,
          cert: tuple | None = None):
    """One request over TLS: (status, head, body, the TLS socket's facts)."""
    context = context or client_context(pki)
    if cert:
        context.load_cert_chain(*map(str, cert))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=name, session=session) as tls:
            facts = {"version": tls.version(), "peer": tls.getpeercert(), "der": tls.getpeercert(True),
                     "reused": tls.session_reused, "alpn": tls.selected_alpn_protocol()}
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            facts["session"] = tls.session  # after the answer: TLS 1.3 tickets come after the handshake
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1"), body, facts


def subject_cn(cert: dict) -> str:
    return dict(pair for rdn in cert["subject"] for pair in rdn)["commonName"]


def test_a_request_over_tls_sees_its_variables(gateway, pki):
    start(gateway, pki)
    status, head, body, facts = https(gateway, pki)
    assert status == 200
    words = body.decode().split()
    assert words[:6] == ["a", "https", "on", facts["version"], "a.test", "."], body
    assert facts["version"] == "TLSv1.3"
    assert facts["alpn"] == "http/1.1"
    assert subject_cn(facts["peer"]) == "a.test"
    context = client_context(pki)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="a.test") as tls:
            tls.sendall(b"GET /cipher HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
            assert data.endswith(b"\r\n\r\n" + tls.cipher()[0].encode())


def test_sni_picks_the_certificate_and_unknown_names_get_the_default_server(gateway, pki):
    start(gateway, pki)
    _, _, body, facts = https(gateway, pki, "b.test")
    assert body == b"b b.test" and subject_cn(facts["peer"]) == "b.test"
    # an unknown name: the default server's certificate (so verification by that name fails)
    context = client_context(pki, check_hostname=False)
    _, _, _, facts = https(gateway, pki, "c.test", context=context)
    assert subject_cn(facts["peer"]) == "a.test"


def test_plain_and_tls_listeners_in_one_server(gateway, pki):
    start(gateway, pki)
    raw = gateway.raw(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
                      port=gateway.ports["plain_port"])
    assert raw.startswith(b"HTTP/1.1 200 ")
    words = raw.partition(b"\r\n\r\n")[2].split()
    assert words[:2] == [b"a", b"http"] and len(words) == 3  # $https and $ssl_* are empty on plain HTTP
    assert https(gateway, pki)[0] == 200


def test_redirect_to_https_keeps_host_and_uri(gateway, pki):
    start(gateway, pki)
    raw = gateway.raw(b"GET /redirect?x=1 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
                      port=gateway.ports["plain_port"])
    assert b"\r\nLocation: https://a.test/redirect?x=1\r\n" in raw


def test_plain_http_to_the_tls_port_gets_nginx_400(gateway, pki):
    start(gateway, pki)
    raw = gateway.raw(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nConnection: close" in head
    assert b"<title>400 The plain HTTP request was sent to HTTPS port</title>" in body
    assert b"<center>The plain HTTP request was sent to HTTPS port</center>" in body
    wait_for(lambda: '"GET / HTTP/1.1" 400 ' in (gateway.prefix / "logs/access.log").read_text(), 5)


def test_curl_with_the_ca(gateway, pki):
    start(gateway, pki)
    out = subprocess.run(["curl", "-sS", "--cacert", str(pki.ca), "--resolve", f"b.test:{gateway.port}:127.0.0.1",
                          f"https://b.test:{gateway.port}/"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "b b.test"


def test_ssl_protocols_refuses_older_clients(gateway, pki):
    start(gateway, pki, TLS.replace("ssl_certificate     {certs}/a.test.ec.pem;",
                                    "ssl_protocols TLSv1.3;\n    ssl_certificate     {certs}/a.test.ec.pem;"))
    context = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError):
        https(gateway, pki, context=context)
    wait_for(lambda: "while SSL handshaking" in gateway.log_text(), 5)
    assert re.search(r"\[info\] .*while SSL handshaking", gateway.log_text())
    assert https(gateway, pki)[0] == 200


def test_tls12_default_works_and_resumes_on_any_worker(gateway, pki):
    """A session made on one worker resumes on another: the ticket keys were made before fork."""
    start(gateway, pki, workers=2)
    context = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    status, _, body, facts = https(gateway, pki, context=context)
    assert status == 200 and facts["version"] == "TLSv1.2"
    first_pid = body.split()[-1]
    session = facts["session"]
    seen = set()
    for _ in range(200):
        status, _, body, facts = https(gateway, pki, context=context, session=session)
        assert facts["reused"], "the session was not resumed"
        assert body.split()[5] == b"r"  # $ssl_session_reused
        seen.add(body.split()[-1])
        if seen - {first_pid}:
            break
    assert seen - {first_pid}, "every request landed on the first worker"


def test_client_certificates(gateway, pki):
    cert = pki.issue("client one", sans=[], client=True)
    body = TLS.replace('location / { return 200 "a $scheme',
                       'ssl_verify_client on;\n        ssl_client_certificate {certs}/ca.pem;\n'
                       '        location /who { return 200 "$ssl_client_verify|$ssl_client_s_dn|$ssl_client_fingerprint"; }\n'
                       '        location / { return 200 "a $scheme')
    start(gateway, pki, body)
    status, _, page, _ = https(gateway, pki)
    assert status == 400 and b"No required SSL certificate was sent" in page
    status, _, page, _ = https(gateway, pki, path="/who", cert=cert)
    verify, dn, fingerprint = page.decode().split("|")
    der = ssl.PEM_cert_to_DER_cert(cert[0].read_text())
    assert (verify, dn, fingerprint) == ("SUCCESS", "CN=client one,O=forkgw tests", hashlib.sha1(der).hexdigest())


def test_openssl_s_client_alpn_and_resumption(gateway, pki, tmp_path):
    start(gateway, pki)
    session = tmp_path / "session.pem"
    base = ["openssl", "s_client", "-connect", f"127.0.0.1:{gateway.port}", "-servername", "b.test",
            "-CAfile", str(pki.ca), "-alpn", "http/1.1", "-tls1_2", "-ign_eof"]
    request = b"GET / HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n"
    first = subprocess.run(base + ["-sess_out", str(session)], input=request, capture_output=True, timeout=20)
    assert b"ALPN protocol: http/1.1" in first.stdout and b"Verify return code: 0 (ok)" in first.stdout
    assert first.stdout.rstrip().endswith(b"b b.test"), first.stdout[-300:]
    again = subprocess.run(base + ["-sess_in", str(session)], input=request, capture_output=True, timeout=20)
    assert b"Reused, TLSv1.2" in again.stdout, again.stdout[:600]


def refused(gateway, data: bytes, shut: bool = False) -> bytes:
    """What a broken handshake gets back (a TLS alert, nothing, or a reset) until the close."""
    try:
        return gateway.raw(data, shut=shut)
    except ConnectionResetError:
        return b""


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_bad_handshakes_cost_nothing_but_info_lines(gateway, pki):
    start(gateway, pki, "events { worker_connections 4096; }\n"
          + TLS.replace("http {", "http {\n    client_header_timeout 1s;"))
    worker = gateway.worker_pids()[0]
    assert https(gateway, pki)[0] == 200
    baseline = fd_count(worker)
    # garbage after a handshake record type, and a truncated ClientHello: no HTTP answer
    assert not refused(gateway, b"\x16\x03\x01\x00\x05garbage-garbage").startswith(b"HTTP")
    assert not refused(gateway, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", shut=True).startswith(b"HTTP")
    # a client that stalls mid-handshake is cut by client_header_timeout
    stalled = socket.create_connection(("127.0.0.1", gateway.port))
    stalled.sendall(b"\x16\x03\x01\x02\x00")
    stalled.settimeout(5)
    started = time.monotonic()
    assert stalled.recv(100) == b""
    assert time.monotonic() - started < 4
    stalled.close()
    # many handshakes abandoned at once
    abandoned = []
    for _ in range(1000):
        s = socket.create_connection(("127.0.0.1", gateway.port))
        s.sendall(b"\x16\x03\x01")
        abandoned.append(s)
    for s in abandoned:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    wait_for(lambda: fd_count(worker) <= baseline, 10)
    assert gateway.worker_pids() == [worker]
    assert https(gateway, pki)[0] == 200
    assert not re.search(r"\[(warn|error|crit|alert|emerg)\]", gateway.log_text()), gateway.log_text()[-2000:]


def test_t_checks_that_each_key_matches_its_certificate(gateway, pki):
    body = TLS.replace("{certs}/b.test.ec.key", "{certs}/a.test.ec.key")
    gateway.write_conf(body.replace("{certs}", str(pki.folder)))
    out = gateway.run("-t")
    assert out.returncode == 1
    line = next(n for n, text in enumerate((gateway.prefix / "conf/gateway.conf").read_text().splitlines(), 1)
                if "b.test.ec.pem" in text)
    assert "key values mismatch" in out.stderr and "b.test.ec.pem" in out.stderr
    assert f"gateway.conf:{line}" in out.stderr, out.stderr


def test_reload_with_a_new_certificate_and_a_broken_one(gateway, pki):
    start(gateway, pki)
    assert subject_cn(https(gateway, pki, "b.test")[3]["peer"]) == "b.test"
    # a broken certificate: the old generation serves on
    (pki.folder / "broken.pem").write_text("not a certificate")
    conf = TLS.replace("{certs}/b.test.ec.pem", "{certs}/broken.pem").replace("{certs}", str(pki.folder))
    gateway.write_conf(conf, worker_processes=1)
    assert gateway.run("-s", "reload").returncode == 1
    assert https(gateway, pki, "b.test")[0] == 200
    gateway.allowed_errors.append("broken.pem")
    # a new RSA certificate for b.test: new connections get it
    pki.issue("b.test", kind="rsa")
    conf = TLS.replace("b.test.ec.", "b.test.rsa.").replace("{certs}", str(pki.folder))
    gateway.write_conf(conf, worker_processes=1)
    assert gateway.run("-s", "reload").returncode == 0
    _, _, body, facts = https(gateway, pki, "b.test")
    assert body == b"b b.test"
    assert facts["der"] == ssl.PEM_cert_to_DER_cert((pki.folder / "b.test.rsa.pem").read_text())


def test_filters_read_envoys_tls_properties(gateway, pki):
    wat = Path(__file__).resolve().parent / "filters" / "tls_properties.wat"
    filters = gateway.write_filters(tls_properties=wasmtime.wat2wasm(wat.read_text()))
    cert = pki.issue("client two", sans=["client.two.test"], client=True)
    body = (TLS.replace("http {", f"wasm {{ module props {filters}/tls_properties.wasm; }}\nhttp {{")
            .replace('location / { return 200 "a $scheme',
                     "ssl_verify_client optional;\n        ssl_client_certificate {certs}/ca.pem;\n"
                     '        location /p { return 200 "p"; proxy_wasm props; }\n'
                     '        location / { return 200 "a $scheme'))
    start(gateway, pki, body)
    status, head, _, _ = https(gateway, pki, path="/p", cert=cert)
    assert status == 200
    got = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if line.startswith("x-"))
    der = ssl.PEM_cert_to_DER_cert(cert[0].read_text())
    assert got == {
        "x-sni": "a.test",
        "x-tls-version": "TLSv1.3",
        "x-peer-subject": "CN=client two,O=forkgw tests",
        "x-local-subject": "CN=a.test,O=forkgw tests",
        "x-peer-dns-san": "client.two.test",
        "x-peer-sha256": hashlib.sha256(der).hexdigest(),
        "x-scheme": "https",
        "x-mtls": "1",
    }
    _, head, _, _ = https(gateway, pki, path="/p")
    got = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if line.startswith("x-"))
    assert got["x-mtls"] == "0" and "x-peer-subject" not in got
    raw = gateway.raw(b"GET /p HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n", port=gateway.ports["plain_port"])
    assert b"\r\nx-scheme: http\r\n" in raw and b"x-tls-version" not in raw and b"\r\nx-mtls: 0\r\n" in raw


def test_an_ecdsa_and_an_rsa_certificate_side_by_side(gateway, pki):
    pki.issue("a.test", kind="rsa")
    start(gateway, pki, TLS.replace("ssl_certificate_key {certs}/a.test.ec.key;",
                                    "ssl_certificate_key {certs}/a.test.ec.key;\n"
                                    "    ssl_certificate     {certs}/a.test.rsa.pem;\n"
                                    "    ssl_certificate_key {certs}/a.test.rsa.key;"))
    for kind, suite in (("ec", "ECDHE-ECDSA-AES128-GCM-SHA256"), ("rsa", "ECDHE-RSA-AES128-GCM-SHA256")):
        context = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
        context.set_ciphers(suite)
        status, _, body, facts = https(gateway, pki, context=context)
        assert status == 200
        assert facts["der"] == ssl.PEM_cert_to_DER_cert((pki.folder / f"a.test.{kind}.pem").read_text())


def test_an_encrypted_key_with_ssl_password_file(gateway, pki):
    pki.issue("c.test", password=b"second")
    (pki.folder / "passwords").write_text("first\nsecond\n")
    body = TLS.replace("a.test.ec.pem", "c.test.ec.pem").replace("a.test.ec.key", "c.test.ec.key") \
        .replace("http {", "http {\n    ssl_password_file {certs}/passwords;").replace("server_name a.test;",
                                                                                       "server_name c.test;")
    start(gateway, pki, body)
    assert https(gateway, pki, "c.test")[0] == 200


def test_a_renegotiation_attempt_is_refused_and_the_worker_serves_on(gateway, pki):
    start(gateway, pki)
    worker = gateway.worker_pids()[0]
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{gateway.port}", "-servername", "a.test",
                          "-CAfile", str(pki.ca), "-tls1_2"], input=b"R\n", capture_output=True, timeout=20)
    assert b"RENEGOTIATING" in out.stdout + out.stderr
    assert gateway.worker_pids() == [worker]
    assert https(gateway, pki)[0] == 200
    assert not re.search(r"\[(warn|error|crit|alert|emerg)\]", gateway.log_text()), gateway.log_text()[-2000:]


def test_reloads_under_tls_load_fail_no_request(gateway, pki):
    """Established TLS connections finish on the old generation; new ones get the new one."""
    import threading

    start(gateway, pki, workers=2)
    failures, answered, retries, stop = [], [], [], threading.Event()

    def exchange(tls) -> bytes:
        """One request on the connection: the status, or b"" if the server had closed it."""
        head = b""
        try:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            while b"\r\n\r\n" not in head:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                head += chunk
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
            pass
        if b"\r\n\r\n" not in head:
            if head:
                raise ConnectionError(f"cut after {len(head)} bytes")
            return b""
        head, _, body = head.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        while len(body) < length:
            body += tls.recv(4096)
        return head

    def client():
        context = client_context(pki)
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as raw:
                    with context.wrap_socket(raw, server_hostname="a.test") as tls:
                        for n in range(20):
                            head = exchange(tls)
                            if not head:
                                if n == 0:
                                    raise ConnectionError("a new connection closed before its answer")
                                retries.append(n)  # an idle keep-alive connection closed by a retiring
                                break              # worker: the client resends, as for plain HTTP
                            answered.append(head.split()[1])
                            if b"Connection: close" in head:
                                break
            except (OSError, ConnectionError) as err:
                failures.append(repr(err))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for generation in (2, 3, 4):
            wait_for(lambda n=len(answered): len(answered) > n + 20, 10)
            gateway.signal(signal.SIGHUP)
            gateway.wait_serving(generation)
        wait_for(lambda n=len(answered): len(answered) > n + 20, 10)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not failures, failures[:3]
    assert set(answered) == {b"200"} and len(answered) > 80


@pytest.mark.parametrize("prefer, expected", [("off", "ECDHE-ECDSA-AES128-GCM-SHA256"),
                                              ("on", "ECDHE-ECDSA-AES256-GCM-SHA384")])
def test_ssl_prefer_server_ciphers(gateway, pki, prefer, expected):
    start(gateway, pki, TLS.replace("http {", f"http {{\n    ssl_prefer_server_ciphers {prefer};"))
    context = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="a.test") as tls:
            assert tls.cipher()[0] == expected


def test_ssl_trusted_certificate_verifies_without_being_advertised(gateway, pki, tmp_path):
    other = Pki(tmp_path / "other-ca", "another test CA")
    cert = other.issue("client three", sans=[], client=True)
    body = TLS.replace('location / { return 200 "a $scheme',
                       "ssl_verify_client optional;\n        ssl_client_certificate {certs}/ca.pem;\n"
                       f"        ssl_trusted_certificate {other.ca};\n"
                       '        location /who { return 200 "$ssl_client_verify|$ssl_client_s_dn"; }\n'
                       '        location / { return 200 "a $scheme')
    start(gateway, pki, body)
    status, _, page, _ = https(gateway, pki, path="/who", cert=cert)
    assert (status, page) == (200, b"SUCCESS|CN=client three,O=forkgw tests")
    status, _, page, _ = https(gateway, pki, path="/who")
    assert (status, page) == (200, b"NONE|")  # optional: no certificate is no error
