"""The master's pid file: how `forkgw -s`, init scripts and operators find the master.

Theory of operation.  Whoever reads the file signals the pid in it, so the
file must never be seen half-written and never name a master that is not the
one in charge.  It is written to a temporary file and renamed over the path.
A file that names another running forkgw is refused (two masters on one
prefix would fight over it); one that names a dead process, or a process that
is not forkgw (a stale file whose pid was reused), is overwritten.  At exit the
file is removed only if it still holds our pid, so a master never removes the
file of another that has taken the path over.

An upgrade (USR2) sets the file aside as `PATH.oldbin`, as nginx does, so the
new master can write PATH; if the new master exits, the old one moves its file
back.
"""

from __future__ import annotations

import os

from forkgw.errors import ConfError

OLDBIN = ".oldbin"


class PidFile:
    def __init__(self) -> None:
        self.path = ""  # where our pid is now; "" until written

    def write(self, path: str) -> None:
        """Take `path` over (a reload may name a new one); ConfError if a live forkgw holds it."""
        if not path or path == self.path:
            return
        try:
            with open(path) as f:
                other = int(f.read().strip() or 0)
        except (OSError, ValueError):
            other = 0
        if other and other != os.getpid() and process_is_forkgw(other):
            raise ConfError(f'pid file "{path}" names a running forkgw (pid {other})')
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
        if self.path:
            self.remove()
        self.path = path

    def remove(self) -> None:
        try:
            with open(self.path) as f:
                if int(f.read().strip()) != os.getpid():
                    return
            os.unlink(self.path)
        except (OSError, ValueError):
            pass

    def set_aside(self) -> None:
        """Upgrade: leave the path to the new master.  Raises OSError, and then nothing moved."""
        if self.path:
            os.replace(self.path, self.path + OLDBIN)
            self.path += OLDBIN

    def restore(self) -> None:
        """The new master is gone: the path is ours again (best effort)."""
        if self.path.endswith(OLDBIN):
            restored = self.path[: -len(OLDBIN)]
            try:
                os.replace(self.path, restored)
                self.path = restored
            except OSError:
                pass


def process_is_forkgw(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"forkgw" in f.read()
    except OSError:
        return False
