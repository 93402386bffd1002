"""Request and response bodies through the filter chain: buffers, Pause, the bound, failures."""

from pathlib import Path

from forkgw.conf.model import FilterRef
from forkgw.wasm import LocalReply

from .conftest import REQUEST, RESPONSE, Wat, info

ROOT = Path(__file__).resolve().parents[2]
RET = "(i32.const 16) (i32.const 20)"
REQ, RESP = "proxy_on_request_body", "proxy_on_response_body"


def body_cb(export: str, code: str, result: str = "(i32.const 0)") -> str:
    """A body callback ($ctx, $size, $eos) running `code`, then returning `result`."""
    return (f'  (func (export "{export}") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)\n'
            f"    {code}\n    {result})")


def show(w: Wat, btype: int, tag: str = "body") -> str:
    """Log "size=N eos=E" and "tag:<the whole buffer>"."""
    return (f"(call $log_num {w.s('size')} (local.get $size)) (call $log_num {w.s('eos')} (local.get $eos))"
            f" (drop (call $proxy_get_buffer_bytes (i32.const {btype}) (i32.const 0) (local.get $size) {RET}))"
            f" (call $log_ret {w.s(tag)})")


def upper(btype: int) -> str:
    """Uppercase the buffer in place (fetch, edit guest memory, write back over the whole buffer)."""
    return f"""
    (local $i i32) (local $p i32) (local $c i32)
    (global.set $heap (i32.const 0x10000))  ;; nothing outlives a callback: the bump heap starts over
    (drop (call $proxy_get_buffer_bytes (i32.const {btype}) (i32.const 0) (local.get $size) {RET}))
    (local.set $p (i32.load (i32.const 16)))
    (block $end (loop $next
      (br_if $end (i32.ge_u (local.get $i) (i32.load (i32.const 20))))
      (local.set $c (i32.load8_u (i32.add (local.get $p) (local.get $i))))
      (if (i32.and (i32.ge_u (local.get $c) (i32.const 97)) (i32.le_u (local.get $c) (i32.const 122)))
        (then (i32.store8 (i32.add (local.get $p) (local.get $i)) (i32.sub (local.get $c) (i32.const 32)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (drop (call $proxy_set_buffer_bytes (i32.const {btype}) (i32.const 0) (local.get $size) (local.get $p)
      (i32.load (i32.const 20))))"""


def buffering(w: Wat, export: str, btype: int, replacement: str | None = None) -> str:
    """Pause until end_of_stream, then log the whole body (and replace it)."""
    replace = ""
    if replacement is not None:
        replace = (f"(if (local.get $eos) (then (drop (call $proxy_set_buffer_bytes (i32.const {btype}) (i32.const 0)"
                   f" (local.get $size) {w.s(replacement)}))))")
    return body_cb(export, f"{show(w, btype)} {replace}", "(i32.eqz (local.get $eos))")


def stream_of(rt, filters=None):
    s = rt.stream(filters if filters is not None else rt.filters, info())
    assert s.on_request_headers(list(REQUEST), False) is None
    return s


def test_body_filters_are_wanted_only_when_a_module_exports_the_callback(h):
    w = Wat()
    rt = h.runtime({"req": w.build(body_cb(REQ, "")), "resp": Wat().build(body_cb(RESP, "")), "none": Wat().build()},
                   filters=[FilterRef(module="req"), FilterRef(module="resp"), FilterRef(module="none")])
    wants = {}
    for name in ("req", "resp", "none"):
        chain = [FilterRef(module=name)]
        s = rt.stream(chain, info())
        wants[name] = (s.wants_request_body, s.wants_response_body)
    assert wants == {"req": (True, False), "resp": (False, True), "none": (False, False)}
    both = [FilterRef(module="none"), FilterRef(module="req"), FilterRef(module="resp")]
    s1, s2 = rt.stream(both, info()), rt.stream(both, info())
    assert (s1.wants_request_body, s1.wants_response_body) == (True, True)
    assert rt.chains[id(both)][2] == (True, True) and s1.chain is s2.chain  # once per chain


READ_ONLY_IMPORTS = "\n".join(
    f'  (import "env" "{name}" (func ${name} (param {params}) (result i32)))'
    for name, params in (("proxy_log", "i32 i32 i32"), ("proxy_get_buffer_bytes", "i32 i32 i32 i32 i32")))


