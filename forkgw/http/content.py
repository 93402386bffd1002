"""The content phase: what answers a routed request: `return`, `/metrics`, or `proxy_pass`.

As in nginx, one location has one content handler.  `return` is answered
here from its templates (a redirect gets an absolute Location and nginx's
page); `proxy_pass` builds the upstream request (proxy_set_header first, then
the client's end-to-end headers) and hands it to a ProxyRequest.  The
response, whoever makes it, is written by the connection's `Response`.
"""

from __future__ import annotations

import h11

from forkgw.http.messages import REDIRECTS, TEXT_HTML, error_page
from forkgw.http.proxy import ProxyRequest
from forkgw.routing import proxy_uri



def dispatch(conn, location, request: h11.Request, headers, host: bytes, has_body: bool,
             body: bytes | None = None, trailers=()) -> None:
    if location.ret is not None:
        respond_return(conn, location.ret)
    elif location.metrics and conn.server.metrics is not None:
        conn.response.respond(200, [(b"Content-Type", b"text/plain; version=0.0.4")],
                              conn.server.metrics.render())
    elif location.proxy_pass is not None:
        start_proxy(conn, location, request, headers, has_body)
        if body is not None and conn.proxy is not None:
            conn.proxy.body_data(body)
            conn.proxy.body_end(trailers)
    else:
        conn.response.error(404)


def respond_return(conn, ret) -> None:
    status, text = ret
    server, state = conn.server, conn.state
    if status in REDIRECTS or (text is None and status >= 300 and status != 304):
        headers = [TEXT_HTML]
        if text is not None:
            headers.append((b"Location", server.absolute_url(text, state)))
        conn.response.respond(status, headers, error_page(status, conn.settings.server_tokens))
        return
    body = server.render_return(text, state) if text else b""
    conn.response.respond(status, [(b"Content-Type", b"text/plain")] if text else [], body)


def start_proxy(conn, location, request: h11.Request, headers, has_body: bool) -> None:
    server, state = conn.server, conn.state
    upstream = server.upstreams[location.proxy_pass.upstream]
    state.proxy_host = location.proxy_pass.upstream
    target = proxy_uri(location, location.proxy_pass, state.path, request.target.decode("latin-1"))
    outgoing = server.plan(location.settings).upstream_headers(state, headers)
    # proxy_uri keeps the raw target (latin-1 round-trips its bytes) or escapes to ASCII.
    # The client's method and fields (parsed by h11) and proxy_set_header values (escaped
    # when rendered) skip h11's re-validation, unless a filter rewrote the request.
    trusted = conn.stream is None or not conn.stream.request_changed()
    upstream_request = h11.Request(method=request.method, target=target.encode("latin-1"),
                                   headers=outgoing, _parsed=trusted)
    if has_body and conn.h11.they_are_waiting_for_100_continue:
        conn.out += conn.h11.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        conn.flush()
    conn.proxy = ProxyRequest(conn, server, upstream, request=upstream_request,
                              settings=location.settings, has_body=has_body, tls=location.proxy_pass.tls)
    conn.proxy.start()
    conn.proxy_started()
