"""The per-worker wasm runtime: VMs per module, rebuilds, ticks, streams.

Theory of operation:
- Built in the worker after fork from the master's `Compiled` (never
  compiles).  `start(filters)` turns every distinct FilterRef into a Plugin
  (module, effective root_id, config), starts the epoch ticker,
  and boots one VM per module that has plugins; any boot failure raises
  WasmBootError and the worker should exit as "failed to boot".
- A module's VM that traps is discarded; `ModuleState` decides when to build
  the next one: immediately after the first failure of a VM that served for
  HEALTHY_AFTER seconds, otherwise after a backoff doubling from
  REBUILD_DELAY_MIN up to REBUILD_DELAY_MAX (a crash-looping filter cannot
  eat the worker).  The rebuild happens lazily, when a stream needs the
  module, or from `tick()`.  Until then its filters are unavailable
  (500 or skipped, per on_error).
- `tick(now)` (now = time.monotonic()) performs due rebuilds, fires
  proxy_on_tick for root contexts that set a tick period, delivers
  proxy_on_queue_ready, wakes paused requests that wait for the loop, and
  returns the next monotonic deadline (or None).  A tick may dispatch
  callouts (their answers go to the root context).
- The worker's collaborators come at construction, keyword arguments that
  stay readable as attributes of the same names: `shared` (shared data,
  queues, metrics; LocalShared() by default, ShmShared across workers),
  `http_dispatcher(target, headers, body, timeout_s, on_done) -> bool`,
  which runs HTTP callouts (http_calls.py) on the worker's loop (without it
  proxy_http_call answers InternalFailure), and `wakeup()`, called when a
  paused request waits for the loop: the worker then calls tick() soon
  (without it, its next regular tick() does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable

from ..conf.model import FilterRef, Wasm
from ..log import ErrorLog
from .filter import Stream, StreamInfo
from .http_calls import HttpCalls
from .phases import ON_REQUEST_BODY, ON_RESPONSE_BODY
from .shared import LocalShared
from .vm import VM, Compiled, CompiledModule, Plugin, VMFailed, WasmBootError

HEALTHY_AFTER = 10.0  # seconds a VM must serve before its next failure rebuilds at once
REBUILD_DELAY_MIN = 0.1
REBUILD_DELAY_MAX = 30.0
MAX_CACHED_CHAINS = 1024


def give_memory_back() -> None:
    """After a VM is retired: collect the Python cycles it leaves (cheap, the worker froze
    what it booted with) and hand the heap it freed back to the system (glibc keeps it)."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c"))
    _libc.malloc_trim  # glibc only
except (OSError, AttributeError, TypeError):
    _libc = None


