"""Loading confs: errors with their file:line, includes, units, defaults, inheritance."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkgw.conf import dump, load
from forkgw.conf import directives as table
from forkgw.conf.model import AddHeader, Config, Listen, Settings, Upstream, UpstreamServer, Wasm
from forkgw.conf.pcre import compile_pcre
from forkgw.conf.values import parse_size, parse_time
from forkgw.errors import ConfError

COMBINED = ('$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
            '"$http_referer" "$http_user_agent"')

# -- errors -------------------------------------------------------------------

HTTP_ERRORS = [
    # (conf text, message, line)
    ("server {\n  lisen 80;\n}", 'unknown directive "lisen" (did you mean "listen"?)', 3),
    ("server {\n  frobnicate 80;\n}", 'unknown directive "frobnicate"', 3),
    ("proxy_pass http://127.0.0.1:1;", '"proxy_pass" directive is not allowed here', 2),
    ("server {\n location / {\n  listen 80;\n }\n}", '"listen" directive is not allowed here', 4),
    ("keepalive_timeout;", 'invalid number of arguments in "keepalive_timeout" directive', 2),
    ("server { return 200 a b; }", 'invalid number of arguments in "return" directive', 2),
    ("server;", 'directive "server" has no opening "{"', 2),
    ("server_tokens on { }", 'directive "server_tokens" is not terminated by ";"', 2),
    ("keepalive_timeout 1s;\nkeepalive_timeout 2s;", '"keepalive_timeout" directive is duplicate', 3),
    ("server { location / { proxy_pass http://127.0.0.1:1; proxy_pass http://127.0.0.1:2; } }",
     '"proxy_pass" directive is duplicate', 2),
    ("server_tokens maybe;", 'invalid value "maybe" in "server_tokens" directive, it must be "on" or "off"', 2),
    ("keepalive_timeout 5x;", 'invalid value "5x" in "keepalive_timeout" directive', 2),
    ("client_max_body_size 1t;", 'invalid value "1t" in "client_max_body_size" directive', 2),
    ("keepalive_requests 0;", 'invalid value "0" in "keepalive_requests" directive', 2),
    ("wasm_vm v8;", 'invalid value "v8" in "wasm_vm" directive, it must be "wasmtime"', 2),
    ("proxy_next_upstream error http_418;", 'invalid value "http_418" in "proxy_next_upstream" directive', 2),
    ("add_header X y sometimes;", 'invalid parameter "sometimes"', 2),
    ("add_header 'X Y' y;", 'invalid header name "X Y"', 2),
    ("proxy_set_header '' y;", 'invalid header name ""', 2),
    ("server { location / { proxy_pass http://:80; } }", 'invalid host in upstream "http://:80"', 2),
    ("server {\n listen 127.0.0.1:99999;\n}", 'invalid port in "127.0.0.1:99999" of the "listen" directive', 3),
    ("server { listen 80 spdy; }", 'invalid parameter "spdy"', 2),
    ("server { listen 80 backlog=x; }", 'invalid backlog "x"', 2),
    ("server { listen [::1:80; }", 'invalid host in "[::1:80" of the "listen" directive', 2),
    ("server { listen :80; }", 'invalid host in ":80" of the "listen" directive', 2),
    ("server { listen 80; listen 0.0.0.0:80; }", "a duplicate listen 0.0.0.0:80", 2),
    ("server { listen 127.0.0.1:8080 default_server; }\n"
     "server { listen 127.0.0.1:8080 default_server; }", "a duplicate default server for 127.0.0.1:8080", 3),
    ("server { listen 8080 reuseport; }\nserver { listen 8080 backlog=10; }",
     "duplicate listen options for 0.0.0.0:8080", 3),
    ("server { server_name a*b.com; }", 'invalid server name or wildcard "a*b.com"', 2),
    ("server { server_name ~(a; }", 'invalid regex "(a" in "server_name" directive: '
     "missing ), unterminated subpattern at position 0", 2),
    ("server {\n location / {\n  proxy_pass http://nowhere;\n }\n}", 'host not found in upstream "nowhere"', 4),
    ("upstream backend { server 127.0.0.1:9000; }\n"
     "server {\n location / {\n  proxy_pass http://bakend;\n }\n}",
     'host not found in upstream "bakend" (did you mean "backend"?)', 5),
    ("server { location / { proxy_pass http://no-such-host.invalid:80; } }",
     'host not found in upstream "no-such-host.invalid:80"', 2),
    ("server { location / { proxy_pass http://127.0.0.1:0; } }", 'invalid port in upstream "127.0.0.1:0"', 2),
    ("server { location / { proxy_pass https://127.0.0.1:0; } }", 'invalid port in upstream "127.0.0.1:0"', 2),
    ("server { location / { proxy_pass ftp://127.0.0.1:21; } }", 'invalid URL prefix in "ftp://127.0.0.1:21"', 2),
    ("server { location / { proxy_pass http://$host; } }",
     'invalid value "http://$host" in "proxy_pass" directive, variables are not supported in proxy_pass', 2),
    ("server { location ~ \\.php$ { proxy_pass http://127.0.0.1:9000/x; } }",
     '"proxy_pass" cannot have URI part in location given by regular expression', 2),
    ("upstream a { server 127.0.0.1:1; }\nupstream a { server 127.0.0.1:2; }", 'duplicate upstream "a"', 3),
    ("upstream a {\n}", "no servers are inside upstream", 2),
    ("upstream a { server 127.0.0.1:1 weight=0; }", 'invalid parameter "weight=0"', 2),
    ("upstream a { server 127.0.0.1:1 down; }", 'invalid parameter "down"', 2),
    ("upstream a { server no-such-host.invalid:80; }", 'host not found in upstream "no-such-host.invalid:80"', 2),
    ("upstream a { server 127.0.0.1:1; keepalive 1; keepalive 2; }", '"keepalive" directive is duplicate', 2),
    ("server {\n location /a { }\n location /a { }\n}", 'duplicate location "/a"', 4),
    ("server {\n location /a { }\n location ^~ /a { }\n}", 'duplicate location "/a"', 4),
    ("server {\n location = /a { }\n location =/a { }\n}", 'duplicate location "/a"', 4),
    ("server { location !~ /a { } }", 'invalid location modifier "!~"', 2),
    ("server { location ~ (a { } }", 'invalid regex "(a" in "location" directive: '
     "missing ), unterminated subpattern at position 0", 2),
    ("server {\n location /a {\n  location /b { }\n }\n}", 'location "/b" is outside location "/a"', 4),
    ("server {\n location = /a {\n  location /a/b { }\n }\n}",
     'location "/a/b" cannot be inside the exact location "/a"', 4),
    ("server { location @named { } }", 'named location "@named" is not supported', 2),
    ("server { return abc; }", 'invalid return code "abc"', 2),
    ("server { return 1000; }", 'invalid return code "1000"', 2),
    ("access_log logs/a.log nosuch;", 'unknown log format "nosuch"', 2),
    ("log_format combined '$status';", 'duplicate "log_format" name "combined"', 2),
    ("access_log off extra;", 'invalid parameter "extra"', 2),
    ("proxy_wasm nosuch;", 'unknown wasm module "nosuch"', 2),
    ("proxy_wasm nosuch on_error=maybe;",
     'invalid value "on_error=maybe" in "proxy_wasm" directive, it must be "on_error=fail" or "on_error=continue"', 2),
    ("events { }", '"events" directive is not allowed here', 2),
]


@pytest.mark.parametrize("body, message, line", HTTP_ERRORS)
def test_http_errors(confdir, body, message, line):
    with pytest.raises(ConfError) as caught:
        confdir.http(body)
    assert (caught.value.message, caught.value.where) == (message, confdir.where(line))


MAIN_ERRORS = [
    ("worker_processes;", 'invalid number of arguments in "worker_processes" directive', 1),
    ("worker_processes 1;\nworker_processes 2;", '"worker_processes" directive is duplicate', 2),
    ("worker_processes many;", 'invalid value "many" in "worker_processes" directive', 1),
    ("worker_cpu_affinity 0102;", '"worker_cpu_affinity": invalid character "2" in "0102"', 1),
    ("error_log logs/e.log loud;", 'invalid log level "loud"', 1),
    ("pid '';", 'invalid value "" in "pid" directive', 1),
    ("events {\n use kevent;\n}", 'invalid event type "kevent"', 2),
    ("events {\n worker_connections 10;\n}\nevents { }", '"events" directive is duplicate', 4),
    ("http;", 'directive "http" has no opening "{"', 1),
    ("http {\n server {\n", 'unexpected end of file, expecting "}"', 3),
    ("pid logs/x.pid", 'unexpected end of file, expecting ";" or "}"', 1),
    ("}", 'unexpected "}"', 1),
    ("{", 'unexpected "{"', 1),
    ("listen 80;", '"listen" directive is not allowed here', 1),
    ("wasm {\n module a missing.wasm;\n}", None, 2),  # message names the absolute path, checked below
    ("wasm {\n callback_timeout 1s;\n callback_timeout 2s;\n}", '"callback_timeout" directive is duplicate', 3),
    ("wasm { module a a.wasm root_id=; }", 'invalid parameter "root_id="', 1),
    ("wasm {\n module a a.wasm;\n module a a.wasm;\n}", 'duplicate wasm module "a"', 3),
    ("wasm { memory_max lots; }", 'invalid value "lots" in "memory_max" directive', 1),
]


@pytest.mark.parametrize("text, message, line", MAIN_ERRORS)
def test_main_errors(confdir, text, message, line):
    (confdir.prefix / "a.wasm").write_bytes(b"\0asm")
    with pytest.raises(ConfError) as caught:
        confdir.load(text)
    if message is None:
        message = f'open() "{confdir.prefix / "missing.wasm"}" failed (2: No such file or directory)'
    assert (caught.value.message, caught.value.where) == (message, confdir.where(line))


def test_error_in_included_file_names_that_file(confdir):
    confdir.write("server {\n  listen 80;\n  bogus on;\n}\n", "conf/sites/a.conf")
    with pytest.raises(ConfError) as caught:
        confdir.load("http {\n  include sites/*.conf;\n}\n")
    assert str(caught.value) == f'unknown directive "bogus" in {confdir.where(3, "conf/sites/a.conf")}'


def test_missing_include_file_is_an_error_at_the_include(confdir):
    with pytest.raises(ConfError) as caught:
        confdir.load("http {\n  include nothere.conf;\n}\n")
    missing = confdir.prefix / "conf" / "nothere.conf"
    assert caught.value.message == f'open() "{missing}" failed (2: No such file or directory)'
    assert caught.value.where == confdir.where(2)


def test_recursive_include(confdir):
    confdir.write("include loop.conf;\n", "conf/loop.conf")
    with pytest.raises(ConfError) as caught:
        confdir.load("include loop.conf;\n")
    assert caught.value.message == f'include of "{confdir.prefix / "conf" / "loop.conf"}" is recursive'


def test_missing_main_conf(tmp_path):
    with pytest.raises(ConfError) as caught:
        load(str(tmp_path / "none.conf"))
    assert str(caught.value) == f'open() "{tmp_path / "none.conf"}" failed (2: No such file or directory)'


def test_extra_directives_errors_say_command_line(confdir):
    with pytest.raises(ConfError) as caught:
        confdir.load("worker_processes 1;\n", extra="worker_processes 2;")
    assert str(caught.value) == '"worker_processes" directive is duplicate in command line'
    with pytest.raises(ConfError) as caught:
        confdir.load("", extra="worker_processes")
    assert str(caught.value) == 'unexpected end of file, expecting ";" or "}" in command line'


# -- whole confs --------------------------------------------------------------

OPENRESTY = (
    "worker_processes 1; worker_cpu_affinity auto; worker_rlimit_nofile 65535; "
    "events { use epoll; worker_connections 65535; accept_mutex off; multi_accept on; } "
    "http { server { listen 80; server_tokens off; location /t { return 200; } } }"
)


def test_openresty_conf_without_lua_loads(confdir):
    config = confdir.load(OPENRESTY)
    assert (config.worker_processes, config.worker_cpu_affinity, config.worker_rlimit_nofile) == (1, "auto", 65535)
    assert (config.event_method, config.worker_connections, config.accept_mutex, config.multi_accept) == (
        "epoll", 65535, False, True)
    [server] = config.http.servers
    assert server.listens == [Listen(addr="0.0.0.0", port=80, where=confdir.where(1))]
    assert server.settings.server_tokens is False
    [location] = server.locations
    assert (location.modifier, location.pattern, location.ret) == ("", "/t", (200, None))
    assert location.settings.server_tokens is False


def test_defaults_of_an_empty_conf(confdir):
    config = confdir.load("")
    prefix = str(confdir.prefix)
    assert config.path == str(confdir.main) and config.prefix == prefix
    assert config.pid == os.path.join(prefix, "logs", "forkgw.pid")
    assert config.error_log == (os.path.join(prefix, "logs", "error.log"), "error")
    assert (config.worker_processes, config.worker_shutdown_timeout, config.worker_connections) == (1, 30.0, 512)
    assert config.http is None and config.wasm == Wasm()
    assert config.files == [str(confdir.main)]


def test_table_defaults_agree_with_model_defaults(confdir):
    """The model's dataclass defaults and the documented defaults are the same values."""
    config = confdir.load("http { server { } }")
    settings = config.http.servers[0].settings
    expected = Settings(access_log=[(str(confdir.prefix / "logs" / "access.log"), "combined")])
    assert settings == expected
    bare = Config(path="", prefix="")
    for name in ("worker_processes", "worker_shutdown_timeout", "worker_connections", "accept_mutex", "multi_accept"):
        assert getattr(config, name) == getattr(bare, name), name
    assert config.http.log_formats == {"combined": COMBINED}
    assert config.http.wasm_vm == "wasmtime"


