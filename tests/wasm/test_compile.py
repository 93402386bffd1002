"""compile_modules: everything wrong with a module is a ConfError naming it, its file and the cause."""

import pytest
import wasmtime

from forkgw.conf.model import Wasm, WasmModule
from forkgw.errors import ConfError
from forkgw.wasm import compile_modules

from .conftest import Wat


def compile_one(tmp_path, data: bytes | None, name="auth"):
    path = tmp_path / f"{name}.wasm"
    if data is not None:
        path.write_bytes(data)
    conf = Wasm(modules={name: WasmModule(name=name, path=str(path), where="gateway.conf:7")})
    return compile_modules(conf), str(path)


def conf_error(tmp_path, data, name="auth") -> tuple[ConfError, str]:
    with pytest.raises(ConfError) as info:
        compile_one(tmp_path, data, name)
    return info.value, str(tmp_path / f"{name}.wasm")


def test_a_good_module_compiles_and_records_its_abi(tmp_path):
    compiled, _ = compile_one(tmp_path, Wat().build())
    module = compiled.modules["auth"]
    assert module.abi == "0.2.1"
    assert module.arities["proxy_on_request_headers"] == 3
    compiled, _ = compile_one(tmp_path, Wat(abi="0_1_0").build())
    assert compiled.modules["auth"].abi == "0.1.0"
    assert compiled.modules["auth"].arities["proxy_on_request_headers"] == 2


def test_missing_file(tmp_path):
    err, path = conf_error(tmp_path, None)
    assert str(err) == f'wasm module "auth": open() "{path}" failed (No such file or directory) in gateway.conf:7'
    assert err.where == "gateway.conf:7"


def test_not_wasm(tmp_path):
    err, path = conf_error(tmp_path, b"#!/bin/sh\necho hi\n")
    assert f'"{path}" is not a wasm binary module' in str(err)
    err, _ = conf_error(tmp_path, b"(module)")  # text, not binary
    assert "is not a wasm binary module" in str(err)


def test_invalid_wasm(tmp_path):
    err, path = conf_error(tmp_path, b"\0asm\x01\0\0\0\xff\xff")
    assert f'"{path}" is not a valid wasm module: failed to parse WebAssembly module: malformed section id' in str(err)


def test_no_abi_marker(tmp_path):
    data = wasmtime.wat2wasm('(module (memory (export "memory") 1) (func (export "malloc") (param i32) (result i32) i32.const 0))')
    err, path = conf_error(tmp_path, data)
    assert str(err).startswith(f'wasm module "auth": "{path}" is not a proxy-wasm module (no proxy_abi_version_0_1_0')


def test_no_memory_or_allocator(tmp_path):
    err, _ = conf_error(tmp_path, wasmtime.wat2wasm('(module (func (export "proxy_abi_version_0_2_1")) (func (export "malloc") (param i32) (result i32) i32.const 0))'))
    assert 'does not export its memory as "memory"' in str(err)
    err, _ = conf_error(tmp_path, wasmtime.wat2wasm('(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1")))'))
    assert "exports neither proxy_on_memory_allocate nor malloc" in str(err)


def test_unknown_env_import_is_named(tmp_path):
    w = Wat()
    data = w.build(imports='  (import "env" "proxy_foo" (func (param i32) (result i32)))\n'
                   '  (import "env" "proxy_log" (func $proxy_log (param i32 i32 i32) (result i32)))')
    err, path = conf_error(tmp_path, data)
    assert str(err) == (
        f'wasm module "auth": "{path}": import "env.proxy_foo" is not provided by the host in gateway.conf:7'
    )


def test_wrong_import_type_is_rejected(tmp_path):
    data = Wat().build(
        imports='  (import "env" "proxy_log" (func $proxy_log (param i32 i32) (result i32)))\n'
        '  (func (export "malloc") (param i32) (result i32) (i32.const 0))\n  (memory (export "memory") 1)',
        prelude=False, defaults=False,
    )
    err, _ = conf_error(tmp_path, data)
    assert 'import "env.proxy_log" has type (i32, i32) -> (i32), the host provides (i32, i32, i32) -> (i32)' in str(err)


def test_unknown_import_module_and_non_function_imports(tmp_path):
    imports = '  (import "env" "proxy_log" (func $proxy_log (param i32 i32 i32) (result i32)))'
    err, _ = conf_error(tmp_path, Wat().build(imports=imports + '\n  (import "wasi:io/streams" "read" (func))'))
    assert 'import "wasi:io/streams.read" is not provided by the host (unknown module "wasi:io/streams")' in str(err)
    err, _ = conf_error(tmp_path, Wat().build(imports=imports + '\n  (import "env" "table" (table 1 funcref))'))
    assert 'import "env.table" is not a function' in str(err)
    err, _ = conf_error(tmp_path, Wat().build(imports=imports + '\n  (import "wasi_snapshot_preview1" "thread_spawn" (func (param i32) (result i32)))'))
    assert 'import "wasi_snapshot_preview1.thread_spawn" is not provided' in str(err)


def test_sdk_specific_signatures_of_stubbed_calls_link(tmp_path):
    """AS declares proxy_grpc_call with 10 params, cpp-host with 12: both link; so do abort() variants."""
    imports = "\n".join([
        '  (import "env" "proxy_log" (func $proxy_log (param i32 i32 i32) (result i32)))',
        '  (import "env" "proxy_grpc_call" (func (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))',
        '  (import "env" "abort" (func (param i32 i32 i32 i32)))',
        '  (import "wasi_unstable" "proc_exit" (func (param i32)))',
        '  (import "wasi_unstable" "fd_readdir" (func (param i32 i32 i32 i64 i32) (result i32)))',
        '  (import "env" "emscripten_notify_memory_growth" (func (param i32)))',
        '  (import "env" "pthread_equal" (func (param i32 i32) (result i32)))',
    ])
    compiled, _ = compile_one(tmp_path, Wat().build(imports=imports))
    kinds = {name: kind for _, name, _, (kind, _) in compiled.modules["auth"].plan}
    assert kinds == {"proxy_log": "impl", "proxy_grpc_call": "stub", "abort": "abort", "proc_exit": "impl",
                     "fd_readdir": "stub", "emscripten_notify_memory_growth": "impl", "pthread_equal": "impl"}
