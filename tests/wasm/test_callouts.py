"""HTTP callouts, paused requests and ticks, in process: a real Runtime, a dispatcher standing in for the loop.

`Loop.dispatcher` records each call the way forkgw/http/callout_transport.py's dispatch
would start it; a test then answers it (`answer`), as the worker's loop does
later, outside any guest call.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from forkgw.conf.model import FilterRef
from forkgw.http.callout_transport import CalloutResult
from forkgw.wasm import PAUSED, LocalReply
from forkgw.wasm.abi import Status

from .conftest import REQUEST, RESPONSE, Wat, info, pairs_bytes

RET = "(i32.const 16) (i32.const 20)"
CALL = [(b":method", b"GET"), (b":path", b"/check"), (b":authority", b"auth.local"), (b"x-from", b"filter")]
OK_ANSWER = CalloutResult(200, [(b"content-type", b"text/plain"), (b"x-auth", b"yes")], b"granted")


class Loop:
    """The worker's side of proxy_http_call: known targets, calls started, answers given later."""

    def __init__(self, known=("auth",), fail_at_once=False):
        self.known = known
        self.fail_at_once = fail_at_once
        self.calls: list[SimpleNamespace] = []

    def dispatcher(self, target, headers, body, timeout, on_done):
        if target not in self.known:
            return False
        call = SimpleNamespace(target=target, headers=headers, body=body, timeout=timeout, on_done=on_done)
        self.calls.append(call)
        if self.fail_at_once:  # a refused connect, reported before dispatch() returns
            on_done(None)
        return True

    def answer(self, index=0, result=OK_ANSWER):
        self.calls[index].on_done(result)


def dispatch(w: Wat, tag="dispatch", target="auth", headers=CALL, body="", timeout=1500, name="proxy_http_call") -> str:
    """Dispatch a call; log its status as `tag`, keep the token at 0x30 (and log it)."""
    return (f"(call $log_num {w.s(tag)} (call ${name} {w.s(target)} {w.s(pairs_bytes(headers))} {w.s(body)}"
            f" (i32.const 0) (i32.const 0) (i32.const {timeout}) (i32.const 48)))"
            f" (call $log_num {w.s('token')} (i32.load (i32.const 48)))")


def answer_cb(w: Wat, then: str) -> str:
    """proxy_on_http_call_response: log what the host gives, switch to the HTTP context, run `then`."""
    return f"""
  (func (export "proxy_on_http_call_response") (param $root i32) (param $token i32) (param $nh i32) (param $nb i32) (param $nt i32)
    (call $log_num {w.s('answer_root')} (local.get $root))
    (call $log_num {w.s('answer_token')} (local.get $token))
    (call $log_num {w.s('answer_headers')} (local.get $nh))
    (call $log_num {w.s('answer_body')} (local.get $nb))
    (call $log_num {w.s('answer_trailers')} (local.get $nt))
    (if (i32.eqz (call $proxy_get_header_map_value (i32.const 6) {w.s(':status')} {RET}))
      (then (call $log_ret {w.s('status')})))
    (if (i32.eqz (call $proxy_get_header_map_value (i32.const 6) {w.s('x-auth')} {RET}))
      (then (call $log_ret {w.s('x-auth')})))
    (call $log_num {w.s('pairs')} (call $proxy_get_header_map_pairs (i32.const 6) {RET}))
    (call $log_num {w.s('pairs_size')} (i32.load (i32.const 20)))
    (call $log_num {w.s('get_body')} (call $proxy_get_buffer_bytes (i32.const 4) (i32.const 0) (local.get $nb) {RET}))
    (call $log_ret {w.s('body')})
    (drop (call $proxy_get_status (i32.const 24) {RET}))
    (call $log_num {w.s('get_status')} (i32.load (i32.const 24)))
    (call $log_num {w.s('effective')} (call $proxy_set_effective_context (global.get $http)))
    {then})"""


def auth(w: Wat, then: str, pause: int = 1, before: str = "") -> str:
    """Request headers: dispatch, remember the HTTP context, return `pause`; the answer runs `then`."""
    return f"""
  (global $http (mut i32) (i32.const 0))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (global.set $http (local.get $ctx))
    {before}
    {dispatch(w)}
    (i32.const {pause}))
{answer_cb(w, then)}"""


