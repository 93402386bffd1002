"""Each env host function through a small WAT filter: success and failure statuses.

The filters log `tag=<status>` (and returned bytes as `tag:<bytes>`) through
proxy_log; the assertions read the real error log.
"""

import struct
import time

from forkgw.conf.model import FilterRef
from forkgw.wasm.abi import encode_pairs

from .conftest import REQUEST, RESPONSE, Wat, info, on, run_request

RET = "(i32.const 16) (i32.const 20)"  # RET_PTR, RET_SIZE
OOB = "(i32.const -16)"  # 0xFFFFFFF0: past the end of any test memory
U32_OUT = "(i32.const 24)"
U64_OUT = "(i32.const 32)"


def st(w: Wat, tag: str, call: str) -> str:
    return f"(call $log_num {w.s(tag)} {call})"


def ret(w: Wat, tag: str) -> str:
    return f"(call $log_ret {w.s(tag)})"


def lines_of(h, export: str, make_code, *, abi="0_2_1", level="info", config="", vm_config="", headers=None):
    """Run one request through a filter whose `export` runs make_code(w); return what the filter logged."""
    w = Wat(abi=abi)
    module = w.build(on(export, make_code(w), abi=abi))
    rt = h.runtime(module, level=level, vm_config=vm_config, filters=[FilterRef(module="f", config=config)])
    run_request(rt, headers=headers)
    return h.guest_lines()


def logged(lines: list[str], *expected: str) -> None:
    for item in expected:
        assert item in lines, f"{item!r} not in {lines}"


# -- logging -------------------------------------------------------------------


def test_proxy_log_levels_map_onto_the_error_log(h):
    def code(w):
        return " ".join(f"(drop (call $proxy_log (i32.const {lvl}) {w.s(f'level {lvl}')}))" for lvl in range(6))

    lines_of(h, "proxy_on_request_headers", code, level="debug")
    got = [(lvl, msg.split(": ", 1)[1]) for lvl in ("debug", "info", "warn", "error", "crit") for msg in h.messages(lvl) if "level " in msg]
    assert sorted(got) == sorted([("debug", "level 0"), ("debug", "level 1"), ("info", "level 2"),
                                  ("warn", "level 3"), ("error", "level 4"), ("crit", "level 5")])
    assert any(msg.startswith('*42 wasm "f" root_id "f": level 4') for msg in h.messages("error"))


def test_proxy_log_statuses(h):
    def code(w):
        return " ".join([
            st(w, "ok", f"(call $proxy_log (i32.const 2) {w.s('hello')})"),
            st(w, "badlevel", f"(call $proxy_log (i32.const 6) {w.s('x')})"),
            st(w, "oob", f"(call $proxy_log (i32.const 2) {OOB} (i32.const 100))"),
            st(w, "hugesize", "(call $proxy_log (i32.const 2) (i32.const 0) (i32.const -1))"),
            st(w, "hidden_oob", f"(call $proxy_log (i32.const 0) {OOB} (i32.const 100))"),
            st(w, "newline", f"(call $proxy_log (i32.const 2) {w.s('a' + chr(10) + 'b')})"),
        ])

    lines = lines_of(h, "proxy_on_request_headers", code)
    logged(lines, "hello", "ok=0", "badlevel=2", "oob=6", "hugesize=6", "hidden_oob=6", "a\\nb", "newline=0")


def test_proxy_get_log_level_follows_the_error_log_level(h):
    """The filter traps (-> 500) unless proxy_get_log_level gives the expected level."""
    for level, expected in (("debug", 0), ("info", 2), ("notice", 3), ("warn", 3), ("error", 4), ("crit", 5)):
        w = Wat()
        code = (f"(if (call $proxy_get_log_level {U32_OUT}) (then unreachable))"
                f" (if (i32.ne (i32.load (i32.const 24)) (i32.const {expected})) (then unreachable))")
        rt = h.runtime(w.build(on("proxy_on_request_headers", code)), level=level)
        _, r1, _ = run_request(rt)
        assert r1 is None, level
    lines = lines_of(h, "proxy_on_request_headers", lambda w: st(w, "oob", f"(call $proxy_get_log_level {OOB})"))
    logged(lines, "oob=6")


def test_current_time(h):
    def code(w):
        return " ".join([
            st(w, "st", f"(call $proxy_get_current_time_nanoseconds {U64_OUT})"),
            st(w, "secs", "(i32.wrap_i64 (i64.div_u (i64.load (i32.const 32)) (i64.const 1000000000)))"),
            st(w, "oob", f"(call $proxy_get_current_time_nanoseconds {OOB})"),
        ])

    lines = lines_of(h, "proxy_on_request_headers", code)
    logged(lines, "st=0", "oob=6")
    secs = int(next(line for line in lines if line.startswith("secs=")).split("=")[1])
    assert abs(secs - time.time()) < 5


# -- configuration buffers -----------------------------------------------------


