"""Value parsers: one directive's words -> the Python value the model holds.

Each parser takes the directive's arguments and a Ctx, returns a value or
raises ConfError through the Ctx, worded as nginx words it.  Parsers only look
at their own arguments (and files those arguments name); references between
directives (upstream names, log formats, wasm modules) are checked by the
parser once the whole conf has been read.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import select
import socket
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from forkgw.conf.model import AddHeader, Listen, ProxyPass, UpstreamServer, WasmModule
from forkgw.conf.pcre import compile_pcre
from forkgw.errors import ConfError


class Ctx:
    """What a value parser may know: which directive, where it is, where paths resolve."""

    def __init__(self, name: str, where: str, prefix: str):
        self.name = name
        self.where = where
        self.prefix = prefix

    def fail(self, message: str) -> NoReturn:
        raise ConfError(message, self.where)

    def invalid(self, value: str, hint: str = "") -> NoReturn:
        self.fail(f'invalid value "{value}" in "{self.name}" directive' + (f", {hint}" if hint else ""))

    def path(self, path: str) -> str:
        """An absolute path; relative ones resolve against the prefix."""
        if not path:
            self.invalid(path)
        return os.path.normpath(os.path.join(self.prefix, path))


def did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return f' (did you mean "{close[0]}"?)' if close else ""


def open_failed(path: str, err: OSError) -> str:
    return f'open() "{path}" failed ({err.errno}: {err.strerror})'


# -- units ------------------------------------------------------------------

_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "M": 2592000, "y": 31536000}
_TIME_PART = re.compile(r"([0-9]+)(ms|[smhdwMy])?")
_SIZE = re.compile(r"([0-9]+)([kKmMgG]?)")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_time(text: str) -> float | None:
    """nginx time: `500ms`, `10s`, `5m`, `1h30m`, `1m30`; a bare number is seconds.

    Units go from larger to smaller, as in nginx (`1s1m` is invalid).
    """
    total, pos, last_scale = 0.0, 0, float("inf")
    if not text:
        return None
    while pos < len(text):
        match = _TIME_PART.match(text, pos)
        if not match:
            return None
        scale = _TIME_UNITS[match.group(2) or "s"]
        if scale >= last_scale:
            return None
        total += int(match.group(1)) * scale
        last_scale, pos = scale, match.end()
    return total


def parse_size(text: str) -> int | None:
    """nginx size: `1024`, `8k`, `1m`, `1g`; a bare number is bytes."""
    match = _SIZE.fullmatch(text)
    if not match:
        return None
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def time_value(args: list[str], ctx: Ctx) -> float:
    value = parse_time(args[0])
    if value is None:
        ctx.invalid(args[0])
    return value


def size_value(args: list[str], ctx: Ctx) -> int:
    value = parse_size(args[0])
    if value is None:
        ctx.invalid(args[0])
    return value


def is_number(text: str) -> bool:
    """ASCII digits only (str.isdigit also accepts digits int() cannot read, like "²")."""
    return text.isascii() and text.isdigit()


def number(text: str, ctx: Ctx, minimum: int = 0) -> int:
    if not is_number(text) or int(text) < minimum:
        ctx.invalid(text)
    return int(text)


def positive_value(args: list[str], ctx: Ctx) -> int:
    return number(args[0], ctx, minimum=1)


def string_value(args: list[str], ctx: Ctx) -> str:
    return args[0]


def count_value(args: list[str], ctx: Ctx) -> int:
    return number(args[0], ctx)


def flag_value(args: list[str], ctx: Ctx) -> bool:
    if args[0] not in ("on", "off"):
        ctx.invalid(args[0], 'it must be "on" or "off"')
    return args[0] == "on"


def flag_on(args: list[str], ctx: Ctx) -> bool:
    """A directive whose presence is the setting."""
    return True


def shm_kv_value(args: list[str], ctx: Ctx) -> tuple[int, str]:
    size = size_value(args[:1], ctx)
    eviction = "lru"
    for arg in args[1:]:
        value = _key_value(arg, "eviction")
        if value not in ("lru", "none"):
            ctx.invalid(arg, 'it must be "eviction=lru" or "eviction=none"')
        eviction = value
    if size < 64 * 1024:
        ctx.invalid(args[0], "the size must be at least 64k")
    return size, eviction


def word_value(args: list[str], ctx: Ctx) -> str:
    return args[0]


def path_value(args: list[str], ctx: Ctx) -> str:
    return ctx.path(args[0])


def choice(*allowed: str):
    """A parser accepting one of `allowed` words."""
    hint = "it must be " + " or ".join(f'"{a}"' for a in allowed)

    def parse(args: list[str], ctx: Ctx) -> str:
        if args[0] not in allowed:
            ctx.invalid(args[0], hint)
        return args[0]

    return parse


# -- main and events --------------------------------------------------------


def worker_processes_value(args: list[str], ctx: Ctx) -> int:
    if args[0] == "auto":
        return os.cpu_count() or 1
    return number(args[0], ctx, minimum=1)


def cpu_affinity_value(args: list[str], ctx: Ctx) -> str:
    masks = args[1:] if args[0] == "auto" else args
    if any(not mask for mask in masks):
        ctx.invalid("")
    for mask in masks:
        for ch in mask:
            if ch not in "01":
                ctx.fail(f'"{ctx.name}": invalid character "{ch}" in "{mask}"')
    return " ".join(args)


ERROR_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")


def error_log_value(args: list[str], ctx: Ctx) -> tuple[str, str]:
    target = args[0] if args[0] == "stderr" else ctx.path(args[0])
    level = args[1] if len(args) > 1 else "error"
    if level not in ERROR_LEVELS:
        ctx.fail(f'invalid log level "{level}"')
    return (target, level)


def user_value(args: list[str], ctx: Ctx) -> tuple[str, str | None]:
    for arg in args:
        if not arg:
            ctx.invalid(arg)
    return (args[0], args[1] if len(args) > 1 else None)


EVENT_METHODS = ("epoll", "poll", "select", "kqueue")


def event_method_value(args: list[str], ctx: Ctx) -> str:
    if args[0] not in EVENT_METHODS or not hasattr(select, args[0]):
        ctx.fail(f'invalid event type "{args[0]}"')
    return args[0]


# -- wasm -------------------------------------------------------------------


def _read_yaml(path: str, ctx: Ctx) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as err:
        ctx.fail(open_failed(path, err))
    except yaml.YAMLError as err:
        ctx.fail(f'invalid YAML in "{path}": {" ".join(str(err).split())}')


def _as_config_text(value: Any) -> str:
    """A filter's configuration as the filter receives it: strings as is, the rest as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _key_value(arg: str, key: str) -> str | None:
    return arg[len(key) + 1 :] if arg.startswith(key + "=") else None


