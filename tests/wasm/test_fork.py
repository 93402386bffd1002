"""Compile in the master, run in a forked worker: the worker never compiles."""

import json
import os
import time

import wasmtime

from forkgw.conf.model import FilterRef
from forkgw.log import ErrorLog
from forkgw.wasm import Runtime, compile_modules

from .conftest import REQUEST, Wat, info, on
from .test_failures import CRASH, when_header


def count_compilations(monkeypatch) -> list[int]:
    """Count every way wasmtime-py can produce a Module."""
    counter = [0]
    for name in ("__init__", "deserialize", "deserialize_file", "from_file", "validate"):
        original = getattr(wasmtime.Module, name)
        if name == "__init__":
            def patched(self, *args, _original=original, **kwargs):
                counter[0] += 1
                return _original(self, *args, **kwargs)
        else:
            original = original.__func__

            def patched(cls, *args, _original=original, **kwargs):
                counter[0] += 1
                return _original(cls, *args, **kwargs)

            patched = classmethod(patched)
        monkeypatch.setattr(wasmtime.Module, name, patched)
    return counter


def worker(conf, compiled, log_path) -> dict:
    """What a worker does: start, serve, survive a trap, rebuild, serve again."""
    filters = [FilterRef(module="f")]
    runtime = Runtime(conf, compiled, ErrorLog(log_path, "info"))
    runtime.start(filters)
    replies = []
    for headers in (REQUEST, CRASH, REQUEST):
        stream = runtime.stream(filters, info())
        reply = stream.on_request_headers(list(headers), True)
        if reply is None:
            reply = stream.on_response_headers(200, [], False)
        replies.append(None if reply is None else reply.status)
        stream.finish()
    rebuilds = runtime.states["f"].rebuilds
    runtime.close()
    return {"replies": replies, "rebuilds": rebuilds}


def test_a_forked_worker_never_compiles(h, monkeypatch):
    counter = count_compilations(monkeypatch)
    w = Wat()
    module = w.build(on("proxy_on_request_headers", when_header(w, "x-crash", "unreachable")))
    conf = h.wasm({"f": module})
    compiled = compile_modules(conf)
    assert counter[0] == 1  # the instrument counts the master's compilation
    counter[0] = 0

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            os.close(read_fd)
            result = worker(conf, compiled, h.log_path)
            result["compilations"] = counter[0]
            os.write(write_fd, json.dumps(result).encode())
        except BaseException as err:  # report, never run the rest of pytest in the child
            os.write(write_fd, json.dumps({"error": repr(err)}).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the worker hung (compiling after fork?)")
        time.sleep(0.01)
    with os.fdopen(read_fd) as pipe:
        result = json.loads(pipe.read() or "{}")
    assert result == {"replies": [None, 500, None], "rebuilds": 1, "compilations": 0}
    assert 'wasm "f": VM rebuilt after a failure (rebuild #1)' in h.log()
