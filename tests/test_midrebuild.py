"""A fork in the middle of a rebuild: the grandchild of a child caught rebuilding in another thread is consistent and works.

The child pauses its rebuilding thread at a chosen point (through a hook
patched in the child only) inside a blocking ``read()``, so the thread holds
the rebuild lock and no interpreter lock when the grandchild is forked; then
it forks the grandchild, which must rebuild on its own, and finally lets the
paused rebuild finish, which must work too.
"""

from __future__ import annotations

import os
import platform
import select
import threading
import time
from typing import Any, Dict, List

import pytest

import zmqfork as zmq
import zmqfork._recipe as recipe_module
import zmqfork.context as context_module
from forking import FORK_KINDS, run_in_child
from reliability import EchoServer, no_children_left, wait_other_threads_idle  # noqa: F401  - a fixture

TIMEOUT = 20.0

#: Where the child's rebuilding thread is stopped.
PAUSE_POINTS = ("context-built", "socket-built", "mid-replay", "replayed")

#: The read syscall's number, as /proc/<pid>/task/<tid>/syscall shows it.
_SYS_READ = {"x86_64": 0, "aarch64": 63}

pytestmark = pytest.mark.usefixtures("no_children_left")


class Pause:
    """Stops the first thread that calls ``here()`` in a blocking read until ``resume()``; in this pid only."""

    def __init__(self) -> None:
        self.paused_r, self.paused_w = os.pipe()
        self.resume_r, self.resume_w = os.pipe()
        self.pid = os.getpid()
        self.tid = 0
        self.report: List[Any] = []

    def here(self) -> None:
        if os.getpid() != self.pid or self.tid:  # a grandchild, and later rebuilds, pass straight through
            return
        self.tid = threading.get_native_id()
        os.write(self.paused_w, b"p")
        os.read(self.resume_r, 1)

    def wait_paused(self) -> None:
        """Return once the paused thread is blocked in read(resume_r): it holds no interpreter lock then."""
        ready, _, _ = select.select([self.paused_r], [], [], TIMEOUT)
        assert ready, f"the rebuild never reached the pause point ({self.report!r})"
        os.read(self.paused_r, 1)
        deadline = time.monotonic() + TIMEOUT
        blocked = f"{_SYS_READ[platform.machine()]} {hex(self.resume_r)} "  # read(resume_r, ...)
        while True:
            with open(f"/proc/self/task/{self.tid}/syscall") as handle:
                if handle.read().startswith(blocked):
                    return
            assert time.monotonic() < deadline, "the paused thread never blocked in read()"
            time.sleep(0.001)

    def resume(self) -> None:
        os.write(self.resume_w, b"r")


def install_pause(point: str, pause: Pause) -> None:
    """Patch zmqfork, in this (child) process only, to call ``pause.here()`` at ``point`` of a rebuild."""
    if point == "context-built":
        backend = context_module._BackendContext

        class PausedBackend:
            """Stands in for pyzmq's compiled Context class where zmqfork re-initialises a context."""

            @staticmethod
            def __init__(context: Any, *args: Any, **kwargs: Any) -> None:
                backend.__init__(context, *args, **kwargs)
                pause.here()

            set = staticmethod(backend.set)

        context_module._BackendContext = PausedBackend  # type: ignore[misc,assignment]
    elif point in ("socket-built", "replayed"):
        replay = recipe_module.SocketRecipe.replay

        def paused_replay(self: Any, sock: Any, *, rebind: bool) -> None:
            if point == "socket-built":
                pause.here()
            replay(self, sock, rebind=rebind)
            if point == "replayed":
                pause.here()

        recipe_module.SocketRecipe.replay = paused_replay  # type: ignore[method-assign]
    elif point == "mid-replay":
        apply = recipe_module._apply
        applied = [0]

        def paused_apply(sock: Any, step: Any, rebind: bool) -> None:
            apply(sock, step, rebind)
            applied[0] += 1
            if applied[0] == 2:
                pause.here()

        recipe_module._apply = paused_apply
    else:
        raise ValueError(point)


@pytest.mark.parametrize("grandchild_kind", FORK_KINDS)
@pytest.mark.parametrize("point", PAUSE_POINTS)
def test_fork_in_the_middle_of_a_rebuild(ctx: zmq.Context, point: str, grandchild_kind: str) -> None:
    """The grandchild, forked while its parent rebuilds in another thread, rebuilds consistently and round-trips."""
    echo = EchoServer(ctx)
    dealer = ctx.socket(zmq.DEALER)
    dealer.rcvtimeo = 10_000
    dealer.sndhwm = 11
    dealer.linger = 0
    dealer.connect(echo.endpoint)
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = 10_000
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    parent_generation = zmq.generation()

    def grandchild() -> Dict[str, Any]:
        dealer.send(b"grandchild")
        answer = dealer.recv()
        context_after_dealer = ctx.underlying
        push.send(b"from the grandchild")  # a second socket of the same Context
        token = zmq.generation()
        found = {
            "answer": answer,
            "options": (dealer.rcvtimeo, dealer.sndhwm, dealer.linger),
            "current": dealer._zf_gen == token == ctx._zf_gen == push._zf_gen,
            "one context": dealer.context is ctx is push.context and ctx.underlying == context_after_dealer,
            "generation": token,
        }
        ctx.destroy(linger=5_000)  # must not wait on the lock the paused thread holds in the child
        return found

    def child() -> Dict[str, Any]:
        pause = Pause()
        install_pause(point, pause)
        outcome: List[Any] = []

        def rebuild_and_round_trip() -> None:
            try:
                dealer.send(b"child")  # rebuilds: the dealer's context first, then the dealer
                outcome.append(dealer.recv())
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcome.append(exc)

        pause.report = outcome
        thread = threading.Thread(target=rebuild_and_round_trip)
        thread.start()
        pause.wait_paused()
        if grandchild_kind == "raw":  # see wait_other_threads_idle: libzmq's threads may hold malloc's lock
            wait_other_threads_idle()
        try:
            from_grandchild = run_in_child(grandchild, kind=grandchild_kind, timeout=TIMEOUT)
        finally:
            pause.resume()
            thread.join(TIMEOUT)
        assert not thread.is_alive(), "the paused rebuild never finished"
        push.send(b"from the child")
        found = {"grandchild": from_grandchild, "child answer": outcome, "generation": zmq.generation()}
        ctx.destroy(linger=5_000)
        return found

    try:
        result = run_in_child(child, timeout=3 * TIMEOUT)
        arrived = sorted(pull.recv() for _ in range(2))
        dealer.send(b"parent")  # the parent never noticed
        parent_answer = dealer.recv()
    finally:
        echo.stop()
    grand = result["grandchild"]
    assert grand["answer"] == b"grandchild"
    assert grand["options"] == (10_000, 11, 0)
    assert grand["current"] and grand["one context"]
    assert result["child answer"] == [b"child"]
    assert len({parent_generation, result["generation"], grand["generation"]}) == 3
    assert arrived == [b"from the child", b"from the grandchild"]
    assert parent_answer == b"parent"

