"""Layers only look down: each package's imports, read from the source, stay below it.

    cli -> master -> worker -> http -> wasm
                        \\        \\
                         net      conf model, shm, log, errors (the bottom)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "forkgw"

# module (file or package) -> forkgw modules it must never import
FORBIDDEN = {
    "net": ("forkgw.http", "forkgw.wasm", "forkgw.worker", "forkgw.master", "forkgw.conf", "forkgw.routing"),
    "http": ("forkgw.worker", "forkgw.master", "forkgw.cli"),
    "wasm": ("forkgw.http", "forkgw.net", "forkgw.worker", "forkgw.master", "forkgw.routing"),
    "conf": ("forkgw.http", "forkgw.net", "forkgw.wasm", "forkgw.worker", "forkgw.master", "forkgw.routing"),
    "shm": ("forkgw.http", "forkgw.net", "forkgw.wasm", "forkgw.worker", "forkgw.master", "forkgw.conf"),
    "log.py": ("forkgw.http", "forkgw.net", "forkgw.wasm", "forkgw.worker", "forkgw.master", "forkgw.conf"),
    "errors.py": ("forkgw.http", "forkgw.net", "forkgw.wasm", "forkgw.worker", "forkgw.master", "forkgw.conf"),
    "routing.py": ("forkgw.http", "forkgw.worker", "forkgw.master", "forkgw.wasm"),
    "tls.py": ("forkgw.http", "forkgw.worker", "forkgw.master", "forkgw.wasm"),
}


def imports_of(path: Path) -> set[str]:
    """Absolute names of the forkgw modules a file imports (relative imports resolved)."""
    package = ".".join(("forkgw",) + path.relative_to(ROOT).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("forkgw")}


def files(unit: str) -> list[Path]:
    target = ROOT / unit
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


@pytest.mark.parametrize("unit", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(unit):
    bad = []
    for path in files(unit):
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[unit]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_the_worker_loop_reaches_http_through_one_object():
    http = {name for name in imports_of(ROOT / "worker.py") if name.startswith("forkgw.http")}
    assert http <= {"forkgw.http.server", "forkgw.http.server.HttpServer"}, http


def test_the_import_reader_sees_relative_imports():
    names = imports_of(ROOT / "wasm" / "runtime.py")
    assert any(name.startswith("forkgw.wasm.") for name in names), names