def test_vm_and_plugin_configuration_buffers(h):
    w = Wat()
    vm_start = on("proxy_on_vm_start", " ".join([
        st(w, "vm", f"(call $proxy_get_buffer_bytes (i32.const 6) (i32.const 0) (i32.const -1) {RET})"),
        ret(w, "vmcfg"),
        st(w, "plugin_in_vm_start", f"(call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const -1) {RET})"),
    ]))
    configure = on("proxy_on_configure", " ".join([
        st(w, "cfg", f"(call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const -1) {RET})"),
        ret(w, "all"),
        st(w, "slice", f"(call $proxy_get_buffer_bytes (i32.const 7) (i32.const 2) (i32.const 3) {RET})"),
        ret(w, "part"),
        st(w, "past", f"(call $proxy_get_buffer_bytes (i32.const 7) (i32.const 100) (i32.const 5) {RET})"),
        st(w, "pastsize", "(i32.load (i32.const 20))"),
        st(w, "bigstart", f"(call $proxy_get_buffer_bytes (i32.const 7) (i32.const -1) (i32.const -1) {RET})"),
        st(w, "vm_in_configure", f"(call $proxy_get_buffer_bytes (i32.const 6) (i32.const 0) (i32.const -1) {RET})"),
        st(w, "badtype", f"(call $proxy_get_buffer_bytes (i32.const 9) (i32.const 0) (i32.const 1) {RET})"),
        st(w, "oobret", f"(call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const 1) {OOB} (i32.const 20))"),
        st(w, "status", "(call $proxy_get_buffer_status (i32.const 7) (i32.const 24) (i32.const 28))"),
        st(w, "len", "(i32.load (i32.const 24))"),
        st(w, "status_oob", f"(call $proxy_get_buffer_status (i32.const 7) {OOB} (i32.const 28))"),
        st(w, "status_body", "(call $proxy_get_buffer_status (i32.const 0) (i32.const 24) (i32.const 28))"),
        st(w, "set_cfg", f"(call $proxy_set_buffer_bytes (i32.const 7) (i32.const 0) (i32.const 0) {w.s('x')})"),
        st(w, "set_body", f"(call $proxy_set_buffer_bytes (i32.const 0) (i32.const 0) (i32.const 0) {w.s('x')})"),
        st(w, "set_oob", f"(call $proxy_set_buffer_bytes (i32.const 0) (i32.const 0) (i32.const 0) {OOB} (i32.const 9))"),
        st(w, "getconf", f"(call $proxy_get_configuration {RET})"),
        ret(w, "conf010"),
    ]))
    request = on("proxy_on_request_headers",
                 st(w, "cfg_in_request", f"(call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const -1) {RET})")
                 + " " + st(w, "body_in_request", f"(call $proxy_get_buffer_bytes (i32.const 0) (i32.const 0) (i32.const -1) {RET})"))
    rt = h.runtime(w.build(vm_start + configure + request), vm_config="vm-conf",
                   filters=[FilterRef(module="f", config="plugin-conf")])
    run_request(rt)
    logged(h.guest_lines(), "vm=0", "vmcfg:vm-conf", "plugin_in_vm_start=1",
           "cfg=0", "all:plugin-conf", "slice=0", "part:ugi", "past=0", "pastsize=0", "bigstart=0",
           "vm_in_configure=1", "badtype=2", "oobret=6", "status=0", "len=11", "status_oob=6",
           "status_body=1", "set_cfg=2", "set_body=1", "set_oob=6", "getconf=0", "conf010:plugin-conf",
           "cfg_in_request=1", "body_in_request=1")


# -- header maps -----------------------------------------------------------------


def test_get_header_map_value(h):
    def code(w):
        out = []
        for tag, key in (("path", ":path"), ("ua", "User-Agent"), ("multi", "x-multi"), ("auth", ":authority")):
            out += [st(w, f"st_{tag}", f"(call $proxy_get_header_map_value (i32.const 0) {w.s(key)} {RET})"), ret(w, tag)]
        out += [
            st(w, "missing", f"(call $proxy_get_header_map_value (i32.const 0) {w.s('x-nope')} {RET})"),
            st(w, "oobkey", f"(call $proxy_get_header_map_value (i32.const 0) {OOB} (i32.const 4) {RET})"),
            st(w, "oobret", f"(call $proxy_get_header_map_value (i32.const 0) {w.s(':path')} {OOB} (i32.const 20))"),
            st(w, "badmap", f"(call $proxy_get_header_map_value (i32.const 8) {w.s(':path')} {RET})"),
            st(w, "hugemap", f"(call $proxy_get_header_map_value (i32.const -1) {w.s(':path')} {RET})"),
            st(w, "resp_in_req", f"(call $proxy_get_header_map_value (i32.const 2) {w.s(':status')} {RET})"),
            st(w, "trailers", f"(call $proxy_get_header_map_value (i32.const 1) {w.s('x')} {RET})"),
            st(w, "callresp", f"(call $proxy_get_header_map_value (i32.const 6) {w.s('x')} {RET})"),
        ]
        return " ".join(out)

    lines = lines_of(h, "proxy_on_request_headers", code)
    logged(lines, "st_path=0", "path:/a/b?x=1&y=2", "ua:curl/8", "multi:one", "auth:example.com", "missing=1",
           "oobkey=6", "oobret=6", "badmap=2", "hugemap=2", "resp_in_req=2", "trailers=1", "callresp=2")