def test_a_module_that_cannot_change_bodies_gets_them_only_with_inspect_bodies(h):
    """Every SDK exports every callback: exporting proxy_on_*_body alone does not hold bodies."""
    w = Wat()
    reader = w.build(body_cb(REQ, show(w, 0)) + body_cb(RESP, ""), imports=READ_ONLY_IMPORTS)
    as_plugin = (ROOT / "plugins" / "add_header" / "release.wasm").read_bytes()  # exports both callbacks
    for inspect, expected in ((False, (False, False)), (True, (True, True))):
        refs = [FilterRef(module="reader"), FilterRef(module="add_header", config="x")]
        rt = h.runtime({"reader": reader, "add_header": as_plugin}, inspect_bodies=inspect, filters=refs)
        for ref in refs:
            s = rt.stream([ref], info())
            assert (s.wants_request_body, s.wants_response_body) == expected, (ref.module, inspect)
    s = stream_of(rt, [FilterRef(module="reader")])
    assert s.on_request_body(b"seen", True) == b"seen"
    s.finish()
    assert "body:seen" in h.guest_lines()


def test_streaming_filter_sees_each_chunk_and_the_end(h):
    w = Wat()
    rt = h.runtime(w.build(body_cb(REQ, show(w, 0))))
    s = stream_of(rt)
    assert s.on_request_body(b"hello ", False) == b"hello "
    assert s.on_request_body(b"world", False) == b"world"
    assert s.on_request_body(b"", True) == b""
    s.finish()
    lines = [x for x in h.guest_lines() if x.startswith(("size", "eos", "body"))]
    assert lines == ["size=6", "eos=0", "body:hello ", "size=5", "eos=0", "body:world", "size=0", "eos=1", "body:"]


def test_streaming_rewrite_in_place(h):
    rt = h.runtime(Wat().build(body_cb(REQ, upper(0)) + body_cb(RESP, upper(1))))
    s = stream_of(rt)
    assert s.on_request_body(b"abc", False) == b"ABC"
    assert s.on_request_body(b"d-e", True) == b"D-E"
    assert s.on_response_headers(200, list(RESPONSE), False) is None
    assert s.on_response_body(b"xyz", False) == b"XYZ"
    assert s.on_response_body(b"", True) == b""
    s.finish()


def test_pause_buffers_until_end_of_stream_then_replaces_the_whole_body(h):
    w = Wat()
    rt = h.runtime(w.build(buffering(w, REQ, 0, "new body") + buffering(w, RESP, 1, "short")))
    s = stream_of(rt)
    assert s.on_request_body(b"ab", False) == b""
    assert s.on_request_body(b"cd", False) == b""
    assert s.on_request_body(b"ef", True) == b"new body"
    assert s.on_response_headers(200, list(RESPONSE), False) is None
    assert s.on_response_body(b"x" * 1000, False) == b""
    assert s.on_response_body(b"", True) == b"short"
    s.finish()
    lines = [x for x in h.guest_lines() if x.startswith(("size", "body"))]
    assert lines == ["size=2", "body:ab", "size=4", "body:abcd", "size=6", "body:abcdef",
                     "size=1000", "body:" + "x" * 1000, "size=1000", "body:" + "x" * 1000]
    assert "pause" not in h.log()  # a Pause that buffers is not worth a warning


