"""Which server and which location answer a request: nginx's rules, compiled once per conf.

The Router is built from the parsed Http when a generation starts and is
read-only afterwards.  Per request it does dictionary look-ups, a scan of
prefixes pre-sorted longest first, and regexes; nothing here does I/O or
allocates much beyond the strings it returns.

Regexes are matched with the patterns the conf parser compiled and keeps in the
model (Location.regex, Server.name_regexes); this module compiles none, so a
regex is checked and compiled in one place, with its file:line at hand.
"""

from __future__ import annotations

import re

from forkgw.conf.model import Http, Location, ProxyPass, Server

# -- request targets --------------------------------------------------------

_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_ESCAPE = [b"%%%02X" % i if i <= 0x20 or i >= 0x7F or chr(i) in "#%?" else bytes([i]) for i in range(256)]


def normalize_path(raw_target: bytes) -> tuple[str, str] | None:
    """(path, query) of a request target: path percent-decoded, `//` merged, `.`/`..` resolved.

    None when the target is unusable (a `..` above the root, a bad `%` escape, a
    NUL byte, neither origin- nor absolute-form): the worker answers 400.  Path
    and query are UTF-8 text; bytes that are not UTF-8 survive as surrogates.
    """
    target = raw_target
    if not target.startswith(b"/"):
        scheme_end = target.find(b"://")
        if scheme_end < 0 or target[:scheme_end].lower() not in (b"http", b"https"):
            return None
        rest = target[scheme_end + 3 :]
        cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        target = rest[cut:] if rest[cut:].startswith(b"/") else b"/" + rest[cut:]
    raw_path, _, query = target.partition(b"?")
    if b"%" in raw_path:
        if raw_path.count(b"%") != len(_PERCENT.findall(raw_path)):
            return None
        raw_path = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), raw_path)
    if b"\0" in raw_path:
        return None
    if b"//" in raw_path or b"/." in raw_path:
        segments = raw_path.split(b"/")
        kept: list[bytes] = []
        for segment in segments[1:]:
            if segment == b"" or segment == b".":
                continue
            if segment == b"..":
                if not kept:
                    return None
                kept.pop()
            else:
                kept.append(segment)
        trailing = segments[-1] in (b"", b".", b"..") and kept
        raw_path = b"/" + b"/".join(kept) + (b"/" if trailing else b"")
    return raw_path.decode("utf-8", "surrogateescape"), query.decode("utf-8", "surrogateescape")


def _escape_uri(path: str) -> str:
    """Percent-escape what cannot appear raw in a request path (nginx's NGX_ESCAPE_URI set)."""
    data = path.encode("utf-8", "surrogateescape")
    return b"".join(_ESCAPE[b] for b in data).decode("ascii")


def proxy_uri(location: Location | None, proxy_pass: ProxyPass, path: str, raw_path_and_query: str) -> str:
    """The request target sent upstream, by nginx's rule.

    Without a URI in proxy_pass (or in a regex location) the client's raw target
    is passed unchanged.  With one, the part of the normalised path matched by
    the location prefix is replaced by that URI, the rest is escaped again, and
    the query is kept.
    """
    if proxy_pass.uri is None or location is None or location.modifier in ("~", "~*"):
        return raw_path_and_query
    if not path.startswith(location.pattern):
        return raw_path_and_query
    _, _, query = raw_path_and_query.partition("?")
    uri = proxy_pass.uri + _escape_uri(path[len(location.pattern) :])
    return f"{uri}?{query}" if query else uri


# -- locations --------------------------------------------------------------

_DECLINED, _PREFIX, _FINAL = 0, 1, 2  # nginx's NGX_DECLINED, NGX_AGAIN, NGX_OK