def test_header_maps_are_unavailable_in_root_contexts(h):
    lines = lines_of(h, "proxy_on_configure", lambda w: st(
        w, "root", f"(call $proxy_get_header_map_value (i32.const 0) {w.s(':path')} {RET})"))
    logged(lines, "root=2")


def test_missing_header_is_empty_ok_in_abi_0_1_0(h):
    lines = lines_of(h, "proxy_on_request_headers", lambda w: " ".join([
        st(w, "missing", f"(call $proxy_get_header_map_value (i32.const 0) {w.s('x-nope')} {RET})"),
        st(w, "size", "(i32.load (i32.const 20))"),
    ]), abi="0_1_0")
    logged(lines, "missing=0", "size=0")


def test_add_replace_remove(h):
    w = Wat()
    code = " ".join([
        st(w, "add", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('X-New')} {w.s('v1')})"),
        st(w, "add2", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('x-new')} {w.s('v2')})"),
        st(w, "replace", f"(call $proxy_replace_header_map_value (i32.const 0) {w.s('x-multi')} {w.s('only')})"),
        st(w, "replace_path", f"(call $proxy_replace_header_map_value (i32.const 0) {w.s(':path')} {w.s('/rewritten')})"),
        st(w, "replace_absent", f"(call $proxy_replace_header_map_value (i32.const 0) {w.s('x-absent')} {w.s('z')})"),
        st(w, "remove", f"(call $proxy_remove_header_map_value (i32.const 0) {w.s('Accept')})"),
        st(w, "remove_absent", f"(call $proxy_remove_header_map_value (i32.const 0) {w.s('x-nope')})"),
        st(w, "crlf", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('x-bad')} {w.s(b'a' + bytes([13, 10]) + b'b')})"),
        st(w, "emptyname", f"(call $proxy_add_header_map_value (i32.const 0) (i32.const 0) (i32.const 0) {w.s('v')})"),
        st(w, "oob", f"(call $proxy_add_header_map_value (i32.const 0) {w.s('x')} {OOB} (i32.const 3))"),
        st(w, "remove_oob", f"(call $proxy_remove_header_map_value (i32.const 0) {OOB} (i32.const 3))"),
        st(w, "badmap", f"(call $proxy_remove_header_map_value (i32.const 9) {w.s('x')})"),
    ])
    rt = h.runtime(w.build(on("proxy_on_request_headers", code)))
    stream = rt.stream(rt.filters, info())
    assert stream.on_request_headers(list(REQUEST), True) is None
    assert stream.request_headers == [
        (b":method", b"GET"), (b":path", b"/rewritten"), (b":authority", b"example.com"), (b":scheme", b"http"),
        (b"user-agent", b"curl/8"), (b"x-multi", b"only"), (b"x-new", b"v1"), (b"x-new", b"v2"), (b"x-absent", b"z"),
    ]
    stream.finish()
    logged(h.guest_lines(), "add=0", "add2=0", "replace=0", "replace_path=0", "replace_absent=0", "remove=0",
           "remove_absent=0", "crlf=2", "emptyname=2", "oob=6", "remove_oob=6", "badmap=2")


def test_pairs_roundtrip_and_size(h):
    """get_pairs(request) -> set_pairs(response): the response carries the request's headers."""
    w = Wat()
    response = on("proxy_on_response_headers", " ".join([
        st(w, "size", f"(call $proxy_get_header_map_size (i32.const 0) {U32_OUT})"),
        st(w, "sizeval", "(i32.load (i32.const 24))"),
        st(w, "get", f"(call $proxy_get_header_map_pairs (i32.const 0) {RET})"),
        st(w, "set", "(call $proxy_set_header_map_pairs (i32.const 2) (i32.load (i32.const 16)) (i32.load (i32.const 20)))"),
        st(w, "size_oob", f"(call $proxy_get_header_map_size (i32.const 0) {OOB})"),
        st(w, "get_oob", f"(call $proxy_get_header_map_pairs (i32.const 0) {OOB} (i32.const 20))"),
        st(w, "set_oob", f"(call $proxy_set_header_map_pairs (i32.const 2) {OOB} (i32.const 40))"),
        st(w, "set_bad", f"(call $proxy_set_header_map_pairs (i32.const 2) {w.s(struct.pack('<III', 1, 99, 0))})"),
        st(w, "set_huge_count", f"(call $proxy_set_header_map_pairs (i32.const 2) {w.s(struct.pack('<I', 0xFFFFFFFF))})"),
        st(w, "empty_trailers", f"(call $proxy_get_header_map_pairs (i32.const 3) {RET})"),
        st(w, "empty_ptr", "(i32.load (i32.const 16))"),
        st(w, "badmap", f"(call $proxy_get_header_map_pairs (i32.const 8) {RET})"),
    ]))
    rt = h.runtime(w.build(response))
    stream = rt.stream(rt.filters, info())
    stream.on_request_headers(list(REQUEST), True)
    assert stream.on_response_headers(200, list(RESPONSE), False) is None
    assert stream.response_headers == [p for p in REQUEST if not p[0].startswith(b":")]
    assert stream.status == 200  # the new map has no :status: the status is kept
    stream.finish()
    logged(h.guest_lines(), "size=0", f"sizeval={len(encode_pairs(REQUEST))}", "get=0", "set=0", "size_oob=6",
           "get_oob=6", "set_oob=6", "set_bad=2", "set_huge_count=2", "empty_trailers=0", "empty_ptr=0", "badmap=2")


