"""The filter chain: callback order, phases, pause, lifecycle of contexts."""

import re

from forkgw.conf.model import FilterRef

from .conftest import REQUEST, RESPONSE, Wat, info, on, run_request
from .test_hostcalls import st


def test_boot_and_request_callback_order(h):
    rt = h.runtime(Wat().build())
    run_request(rt)
    assert h.guest_lines() == [
        "context_create=1", "vm_start=1", "configure=1",
        "context_create=2", "request_headers=2", "response_headers=2", "done=2", "log=2", "delete=2",
    ]


def test_finish_runs_done_then_log_then_delete_over_the_whole_chain(h):
    rt = h.runtime({"a": Wat().build(), "b": Wat().build()})
    run_request(rt)
    tail = [m for m in h.messages() if m.startswith("*42 ")][-6:]
    assert tail == [
        '*42 wasm "a" root_id "a": done=2', '*42 wasm "b" root_id "b": done=2',
        '*42 wasm "a" root_id "a": log=2', '*42 wasm "b" root_id "b": log=2',
        '*42 wasm "a" root_id "a": delete=2', '*42 wasm "b" root_id "b": delete=2',
    ]


def test_finish_is_idempotent_and_cheap_without_contexts(h):
    rt = h.runtime(Wat().build())
    stream = rt.stream(rt.filters, info())
    stream.finish()  # no phase ran: no context, no callback
    assert h.guest_lines() == ["context_create=1", "vm_start=1", "configure=1"]
    stream, _, _ = run_request(rt)
    stream.finish()
    stream.finish()
    assert h.guest_lines().count("done=2") == 1 and h.guest_lines().count("delete=2") == 1


def test_context_ids_are_not_reused_while_live_and_contexts_are_forgotten(h):
    rt = h.runtime(Wat().build())
    s1 = rt.stream(rt.filters, info())
    s2 = rt.stream(rt.filters, info())
    s1.on_request_headers(list(REQUEST), True)
    s2.on_request_headers(list(REQUEST), True)
    assert "context_create=2" in h.guest_lines() and "context_create=3" in h.guest_lines()
    vm = rt.states["f"].vm
    assert set(vm.contexts) == {1, 2, 3}
    s1.finish()
    s2.finish()
    assert set(vm.contexts) == {1}


def test_response_filters_run_in_conf_order(h):
    """Kong/nginx order, not Envoy's reverse order."""
    modules = {}
    for name in ("first", "second"):
        w = Wat()
        add = "(drop (call $proxy_add_header_map_value (i32.const {map}) {key} {value}))"
        modules[name] = w.build(
            on("proxy_on_request_headers", add.format(map=0, key=w.s("x-order"), value=w.s(name)))
            + on("proxy_on_response_headers", add.format(map=2, key=w.s("x-order"), value=w.s(name)))
        )
    rt = h.runtime(modules)
    stream, _, _ = run_request(rt)
    assert [v for k, v in stream.request_headers if k == b"x-order"] == [b"first", b"second"]
    assert [v for k, v in stream.response_headers if k == b"x-order"] == [b"first", b"second"]


def test_headers_count_and_end_of_stream_are_passed(h):
    w = Wat()
    code = st(w, "count", "(local.get 1)") + " " + st(w, "eos", "(local.get 2)")
    rt = h.runtime(w.build(on("proxy_on_request_headers", code) + on("proxy_on_response_headers", code)))
    run_request(rt)
    assert h.guest_lines()[4:8] == [f"count={len(REQUEST)}", "eos=1", f"count={len(RESPONSE) + 1}", "eos=0"]


def test_abi_0_1_0_callbacks_get_two_params(h):
    w = Wat(abi="0_1_0")
    rt = h.runtime(w.build(on("proxy_on_request_headers", st(w, "count", "(local.get 1)"), abi="0_1_0")))
    _, r1, r2 = run_request(rt)
    assert r1 is None and r2 is None
    assert f"count={len(REQUEST)}" in h.guest_lines()


