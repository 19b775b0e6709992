"""Faults: a child killed mid-send, children that exit without closing anything, parents that exit before their children.

In each case the survivors keep working and nothing leaks: the parent's
descriptor count comes back to where it was, every generation of a chain
starts with the same descriptors, and no process is left behind.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import List, Tuple

import pytest
import zmq as pyzmq

import zmqfork as zmq
from forking import FORK_KINDS, ChildFailed, fork_with, open_fds, run_in_child, start_child
from reliability import (  # noqa: F401  - no_children_left is a fixture
    EchoServer,
    count,
    no_children_left,
    wait_other_threads_idle,
    wait_until,
)

TIMEOUT_MS = 10_000
CHAIN_LENGTH = count("CHAIN_LENGTH", 30)
TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("no_children_left")


def fork_quietly(kind: str) -> None:
    """Before a raw clone, wait until no other thread can hold malloc's lock (see wait_other_threads_idle)."""
    if kind == "raw":
        wait_other_threads_idle()


def settled_fd_count(baseline: int) -> int:
    """This process's descriptor count once libzmq has closed what peers that went away left it."""
    wait_until(lambda: len(open_fds()) <= baseline)
    return len(open_fds())


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_child_killed_mid_send(ctx: zmq.Context, kind: str) -> None:
    """A child SIGKILLed while streaming multipart messages: the parent gets only whole messages, keeps working, leaks nothing."""
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = TIMEOUT_MS
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send_multipart([b"parent", b"0", b""])
    assert pull.recv_multipart() == [b"parent", b"0", b""]  # the parent's own connection is up
    baseline = len(open_fds())
    tracked = zmq.detection().fds_tracked

    def streamer() -> None:
        number = 0
        while True:  # until killed
            push.send_multipart([b"child", b"%d" % number, b"x" * 4096])
            number += 1

    fork_quietly(kind)
    victim = start_child(streamer, kind=kind)
    first = pull.recv_multipart()
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(ChildFailed, match=f"reported nothing; wait status {signal.SIGKILL}$"):
        victim.result(TIMEOUT_MS / 1000)

    # The parent keeps working, and a sibling forked after the kill too.
    push.send_multipart([b"parent", b"1", b""])

    def sibling() -> int:
        push.send_multipart([b"sibling", b"0", b""])
        ctx.destroy()
        return os.getpid()

    fork_quietly(kind)
    survivor = start_child(sibling, kind=kind)
    received = [first]
    expected = [[b"parent", b"1", b""], [b"sibling", b"0", b""]]
    while any(message not in received for message in expected):
        try:
            received.append(pull.recv_multipart())
        except zmq.Again:
            missing = [message for message in expected if message not in received]
            raise AssertionError(
                f"nothing arrived for {TIMEOUT_MS} ms; missing {missing} (sibling pid {survivor.pid})"
            ) from None
    assert survivor.result() == survivor.pid
    # Whatever the victim got through came whole and in order: no torn multipart message.
    from_victim = [m for m in received if m[0] == b"child"]
    assert len(received) == len(from_victim) + 2
    assert all(len(m) == 3 and m[2] == b"x" * 4096 for m in from_victim)
    assert [int(m[1]) for m in from_victim] == list(range(len(from_victim)))
    # Everything the two children left in the parent is released, once the
    # parent has read what the victim queued (until then libzmq keeps reading
    # that connection, under the high-water mark, and so keeps it open).
    def drained_and_settled() -> bool:
        while True:
            try:
                message = pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            assert message == [b"child", b"%d" % len(from_victim), b"x" * 4096], "a torn or reordered message"
            from_victim.append(message)
        return len(open_fds()) <= baseline

    assert wait_until(drained_and_settled)
    assert len(open_fds()) == baseline
    assert zmq.detection().fds_tracked == tracked


