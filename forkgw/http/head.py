"""A request head, from h11's event to the phase that answers it.

The order is nginx's: the head is admitted (framing, version, Host), the
server block is chosen by Host and bounds the head's size, the path is
normalized, then the location is found and checks the announced body size.
A location with filters hands the request to `RequestFilters`; one without
goes straight to the content phase.  Each refusal is an answer made on the
spot (with `Connection: close` where the rest of the stream cannot be
trusted), never an exception.
"""

from __future__ import annotations

import h11

from forkgw.http import admission, content
from forkgw.http.messages import TEXT_HTML, error_page
from forkgw.http.request_filters import RequestFilters
from forkgw.routing import normalize_path



def start(conn, request: h11.Request) -> None:
    state = conn.state
    framing = admission.framing(state.headers)
    refused = admission.refuse_framing(request, framing)
    if refused:
        conn.refuse(refused)
        return
    host = framing.host
    state.host = host.decode("latin-1").split(":", 1)[0].lower() if host else conn.server_addr
    conn.request_has_body(framing.has_body)
    router = conn.server.router
    server = router.server_for(conn.listen_key, state.host)
    conn.settings = server.settings
    if conn.requests >= server.settings.keepalive_requests or conn.server.draining:
        conn.keepalive = False
    refused = admission.refuse_size(request, state.headers, server.settings, conn.last_read)
    if refused:
        conn.refuse(refused)
        return
    tls_refusal = refuse_tls(conn, server.settings)
    if tls_refusal:
        conn.keepalive = False
        conn.response.respond(400, [TEXT_HTML], error_page(400, server.settings.server_tokens, tls_refusal))
        return
    normalized = normalize_path(request.target)
    if normalized is None:
        conn.response.error(400)
        return
    state.path, state.query = normalized
    if server.ret is not None:
        content.respond_return(conn, server.ret)
        return
    location = router.location_for(server, state.path)
    if location is None:
        conn.response.error(404)
        return
    routed(conn, location, request, framing)


def refuse_tls(conn, settings) -> str:
    """nginx's two TLS 400s, decided once the server is known: why, or "" to go on."""
    if conn.plain_on_tls:
        return "The plain HTTP request was sent to HTTPS port"
    if conn.tls is not None and settings.ssl_verify_client == "on" and not conn.tls.peer_certificate_der():
        return "No required SSL certificate was sent"
    return ""


def routed(conn, location, request: h11.Request, framing: admission.Framing) -> None:
    """The location is known: its body limit, then its filters or its content handler."""
    state = conn.state
    settings = conn.settings = location.settings
    limit = settings.client_max_body_size
    if limit and framing.length is not None and framing.length > limit:
        conn.server.log.error(f"client intended to send too large body: {framing.length} bytes, "
                              f"client: {conn.remote_addr}, request: \"{state.method} {state.target}\"")
        conn.refuse(413)
        return
    if not settings.filters:
        content.dispatch(conn, location, request, state.headers, framing.host, framing.has_body)
        return
    conn.stream = conn.server.stream(settings.filters, conn, state)
    RequestFilters(conn, conn.stream, location, request, framing.host, framing.has_body).start(state.headers)