def continue_(w: Wat) -> str:
    return f"(call $log_num {w.s('continue')} (call $proxy_continue_stream (i32.const 0)))"


def reply(w: Wat, status=403, body="denied") -> str:
    return (f"(call $log_num {w.s('reply')} (call $proxy_send_local_response (i32.const {status}) {w.s('auth')}"
            f" {w.s(body)} {w.s(pairs_bytes([(b'x-denied', b'1')]))} (i32.const -1)))")


def runtime(h, modules, loop: Loop, filters=None, **kw):
    return h.runtime(modules, filters=filters, http_dispatcher=loop.dispatcher, **kw)


def marker(export: str, map_type: int) -> bytes:
    """A filter that adds x-after: yes to `map_type` in its headers callback: shows the chain went on."""
    w = Wat()
    add = f"(drop (call $proxy_add_header_map_value (i32.const {map_type}) {w.s('x-after')} {w.s('yes')})) (i32.const 0)"
    return w.build(f'  (func (export "{export}") (param i32 i32 i32) (result i32) {add})')


class Resumed:
    def __init__(self, stream):
        self.calls = []
        stream.on_resume = self.calls.append


def paused_stream(rt, filters=None):
    stream = rt.stream(filters if filters is not None else rt.filters, info())
    assert stream.on_request_headers(list(REQUEST), True) is PAUSED
    return stream, Resumed(stream)


# -- dispatch --------------------------------------------------------------------------


def test_dispatch_arguments_and_statuses(h):
    w = Wat()
    missing = [pair for pair in CALL if pair[0] != b":authority"]
    code = " ".join([
        dispatch(w, "ok", body="payload", timeout=250),
        dispatch(w, "alias", name="proxy_dispatch_http_call"),
        dispatch(w, "unknown", target="nowhere"),
        dispatch(w, "no_authority", headers=missing),
        dispatch(w, "no_method", headers=[p for p in CALL if p[0] != b":method"]),
        dispatch(w, "no_path", headers=[p for p in CALL if p[0] != b":path"]),
        dispatch(w, "bad_value", headers=CALL + [(b"x-bad", b"a\r\nb")]),
        f"(call $log_num {w.s('bad_pairs')} (call $proxy_http_call {w.s('auth')} {w.s(b'garbage')} (i32.const 0) (i32.const 0)"
        " (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 48)))",
        f"(call $log_num {w.s('oob_token')} (call $proxy_http_call {w.s('auth')} {w.s(pairs_bytes(CALL))} (i32.const 0) (i32.const 0)"
        " (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const -4)))",
        f"(call $log_num {w.s('oob_headers')} (call $proxy_http_call {w.s('auth')} (i32.const -16) (i32.const 8) (i32.const 0) (i32.const 0)"
        " (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 48)))",
    ])
    imports = '(import "env" "proxy_dispatch_http_call" (func $proxy_dispatch_http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))'
    text = w.text(f'  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {code} (i32.const 0))')
    text = text.replace("(module", "(module\n  " + imports, 1)
    import wasmtime

    loop = Loop()
    rt = runtime(h, wasmtime.wat2wasm(text), loop)
    stream = rt.stream(rt.filters, info())
    assert stream.on_request_headers(list(REQUEST), True) is None  # Continue: nothing paused
    lines = h.guest_lines()
    for item in ["ok=0", "alias=0", "unknown=2", "no_authority=2", "no_method=2", "no_path=2", "bad_value=2",
                 "bad_pairs=2", "oob_token=6", "oob_headers=6"]:
        assert item in lines, (item, lines)
    tokens = [int(x.split("=")[1]) for x in lines if x.startswith("token=")]
    assert tokens[:2] == [1, 2] and tokens[2:] == [0] * (len(tokens) - 2)  # 0 written first, as cpp-host
    first = loop.calls[0]
    assert (first.target, first.body, first.timeout) == ("auth", b"payload", 0.25)
    assert first.headers == CALL
    assert len(loop.calls) == 2
    assert 'proxy_http_call: unknown upstream "nowhere"' in h.log()
    stream.finish()