def wasm_module_value(args: list[str], ctx: Ctx) -> WasmModule:
    """`module NAME PATH [VM_CONFIG] [root_id=ID]`; PATH is a .wasm file or a plugin folder."""
    name, path = args[0], ctx.path(args[1])
    vm_config, root_id = None, None
    for arg in args[2:]:
        value = _key_value(arg, "root_id")
        if value is not None:
            if root_id is not None or not value:
                ctx.fail(f'invalid parameter "{arg}"')
            root_id = value
        elif vm_config is None:
            vm_config = arg
        else:
            ctx.fail(f'invalid number of arguments in "{ctx.name}" directive')
    module = WasmModule(name=name, path=path, vm_config=vm_config or "", root_id=root_id, where=ctx.where)
    if os.path.isdir(path):
        _read_plugin_folder(module, ctx)
    elif not os.path.isfile(path):
        ctx.fail(open_failed(path, FileNotFoundError(2, os.strerror(2))))
    return module


def _read_plugin_folder(module: WasmModule, ctx: Ctx) -> None:
    """Fill `module` from FOLDER/plugin.yaml: keys wasm, root_id, config, description."""
    folder = module.path
    yaml_path = os.path.join(folder, "plugin.yaml")
    meta = _read_yaml(yaml_path, ctx)
    if not isinstance(meta, dict):
        ctx.fail(f'invalid plugin file "{yaml_path}": expected a mapping of keys')
    wasm = meta.get("wasm")
    if not isinstance(wasm, str) or not wasm:
        ctx.fail(f'invalid plugin file "{yaml_path}": "wasm" must name the module file')
    module.path = os.path.normpath(os.path.join(folder, wasm))
    if not os.path.isfile(module.path):
        ctx.fail(open_failed(module.path, FileNotFoundError(2, os.strerror(2))) + f' (from "{yaml_path}")')
    root_id = meta.get("root_id")
    if root_id is not None and not isinstance(root_id, str):
        ctx.fail(f'invalid plugin file "{yaml_path}": "root_id" must be a string')
    if module.root_id is None:
        module.root_id = root_id
    module.default_config = _as_config_text(meta.get("config"))
    module.description = str(meta.get("description") or "")


