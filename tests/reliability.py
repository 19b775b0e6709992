"""Helpers for the reliability tests: counts from the environment, an echo server, zombie and leak checks."""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Dict, Iterator, List

import pytest

import zmqfork as zmq
from zmqfork._children import wait_for_other_threads_to_wait

__all__ = [
    "EchoServer",
    "count",
    "children_of",
    "descendants_of_me",
    "no_children_left",
    "wait_other_threads_idle",
    "wait_until",
]


def count(name: str, default: int) -> int:
    """An iteration count: ``$ZMQFORK_<name>`` if set (for a quicker local or sanitizer run), else ``default``.

    The defaults are the figures the README states; .ci/run uses them.
    """
    raw = os.environ.get(f"ZMQFORK_{name}")
    return int(raw) if raw else default


def descendants_of_me() -> Dict[int, str]:
    """Processes whose parent is this one (zombies included), with their state letter."""
    return children_of(os.getpid())


def children_of(parent: int) -> Dict[int, str]:
    """Processes whose parent is ``parent`` (zombies included), with their state letter."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == parent:
            found[int(entry)] = fields[0]
    return found


@pytest.fixture
def no_children_left() -> Iterator[None]:
    """Fail the test if it leaves a child of this process behind, running or zombie."""
    before = set(descendants_of_me())
    yield
    left = {pid: state for pid, state in descendants_of_me().items() if pid not in before}
    assert not left, f"children left behind (pid: state): {left}"


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; return its last value.

    For conditions no event announces (a peer's descriptor closing); never a timed assertion.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.01)
    return True


class EchoServer:
    """A ROUTER on tcp served by a thread: every message comes back to its sender unchanged.

    ``endpoint`` is where to connect; ``received`` lists the echoed messages
    (last frame of each); ``errors`` collects whatever the thread raised.
    ``stop()`` joins it.
    """

    def __init__(self, ctx: zmq.Context) -> None:
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.served = 0
        self.received: List[bytes] = []
        self.errors: List[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="echo-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if self.router.poll(50):
                    while True:
                        try:
                            frames = self.router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.router.send_multipart(frames)
                        self.received.append(frames[-1])
                        self.served += 1
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.errors.append(exc)

    def stop(self) -> None:
        """Stop serving; raise if the thread failed or does not end."""
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "echo server thread did not stop"
        assert not self.errors, f"echo server failed: {self.errors!r}"


def wait_other_threads_idle(timeout: float = 10.0, samples: int = 3) -> None:
    """Return once every other thread of this process sits in a blocking syscall, ``samples`` checks in a row.

    A raw clone (or ``_Fork``) skips glibc's fork, which is what makes malloc
    usable in the child of a multi-threaded process: if another thread (a
    libzmq I/O thread) holds the malloc lock at that moment, the child's first
    allocation deadlocks, whatever library makes it.  Tests that raw-clone a
    process with threads call this first, after making sure nothing will wake
    those threads.
    """
    busy = wait_for_other_threads_to_wait(timeout, samples)
    assert not busy, f"threads never went idle (tid, syscall): {busy}"