class ModuleState:
    """One module in this worker: its plugins, its current VM, its failure history."""

    def __init__(self, runtime: "Runtime", module: CompiledModule):
        self.runtime = runtime
        self.module = module
        self.plugins: list[Plugin] = []
        self.vm: VM | None = None
        self.failures = 0  # consecutive, for the backoff
        self.booted_at = 0.0
        self.retry_at: float | None = None
        self.rebuilds = 0
        self.boot_memory = 0  # linear memory of the current VM once booted: growth is measured from it

    def _new_vm(self) -> VM:
        rt = self.runtime
        vm = VM(self.module, rt.compiled, rt.wasm, rt.log, rt.shared, self._failed, rt)
        vm.boot(self.plugins)
        self.boot_memory = vm.guest.memory_size()
        return vm

    def boot(self) -> None:
        self.vm = self._new_vm()
        self.booted_at = time.monotonic()

    def _failed(self, vm: VM) -> None:
        self._schedule(time.monotonic())

    def _schedule(self, now: float) -> None:
        if now - self.booted_at >= HEALTHY_AFTER:
            self.failures = 0
        self.failures += 1
        delay = 0.0 if self.failures == 1 else min(REBUILD_DELAY_MIN * 2 ** (self.failures - 2), REBUILD_DELAY_MAX)
        self.retry_at = now + delay

    def ready(self, now: float) -> VM | None:
        """The VM to use now, rebuilding it if it failed and the backoff allows."""
        vm = self.vm
        if vm is not None and not vm.failed:
            return vm
        if self.retry_at is not None and now >= self.retry_at:
            return self.rebuild(now)
        return None

    def recycle_if_grown(self) -> None:
        """Between requests: a VM grown by more than vm_recycle_memory since it booted is replaced.

        Only when no request holds a context in it, so no stream loses its filter.
        SDKs that leak guest memory per request (proxy-runtime 0.1.8 leaks its
        context objects, about 34 bytes a request) stay bounded.
        """
        mark = self.runtime.wasm.vm_recycle_memory
        vm = self.vm
        if not mark or vm is None or vm.failed or len(vm.contexts) > len(vm.roots):
            return
        size = vm.guest.memory_size()
        if size - self.boot_memory <= mark:
            return
        vm.on_failure = lambda vm: None  # a failure while it winds down needs no rebuild
        vm.shutdown()
        self.vm = None
        now = time.monotonic()
        try:
            self.vm = self._new_vm()
        except WasmBootError as err:
            self._schedule(now)
            self.runtime.log.error(f"{err}; next VM rebuild in {self.retry_at - now:g}s")
            return
        self.booted_at = now
        give_memory_back()
        self.runtime.log.notice(f"{self.module.label}: VM recycled at {size} bytes of linear memory")

    def rebuild(self, now: float) -> VM | None:
        self.retry_at = None
        self.vm = None
        log = self.runtime.log
        try:
            vm = self._new_vm()
        except WasmBootError as err:
            self._schedule(now)
            log.error(f"{err}; next VM rebuild in {self.retry_at - now:g}s")
            return None
        self.vm = vm
        self.booted_at = now
        self.rebuilds += 1
        log.notice(f"{self.module.label}: VM rebuilt after a failure (rebuild #{self.rebuilds})")
        return vm