def test_set_pairs_accepts_both_empty_forms_and_keeps_pseudo_headers_first(h):
    w = Wat()
    new = encode_pairs([(b"X-First", b"1"), (b":method", b"POST"), (b":path", b"/p")])
    request = on("proxy_on_request_headers", " ".join([
        st(w, "set", f"(call $proxy_set_header_map_pairs (i32.const 0) {w.s(new)})"),
        st(w, "trailers_empty", f"(call $proxy_set_header_map_pairs (i32.const 1) {w.s(bytes(1))})"),
        st(w, "trailers_zero", "(call $proxy_set_header_map_pairs (i32.const 1) (i32.const 0) (i32.const 0))"),
    ]))
    rt = h.runtime(w.build(request))
    stream = rt.stream(rt.filters, info())
    stream.on_request_headers(list(REQUEST), True)
    assert stream.request_headers == [(b":method", b"POST"), (b":path", b"/p"), (b"x-first", b"1")]
    stream.finish()
    logged(h.guest_lines(), "set=0", "trailers_empty=0", "trailers_zero=0")


def test_response_status_pseudo_header(h):
    w = Wat()
    response = on("proxy_on_response_headers", " ".join([
        st(w, "get", f"(call $proxy_get_header_map_value (i32.const 2) {w.s(':status')} {RET})"),
        ret(w, "status"),
        st(w, "set", f"(call $proxy_replace_header_map_value (i32.const 2) {w.s(':status')} {w.s('418')})"),
        st(w, "add", f"(call $proxy_add_header_map_value (i32.const 2) {w.s('hello')} {w.s('world')})"),
    ]))
    rt = h.runtime(w.build(response))
    stream = rt.stream(rt.filters, info())
    stream.on_request_headers(list(REQUEST), True)
    stream.on_response_headers(200, list(RESPONSE), False)
    assert stream.status == 418
    assert stream.response_headers == RESPONSE + [(b"hello", b"world")]
    stream.finish()
    logged(h.guest_lines(), "get=0", "status:200", "set=0", "add=0")


def test_invalid_status_from_a_filter_is_ignored(h):
    w = Wat()
    response = on("proxy_on_response_headers",
                  st(w, "set", f"(call $proxy_replace_header_map_value (i32.const 2) {w.s(':status')} {w.s('abc')})"))
    rt = h.runtime(w.build(response))
    stream, _, _ = run_request(rt)
    assert stream.status == 200
    assert 'invalid ":status" "abc" set by a filter, ignored' in h.log()


# -- local responses --------------------------------------------------------------


def local_response(w, status=403, body="denied", headers=((b"x-why", b"policy"),), grpc=-1):
    return (f"(call $proxy_send_local_response (i32.const {status}) {w.s('details here')} {w.s(body)} "
            f"{w.s(encode_pairs(list(headers)))} (i32.const {grpc}))")


def test_local_response_wins_over_continue_and_stops_the_chain(h):
    w = Wat()
    deny = w.build(on("proxy_on_request_headers", st(w, "st", local_response(w))))
    second = Wat().build()
    rt = h.runtime({"deny": deny, "second": second})
    stream = rt.stream(rt.filters, info())
    reply = stream.on_request_headers(list(REQUEST), True)
    assert (reply.status, reply.headers, reply.body) == (403, [(b"x-why", b"policy")], b"denied")
    stream.finish()
    assert "st=0" in h.guest_lines()
    assert not any(line.startswith("request_headers") for line in h.guest_lines())  # "second" never ran
    assert '*42 wasm "deny" root_id "deny": local response 403 ("details here")' in h.messages("info")


def test_local_response_wins_over_pause(h):
    w = Wat()
    code = f"(drop {local_response(w, status=401, body='', headers=())}) (return (i32.const 1))"
    rt = h.runtime(w.build(on("proxy_on_request_headers", code)))
    stream = rt.stream(rt.filters, info())
    reply = stream.on_request_headers(list(REQUEST), True)
    assert (reply.status, reply.headers, reply.body) == (401, [], b"")
    stream.finish()
    assert "returned 1 (pause)" not in h.log()


