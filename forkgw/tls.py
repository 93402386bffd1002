"""TLS contexts of the conf's servers, built by the master before it forks.

Why here and then: keys are read while the master may still be root (the
workers may run as `user`), a bad certificate or a key that does not match
it is a conf error (`-t` and reload name the file and the conf's file:line,
and on reload the old generation serves on), and every worker of a
generation inherits the same contexts, so the session-ticket keys OpenSSL
made with each context are the same in every worker: a session made on one
worker resumes on another.

One context per server on a TLS address.  Its certificates are the server's
`ssl_certificate` / `ssl_certificate_key` pairs (an ECDSA and an RSA one may
sit side by side: OpenSSL picks what the client can use); its SNI callback
(net.tls.sni_callback) lets the handshake switch to the context of the
server the client named.
"""

from __future__ import annotations

import ssl

from forkgw.conf.model import Config, Server, Settings, walk_locations
from forkgw.conf.values import split_host_port
from forkgw.errors import ConfError
from forkgw.net.tls import rfc2253, sni_callback

VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
VERIFY = {"on": ssl.CERT_OPTIONAL, "optional": ssl.CERT_OPTIONAL, "off": ssl.CERT_NONE}


def build(config: Config) -> None:
    """Every context the conf asks for, or ConfError: each server on a TLS address
    (Server.ssl_context) and each `proxy_pass https://` (ProxyPass.tls).  The context of
    filters' callouts to https targets is made by the worker on first use (callout_context):
    made here, it would parse the system's CA bundle at every load, used or not."""
    if config.http is None:
        return
    clients: dict[tuple, ssl.SSLContext] = {}  # locations with the same proxy_ssl_* share one
    for server in config.http.servers:
        tls_listens = [listen for listen in server.listens if listen.ssl]
        if tls_listens:
            server.ssl_context = server_context(server, tls_listens[0].where)
        for location in walk_locations(server.locations):
            proxy = location.proxy_pass
            if proxy is not None and proxy.scheme == "https":
                s = location.settings
                context = client_context(s, clients, location.where)
                split = split_host_port(proxy.upstream)
                name = s.proxy_ssl_name or (split[0] if split else proxy.upstream)
                proxy.tls = (context, name if s.proxy_ssl_verify or s.proxy_ssl_server_name else None)


def client_context(s: Settings, cache: dict, where: str) -> ssl.SSLContext:
    """A context to speak TLS to upstreams with; one per distinct set of proxy_ssl_* values."""
    key = (s.proxy_ssl_verify, s.proxy_ssl_trusted_certificate, s.proxy_ssl_protocols, s.proxy_ssl_ciphers,
           s.proxy_ssl_certificate, s.proxy_ssl_certificate_key)
    context = cache.get(key)
    if context is not None:
        return context
    context = cache[key] = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    versions = sorted(VERSIONS[name] for name in s.proxy_ssl_protocols)
    context.minimum_version, context.maximum_version = versions[0], versions[-1]
    try:
        context.set_ciphers(s.proxy_ssl_ciphers)
    except ssl.SSLError as err:
        raise ConfError(f'SSL_CTX_set_cipher_list("{s.proxy_ssl_ciphers}") failed ({err.reason or err})',
                        where) from None
    if s.proxy_ssl_verify:
        load_trust(context, s.proxy_ssl_trusted_certificate)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if s.proxy_ssl_certificate is not None:
        if s.proxy_ssl_certificate_key is None:
            path, cert_where = s.proxy_ssl_certificate
            raise ConfError(f'no "proxy_ssl_certificate_key" is defined for certificate "{path}"', cert_where)
        load_pair(context, s.proxy_ssl_certificate[0], s.proxy_ssl_certificate_key[0],
                  s.proxy_ssl_certificate[1], [])
    context.set_alpn_protocols(["http/1.1"])
    return context


def load_trust(context: ssl.SSLContext, file: tuple[str, str] | None) -> None:
    if file is None:
        context.load_default_certs()
        return
    path, where = file
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as err:
        raise ConfError(f'cannot load CA certificates "{path}" ({err})', where) from None


