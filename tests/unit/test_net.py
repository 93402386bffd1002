"""The event loop, the connection base and the signal inbox, on real sockets and real signals."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import threading
import time

import pytest

from forkgw.net.connection import EVENT_READ, EVENT_WRITE, Connection
from forkgw.net.loop import Loop
from forkgw.net.signals import SignalInbox

BOUND = 5.0  # seconds any wait for a positive event may take before the test fails


# -- helpers ------------------------------------------------------------------


@pytest.fixture
def failures():
    return []


@pytest.fixture
def loop(failures):
    loop = Loop(on_failure=failures.append)
    yield loop
    loop.selector.close()


@pytest.fixture
def sockets():
    """socket.socketpair() made non-blocking; everything made is closed at teardown."""
    made = []

    def pair():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        made.extend((a, b))
        return a, b

    def tcp():
        """A connected TCP pair over 127.0.0.1: (client, server side), both non-blocking."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = socket.create_connection(listener.getsockname(), timeout=BOUND)
            server, _ = listener.accept()
        client.setblocking(False)
        server.setblocking(False)
        made.extend((client, server))
        return client, server

    pair.tcp = tcp
    yield pair
    for s in made:
        s.close()


def run_until(loop: Loop, done, bound: float = BOUND) -> None:
    """Turn the loop until done() holds, sleeping in select only until the next timer."""
    end = time.monotonic() + bound
    while not done():
        now = time.monotonic()
        assert now < end, "the awaited event did not happen in time"
        timeout = end - now
        due = loop.next_timer()
        if due is not None:
            timeout = min(timeout, max(due - now, 0.0))
        loop.turn(timeout)


class Alarm:
    """An object with a deadline, as the loop's Timed protocol describes it."""

    def __init__(self, loop: Loop, name: str, fired: list):
        self.loop = loop
        self.name = name
        self.fired = fired
        self.deadline = None
        self.timer_at = 0.0
        self.timer_queued = False

    def on_timeout(self) -> None:
        self.fired.append((self.name, self.loop.now))


class Probe(Connection):
    """A connection that records the event masks the loop hands it."""

    __slots__ = ("masks",)

    def __init__(self, loop: Loop, sock):
        super().__init__(loop, sock)
        self.masks: list[int] = []

    def on_event(self, mask: int) -> None:
        self.masks.append(mask)


# -- loop: timers -------------------------------------------------------------


def test_timers_fire_in_deadline_order(loop):
    fired = []
    for name, seconds in (("c", 0.06), ("a", 0.02), ("b", 0.04)):
        loop.set_deadline(Alarm(loop, name, fired), seconds)
    run_until(loop, lambda: len(fired) == 3)
    assert [name for name, _ in fired] == ["a", "b", "c"]


def test_a_timer_never_fires_before_its_deadline(loop):
    fired = []
    alarm = Alarm(loop, "a", fired)
    loop.set_deadline(alarm, 0.05)
    due = alarm.deadline
    run_until(loop, lambda: fired)
    assert fired[0][1] >= due


def test_a_deadline_moved_later_fires_once_at_the_later_time(loop):
    fired = []
    alarm = Alarm(loop, "a", fired)
    loop.set_deadline(alarm, 0.01)
    loop.set_deadline(alarm, 0.15)
    later = alarm.deadline
    run_until(loop, lambda: fired)
    assert fired[0][1] >= later
    run_until(loop, lambda: loop.next_timer() is None)
    assert len(fired) == 1
    assert alarm.deadline is None


def test_a_deadline_moved_earlier_fires_at_the_earlier_time_and_only_once(loop):
    fired = []
    alarm = Alarm(loop, "a", fired)
    loop.set_deadline(alarm, 0.3)
    later = alarm.deadline
    loop.set_deadline(alarm, 0.01)
    run_until(loop, lambda: fired)
    assert fired[0][1] < later
    run_until(loop, lambda: loop.next_timer() is None)  # the stale entry has come up too
    assert len(fired) == 1


def test_a_cleared_deadline_never_fires(loop):
    fired = []
    cleared = Alarm(loop, "cleared", fired)
    witness = Alarm(loop, "witness", fired)
    loop.set_deadline(cleared, 0.01)
    loop.set_deadline(witness, 0.05)  # due after the cleared one would have been
    cleared.deadline = None
    run_until(loop, lambda: fired)
    assert [name for name, _ in fired] == ["witness"]


def test_a_cleared_deadline_can_be_set_again(loop):
    fired = []
    alarm = Alarm(loop, "a", fired)
    loop.set_deadline(alarm, 0.01)
    alarm.deadline = None
    loop.set_deadline(alarm, 0.05)
    due = alarm.deadline
    run_until(loop, lambda: fired)
    assert len(fired) == 1 and fired[0][1] >= due


def test_a_timer_rearmed_from_its_callback_fires_again(loop):
    fired = []

    class Ticker(Alarm):
        def on_timeout(self):
            super().on_timeout()
            if len(self.fired) < 3:
                self.loop.set_deadline(self, 0.01)

    loop.set_deadline(Ticker(loop, "tick", fired), 0.01)
    run_until(loop, lambda: len(fired) == 3)
    times = [t for _, t in fired]
    assert times == sorted(times) and len(set(times)) == 3