class _Level:
    """The locations declared side by side in one block, ready for matching."""

    __slots__ = ("location", "noregex", "exact", "prefixes", "regexes")

    def __init__(self, location: Location | None, children: list[Location]):
        self.location = location
        self.noregex = location is not None and location.modifier == "^~"
        self.exact: dict[str, Location] = {}
        prefixes: list[tuple[str, _Level]] = []
        self.regexes: list[tuple[re.Pattern[str], _Level]] = []
        for child in children:
            if child.modifier == "=":
                self.exact.setdefault(child.pattern, child)
            elif child.modifier in ("", "^~"):
                prefixes.append((child.pattern, _Level(child, child.locations)))
            elif child.regex is not None:
                self.regexes.append((child.regex, _Level(child, child.locations)))
            else:
                raise ValueError(f'regex location "{child.pattern}" was not compiled by the conf parser')
        prefixes.sort(key=lambda item: len(item[0]), reverse=True)  # stable: conf order among equals
        self.prefixes = prefixes

    def find(self, path: str) -> tuple[int, Location | None]:
        """nginx's ngx_http_core_find_location over this level and the levels nested in it."""
        exact = self.exact.get(path)
        if exact is not None:
            return _FINAL, exact
        result, found, noregex = _DECLINED, None, False
        for pattern, level in self.prefixes:
            if path.startswith(pattern):
                result, found, noregex = _PREFIX, level.location, level.noregex
                inner_result, inner = level.find(path)
                if inner_result == _FINAL:
                    return _FINAL, inner
                if inner_result == _PREFIX:
                    found = inner
                break
        if not noregex:
            for regex, level in self.regexes:
                if regex.search(path):
                    inner_result, inner = level.find(path)
                    return _FINAL, inner if inner_result != _DECLINED else level.location
        return result, found


# -- servers ----------------------------------------------------------------


class _Names:
    """The servers sharing one listening address, indexed by name."""

    def __init__(self, servers: list[Server], default: Server):
        self.default = default
        self.exact: dict[str, Server] = {}
        self.leading: dict[str, Server] = {}  # "*.example.com" -> key "example.com"
        self.trailing: dict[str, Server] = {}  # "www.example.*" -> key "www.example"
        self.regexes: list[tuple[re.Pattern[str], Server]] = []
        for server in servers:
            for name in server.names:
                if name.startswith("~"):
                    self.regexes.append((server.name_regexes[name], server))
                elif name.startswith("*."):
                    self.leading.setdefault(name[2:], server)
                elif name.endswith(".*"):
                    self.trailing.setdefault(name[:-2], server)
                else:
                    self.exact.setdefault(name, server)

    def find(self, host: str) -> Server:
        server = self.exact.get(host)
        if server is not None:
            return server
        if self.leading:
            dot = host.find(".")
            while dot >= 0:
                server = self.leading.get(host[dot + 1 :])
                if server is not None:
                    return server
                dot = host.find(".", dot + 1)
        if self.trailing:
            dot = host.rfind(".")
            while dot > 0:
                server = self.trailing.get(host[:dot])
                if server is not None:
                    return server
                dot = host.rfind(".", 0, dot)
        for regex, server in self.regexes:
            if regex.search(host):
                return server
        return self.default


def _bare_host(host: str | None) -> str:
    """Host header -> the name compared with server_name: lowercase, no port, no trailing dot."""
    if not host:
        return ""
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        host = host[: end + 1] if end > 0 else host
    else:
        host = host.partition(":")[0]
    return host.rstrip(".")


class Router:
    """Server and location selection for one parsed Http, built once."""

    def __init__(self, http: Http):
        by_address: dict[tuple[str, int], list[Server]] = {}
        defaults: dict[tuple[str, int], Server] = {}
        for server in http.servers:
            for listen in server.listens:
                servers = by_address.setdefault(listen.key, [])
                if not any(known is server for known in servers):
                    servers.append(server)
                if listen.default_server:
                    defaults.setdefault(listen.key, server)
        self._names = {key: _Names(servers, defaults.get(key, servers[0])) for key, servers in by_address.items()}
        self._levels = {id(server): (server, _Level(None, server.locations)) for server in http.servers}

    def server_for(self, listen_key: tuple[str, int], host: str | None) -> Server:
        """The server for a request on the listener `listen_key` with this Host header."""
        names = self._names.get(listen_key) or self._names[("0.0.0.0", listen_key[1])]
        return names.find(_bare_host(host))

    def location_for(self, server: Server, path: str) -> Location | None:
        """The location of `server` answering `path` (normalised, no query); None: server level."""
        return self._levels[id(server)][1].find(path)[1]