def test_prefix_default_and_explicit(tmp_path):
    conf = tmp_path / "etc" / "gw.conf"
    conf.parent.mkdir()
    conf.write_text("pid run/gw.pid;\n")
    assert load(str(conf)).pid == str(tmp_path / "etc" / "run" / "gw.pid")  # not in conf/: its own folder
    assert load("etc/gw.conf", prefix=str(tmp_path)).pid == str(tmp_path / "run" / "gw.pid")  # -c under -p
    assert load(str(conf), prefix="/srv/gw").pid == "/srv/gw/run/gw.pid"


def test_paths_resolve_against_prefix_and_includes_against_conf_folder(confdir):
    confdir.write("access_log logs/included.log;\n", "conf/inc/log.conf")
    config = confdir.load("pid /run/abs.pid;\nerror_log stderr warn;\nhttp { include inc/log.conf; server { } }")
    assert config.pid == "/run/abs.pid"
    assert config.error_log == ("stderr", "warn")
    assert config.http.servers[0].settings.access_log == [(str(confdir.prefix / "logs" / "included.log"), "combined")]


def test_includes_read_sorted_globs_in_place(confdir):
    confdir.write("server { server_name b; }\n", "conf/sites/b.conf")
    confdir.write("server { server_name a; }\n", "conf/sites/a.conf")
    confdir.write("server { server_name c; }\n", "conf/sites/c.other")
    confdir.write("location /x { return 204; }\n", "conf/snippets/x.conf")
    config = confdir.load(
        "http {\n"
        "  server { server_name first; include snippets/x.conf; }\n"
        "  include sites/*.conf;\n"
        "  include none/*.conf;\n"  # a mask matching nothing is fine
        "  server { server_name last; }\n"
        "}\n"
    )
    assert [s.names for s in config.http.servers] == [["first"], ["a"], ["b"], ["last"]]
    assert config.http.servers[0].locations[0].ret == (204, None)
    conf = confdir.prefix / "conf"
    assert config.files == [str(confdir.main), str(conf / "snippets/x.conf"), str(conf / "sites/a.conf"),
                            str(conf / "sites/b.conf")]


