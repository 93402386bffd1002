"""Compile in the master, instantiate in the worker, and contain every trap.

Theory of operation:
- `compile_modules()` runs in the master (and for `forkgw -t`): one Engine
  with parallel compilation OFF (a worker forked after a parallel compile
  hangs if it ever compiles) and epoch interruption ON; every module is read,
  compiled once, and checked: ABI marker export, `memory` export, an
  allocator export, and every import resolvable by host.resolve_import().
  Any problem is a ConfError naming the module, the file and the import.
  The result (engine + modules + link plans) is inherited by the workers
  across fork(); workers never compile.
- A `VM` is one Store + one instance of one module in one worker.  `boot()`
  instantiates (the AS start section runs here), runs `_initialize` (+ `main`
  or `__main_void`) or `_start` (proc_exit(0) from `_start` is success), and
  then, per distinct plugin (module, root_id, config): proxy_on_context_create
  (R, 0), proxy_on_vm_start once per VM with the VM config, proxy_on_configure
  with the plugin config.  False or a trap -> WasmBootError.
- Every call into the guest goes through `VM.invoke()`: the context it is a
  callback of, what that callback may read (`input`, see inputs.py; the
  configuration for proxy_on_vm_start / proxy_on_configure), an epoch deadline
  (callback_timeout; a longer BOOT_TIMEOUT while booting), traps caught
  (wasmtime traps, proc_exit, abort, the epoch interrupt, a failed memory
  grow under the store's memory cap).  On the first trap the VM is marked
  failed, the trap is logged at [error] naming the filter, and the VM is
  never called again; the owner (runtime.ModuleState) builds a new one.
- An `EpochTicker` thread per engine and process (started after fork, by
  Runtime.start) increments the engine epoch every `tick_interval`.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time

import wasmtime

from ..conf.model import Wasm, WasmModule
from ..errors import ConfError
from ..log import ErrorLog
from .abi import ABI_MARKERS, BufferType
from .guest import UNWIND, Guest, GuestAbort, GuestExit, new_guest, signature
from .host import Host, resolve_import
from .inputs import NO_INPUT, BufferInput, CallbackInput

BOOT_TIMEOUT = 10.0  # seconds _initialize/_start/on_vm_start/on_configure may run
MAX_CONTEXT_ID = 0x7FFFFFFF  # ids go to wasm as i32 params
_clock = time.perf_counter_ns


class WasmBootError(Exception):
    """A module could not be started in a worker (names the filter, file and reason)."""


class VMFailed(Exception):
    """Internal: the VM trapped during a call (already logged unless booting)."""


# -- compile (master) --------------------------------------------------------


class CompiledModule:
    """One module compiled in the master, with what the worker needs to link it."""

    def __init__(self, conf: WasmModule, module: wasmtime.Module, abi: str, plan, exports: dict[str, str]):
        self.conf = conf
        self.name = conf.name
        self.path = conf.path
        self.module = module
        self.abi = abi
        self.plan = plan  # [(import module, name, FuncType, (kind, arg))]
        self.exports = exports  # function export name -> signature ("ii:i")
        self.env_imports = frozenset(name for mod, name, _, _ in plan if mod == "env")
        self.arities = {name: sig.index(":") for name, sig in exports.items()}  # export -> parameter count
        self.label = f'wasm "{conf.name}"'

class Compiled:
    """Everything compile_modules() built; read-only after fork."""

    def __init__(self, engine: wasmtime.Engine, wasm: Wasm):
        self.engine = engine
        self.modules: dict[str, CompiledModule] = {}
        timeout = wasm.callback_timeout
        self.tick_interval = min(max(timeout / 5, 0.001), 0.01)
        self.callback_ticks = math.ceil(timeout / self.tick_interval) + 1
        self.boot_ticks = math.ceil(max(BOOT_TIMEOUT, timeout) / self.tick_interval) + 1
        self.ticker = EpochTicker(engine, self.tick_interval)


def new_engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.parallel_compilation = False
    config.epoch_interruption = True
    # a memory's base address never changes (growth stays inside the reservation,
    # 4 GiB on 64-bit hosts, the whole 32-bit space): the boundary caches it
    config.memory_may_move = False
    return wasmtime.Engine(config)


def compile_modules(wasm: Wasm) -> Compiled:
    """Compile and check every module of `wasm` (master, before fork)."""
    compiled = Compiled(new_engine(), wasm)
    for name, conf in wasm.modules.items():
        compiled.modules[name] = _compile(compiled.engine, conf)
    return compiled


def _summary(err: Exception) -> str:
    """wasmtime errors are "what\n\nCaused by:\n    0: ...\n    1: why": keep what and why."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    why = re.sub(r"^\d+: ", "", lines[-1])
    return lines[0] if len(lines) == 1 else f"{lines[0]}: {why}"


