"""The parsed configuration: plain dataclasses, built once by the parser, read-only after.

The parser resolves nginx's inheritance (http -> server -> location) before it
hands a Config out: every Location carries the *effective* value of each
inheritable directive in its `settings`, so the worker never walks parents on
the hot path.  `where` fields keep "file:line" for error messages.

Conf regexes (regex locations, `~` server names) are held compiled, next to
their source text: the parser compiles them once to check them, and the Router
matches with those same pattern objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Listen:
    addr: str  # "0.0.0.0", "127.0.0.1", "::"
    port: int
    default_server: bool = False
    reuseport: bool = False
    backlog: int = 511
    ssl: bool = False  # TLS on this address: one `listen … ssl` of it makes it TLS for every server
    where: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.addr, self.port)


@dataclass
class UpstreamServer:
    host: str
    port: int
    weight: int = 1
    max_fails: int = 1
    fail_timeout: float = 10.0
    backup: bool = False


@dataclass
class Upstream:
    name: str
    servers: list[UpstreamServer]
    keepalive: int = 0  # idle connections kept per worker; 0 = close after each request
    where: str = ""


@dataclass
class ProxyPass:
    """`proxy_pass http://TARGET[/URI]`; TARGET names an upstream block or is host:port."""

    url: str
    upstream: str  # name of an Upstream in Http.upstreams (an implicit one for host:port)
    uri: str | None  # None: pass the request URI unchanged; else nginx's replacement rule
    scheme: str = "http"  # "https": TLS to the upstream, with the location's proxy_ssl_* settings
    tls: object = None  # for https: (ssl.SSLContext, server name or None), built by forkgw.tls before fork


@dataclass
class FilterRef:
    """One `proxy_wasm NAME [CONFIG] [root_id=ID] [on_error=fail|continue]` line."""

    module: str
    config: str = ""
    root_id: str | None = None  # None: the module's root id (its NAME unless set in wasm{})
    on_error: str = "fail"  # "fail" -> 500, "continue" -> let the request through
    where: str = ""


@dataclass
class AddHeader:
    name: str
    value: str
    always: bool = False


@dataclass
class Settings:
    """Directives inherited http -> server -> location (effective values)."""

    server_tokens: bool = True
    access_log: list[tuple[str, str]] = field(default_factory=list)  # (path, format); [] = off
    keepalive_timeout: float = 75.0
    keepalive_requests: int = 1000
    client_header_timeout: float = 60.0
    client_body_timeout: float = 60.0
    send_timeout: float = 60.0
    client_max_body_size: int = 1024 * 1024  # 0 = unlimited
    large_client_header_buffers: tuple[int, int] = (4, 8192)  # (number, size)
    proxy_set_header: list[tuple[str, str]] = field(default_factory=list)
    proxy_connect_timeout: float = 60.0
    proxy_read_timeout: float = 60.0
    proxy_send_timeout: float = 60.0
    proxy_next_upstream: tuple[str, ...] = ("error", "timeout")
    add_header: list[AddHeader] = field(default_factory=list)
    filters: list[FilterRef] = field(default_factory=list)
    # TLS of the server (http and server levels); files are (absolute path, "file:line")
    ssl_certificate: list[tuple[str, str]] = field(default_factory=list)
    ssl_certificate_key: list[tuple[str, str]] = field(default_factory=list)
    ssl_password_file: tuple[str, str] | None = None
    ssl_protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    ssl_ciphers: str = "HIGH:!aNULL:!MD5"
    ssl_prefer_server_ciphers: bool = False
    ssl_session_tickets: bool = True
    ssl_session_timeout: float = 300.0
    ssl_session_cache: str = "none"
    ssl_verify_client: str = "off"  # on | optional | optional_no_ca | off
    ssl_client_certificate: tuple[str, str] | None = None
    ssl_trusted_certificate: tuple[str, str] | None = None
    ssl_verify_depth: int = 1
    # TLS to upstreams (http, server and location levels)
    proxy_ssl_verify: bool = True
    proxy_ssl_trusted_certificate: tuple[str, str] | None = None  # None: the system's CA bundle
    proxy_ssl_server_name: bool = False
    proxy_ssl_name: str | None = None  # None: the host of proxy_pass
    proxy_ssl_protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    proxy_ssl_ciphers: str = "DEFAULT"
    proxy_ssl_certificate: tuple[str, str] | None = None
    proxy_ssl_certificate_key: tuple[str, str] | None = None
    proxy_ssl_session_reuse: bool = True


@dataclass
class Location:
    modifier: str  # "" (prefix), "=", "^~", "~", "~*"
    pattern: str
    settings: Settings
    ret: tuple[int, str | None] | None = None  # `return CODE [TEXT|URL]`
    proxy_pass: ProxyPass | None = None
    metrics: bool = False  # `forkgw_metrics`: answer with the Prometheus text
    locations: list["Location"] = field(default_factory=list)  # nested
    where: str = ""
    regex: re.Pattern[str] | None = None  # `pattern` compiled, for "~" and "~*"; None otherwise


def walk_locations(locations: list[Location]):
    """Each location and the ones nested in it, depth first, in conf order."""
    for location in locations:
        yield location
        yield from walk_locations(location.locations)


@dataclass
class Server:
    listens: list[Listen]
    names: list[str]  # exact, "*.wild", "wild.*", "~regex"; "" = requests without Host
    locations: list[Location]
    settings: Settings  # server-level effective settings (used when no location matches)
    ret: tuple[int, str | None] | None = None  # server-level `return` answers everything
    where: str = ""
    name_regexes: dict[str, re.Pattern[str]] = field(default_factory=dict)  # "~regex" in names -> compiled
    ssl_context: object = None  # its ssl.SSLContext when on a TLS address, built by forkgw.tls before fork


@dataclass
class Http:
    servers: list[Server]
    upstreams: dict[str, Upstream]
    log_formats: dict[str, str]  # name -> format string; "combined" always present
    settings: Settings | None = None  # the http level's own (what callouts to https targets use)
    wasm_vm: str = "wasmtime"


@dataclass
class WasmModule:
    name: str
    path: str  # absolute path to the .wasm file
    vm_config: str = ""
    root_id: str | None = None  # None: NAME
    default_config: str = ""  # from plugin.yaml, used when proxy_wasm gives no config
    where: str = ""
    description: str = ""  # from plugin.yaml


@dataclass
class Wasm:
    modules: dict[str, WasmModule] = field(default_factory=dict)
    callback_timeout: float = 0.05  # seconds a single filter callback may run (epoch)
    memory_max: int = 64 * 1024 * 1024  # bytes of linear memory per module instance
    vm_recycle_memory: int = 512 * 1024  # replace a VM grown by more than this since its boot (0: never)
    shm_kv: tuple[int, str] = (8 * 1024 * 1024, "lru")  # (bytes, eviction) shared by all workers
    body_buffer_size: int = 1024 * 1024  # bytes of a body one filter may hold back while it pauses
    inspect_bodies: bool = False  # body callbacks also for filters that cannot change a body


@dataclass
class Config:
    path: str  # absolute path of the main conf file
    prefix: str  # absolute; relative paths in the conf resolve against it
    worker_processes: int = 1
    worker_cpu_affinity: str | None = None  # "auto" or space-separated masks
    worker_rlimit_nofile: int | None = None
    worker_shutdown_timeout: float = 30.0
    worker_watchdog_timeout: float = 10.0
    pid: str = ""  # absolute path
    error_log: tuple[str, str] = ("logs/error.log", "error")  # (absolute path or "stderr", level)
    user: str | None = None
    group: str | None = None  # None: the group named like `user`
    worker_connections: int = 512
    event_method: str | None = None  # `use epoll|poll|select|kqueue`; None: the platform's best
    accept_mutex: bool = False
    multi_accept: bool = False
    wasm: Wasm = field(default_factory=Wasm)
    http: Http | None = None
    files: list[str] = field(default_factory=list)  # every file read, main first (for -T)

    def listens(self) -> list[Listen]:
        """One Listen per distinct address, the first seen (with its options)."""
        seen: dict[tuple[str, int], Listen] = {}
        for server in self.http.servers if self.http else []:
            for listen in server.listens:
                seen.setdefault(listen.key, listen)
        return list(seen.values())
