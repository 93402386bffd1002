"""Server and location selection, target normalisation and the upstream URI, by nginx's rules."""

from __future__ import annotations

import re

import pytest

from forkgw.conf.model import Http, Listen, Location, ProxyPass, Server, Settings
from forkgw.routing import Router, normalize_path, proxy_uri

# -- locations ----------------------------------------------------------------

# The example of nginx's documentation for `location`, with its answers A-E.
NGINX_DOCS_EXAMPLE = r"""
    location = / { return 200 A; }
    location / { return 200 B; }
    location /documents/ { return 200 C; }
    location ^~ /images/ { return 200 D; }
    location ~* \.(gif|jpg|jpeg)$ { return 200 E; }
"""


def routed(confdir, locations: str):
    http = confdir.http("server {\n" + locations + "\n}")
    router = Router(http)
    server = http.servers[0]

    def answer(path: str) -> str | None:
        location = router.location_for(server, path)
        return None if location is None else location.ret[1]

    return answer


@pytest.mark.parametrize(
    "path, answer",
    [("/", "A"), ("/index.html", "B"), ("/documents/document.html", "C"), ("/images/1.gif", "D"),
     ("/documents/1.jpg", "E"), ("/documents/1.JPG", "E"), ("/x.jpeg", "E"), ("/images/", "D")],
)
def test_nginx_documentation_example(confdir, path, answer):
    assert routed(confdir, NGINX_DOCS_EXAMPLE)(path) == answer


NESTED = r"""
    location /a/ {
        return 200 prefix-a;
        location ~ \.php$ { return 200 nested-php; }
        location /a/deep/ { return 200 deep; }
        location ^~ /a/static/ { return 200 static; }
    }
    location ~ \.php$ { return 200 outer-php; }
    location ~ ^/a/ { return 200 outer-a; }
    location ^~ /b/ {
        return 200 prefix-b;
        location ~ \.php$ { return 200 b-php; }
    }
    location = /exact { return 200 exact; }
    location /exact { return 200 exact-prefix; }
    location /ex { return 200 ex; }
    location ~ CaSe { return 200 sensitive; }
"""


@pytest.mark.parametrize(
    "path, answer",
    [
        ("/a/x.php", "nested-php"),  # nested regexes of the matched prefix come first
        ("/a/x.html", "outer-a"),  # then the server's regexes, in conf order
        ("/a/deep/x.html", "outer-a"),  # a deeper nested prefix still yields to a regex
        ("/a/static/x.php", "outer-php"),  # `^~` stops regexes at its own level only
        ("/c/x.php", "outer-php"),
        ("/b/x.php", "b-php"),  # `^~`: no outer regexes, but its nested ones apply
        ("/b/x.html", "prefix-b"),
        ("/exact", "exact"),
        ("/exact/", "exact-prefix"),
        ("/exa", "ex"),
        ("/CaSe", "sensitive"),
        ("/case", None),
        ("/nothing", None),
    ],
)
def test_nested_locations_and_regex_order(confdir, path, answer):
    assert routed(confdir, NESTED)(path) == answer


def test_deepest_prefix_is_kept_when_no_regex_matches(confdir):
    answer = routed(confdir, "location /a/ { return 200 a; location /a/b/ { return 200 ab; } }")
    assert answer("/a/b/c") == "ab"
    assert answer("/a/c") == "a"


def test_location_with_nothing_declared_returns_none(confdir):
    http = confdir.http("server { }")
    assert Router(http).location_for(http.servers[0], "/") is None


# -- servers ------------------------------------------------------------------

SERVERS = r"""
    server { listen 127.0.0.1:8080; server_name first.test; return 200 first; }
    server { listen 127.0.0.1:8080; server_name example.com www.example.com; return 200 exact; }
    server { listen 127.0.0.1:8080; server_name *.example.com; return 200 wild-short; }
    server { listen 127.0.0.1:8080; server_name *.api.example.com; return 200 wild-long; }
    server { listen 127.0.0.1:8080; server_name www.example.*; return 200 tail-short; }
    server { listen 127.0.0.1:8080; server_name www.example.co.*; return 200 tail-long; }
    server { listen 127.0.0.1:8080; server_name ~^w\d+\.test$; return 200 regex-1; }
    server { listen 127.0.0.1:8080; server_name ~^w1; return 200 regex-2; }
    server { listen 127.0.0.1:8080; server_name ""; return 200 no-host; }
    server { listen 127.0.0.1:9090 default_server; listen 127.0.0.1:8080; server_name other; return 200 other; }
    server { listen 127.0.0.1:9090; server_name ninety; return 200 ninety; }
    server { listen 8088; return 200 any-address; }
"""