def test_tokens_are_unique_and_skip_calls_in_flight(h):
    loop = Loop()
    w = Wat()
    rt = runtime(h, w.build(auth(w, continue_(w), pause=0)), loop)
    http_calls = rt.http_calls
    http_calls.next_token = 0xFFFFFFFF
    streams = [rt.stream(rt.filters, info()) for _ in range(3)]
    for s in streams:
        assert s.on_request_headers(list(REQUEST), True) is None
    assert sorted(http_calls.inflight) == [1, 2, 0xFFFFFFFF]
    loop.answer(1)  # token 1 is free again, 2 and 0xFFFFFFFF are not
    http_calls.next_token = 0xFFFFFFFF
    s = rt.stream(rt.filters, info())
    s.on_request_headers(list(REQUEST), True)
    assert sorted(http_calls.inflight) == [1, 2, 0xFFFFFFFF]
    assert http_calls.next_token == 2
    for stream in streams + [s]:
        stream.finish()


def test_without_a_dispatcher_http_call_answers_internal_failure(h):
    w = Wat()
    rt = h.runtime(w.build(auth(w, "")))
    stream = rt.stream(rt.filters, info())
    assert stream.on_request_headers(list(REQUEST), True) is None  # nothing in flight: pause ignored
    assert f"dispatch={int(Status.INTERNAL_FAILURE)}" in h.guest_lines()
    stream.finish()


# -- pause and resume ---------------------------------------------------------------------


def test_continue_from_the_callback_resumes_with_the_rest_of_the_chain(h):
    loop = Loop()
    w = Wat()
    later = marker("proxy_on_request_headers", 0)
    rt = runtime(h, {"auth": w.build(auth(w, continue_(w) + " " + f"(drop (call $proxy_add_header_map_value (i32.const 0) {w.s('x-auth')} {w.s('ok')}))")),
                     "after": later}, loop)
    stream, resumed = paused_stream(rt)
    assert resumed.calls == [] and not any("x-after" in n.decode() for n, _ in stream.request_headers)
    assert not any(x.startswith("answer") for x in h.guest_lines())
    loop.answer()
    assert resumed.calls == [None]
    assert (b"x-auth", b"ok") in stream.request_headers and (b"x-after", b"yes") in stream.request_headers
    assert [n for n, _ in stream.request_headers[:4]] == [b":method", b":path", b":authority", b":scheme"]
    lines = h.guest_lines()
    for item in ["answer_root=1", "answer_token=1", "answer_headers=3", "answer_body=7", "answer_trailers=0",
                 "status:200", "x-auth:yes", "pairs=0", "get_body=0", "body:granted", "get_status=200",
                 "effective=0", "continue=0"]:
        assert item in lines, (item, lines)
    assert stream.on_response_headers(200, list(RESPONSE), False) is None
    stream.finish()
    assert rt.http_calls.inflight == {}


