"""proxy_get_property / proxy_set_property: the attributes a filter can read.

A path is NUL-separated segments (`request\\0path`, what the SDKs send) or the
dotted spelling (`request.path`); see abi.split_path.

Value encoding (Envoy's, so filters written for Envoy decode them unchanged):
- strings: the raw bytes (UTF-8 text);
- integers (ports, response.code, connection.id): 8-byte little-endian
  int64/uint64;
- timestamps (request.time): 8-byte little-endian int64 nanoseconds since the
  Unix epoch;
- source.address / destination.address: "ip:port" ("[v6]:port" for IPv6), as
  Envoy reports them; the port alone is in source.port / destination.port;
- request.headers.<name> / response.headers.<name>: the value, repeated headers
  joined with ",".

Read-only attributes (built from the stream): plugin_name (the wasm module
name), plugin_root_id, plugin_vm_id (the module name: one VM per module and
worker), request.path (path + query), request.url_path, request.host
(:authority), request.scheme, request.method, request.protocol,
request.query (after "?", without it), request.headers.<name>, request.id,
request.time, response.code, response.headers.<name>, source.address,
source.port, destination.address, destination.port, connection.id; on a TLS
connection also connection.mtls (one byte), connection.requested_server_name,
connection.tls_version, connection.subject_peer_certificate,
connection.subject_local_certificate, connection.dns_san_peer_certificate,
connection.uri_san_peer_certificate and connection.sha256_peer_certificate_digest
(the stream info's `tls`, which speaks for the transport; absent on plain HTTP).
`request.*`/`response.*`/`source.*`/`destination.*`/`connection.*` are
NotFound in a root context; `response.*` before the response headers are known.

proxy_set_property stores any path in a scratch map and answers OK (the Rust
SDK accepts nothing else), like Envoy's filter state: per stream for an HTTP
context (shared by the filters of that request), per root context otherwise.
A set never changes a built-in attribute: reads of a built-in name keep
returning the attribute.
"""

from __future__ import annotations

import struct

from .abi import split_path

_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")


def _header(pairs, name: bytes) -> bytes | None:
    values = [value for key, value in pairs if key == name]
    return b",".join(values) if values else None


def _address(addr: tuple[str, int]) -> bytes:
    host, port = addr[0], addr[1]
    if ":" in host:
        return f"[{host}]:{port}".encode()
    return f"{host}:{port}".encode()


def _request(stream, attr: bytes) -> bytes | None:
    pairs = stream.request_headers
    if attr == b"path":
        return _header(pairs, b":path")
    if attr == b"url_path":
        path = _header(pairs, b":path")
        return None if path is None else path.split(b"?", 1)[0]
    if attr == b"query":
        path = _header(pairs, b":path")
        return None if path is None else (path.split(b"?", 1) + [b""])[1]
    if attr == b"host":
        return _header(pairs, b":authority")
    if attr == b"scheme":
        return _header(pairs, b":scheme") or stream.info.scheme.encode()
    if attr == b"method":
        return _header(pairs, b":method")
    if attr == b"protocol":
        return stream.info.protocol.encode()
    if attr == b"id":
        return stream.info.request_id.encode()
    if attr == b"time":
        return _I64.pack(int(stream.info.start_time * 1_000_000_000))
    return None


def _builtin(ctx, segments: tuple[bytes, ...]) -> bytes | None:
    head = segments[0]
    plugin = ctx.plugin
    if len(segments) == 1:
        if head == b"plugin_root_id":
            return plugin.root_id.encode()
        if head == b"plugin_name":
            return plugin.module.encode()
        if head == b"plugin_vm_id":
            return plugin.module.encode()
        return None
    stream = ctx.stream
    if stream is None:
        return None
    info = stream.info
    if len(segments) == 3 and segments[1] == b"headers":
        name = segments[2].lower()
        if head == b"request":
            return _header(stream.request_headers, name) if stream.request_seen else None
        if head == b"response":
            return _header(stream.response_map, name) if stream.response_map is not None else None
        return None
    if len(segments) != 2:
        return None
    attr = segments[1]
    if head == b"request":
        return _request(stream, attr) if stream.request_seen else None
    if head == b"response":
        if attr == b"code":
            code = info.response_code
            if stream.response_map is not None:
                raw = _header(stream.response_map, b":status") or b""
                code = int(raw) if raw.isdigit() else stream.status
            return _I64.pack(code) if code else None
        return None
    if head == b"source" or head == b"destination":
        addr = info.source if head == b"source" else info.destination
        if attr == b"address":
            return _address(addr)
        if attr == b"port":
            return _I64.pack(addr[1])
        return None
    if head == b"upstream" and attr == b"tls_version":
        return getattr(info, "upstream_tls_version", "").encode() or None
    if head == b"connection":
        if attr == b"id":
            return _U64.pack(info.connection_id)
        return _connection_tls(getattr(info, "tls", None), attr)
    return None


def _first(values: list[str]) -> bytes | None:
    return values[0].encode() if values else None


# connection.<attr> of a TLS connection, as Envoy names and encodes them (strings raw, bools one byte)
_TLS = {
    b"requested_server_name": lambda tls: tls.server_name.encode(),
    b"tls_version": lambda tls: tls.version.encode(),
    b"subject_peer_certificate": lambda tls: tls.peer_subject.encode() or None,
    b"subject_local_certificate": lambda tls: tls.local_subject.encode() or None,
    b"dns_san_peer_certificate": lambda tls: _first(tls.peer_sans("DNS")),
    b"uri_san_peer_certificate": lambda tls: _first(tls.peer_sans("URI")),
    b"sha256_peer_certificate_digest": lambda tls: tls.peer_digest("sha256").encode() or None,
}


def _connection_tls(tls, attr: bytes) -> bytes | None:
    if attr == b"mtls":
        return b"\x01" if tls is not None and tls.peer_certificate_der() else b"\x00"
    read = _TLS.get(attr)
    if read is None or tls is None:
        return None
    return read(tls)


def _scratch(ctx) -> dict:
    return ctx.stream.properties if ctx.stream is not None else ctx.root.properties


def get(ctx, raw_path: bytes) -> bytes | None:
    """The value at `raw_path` for the context `ctx`, or None (NotFound)."""
    if ctx is None:
        return None
    segments = split_path(raw_path)
    if not segments:
        return None
    value = _builtin(ctx, segments)
    if value is None:
        value = _scratch(ctx).get(segments)
    return value


def put(ctx, raw_path: bytes, value: bytes) -> None:
    _scratch(ctx)[split_path(raw_path)] = value
