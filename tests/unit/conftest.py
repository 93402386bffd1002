"""Helpers for conf tests: confs are real files in a temp prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkgw.conf import load


class ConfDir:
    """A temp prefix laid out like nginx's: PREFIX/conf/gw.conf, PREFIX/logs/..."""

    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.main = prefix / "conf" / "gw.conf"

    def write(self, text: str, name: str = "conf/gw.conf") -> Path:
        path = self.prefix / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def load(self, text: str, **kwargs):
        self.write(text)
        return load(str(self.main), **kwargs)

    def http(self, text: str):
        """Load `http { TEXT }` and return the Http."""
        return self.load("http {\n" + text + "\n}\n").http

    def where(self, line: int, name: str = "conf/gw.conf") -> str:
        return f"{self.prefix / name}:{line}"


@pytest.fixture
def confdir(tmp_path) -> ConfDir:
    return ConfDir(tmp_path)
