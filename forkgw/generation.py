"""A generation and its workers, as the master keeps track of them.

Theory of operation.  A generation is one conf, its compiled wasm, its
listeners and `worker_processes` worker slots.  Its state only moves forward:
starting -> serving -> retiring.  The master makes every move; this module
keeps the records, answers the master's questions about them and carries its
commands to the workers.

Each worker has a channel to the master, a socketpair.  The master writes
commands (`quit`, `stop`, `reopen`), falling back to the matching signal when
the channel is broken.  The worker writes `ready` once its filters have run
their root phases, or `fatal REASON` before it exits with EXIT_BOOT_FAILED.

A worker's loop stamps its slot in the generation's heartbeat array (an
anonymous shared mapping, so the master reads what the workers write) on
every turn; once the worker is ready, an old stamp means its loop is stuck.  A slot whose workers keep
dying young is refilled with a growing delay, so a worker that cannot boot
does not fork in a tight loop.
"""

from __future__ import annotations

import enum
import mmap
import os
import signal
import socket
import struct
import time

from forkgw.conf.model import Config
from forkgw.control import answer

RESPAWN_MIN_LIFE = 1.0  # a worker that dies younger than this is "dying at boot"
RESPAWN_MAX_DELAY = 5.0
COMMAND_SIGNALS = {"quit": signal.SIGQUIT, "stop": signal.SIGTERM, "reopen": signal.SIGUSR1}



class GenState(enum.Enum):
    STARTING = "starting"  # workers booting; the previous generation still serves
    SERVING = "serving"
    RETIRING = "retiring"  # told to quit; gone once its last worker has exited

class WorkerHandle:
    __slots__ = ("pid", "channel", "generation", "ready", "started", "fatal", "slot", "killed")

    def __init__(self, pid: int, channel: socket.socket, generation: "Generation", slot: int):
        self.pid = pid
        self.channel = channel
        self.generation = generation
        self.ready = False
        self.started = time.monotonic()
        self.fatal = ""  # why it could not boot, as it told us
        self.killed = False  # the watchdog killed it already
        self.slot = slot

    def kill(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def tell(self, command: str) -> None:
        try:
            self.channel.send(command.encode() + b"\n")
        except OSError:
            self.kill(COMMAND_SIGNALS[command])

    def read_channel(self) -> bool:
        """Take in what the worker said; False once the channel is closed."""
        try:
            data = self.channel.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            return False
        for line in data.decode("utf-8", "replace").splitlines():
            if line == "ready":
                self.ready = True
            elif line.startswith("fatal"):
                self.fatal = line[6:]
        return True


class Generation:
    def __init__(self, number: int, config: Config, compiled, listeners: dict):
        self.number = number
        self.config = config
        self.compiled = compiled
        self.listeners = listeners
        self.workers: dict[int, WorkerHandle] = {}
        self.state = GenState.STARTING
        self.kill_at = 0.0
        self.deaths: dict[int, tuple[int, float]] = {}  # slot -> (young deaths in a row, respawn at)
        self.failed = ""
        self.waiters: list[socket.socket] = []  # `-s reload` clients waiting for the outcome
        self.started = time.monotonic()
        # One monotonic timestamp per worker slot, written by the worker every loop turn.
        self.heartbeats = mmap.mmap(-1, 8 * max(1, config.worker_processes))

    def heartbeat_age(self, slot: int, now: float) -> float:
        return now - struct.unpack_from("d", self.heartbeats, 8 * slot)[0]

    def stalled(self, now: float) -> list[tuple[WorkerHandle, float]]:
        """Ready workers, not yet killed, whose heartbeat is older than the watchdog allows."""
        limit = self.config.worker_watchdog_timeout
        found = []
        for handle in self.workers.values():
            if handle.ready and not handle.killed:
                age = self.heartbeat_age(handle.slot, now)
                if age > limit:
                    found.append((handle, age))
        return found

    def missing_slots(self) -> list[int]:
        taken = {w.slot for w in self.workers.values()}
        return [slot for slot in range(self.config.worker_processes) if slot not in taken]

    def slots_to_fill(self, now: float) -> list[int]:
        """Empty slots whose respawn delay has passed."""
        return [slot for slot in self.missing_slots() if now >= self.deaths.get(slot, (0, 0.0))[1]]

    def count_death(self, handle: WorkerHandle, now: float) -> None:
        """An unexpected exit: a young death doubles the slot's delay (from 0.2s), an old one clears it."""
        count, _ = self.deaths.get(handle.slot, (0, 0.0))
        count = count + 1 if now - handle.started < RESPAWN_MIN_LIFE else 0
        delay = min(RESPAWN_MAX_DELAY, 0.1 * (2 ** count)) if count else 0.0
        self.deaths[handle.slot] = (count, now + delay)

    def status(self) -> str:
        return f"generation {self.number} serving with {len(self.workers)} workers"

    def settle(self, outcome: str) -> None:
        """Answer the `-s reload` clients waiting on this generation."""
        for waiter in self.waiters:
            answer(waiter, outcome)
        self.waiters = []

    def drop(self) -> None:
        """In a forked worker: close the master's ends of this generation's channels and clients."""
        for handle in self.workers.values():
            handle.channel.close()
        for waiter in self.waiters:
            waiter.close()
