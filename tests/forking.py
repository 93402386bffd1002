"""Child processes for tests of state shared across processes."""

import os
import signal
import time
import traceback


def fork(fn, *args) -> int:
    """Run fn(*args) in a child; exit status 0 if it returned, 1 if it raised."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 10.0) -> int:
    """The child's waitpid status; kills it and fails if it outlives timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} hung")
        time.sleep(0.002)


def exited_ok(pid: int, timeout: float = 10.0) -> bool:
    return os.waitstatus_to_exitcode(wait(pid, timeout)) == 0
