"""Properties of the conf parser and of the HTTP exchange, checked on generated input.

- Token soup (directive names, values, braces, semicolons, quotes, comments, includes
  in any order) never makes the loader raise anything but ConfError, which is what
  `forkgw -t` and a reload turn into an [emerg] line instead of a traceback.
- Valid confs built from the directive set survive `forkgw -T` unchanged: the dump
  holds every file read, byte for byte, and reloading the dumped text gives the same
  model; quoted texts come back as written.
- Against one real gateway process, any request line, headers and body get a
  well-formed HTTP response or a closed connection, within the timeouts; never a hang,
  never a dead worker.
"""

from __future__ import annotations

import contextlib
import io
import re
import socket

import h11
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import PLUGINS, Gateway, Upstream
from forkgw import cli
from forkgw.conf import directives as table
from forkgw.conf import load
from forkgw.errors import ConfError

# -- token soup -------------------------------------------------------------------------

NAMES = sorted({d.name for d in table.DIRECTIVES})
VALUES = ["on", "off", "0", "1", "65536", "99999999999999999999999", "-1", "1.5", "10s", "500ms", "1h30m", "8k",
          "1m", "2g", "auto", "=", "~", "~*", "^~", "/", "/a/", "~^/(?<n>x)$", "(", "[", "a=b", "always",
          "127.0.0.1:1", "127.0.0.1", "[::1]:2", "*:3", "0.0.0.0:70000", "default_server", "reuseport",
          "backlog=-5", "weight=0", "max_fails=x", "fail_timeout=1s", "backup",
          "http://127.0.0.1:1", "http://127.0.0.1:1/x", "http://u", "https://x", "$host", "${x}", "$",
          "root_id=r", "on_error=continue", "file=x", "combined", "logs/x.log", "stderr", "debug", "emerg",
          "other.conf", "*.conf", "missing.conf", "gw.conf", str(PLUGINS / "add_header"), "x.wasm",
          "é", "²", "\\", "\\n", "a;b", "epoll", "kqueue", "01010", "200", "301", "404", "1000"]
SYNTAX = ["{", "}", ";", ";", "'", '"', "#", "\n", "# comment\n", "'quoted value'", '"a \\" b"', "''", '""',
          "'{'", "'}'", "$x{", ")"]
TOKENS = st.sampled_from(NAMES) | st.sampled_from(VALUES) | st.sampled_from(SYNTAX) | \
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6)


@pytest.fixture(scope="module")
def soup_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    (root / "conf").mkdir()
    (root / "conf" / "other.conf").write_text("worker_processes 2;\n")
    (root / "conf" / "x.conf").write_text("http { server { listen 127.0.0.1:9; } }\n")
    return root


@settings(max_examples=1500, deadline=None, database=None)
@given(st.lists(TOKENS, max_size=40), st.lists(st.sampled_from([" ", " ", "\n", "\t", ""]), min_size=40,
                                                  max_size=40))
def test_token_soup_raises_nothing_but_conf_errors(soup_dir, tokens, spaces):
    text = "".join(t + s for t, s in zip(tokens, spaces))
    path = soup_dir / "conf" / "gw.conf"
    path.write_text(text, errors="surrogateescape")
    try:
        load(str(path), str(soup_dir))
    except ConfError:
        pass


def test_deeply_nested_blocks_are_a_conf_error(tmp_path):
    """A thousand nested locations: refused with the place, like any other conf error."""
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "gw.conf"
    path.write_text("http { server { listen 127.0.0.1:9; " + "location / { " * 1000 + "}" * 1002 + "\n")
    with pytest.raises(ConfError):
        load(str(path), str(tmp_path))


# -- valid confs through -T ---------------------------------------------------------------


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


SAFE_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF, blacklist_categories=("Cs",)),
                    min_size=1, max_size=20)
TIMES = st.sampled_from(["1s", "500ms", "2m", "1h", "30", "1d"])
SIZES = st.sampled_from(["0", "1k", "64k", "1m", "100"])
SEGMENT = st.text(alphabet="abcxyz0189-_", min_size=1, max_size=6)


@st.composite
def location(draw, port: int):
    modifier = draw(st.sampled_from(["", "=", "^~"]))
    pattern = "/" + "/".join(draw(st.lists(SEGMENT, min_size=1, max_size=3)))
    lines = []
    if draw(st.booleans()):
        lines.append(f"add_header X-{draw(SEGMENT)} {quote(draw(SAFE_TEXT))}" + (" always" if draw(st.booleans()) else "") + ";")
    if draw(st.booleans()):
        lines.append(f"proxy_pass http://127.0.0.1:{port}/{draw(SEGMENT)};")
    else:
        lines.append(f"return {draw(st.sampled_from([200, 201, 204, 403, 404, 418]))} {quote(draw(SAFE_TEXT))};")
    if draw(st.booleans()):
        lines.append(f"keepalive_timeout {draw(TIMES)};")
    return f"location {modifier} {pattern} {{ " + " ".join(lines) + " }" if modifier else \
        f"location {pattern} {{ " + " ".join(lines) + " }"