def test_a_timeout_that_raises_is_reported_and_other_timers_still_fire(loop, failures):
    fired = []

    class Broken(Alarm):
        def on_timeout(self):
            raise RuntimeError("bug")

    broken = Broken(loop, "broken", fired)
    loop.set_deadline(broken, 0.01)
    loop.set_deadline(Alarm(loop, "ok", fired), 0.01)
    run_until(loop, lambda: fired)
    assert failures == [broken.on_timeout]
    assert [name for name, _ in fired] == ["ok"]


def test_turn_returns_the_new_now(loop):
    before = time.monotonic()
    now = loop.turn(0)
    assert now == loop.now and now >= before


# -- loop: handlers -------------------------------------------------------------


def test_a_handler_that_raises_is_reported_and_the_loop_serves_on(loop, failures, sockets):
    bad_sock, bad_peer = sockets()
    good_sock, good_peer = sockets()
    got = []

    def bad(mask):
        raise RuntimeError("bug")

    def good(mask):
        got.append(good_sock.recv(100))

    loop.selector.register(bad_sock, EVENT_READ, bad)
    loop.selector.register(good_sock, EVENT_READ, good)
    bad_peer.send(b"x")
    good_peer.send(b"1")
    run_until(loop, lambda: failures and got)
    assert failures[0] is bad
    loop.selector.unregister(bad_sock)
    good_peer.send(b"2")
    run_until(loop, lambda: len(got) == 2)
    assert got == [b"1", b"2"]


# -- connection -----------------------------------------------------------------


def test_want_registers_on_first_use_and_the_loop_hands_over_the_event(loop, sockets):
    sock, peer = sockets()
    conn = Probe(loop, sock)
    conn.want(EVENT_READ)
    assert loop.selector.get_key(sock).events == EVENT_READ
    peer.send(b"x")
    run_until(loop, lambda: conn.masks)
    assert conn.masks[0] == EVENT_READ


def test_want_zero_unregisters_and_a_later_want_registers_again(loop, sockets):
    sock, peer = sockets()
    other, other_peer = sockets()
    conn, witness = Probe(loop, sock), Probe(loop, other)
    conn.want(EVENT_READ)
    witness.want(EVENT_READ)
    conn.want(0)
    with pytest.raises(KeyError):
        loop.selector.get_key(sock)
    peer.send(b"x")
    other_peer.send(b"x")
    run_until(loop, lambda: witness.masks)
    assert conn.masks == []
    conn.want(EVENT_READ)
    run_until(loop, lambda: conn.masks)
    assert conn.masks[0] == EVENT_READ


def test_want_changes_the_interest_of_a_registered_connection(loop, sockets):
    sock, _peer = sockets()
    conn = Probe(loop, sock)
    conn.want(EVENT_READ)
    conn.want(EVENT_READ | EVENT_WRITE)
    assert loop.selector.get_key(sock).events == EVENT_READ | EVENT_WRITE
    run_until(loop, lambda: conn.masks)  # an idle socket is writable, not readable
    assert conn.masks[0] == EVENT_WRITE


def test_receive_gives_none_then_data_then_empty_after_the_peer_closes(loop, sockets):
    sock, peer = sockets()
    conn = Probe(loop, sock)
    assert conn.receive() is None
    peer.send(b"hello")
    assert conn.receive() == b"hello"
    peer.close()
    assert conn.receive() == b""


def test_receive_gives_empty_when_the_peer_resets(loop, sockets):
    client, server = sockets.tcp()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()  # linger 0: an RST, not a FIN
    assert select.select([client], [], [], BOUND)[0]
    assert Probe(loop, client).receive() == b""


def test_send_out_drains_out_to_the_peer(loop, sockets):
    sock, peer = sockets()
    conn = Probe(loop, sock)
    conn.out += b"hello"
    assert conn.send_out() == 5
    assert conn.out == b""
    assert peer.recv(100) == b"hello"


def test_send_out_keeps_what_the_kernel_refused_and_every_byte_arrives_in_order(loop, sockets):
    sock, peer = sockets()
    conn = Probe(loop, sock)
    data = os.urandom(4 * 1024 * 1024)  # well over a socket buffer
    conn.out += data
    while conn.send_out():  # nobody reads: the kernel's buffer fills
        pass
    assert 0 < len(conn.out) < len(data)
    received = bytearray()
    end = time.monotonic() + BOUND
    while len(received) < len(data):
        assert time.monotonic() < end, "the peer did not get every byte"
        conn.send_out()
        try:
            received += peer.recv(1 << 20)
        except BlockingIOError:
            pass
    assert conn.out == b""
    assert received == data


def test_send_out_raises_once_the_peer_is_gone(loop, sockets):
    client, server = sockets.tcp()
    conn = Probe(loop, client)
    server.close()
    end = time.monotonic() + BOUND
    with pytest.raises(OSError):
        while True:  # the first write draws an RST; a later one must fail
            assert time.monotonic() < end, "send_out never reported the peer gone"
            conn.out += b"x" * 1024
            conn.send_out()