@pytest.mark.parametrize(
    "key, host, answer",
    [
        (("127.0.0.1", 8080), "example.com", "exact"),
        (("127.0.0.1", 8080), "WWW.Example.COM:8080", "exact"),  # case, port
        (("127.0.0.1", 8080), "example.com.", "exact"),  # trailing dot
        (("127.0.0.1", 8080), "a.example.com", "wild-short"),
        (("127.0.0.1", 8080), "x.y.example.com", "wild-short"),
        (("127.0.0.1", 8080), "v1.api.example.com", "wild-long"),  # longest leading wildcard
        (("127.0.0.1", 8080), "www.example.org", "tail-short"),
        (("127.0.0.1", 8080), "www.example.co.uk", "tail-long"),  # longest trailing wildcard
        (("127.0.0.1", 8080), "w1.test", "regex-1"),  # first matching regex in conf order
        (("127.0.0.1", 8080), "w1.other", "regex-2"),
        (("127.0.0.1", 8080), None, "no-host"),
        (("127.0.0.1", 8080), "", "no-host"),
        (("127.0.0.1", 8080), "unknown.test", "first"),  # no default_server: the first server
        (("127.0.0.1", 8080), "other", "other"),
        (("127.0.0.1", 9090), "unknown.test", "other"),  # default_server
        (("127.0.0.1", 9090), "ninety", "ninety"),
        (("127.0.0.1", 9090), "example.com", "other"),  # names count only on their own address
        (("0.0.0.0", 8088), "anything", "any-address"),
        (("10.1.2.3", 8088), "anything", "any-address"),
    ],
)
def test_server_selection(confdir, key, host, answer):
    router = Router(confdir.http(SERVERS))
    assert router.server_for(key, host).ret == (200, answer)


def test_regex_server_name_with_pcre_named_group(confdir):
    http = confdir.http(r"server { server_name ~^(?<sub>\w+)\.example\.net$; return 200 named; }")
    assert Router(http).server_for(("0.0.0.0", 80), "shop.example.net").ret == (200, "named")


# -- regexes: compiled by the conf, matched by the Router -----------------------

REGEXES = r"""
    server {
        server_name ~^w\d+\.test$;
        location ~ \.php$ { return 200 php; }
        location / { location ~* ^/IMG/ { return 200 img; } }
    }
"""


def test_each_conf_regex_is_compiled_once(confdir, monkeypatch):
    compiled: list[str] = []
    real_compile = re.compile

    def counting_compile(pattern, flags=0):
        compiled.append(pattern)
        return real_compile(pattern, flags)

    monkeypatch.setattr(re, "compile", counting_compile)
    http = confdir.http(REGEXES)
    router = Router(http)
    server = router.server_for(("0.0.0.0", 80), "w7.test")
    assert [router.location_for(server, path).ret[1] for path in ("/a.php", "/img/x")] == ["php", "img"]
    for pattern in (r"^w\d+\.test$", r"\.php$", r"^/IMG/"):
        assert compiled.count(pattern) == 1, pattern


class Recording:
    """Stands in for a compiled pattern and notes what the Router asked it."""

    def __init__(self, regex: re.Pattern[str]):
        self.regex, self.searched = regex, []

    def search(self, text: str):
        self.searched.append(text)
        return self.regex.search(text)


def test_router_matches_with_the_patterns_in_the_model(confdir):
    http = confdir.http(REGEXES)
    server = http.servers[0]
    php, root = server.locations
    img = root.locations[0]
    name = Recording(server.name_regexes[r"~^w\d+\.test$"])
    server.name_regexes[r"~^w\d+\.test$"] = name
    php.regex, img.regex = Recording(php.regex), Recording(img.regex)
    router = Router(http)
    assert router.server_for(("0.0.0.0", 80), "w7.test") is server
    assert router.location_for(server, "/img/a.php") is img
    assert (name.searched, img.regex.searched, php.regex.searched) == (["w7.test"], ["/img/a.php"], [])


