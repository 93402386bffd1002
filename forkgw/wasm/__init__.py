"""proxy-wasm filters in forkgw: the same .wasm plugins Envoy, Kong and APISIX run.

Theory of operation (one module per job):
- abi.py: enums, statuses, the pairs and property-path formats.
- vm.py: `compile_modules()` in the master (serial compilation, every import
  checked -> ConfError); `VM` = one Store + instance per module per worker;
  boot, callbacks under an epoch deadline, traps contained.
- host.py: the env/WASI imports, linked by the module's own import list.
- inputs.py: what each callback may read (`CallbackInput`).
- guest.py: the wasm boundary (calls, memory reads/writes, allocation).
- properties.py: proxy_get/set_property and the value encoding.
- filter.py: `Stream`, one request through the filter chain.
- bodies.py: a stream's body phases (held buffers, the bound, holds).
- phases.py: the phase callbacks and what a phase answers (`LocalReply`,
  `PAUSED`).
- http_calls.py: proxy_http_call on the filter's side (tokens, answers,
  paused requests); the exchange itself is the worker's (forkgw/http/).
- runtime.py: `Runtime`, the per-worker owner of VMs, rebuilds and ticks.
- shared.py: shared data, queues, metrics (across workers over the shm store,
  or per worker without one).

Master:  compiled = compile_modules(conf.wasm)            # before fork
Worker:  runtime = Runtime(conf.wasm, compiled, log, shared=..., http_dispatcher=..., wakeup=...)
         runtime.start(all_filter_refs)
         stream = runtime.stream(location_filters, StreamInfo(...))
         reply = stream.on_request_headers(pairs, eos)    # then read stream.request_headers
         reply = stream.on_response_headers(status, pairs, eos)  # then stream.status, .response_headers
         stream.finish()                                  # always, once the exchange is over
"""

from .filter import PAUSED, LocalReply, Stream, StreamInfo
from .runtime import Runtime
from .vm import Compiled, WasmBootError, compile_modules

__all__ = ["PAUSED", "compile_modules", "Compiled", "Runtime", "Stream", "StreamInfo", "LocalReply", "WasmBootError"]