def test_dump_is_nginx_T_format(confdir):
    confdir.write("worker_connections 8;\n", "conf/ev.conf")
    config = confdir.load("events { include ev.conf; }")
    assert dump(config) == (f"# configuration file {confdir.main}:\nevents {{ include ev.conf; }}\n"
                            f"# configuration file {confdir.prefix / 'conf' / 'ev.conf'}:\nworker_connections 8;\n\n")


def test_extra_directives_append_to_main(confdir):
    config = confdir.load("pid a.pid;", extra="worker_processes 3; user nobody nogroup;")
    assert (config.worker_processes, config.user, config.group) == (3, "nobody", "nogroup")


def test_worker_processes_auto(confdir):
    assert confdir.load("worker_processes auto;").worker_processes == (os.cpu_count() or 1)


# -- units --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [("500ms", 0.5), ("10s", 10), ("10", 10), ("5m", 300), ("1h", 3600), ("1d", 86400), ("1h30m", 5400),
     ("0", 0), ("1w", 604800), ("", None), ("s", None), ("5 s", None), ("1.5s", None), ("10x", None),
     ("5s10", None), ("1m30", 90), ("1s1m", None), ("1h1h", None)],
)
def test_time_units(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize(
    "text, size",
    [("1024", 1024), ("8k", 8192), ("8K", 8192), ("1m", 1048576), ("1M", 1048576), ("1g", 1 << 30), ("0", 0),
     ("1t", None), ("k", None), ("1.5m", None), ("", None)],
)
def test_size_units(text, size):
    assert parse_size(text) == size


def test_units_in_directives(confdir):
    http = confdir.http(
        "keepalive_timeout 500ms; client_max_body_size 0; large_client_header_buffers 8 16k; "
        "proxy_read_timeout 2m; server { }"
    )
    s = http.servers[0].settings
    assert (s.keepalive_timeout, s.client_max_body_size, s.large_client_header_buffers, s.proxy_read_timeout) == (
        0.5, 0, (8, 16384), 120.0)


# -- directives ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args, addr, port",
    [("8080", "0.0.0.0", 8080), ("127.0.0.1", "127.0.0.1", 80), ("127.0.0.1:81", "127.0.0.1", 81),
     ("*:82", "0.0.0.0", 82), ("[::]:8080", "::", 8080), ("[::1]", "::1", 80), ("localhost:83", None, 83)],
)
def test_listen_forms(confdir, args, addr, port):
    listen = confdir.http(f"server {{ listen {args}; }}").servers[0].listens[0]
    assert listen.port == port
    if addr is None:
        assert listen.addr in ("127.0.0.1", "::1")
    else:
        assert listen.addr == addr