@dataclass(frozen=True)
class FilterSpec:
    """A parsed `proxy_wasm` line; becomes a FilterRef once wasm modules are known."""

    module: str
    config: str | None  # None: the module's default config
    root_id: str | None
    on_error: str


def proxy_wasm_value(args: list[str], ctx: Ctx) -> FilterSpec:
    """`proxy_wasm NAME [CONFIG] [root_id=ID] [on_error=fail|continue] [file=PATH]`."""
    config, root_id, on_error, file = None, None, "fail", None
    for arg in args[1:]:
        if (value := _key_value(arg, "root_id")) is not None:
            root_id = value
        elif (value := _key_value(arg, "on_error")) is not None:
            if value not in ("fail", "continue"):
                ctx.invalid(arg, 'it must be "on_error=fail" or "on_error=continue"')
            on_error = value
        elif (value := _key_value(arg, "file")) is not None:
            file = ctx.path(value)
        elif config is None:
            config = arg
        else:
            ctx.fail(f'invalid number of arguments in "{ctx.name}" directive')
    if file is not None:
        if config is not None:
            ctx.fail(f'"file=" and a configuration string cannot both be given in "{ctx.name}" directive')
        config = json.dumps(_read_yaml(file, ctx), separators=(",", ":"))
    return FilterSpec(module=args[0], config=config, root_id=root_id, on_error=on_error)


def wasm_vm_value(args: list[str], ctx: Ctx) -> str:
    if args[0] != "wasmtime":
        ctx.invalid(args[0], 'it must be "wasmtime"')
    return args[0]


# -- http -------------------------------------------------------------------


def access_log_value(args: list[str], ctx: Ctx) -> list[tuple[str, str]]:
    """`access_log PATH [FORMAT]` or `access_log off` (an empty list: logging off)."""
    if args[0] == "off":
        if len(args) > 1:
            ctx.fail(f'invalid parameter "{args[1]}"')
        return []
    return [(ctx.path(args[0]), args[1] if len(args) > 1 else "combined")]


def log_format_value(args: list[str], ctx: Ctx) -> tuple[str, str]:
    return (args[0], "".join(args[1:]))


def large_buffers_value(args: list[str], ctx: Ctx) -> tuple[int, int]:
    count = number(args[0], ctx, minimum=1)
    size = parse_size(args[1])
    if not size:
        ctx.invalid(args[1])
    return (count, size)


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_name(name: str, ctx: Ctx) -> str:
    if not _HEADER_NAME.fullmatch(name):
        ctx.fail(f'invalid header name "{name}"')
    return name


def header_pair_value(args: list[str], ctx: Ctx) -> tuple[str, str]:
    return (header_name(args[0], ctx), args[1])


def add_header_value(args: list[str], ctx: Ctx) -> AddHeader:
    header_name(args[0], ctx)
    if len(args) == 3 and args[2] != "always":
        ctx.fail(f'invalid parameter "{args[2]}"')
    return AddHeader(name=args[0], value=args[1], always=len(args) == 3)


NEXT_UPSTREAM = (
    "error", "timeout", "invalid_header", "http_500", "http_502", "http_503", "http_504",
    "http_403", "http_404", "http_429", "non_idempotent", "off",
)  # fmt: skip


def next_upstream_value(args: list[str], ctx: Ctx) -> tuple[str, ...]:
    """Conditions that send a request to the next server; `off` -> () (never)."""
    for arg in args:
        if arg not in NEXT_UPSTREAM:
            ctx.invalid(arg)
    if "off" in args:
        return ()
    return tuple(args)


