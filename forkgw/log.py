"""Error log and access log, in nginx's formats.

The error log is written line by line, unbuffered, so a crash never loses the
line that explains it; a write that fails (full or read-only disk) is dropped
and the gateway serves on.  The access log is buffered per worker and flushed
by the worker loop (at most once a second, and when it stops), as nginx does
with `buffer=`.  Both reopen their files on USR1.
"""

from __future__ import annotations

import os
import sys
import time

LEVELS = ("emerg", "alert", "crit", "error", "warn", "notice", "info", "debug")
LEVEL = {name: number for number, name in enumerate(LEVELS)}


def _open_append(path: str) -> int:
    if path == "stderr":
        return os.dup(2)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


class ErrorLog:
    """`2026/11/26 12:00:00 [notice] PID#0: message` lines at or above `level`."""

    def __init__(self, path: str = "stderr", level: str = "error", also_stderr: bool = False):
        self.path = path
        self.level = LEVEL[level]
        self.also_stderr = also_stderr and path != "stderr"
        self.fd = _open_append(path)
        self.pid = os.getpid()

    def enabled(self, level: str) -> bool:
        return LEVEL[level] <= self.level

    def write(self, level: str, message: str) -> None:
        if LEVEL[level] > self.level:
            return
        stamp = time.strftime("%Y/%m/%d %H:%M:%S")
        line = f"{stamp} [{level}] {os.getpid()}#0: {message}\n".encode("utf-8", "replace")
        try:
            os.write(self.fd, line)
        except OSError:
            pass  # a full or read-only disk must not stop the gateway
        if self.also_stderr:
            try:
                os.write(2, line)
            except OSError:
                pass

    def emerg(self, message: str) -> None:
        self.write("emerg", message)

    def alert(self, message: str) -> None:
        self.write("alert", message)

    def crit(self, message: str) -> None:
        self.write("crit", message)

    def error(self, message: str) -> None:
        self.write("error", message)

    def warn(self, message: str) -> None:
        self.write("warn", message)

    def notice(self, message: str) -> None:
        self.write("notice", message)

    def info(self, message: str) -> None:
        self.write("info", message)

    def debug(self, message: str) -> None:
        self.write("debug", message)

    def reopen(self) -> None:
        """USR1: point at a fresh file after logrotate moved the old one away."""
        try:
            fd = _open_append(self.path)
        except OSError as err:
            self.alert(f'reopen "{self.path}" failed ({err})')
            return
        os.dup2(fd, self.fd)
        os.close(fd)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def stderr_log(level: str = "notice") -> ErrorLog:
    """What the master uses before the conf names a log file."""
    return ErrorLog("stderr", level)


def eprint(message: str) -> None:
    """A line for the operator on the terminal: `forkgw: [emerg] ...`."""
    sys.stderr.write(f"forkgw: {message}\n")
    sys.stderr.flush()