def test_local_response_from_response_headers_and_second_reply_ignored(h):
    w = Wat()
    response = on("proxy_on_response_headers", " ".join([
        st(w, "first", local_response(w, status=502, body="bad upstream", grpc=14)),
        st(w, "second", local_response(w, status=503)),
    ]))
    rt = h.runtime(w.build(response))
    stream = rt.stream(rt.filters, info())
    assert stream.on_request_headers(list(REQUEST), True) is None
    reply = stream.on_response_headers(200, list(RESPONSE), False)
    assert (reply.status, reply.body) == (502, b"bad upstream")
    assert reply.headers == [(b"x-why", b"policy"), (b"grpc-status", b"14")]
    stream.finish()
    logged(h.guest_lines(), "first=0", "second=0")
    assert "local response 503 ignored" in h.log()


def test_local_response_errors(h):
    def code(w):
        return " ".join([
            st(w, "badstatus", local_response(w, status=42)),
            st(w, "status1xx", local_response(w, status=101)),
            st(w, "oob", f"(call $proxy_send_local_response (i32.const 403) (i32.const 0) (i32.const 0) {OOB} (i32.const 4) (i32.const 0) (i32.const 0) (i32.const -1))"),
            st(w, "badheaders", f"(call $proxy_send_local_response (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) {w.s(struct.pack('<I', 5))} (i32.const -1))"),
        ])

    lines = lines_of(h, "proxy_on_request_headers", code)
    logged(lines, "badstatus=2", "status1xx=2", "oob=6", "badheaders=2")
    lines = lines_of(h, "proxy_on_configure", lambda w: st(w, "root", local_response(w)))
    logged(lines, "root=2")


# -- properties ---------------------------------------------------------------------


def prop(w, tag, path):
    return st(w, f"st_{tag}", f"(call $proxy_get_property {w.s(path)} {RET})") + " " + ret(w, tag)


def prop_int(w, tag, path):
    return " ".join([
        st(w, f"st_{tag}", f"(call $proxy_get_property {w.s(path)} {RET})"),
        st(w, f"{tag}_size", "(i32.load (i32.const 20))"),
        st(w, tag, "(i32.load (i32.load (i32.const 16)))"),
    ])


def test_properties_in_the_request(h):
    def code(w):
        return " ".join([
            prop(w, "path", b"request\0path"),
            prop(w, "url_path", b"request\0url_path"),
            prop(w, "query", b"request\0query"),
            prop(w, "host", b"request\0host"),
            prop(w, "scheme", b"request\0scheme"),
            prop(w, "method", b"request\0method"),
            prop(w, "protocol", b"request\0protocol"),
            prop(w, "id", b"request\0id"),
            prop(w, "ua", b"request\0headers\0user-agent"),
            prop(w, "multi", "request.headers.x-multi"),
            prop(w, "src", b"source\0address"),
            prop(w, "dst", b"destination\0address"),
            prop(w, "root_id", "plugin_root_id"),
            prop(w, "name", b"plugin_name"),
            prop(w, "vm_id", b"plugin_vm_id"),
            prop_int(w, "src_port", b"source\0port"),
            prop_int(w, "dst_port", b"destination\0port"),
            prop_int(w, "conn", b"connection\0id"),
            st(w, "time", f"(call $proxy_get_property {w.s(b'request' + bytes(1) + b'time')} {RET})"),
            st(w, "secs", "(i32.wrap_i64 (i64.div_u (i64.load (i32.load (i32.const 16))) (i64.const 1000000000)))"),
            st(w, "code_before_response", f"(call $proxy_get_property {w.s(b'response' + bytes(1) + b'code')} {RET})"),
            st(w, "resp_header_before", f"(call $proxy_get_property {w.s(b'response.headers.content-type')} {RET})"),
            st(w, "missing_header", f"(call $proxy_get_property {w.s(b'request.headers.x-nope')} {RET})"),
            st(w, "unknown", f"(call $proxy_get_property {w.s(b'node' + bytes(1) + b'id')} {RET})"),
            st(w, "empty", f"(call $proxy_get_property (i32.const 0) (i32.const 0) {RET})"),
            st(w, "oob", f"(call $proxy_get_property {OOB} (i32.const 5) {RET})"),
            st(w, "oobret", f"(call $proxy_get_property {w.s('plugin_name')} {OOB} (i32.const 20))"),
        ])

    lines = lines_of(h, "proxy_on_request_headers", code)
    logged(lines, "path:/a/b?x=1&y=2", "url_path:/a/b", "query:x=1&y=2", "host:example.com", "scheme:http",
           "method:GET", "protocol:HTTP/1.1", "id:req-1", "ua:curl/8", "multi:one,two", "src:192.0.2.7:51234",
           "dst:127.0.0.1:8080", "root_id:f", "name:f", "vm_id:f", "src_port=51234", "src_port_size=8",
           "dst_port=8080", "conn=42", "conn_size=8", "time=0", "code_before_response=1",
           "resp_header_before=1", "missing_header=1", "unknown=1", "empty=1", "oob=6", "oobret=6")
    secs = int(next(line for line in lines if line.startswith("secs=")).split("=")[1])
    assert abs(secs - time.time()) < 5