class Runtime:
    """Everything wasm in one worker process."""

    def __init__(self, wasm: Wasm, compiled: Compiled, log: ErrorLog, *, shared=None,
                 http_dispatcher: Callable[..., bool] | None = None, wakeup: Callable[[], None] | None = None):
        self.wasm = wasm
        self.compiled = compiled
        self.log = log
        self.shared = shared if shared is not None else LocalShared()
        self.http_dispatcher = http_dispatcher  # runs a callout's exchange on the worker's loop
        self.wakeup = wakeup  # "call tick() soon"
        self.states: dict[str, ModuleState] = {}
        self.plugins: dict[tuple, Plugin] = {}
        self.chains: dict[int, tuple] = {}
        self.started = False
        self.http_calls = HttpCalls(self)

    def _plugin(self, ref: FilterRef) -> Plugin:
        module = self.wasm.modules.get(ref.module)
        if module is None or module.name not in self.compiled.modules:
            raise WasmBootError(f'unknown wasm module "{ref.module}" in {ref.where or "proxy_wasm"}')
        key = self._key(ref)
        plugin = self.plugins.get(key)
        if plugin is None:
            plugin = Plugin(module, key[1], key[2])
            store = getattr(self.shared, "store", None)  # metrics need the shared store
            if store is not None:
                from ..metrics import FilterMeter

                plugin.meter = FilterMeter(store, module.name, key[1])
            state = self.states.get(module.name)
            if state is None:
                state = self.states[module.name] = ModuleState(self, self.compiled.modules[module.name])
            plugin.state = state
            state.plugins.append(plugin)
            self.plugins[key] = plugin
        return plugin

    def start(self, filters: list[FilterRef]) -> None:
        """Boot one VM per module used by `filters`; WasmBootError if any fails."""
        for ref in filters:
            self._plugin(ref)
        if not self.started:
            self.started = True
            self.compiled.ticker.acquire()
        for state in self.states.values():
            if state.vm is None:
                state.boot()

    def close(self) -> None:
        """Worker exit: root contexts get proxy_on_done/proxy_on_delete, then the VMs go."""
        for state in self.states.values():
            vm, state.vm, state.retry_at = state.vm, None, None
            if vm is not None and not vm.failed:
                vm.on_failure = lambda vm: None  # no rebuild while closing
                vm.shutdown()
        if self.started:
            self.started = False
            self.compiled.ticker.release()

    def stream(self, filters: list[FilterRef], info: StreamInfo) -> Stream:
        """A Stream for one request through `filters` (resolved once per conf list)."""
        cached = self.chains.get(id(filters))
        if cached is None or cached[0] is not filters:
            if len(self.chains) >= MAX_CACHED_CHAINS:  # lists built per request must not pile up
                self.chains.clear()
            chain = self._chain(filters)
            cached = self.chains[id(filters)] = (filters, chain, self._wants(chain))
        return Stream(cached[1], info, self.log, self, cached[2])

    def _wants(self, chain: list[tuple[Plugin, bool]]) -> tuple[bool, bool]:
        """Whether the chain gets request / response bodies (the worker then holds and re-frames them).

        The SDKs export every callback, wanted or not (the AssemblyScript filters
        that only add a header export proxy_on_response_body): a filter needs a
        body phase when its module exports the callback and can change a body
        (imports proxy_set_buffer_bytes), or with `inspect_bodies on`.
        """
        modules = [plugin.state.module for plugin, _ in chain]
        able = [m for m in modules if self.wasm.inspect_bodies or "proxy_set_buffer_bytes" in m.env_imports]
        return any(ON_REQUEST_BODY in m.exports for m in able), any(ON_RESPONSE_BODY in m.exports for m in able)

    def _chain(self, filters: list[FilterRef]) -> list[tuple[Plugin, bool]]:
        chain = []
        for ref in filters:
            plugin = self.plugins.get(self._key(ref))
            if plugin is None:
                raise LookupError(f'wasm filter "{ref.module}" was not passed to Runtime.start()')
            chain.append((plugin, ref.on_error != "continue"))
        return chain

    def _key(self, ref: FilterRef) -> tuple:
        """(module, effective root_id, config): one root context per key.

        `ref.config` is final: the conf parser already put the module's default
        in place of a missing config, so an explicit '' stays empty (the filter
        sees no configuration) instead of turning back into the default.
        """
        module = self.wasm.modules.get(ref.module)
        if module is None:
            return (ref.module, ref.root_id, ref.config)
        root_id = ref.root_id if ref.root_id is not None else (module.root_id if module.root_id is not None else module.name)
        return (module.name, root_id, ref.config)

    def tick(self, now: float) -> float | None:
        """Due rebuilds, proxy_on_tick, proxy_on_queue_ready; returns the next deadline."""
        for state in self.states.values():
            vm = state.ready(now)
            if vm is None:
                continue
            for root in list(vm.roots.values()):
                if root.next_tick is None or now < root.next_tick or vm.failed:
                    continue
                root.next_tick = now + root.tick_period
                if vm.has("proxy_on_tick"):
                    try:
                        vm.invoke(root, "proxy_on_tick", root.id)
                    except VMFailed:
                        break
        for queue in self.shared.take_ready():
            owner = queue.owner
            vm = owner.vm
            if vm.failed or vm.roots.get(owner.plugin.key) is not owner or not vm.has("proxy_on_queue_ready"):
                continue
            try:
                vm.invoke(owner, "proxy_on_queue_ready", owner.id, queue.id)
            except VMFailed:
                pass
        http_calls = self.http_calls
        if http_calls.early or http_calls.touched or http_calls.soon:
            http_calls.settle()
        deadlines = []
        for state in self.states.values():
            vm = state.vm
            if vm is None or vm.failed:
                if state.retry_at is not None:
                    deadlines.append(state.retry_at)
                continue
            deadlines.extend(root.next_tick for root in vm.roots.values() if root.next_tick is not None)
        if self.shared.ready:
            deadlines.append(now)
        return min(deadlines) if deadlines else None
