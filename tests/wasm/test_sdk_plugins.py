"""The real AssemblyScript (@solo-io/proxy-runtime 0.1.8) filters from plugins/, unchanged."""

import gc
import weakref
from pathlib import Path

import pytest

from forkgw.conf.model import FilterRef, Wasm, WasmModule
from forkgw.log import ErrorLog
from forkgw.wasm import Runtime, WasmBootError, compile_modules

from .conftest import REQUEST, RESPONSE, info

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


def plugin_runtime(h, name: str, config: str, level="info") -> Runtime:
    path = PLUGINS / name / "release.wasm"
    if not path.exists():
        pytest.skip(f"{path} is not built")
    conf = Wasm(modules={name: WasmModule(name=name, path=str(path), root_id=name, where="gateway.conf:3")})
    runtime = Runtime(conf, compile_modules(conf), ErrorLog(h.log_path, level))
    h.runtimes.append(runtime)
    runtime.filters = [FilterRef(module=name, config=config)]
    runtime.start(runtime.filters)
    return runtime


def exchange(runtime, headers=REQUEST, response=RESPONSE):
    stream = runtime.stream(runtime.filters, info())
    reply = stream.on_request_headers(list(headers), True)
    if reply is None:
        reply = stream.on_response_headers(200, list(response), False)
    stream.finish()
    return stream, reply


def test_add_header(h):
    runtime = plugin_runtime(h, "add_header", "add_header")
    for _ in range(3):  # contexts come and go; the VM keeps serving
        stream, reply = exchange(runtime)
        assert reply is None
        assert stream.response_headers == RESPONSE + [(b"hello", b"add_header")]
        assert stream.status == 200
    assert "[error]" not in h.log() and "[crit]" not in h.log()


def test_a_recycled_vm_frees_its_store_at_once(h):
    runtime = plugin_runtime(h, "add_header", "add_header")
    runtime.wasm.vm_recycle_memory = 1
    state = runtime.states["add_header"]
    state.boot_memory = 0  # as if all of its memory had grown since boot: recycled after the request
    old = weakref.ref(state.vm.store)
    gc.disable()
    try:
        exchange(runtime)
        assert state.vm is not None and state.vm.store is not old()
        assert old() is None  # its linear memory is gone now, not at the next full collection
    finally:
        gc.enable()


def test_add_header_with_an_empty_configuration_fails_to_boot(h):
    with pytest.raises(WasmBootError) as err:
        plugin_runtime(h, "add_header", "")
    message = str(err.value)
    assert message.startswith('wasm "add_header" root_id "add_header" (')
    assert message.endswith("release.wasm): proxy_on_configure failed: proc_exit(255)")
    assert '[crit]' in h.log()  # the SDK logs the failed status at critical level before aborting


def test_auth_token(h):
    runtime = plugin_runtime(h, "auth_token", '{"header":"x-api-key","token":"secret"}')
    _, reply = exchange(runtime)
    assert reply.status == 401
    assert reply.body == b"missing credentials\n"
    assert (b"www-authenticate", b'Bearer realm="forkgw"') in reply.headers
    _, reply = exchange(runtime, headers=REQUEST + [(b"x-api-key", b"wrong")])
    assert reply.status == 403
    stream, reply = exchange(runtime, headers=REQUEST + [(b"x-api-key", b"Bearer secret")])
    assert reply is None and stream.status == 200
    with pytest.raises(WasmBootError, match="proxy_on_configure returned false"):
        plugin_runtime(h, "auth_token", "{}")


def test_rewrite(h):
    runtime = plugin_runtime(
        h, "rewrite", '{"path":"/old/=/new/","remove_request":"x-internal","remove_response":"server,x-powered-by"}')
    request = [(b":method", b"GET"), (b":path", b"/old/a?b=1"), (b":authority", b"h"), (b":scheme", b"http"),
               (b"x-internal", b"1"), (b"accept", b"*/*")]
    response = [(b"server", b"upstream"), (b"x-powered-by", b"php"), (b"content-length", b"0")]
    stream, reply = exchange(runtime, headers=request, response=response)
    assert reply is None
    assert stream.request_headers[:4] == [(b":method", b"GET"), (b":path", b"/new/a?b=1"), (b":authority", b"h"),
                                          (b":scheme", b"http")]
    assert (b"x-original-path", b"/old/a?b=1") in stream.request_headers
    assert not any(name == b"x-internal" for name, _ in stream.request_headers)
    assert stream.response_headers == [(b"content-length", b"0")]