def test_properties_in_the_response_and_ipv6(h):
    w = Wat()
    response = on("proxy_on_response_headers", " ".join([
        prop_int(w, "code", b"response\0code"),
        prop(w, "ctype", b"response\0headers\0content-type"),
        prop(w, "src", b"source\0address"),
    ]))
    rt = h.runtime(w.build(response))
    run_request(rt, source=("::1", 4000))
    logged(h.guest_lines(), "code=200", "code_size=8", "ctype:text/plain", "src:[::1]:4000")


def test_properties_in_the_root_context(h):
    lines = lines_of(h, "proxy_on_configure", lambda w: " ".join([
        prop(w, "root_id", b"plugin_root_id"),
        st(w, "path", f"(call $proxy_get_property {w.s(b'request' + bytes(1) + b'path')} {RET})"),
        st(w, "set", f"(call $proxy_set_property {w.s('my.key')} {w.s('root-value')})"),
        prop(w, "get", "my.key"),
    ]))
    logged(lines, "root_id:f", "path=1", "set=0", "get:root-value")


def test_root_id_override_and_empty_root_id(h):
    w = Wat()
    configure = on("proxy_on_configure", prop(w, "root_id", "plugin_root_id"))
    rt = h.runtime(w.build(configure), filters=[FilterRef(module="f", root_id="other"), FilterRef(module="f", root_id="")])
    rt.close()
    logged(h.guest_lines(), "root_id:other", "st_root_id=0")
    assert h.messages().count('wasm "f" root_id "": st_root_id=0') == 1


def test_set_property_is_shared_by_the_chain_of_one_stream(h):
    w1 = Wat()
    writer = w1.build(on("proxy_on_request_headers", st(w1, "set", f"(call $proxy_set_property {w1.s(b'gw' + bytes(1) + b'user')} {w1.s('alice')})")
                         + " " + st(w1, "set_oob", f"(call $proxy_set_property {w1.s('x')} {OOB} (i32.const 2))")))
    w2 = Wat()
    reader = w2.build(on("proxy_on_request_headers", prop(w2, "user", b"gw\0user")))
    rt = h.runtime({"writer": writer, "reader": reader})
    run_request(rt)
    logged(h.guest_lines(), "set=0", "set_oob=6", "user:alice")
    before = len(h.guest_lines())
    run_request(rt, filters=rt.filters[::-1])  # reader first: a new stream starts with an empty scratch map
    assert "st_user=1" in h.guest_lines()[before:]


def test_set_property_does_not_change_built_in_attributes(h):
    lines = lines_of(h, "proxy_on_request_headers", lambda w: " ".join([
        st(w, "set", f"(call $proxy_set_property {w.s(b'request' + bytes(1) + b'path')} {w.s('/evil')})"),
        prop(w, "path", b"request\0path"),
    ]))
    logged(lines, "set=0", "path:/a/b?x=1&y=2")


# -- contexts, stream control, stubs -------------------------------------------------


def test_set_effective_context(h):
    lines = lines_of(h, "proxy_on_request_headers", lambda w: " ".join([
        st(w, "unknown", "(call $proxy_set_effective_context (i32.const 999))"),
        prop(w, "path_before", b"request\0path"),
        st(w, "to_root", "(call $proxy_set_effective_context (i32.const 1))"),
        st(w, "path_in_root", f"(call $proxy_get_property {w.s(b'request' + bytes(1) + b'path')} {RET})"),
        st(w, "back", "(call $proxy_set_effective_context (local.get 0))"),
        prop(w, "path_after", b"request\0path"),
    ]))
    logged(lines, "unknown=2", "path_before:/a/b?x=1&y=2", "to_root=0", "path_in_root=1", "back=0",
           "path_after:/a/b?x=1&y=2")


def test_stream_control_calls(h):
    lines = lines_of(h, "proxy_on_request_headers", lambda w: " ".join([
        st(w, "continue", "(call $proxy_continue_stream (i32.const 0))"),
        st(w, "continue_bad", "(call $proxy_continue_stream (i32.const 4))"),
        st(w, "close", "(call $proxy_close_stream (i32.const 1))"),
        st(w, "close_bad", "(call $proxy_close_stream (i32.const -1))"),
        st(w, "continue_request", "(call $proxy_continue_request)"),
        st(w, "continue_response", "(call $proxy_continue_response)"),
        st(w, "clear_route_cache", "(call $proxy_clear_route_cache)"),
        st(w, "done", "(call $proxy_done)"),
        st(w, "status", f"(call $proxy_get_status {U32_OUT} {RET})"),
        st(w, "pthread_equal", "(call $pthread_equal (i32.const 3) (i32.const 3))"),
        st(w, "pthread_differ", "(call $pthread_equal (i32.const 3) (i32.const 4))"),
        "(call $emscripten_notify_memory_growth (i32.const 0))",
    ]))
    logged(lines, "continue=0", "continue_bad=2", "close=0", "close_bad=2", "continue_request=0",
           "continue_response=0", "clear_route_cache=0", "done=0", "status=0", "pthread_equal=1", "pthread_differ=0")