def test_the_answer_stays_readable_after_switching_to_the_http_context(h):
    """What the callback may read is the callback's: the SDKs switch context before the filter reads the answer."""
    loop = Loop()
    w = Wat()
    after = " ".join([
        f"(call $log_num {w.s('again_header')} (call $proxy_get_header_map_value (i32.const 6) {w.s('x-auth')} {RET}))",
        f"(call $log_ret {w.s('again_x-auth')})",
        f"(call $log_num {w.s('again_body')} (call $proxy_get_buffer_bytes (i32.const 4) (i32.const 0) (i32.const 64) {RET}))",
        f"(call $log_ret {w.s('again_body')})",
        f"(drop (call $proxy_get_status (i32.const 24) {RET}))",
        f"(call $log_num {w.s('again_status')} (i32.load (i32.const 24)))",
        f"(call $log_num {w.s('path')} (call $proxy_get_header_map_value (i32.const 0) {w.s(':path')} {RET}))",
        f"(call $log_ret {w.s('path')})",
        f"(call $log_num {w.s('edit_answer')} (call $proxy_set_buffer_bytes (i32.const 4) (i32.const 0) (i32.const 0) {w.s('x')}))",
        continue_(w),
    ])
    rt = runtime(h, w.build(auth(w, after)), loop)
    stream, resumed = paused_stream(rt)
    loop.answer()
    assert resumed.calls == [None]
    lines = h.guest_lines()
    for item in ["effective=0", "again_header=0", "again_x-auth:yes", "again_body=0", "again_body:granted",
                 "again_status=200", "path=0", "path:/a/b?x=1&y=2", "edit_answer=2", "continue=0"]:
        assert item in lines, (item, lines)
    stream.finish()
    # and nothing of it outlives the callback: the next callback of the same context reads none of it
    w2 = Wat()
    probe = " ".join([
        f"(call $log_num {w2.s('later_header')} (call $proxy_get_header_map_value (i32.const 6) {w2.s('x-auth')} {RET}))",
        f"(call $log_num {w2.s('later_body')} (call $proxy_get_buffer_status (i32.const 4) (i32.const 24) (i32.const 28)))",
        f"(drop (call $proxy_get_status (i32.const 24) {RET}))",
        f"(call $log_num {w2.s('later_status')} (i32.load (i32.const 24)))",
    ])
    loop2 = Loop()
    rt2 = runtime(h, w2.build(auth(w2, continue_(w2))
                              + f'  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) {probe} (i32.const 0))'),
                  loop2)
    stream, resumed = paused_stream(rt2)
    loop2.answer()
    assert stream.on_response_headers(200, list(RESPONSE), False) is None
    stream.finish()
    assert {"later_header=2", "later_body=1", "later_status=0"} <= set(h.guest_lines())


def test_local_response_from_the_callback(h):
    loop = Loop()
    w = Wat()
    rt = runtime(h, {"auth": w.build(auth(w, reply(w))), "after": Wat().build()}, loop)
    stream, resumed = paused_stream(rt)
    loop.answer(result=CalloutResult(401, [], b""))
    [got] = resumed.calls
    assert isinstance(got, LocalReply) and (got.status, got.body, got.headers) == (403, b"denied", [(b"x-denied", b"1")])
    assert not any(m.startswith('*42 wasm "after" root_id "after": request_headers') for m in h.messages())
    stream.finish()


def test_close_stream_from_the_callback(h):
    loop = Loop()
    w = Wat()
    rt = runtime(h, w.build(auth(w, f"(call $log_num {w.s('close')} (call $proxy_close_stream (i32.const 0)))")), loop)
    stream, resumed = paused_stream(rt)
    loop.answer()
    [got] = resumed.calls
    assert isinstance(got, LocalReply) and got.status == 502 and (b"connection", b"close") in got.headers
    stream.finish()


def test_neither_continued_nor_answered_resumes_after_the_last_call(h):
    loop = Loop()
    w = Wat()
    two = auth(w, "", before=dispatch(w, "first"))
    rt = runtime(h, w.build(two), loop)
    stream, resumed = paused_stream(rt)
    loop.answer(0)
    assert resumed.calls == []  # a second call is still in flight
    loop.answer(1)
    assert resumed.calls == [None]
    warnings = [m for m in h.messages("warn") if "neither resumed" in m]
    assert warnings == ['*42 wasm "f" root_id "f": neither resumed nor answered the request after its last '
                        "http callout: resuming it"]
    stream.finish()


def test_failed_call_gives_counts_zero_and_status_zero(h):
    loop = Loop()
    w = Wat()
    rt = runtime(h, w.build(auth(w, "(if (i32.eqz (local.get $nh)) (then " + reply(w, 503, "auth down") + "))")), loop)
    stream, resumed = paused_stream(rt)
    loop.answer(result=None)
    assert resumed.calls[0].status == 503
    lines = h.guest_lines()
    for item in ["answer_headers=0", "answer_body=0", "answer_trailers=0", "pairs=0", "pairs_size=0",
                 "get_body=0", "body:", "get_status=0"]:
        assert item in lines, (item, lines)
    assert not any(x.startswith("status:") for x in lines)
    stream.finish()