def test_set_buffer_bytes_prepends_appends_and_replaces(h):
    w = Wat()
    steps = []
    for tag, start, size, data in [("prepend", 0, 0, "<"), ("append", 100, 0, ">"), ("append_at_end", 7, 5, "!"),
                                   ("replace", 1, 2, "AB"), ("inject", 3, 0, "-"), ("grow", 1, 1, "xyz")]:
        steps.append(f"(call $log_num {w.s(tag)} (call $proxy_set_buffer_bytes (i32.const 0) (i32.const {start})"
                     f" (i32.const {size}) {w.s(data)}))")
        steps.append(f"(drop (call $proxy_get_buffer_bytes (i32.const 0) (i32.const 0) (i32.const -1) {RET}))"
                     f" (call $log_ret {w.s(tag)})")
    steps.append(f"(call $log_num {w.s('status')} (call $proxy_get_buffer_status (i32.const 0) (i32.const 24) (i32.const 28)))"
                 f" (call $log_num {w.s('length')} (i32.load (i32.const 24)))")
    steps.append(f"(drop (call $proxy_get_buffer_bytes (i32.const 0) (i32.const 2) (i32.const 3) {RET})) (call $log_ret {w.s('slice')})")
    steps.append(f"(call $log_num {w.s('past')} (call $proxy_get_buffer_bytes (i32.const 0) (i32.const 99) (i32.const 3) {RET}))"
                 f" (call $log_num {w.s('past_size')} (i32.load (i32.const 20)))")
    steps.append(f"(call $log_num {w.s('other')} (call $proxy_get_buffer_bytes (i32.const 1) (i32.const 0) (i32.const 1) {RET}))")
    steps.append(f"(call $log_num {w.s('set_other')} (call $proxy_set_buffer_bytes (i32.const 1) (i32.const 0) (i32.const 0) {w.s('x')}))")
    steps.append(f"(call $log_num {w.s('replace_all')} (call $proxy_set_buffer_bytes (i32.const 0) (i32.const 0) (i32.const 999) {w.s('done')}))")
    rt = h.runtime(w.build(body_cb(REQ, " ".join(steps))))
    s = stream_of(rt)
    assert s.on_request_body(b"body", True) == b"done"
    s.finish()
    lines = h.guest_lines()
    for item in ["prepend=0", "prepend:<body", "append=0", "append:<body>", "append_at_end:<body>!",
                 "replace:<ABdy>!", "inject:<AB-dy>!", "grow:<xyzB-dy>!", "status=0", "length=10",
                 "slice:yzB", "past=0", "past_size=0", "other=1", "set_other=1", "replace_all=0"]:
        assert item in lines, (item, lines)


def test_body_buffers_exist_only_in_their_callback(h):
    w = Wat()
    probe = (f"(call $log_num {w.s('req_in_resp')} (call $proxy_get_buffer_status (i32.const 0) (i32.const 24) (i32.const 28)))"
             f" (call $log_num {w.s('resp_in_resp')} (call $proxy_get_buffer_status (i32.const 1) (i32.const 24) (i32.const 28)))")
    headers = (f"(call $log_num {w.s('req_in_headers')} (call $proxy_get_buffer_status (i32.const 0) (i32.const 24) (i32.const 28)))"
               " (i32.const 0)")
    module = w.build(body_cb(RESP, probe)
                     + f'  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) {headers})')
    rt = h.runtime(module)
    s = stream_of(rt)
    s.on_response_headers(200, list(RESPONSE), False)
    s.on_response_body(b"x", True)
    s.finish()
    assert {"req_in_headers=1", "req_in_resp=1", "resp_in_resp=0"} <= set(h.guest_lines())


def test_chain_order_and_a_pausing_filter_holds_back_the_next(h):
    w1, w2 = Wat(), Wat()
    first = w1.build(body_cb(REQ, upper(0)))
    second = w2.build(buffering(w2, REQ, 0))
    rt = h.runtime({"first": first, "second": second})
    s = stream_of(rt)
    assert s.on_request_body(b"ab", False) == b""
    assert s.on_request_body(b"cd", True) == b"ABCD"
    s.finish()
    assert [x for x in h.guest_lines() if x.startswith("body")] == ["body:AB", "body:ABCD"]
    # the other way round: the first pauses, the second sees nothing until it lets go
    rt2 = h.runtime({"second": w2.build(buffering(w2, REQ, 0)), "first": Wat().build(body_cb(REQ, upper(0)))},
                    filters=[FilterRef(module="second"), FilterRef(module="first")])
    before = len(h.guest_lines())
    s = stream_of(rt2)
    assert s.on_request_body(b"ab", False) == b""
    assert s.on_request_body(b"cd", True) == b"ABCD"
    s.finish()
    assert [x for x in h.guest_lines()[before:] if x.startswith("body")] == ["body:ab", "body:abcd"]


def test_request_body_over_the_bound_is_answered_413(h):
    w = Wat()
    rt = h.runtime(w.build(buffering(w, REQ, 0)), body_buffer_size=10)
    s = stream_of(rt)
    assert s.on_request_body(b"x" * 20, False) == b""  # one chunk over the bound is fine: nothing held yet
    reply = s.on_request_body(b"y", False)
    assert isinstance(reply, LocalReply) and reply.status == 413
    s.finish()
    assert any("request body over body_buffer_size (10 bytes) while the filter buffers it: answered 413" in m
               for m in h.messages("error"))
    # a streaming filter is never limited
    rt2 = h.runtime(Wat().build(body_cb(REQ, "")), body_buffer_size=10)
    s = stream_of(rt2)
    assert s.on_request_body(b"z" * 100, False) == b"z" * 100
    assert s.on_request_body(b"z" * 100, True) == b"z" * 100
    s.finish()