def test_unsupported_calls_answer_statuses_sdks_tolerate(h):
    lines = lines_of(h, "proxy_on_request_headers", lambda w: " ".join([
        st(w, "http_call", "(call $proxy_http_call (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) "
                           "(i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 24))"),
        st(w, "http_call2", "(call $proxy_http_call (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) "
                            "(i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 24))"),
        st(w, "grpc_call", "(call $proxy_grpc_call (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) "
                           "(i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 24))"),
        st(w, "foreign", "(call $proxy_call_foreign_function (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 16) (i32.const 20))"),
    ]))
    logged(lines, "http_call=10", "http_call2=10", "grpc_call=10", "foreign=1")
    assert h.log().count("proxy_http_call is not supported yet") == 1


# -- shared data, queues, metrics (per worker) ---------------------------------------


def test_shared_data_with_cas(h):
    lines = lines_of(h, "proxy_on_request_headers", lambda w: " ".join([
        st(w, "get_missing", f"(call $proxy_get_shared_data {w.s('k')} {RET} {U32_OUT})"),
        st(w, "set", f"(call $proxy_set_shared_data {w.s('k')} {w.s('v1')} (i32.const 0))"),
        st(w, "get", f"(call $proxy_get_shared_data {w.s('k')} {RET} {U32_OUT})"),
        ret(w, "value"),
        st(w, "cas_nonzero", "(i32.ne (i32.load (i32.const 24)) (i32.const 0))"),
        st(w, "set_stale", f"(call $proxy_set_shared_data {w.s('k')} {w.s('v2')} (i32.add (i32.load (i32.const 24)) (i32.const 1)))"),
        st(w, "set_cas", f"(call $proxy_set_shared_data {w.s('k')} {w.s('v3')} (i32.load (i32.const 24)))"),
        st(w, "get2", f"(call $proxy_get_shared_data {w.s('k')} {RET} {U32_OUT})"),
        ret(w, "value2"),
        st(w, "new_with_cas", f"(call $proxy_set_shared_data {w.s('fresh')} {w.s('x')} (i32.const 77))"),
        st(w, "oob", f"(call $proxy_get_shared_data {w.s('k')} {RET} {OOB})"),
    ]))
    logged(lines, "get_missing=1", "set=0", "get=0", "value:v1", "cas_nonzero=1", "set_stale=8", "set_cas=0",
           "value2:v3", "new_with_cas=0", "oob=6")


def test_metrics(h):
    lines = lines_of(h, "proxy_on_request_headers", lambda w: " ".join([
        st(w, "define", f"(call $proxy_define_metric (i32.const 0) {w.s('requests')} {U32_OUT})"),
        "(i32.store (i32.const 40) (i32.load (i32.const 24)))",
        st(w, "inc", "(call $proxy_increment_metric (i32.load (i32.const 40)) (i64.const 5))"),
        st(w, "inc_neg", "(call $proxy_increment_metric (i32.load (i32.const 40)) (i64.const -1))"),
        st(w, "get", f"(call $proxy_get_metric (i32.load (i32.const 40)) {U64_OUT})"),
        st(w, "value", "(i32.wrap_i64 (i64.load (i32.const 32)))"),
        st(w, "redefine", f"(call $proxy_define_metric (i32.const 0) {w.s('requests')} {U32_OUT})"),
        st(w, "same_id", "(i32.eq (i32.load (i32.const 24)) (i32.load (i32.const 40)))"),
        st(w, "gauge", f"(call $proxy_define_metric (i32.const 1) {w.s('inflight')} {U32_OUT})"),
        st(w, "record", "(call $proxy_record_metric (i32.load (i32.const 24)) (i64.const 9))"),
        st(w, "gauge_down", "(call $proxy_increment_metric (i32.load (i32.const 24)) (i64.const -2))"),
        st(w, "gauge_get", f"(call $proxy_get_metric (i32.load (i32.const 24)) {U64_OUT})"),
        st(w, "gauge_value", "(i32.wrap_i64 (i64.load (i32.const 32)))"),
        st(w, "hist", f"(call $proxy_define_metric (i32.const 2) {w.s('latency')} {U32_OUT})"),
        st(w, "hist_record", "(call $proxy_record_metric (i32.load (i32.const 24)) (i64.const 12))"),
        st(w, "hist_get", f"(call $proxy_get_metric (i32.load (i32.const 24)) {U64_OUT})"),
        st(w, "badtype", f"(call $proxy_define_metric (i32.const 3) {w.s('x')} {U32_OUT})"),
        st(w, "unknown", "(call $proxy_increment_metric (i32.const 9999) (i64.const 1))"),
        st(w, "unknown_get", f"(call $proxy_get_metric (i32.const 9999) {U64_OUT})"),
        st(w, "oob", f"(call $proxy_get_metric (i32.load (i32.const 40)) {OOB})"),
    ]))
    logged(lines, "define=0", "inc=0", "inc_neg=2", "get=0", "value=5", "redefine=0", "same_id=1", "gauge=0",
           "record=0", "gauge_down=0", "gauge_get=0", "gauge_value=7", "hist=0", "hist_record=0", "hist_get=2",
           "badtype=2", "unknown=1", "unknown_get=1", "oob=6")