def test_a_call_that_fails_at_once_is_answered_after_the_callback_returns(h):
    """Never re-entrant: the answer is delivered once proxy_on_request_headers returned."""
    loop = Loop(fail_at_once=True)
    w = Wat()
    rt = runtime(h, w.build(auth(w, "(if (i32.eqz (local.get $nh)) (then " + reply(w, 503, "auth down") + "))")), loop)
    stream = rt.stream(rt.filters, info())
    got = stream.on_request_headers(list(REQUEST), True)
    assert isinstance(got, LocalReply) and got.status == 503  # decided before the phase returned
    lines = h.guest_lines()
    assert lines.index("token=1") < lines.index("answer_token=1")
    stream.finish()
    # and a filter that continues instead: the phase returns None
    loop2 = Loop(fail_at_once=True)
    w2 = Wat()
    rt2 = runtime(h, w2.build(auth(w2, continue_(w2))), loop2)
    stream = rt2.stream(rt2.filters, info())
    assert stream.on_request_headers(list(REQUEST), True) is None
    stream.finish()


def test_next_filter_may_pause_again(h):
    loop = Loop()
    w1, w2 = Wat(), Wat()
    rt = runtime(h, {"a": w1.build(auth(w1, continue_(w1))), "b": w2.build(auth(w2, continue_(w2)))}, loop)
    stream, resumed = paused_stream(rt)
    loop.answer(0)
    assert resumed.calls == [] and len(loop.calls) == 2  # b dispatched and paused in turn
    loop.answer(1)
    assert resumed.calls == [None]
    stream.finish()


def test_answer_after_the_stream_finished_only_cleans_up(h):
    loop = Loop()
    w = Wat()
    rt = runtime(h, w.build(auth(w, continue_(w))), loop)
    stream, resumed = paused_stream(rt)
    stream.finish()  # client gone, or the worker's timeout
    assert "delete=2" in h.guest_lines()
    loop.answer()
    assert not any(x.startswith("answer") for x in h.guest_lines())
    assert resumed.calls == [] and rt.http_calls.inflight == {}
    stream2, resumed2 = paused_stream(rt)  # later requests are fine
    loop.answer(1)
    assert resumed2.calls == [None]
    stream2.finish()


def test_trap_in_the_callback(h):
    w = Wat()
    module = w.build(auth(w, "unreachable"))
    for on_error, expected in (("fail", 500), ("continue", None)):
        loop = Loop()
        rt = runtime(h, {"auth": module, "after": Wat().build()}, loop,
                     filters=[FilterRef(module="auth", on_error=on_error), FilterRef(module="after")])
        stream, resumed = paused_stream(rt)
        loop.answer()
        [got] = resumed.calls
        assert (got.status if got else None) == expected
        stream.finish()


def on_response(w: Wat, then: str = "", pause: int = 1) -> str:
    """Response headers: dispatch, remember the HTTP context, return `pause`; the answer runs `then`."""
    return f"""
  (global $http (mut i32) (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param i32 i32) (result i32)
    (global.set $http (local.get $ctx)) {dispatch(w)} (i32.const {pause}))
{answer_cb(w, then)}"""


def test_pause_in_response_headers_holds_the_head_until_continued(h):
    loop = Loop()
    w = Wat()
    later = marker("proxy_on_response_headers", 2)
    edit = (f"(drop (call $proxy_replace_header_map_value (i32.const 2) {w.s(':status')} {w.s('203')}))"
            f" (drop (call $proxy_add_header_map_value (i32.const 2) {w.s('x-checked')} {w.s('by-callout')}))"
            f" (call $log_num {w.s('continue')} (call $proxy_continue_stream (i32.const 1)))")
    rt = runtime(h, {"check": w.build(on_response(w, edit)), "after": later}, loop)
    stream = rt.stream(rt.filters, info())
    assert stream.on_request_headers(list(REQUEST), True) is None
    resumed = Resumed(stream)
    assert stream.on_response_headers(200, list(RESPONSE), False) is PAUSED
    assert resumed.calls == [] and stream.status == 200
    loop.answer()
    assert resumed.calls == [None]
    assert stream.status == 203
    assert (b"x-checked", b"by-callout") in stream.response_headers
    assert (b"x-after", b"yes") in stream.response_headers  # the rest of the chain ran after the resume
    assert not any(n.startswith(b":") for n, _ in stream.response_headers)
    stream.finish()
    assert not any("pause" in m for m in h.messages("warn"))


