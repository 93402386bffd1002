"""The conf: nginx-style conf files read into the model of forkgw.conf.model.

    config = forkgw.conf.load("conf/gateway.conf", prefix=None, extra="worker_processes 2;")
    text = forkgw.conf.dump(config)     # what `forkgw -T` prints

The parser is imported when first used, so that running the directive table as
a script (`python -m forkgw.conf.directives`) does not import it twice.
"""

from __future__ import annotations

from forkgw.conf.model import Config
from forkgw.errors import ConfError

__all__ = ["Config", "ConfError", "dump", "load"]


def load(path: str, prefix: str | None = None, extra: str | None = None) -> Config:
    """Read and check the conf at `path`; see forkgw.conf.parser.load for paths and prefix."""
    from forkgw.conf import parser
    from forkgw.errors import ConfError

    try:
        return parser.load(path, prefix, extra)
    except RecursionError:
        raise ConfError(f"blocks nested too deeply in {path}") from None


def dump(config: Config) -> str:
    """Every file the conf was read from, in nginx -T's format."""
    parts = []
    for path in config.files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as err:
            text = f"# {path} cannot be read now: {err.strerror}"
        parts.append(f"# configuration file {path}:\n{text}\n")
    return "".join(parts)