def server_context(server: Server, listen_where: str) -> ssl.SSLContext:
    s = server.settings
    if not s.ssl_certificate:
        raise ConfError('no "ssl_certificate" is defined for the listen ... ssl directive', listen_where)
    keys, certs = len(s.ssl_certificate_key), len(s.ssl_certificate)
    if keys < certs:
        path, where = s.ssl_certificate[keys]
        raise ConfError(f'no "ssl_certificate_key" is defined for certificate "{path}"', where)
    if keys > certs:
        path, where = s.ssl_certificate_key[certs]
        raise ConfError(f'no "ssl_certificate" is defined for key "{path}"', where)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    set_protocols(context, s)
    try:
        context.set_ciphers(s.ssl_ciphers)
    except ssl.SSLError as err:
        raise ConfError(f'SSL_CTX_set_cipher_list("{s.ssl_ciphers}") failed ({err.reason or err})',
                        server.where) from None
    if s.ssl_prefer_server_ciphers:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:  # Python's server contexts prefer their own order unless told not to; nginx's default is off
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if not s.ssl_session_tickets:
        context.options |= ssl.OP_NO_TICKET
    context.options |= ssl.OP_NO_RENEGOTIATION
    passwords = read_passwords(s.ssl_password_file)
    for (cert, cert_where), (key, _) in zip(s.ssl_certificate, s.ssl_certificate_key):
        load_pair(context, cert, key, cert_where, passwords)
    context.subject = certificate_subject(s.ssl_certificate[0][0])  # connection.subject_local_certificate
    set_client_verification(context, s, server.where)
    context.set_alpn_protocols(["http/1.1"])
    context.sni_callback = sni_callback
    return context


def set_protocols(context: ssl.SSLContext, s: Settings) -> None:
    versions = sorted(VERSIONS[name] for name in s.ssl_protocols)
    context.minimum_version, context.maximum_version = versions[0], versions[-1]
    if ssl.TLSVersion.TLSv1 in versions or ssl.TLSVersion.TLSv1_1 in versions:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses them at its default level
    holes = {"TLSv1.1": ssl.OP_NO_TLSv1_1, "TLSv1.2": ssl.OP_NO_TLSv1_2}
    for name, option in holes.items():  # a listed range with a gap: "TLSv1 TLSv1.3"
        if versions[0] < VERSIONS[name] < versions[-1] and name not in s.ssl_protocols:
            context.options |= option


def read_passwords(file: tuple[str, str] | None) -> list[str]:
    if file is None:
        return []
    path, where = file
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    except OSError as err:
        raise ConfError(f'open() "{path}" failed ({err.errno}: {err.strerror})', where) from None


def load_pair(context: ssl.SSLContext, cert: str, key: str, where: str, passwords: list[str]) -> None:
    """One certificate and its key; with a password file, each pass phrase is tried in turn."""
    error = None
    for password in passwords or [None]:
        try:
            context.load_cert_chain(cert, key, password=password)
            return
        except OSError as err:
            if not isinstance(err, ssl.SSLError):
                raise ConfError(f'cannot load certificate "{cert}": ({err.errno}: {err.strerror})', where) from None
            error = err
    reason = error.reason or str(error)
    if reason in ("KEY_VALUES_MISMATCH", "key values mismatch"):
        raise ConfError(f'SSL_CTX_use_PrivateKey("{key}") failed (key values mismatch with "{cert}")', where)
    raise ConfError(f'cannot load certificate "{cert}" with key "{key}" ({reason})', where)


def certificate_subject(path: str) -> str:
    """The subject of a PEM certificate, RFC 2253; "" if this Python cannot decode it.

    The ssl module decodes certificates only through a test helper of its C part; it has
    been there since Python 3.2, and a Python without it loses this one property only.
    """
    decode = getattr(ssl._ssl, "_test_decode_cert", None)
    try:
        return rfc2253(decode(path).get("subject", ())) if decode else ""
    except (OSError, ssl.SSLError, ValueError):
        return ""


def set_client_verification(context: ssl.SSLContext, s: Settings, where: str) -> None:
    """ssl_verify_client: asked for in the handshake; `on` is enforced per request (400), as nginx does."""
    if s.ssl_verify_client == "off":
        return
    cas = [f for f in (s.ssl_client_certificate, s.ssl_trusted_certificate) if f is not None]
    if not cas:
        raise ConfError('no ssl_client_certificate for ssl_verify_client', where)
    for file in cas:
        load_trust(context, file)
    context.verify_mode = VERIFY[s.ssl_verify_client]