class ProxyEcho:
    """An echo server that stays in C: libzmq's steerable proxy with one ROUTER as both ends, in a thread.

    EchoServer's thread comes back to Python every 50 ms and then waits for the
    GIL; if it waits longer than the switch interval while a libc fork is made
    (with the GIL held), its drop request is copied into the child, which gets
    no PyOS_AfterFork_Child: the child's only thread then waits in drop_gil for
    a thread it does not have.  This thread never asks for the GIL until stop().
    """

    def __init__(self) -> None:
        self._ctx = pyzmq.Context()
        router = self._ctx.socket(pyzmq.ROUTER)
        router.linger = 0
        self.endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
        control = self._ctx.socket(pyzmq.PAIR)
        control.bind("inproc://proxy-echo-control")
        self._steer = self._ctx.socket(pyzmq.PAIR)
        self._steer.connect("inproc://proxy-echo-control")
        self._thread = threading.Thread(
            target=pyzmq.proxy_steerable, args=(router, router, None, control), name="proxy-echo", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """End the proxy and its context; raise if the thread does not end."""
        self._steer.send(b"TERMINATE")
        self._thread.join(10)
        assert not self._thread.is_alive(), "proxy echo thread did not stop"
        self._ctx.destroy(linger=0)


def test_children_exit_without_closing_anything(ctx: zmq.Context) -> None:
    """Children (each fork kind) that round-trip on inherited sockets and _exit without closing: the parent leaks nothing."""
    echo = ProxyEcho()  # not EchoServer: no Python thread may wait for the GIL across a libc fork
    dealer = ctx.socket(zmq.DEALER)
    dealer.rcvtimeo = TIMEOUT_MS
    dealer.connect(echo.endpoint)
    dealer.send(b"parent")
    assert dealer.recv() == b"parent"
    try:
        baseline = len(open_fds())
        tracked = zmq.detection().fds_tracked
        for round_number in range(3):
            for kind in FORK_KINDS:

                def child() -> bytes:
                    dealer.send(b"%s %d" % (kind.encode(), round_number))
                    return bytes(dealer.recv())  # and no close, no term: start_child _exits

                fork_quietly(kind)
                assert run_in_child(child, kind=kind) == b"%s %d" % (kind.encode(), round_number)
        dealer.send(b"parent again")
        assert dealer.recv() == b"parent again"
        assert settled_fd_count(baseline) == baseline
        assert zmq.detection().fds_tracked == tracked
    finally:
        echo.stop()


_EXIT_SCRIPT = """
import os, sys
import zmqfork as zmq
from forking import fork_with, wait_child

kind, endpoint = sys.argv[1], sys.argv[2]
ctx = zmq.Context()
dealer = ctx.socket(zmq.DEALER)
dealer.rcvtimeo = 10_000
dealer.connect(endpoint)
dealer.send(b"parent")
assert dealer.recv() == b"parent"
pid = fork_with(kind)
if pid == 0:
    dealer.send(b"child")
    assert dealer.recv() == b"child"
    sys.exit(0)  # interpreter finalization with live sockets and a live context
status = wait_child(pid, 20)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
dealer.send(b"parent after")
assert dealer.recv() == b"parent after"
print("ok")
# and the parent too exits without closing anything
"""


@pytest.mark.parametrize("kind", ["os", "libc"])
def test_child_exits_through_interpreter_shutdown_without_closing(ctx: zmq.Context, kind: str) -> None:
    """A child that sys.exit()s with rebuilt, unclosed sockets finishes promptly; so does its parent; the peer leaks nothing."""
    echo = EchoServer(ctx)
    baseline = len(open_fds())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_EXIT_SCRIPT), kind, echo.endpoint],
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 0 and proc.stdout.strip() == b"ok", proc.stderr.decode()
        assert sorted(echo.received) == [b"child", b"parent", b"parent after"]
        assert settled_fd_count(baseline) == baseline
    finally:
        echo.stop()


# ---- the chain: every parent exits before its child uses anything -----------------

_PR_SET_CHILD_SUBREAPER = 36


def _wait_for_eof(fd: int, timeout: float) -> None:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready and os.read(fd, 1) == b"", "the parent generation did not exit"


def _generation(number: int, parent_exit_fd: int, dealer: zmq.Socket, ctx: zmq.Context) -> None:
    """One link of the chain; never returns (exits with 0, or 1 after printing a traceback)."""
    try:
        _wait_for_eof(parent_exit_fd, 30)  # the parent generation has exited
        os.close(parent_exit_fd)
        zmq.generation()  # detects the fork (raw clones too) and closes libzmq's inherited descriptors
        fds = len(open_fds())
        state = zmq.detection()
        dealer.send(b"gen %d %d %d %d" % (number, os.getpid(), fds, state.fds_closed))
        assert dealer.recv().startswith(b"gen %d " % number)  # delivered: the echo came back
        if number < CHAIN_LENGTH:
            exit_r, exit_w = os.pipe()
            kind = FORK_KINDS[number % len(FORK_KINDS)]
            fork_quietly(kind)
            if fork_with(kind) == 0:
                os.close(exit_w)
                _generation(number + 1, exit_r, dealer, ctx)
            os.close(exit_r)
        # exit_w closes with this process: the next generation starts after we are gone.
        os._exit(0)
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        os._exit(1)


def test_chain_of_parents_exiting_before_their_children(ctx: zmq.Context) -> None:
    """30 generations, each exiting without closing before its child uses the inherited DEALER: all deliver, none leaks."""
    echo = EchoServer(ctx)
    dealer = ctx.socket(zmq.DEALER)
    dealer.rcvtimeo = TIMEOUT_MS
    dealer.connect(echo.endpoint)
    dealer.send(b"parent")
    assert dealer.recv() == b"parent"
    baseline = len(open_fds())

    def reaper() -> List[Tuple[int, int]]:
        """Adopts every orphaned generation (subreaper) and reaps them all."""
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        exit_r, exit_w = os.pipe()
        if fork_with("os") == 0:
            os.close(exit_w)
            _generation(1, exit_r, dealer, ctx)
        os.close(exit_r)
        os.close(exit_w)  # generation 1 may start
        reaped = []
        while len(reaped) < CHAIN_LENGTH:
            reaped.append(os.waitpid(-1, 0))  # bounded: the test kills this reaper's group on overrun
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return [(pid, status) for pid, status in reaped]
        raise AssertionError("more processes than generations")

    try:
        statuses = run_in_child(reaper, timeout=CHAIN_LENGTH * 10)
        reports = [message.split() for message in echo.received if message.startswith(b"gen ")]
    finally:
        echo.stop()
    assert [status for _, status in statuses] == [0] * CHAIN_LENGTH
    assert [int(report[1]) for report in reports] == list(range(1, CHAIN_LENGTH + 1))
    assert sorted(int(report[2]) for report in reports) == sorted(pid for pid, _ in statuses)
    assert settled_fd_count(baseline) == baseline
    # Every generation starts with exactly the descriptors of the one before:
    # nothing accumulates.  That takes descriptor tracking, which is on
    # wherever zmqfork is supported: off, it is a failure, not a skip.
    state = zmq.detection()
    assert state.fdtrack, f"descriptor tracking is off: {state.unavailable.get('fdtrack', '?')}"
    fds = [int(report[3]) for report in reports]
    assert len(set(fds)) == 1, f"descriptor counts per generation: {fds}"
    # Generation 1 inherits from the reaper, which never made a libzmq context.
    assert all(int(report[4]) > 0 for report in reports[1:]), f"closed per generation: {[r[4] for r in reports]}"