@st.composite
def conf_files(draw):
    """(main text, {relative path: text}) of a valid conf with an include."""
    port = draw(st.integers(1025, 65000))
    servers = []
    for n in range(draw(st.integers(1, 3))):
        names = " ".join(draw(st.lists(SEGMENT.map(lambda s: s + ".test"), min_size=1, max_size=3, unique=True)))
        locations = draw(st.lists(location(port), min_size=1, max_size=4))
        patterns = set()
        unique = []
        for loc in locations:  # one location per pattern ("^~" and none are both prefixes)
            words = loc.split("{")[0].split()
            key = (words[1] == "=", words[-1])
            if key not in patterns:
                patterns.add(key)
                unique.append(loc)
        servers.append(f"server {{ listen 127.0.0.1:{port + 1 + n}; server_name {names}; "
                       + " ".join(unique) + " }")
    main = [
        f"worker_processes {draw(st.sampled_from(['1', '2', '8', 'auto']))};",
        f"worker_shutdown_timeout {draw(TIMES)};",
        f"error_log logs/error.log {draw(st.sampled_from(['debug', 'info', 'notice', 'warn', 'error']))};",
        f"events {{ worker_connections {draw(st.integers(1, 100000))}; "
        f"multi_accept {draw(st.sampled_from(['on', 'off']))}; }}",
        "http {",
        f"    keepalive_timeout {draw(TIMES)};",
        f"    client_max_body_size {draw(SIZES)};",
        f"    log_format f{draw(SEGMENT).replace('-', '_')} {quote('$status ' + draw(SAFE_TEXT))};",
        "    include conf.d/*.conf;",
        "}",
    ]
    included = {f"conf.d/{i}.conf": text + "\n" for i, text in enumerate(servers)}
    return "\n".join(main) + "\n", included


def dump_sections(output: str) -> dict[str, str]:
    parts = re.split(r"^# configuration file (.+):\n", output, flags=re.M)
    assert parts[0] == ""
    return {parts[i]: parts[i + 1][:-1] for i in range(1, len(parts), 2)}  # each ends with the added "\n"


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(conf_files())
def test_valid_confs_round_trip_through_dump(tmp_path_factory, files):
    prefix = tmp_path_factory.mktemp("conf")
    main, included = files
    (prefix / "conf" / "conf.d").mkdir(parents=True)
    (prefix / "conf" / "gw.conf").write_text(main)
    for name, text in included.items():
        (prefix / "conf" / name).write_text(text)
    config = load(str(prefix / "conf" / "gw.conf"), str(prefix))

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["-T", "-c", "conf/gw.conf", "-p", str(prefix)])
    assert status == 0, err.getvalue()
    sections = dump_sections(out.getvalue())
    assert list(sections) == config.files
    for path, text in sections.items():
        assert open(path).read() == text
        with open(path, "w") as f:  # what the dump says is the conf: load that
            f.write(text)
    assert load(str(prefix / "conf" / "gw.conf"), str(prefix)) == config

    texts = re.findall(r'return \d+ ("(?:[^"\\]|\\.)*")', "".join(included.values()))
    returns = [loc.ret[1] for server in config.http.servers for loc in server.locations if loc.ret]
    assert returns == [t[1:-1].replace('\\"', '"').replace("\\\\", "\\") for t in texts]


# -- the HTTP exchange ----------------------------------------------------------------------