def test_pause_is_logged_once_and_treated_as_continue(h):
    w = Wat()
    rt = h.runtime(w.build(on("proxy_on_request_headers", "(return (i32.const 1))")))
    _, r1, r2 = run_request(rt)
    _, r1b, _ = run_request(rt)
    assert r1 is None and r2 is None and r1b is None
    warnings = [m for m in h.messages("warn") if "pause" in m]
    assert warnings == ['*42 wasm "f" root_id "f": proxy_on_request_headers returned 1 (pause), '
                        "but nothing can resume the stream yet: continuing"]


def test_one_root_context_per_distinct_plugin_and_one_vm_start_per_vm(h):
    w = Wat()
    configure = on("proxy_on_configure", st(w, "configure", "(local.get 1)"))
    module = w.build(configure)
    filters = [FilterRef(module="f", config="ab"), FilterRef(module="f", config="ab"), FilterRef(module="f", config="xyz"),
               FilterRef(module="f", root_id="other", config="ab")]
    rt = h.runtime(module, filters=filters)
    assert h.guest_lines() == ["context_create=1", "vm_start=1", "configure=2",
                               "context_create=2", "configure=3", "context_create=3", "configure=2"]
    assert len(rt.states["f"].vm.roots) == 3
    assert rt.states["f"].vm.roots[("f", "f", "xyz")].id == 2


def test_the_config_of_the_filter_ref_is_final(h):
    """The parser resolves the plugin.yaml default; an explicit '' must stay empty, not fall back."""
    w = Wat()
    configure = on("proxy_on_configure", "(drop (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (i32.const -1) (i32.const 16) (i32.const 20)))"
                   f" (call $log_num {w.s('size')} (local.get 1)) (call $log_ret {w.s('cfg')})")
    rt = h.runtime(w.build(configure), start=False)
    rt.wasm.modules["f"].default_config = "from-plugin-yaml"
    rt.start([FilterRef(module="f", config=""), FilterRef(module="f", config="explicit")])
    lines = h.guest_lines()
    assert "cfg:explicit" in lines and "size=0" in lines
    assert not any("from-plugin-yaml" in line for line in lines)


def test_empty_chain_passes_headers_through(h):
    rt = h.runtime(Wat().build())
    stream = rt.stream([], info())
    assert stream.on_request_headers(list(REQUEST), True) is None
    assert stream.request_headers == REQUEST
    assert stream.on_response_headers(204, list(RESPONSE), True) is None
    assert (stream.status, stream.response_headers) == (204, RESPONSE)
    stream.finish()


def test_stream_for_a_filter_not_started_is_a_programming_error(h):
    rt = h.runtime(Wat().build())
    try:
        rt.stream([FilterRef(module="f", config="never started")], info())
    except LookupError as err:
        assert "was not passed to Runtime.start()" in str(err)
    else:
        raise AssertionError("expected LookupError")


def test_chain_resolution_is_cached_per_filter_list(h):
    rt = h.runtime(Wat().build())
    rt.stream(rt.filters, info())
    rt.stream(rt.filters, info())
    assert len(rt.chains) == 1
    assert re.search(r"context_create", h.log())


def test_close_finishes_root_contexts(h):
    rt = h.runtime(Wat().build())
    run_request(rt)
    rt.close()
    assert h.guest_lines()[-2:] == ["done=1", "delete=1"]
    rt.close()  # idempotent
    assert h.guest_lines()[-2:] == ["done=1", "delete=1"]


def test_header_names_from_the_worker_are_lowered_for_the_filters(h):
    """The worker's own heads say "Content-Type"; a filter asking for "content-type" must find it."""
    w = Wat()
    code = (f"(call $log_num {w.s('st')} (call $proxy_get_header_map_value (i32.const 2) {w.s('content-type')}"
            f" (i32.const 16) (i32.const 20))) (call $log_ret {w.s('type')})")
    rt = h.runtime(w.build(on("proxy_on_response_headers", code)))
    stream = rt.stream(rt.filters, info())
    stream.on_request_headers([(b":method", b"GET"), (b":path", b"/"), (b"X-Mixed", b"1")], True)
    assert stream.on_response_headers(200, [(b"Content-Type", b"text/plain")], False) is None
    stream.finish()
    assert "st=0" in h.guest_lines() and "type:text/plain" in h.guest_lines()
    assert stream.request_headers[-1] == (b"x-mixed", b"1")
    assert stream.response_headers == [(b"content-type", b"text/plain")]