def test_listen_options_and_default(confdir):
    http = confdir.http(
        "server { }\n"
        "server { listen 127.0.0.1:8080 default_server reuseport backlog=64; }\n"
        "server { listen 127.0.0.1:8080; }\n"
    )
    first, second, third = http.servers
    assert first.listens == [Listen("0.0.0.0", 80, where=confdir.where(2))]
    assert second.listens[0] == Listen("127.0.0.1", 8080, True, True, 64, where=confdir.where(3))
    # socket options are per address: every Listen of it carries them
    assert (third.listens[0].reuseport, third.listens[0].backlog, third.listens[0].default_server) == (True, 64, False)


def test_server_names(confdir):
    server = confdir.http('server { server_name Example.COM *.a.org www.b.* ~^w\\d+$ "" .c.net; }').servers[0]
    assert server.names == ["example.com", "*.a.org", "www.b.*", "~^w\\d+$", "", "c.net", "*.c.net"]
    assert confdir.http("server { }").servers[0].names == [""]


# -- regexes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "pcre, python",
    [
        (r"^/(?<id>\d+)$", r"^/(?P<id>\d+)$"),
        (r"^/(?'id'\d+)$", r"^/(?P<id>\d+)$"),
        (r"(?<a>x)(?<b_2>y)", r"(?P<a>x)(?P<b_2>y)"),
        (r"(?<=/)x", r"(?<=/)x"),  # lookbehinds are not named groups
        (r"(?<!/)x", r"(?<!/)x"),
        (r"(?P<id>x)", r"(?P<id>x)"),  # Python's own spelling passes through
    ],
)
def test_pcre_named_groups_become_python_ones(pcre, python):
    assert compile_pcre(pcre, ignore_case=False).pattern == python