def test_close_unregisters_closes_and_clears_the_deadline(loop, sockets):
    sock, _peer = sockets()
    conn = Probe(loop, sock)
    conn.want(EVENT_READ)
    conn.set_deadline(60)
    conn.close()
    assert conn.closed and conn.deadline is None
    assert sock.fileno() == -1
    assert len(loop.selector.get_map()) == 0
    conn.close()  # a second close is harmless
    conn.want(EVENT_READ)  # and so is wanting events once closed
    assert len(loop.selector.get_map()) == 0


def test_a_connection_whose_deadline_passes_is_closed(loop, sockets):
    sock, _peer = sockets()
    conn = Probe(loop, sock)
    conn.want(EVENT_READ)
    conn.set_deadline(0.02)
    run_until(loop, lambda: conn.closed)
    assert sock.fileno() == -1
    assert len(loop.selector.get_map()) == 0


def test_a_closed_connection_times_out_no_more(loop, sockets):
    sock, _peer = sockets()
    timeouts, fired = [], []

    class Watched(Probe):
        __slots__ = ()

        def on_timeout(self):
            timeouts.append(self)
            super().on_timeout()

    conn = Watched(loop, sock)
    conn.set_deadline(0.01)
    conn.close()
    loop.set_deadline(Alarm(loop, "witness", fired), 0.05)
    run_until(loop, lambda: fired)
    assert timeouts == []


# -- signals ------------------------------------------------------------------

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


@pytest.fixture
def inbox():
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    previous_fd = signal.set_wakeup_fd(-1)
    box = SignalInbox(SIGNALS)
    try:
        yield box
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        box.wake.close()
        box._wake_w.close()


def wait_pending(box: SignalInbox, count: int = 1) -> None:
    end = time.monotonic() + BOUND
    while len(box.pending) < count:
        assert time.monotonic() < end, "the signal was not recorded"
        time.sleep(0.001)  # lets Python run the pending signal handler


def test_a_signal_is_recorded_in_pending_and_nothing_else_is_done(inbox):
    os.kill(os.getpid(), signal.SIGUSR2)
    wait_pending(inbox)
    assert inbox.pending == [signal.SIGUSR2]
    # The wake-up byte is still there: the handler did not even read the wake socket.
    assert inbox.wake.recv(16) == bytes([signal.SIGUSR2])


def test_take_hands_over_the_signals_in_order_and_empties_pending(inbox):
    os.kill(os.getpid(), signal.SIGUSR2)
    wait_pending(inbox, 1)
    os.kill(os.getpid(), signal.SIGUSR1)
    wait_pending(inbox, 2)
    assert inbox.take() == [signal.SIGUSR2, signal.SIGUSR1]
    assert inbox.pending == [] and inbox.take() == []


def test_a_signal_wakes_a_loop_waiting_in_select(inbox, loop):
    loop.selector.register(inbox.wake, EVENT_READ, inbox.on_wake)
    sender = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR2))
    started = time.monotonic()
    sender.start()
    try:
        loop.turn(5)
    finally:
        sender.join()
    assert time.monotonic() - started < 2.5
    wait_pending(inbox)
    assert inbox.take() == [signal.SIGUSR2]


def test_on_wake_empties_the_wake_socket(inbox, loop):
    loop.selector.register(inbox.wake, EVENT_READ, inbox.on_wake)
    os.kill(os.getpid(), signal.SIGUSR2)
    wait_pending(inbox)
    loop.turn(BOUND)
    with pytest.raises(BlockingIOError):
        inbox.wake.recv(16)
    assert inbox.pending == [signal.SIGUSR2]  # taken by the owner, not by on_wake


def test_close_resets_the_handlers_and_the_wakeup_fd(inbox):
    inbox.close(SIGNALS)
    assert signal.set_wakeup_fd(-1) == -1
    assert all(signal.getsignal(sig) == signal.SIG_DFL for sig in SIGNALS)
    assert inbox.wake.fileno() == -1


def test_cleared_deadlines_do_not_keep_their_objects_alive():
    """Connections that closed (deadline cleared) leave the heap once it has grown: memory
    follows the live timers, not connection rate times timeout."""
    import gc
    import weakref

    class Conn:
        def __init__(self):
            self.deadline, self.timer_at, self.timer_queued, self.fired = None, 0.0, False, False

        def on_timeout(self):
            self.fired = True

    loop = Loop(lambda handler: None)
    refs = []
    for _ in range(5000):
        conn = Conn()
        loop.set_deadline(conn, 60)
        conn.deadline = None  # closed long before its timeout
        refs.append(weakref.ref(conn))
        del conn
    gc.collect()
    alive = sum(ref() is not None for ref in refs)
    assert len(loop.timers) < 1024 * 2 and alive < 1024 * 2, (len(loop.timers), alive)
    kept = Conn()
    loop.set_deadline(kept, 0.001)
    wait_until = time.monotonic() + 5
    while not kept.fired and time.monotonic() < wait_until:
        loop.turn(0.05)
    assert kept.fired  # a live timer still fires after compactions