def test_continuing_the_wrong_direction_does_not_resume_a_response(h):
    loop = Loop()
    w = Wat()
    rt = runtime(h, w.build(on_response(w, continue_(w))), loop)  # proxy_continue_stream(0)
    stream = rt.stream(rt.filters, info())
    assert stream.on_request_headers(list(REQUEST), True) is None
    resumed = Resumed(stream)
    assert stream.on_response_headers(200, list(RESPONSE), False) is PAUSED
    loop.answer()
    assert resumed.calls == [None]  # resumed by Kong's rule, not by the request's continue
    assert any("neither resumed nor answered" in m for m in h.messages("warn"))
    stream.finish()


def test_local_response_while_the_response_head_is_held(h):
    loop = Loop()
    w = Wat()
    rt = runtime(h, w.build(on_response(w, reply(w, 502, "bad upstream answer"))), loop)
    stream = rt.stream(rt.filters, info())
    assert stream.on_request_headers(list(REQUEST), True) is None
    resumed = Resumed(stream)
    assert stream.on_response_headers(200, list(RESPONSE), False) is PAUSED
    loop.answer()
    [got] = resumed.calls
    assert isinstance(got, LocalReply) and (got.status, got.body) == (502, b"bad upstream answer")
    stream.finish()


def test_pause_without_a_call_in_flight_continues(h):
    w = Wat()
    rt = h.runtime(w.build('  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 1))'))
    stream = rt.stream(rt.filters, info())
    assert stream.on_request_headers(list(REQUEST), True) is None
    assert stream.on_response_headers(200, list(RESPONSE), False) is None
    assert any("proxy_on_response_headers returned 1 (pause), but nothing can resume" in m for m in h.messages("warn"))
    stream.finish()


def body_check(w: Wat, export: str, btype: int, then: str) -> str:
    """Buffer the body; at its end call out (body in the call) and pause; the answer runs `then`."""
    return f"""
  (global $http (mut i32) (i32.const 0))
  (func (export "{export}") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (global.set $http (local.get $ctx))
    (if (local.get $eos) (then {dispatch(w)}))
    (i32.const 1))
{answer_cb(w, then)}"""


def test_pause_at_the_end_of_a_body_waits_for_the_callout_which_may_edit_it(h):
    for export, btype, direction in (("proxy_on_request_body", 0, 0), ("proxy_on_response_body", 1, 1)):
        loop = Loop()
        w = Wat()
        edit = (f"(call $log_num {w.s('held')} (call $proxy_get_buffer_bytes (i32.const {btype}) (i32.const 0)"
                f" (i32.const 100) {RET})) (call $log_ret {w.s('held_body')})"
                f" (drop (call $proxy_set_buffer_bytes (i32.const {btype}) (i32.const -1) (i32.const 0) {w.s(' +checked')}))"
                f" (call $log_num {w.s('continue')} (call $proxy_continue_stream (i32.const {direction})))")
        rt = runtime(h, w.build(body_check(w, export, btype, edit)), loop)
        stream = rt.stream(rt.filters, info())
        assert stream.on_request_headers(list(REQUEST), False) is None
        feed = stream.on_request_body if btype == 0 else stream.on_response_body
        if btype == 1:
            assert stream.on_request_body(b"", True) == b""
            assert stream.on_response_headers(200, list(RESPONSE), False) is None
        resumed = Resumed(stream)
        assert feed(b"first ", False) == b""
        assert feed(b"second", True) is PAUSED
        assert len(loop.calls) == 1
        loop.answer()
        assert resumed.calls == [b"first second +checked"], (export, resumed.calls)
        lines = h.guest_lines()
        assert "held=0" in lines and "held_body:first second" in lines and "continue=0" in lines
        stream.finish()


