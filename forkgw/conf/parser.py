"""Conf files -> Config: walk statements through the directive table, then build the model.

Two stages, because nginx lets a directive refer to things declared later in
the file (an upstream below the server using it, http-level settings after the
server blocks):

1. Reading.  Statements are checked against the directive table (known name,
   allowed context, block or not, argument count, duplicates), their arguments
   are parsed into values, and `include` is expanded in place.  The result is a
   tree of Blocks: per block, each model field's values with their "file:line".
2. Building.  The Blocks become the model: defaults from the table fill what the
   conf leaves unset, references are resolved (upstreams, log formats, wasm
   modules), and inheritance is settled so every Location carries its
   effective Settings.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

from forkgw.conf import directives as table
from forkgw.conf.directives import INCLUDE, SET, Directive
from forkgw.conf.lexer import WORD, Source, Statement, parse_statements, tokenize
from forkgw.conf.model import (
    Config, FilterRef, Http, Listen, Location, ProxyPass, Server, Settings, Upstream,
    UpstreamServer, Wasm, WasmModule,
)  # fmt: skip
from forkgw.conf.values import (
    Ctx, FilterSpec, did_you_mean, is_ip, open_failed, port_number, resolves, split_host_port,
)  # fmt: skip
from forkgw.errors import ConfError

_SETTINGS_FIELDS = frozenset(f.name for f in dataclasses.fields(Settings))
_SETTINGS_STORE = {d.target: d.store for d in table.DIRECTIVES if d.target in _SETTINGS_FIELDS}
_GLOB_MAGIC = frozenset("*?[")
_LISTEN = next(d for d in table.DIRECTIVES if d.name == "listen")
_SERVER_NAME = next(d for d in table.DIRECTIVES if d.name == "server_name")
_LOG_FORMAT = next(d for d in table.DIRECTIVES if d.name == "log_format")


def default_prefix(conf_path: str) -> str:
    """Like nginx's layout: a conf in PREFIX/conf/ has prefix PREFIX; elsewhere, its own folder."""
    folder = os.path.dirname(os.path.abspath(conf_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "conf" else folder


def load(path: str, prefix: str | None = None, extra: str | None = None) -> Config:
    """Read, check and build the configuration.

    `prefix` is the folder relative paths in the conf (pid, logs, wasm modules,
    file=) resolve against; without it, see default_prefix.  As in nginx, a
    relative `path` is relative to an explicit prefix, else to the current
    folder; `include` masks are relative to the folder of the main conf file.
    `extra` holds `-g` directives, read as if appended to the main context.
    Raises ConfError naming "file:line" (files by absolute path).
    """
    if prefix is not None:
        prefix = os.path.abspath(prefix)
        conf_path = os.path.normpath(os.path.join(prefix, path))
    else:
        conf_path = os.path.abspath(path)
        prefix = default_prefix(conf_path)
    reader = _Reader(conf_dir=os.path.dirname(conf_path), prefix=prefix)
    main = Block(None, conf_path)
    reader.walk(reader.read(conf_path, where=""), table.MAIN, main)
    if extra:
        reader.walk(parse_statements(extra, Source("command line", numbered=False)), table.MAIN, main)
    return _Builder(prefix).config(main, conf_path, reader.files)


# -- stage 1: reading -------------------------------------------------------


class Block:
    """One block as read: for each model field, its values with their "file:line", in conf order."""

    def __init__(self, value: Any, where: str):
        self.value = value  # the parsed arguments of the block directive itself
        self.where = where
        self.entries: dict[str, list[tuple[Any, str]]] = {}

    def has(self, target: str) -> bool:
        return target in self.entries

    def first(self, target: str, default: Any = None) -> Any:
        entries = self.entries.get(target)
        return entries[0][0] if entries else default

    def items(self, target: str) -> list[tuple[Any, str]]:
        return self.entries.get(target, [])


class _Reader:
    def __init__(self, conf_dir: str, prefix: str):
        self.conf_dir = conf_dir
        self.prefix = prefix
        self.files: list[str] = []
        self.open_files: list[str] = []
        self.index = table.by_name()

    def read(self, path: str, where: str) -> list[Statement]:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", "surrogateescape")
        except OSError as err:
            raise ConfError(open_failed(path, err), where) from None
        if path not in self.files:
            self.files.append(path)
        return parse_statements(text, Source(path))

    def walk(self, statements: list[Statement] | tuple[Statement, ...], context: str, block: Block) -> None:
        for stmt in statements:
            directive = self.directive_for(stmt, context)
            if directive.store == INCLUDE:
                self.include(stmt, context, block)
                continue
            if directive.store == SET and block.has(directive.target):
                raise ConfError(f'"{stmt.name}" directive is duplicate', stmt.where)
            value = directive.parse(list(stmt.args), Ctx(directive.name, stmt.where, self.prefix))
            if directive.block:
                child = Block(value, stmt.where)
                self.walk(stmt.block, directive.block, child)
                value = child
            block.entries.setdefault(directive.target, []).append((value, stmt.where))

    def directive_for(self, stmt: Statement, context: str) -> Directive:
        candidates = self.index.get(stmt.name)
        if not candidates:
            here = [d.name for d in table.DIRECTIVES if context in d.contexts]
            hint = did_you_mean(stmt.name, here) or did_you_mean(stmt.name, self.index)
            raise ConfError(f'unknown directive "{stmt.name}"{hint}', stmt.where)
        directive = next((d for d in candidates if context in d.contexts), None)
        if directive is None:
            raise ConfError(f'"{stmt.name}" directive is not allowed here', stmt.where)
        if directive.block and stmt.block is None:
            raise ConfError(f'directive "{stmt.name}" has no opening "{{"', stmt.where)
        if not directive.block and stmt.block is not None:
            raise ConfError(f'directive "{stmt.name}" is not terminated by ";"', stmt.where)
        if not directive.takes(len(stmt.args)):
            raise ConfError(f'invalid number of arguments in "{stmt.name}" directive', stmt.where)
        return directive

    def include(self, stmt: Statement, context: str, block: Block) -> None:
        """nginx's include: sorted glob matches (none is fine), or one file that must exist."""
        pattern = os.path.join(self.conf_dir, stmt.args[0])
        if _GLOB_MAGIC & set(stmt.args[0]):
            paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        else:
            paths = [pattern]
        for path in paths:
            path = os.path.normpath(path)
            if path in self.open_files:
                raise ConfError(f'include of "{path}" is recursive', stmt.where)
            statements = self.read(path, stmt.where)
            self.open_files.append(path)
            try:
                self.walk(statements, context, block)
            finally:
                self.open_files.pop()


# -- stage 2: building ------------------------------------------------------


def _addr_text(key: tuple[str, int]) -> str:
    addr, port = key
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


class _Builder:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.wasm = Wasm()
        self.log_formats: dict[str, str] = {}
        self.upstreams: dict[str, Upstream] = {}

    def default(self, directive: Directive) -> Any:
        """The value of a directive's documented default, parsed like conf text."""
        args = [t.text for t in tokenize(directive.default, Source("default")) if t.kind == WORD]
        return directive.parse(args, Ctx(directive.name, "default", self.prefix))

    def fill(self, obj: Any, block: Block, context: str) -> None:
        """Set obj's scalar fields from the block's directives of `context`, or their defaults."""
        for directive in table.DIRECTIVES:
            if directive.store != SET or directive.block or context not in directive.contexts:
                continue
            if not hasattr(obj, directive.target):
                continue
            if block.has(directive.target):
                setattr(obj, directive.target, block.first(directive.target))
            elif directive.default is not None:
                setattr(obj, directive.target, self.default(directive))

    def config(self, main: Block, path: str, files: list[str]) -> Config:
        config = Config(path=path, prefix=self.prefix, files=files)
        self.fill(config, main, table.MAIN)
        config.user, config.group = config.user if config.user else (None, None)
        self.fill(config, main.first("events") or Block(None, ""), table.EVENTS)
        config.wasm = self.wasm
        wasm = main.first("wasm")
        if wasm is not None:
            self.build_wasm(wasm)
        http = main.first("http")
        if http is not None:
            config.http = self.build_http(http)
        return config

    def build_wasm(self, block: Block) -> None:
        self.fill(self.wasm, block, table.WASM)
        for module, where in block.items("modules"):
            if module.name in self.wasm.modules:
                raise ConfError(f'duplicate wasm module "{module.name}"', where)
            self.wasm.modules[module.name] = module

    def build_http(self, block: Block) -> Http:
        name, text = self.default(_LOG_FORMAT)
        self.log_formats[name] = text
        for (name, text), where in block.items("log_formats"):
            if name in self.log_formats:
                raise ConfError(f'duplicate "log_format" name "{name}"', where)
            self.log_formats[name] = text
        for upstream_block, _ in block.items("upstreams"):
            self.build_upstream(upstream_block)
        http = Http(servers=[], upstreams=self.upstreams, log_formats=self.log_formats)
        self.fill(http, block, table.HTTP)
        settings = http.settings = self.settings(self.base_settings(), block)
        http.servers = [self.build_server(server_block, settings) for server_block, _ in block.items("servers")]
        self.check_listens(http.servers)
        return http

    def build_upstream(self, block: Block) -> None:
        name = block.value
        if name in self.upstreams:
            raise ConfError(f'duplicate upstream "{name}"', block.where)
        servers = [server for server, _ in block.items("servers")]
        if not servers:
            raise ConfError("no servers are inside upstream", block.where)
        upstream = Upstream(name=name, servers=servers, where=block.where)
        self.fill(upstream, block, table.UPSTREAM)
        self.upstreams[name] = upstream

    # settings and their inheritance

    def base_settings(self) -> Settings:
        """http-level Settings before the conf says anything: the table's defaults."""
        settings = Settings()
        for directive in table.DIRECTIVES:
            if directive.target in _SETTINGS_FIELDS and directive.default is not None:
                value = self.default(directive)
                setattr(settings, directive.target, value)
        return settings

    def settings(self, inherited: Settings, block: Block) -> Settings:
        """nginx's merge: what this level sets replaces what it inherits, a list as a whole."""
        declared: dict[str, Any] = {}
        for target in _SETTINGS_FIELDS & block.entries.keys():
            entries = block.items(target)
            if target == "access_log":
                off = any(not logs for logs, _ in entries)  # `access_log off` wins at its level, as in nginx
                declared[target] = [] if off else [self.access_log(log, w) for logs, w in entries for log in logs]
            elif target == "filters":
                declared[target] = [self.filter(spec, where) for spec, where in entries]
            elif _SETTINGS_STORE[target] == SET:
                declared[target] = entries[0][0]
            else:
                declared[target] = [value for value, _ in entries]
        return dataclasses.replace(inherited, **declared) if declared else inherited

    def access_log(self, log: tuple[str, str], where: str) -> tuple[str, str]:
        if log[1] not in self.log_formats:
            raise ConfError(f'unknown log format "{log[1]}"', where)
        return log

    def filter(self, spec: FilterSpec, where: str) -> FilterRef:
        module: WasmModule | None = self.wasm.modules.get(spec.module)
        if module is None:
            hint = did_you_mean(spec.module, self.wasm.modules)
            raise ConfError(f'unknown wasm module "{spec.module}"{hint}', where)
        config = module.default_config if spec.config is None else spec.config
        return FilterRef(module=spec.module, config=config, root_id=spec.root_id, on_error=spec.on_error,
                         where=where)

    # servers and locations

    def build_server(self, block: Block, inherited: Settings) -> Server:
        settings = self.settings(inherited, block)
        listens: list[Listen] = []
        for listen, where in block.items("listens"):
            if any(known.key == listen.key for known in listens):
                raise ConfError(f"a duplicate listen {_addr_text(listen.key)}", where)
            listens.append(listen)
        if not listens:
            listens = [dataclasses.replace(self.default(_LISTEN), where=block.where)]
        named = [pair for pairs, _ in block.items("names") for pair in pairs] or self.default(_SERVER_NAME)
        return Server(
            listens=listens,
            names=[name for name, _ in named],
            name_regexes={name: regex for name, regex in named if regex is not None},
            locations=self.build_locations(block, settings, None),
            settings=settings,
            ret=block.first("ret"),
            where=block.where,
        )

    def build_locations(self, block: Block, inherited: Settings, parent: Location | None) -> list[Location]:
        locations: list[Location] = []
        seen: set[tuple[bool, str]] = set()
        for child, where in block.items("locations"):
            modifier, pattern, compiled = child.value
            regex = modifier in ("~", "~*")
            if parent is not None:
                self.check_nesting(modifier, pattern, parent, where)
            if not regex:
                kind = (modifier == "=", pattern)
                if kind in seen:
                    raise ConfError(f'duplicate location "{pattern}"', where)
                seen.add(kind)
            settings = self.settings(inherited, child)
            proxy_pass = child.first("proxy_pass")
            if proxy_pass is not None:
                self.check_proxy_pass(proxy_pass, regex, child.entries["proxy_pass"][0][1])
            location = Location(modifier=modifier, pattern=pattern, settings=settings, ret=child.first("ret"),
                                proxy_pass=proxy_pass, metrics=child.has("metrics"), where=where, regex=compiled)
            location.locations = self.build_locations(child, settings, location)
            locations.append(location)
        return locations

    @staticmethod
    def check_nesting(modifier: str, pattern: str, parent: Location, where: str) -> None:
        """nginx's rules for a location inside another."""
        if parent.modifier == "=":
            raise ConfError(f'location "{pattern}" cannot be inside the exact location "{parent.pattern}"', where)
        if modifier not in ("~", "~*") and not pattern.startswith(parent.pattern):
            raise ConfError(f'location "{pattern}" is outside location "{parent.pattern}"', where)

    def check_proxy_pass(self, proxy_pass: ProxyPass, regex: bool, where: str) -> None:
        if regex and proxy_pass.uri is not None:
            raise ConfError('"proxy_pass" cannot have URI part in location given by regular expression', where)
        self.upstream_for(proxy_pass.upstream, where, 443 if proxy_pass.scheme == "https" else 80)

    def upstream_for(self, target: str, where: str, default_port: int = 80) -> Upstream:
        """An upstream{} named `target`, else an implicit one for a resolvable host:port."""
        upstream = self.upstreams.get(target)
        if upstream is not None:
            return upstream
        host, port_text = split_host_port(target)
        if port_text is None and not is_ip(host):
            hint = did_you_mean(target, self.upstreams)
            if not hint and resolves(host, default_port):
                hint = f' (no upstream block of that name; for the host, write "{target}:{default_port}")'
            raise ConfError(f'host not found in upstream "{target}"{hint}', where)
        port = default_port if port_text is None else port_number(port_text)
        if port is None:
            raise ConfError(f'invalid port in upstream "{target}"', where)
        if not resolves(host, port):
            raise ConfError(f'host not found in upstream "{target}"', where)
        upstream = Upstream(name=target, servers=[UpstreamServer(host=host, port=port)], where=where)
        self.upstreams[target] = upstream
        return upstream

    @staticmethod
    def check_listens(servers: list[Server]) -> None:
        """One default server and one set of socket options (TLS included) per address, shared by every Listen of it."""
        defaults: set[tuple[str, int]] = set()
        options: dict[tuple[str, int], Listen] = {}
        for server in servers:
            for listen in server.listens:
                if listen.default_server:
                    if listen.key in defaults:
                        raise ConfError(f"a duplicate default server for {_addr_text(listen.key)}", listen.where)
                    defaults.add(listen.key)
                if listen.reuseport or listen.backlog != Listen.backlog:
                    if listen.key in options:
                        raise ConfError(f"duplicate listen options for {_addr_text(listen.key)}", listen.where)
                    options[listen.key] = listen
        for server in servers:
            for listen in server.listens:
                chosen = options.get(listen.key)
                if chosen is not None:
                    listen.reuseport, listen.backlog = chosen.reuseport, chosen.backlog
        tls = {listen.key for server in servers for listen in server.listens if listen.ssl}
        for server in servers:  # as in nginx, one `ssl` makes the address TLS for every server on it
            for listen in server.listens:
                listen.ssl = listen.key in tls
