"""zmqfork.register_at_fork and check_fork: after-fork callbacks that also see forks made in C."""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterator, List, Tuple

import pytest

import zmqfork as zmq
from zmqfork import _afterfork
from forking import FORK_KINDS, run_in_child
from reliability import wait_other_threads_idle

TIMEOUT_MS = 10_000


@pytest.fixture(autouse=True)
def no_callbacks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test registers into an empty list, so no callback outlives its test."""
    monkeypatch.setattr(_afterfork, "_callbacks", [])
    yield


class Records(logging.Handler):
    """Keeps the messages logged on the zmqfork logger."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_callbacks_run_once_in_order_and_survive_an_exception(kind: str) -> None:
    """In a child made by any fork kind, callbacks run once, in order; one that raises is logged, the rest run."""
    ran: List[str] = []

    def failing() -> None:
        ran.append("b")
        raise RuntimeError("boom")

    zmq.register_at_fork(after_in_child=lambda: ran.append("a"))
    zmq.register_at_fork(after_in_child=failing)
    zmq.register_at_fork(after_in_child=lambda: ran.append("c"))

    def child() -> Tuple[List[str], bool, List[str], bool, List[str], List[str]]:
        records = Records()
        logging.getLogger("zmqfork").addHandler(records)
        before = list(ran)
        first = zmq.check_fork()
        after_first = list(ran)
        second = zmq.check_fork()
        return before, first, after_first, second, list(ran), records.messages

    before, first, after_first, second, after_second, logged = run_in_child(child, kind=kind)
    assert before == []
    assert (first, after_first) == (True, ["a", "b", "c"])
    assert (second, after_second) == (False, ["a", "b", "c"])
    assert len(logged) == 1 and "raised" in logged[0]
    assert ran == [] and zmq.check_fork() is False


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_first_zmqfork_call_runs_callbacks_before_it_acts(ctx: zmq.Context, kind: str) -> None:
    """The child's first send notices the fork: the callback (which itself sends) runs before that send."""
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = TIMEOUT_MS
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    zmq.register_at_fork(after_in_child=lambda: push.send(b"from the callback"))

    def child() -> None:
        push.send(b"from the child")
        ctx.destroy(linger=TIMEOUT_MS)

    run_in_child(child, kind=kind)
    assert [pull.recv(), pull.recv()] == [b"from the callback", b"from the child"]


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_grandchild_runs_callbacks_of_every_ancestor(kind: str) -> None:
    """A callback registered in a child runs in its children, not in itself; the parent's runs in both."""
    ran: List[str] = []
    zmq.register_at_fork(after_in_child=lambda: ran.append(f"parent's in {os.getpid()}"))

    def grandchild() -> List[str]:
        zmq.check_fork()
        return list(ran)

    def child() -> Tuple[List[str], List[str]]:
        zmq.register_at_fork(after_in_child=lambda: ran.append("child's"))
        zmq.check_fork()
        in_child = list(ran)
        ran.clear()
        return in_child, run_in_child(grandchild, kind=kind)

    in_child, in_grandchild = run_in_child(child, kind=kind)
    assert len(in_child) == 1 and in_child[0].startswith("parent's")
    assert len(in_grandchild) == 2 and in_grandchild[0].startswith("parent's")
    assert in_grandchild[1] == "child's"
    assert in_child[0] != in_grandchild[0]  # each names its own pid


def test_os_register_at_fork_misses_libc_fork_zmqfork_does_not() -> None:
    """The motivating gap: after libc fork() from C, only zmqfork's callback runs."""
    seen: List[str] = []
    os.register_at_fork(after_in_child=lambda: seen.append("os") if seen == ["armed"] else None)
    zmq.register_at_fork(after_in_child=lambda: seen.append("zmqfork"))
    seen.append("armed")
    try:

        def child() -> List[str]:
            zmq.check_fork()
            return list(seen)

        assert run_in_child(child, kind="libc") == ["armed", "zmqfork"]
        assert run_in_child(child, kind="os") == ["armed", "os", "zmqfork"]
    finally:
        seen.clear()  # disarms the os hook, which cannot be unregistered


def test_other_threads_wait_for_callbacks() -> None:
    """A thread that calls zmqfork while the callbacks run waits until they are done."""
    ran: List[str] = []
    started = threading.Event()
    release = threading.Event()

    def slow() -> None:
        started.set()
        release.wait(10)
        ran.append("callback")

    zmq.register_at_fork(after_in_child=slow)

    def child() -> List[str]:
        runner = threading.Thread(target=zmq.check_fork)
        runner.start()
        assert started.wait(10)
        other = threading.Thread(target=lambda: (zmq.generation(), ran.append("other thread")))
        other.start()
        # Both threads now sleep in the kernel (the runner in release.wait, the
        # other one waiting for the callbacks), or the other one went through.
        wait_other_threads_idle(samples=50)
        ran.append("main")
        release.set()
        runner.join(10)
        other.join(10)
        assert not runner.is_alive() and not other.is_alive()
        return ran

    assert run_in_child(child, kind="os") == ["main", "callback", "other thread"]


def test_bad_callback_is_rejected() -> None:
    """A callback that is not callable, or passed positionally, is a TypeError."""
    with pytest.raises(TypeError, match="callable"):
        zmq.register_at_fork(after_in_child=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        zmq.register_at_fork(print)  # type: ignore[misc]

