"""The h11 internals the gateway relies on: if an h11 release changes them, these fail first.

- `h11.Response(..., _parsed=True)` skips re-validating a head we built or h11
  parsed already (the hot path of every response);
- `Connection._writer` tells whether a body goes out chunked, the only framing
  that carries trailers (messages.sends_chunked).
"""

from __future__ import annotations

import h11
import pytest

from forkgw.http.messages import end_of_message, header_list, sends_chunked


def server_after(request_version: bytes, response_headers) -> h11.Connection:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/" + request_version + b"\r\nHost: a\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    conn.send(h11.Response(status_code=200, headers=response_headers))
    return conn


def test_trailers_only_where_the_body_goes_out_chunked():
    chunked = server_after(b"1.1", [])
    assert sends_chunked(chunked)
    assert chunked.send(end_of_message(chunked, [(b"x-sum", b"1")])) == b"0\r\nx-sum: 1\r\n\r\n"
    fixed = server_after(b"1.1", [(b"content-length", b"0")])
    assert not sends_chunked(fixed)
    assert fixed.send(end_of_message(fixed, [(b"x-sum", b"1")])) == b""  # dropped, not an error
    closing = server_after(b"1.0", [])
    assert not sends_chunked(closing)
    with pytest.raises(h11.LocalProtocolError):  # why the check exists: h11 refuses them there
        server_after(b"1.0", []).send(h11.EndOfMessage(headers=[(b"x-sum", b"1")]))


def test_a_trusted_head_skips_validation():
    headers = [(b"x-odd", b" leading space"), (b"content-length", b"0")]  # h11 refuses this value
    with pytest.raises(h11.LocalProtocolError):
        h11.Response(status_code=200, headers=headers, reason=b"OK")
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    conn.next_event()
    data = conn.send(h11.Response(status_code=200, headers=headers, reason=b"OK", _parsed=True))
    assert b"x-odd:  leading space\r\n" in data


def test_parsed_fields_in_one_pass():
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX-Two: 2\r\nx-two: 3\r\n\r\n")
    request = conn.next_event()
    assert header_list(request.headers) == list(request.headers) == [(b"host", b"a"), (b"x-two", b"2"), (b"x-two", b"3")]