def _compile(engine: wasmtime.Engine, conf: WasmModule) -> CompiledModule:
    where = conf.where
    head = f'wasm module "{conf.name}"'
    try:
        with open(conf.path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ConfError(f'{head}: open() "{conf.path}" failed ({err.strerror})', where) from None
    if data[:4] != b"\0asm":
        raise ConfError(f'{head}: "{conf.path}" is not a wasm binary module', where)
    try:
        module = wasmtime.Module(engine, data)
    except wasmtime.WasmtimeError as err:
        raise ConfError(f'{head}: "{conf.path}" is not a valid wasm module: {_summary(err)}', where) from None

    exports: dict[str, str] = {}
    memory = False
    for export in module.exports:
        if isinstance(export.type, wasmtime.FuncType):
            exports[export.name] = signature(export.type)
        elif isinstance(export.type, wasmtime.MemoryType) and export.name == "memory":
            memory = True
    abi = next((ABI_MARKERS[name] for name in exports if name in ABI_MARKERS), None)
    if abi is None:
        raise ConfError(
            f'{head}: "{conf.path}" is not a proxy-wasm module (no proxy_abi_version_0_1_0, '
            f"proxy_abi_version_0_2_0 or proxy_abi_version_0_2_1 export)",
            where,
        )
    if not memory:
        raise ConfError(f'{head}: "{conf.path}" does not export its memory as "memory"', where)
    if "proxy_on_memory_allocate" not in exports and "malloc" not in exports:
        raise ConfError(f'{head}: "{conf.path}" exports neither proxy_on_memory_allocate nor malloc', where)
    plan = []
    for imp in module.imports:
        try:
            plan.append((imp.module, imp.name, imp.type, resolve_import(imp.module, imp.name, imp.type)))
        except ValueError as err:
            raise ConfError(f'{head}: "{conf.path}": {err}', where) from None
    return CompiledModule(conf, module, abi, plan, exports)


# -- epochs (worker) ---------------------------------------------------------


class EpochTicker:
    """A daemon thread that advances the engine's epoch; one per engine and process."""

    def __init__(self, engine: wasmtime.Engine, interval: float):
        self.engine = engine
        self.interval = interval
        self.ticks = 0  # counted before each epoch increment: a guest that sees it unchanged need not re-arm
        self.users = 0
        self.pid = 0
        self.stop_event: threading.Event | None = None

    def acquire(self) -> None:
        if self.pid != os.getpid():  # not started, or started in the master before fork
            self.pid = os.getpid()
            self.users = 0
            self.stop_event = None
        self.users += 1
        if self.stop_event is None:
            self.stop_event = threading.Event()
            thread = threading.Thread(
                target=self._run, args=(self.stop_event,), name="wasm-epoch", daemon=True
            )
            thread.start()

    def release(self) -> None:
        if self.pid != os.getpid() or self.users == 0:
            return
        self.users -= 1
        if self.users == 0 and self.stop_event is not None:
            self.stop_event.set()
            self.stop_event = None

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self.ticks += 1
            self.engine.increment_epoch()


# -- contexts ----------------------------------------------------------------


class Plugin:
    """One distinct (module, root_id, config) of the conf; outlives VM rebuilds."""

    def __init__(self, module: WasmModule, root_id: str, config: str):
        self.module = module.name
        self.root_id = root_id
        self.config = config
        self.key = (module.name, root_id, config)
        self.label = f'wasm "{module.name}" root_id "{root_id}"'
        self.state = None  # runtime.ModuleState
        self.warned: set[str] = set()
        self.meter = None  # metrics.FilterMeter when the gateway keeps metrics


class RootContext:
    __slots__ = ("id", "plugin", "vm", "properties", "tick_period", "next_tick")
    stream = None

    def __init__(self, context_id: int, plugin: Plugin, vm: "VM"):
        self.id = context_id
        self.plugin = plugin
        self.vm = vm
        self.properties: dict = {}
        self.tick_period = 0.0
        self.next_tick: float | None = None

    @property
    def root(self) -> "RootContext":
        return self

    def set_tick_period(self, seconds: float) -> None:
        self.tick_period = seconds
        self.next_tick = time.monotonic() + seconds if seconds > 0 else None


class HttpContext:
    __slots__ = ("id", "plugin", "root", "vm", "stream", "calls")

    def __init__(self, context_id: int, root: RootContext, stream):
        self.id = context_id
        self.plugin = root.plugin
        self.root = root
        self.vm = root.vm
        self.stream = stream
        self.calls = 0  # its HTTP callouts still in flight: a pause can wait for them


# -- the VM ------------------------------------------------------------------


class VM:
    """One Store + instance of one module in this worker."""

    def __init__(self, module: CompiledModule, compiled: Compiled, wasm: Wasm, log: ErrorLog, shared, on_failure,
                 runtime=None):
        self.module = module
        self.runtime = runtime  # the owner of callouts (None: a VM alone, callouts unsupported)
        self.engine = compiled.engine
        self.ticker = compiled.ticker
        self.callback_ticks = compiled.callback_ticks
        self.boot_ticks = compiled.boot_ticks
        self.callback_timeout = wasm.callback_timeout
        self.memory_max = wasm.memory_max
        self.log = log
        self.shared = shared
        self.on_failure = on_failure
        self.abi = module.abi
        self.label = module.label
        self.vm_id = module.name
        self.exports = module.exports
        self.arities = module.arities
        self.contexts: dict[int, RootContext | HttpContext] = {}
        self.roots: dict[tuple, RootContext] = {}
        self.next_id = 1
        self.failed = False
        self.booting = False
        self.vm_started = False
        self.store: wasmtime.Store | None = None
        self.guest: Guest | None = None
        self.host: Host | None = None

    def has(self, export: str) -> bool:
        return export in self.exports

    # -- boot ---------------------------------------------------------------

    def boot(self, plugins: list[Plugin]) -> None:
        """Instantiate, run the start functions, create the root contexts; WasmBootError on failure."""
        self.booting = True
        path = self.module.path
        try:
            try:
                self._instantiate()
            except UNWIND as err:
                self.failed = True
                raise WasmBootError(f"{self.label} ({path}): instantiation failed: {self.describe(err)}") from None
            self._start_functions()
            for plugin in plugins:
                self.add_root(plugin)
        except VMFailed as err:
            raise WasmBootError(str(err)) from None
        finally:
            self.booting = False
            if self.guest is not None:
                self.guest.deadline_ticks = self.callback_ticks
            if self.failed:
                self._release()

    def _instantiate(self) -> None:
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=self.memory_max)
        self.store = store
        guest = new_guest(store, self.boot_ticks, memory_fixed=True, epoch=self.ticker)  # new_engine(): fixed
        self.host = Host(self, guest)
        linker = wasmtime.Linker(self.engine)
        self.host.link(linker, self.module.plan)
        store.set_epoch_deadline(self.boot_ticks)
        guest.instantiate(linker, self.module.module)
        self.guest = guest

    def _start_functions(self) -> None:
        path = self.module.path
        if self.has("_initialize"):
            self.invoke(None, "_initialize", what=f"{self.label} ({path})")
            main = next((name for name in ("main", "__main_void") if self.has(name)), None)
            if main is not None:
                args = (0, 0)[: self.arities[main]]
                self.invoke(None, main, *args, what=f"{self.label} ({path})")
        elif self.has("_start"):
            self.invoke(None, "_start", what=f"{self.label} ({path})", exit_ok=True)

    def add_root(self, plugin: Plugin) -> RootContext:
        """Root context for `plugin`: create, vm_start (first root only), configure."""
        what = f"{plugin.label} ({self.module.path})"
        root = RootContext(self.new_id(), plugin, self)
        self.contexts[root.id] = root
        self.roots[plugin.key] = root
        if self.has("proxy_on_context_create"):
            self.invoke(root, "proxy_on_context_create", root.id, 0, what=what)
        if not self.vm_started:
            self.vm_started = True
            vm_config = self.module.conf.vm_config.encode()
            if self.has("proxy_on_vm_start"):
                ok = self._with_buffer(BufferType.VM_CONFIGURATION, vm_config, root, "proxy_on_vm_start", len(vm_config), what)
                if not ok:
                    self.failed = True
                    raise VMFailed(f"{what}: proxy_on_vm_start returned false")
        config = plugin.config.encode()
        if self.has("proxy_on_configure"):
            ok = self._with_buffer(BufferType.PLUGIN_CONFIGURATION, config, root, "proxy_on_configure", len(config), what)
            if not ok:
                self.failed = True
                raise VMFailed(f"{what}: proxy_on_configure returned false")
        return root

    def _with_buffer(self, buffer_type: int, data: bytes, root: RootContext, export: str, size: int, what: str):
        # An empty configuration is no buffer at all (NotFound), as in Envoy: the AS SDK
        # 0.1.8 then aborts in proxy_on_configure, the Rust SDK sees None.
        config = BufferInput(buffer_type, data) if data else NO_INPUT
        args = (root.id, size)[: self.arities[export]]
        return self.invoke(root, export, *args, what=what, input=config)

    def new_id(self) -> int:
        context_id = self.next_id
        while context_id in self.contexts:
            context_id = context_id % MAX_CONTEXT_ID + 1
        self.next_id = context_id % MAX_CONTEXT_ID + 1
        return context_id

    def new_http_context(self, plugin: Plugin, stream) -> HttpContext:
        root = self.roots[plugin.key]
        ctx = HttpContext(self.new_id(), root, stream)
        self.contexts[ctx.id] = ctx
        if self.has("proxy_on_context_create"):
            self.invoke(ctx, "proxy_on_context_create", ctx.id, root.id)
        return ctx

    def shutdown(self) -> None:
        """Worker exit: proxy_on_done for every root context, proxy_on_delete if it said done.

        A root that answers false would finish later with proxy_done(); the
        worker is exiting, so it is not waited for.
        """
        for root in list(self.roots.values()):
            try:
                done = self.invoke(root, "proxy_on_done", root.id) if self.has("proxy_on_done") else 1
                if done and self.has("proxy_on_delete"):
                    self.invoke(root, "proxy_on_delete", root.id)
            except VMFailed:
                return
        self.roots.clear()
        self._release()
        self.failed = True

    # -- calls ----------------------------------------------------------------

    def invoke(self, ctx, export: str, *args: int, what: str | None = None, exit_ok: bool = False,
               input: CallbackInput = NO_INPUT):
        """Call `export` as a callback of `ctx` that may read `input`; VMFailed (after logging) on any trap."""
        if self.failed:
            raise VMFailed(f"{self.label}: VM failed earlier")
        host = self.host
        host.current = ctx
        host.effective = None
        host.input = input
        meter = ctx.plugin.meter if ctx is not None else None
        started = _clock() if meter is not None else 0
        try:
            return self.guest.call(export, *args)
        except GuestExit as err:
            if exit_ok and err.code == 0:
                return None
            self._fail(ctx, export, err, what)
        except UNWIND as err:
            self._fail(ctx, export, err, what)
        except Exception as err:  # a host bug surfaced through the call
            self.log.crit(f"{self.label}: host error during {export}: {err!r}")
            self._fail(ctx, export, err, what)
        finally:
            host.current = host.effective = None
            host.input = NO_INPUT
            host.flush_output()
            if meter is not None:
                meter.record_ns(export, _clock() - started)

    def _fail(self, ctx, export: str, err: BaseException, what: str | None):
        reason = self.describe(err)
        self.failed = True
        if ctx is not None and ctx.plugin.meter is not None:
            ctx.plugin.meter.traps.add(1)
        self.host.flush_output()  # what the guest printed before dying comes first
        label = what or (ctx.plugin.label if ctx is not None else self.label)
        if not self.booting:
            where = f"*{ctx.stream.info.connection_id} " if ctx is not None and ctx.stream is not None else ""
            self.log.error(f"{where}{label}: {export} failed: {reason}; the VM is discarded and will be rebuilt")
            trace = str(err).strip() if isinstance(err, wasmtime.Trap) else ""
            if trace and self.log.enabled("info"):
                self.log.info(f"{label}: {trace}".replace("\n", " | "))
            self._release()
            self.on_failure(self)
        raise VMFailed(f"{label}: {export} failed: {reason}") from None

    def describe(self, err: BaseException) -> str:
        """A one-line reason for a trap."""
        if isinstance(err, GuestExit):
            return f"proc_exit({err.code})"
        if isinstance(err, GuestAbort):
            return str(err)
        if isinstance(err, wasmtime.Trap):
            if err.trap_code == wasmtime.TrapCode.INTERRUPT:
                limit = BOOT_TIMEOUT if self.booting else self.callback_timeout
                return f"timed out after {limit * 1000:g} ms (wasm trap: interrupt)"
            lines = [line.strip() for line in err.message.splitlines() if line.strip()]
            reason = lines[-1] if lines else "wasm trap"
        elif isinstance(err, wasmtime.WasmtimeError):
            reason = _summary(err)
        else:
            reason = f"host error: {err!r}"
        if self.guest is not None and self.store is not None:
            # the store refuses memory.grow past memory_max (grow returns -1); the guest
            # then usually traps (allocation failure): say so when memory is near the cap
            try:
                size = self.guest.memory_size()
            except wasmtime.WasmtimeError:
                size = 0
            if size * 4 >= self.memory_max * 3:
                reason += f" (memory near its limit: {size} of {self.memory_max} bytes)"
        return reason

    def _release(self) -> None:
        """Forget the instance: no call can reach it any more.

        The Store (and its linear memory) is freed right here: besides ours, its
        only reference is the guest's, and the guest sits in a reference cycle
        (store -> its host callbacks -> host/guest -> store) that only a full
        gc.collect() would reclaim, so retired VMs (vm_recycle_memory, rebuilds)
        would pile up, each with its linear memory still mapped.
        """
        self.contexts.clear()
        guest = self.host.mem if self.host is not None else self.guest
        if guest is not None:
            guest.store = None
        self.guest = None
        self.store = None