def test_shared_queue_and_on_queue_ready(h):
    w = Wat()
    configure = on("proxy_on_configure", st(w, "register", f"(call $proxy_register_shared_queue {w.s('jobs')} {U32_OUT})")
                   + " (i32.store (i32.const 44) (i32.load (i32.const 24)))")
    request = on("proxy_on_request_headers", " ".join([
        st(w, "resolve", f"(call $proxy_resolve_shared_queue (i32.const 0) (i32.const 0) {w.s('jobs')} {U32_OUT})"),
        st(w, "same", "(i32.eq (i32.load (i32.const 24)) (i32.load (i32.const 44)))"),
        st(w, "resolve_missing", f"(call $proxy_resolve_shared_queue {w.s('f')} {w.s('nope')} {U32_OUT})"),
        st(w, "enqueue", f"(call $proxy_enqueue_shared_queue (i32.load (i32.const 44)) {w.s('job-1')})"),
        st(w, "enqueue_unknown", f"(call $proxy_enqueue_shared_queue (i32.const 999) {w.s('x')})"),
    ]))
    ready = on("proxy_on_queue_ready", " ".join([
        st(w, "ready", "(local.get 1)"),
        st(w, "dequeue", f"(call $proxy_dequeue_shared_queue (local.get 1) {RET})"),
        ret(w, "item"),
        st(w, "dequeue_empty", f"(call $proxy_dequeue_shared_queue (local.get 1) {RET})"),
        st(w, "dequeue_unknown", f"(call $proxy_dequeue_shared_queue (i32.const 999) {RET})"),
    ]))
    rt = h.runtime(w.build(configure + request + ready))
    run_request(rt)
    assert rt.tick(time.monotonic()) is None
    logged(h.guest_lines(), "register=0", "resolve=0", "same=1", "resolve_missing=1", "enqueue=0",
           "enqueue_unknown=1", "ready=1", "dequeue=0", "item:job-1", "dequeue_empty=7", "dequeue_unknown=1")


def test_tick_period(h):
    w = Wat()
    configure = on("proxy_on_configure", st(w, "period", "(call $proxy_set_tick_period_milliseconds (i32.const 20))"))
    tick = on("proxy_on_tick", st(w, "tick", "(local.get 0)"))
    before = time.monotonic()
    rt = h.runtime(w.build(configure + tick))
    after = time.monotonic()
    deadline = rt.tick(before)  # tick() compares with the `now` it is given
    assert before + 0.02 <= deadline <= after + 0.02
    assert "tick=1" not in h.guest_lines()
    assert rt.tick(deadline) == deadline + 0.02
    assert h.guest_lines().count("tick=1") == 1


def test_an_empty_configuration_is_no_buffer(h):
    """Envoy's behaviour: the AS SDK 0.1.8 aborts on it, the Rust SDK reads None."""
    w = Wat()
    vm_start = on("proxy_on_vm_start", st(w, "vm", f"(call $proxy_get_buffer_bytes (i32.const 6) (i32.const 0) (i32.const -1) {RET})"))
    configure = on("proxy_on_configure", " ".join([
        st(w, "cfg", f"(call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const -1) {RET})"),
        st(w, "status", "(call $proxy_get_buffer_status (i32.const 7) (i32.const 24) (i32.const 28))"),
        st(w, "getconf", f"(call $proxy_get_configuration {RET})"),
        st(w, "getconf_size", "(i32.load (i32.const 20))"),
    ]))
    h.runtime(w.build(vm_start + configure))
    logged(h.guest_lines(), "vm=1", "cfg=1", "status=1", "getconf=0", "getconf_size=0")


def test_local_response_headers_drop_pseudo_and_invalid_headers(h):
    w = Wat()
    headers = [(b":status", b"200"), (b"X-Ok", b"1"), (b"x-bad", b"a\r\nb")]
    rt = h.runtime(w.build(on("proxy_on_request_headers", f"(drop {local_response(w, headers=headers)})")))
    _, reply, _ = run_request(rt)
    assert (reply.status, reply.headers) == (403, [(b"x-ok", b"1")])