def test_a_regex_location_without_its_compiled_pattern_is_refused():
    """A Location built by hand must carry its regex: the Router does not compile."""
    server = Server(listens=[Listen("0.0.0.0", 80)], names=[""], settings=Settings(),
                    locations=[Location(modifier="~", pattern=r"\.php$", settings=Settings())])
    with pytest.raises(ValueError, match="was not compiled"):
        Router(Http(servers=[server], upstreams={}, log_formats={}))


# -- request targets ----------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"/", ("/", "")),
        (b"/a/b?x=1&y=%20", ("/a/b", "x=1&y=%20")),
        (b"/a%20b/%41", ("/a b/A", "")),
        (b"//a///b//", ("/a/b/", "")),
        (b"/a/./b/.", ("/a/b/", "")),
        (b"/a/b/../c", ("/a/c", "")),
        (b"/a/b/..", ("/a/", "")),
        (b"/a/..", ("/", "")),
        (b"/a/%2e%2e/b", ("/b", "")),
        (b"/a%2fb", ("/a/b", "")),
        (b"/caf%C3%A9", ("/caf\u00e9", "")),
        (b"/..", None),
        (b"/a/../..", None),
        (b"/a/../../etc/passwd", None),
        (b"/%2e%2e/x", None),
        (b"/%zz", None),
        (b"/a%", None),
        (b"/a%00b", None),
        (b"*", None),
        (b"relative", None),
        (b"http://example.com/a/../b?q", ("/b", "q")),
        (b"HTTP://example.com", ("/", "")),
        (b"http://example.com?q=1", ("/", "q=1")),
    ],
)
def test_normalize_path(raw, expected):
    assert normalize_path(raw) == expected


def test_normalize_path_keeps_non_utf8_bytes():
    path, _ = normalize_path(b"/%FF")
    assert path.encode("utf-8", "surrogateescape") == b"/\xff"


def location(modifier: str, pattern: str) -> Location:
    return Location(modifier=modifier, pattern=pattern, settings=Settings())


@pytest.mark.parametrize(
    "loc, uri, path, raw, expected",
    [
        (location("", "/old/"), "/new/", "/old/x", "/old/x", "/new/x"),
        (location("", "/old/"), "/new/", "/old/x", "/old/x?a=1&b", "/new/x?a=1&b"),
        (location("", "/old/"), "/", "/old/a b", "/old/a%20b", "/a%20b"),  # rest escaped again
        (location("", "/old/"), "/new/", "/old/a/b", "/old//a/./b", "/new/a/b"),  # normalised path used
        (location("", "/old"), "/new", "/old/x", "/old/x?", "/new/x"),
        (location("=", "/exact"), "/other", "/exact", "/exact?q", "/other?q"),
        (location("^~", "/s/"), "/t/", "/s/caf\u00e9", "/s/caf%C3%A9", "/t/caf%C3%A9"),
        (location("", "/old/"), None, "/old/a/b", "/old//a/./b?q", "/old//a/./b?q"),  # no URI: unchanged
        (location("~", r"\.php$"), "/x/", "/a.php", "/a.php?q", "/a.php?q"),  # regex: unchanged
        (location("~*", r"^/A"), None, "/a", "/a", "/a"),
    ],
)
def test_proxy_uri(loc, uri, path, raw, expected):
    proxy_pass = ProxyPass(url="http://up" + (uri or ""), upstream="up", uri=uri)
    assert proxy_uri(loc, proxy_pass, path, raw) == expected


def test_proxy_uri_from_a_loaded_conf(confdir):
    http = confdir.http("server { location /old/ { proxy_pass http://127.0.0.1:9000/new/; } }")
    server = http.servers[0]
    loc = Router(http).location_for(server, "/old/x")
    assert proxy_uri(loc, loc.proxy_pass, "/old/x", "/old/x?k=v") == "/new/x?k=v"