def test_trailers_run_the_chain_over_maps_1_and_3(h):
    w = Wat()
    code = ""
    for export, map_type in (("proxy_on_request_trailers", 1), ("proxy_on_response_trailers", 3)):
        code += f"""
  (func (export "{export}") (param $ctx i32) (param $n i32) (result i32)
    (call $log_num {w.s(f'count{map_type}')} (local.get $n))
    (if (i32.eqz (call $proxy_get_header_map_value (i32.const {map_type}) {w.s('x-sum')} {RET}))
      (then (call $log_ret {w.s(f'sum{map_type}')})))
    (drop (call $proxy_add_header_map_value (i32.const {map_type}) {w.s('x-filtered')} {w.s('yes')}))
    (i32.const 1))"""
    rt = h.runtime(w.build(code))
    stream = rt.stream(rt.filters, info())
    assert stream.on_request_headers(list(REQUEST), False) is None
    out = stream.on_request_trailers([(b"X-Sum", b"abc")])
    assert out == [(b"x-sum", b"abc"), (b"x-filtered", b"yes")]
    assert stream.on_response_headers(200, list(RESPONSE), False) is None
    assert stream.on_response_trailers([(b"x-sum", b"def"), (b"x-two", b"2")])[-1] == (b"x-filtered", b"yes")
    lines = h.guest_lines()
    assert "count1=1" in lines and "sum1:abc" in lines and "count3=2" in lines and "sum3:def" in lines
    assert any("proxy_on_request_trailers returned 1 (pause), but trailers are never held" in m
               for m in h.messages("warn"))
    stream.finish()


# -- ticks ------------------------------------------------------------------------------------


def ticker(w: Wat, period_ms: int, then: str = "") -> str:
    return f"""
  (global $http (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $proxy_set_tick_period_milliseconds (i32.const {period_ms}))) (i32.const 1))
  (func (export "proxy_on_tick") (param $root i32)
    (call $log_num {w.s('tick')} (local.get $root))
    {dispatch(w)})
{answer_cb(w, then)}"""


def test_a_tick_dispatches_a_call_answered_to_the_root(h):
    loop = Loop()
    w = Wat()
    rt = runtime(h, w.build(ticker(w, 10)), loop)
    now = time.monotonic()
    deadline = rt.tick(now)
    assert deadline == pytest.approx(now + 0.01, abs=0.01)
    rt.tick(deadline)
    assert "tick=1" in h.guest_lines() and len(loop.calls) == 1
    loop.answer()
    lines = h.guest_lines()
    assert "answer_root=1" in lines and "status:200" in lines and "effective=2" in lines  # no HTTP context to go to


def test_tick_resumes_a_paused_request_through_the_effective_context(h):
    """A filter may hold requests and let them go from a tick (a queue, a rate limiter)."""
    loop = Loop()
    w = Wat()
    code = f"""
  (global $http (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $proxy_set_tick_period_milliseconds (i32.const 10))) (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (global.set $http (local.get $ctx)) {dispatch(w, timeout=60000)} (i32.const 1))
  (func (export "proxy_on_tick") (param $root i32)
    (if (global.get $http) (then
      (call $log_num {w.s('tick_effective')} (call $proxy_set_effective_context (global.get $http)))
      {continue_(w)})))"""
    rt = runtime(h, w.build(code), loop)
    stream, resumed = paused_stream(rt)
    rt.tick(time.monotonic() + 1)
    assert resumed.calls == [None]
    assert "tick_effective=0" in h.guest_lines()
    stream.finish()
    loop.answer()  # the call's late answer only cleans up
    assert rt.http_calls.inflight == {}


def test_another_streams_phase_defers_a_resume_to_the_loop(h):
    """Stream B's on_log resumes stream A: A's worker code must not run inside B's; wakeup asks for a tick."""
    loop = Loop()
    w = Wat()
    code = f"""
  (global $http (mut i32) (i32.const 0))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (if (i32.eqz (global.get $http)) (then
      (global.set $http (local.get $ctx)) {dispatch(w, timeout=60000)} (return (i32.const 1))))
    (i32.const 0))
  (func (export "proxy_on_log") (param $ctx i32)
    (if (i32.ne (local.get $ctx) (global.get $http)) (then
      (drop (call $proxy_set_effective_context (global.get $http))) {continue_(w)})))"""
    wakeups = []
    rt = runtime(h, w.build(code), loop, wakeup=lambda: wakeups.append(1))
    a, resumed = paused_stream(rt)
    b = rt.stream(rt.filters, info())
    assert b.on_request_headers(list(REQUEST), True) is None
    b.finish()
    assert resumed.calls == [] and wakeups == [1]
    rt.tick(time.monotonic())
    assert resumed.calls == [None]
    a.finish()
