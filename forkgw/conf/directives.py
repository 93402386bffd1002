"""The directive table: the one place that says what the conf language accepts.

Each Directive names its contexts, its arity, the parser of its arguments,
where the parsed value goes in the model, its default, and the text the
reference documentation is made of.  The conf parser walks statements through
this table, the defaults of the model are parsed from it, and
docs/DIRECTIVES.md is rendered from it:

    python -m forkgw.conf.directives > docs/DIRECTIVES.md
    python -m forkgw.conf.directives --check docs/DIRECTIVES.md
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from forkgw.conf import values as v

MAIN, EVENTS, HTTP, SERVER, LOCATION, UPSTREAM, WASM = (
    "main", "events", "http", "server", "location", "upstream", "wasm",
)  # fmt: skip
CONTEXTS = (MAIN, EVENTS, HTTP, SERVER, LOCATION, UPSTREAM, WASM)
HSL = (HTTP, SERVER, LOCATION)

# How the parser stores a directive's value in its block:
SET = "set"  # one value; a second occurrence is `"x" directive is duplicate`
APPEND = "append"  # every occurrence adds one value, in conf order
EXTEND = "extend"  # every occurrence adds a list of values (an empty one still counts as "set here")
INCLUDE = "include"  # statements of other files, read in place

MANY = None  # no upper bound on the argument count

COMBINED_DEFAULT = (
    "combined '$remote_addr - $remote_user [$time_local] \"$request\" $status $body_bytes_sent "
    "\"$http_referer\" \"$http_user_agent\"'"
)


@dataclass(frozen=True)
class Directive:
    name: str
    contexts: tuple[str, ...]
    args: tuple[int, int | None]  # (fewest, most) arguments, nginx's TAKE1/TAKE12/1MORE...
    parse: Callable[[list[str], v.Ctx], Any]
    store: str
    target: str  # the model field the value fills
    syntax: str  # arguments, as the docs show them
    default: str | None  # conf text of the default arguments; None: no default
    description: str
    example: str
    block: str | None = None  # the context a block directive opens

    def takes(self, count: int) -> bool:
        low, high = self.args
        return count >= low and (high is None or count <= high)


def _d(name, contexts, args, parse, store, target, syntax, default, description, example, block=None):
    return Directive(name, tuple(contexts), args, parse, store, target, syntax, default, description, example, block)


DIRECTIVES: tuple[Directive, ...] = (
    # -- main ------------------------------------------------------------------
    _d("worker_processes", [MAIN], (1, 1), v.worker_processes_value, SET, "worker_processes",
       "number | auto", "1",
       "How many worker processes serve requests; `auto` is one per CPU.",
       "worker_processes auto;"),
    _d("worker_cpu_affinity", [MAIN], (1, MANY), v.cpu_affinity_value, SET, "worker_cpu_affinity",
       "auto [cpumask] | cpumask ...", None,
       "Binds workers to CPUs: one bit mask per worker, or `auto` to spread them over the CPUs.",
       "worker_cpu_affinity 0101 1010;"),
    _d("worker_rlimit_nofile", [MAIN], (1, 1), v.positive_value, SET, "worker_rlimit_nofile",
       "number", None,
       "Raises the open-files limit (RLIMIT_NOFILE) of worker processes.",
       "worker_rlimit_nofile 65535;"),
    _d("worker_shutdown_timeout", [MAIN], (1, 1), v.time_value, SET, "worker_shutdown_timeout",
       "time", "30s",
       "How long a draining worker may finish in-flight requests before it is stopped.",
       "worker_shutdown_timeout 10s;"),
    _d("worker_watchdog_timeout", [MAIN], (1, 1), v.time_value, SET, "worker_watchdog_timeout",
       "time", "10s",
       "A worker whose loop has not turned for this long (stopped, or stuck outside the filters' "
       "time limit) is killed and replaced; its heartbeat lives in memory shared with the master.",
       "worker_watchdog_timeout 5s;"),
    _d("pid", [MAIN], (1, 1), v.path_value, SET, "pid",
       "file", "logs/forkgw.pid",
       "File the master writes its process id to; relative paths resolve against the prefix.",
       "pid /run/forkgw.pid;"),
    _d("error_log", [MAIN], (1, 2), v.error_log_value, SET, "error_log",
       "file | stderr [debug | info | notice | warn | error | crit | alert | emerg]", "logs/error.log error",
       "Where the error log goes and the least severe level written to it.",
       "error_log stderr info;"),
    _d("user", [MAIN], (1, 2), v.user_value, SET, "user",
       "user [group]", None,
       "User (and group; by default the group named like the user) the workers run as when started as root.",
       "user www-data;"),
    _d("include", CONTEXTS, (1, 1), v.nothing, INCLUDE, "",
       "file | mask", None,
       "Reads other conf files in place, in the current context. A relative mask resolves against the "
       "folder of the main conf file; files matching a mask are read in sorted order, and a mask "
       "matching nothing is not an error.",
       "include conf.d/*.conf;"),
    _d("events", [MAIN], (0, 0), v.nothing, SET, "events",
       "{ ... }", None,
       "Connection processing settings.",
       "events { worker_connections 1024; }", block=EVENTS),
    _d("wasm", [MAIN], (0, 0), v.nothing, SET, "wasm",
       "{ ... }", None,
       "Declares the proxy-wasm modules and limits of the wasm virtual machines.",
       "wasm { module auth plugins/auth; }", block=WASM),
    _d("http", [MAIN], (0, 0), v.nothing, SET, "http",
       "{ ... }", None,
       "The HTTP server: upstreams, servers and their locations.",
       "http { server { listen 8080; } }", block=HTTP),
    # -- events ----------------------------------------------------------------
    _d("worker_connections", [EVENTS], (1, 1), v.positive_value, SET, "worker_connections",
       "number", "512",
       "Most simultaneous connections one worker holds (client and upstream together).",
       "worker_connections 4096;"),
    _d("use", [EVENTS], (1, 1), v.event_method_value, SET, "event_method",
       "epoll | poll | select | kqueue", None,
       "The event notification method; by default the best one the platform has.",
       "use epoll;"),
    _d("accept_mutex", [EVENTS], (1, 1), v.flag_value, SET, "accept_mutex",
       "on | off", "off",
       "Workers take turns accepting new connections instead of all being woken.",
       "accept_mutex on;"),
    _d("multi_accept", [EVENTS], (1, 1), v.flag_value, SET, "multi_accept",
       "on | off", "off",
       "A worker accepts every pending connection at once instead of one per wakeup.",
       "multi_accept on;"),
    # -- wasm ------------------------------------------------------------------
    _d("module", [WASM], (2, 4), v.wasm_module_value, APPEND, "modules",
       "name path [vm_config] [root_id=id]", None,
       "Declares a proxy-wasm module under a name. `path` is a .wasm file, or a folder holding a "
       "`plugin.yaml` with the keys `wasm` (the module file, relative to the folder), `root_id`, "
       "`config` (default filter configuration; a mapping or list is passed as JSON) and `description`.",
       "module rate_limit plugins/rate_limit root_id=limiter;"),
    _d("callback_timeout", [WASM], (1, 1), v.time_value, SET, "callback_timeout",
       "time", "50ms",
       "Longest time a single filter callback may run before it is interrupted.",
       "callback_timeout 20ms;"),
    _d("memory_max", [WASM], (1, 1), v.size_value, SET, "memory_max",
       "size", "64m",
       "Largest linear memory one module instance may grow to.",
       "memory_max 16m;"),
    _d("vm_recycle_memory", [WASM], (1, 1), v.size_value, SET, "vm_recycle_memory",
       "size | 0", "512k",
       "A VM whose linear memory has grown by more than this since it booted is replaced by a "
       "fresh one between requests (its root contexts configured anew; shared data is kept), so "
       "a filter that leaks guest memory keeps the worker bounded instead of failing at "
       "memory_max. The AssemblyScript SDK leaks about 34 bytes a request: with 512k its VM is "
       "renewed about every 15,000 requests (a few milliseconds each). Raise it for a filter that grows a cache of its "
       "own on purpose; 0 turns it off.",
       "vm_recycle_memory 16m;"),
    _d("shm_kv", [WASM], (1, 2), v.shm_kv_value, SET, "shm_kv",
       "size [eviction=lru|none]", "8m eviction=lru",
       "Memory shared by every worker for the filters' shared data, queues and metrics. It is "
       "created once, at start: it outlives worker crashes and reloads (a new size takes a "
       "restart). When full, `lru` evicts the least recently used keys; `none` refuses the write.",
       "shm_kv 32m eviction=none;"),
    _d("body_buffer_size", [WASM], (1, 1), v.size_value, SET, "body_buffer_size",
       "size", "1m",
       "Most bytes of a request or response body one filter may hold back while it returns Pause "
       "from its body callback. Past it a request is answered 413, and a response body passes through "
       "that filter unmodified. Filters that stream the body are not limited.",
       "body_buffer_size 8m;"),
    _d("inspect_bodies", [WASM], (1, 1), v.flag_value, SET, "inspect_bodies",
       "on | off", "off",
       "Every SDK exports every body callback, so exporting one says nothing: by default bodies go "
       "through the chain only when one of its modules can change a body (imports "
       "proxy_set_buffer_bytes). With `on`, filters that only read bodies get them too; either way "
       "a chain that gets bodies holds each request body until its end and sends responses chunked.",
       "inspect_bodies on;"),
    # -- http ------------------------------------------------------------------
    _d("server", [HTTP], (0, 0), v.nothing, APPEND, "servers",
       "{ ... }", None,
       "A virtual server: the addresses it listens on, its names and its locations.",
       "server { listen 8080; server_name example.com; }", block=SERVER),
    _d("upstream", [HTTP], (1, 1), v.upstream_name_value, APPEND, "upstreams",
       "name { ... }", None,
       "A named group of servers `proxy_pass` can send requests to.",
       "upstream backend { server 127.0.0.1:9000; }", block=UPSTREAM),
    _d("log_format", [HTTP], (2, MANY), v.log_format_value, APPEND, "log_formats",
       "name string ...", COMBINED_DEFAULT,
       "Names an access log line format; the strings are joined. `combined` is always defined "
       "(as shown under Default) and cannot be redefined.",
       "log_format brief '$remote_addr $status $request_time';"),
    _d("wasm_vm", [HTTP], (1, 1), v.wasm_vm_value, SET, "wasm_vm",
       "wasmtime", "wasmtime",
       "The wasm runtime that runs filters.",
       "wasm_vm wasmtime;"),
    _d("access_log", HSL, (1, 2), v.access_log_value, EXTEND, "access_log",
       "path [format] | off", "logs/access.log combined",
       "Writes one line per request to `path` in the named `log_format`. Repeatable; a level that "
       "declares none inherits all of the enclosing level's.",
       "access_log logs/api.log brief;"),
    _d("keepalive_timeout", HSL, (1, 1), v.time_value, SET, "keepalive_timeout",
       "time", "75s",
       "How long an idle client keep-alive connection stays open; 0 disables keep-alive.",
       "keepalive_timeout 30s;"),
    _d("keepalive_requests", HSL, (1, 1), v.positive_value, SET, "keepalive_requests",
       "number", "1000",
       "Most requests served over one client connection.",
       "keepalive_requests 100;"),
    _d("client_header_timeout", (HTTP, SERVER), (1, 1), v.time_value, SET, "client_header_timeout",
       "time", "60s",
       "How long the client may take to send the request head.",
       "client_header_timeout 10s;"),
    _d("client_body_timeout", HSL, (1, 1), v.time_value, SET, "client_body_timeout",
       "time", "60s",
       "Longest pause between two reads of the request body.",
       "client_body_timeout 10s;"),
    _d("send_timeout", HSL, (1, 1), v.time_value, SET, "send_timeout",
       "time", "60s",
       "Longest pause between two writes of the response to the client.",
       "send_timeout 10s;"),
    _d("client_max_body_size", HSL, (1, 1), v.size_value, SET, "client_max_body_size",
       "size", "1m",
       "Largest request body accepted (413 beyond it); 0 means no limit.",
       "client_max_body_size 10m;"),
    _d("large_client_header_buffers", (HTTP, SERVER), (2, 2), v.large_buffers_value, SET,
       "large_client_header_buffers",
       "number size", "4 8k",
       "Limits the request head: a request line longer than `size` is answered 414, a head larger "
       "than `number * size` is refused.",
       "large_client_header_buffers 8 16k;"),
    _d("server_tokens", HSL, (1, 1), v.flag_value, SET, "server_tokens",
       "on | off", "on",
       "Whether the `Server` header and error pages name the forkgw version.",
       "server_tokens off;"),
    _d("proxy_set_header", HSL, (2, 2), v.header_pair_value, APPEND, "proxy_set_header",
       "field value", None,
       "Sets a header of the request sent upstream; an empty value removes it. Repeatable; a level "
       "that declares none inherits all of the enclosing level's.",
       "proxy_set_header X-Real-IP $remote_addr;"),
    _d("proxy_connect_timeout", HSL, (1, 1), v.time_value, SET, "proxy_connect_timeout",
       "time", "60s",
       "How long connecting to an upstream server may take.",
       "proxy_connect_timeout 2s;"),
    _d("proxy_read_timeout", HSL, (1, 1), v.time_value, SET, "proxy_read_timeout",
       "time", "60s",
       "Longest pause between two reads from the upstream server.",
       "proxy_read_timeout 30s;"),
    _d("proxy_send_timeout", HSL, (1, 1), v.time_value, SET, "proxy_send_timeout",
       "time", "60s",
       "Longest pause between two writes to the upstream server.",
       "proxy_send_timeout 30s;"),
    _d("proxy_next_upstream", HSL, (1, MANY), v.next_upstream_value, SET, "proxy_next_upstream",
       "error | timeout | invalid_header | http_500 | http_502 | http_503 | http_504 | http_403 | "
       "http_404 | http_429 | non_idempotent | off ...", "error timeout",
       "When a request is passed to the next upstream server; requests with a non-idempotent "
       "method only with `non_idempotent`. `off` never retries.",
       "proxy_next_upstream error timeout http_502;"),
    _d("add_header", HSL, (2, 3), v.add_header_value, APPEND, "add_header",
       "name value [always]", None,
       "Adds a header to responses with status 200, 201, 204, 206, 301, 302, 303, 304, 307 or "
       "308, or to every response with `always`. Repeatable; a level that declares none inherits "
       "all of the enclosing level's.",
       "add_header X-Frame-Options DENY always;"),
    _d("proxy_wasm", HSL, (1, 5), v.proxy_wasm_value, APPEND, "filters",
       "name [config] [root_id=id] [on_error=fail|continue] [file=path]", None,
       "Adds a filter of the wasm module `name` to the chain, in order. The configuration is "
       "`config`, or the content of the YAML file `file=` as JSON, or else the module's default. "
       "With `on_error=continue` a failing filter lets the request through instead of answering "
       "500. A level that declares none inherits the enclosing level's chain.",
       "proxy_wasm auth '{\"realm\": \"api\"}' on_error=continue;"),
    # -- TLS of a server (http and server levels) ------------------------------
    _d("ssl_certificate", (HTTP, SERVER), (1, 1), v.tls_file_value, APPEND, "ssl_certificate",
       "file", None,
       "A PEM certificate (with its chain) for the server's `ssl` listeners. Repeatable, paired in "
       "order with `ssl_certificate_key`: an ECDSA and an RSA certificate may serve side by side, "
       "and each client gets the one its handshake can use. Read by the master before it forks.",
       "ssl_certificate certs/example.com.ecdsa.pem;"),
    _d("ssl_certificate_key", (HTTP, SERVER), (1, 1), v.tls_file_value, APPEND, "ssl_certificate_key",
       "file", None,
       "The PEM private key of the `ssl_certificate` in the same position. `-t` checks that each "
       "key matches its certificate.",
       "ssl_certificate_key certs/example.com.ecdsa.key;"),
    _d("ssl_password_file", (HTTP, SERVER), (1, 1), v.tls_file_value, SET, "ssl_password_file",
       "file", None,
       "Pass phrases of encrypted keys, one a line; each is tried in turn.",
       "ssl_password_file conf/keys.pass;"),
    _d("ssl_protocols", (HTTP, SERVER), (1, MANY), v.tls_protocols_value, SET, "ssl_protocols",
       "[TLSv1] [TLSv1.1] [TLSv1.2] [TLSv1.3]", "TLSv1.2 TLSv1.3",
       "The TLS versions offered.",
       "ssl_protocols TLSv1.3;"),
    _d("ssl_ciphers", (HTTP, SERVER), (1, 1), v.string_value, SET, "ssl_ciphers",
       "ciphers", "HIGH:!aNULL:!MD5",
       "The cipher list for TLS 1.2 and older, in OpenSSL's format (TLS 1.3 suites are OpenSSL's).",
       "ssl_ciphers ECDHE+AESGCM:ECDHE+CHACHA20;"),
    _d("ssl_prefer_server_ciphers", (HTTP, SERVER), (1, 1), v.flag_value, SET, "ssl_prefer_server_ciphers",
       "on | off", "off",
       "The server's cipher order wins over the client's.",
       "ssl_prefer_server_ciphers on;"),
    _d("ssl_session_tickets", (HTTP, SERVER), (1, 1), v.flag_value, SET, "ssl_session_tickets",
       "on | off", "on",
       "Session resumption with tickets. The ticket keys are made with the contexts, by the master "
       "before it forks, so a session made on one worker resumes on any other of its generation.",
       "ssl_session_tickets off;"),
    _d("ssl_session_timeout", (HTTP, SERVER), (1, 1), v.time_value, SET, "ssl_session_timeout",
       "time", "5m",
       "How long a session may be resumed; OpenSSL's own lifetime applies (Python's ssl module "
       "cannot set it), so the value is accepted and checked only.",
       "ssl_session_timeout 10m;"),
    _d("ssl_session_cache", (HTTP, SERVER), (1, 2), v.session_cache_value, SET, "ssl_session_cache",
       "off | none | [builtin[:size]] [shared:name:size]", "none",
       "nginx's syntax, accepted for its confs: resumption across workers comes from tickets "
       "(see `ssl_session_tickets`), each worker also keeps OpenSSL's own session cache.",
       "ssl_session_cache shared:SSL:10m;"),
    _d("ssl_verify_client", (HTTP, SERVER), (1, 1), v.verify_client_value, SET, "ssl_verify_client",
       "on | off | optional", "off",
       "Asks the client for a certificate, verified against `ssl_client_certificate`: `on` "
       "requires one (a request without is answered 400, as nginx does), `optional` verifies one if "
       "sent.",
       "ssl_verify_client on;"),
    _d("ssl_client_certificate", (HTTP, SERVER), (1, 1), v.tls_file_value, SET, "ssl_client_certificate",
       "file", None,
       "PEM certificates of the CAs that client certificates are verified against. (Python's ssl "
       "module sends the client no list of CA names, so this and `ssl_trusted_certificate` act alike.)",
       "ssl_client_certificate certs/clients-ca.pem;"),
    _d("ssl_trusted_certificate", (HTTP, SERVER), (1, 1), v.tls_file_value, SET, "ssl_trusted_certificate",
       "file", None,
       "More CA certificates to verify client certificates against.",
       "ssl_trusted_certificate certs/intermediate.pem;"),
    _d("ssl_verify_depth", (HTTP, SERVER), (1, 1), v.positive_value, SET, "ssl_verify_depth",
       "number", "1",
       "nginx's bound on a client's chain, accepted for its confs: Python's ssl module cannot set "
       "OpenSSL's verify depth, so chains are bounded by OpenSSL's default (100), not by this value.",
       "ssl_verify_depth 2;"),
    # -- TLS to upstreams (proxy_pass https://, and filters' callouts to https://) ----
    _d("proxy_ssl_verify", HSL, (1, 1), v.flag_value, SET, "proxy_ssl_verify",
       "on | off", "on",
       "Verifies the upstream's certificate and name. On by default, unlike nginx: an unverified "
       "upstream is a silent hole; a failed verification is logged naming this directive.",
       "proxy_ssl_verify off;"),
    _d("proxy_ssl_trusted_certificate", HSL, (1, 1), v.tls_file_value, SET, "proxy_ssl_trusted_certificate",
       "file", None,
       "PEM CA certificates the upstream's certificate is verified against; by default the "
       "system's CA bundle.",
       "proxy_ssl_trusted_certificate certs/internal-ca.pem;"),
    _d("proxy_ssl_server_name", HSL, (1, 1), v.flag_value, SET, "proxy_ssl_server_name",
       "on | off", "off",
       "Sends the upstream's name as SNI. With `proxy_ssl_verify on` it is always sent: Python's "
       "ssl module checks the name it sends.",
       "proxy_ssl_server_name on;"),
    _d("proxy_ssl_name", HSL, (1, 1), v.string_value, SET, "proxy_ssl_name",
       "name", None,
       "The name verified (and sent as SNI); by default the host of `proxy_pass`.",
       "proxy_ssl_name api.internal;"),
    _d("proxy_ssl_protocols", HSL, (1, MANY), v.tls_protocols_value, SET, "proxy_ssl_protocols",
       "[TLSv1] [TLSv1.1] [TLSv1.2] [TLSv1.3]", "TLSv1.2 TLSv1.3",
       "The TLS versions offered to upstreams.",
       "proxy_ssl_protocols TLSv1.3;"),
    _d("proxy_ssl_ciphers", HSL, (1, 1), v.string_value, SET, "proxy_ssl_ciphers",
       "ciphers", "DEFAULT",
       "The cipher list offered to upstreams for TLS 1.2 and older, in OpenSSL's format.",
       "proxy_ssl_ciphers HIGH:!aNULL;"),
    _d("proxy_ssl_certificate", HSL, (1, 1), v.tls_file_value, SET, "proxy_ssl_certificate",
       "file", None,
       "A client certificate (PEM) presented to upstreams that ask for one (mutual TLS).",
       "proxy_ssl_certificate certs/gateway-client.pem;"),
    _d("proxy_ssl_certificate_key", HSL, (1, 1), v.tls_file_value, SET, "proxy_ssl_certificate_key",
       "file", None,
       "The key of `proxy_ssl_certificate`.",
       "proxy_ssl_certificate_key certs/gateway-client.key;"),
    _d("proxy_ssl_session_reuse", HSL, (1, 1), v.flag_value, SET, "proxy_ssl_session_reuse",
       "on | off", "on",
       "Resumes the last TLS session with each upstream server instead of a full handshake.",
       "proxy_ssl_session_reuse off;"),
    # -- upstream --------------------------------------------------------------
    _d("server", [UPSTREAM], (1, MANY), v.upstream_server_value, APPEND, "servers",
       "address[:port] [weight=number] [max_fails=number] [fail_timeout=time] [backup]", None,
       "A server of the upstream group (port 80 when omitted). After `max_fails` failures within "
       "`fail_timeout` it rests for `fail_timeout`; `backup` servers get requests only when all "
       "others are down.",
       "server 10.0.0.2:8080 weight=3 max_fails=2 fail_timeout=5s;"),
    _d("keepalive", [UPSTREAM], (1, 1), v.count_value, SET, "keepalive",
       "connections", None,
       "Idle connections to the group's servers each worker keeps for reuse; 0 closes each after its request.",
       "keepalive 32;"),
    # -- server and location ---------------------------------------------------
    _d("listen", [SERVER], (1, MANY), v.listen_value, APPEND, "listens",
       "[address:]port | address [default_server] [ssl] [reuseport] [backlog=number]", "0.0.0.0:80",
       "An address and port the server accepts connections on (`*:8080`, `127.0.0.1`, "
       "`[::]:8080`). `default_server` makes it the server for requests whose Host matches no "
       "name; otherwise the first server listed for the address is. `ssl` makes the address speak "
       "TLS (for every server on it); the certificate is chosen by SNI among the servers of the "
       "address, the default server's when the client names none or an unknown one.",
       "listen 127.0.0.1:8443 ssl default_server reuseport;"),
    _d("server_name", [SERVER], (1, MANY), v.server_name_value, EXTEND, "names",
       "name ...", '""',
       "Names the server answers to: exact names, `*.example.com`, `www.example.*`, `~regex` and "
       "`\"\"` (requests without Host). Chosen in that order: exact, longest leading wildcard, "
       "longest trailing wildcard, first matching regex.",
       "server_name example.com *.example.com;"),
    _d("location", [SERVER, LOCATION], (1, 2), v.location_value, APPEND, "locations",
       "[ = | ^~ | ~ | ~* ] uri { ... }", None,
       "Settings for requests by path. `=` matches exactly and wins at once; otherwise the longest "
       "matching prefix is remembered and, unless it is `^~`, regexes (`~`, `~*` case-insensitive) "
       "are tried in conf order, nested ones of that prefix first; the first matching regex wins, "
       "else the prefix. Locations may nest.",
       "location ^~ /static/ { return 404; }", block=LOCATION),
    _d("return", [SERVER, LOCATION], (1, 2), v.return_value, SET, "ret",
       "code [text | url] | url", None,
       "Answers at once with `code` (and body `text`, or the `Location` for 301, 302, 303, 307, "
       "308); a lone URL redirects with 302. At server level it answers every request.",
       "return 301 https://example.com$request_uri;"),
    _d("forkgw_metrics", [LOCATION], (0, 0), v.flag_on, SET, "metrics",
       "(no arguments)", None,
       "Answers with the gateway's metrics and the filters' metrics, from every worker, in "
       "Prometheus text format.",
       "forkgw_metrics;"),
    _d("proxy_pass", [LOCATION], (1, 1), v.proxy_pass_value, SET, "proxy_pass",
       "http://upstream[/uri] | http://host:port[/uri]", None,
       "Sends requests to an upstream group, or to one `host:port`. With a URI part, the part of "
       "the path matched by the location prefix is replaced by it; without one, the request URI "
       "is passed unchanged. Plain HTTP only.",
       "proxy_pass http://backend/api/;"),
)


def by_name() -> dict[str, list[Directive]]:
    """Directives indexed by name (two share `server`: the http block and the upstream line)."""
    index: dict[str, list[Directive]] = {}
    for directive in DIRECTIVES:
        index.setdefault(directive.name, []).append(directive)
    return index


def render_markdown() -> str:
    """docs/DIRECTIVES.md, generated from the table."""
    lines = [
        "# Directives",
        "",
        "<!-- Generated by `python -m forkgw.conf.directives > docs/DIRECTIVES.md`; do not edit. -->",
        "",
        "Sizes are bytes or take `k`, `m`, `g`; times are seconds or take `ms`, `s`, `m`, `h`, `d`.",
        "Relative paths resolve against the prefix (`-p`); `include` masks resolve against the folder",
        "of the main conf file.",
        "",
    ]
    for context in CONTEXTS:
        listed = [d for d in DIRECTIVES if d.contexts[0] == context]
        if listed:
            lines.append(f"- {context}: " + ", ".join(f"[{_title(d)}](#{_anchor(d)})" for d in listed))
    for directive in DIRECTIVES:
        ending = "" if directive.block else ";"
        default = "—" if directive.default is None else f"`{directive.name} {directive.default};`"
        lines += [
            "",
            f"## {_title(directive)}",
            "",
            "| | |",
            "|---|---|",
            f"| Syntax | `{directive.name} {_cell(directive.syntax)}{ending}` |",
            f"| Default | {default} |",
            f"| Context | {', '.join(directive.contexts)} |",
            "",
            directive.description,
            "",
            "```nginx",
            directive.example,
            "```",
        ]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text for a table cell: GitHub tables split cells on `|`, even inside code."""
    return text.replace("|", r"\|")


def _title(directive: Directive) -> str:
    twins = by_name()[directive.name]
    return directive.name if len(twins) == 1 else f"{directive.name} ({directive.contexts[0]})"


def _anchor(directive: Directive) -> str:
    return _title(directive).replace(" (", "-").replace(")", "")


def main(argv: list[str]) -> int:
    text = render_markdown()
    if argv[:1] == ["--check"] and len(argv) == 2:
        with open(argv[1], encoding="utf-8") as f:
            if f.read() == text:
                return 0
        print(f"{argv[1]} is out of date: python -m forkgw.conf.directives > {argv[1]}", file=sys.stderr)
        return 1
    if argv:
        print("usage: python -m forkgw.conf.directives [--check FILE]", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
