"""Sockets that cross every way Python starts a process: pickling by recipe, and multiprocessing's start methods."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import threading
from typing import Any, Iterator, List, Set, Tuple

import pytest
import zmq as pyzmq

import mpwork
import zmqfork
import zmqfork.asyncio

TIMEOUT_MS = 20_000
START_METHODS = ("fork", "spawn", "forkserver")


class Answering:
    """A REP in a thread of the parent that answers ``ok`` to every report and keeps them."""

    def __init__(self, ctx: zmqfork.Context) -> None:
        self.rep = ctx.socket(pyzmq.REP)
        self.rep.rcvtimeo = TIMEOUT_MS
        self.endpoint = f"tcp://127.0.0.1:{self.rep.bind_to_random_port('tcp://127.0.0.1')}"
        self.reports: List[Tuple[str, int]] = []
        self.error: List[BaseException] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.rep.poll(50):
                    continue
                tag, pid = self.rep.recv_string().split()
                self.reports.append((tag, int(pid)))
                self.rep.send(b"ok")
            except BaseException as exc:  # reported by the test
                self.error.append(exc)
                return

    def stop(self) -> List[Tuple[str, int]]:
        self._stop.set()
        self.thread.join(TIMEOUT_MS / 1000)
        assert not self.thread.is_alive() and not self.error, self.error
        return self.reports


@pytest.fixture
def answering() -> Iterator[Tuple[zmqfork.Context, Answering]]:
    ctx = zmqfork.Context()
    server = Answering(ctx)
    yield ctx, server
    server.stop()
    ctx.destroy(linger=0)


def req_to(ctx: zmqfork.Context, endpoint: str) -> zmqfork.Socket:
    req = ctx.socket(pyzmq.REQ)
    req.rcvtimeo = TIMEOUT_MS
    req.linger = TIMEOUT_MS
    req.connect(endpoint)
    return req


@pytest.mark.parametrize("method", START_METHODS)
def test_one_program_delivers_from_every_child_under_every_start_method(
    answering: Tuple[zmqfork.Context, Answering], method: str
) -> None:
    """Process args, Pool(initializer, initargs) and ProcessPoolExecutor(mp_context, initializer, initargs) all deliver."""
    ctx, server = answering
    req = req_to(ctx, server.endpoint)
    mp = multiprocessing.get_context(method)
    processes = [mp.Process(target=mpwork.report, args=(req, "process")) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(TIMEOUT_MS / 1000)
        assert process.exitcode == 0, (method, process.exitcode)
    with mp.Pool(2, initializer=mpwork.init_worker, initargs=(req,)) as pool:
        pool_pids = set(pool.map(mpwork.task, ["pool"] * 4, chunksize=1))
        pool.close()
        pool.join()
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=mp, initializer=mpwork.init_worker,
                                                initargs=(req,)) as executor:
        executor_pids = set(executor.map(mpwork.task, ["executor"] * 4))
    reports = server.stop()
    by_tag: dict = {}
    for tag, pid in reports:
        by_tag.setdefault(tag, set()).add(pid)
    assert by_tag["process"] == {process.pid for process in processes}
    assert pool_pids <= by_tag["init"] and executor_pids <= by_tag["init"]
    assert len(by_tag["init"]) == 4  # every pool and executor worker reported from its initializer
    assert by_tag["pool"] == pool_pids and by_tag["executor"] == executor_pids
    assert os.getpid() not in by_tag["init"] | by_tag["process"]


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_librarys_socket_class_travels_as_itself(answering: Tuple[zmqfork.Context, Answering], method: str) -> None:
    """A socket made with socket_class=TaggedSocket (a fork-safe twin of it) is unpickled as the twin of TaggedSocket."""
    ctx, server = answering
    req = ctx.socket(pyzmq.REQ, socket_class=mpwork.TaggedSocket)
    req.rcvtimeo = req.linger = TIMEOUT_MS
    req.connect(server.endpoint)
    again = pickle.loads(pickle.dumps(req))
    assert type(again) is type(req) and again.context is not ctx
    again.context.destroy(linger=0)
    process = multiprocessing.get_context(method).Process(target=mpwork.report_as_tagged, args=(req, "tagged"))
    process.start()
    process.join(TIMEOUT_MS / 1000)
    assert process.exitcode == 0
    assert server.stop() == [("tagged", process.pid)]


def test_a_librarys_context_class_under_patch_travels_as_itself() -> None:
    """Under patch(), a LibraryContext (a fork-safe twin of it) and its sockets pickle and come back as the twin."""
    zmqfork.patch()
    try:
        ctx = mpwork.LibraryContext()
        sock = ctx.socket(pyzmq.PUSH)
        sock.connect("tcp://127.0.0.1:5")
        ctx2, sock2 = pickle.loads(pickle.dumps((ctx, sock)))
        assert type(ctx2) is type(ctx) and isinstance(ctx2, mpwork.LibraryContext) and ctx2 is not ctx
        assert type(sock2) is type(sock) and sock2.context is ctx2
        for context in (ctx, ctx2):
            context.destroy(linger=0)
    finally:
        zmqfork.unpatch()


def test_sockets_of_one_context_share_one_context_after_unpickling() -> None:
    """Pickled together, sockets keep one Context; its options, default socket options and the recipes come back."""
    ctx = zmqfork.Context(on_fork="rebind")
    try:
        ctx.max_sockets = 99
        ctx.linger = 7
        pull = ctx.socket(pyzmq.PULL)
        pull.rcvtimeo = TIMEOUT_MS
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = ctx.socket(pyzmq.PUSH)
        push.sndhwm = 5
        closing = ctx.socket(pyzmq.PUSH, on_fork="close")
        push.connect(f"tcp://127.0.0.1:{port}")
        sub = ctx.socket(pyzmq.SUB)
        sub.subscribe(b"topic")
        push2, sub2, closing2, ctx2 = pickle.loads(pickle.dumps((push, sub, closing, ctx)))
        assert push2.context is sub2.context is ctx2 and ctx2 is not ctx
        assert (ctx2.on_fork, push2.on_fork, closing2.on_fork) == ("rebind", "rebind", "close")
        assert closing2.closed  # on_fork="close": closed wherever it arrives, as in a forked child
        assert isinstance(push2, zmqfork.Socket) and push2.type == pyzmq.PUSH and not push2.closed
        push2.send(b"from the copy")
        assert pull.recv() == b"from the copy"
        assert (push2.sndhwm, push2.linger, ctx2.max_sockets, ctx2.sockopts) == (5, 7, 99, {pyzmq.LINGER: 7})
        assert push2.underlying != push.underlying and ctx2.underlying != ctx.underlying
        assert [step.describe() for step in sub2._zf_recipe.steps] == [step.describe() for step in sub._zf_recipe.steps]
        ctx2.destroy(linger=0)
    finally:
        ctx.destroy(linger=0)


def test_unpickled_binds_follow_the_policy(tmp_path: Any) -> None:
    """A bound socket unpickled raises InheritedBindError naming the endpoint on use, by default; rebind binds."""
    ctx = zmqfork.Context()
    try:
        bound = ctx.socket(pyzmq.PULL)
        endpoint = f"ipc://{tmp_path}/zmqfork-pickle.ipc"
        bound.bind(endpoint)
        rebinding = ctx.socket(pyzmq.PULL, on_fork="rebind")
        rebinding.bind(endpoint + "-2")
        copy, rebound = pickle.loads(pickle.dumps((bound, rebinding)))
        with pytest.raises(zmqfork.InheritedBindError, match="zmqfork-pickle"):
            copy.recv(pyzmq.NOBLOCK)
        with pytest.raises(zmqfork.InheritedBindError):
            copy.poll(0)
        copy.close()
        assert copy.closed
        assert rebound.poll(0) == 0  # bound again (ipc: takes the path over)
        rebound.context.destroy(linger=0)
    finally:
        ctx.destroy(linger=0)


def test_asyncio_sockets_and_shadows_pickle() -> None:
    """Async sockets come back async; a shadow of a zmqfork socket comes back following its origin's copy."""
    import asyncio

    actx = zmqfork.asyncio.Context()
    ctx = zmqfork.Context()
    try:
        pull = ctx.socket(pyzmq.PULL)
        pull.rcvtimeo = TIMEOUT_MS
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        apush = actx.socket(pyzmq.PUSH)
        apush.connect(f"tcp://127.0.0.1:{port}")
        push = ctx.socket(pyzmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        shadow = zmqfork.Socket.shadow(push)
        apush2, push2, shadow2 = pickle.loads(pickle.dumps((apush, push, shadow)))
        assert isinstance(apush2, zmqfork.asyncio.Socket) and shadow2._shadow

        async def send() -> None:
            await apush2.send(b"async copy")

        asyncio.run(send())
        shadow2.send(b"shadow copy")
        assert sorted(pull.recv() for _ in range(2)) == [b"async copy", b"shadow copy"]
        assert shadow2.underlying == push2.underlying != push.underlying
        for copy in (apush2, push2):
            copy.context.destroy(linger=0)
    finally:
        ctx.destroy(linger=0)
        actx.destroy(linger=0)


def test_what_cannot_travel_is_refused_when_pickling() -> None:
    """Closed objects, inproc endpoints, monitors, foreign shadows, classes with their own __init__ and odd option
    values are refused, saying why."""
    ctx = zmqfork.Context()
    plain = pyzmq.Context()
    secret = pyzmq.curve_keypair()[1]
    try:
        closed = ctx.socket(pyzmq.PUSH)
        closed.close()
        inproc = ctx.socket(pyzmq.PAIR)
        inproc.curve_secretkey = secret
        inproc.connect("inproc://here")
        monitored = ctx.socket(pyzmq.PUSH)
        monitored.get_monitor_socket()
        plain_push = plain.socket(pyzmq.PUSH)
        foreign = zmqfork.Socket.shadow(plain_push.underlying)
        terminated = zmqfork.Context()
        terminated.term()

        class Stateful(pyzmq.Socket):  # type: ignore[type-arg]
            tag = ""  # declared: pyzmq's sockets take only options and declared attributes

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.tag = "set up here, not in the recipe"

        stateful = ctx.socket(pyzmq.PUSH, socket_class=Stateful)
        cases = [
            (closed, "closed"),
            (inproc, "inproc"),
            (monitored, "monitor"),
            (foreign, "does not own"),
            (terminated, "terminated"),
            (stateful, "an __init__ of its own .*Stateful"),
        ]
        for obj, reason in cases:
            with pytest.raises(TypeError, match=reason) as info:
                pickle.dumps(obj)
            assert secret.decode() not in str(info.value)
    finally:
        plain.destroy(linger=0)
        ctx.destroy(linger=0)