def test_response_body_over_the_bound_passes_through_unmodified(h):
    w = Wat()
    rt = h.runtime(w.build(buffering(w, RESP, 1, "replaced")), body_buffer_size=10)
    s = stream_of(rt)
    s.on_response_headers(200, list(RESPONSE), False)
    assert s.on_response_body(b"12345678", False) == b""
    assert s.on_response_body(b"abc", False) == b"12345678abc"  # what was held, then the chunk
    assert s.on_response_body(b"def", False) == b"def"
    assert s.on_response_body(b"", True) == b""
    s.finish()
    assert [x for x in h.guest_lines() if x.startswith("size")] == ["size=8"]  # not called again
    warnings = [m for m in h.messages("warn") if "body_buffer_size" in m]
    assert len(warnings) == 1 and "passed through unfiltered" in warnings[0]


def test_pause_at_end_of_stream_is_treated_as_continue(h):
    w = Wat()
    rt = h.runtime(w.build(body_cb(REQ, "", "(i32.const 1)")))
    for _ in range(2):
        s = stream_of(rt)
        assert s.on_request_body(b"a", False) == b""
        assert s.on_request_body(b"b", True) == b"ab"
        s.finish()
    warnings = [m for m in h.messages("warn") if "pause" in m]
    assert warnings == ['*42 wasm "f" root_id "f": proxy_on_request_body at end of stream returned 1 (pause), '
                        "but the body is complete: continuing"]


def test_local_response_from_a_body_callback(h):
    w = Wat()
    reply = (f"(drop (call $proxy_send_local_response (i32.const 400) {w.s('bad body')} {w.s('no thanks')}"
             " (i32.const 0) (i32.const 0) (i32.const -1)))")
    rt = h.runtime(w.build(body_cb(REQ, reply) + body_cb(RESP, reply)))
    s = stream_of(rt)
    out = s.on_request_body(b"data", False)
    assert isinstance(out, LocalReply) and (out.status, out.body) == (400, b"no thanks")
    s.finish()
    s = stream_of(rt)
    s.on_response_headers(200, list(RESPONSE), False)
    out = s.on_response_body(b"data", False)
    assert isinstance(out, LocalReply) and out.status == 400
    s.finish()


def test_close_stream_from_a_body_callback_is_a_502_that_closes(h):
    w = Wat()
    rt = h.runtime(w.build(body_cb(REQ, "(drop (call $proxy_close_stream (i32.const 0)))")))
    s = stream_of(rt)
    out = s.on_request_body(b"data", False)
    assert isinstance(out, LocalReply) and out.status == 502 and (b"connection", b"close") in out.headers
    s.finish()


def test_trap_in_a_body_callback(h):
    w = Wat()
    crash = body_cb(REQ, "(if (i32.eq (local.get $size) (i32.const 3)) (then unreachable))", "(i32.eqz (local.get $eos))")
    module = w.build(crash)
    rt = h.runtime({"crash": module, "next": Wat().build()},
                   filters=[FilterRef(module="crash", on_error="continue"), FilterRef(module="next")])
    s = stream_of(rt)
    assert s.on_request_body(b"ab", False) == b""  # held by the crashing filter
    assert s.on_request_body(b"c", False) == b"abc"  # it traps: what it held goes on unfiltered
    assert s.on_request_body(b"d", True) == b"d"
    s.finish()
    rt2 = h.runtime({"crash": module}, filters=[FilterRef(module="crash")])
    s = stream_of(rt2)
    assert s.on_request_body(b"ab", False) == b""
    out = s.on_request_body(b"c", False)
    assert isinstance(out, LocalReply) and out.status == 500
    s.finish()


def test_a_chain_without_body_filters_hands_the_data_back(h):
    rt = h.runtime(Wat().build())
    s = stream_of(rt)
    assert not s.wants_request_body and not s.wants_response_body
    assert s.on_request_body(b"abc", True) == b"abc"
    s.finish()