HTTP_CONF = """
wasm { module add_header {plugins}/add_header; }
http {
    client_header_timeout 1s;
    client_body_timeout 1s;
    send_timeout 2s;
    client_max_body_size 4k;
    server {
        listen 127.0.0.1:{port};
        location / { return 200 "root $request_method $request_uri"; }
        location /f/ { return 200 "filtered"; proxy_wasm add_header 'prop'; }
        location /p/ { proxy_pass http://127.0.0.1:UPSTREAM/; proxy_wasm add_header 'prop'; }
        location = /redirect { return 302 /elsewhere; }
    }
}
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    upstream = Upstream()
    gw = Gateway(tmp_path_factory.mktemp("http"))
    gw.start(HTTP_CONF.replace("UPSTREAM", str(upstream.port)))
    try:
        yield gw
    finally:
        gw.stop()
        upstream.close()
    bad = gw.bad_log_lines()
    assert not bad, "\n".join(bad)


TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
WEIRD = st.binary(max_size=12).map(lambda b: b.decode("latin-1"))  # CR, LF, NUL, obs-text...


GOOD_METHODS = st.sampled_from(["GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
ODD_METHODS = st.sampled_from(["get", "G ET", "", "CONNECT", "TRACE"]) | st.text(TOKEN_CHARS, min_size=1, max_size=8)
GOOD_PREFIXES = st.sampled_from(["/", "/f/", "/p/", "/p/x/", "/redirect", "/nope/", "http://h/p/", "//p/", "/p/../f/"])
ODD_PREFIXES = st.sampled_from(["", "*", "/..", "/%2e%2e/", "/%zz", "p/"])
GOOD_SUFFIXES = st.text("abc/._-~%20?=&;", max_size=20)
ODD_SUFFIXES = st.text(st.characters(min_codepoint=1, max_codepoint=0x3FF, blacklist_categories=("Cs",)), max_size=30)
ODD_VERSIONS = st.sampled_from(["HTTP/1.0", "HTTP/2.0", "HTTP/1.9", "HTTP/1", "http/1.1", ""])
GOOD_NAMES = st.sampled_from(["User-Agent", "Accept", "Connection", "Content-Type", "X-Forwarded-For", "Expect",
                              "Upgrade", "TE", "Cookie", "Range", "If-None-Match", "Transfer-Encoding",
                              "Content-Length", "Trailer", "Keep-Alive", "Host"]) | \
    st.text(TOKEN_CHARS, min_size=1, max_size=12)
ODD_NAMES = WEIRD | st.sampled_from(["", " X", "X ", "X:Y", "\tX"])
GOOD_VALUES = st.sampled_from(["", "close", "keep-alive", "100-continue", "chunked", "0", "5", "-1", "x" * 300,
                               "bytes=0-1", "websocket", "gzip, chunked", "a, b"]) | \
    st.text(PRINTABLE, max_size=40).map(str.strip)
# Most requests get one flaw at most, so that many reach routing, the proxy and the filters.
FLAWS = st.sampled_from(["none"] * 6 + ["method", "target", "version", "header", "host", "everything"])


@st.composite
def requests(draw) -> tuple[str, bytes]:
    """(method, the request's bytes)."""
    flaw = draw(FLAWS)
    odd = {flaw} if flaw != "everything" else {"method", "target", "version", "header", "host"}
    method = draw(ODD_METHODS if "method" in odd else GOOD_METHODS)
    target = draw(ODD_PREFIXES if "target" in odd and draw(st.booleans()) else GOOD_PREFIXES)
    target += draw(ODD_SUFFIXES if "target" in odd else GOOD_SUFFIXES)
    version = draw(ODD_VERSIONS) if "version" in odd else "HTTP/1.1"
    head = f"{method} {target} {version}\r\n".encode("utf-8", "surrogateescape")
    if "host" not in odd:
        head += b"Host: prop.test\r\n"
    names, values = (GOOD_NAMES | ODD_NAMES, GOOD_VALUES | WEIRD) if "header" in odd else (GOOD_NAMES, GOOD_VALUES)
    for name, value in draw(st.lists(st.tuples(names, values), max_size=6)):
        if "header" not in odd and name.lower() in ("host", "content-length", "transfer-encoding"):
            continue  # framing headers stay consistent unless this request is meant to be flawed
        head += f"{name}: {value}\r\n".encode("latin-1")
    body = draw(st.binary(max_size=300))
    if body:
        head += b"Content-Length: %d\r\n" % len(body)
    if draw(st.booleans()):
        head += b"Connection: close\r\n"
    return method, head + b"\r\n" + body


def well_formed_or_closed(sock: socket.socket, method: str) -> tuple[int | None, bool]:
    """(status of the first response or None, closed): a strict parse, bounded in time.

    A response cut short by a close counts as a close (the gateway cuts the connection
    when an upstream fails after the head went out); anything else malformed raises.
    """
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="HEAD" if method == "HEAD" else "GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    status = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as err:
            if "peer closed connection without sending complete message body" in str(err):
                return status, True
            raise
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data and status is None:
                return None, True
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            return status, conn.their_state is not h11.DONE
        elif isinstance(event, h11.ConnectionClosed):
            return status, True


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_any_request_gets_a_well_formed_answer_or_a_close(live, request):
    method, data = request
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
        sock.sendall(data)
        try:
            status, closed = well_formed_or_closed(sock, method)
        except socket.timeout:
            raise AssertionError(f"no answer and no close within 5s for {data[:300]!r}")
        except h11.RemoteProtocolError as err:
            raise AssertionError(f"malformed response ({err}) to {data[:300]!r}")
    assert status is None or 100 <= status <= 599
    event(f"status {status}")
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert well_formed_or_closed(sock, "GET")[0] == 200