def split_host_port(text: str) -> tuple[str, str | None] | None:
    """"host", "host:port", "[v6]", "[v6]:port" -> (host, port text or None)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        return text[1:end], (rest[1:] if rest else None)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    if ":" in text:
        return None
    return text, None


def port_number(text: str) -> int | None:
    return int(text) if is_number(text) and 1 <= int(text) <= 65535 else None


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolves(host: str, port: int) -> bool:
    try:
        return bool(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except (OSError, UnicodeError):
        return False


def listen_value(args: list[str], ctx: Ctx) -> Listen:
    """`listen [ADDR:]PORT | ADDR [default_server] [reuseport] [backlog=N]`."""
    text = args[0]
    if is_number(text):
        host, port_text = "*", text
    else:
        split = split_host_port(text)
        if split is None:
            ctx.fail(f'invalid host in "{text}" of the "listen" directive')
        host, port_text = split
        if not host:
            ctx.fail(f'invalid host in "{text}" of the "listen" directive')
    port = 80 if port_text is None else port_number(port_text)
    if port is None:
        ctx.fail(f'invalid port in "{text}" of the "listen" directive')
    if host in ("*", ""):
        addr = "0.0.0.0"
    elif is_ip(host):
        addr = str(ipaddress.ip_address(host))
    else:
        try:
            addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
        except (OSError, UnicodeError):
            ctx.fail(f'host not found in "{text}" of the "listen" directive')
    listen = Listen(addr=addr, port=port, where=ctx.where)
    for arg in args[1:]:
        if arg == "default_server" or arg == "default":
            listen.default_server = True
        elif arg == "reuseport":
            listen.reuseport = True
        elif arg == "ssl":
            listen.ssl = True
        elif (value := _key_value(arg, "backlog")) is not None:
            if not is_number(value.removeprefix("-")) or int(value) == 0:
                ctx.fail(f'invalid backlog "{value}"')
            listen.backlog = int(value)
        else:
            ctx.fail(f'invalid parameter "{arg}"')
    return listen


def compiled_regex(pattern: str, ctx: Ctx, ignore_case: bool = False) -> re.Pattern[str]:
    """A conf regex compiled for good: the model keeps it and the Router matches with it."""
    try:
        return compile_pcre(pattern, ignore_case)
    except re.error as err:
        ctx.fail(f'invalid regex "{pattern}" in "{ctx.name}" directive: {err}')


_NAME_CHARS = re.compile(r"[^/\s]*")


def server_name_value(args: list[str], ctx: Ctx) -> list[tuple[str, re.Pattern[str] | None]]:
    """(name, compiled regex or None) pairs; names lowercased but `~regex` ones.

    `.example.com` means `example.com` and `*.example.com`.
    """
    names: list[tuple[str, re.Pattern[str] | None]] = []
    for name in args:
        if name.startswith("~"):
            if name == "~":
                ctx.fail(f'server name "{name}" is invalid')
            names.append((name, compiled_regex(name[1:], ctx)))
            continue
        name = name.lower()
        if not _NAME_CHARS.fullmatch(name) or name == ".":
            ctx.fail(f'server name "{name}" is invalid')
        stars = name.count("*")
        if stars > 1 or (stars and not (name.startswith("*.") or name.endswith(".*"))):
            ctx.fail(f'invalid server name or wildcard "{name}"')
        if name.startswith(".") and len(name) > 1:
            names.extend([(name[1:], None), ("*" + name, None)])
        else:
            names.append((name, None))
    return names


LOCATION_MODIFIERS = ("=", "^~", "~*", "~")


def location_value(args: list[str], ctx: Ctx) -> tuple[str, str, re.Pattern[str] | None]:
    """`location [=|^~|~|~*] PATTERN` -> (modifier, pattern, the regex compiled or None)."""
    if len(args) == 2:
        modifier, pattern = args
        if modifier not in LOCATION_MODIFIERS:
            ctx.fail(f'invalid location modifier "{modifier}"')
    else:
        text = args[0]
        modifier = next((m for m in LOCATION_MODIFIERS if text.startswith(m) and len(text) > len(m)), "")
        pattern = text[len(modifier) :]
        if pattern.startswith("@"):
            ctx.fail(f'named location "{pattern}" is not supported')
    if not pattern:
        ctx.fail(f'invalid number of arguments in "{ctx.name}" directive')
    regex = compiled_regex(pattern, ctx, ignore_case=modifier == "~*") if modifier in ("~", "~*") else None
    return (modifier, pattern, regex)


_REDIRECT_PREFIXES = ("http://", "https://", "$scheme")


def return_value(args: list[str], ctx: Ctx) -> tuple[int, str | None]:
    """`return CODE [TEXT|URL]` or `return URL` (302)."""
    if not is_number(args[0]):
        if len(args) == 1 and args[0].startswith(_REDIRECT_PREFIXES):
            return (302, args[0])
        ctx.fail(f'invalid return code "{args[0]}"')
    code = int(args[0])
    if code > 999:
        ctx.fail(f'invalid return code "{args[0]}"')
    return (code, args[1] if len(args) > 1 else None)


def proxy_pass_value(args: list[str], ctx: Ctx) -> ProxyPass:
    """`proxy_pass http[s]://TARGET[/URI]`; TARGET is checked against upstreams later."""
    url = args[0]
    lower = url.lower()
    scheme = "https" if lower.startswith("https://") else "http"
    if not lower.startswith(scheme + "://"):
        ctx.fail(f'invalid URL prefix in "{url}"')
    if "$" in url:
        ctx.invalid(url, "variables are not supported in proxy_pass")
    rest = url[len(scheme) + 3 :]
    slash = rest.find("/")
    target, uri = (rest, None) if slash < 0 else (rest[:slash], rest[slash:])
    split = split_host_port(target)
    if not target or "@" in target or "?" in target or "#" in target or split is None or not split[0]:
        ctx.fail(f'invalid host in upstream "{url}"')
    return ProxyPass(url=url, upstream=target, uri=uri, scheme=scheme)


def upstream_name_value(args: list[str], ctx: Ctx) -> str:
    return args[0]


def upstream_server_value(args: list[str], ctx: Ctx) -> UpstreamServer:
    """`server HOST[:PORT] [weight=N] [max_fails=N] [fail_timeout=TIME] [backup]` in upstream{}."""
    text = args[0]
    split = split_host_port(text)
    if split is None or not split[0]:
        ctx.fail(f'invalid host in upstream "{text}"')
    host, port_text = split
    port = 80 if port_text is None else port_number(port_text)
    if port is None:
        ctx.fail(f'invalid port in upstream "{text}"')
    if not resolves(host, port):
        ctx.fail(f'host not found in upstream "{text}"')
    server = UpstreamServer(host=host, port=port)
    for arg in args[1:]:
        if (value := _key_value(arg, "weight")) is not None:
            if not is_number(value) or int(value) < 1:
                ctx.fail(f'invalid parameter "{arg}"')
            server.weight = int(value)
        elif (value := _key_value(arg, "max_fails")) is not None:
            if not is_number(value):
                ctx.fail(f'invalid parameter "{arg}"')
            server.max_fails = int(value)
        elif (value := _key_value(arg, "fail_timeout")) is not None:
            seconds = parse_time(value)
            if seconds is None:
                ctx.fail(f'invalid parameter "{arg}"')
            server.fail_timeout = seconds
        elif arg == "backup":
            server.backup = True
        else:
            ctx.fail(f'invalid parameter "{arg}"')
    return server


TLS_PROTOCOLS = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


def tls_file_value(args: list[str], ctx: Ctx) -> tuple[str, str]:
    """A certificate, key or password file: its path, and where the conf named it (for errors)."""
    return ctx.path(args[0]), ctx.where


def tls_protocols_value(args: list[str], ctx: Ctx) -> tuple[str, ...]:
    for arg in args:
        if arg not in TLS_PROTOCOLS:
            ctx.invalid(arg)
        if arg in ("SSLv2", "SSLv3"):
            ctx.fail(f'"{arg}" is not supported (insecure, and not built into this OpenSSL)')
    return tuple(args)


def verify_client_value(args: list[str], ctx: Ctx) -> str:
    if args[0] not in ("on", "off", "optional", "optional_no_ca"):
        ctx.invalid(args[0], 'it must be "on", "off", "optional" or "optional_no_ca"')
    if args[0] == "optional_no_ca":
        ctx.fail('"optional_no_ca" cannot be offered: OpenSSL\'s verify callback is not reachable from Python')
    return args[0]


def session_cache_value(args: list[str], ctx: Ctx) -> str:
    """nginx's `off | none | [builtin[:size]] [shared:name:size]`: kept as text (see DIRECTIVES.md)."""
    for arg in args:
        if arg in ("off", "none") and len(args) == 1:
            continue
        if arg == "builtin" or arg.startswith("builtin:"):
            continue
        parts = arg.split(":")
        if len(parts) == 3 and parts[0] == "shared" and parts[1] and parse_size(parts[2]):
            continue
        ctx.invalid(arg)
    return " ".join(args)


def nothing(args: list[str], ctx: Ctx) -> None:
    return None
