"""The phases of a filter chain: the callbacks that make them, and what a phase answers.

The stream (filter.py) and its body phases (bodies.py) both speak this
vocabulary; the worker gets it through filter.py.  A phase answers None or
the data to pass on (go on), a `LocalReply` (the filters answered the
request), or `PAUSED` (a filter holds the stream for a callout: the worker
waits, and the stream calls `on_resume(the phase's result)` from the loop).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LocalReply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


PAUSED = object()

ON_REQUEST_HEADERS = "proxy_on_request_headers"
ON_RESPONSE_HEADERS = "proxy_on_response_headers"
ON_REQUEST_BODY = "proxy_on_request_body"
ON_RESPONSE_BODY = "proxy_on_response_body"
ON_REQUEST_TRAILERS = "proxy_on_request_trailers"
ON_RESPONSE_TRAILERS = "proxy_on_response_trailers"

# The phases a callout can hold, and the direction proxy_continue_stream names to resume each.
DIRECTION = {ON_REQUEST_HEADERS: 0, ON_REQUEST_BODY: 0, ON_RESPONSE_HEADERS: 1, ON_RESPONSE_BODY: 1}
