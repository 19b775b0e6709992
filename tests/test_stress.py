"""Stress: a fork storm under a 200,000-message load, and 500 forks racing four threads busy in libzmq.

Both are marked ``slow``; .ci/run runs them with the counts below (the
README's figures).  ``$ZMQFORK_STORM_MESSAGES``, ``$ZMQFORK_STORM_CHILDREN``
and ``$ZMQFORK_RACE_FORKS`` lower them for a quick local or sanitizer run.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Tuple

import pytest

import zmqfork as zmq
from forking import FORK_KINDS, Child, start_child
from reliability import EchoServer, count, no_children_left, wait_other_threads_idle  # noqa: F401  - a fixture

STORM_MESSAGES = count("STORM_MESSAGES", 200_000)
STORM_CHILDREN = count("STORM_CHILDREN", 200)
RACE_FORKS = count("RACE_FORKS", 500)

#: Children alive at once during the storm: enough to overlap, few enough for a small CI box.
IN_FLIGHT = 8
CHILD_TIMEOUT = 30.0
POLL_MS = 30_000

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_children_left")]


# ---- 1. the fork storm --------------------------------------------------------


def _collect(ports_fd: int, sync_fd: int, ack_fd: int, children: int) -> Dict[str, Any]:
    """The collector process: two PULLs on tcp; returns what arrived, checked as it arrived.

    A number written to ``sync_fd`` is acknowledged on ``ack_fd`` once every
    parent message up to it has arrived.
    """
    with zmq.Context() as ctx:
        stream = ctx.socket(zmq.PULL)
        side = ctx.socket(zmq.PULL)
        ports = [sock.bind_to_random_port("tcp://127.0.0.1") for sock in (stream, side)]
        os.write(ports_fd, b"%d %d\n" % tuple(ports))
        os.close(ports_fd)
        poller = zmq.Poller()
        poller.register(stream, zmq.POLLIN)
        poller.register(side, zmq.POLLIN)
        poller.register(sync_fd, zmq.POLLIN)
        sync_to = -1
        next_seq = 0
        disorder: List[str] = []
        ended = False
        child_messages: Dict[bytes, int] = {}
        expected_child = 3 * children
        while not (ended and len(child_messages) >= expected_child):
            if not poller.poll(POLL_MS):
                break  # nothing for 30 s: report what is missing
            for sock in (stream, side):
                while True:
                    try:
                        message = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if message.startswith(b"P "):
                        if message == b"P END":
                            ended = True
                        elif int(message[2:]) == next_seq:
                            next_seq += 1
                        elif len(disorder) < 10:
                            disorder.append(f"got {message!r} when expecting P {next_seq}")
                    else:
                        child_messages[message] = child_messages.get(message, 0) + 1
            if sync_to < 0 and select.select([sync_fd], [], [], 0)[0]:
                sync_to = int(_read_line(sync_fd, 10))
            if 0 <= sync_to < next_seq:
                os.write(ack_fd, b"%d\n" % sync_to)
                sync_to = -1
        ctx.destroy(linger=0)
    return {
        "parent_in_order": next_seq,
        "disorder": disorder,
        "ended": ended,
        "child_messages": sorted(child_messages),
        "child_duplicates": sorted(m for m, n in child_messages.items() if n > 1),
    }


def _read_line(fd: int, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no line within {timeout}s (got {data!r})")
        chunk = os.read(fd, 64)
        if not chunk:
            raise AssertionError(f"pipe closed after {data!r}")
        data += chunk
    return data


def _storm_child(number: int, stream: zmq.Socket, side: zmq.Socket, ctx: zmq.Context) -> Callable[[], int]:
    def child() -> int:
        stream.send(b"C %d 0" % number)
        stream.send(b"C %d 1" % number)
        side.send(b"S %d" % number)
        ctx.destroy(linger=20_000)  # deliver; a collector that never reads fails the test, not hangs it
        return os.getpid()

    return child


def test_fork_storm_under_load(ctx: zmq.Context) -> None:
    """200 children (os, libc, raw) forked while 200,000 numbered messages stream over tcp: nothing lost, doubled or reordered.

    os and libc forks happen under full load.  A raw clone skips glibc's
    fork, so a libzmq I/O thread caught holding the malloc lock would
    deadlock the child's first allocation (any library's): raw clones happen
    mid-stream once the collector has everything sent so far and every
    other thread of the parent sits in a blocking syscall.
    """
    read_end, write_end = os.pipe()
    sync_r, sync_w = os.pipe()
    ack_r, ack_w = os.pipe()
    collector = start_child(lambda: _collect(write_end, sync_r, ack_w, STORM_CHILDREN))
    for fd in (write_end, sync_r, ack_w):
        os.close(fd)
    try:
        stream_port, side_port = map(int, _read_line(read_end, 30).split())
    finally:
        os.close(read_end)

    stream = ctx.socket(zmq.PUSH)
    stream.sndtimeo = POLL_MS  # a collector that stops reading fails the test instead of hanging it
    stream.connect(f"tcp://127.0.0.1:{stream_port}")
    side = ctx.socket(zmq.PUSH)
    side.sndtimeo = POLL_MS
    side.connect(f"tcp://127.0.0.1:{side_port}")

    every = max(1, STORM_MESSAGES // (STORM_CHILDREN + 1))
    in_flight: Deque[Child] = deque()
    pids: List[int] = []
    forked = 0
    # On failure, conftest kills every child not reaped yet.
    for seq in range(STORM_MESSAGES):
        stream.send(b"P %d" % seq)
        if seq % every == every - 1 and forked < STORM_CHILDREN:
            kind = FORK_KINDS[forked % len(FORK_KINDS)]
            if kind == "raw":
                os.write(sync_w, b"%d\n" % seq)
                assert int(_read_line(ack_r, POLL_MS / 1000)) == seq
                wait_other_threads_idle()
            in_flight.append(start_child(_storm_child(forked, stream, side, ctx), kind=kind))
            forked += 1
            if len(in_flight) >= IN_FLIGHT:
                pids.append(in_flight.popleft().result(CHILD_TIMEOUT))
    while forked < STORM_CHILDREN:  # only when the counts make the interval round down
        kind = FORK_KINDS[forked % 2]  # no raw clone while the stream may still be busy
        in_flight.append(start_child(_storm_child(forked, stream, side, ctx), kind=kind))
        forked += 1
    stream.send(b"P END")
    while in_flight:
        pids.append(in_flight.popleft().result(CHILD_TIMEOUT))
    summary = collector.result(timeout=300)
    for fd in (sync_w, ack_r):
        os.close(fd)

    assert summary["disorder"] == []
    assert summary["parent_in_order"] == STORM_MESSAGES and summary["ended"]
    expected = sorted(
        [b"C %d %d" % (n, k) for n in range(STORM_CHILDREN) for k in (0, 1)]
        + [b"S %d" % n for n in range(STORM_CHILDREN)]
    )
    assert summary["child_duplicates"] == []
    assert summary["child_messages"] == expected
    assert len(set(pids)) == STORM_CHILDREN


# ---- 2. forks racing threads busy in libzmq ----------------------------------------


class Busy(threading.Thread):
    """A thread calling ``step`` until stopped; counts its iterations and keeps what it raised."""

    def __init__(self, name: str, step: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.step = step
        self.iterations = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
                self.iterations += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_forks_racing_threads_busy_in_libzmq(ctx: zmq.Context) -> None:
    """A fifth thread forks 500 times while four threads send, receive and poll: every child round-trips."""
    echo = EchoServer(ctx)  # thread 1: poll + recv + send on a ROUTER

    push = ctx.socket(zmq.PUSH)
    push.sndhwm = 100
    push.bind("inproc://race-stream")
    pull = ctx.socket(zmq.PULL)
    pull.connect("inproc://race-stream")
    pinger = ctx.socket(zmq.DEALER)
    pinger.connect(echo.endpoint)
    child_dealer = ctx.socket(zmq.DEALER)  # used by the children only
    child_dealer.rcvtimeo = 20_000
    child_dealer.connect(echo.endpoint)

    def send_step() -> None:  # thread 2
        try:
            push.send(b"x" * 64, zmq.NOBLOCK)
        except zmq.Again:
            push.poll(100, zmq.POLLOUT)

    def recv_step() -> None:  # thread 3
        if pull.poll(100):
            pull.recv(zmq.NOBLOCK)

    def ping_step() -> None:  # thread 4
        pinger.send(b"ping")
        if not pinger.poll(20_000):
            raise AssertionError("the echo server did not answer the parent's ping within 20 s")
        assert pinger.recv() == b"ping"

    busy = [Busy("send", send_step), Busy("recv", recv_step), Busy("ping", ping_step)]
    for thread in busy:
        thread.start()

    def child() -> bytes:
        child_dealer.send(b"child %d" % os.getpid())
        answer: bytes = child_dealer.recv()
        ctx.destroy(linger=0)
        return answer

    answers: List[Tuple[int, bytes]] = []
    failures: List[BaseException] = []

    def forker() -> None:  # thread 5
        window: Deque[Child] = deque()
        try:
            for _ in range(RACE_FORKS):
                window.append(start_child(child, kind="os"))
                if len(window) >= 4:
                    handle = window.popleft()
                    answers.append((handle.pid, handle.result(CHILD_TIMEOUT)))
            while window:
                handle = window.popleft()
                answers.append((handle.pid, handle.result(CHILD_TIMEOUT)))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)
            # conftest kills the children still in the window after the test

    started = [thread.iterations for thread in busy]
    served_before = echo.served
    fork_thread = threading.Thread(target=forker, name="forker")
    fork_thread.start()
    fork_thread.join(RACE_FORKS * 2 * CHILD_TIMEOUT)  # each child's own timeout ends it much sooner
    for thread in busy:
        thread.stop.set()
    for thread in busy:
        thread.join(30)
    echo.stop()
    assert not fork_thread.is_alive()
    assert not failures, failures[0]
    for thread in busy:
        assert not thread.is_alive(), f"{thread.name} thread hung"
        assert thread.error is None, f"{thread.name} thread failed: {thread.error!r}"
    assert all(thread.iterations > before for thread, before in zip(busy, started)), "a busy thread made no progress"
    assert echo.served - served_before >= RACE_FORKS
    assert len(answers) == RACE_FORKS
    assert all(answer == b"child %d" % pid for pid, answer in answers)