def test_regexes_are_kept_compiled_in_the_model(confdir):
    server = confdir.http(
        "server {\n server_name ~^(?<sub>\\w+)\\.test$ plain.test;\n"
        " location ~* \\.PNG$ { }\n location ~ ^/a { location ~ b$ { } }\n location / { }\n location = /x { }\n}"
    ).servers[0]
    assert server.name_regexes == {r"~^(?<sub>\w+)\.test$": re.compile(r"^(?P<sub>\w+)\.test$")}
    png, a, prefix, exact = server.locations
    assert png.regex == re.compile(r"\.PNG$", re.IGNORECASE)
    assert a.regex == re.compile(r"^/a") and a.locations[0].regex == re.compile(r"b$")
    assert prefix.regex is None and exact.regex is None


CONF_ONLY = textwrap.dedent("""
    import importlib, pkgutil, sys
    import forkgw.conf
    for module in pkgutil.iter_modules(forkgw.conf.__path__):
        importlib.import_module("forkgw.conf." + module.name)
    config = forkgw.conf.load(sys.argv[1])
    assert config.http.servers[0].locations[0].regex is not None
    print("\\n".join(sorted(name for name in sys.modules if name.startswith("forkgw"))))
""")
REQUEST_PATH = ("forkgw.routing", "forkgw.http", "forkgw.worker", "forkgw.wasm")


def test_conf_imports_nothing_from_the_request_path(confdir):
    """The conf layer is below the request path: loading a conf pulls in no routing, HTTP, worker or wasm code."""
    confdir.write("http { server { server_name ~^w\\d+$; location ~ \\.php$ { } } }\n")
    root = Path(__file__).resolve().parents[2]  # `python -c` puts the working folder first on sys.path
    run = subprocess.run([sys.executable, "-c", CONF_ONLY, str(confdir.main)], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    loaded = run.stdout.split()
    assert "forkgw.conf.parser" in loaded and "forkgw.conf.pcre" in loaded
    leaked = [name for name in loaded if any(name == p or name.startswith(p + ".") for p in REQUEST_PATH)]
    assert leaked == []


def test_return_forms(confdir):
    server = confdir.http(
        "server {\n"
        " location /a { return 200 'hi'; }\n location /b { return 301 https://x/; }\n"
        " location /c { return http://y/; }\n location /d { return 444; }\n"
        " location /e { return $scheme://z; }\n"
        "}"
    ).servers[0]
    assert [loc.ret for loc in server.locations] == [
        (200, "hi"), (301, "https://x/"), (302, "http://y/"), (444, None), (302, "$scheme://z")]


def test_proxy_pass_and_upstreams(confdir):
    http = confdir.http(
        "upstream backend { server 127.0.0.1:9000 weight=3 max_fails=2 fail_timeout=5s; "
        "server localhost backup; keepalive 8; }\n"
        "server {\n"
        " location /a/ { proxy_pass http://backend/new/; }\n"
        " location /b { proxy_pass http://backend; }\n"
        " location /c { proxy_pass http://127.0.0.1:9001; }\n"
        " location /d { proxy_pass http://localhost:9002/; }\n"
        " location /e { proxy_pass http://127.0.0.1; }\n"
        " location /f { proxy_pass http://[::1]:9003; }\n"
        "}"
    )
    passes = [(loc.proxy_pass.url, loc.proxy_pass.upstream, loc.proxy_pass.uri) for loc in http.servers[0].locations]
    assert passes == [
        ("http://backend/new/", "backend", "/new/"), ("http://backend", "backend", None),
        ("http://127.0.0.1:9001", "127.0.0.1:9001", None), ("http://localhost:9002/", "localhost:9002", "/"),
        ("http://127.0.0.1", "127.0.0.1", None), ("http://[::1]:9003", "[::1]:9003", None),
    ]
    assert http.upstreams["backend"] == Upstream(
        "backend", [UpstreamServer("127.0.0.1", 9000, 3, 2, 5.0), UpstreamServer("localhost", 80, backup=True)],
        keepalive=8, where=confdir.where(2))
    assert http.upstreams["127.0.0.1:9001"].servers == [UpstreamServer("127.0.0.1", 9001)]
    assert http.upstreams["localhost:9002"].servers == [UpstreamServer("localhost", 9002)]
    assert http.upstreams["127.0.0.1"].servers == [UpstreamServer("127.0.0.1", 80)]
    assert http.upstreams["[::1]:9003"].servers == [UpstreamServer("::1", 9003)]


def test_upstream_declared_after_its_use(confdir):
    http = confdir.http("server { location / { proxy_pass http://later; } }\nupstream later { server 127.0.0.1:1; }")
    assert http.servers[0].locations[0].proxy_pass.upstream == "later"
    assert list(http.upstreams) == ["later"]


def test_log_formats_concatenate(confdir):
    http = confdir.http("log_format brief '$status ' \"$request_time\";\naccess_log logs/b.log brief; server { }")
    assert http.log_formats == {"combined": COMBINED, "brief": "$status $request_time"}
    assert http.servers[0].settings.access_log == [(str(confdir.prefix / "logs" / "b.log"), "brief")]


def test_add_header_and_next_upstream(confdir):
    s = confdir.http("add_header A 1; add_header B 2 always; proxy_next_upstream off; server { }").servers[0].settings
    assert s.add_header == [AddHeader("A", "1"), AddHeader("B", "2", True)]
    assert s.proxy_next_upstream == ()


# -- wasm modules and filters -------------------------------------------------


def write_plugin(confdir, folder: str, yaml_text: str) -> None:
    plugin = confdir.prefix / folder
    plugin.mkdir(parents=True)
    (plugin / "filter.wasm").write_bytes(b"\0asm")
    (plugin / "plugin.yaml").write_text(yaml_text)


def test_wasm_modules_from_files_and_plugin_folders(confdir):
    write_plugin(confdir, "plugins/limit",
                 "wasm: filter.wasm\nroot_id: limiter\nconfig:\n  rate: 10\n  keys: [a, b]\ndescription: Limits.\n")
    (confdir.prefix / "plain.wasm").write_bytes(b"\0asm")
    config = confdir.load(
        "wasm {\n module plain plain.wasm vmconf;\n module limit plugins/limit;\n"
        " module limit2 plugins/limit root_id=other;\n callback_timeout 20ms;\n memory_max 16m;\n}\n"
    )
    wasm = config.wasm
    assert (wasm.callback_timeout, wasm.memory_max) == (0.02, 16 << 20)
    plain, limit, limit2 = wasm.modules.values()
    assert (plain.name, plain.path, plain.vm_config, plain.root_id, plain.default_config) == (
        "plain", str(confdir.prefix / "plain.wasm"), "vmconf", None, "")
    assert limit.path == str(confdir.prefix / "plugins" / "limit" / "filter.wasm")
    assert (limit.root_id, limit.description) == ("limiter", "Limits.")
    assert json.loads(limit.default_config) == {"rate": 10, "keys": ["a", "b"]}
    assert limit2.root_id == "other"


@pytest.mark.parametrize(
    "yaml_text, problem",
    [("- a\n- b\n", "expected a mapping of keys"), ("root_id: x\n", '"wasm" must name the module file'),
     ("wasm: filter.wasm\nroot_id: [1]\n", '"root_id" must be a string')],
)
def test_bad_plugin_yaml_names_the_file(confdir, yaml_text, problem):
    write_plugin(confdir, "plugins/bad", yaml_text)
    with pytest.raises(ConfError) as caught:
        confdir.load("wasm {\n  module bad plugins/bad;\n}\n")
    yaml_path = confdir.prefix / "plugins" / "bad" / "plugin.yaml"
    assert str(caught.value) == f'invalid plugin file "{yaml_path}": {problem} in {confdir.where(2)}'


def test_unparsable_plugin_yaml(confdir):
    write_plugin(confdir, "plugins/bad", "wasm: [unclosed\n")
    with pytest.raises(ConfError) as caught:
        confdir.load("wasm { module bad plugins/bad; }")
    assert caught.value.message.startswith(f'invalid YAML in "{confdir.prefix / "plugins" / "bad" / "plugin.yaml"}"')


def test_filters_config_sources(confdir):
    write_plugin(confdir, "plugins/limit", "wasm: filter.wasm\nconfig: default-text\n")
    (confdir.prefix / "limits.yaml").write_text("rate: 5\nburst: [1, 2]\n")
    config = confdir.load(
        "http {\n proxy_wasm limit;\n server {\n"
        "  location /a { proxy_wasm limit 'given' root_id=r on_error=continue; }\n"
        "  location /b { proxy_wasm limit file=limits.yaml; }\n"
        " }\n}\nwasm { module limit plugins/limit; }\n"  # wasm{} may come after http{}
    )
    server = config.http.servers[0]
    [inherited] = server.settings.filters
    assert (inherited.module, inherited.config, inherited.root_id, inherited.on_error, inherited.where) == (
        "limit", "default-text", None, "fail", confdir.where(2))
    [given] = server.locations[0].settings.filters
    assert (given.config, given.root_id, given.on_error) == ("given", "r", "continue")
    [from_file] = server.locations[1].settings.filters
    assert json.loads(from_file.config) == {"rate": 5, "burst": [1, 2]}


def test_filter_file_and_config_conflict(confdir):
    (confdir.prefix / "c.yaml").write_text("a: 1\n")
    with pytest.raises(ConfError) as caught:
        confdir.http("proxy_wasm m 'x' file=c.yaml;")
    assert caught.value.message == '"file=" and a configuration string cannot both be given in "proxy_wasm" directive'


# -- inheritance --------------------------------------------------------------


def test_array_directives_inherit_only_when_none_declared(confdir):
    http = confdir.http(
        "proxy_set_header X-A a;\nproxy_set_header X-B b;\nadd_header H-http 1;\n"
        "server {\n"
        "  add_header H-server 2;\n"
        "  location /inherit { }\n"
        "  location /own { proxy_set_header X-C c; }\n"
        "  location /off { access_log off; }\n"
        "  location /parent {\n"
        "    add_header H-parent 3;\n"
        "    location /parent/child { }\n"
        "    location /parent/own { add_header H-child 4; }\n"
        "  }\n"
        "}\n"
    )
    server = http.servers[0]
    assert server.settings.proxy_set_header == [("X-A", "a"), ("X-B", "b")]
    assert server.settings.add_header == [AddHeader("H-server", "2")]  # replaces, not appends to, http's
    inherit, own, off, parent = server.locations
    assert inherit.settings.proxy_set_header == [("X-A", "a"), ("X-B", "b")]
    assert inherit.settings.add_header == [AddHeader("H-server", "2")]
    assert own.settings.proxy_set_header == [("X-C", "c")]
    assert off.settings.access_log == [] and inherit.settings.access_log != []
    child, child_own = parent.locations
    assert child.settings.add_header == [AddHeader("H-parent", "3")]
    assert child_own.settings.add_header == [AddHeader("H-child", "4")]


def test_scalar_directives_inherit_when_unset(confdir):
    http = confdir.http(
        "keepalive_timeout 10s;\n"
        "server {\n"
        "  proxy_read_timeout 5s;\n"
        "  location /a {\n"
        "    send_timeout 3s;\n"
        "    location /a/b { keepalive_timeout 1s; }\n"
        "  }\n"
        "}\n"
        "server_tokens off;\n"  # http-level settings after the servers still apply, as in nginx
    )
    server = http.servers[0]
    a = server.locations[0]
    b = a.locations[0]
    assert (server.settings.keepalive_timeout, server.settings.proxy_read_timeout) == (10, 5)
    assert (a.settings.keepalive_timeout, a.settings.proxy_read_timeout, a.settings.send_timeout) == (10, 5, 3)
    assert (b.settings.keepalive_timeout, b.settings.proxy_read_timeout, b.settings.send_timeout) == (1, 5, 3)
    assert server.settings.send_timeout == 60
    assert all(not s.server_tokens for s in (server.settings, a.settings, b.settings))


def test_server_level_return(confdir):
    server = confdir.http("server { return 301 http://elsewhere/; location / { } }").servers[0]
    assert server.ret == (301, "http://elsewhere/")
    assert server.locations[0].ret is None


def test_access_log_off_wins_at_its_level(confdir):
    server = confdir.http("server { access_log logs/a.log; access_log off; }").servers[0]
    assert server.settings.access_log == []


def test_bare_host_name_needs_a_port(confdir):
    with pytest.raises(ConfError) as caught:
        confdir.http("server { location / { proxy_pass http://localhost; } }")
    assert caught.value.message == (
        'host not found in upstream "localhost" (no upstream block of that name; for the host, write "localhost:80")')


# -- robustness ---------------------------------------------------------------

# Directives that look up host names or open files are left out: the point is the value parsers.
_OFFLINE = sorted({d.name for d in table.DIRECTIVES} - {"server", "proxy_pass", "listen", "module", "include"})
_WORDS = st.sampled_from(["on", "off", "0", "1", "10s", "8k", "-1", "²", "auto", "=", "~", "^~", "/a", "~(",
                          "http://", "a=b", "root_id=", "on_error=x", "[::", "*.x", "x.*", "$v", ""])
_FRAMES = ["{}", "events {{ {} }}", "wasm {{ {} }}", "http {{ {} }}", "http {{ upstream u {{ {} }} }}",
           "http {{ server {{ {} }} }}", "http {{ server {{ location / {{ {} }} }} }}"]


def _quoted(word: str) -> str:
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(_OFFLINE), st.lists(_WORDS | st.text(max_size=4), max_size=4)),
                max_size=6),
       st.sampled_from(_FRAMES))
def test_any_directive_soup_raises_only_conf_errors(confdir, statements, frame):
    body = " ".join(name + "".join(" " + _quoted(w) for w in args) + ";" for name, args in statements)
    try:
        confdir.load(frame.format(body))
    except ConfError:
        pass
