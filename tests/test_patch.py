"""zmqfork.patch(): pyzmq objects made by code that never imports zmqfork become fork-safe."""

from __future__ import annotations

import asyncio
import copy
import importlib
import os
import sys
from types import ModuleType
from typing import Iterator, List

import pytest
import zmq as pyzmq
import zmq.asyncio

import zmqfork
from forking import FORK_KINDS, run_in_child, start_child

TIMEOUT_MS = 10_000


@pytest.fixture
def patched() -> Iterator[None]:
    """zmqfork.patch() for the test, undone afterwards."""
    zmqfork.patch()
    try:
        yield
    finally:
        zmqfork.unpatch()


@pytest.fixture
def pull(ctx: zmqfork.Context) -> pyzmq.Socket:
    """A zmqfork PULL bound on tcp, made before patching."""
    sock = ctx.socket(zmqfork.PULL)
    sock.rcvtimeo = TIMEOUT_MS
    sock.bind_to_random_port("tcp://127.0.0.1")
    return sock


@pytest.fixture
def app(patched: None, pull: zmqfork.Socket, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """tests/patched_app.py imported under the patch: its socket is made at import time."""
    monkeypatch.setenv("PATCHED_APP_ENDPOINT", pull.get_string(zmqfork.LAST_ENDPOINT))
    monkeypatch.setattr(pyzmq.Context, "_instance", None)  # the module's instance() must be made now
    sys.modules.pop("patched_app", None)
    module = importlib.import_module("patched_app")
    try:
        yield module
    finally:
        module.context.destroy(linger=0)
        sys.modules.pop("patched_app", None)


def test_isinstance_stays_true(app: ModuleType) -> None:
    """The import-time context and socket are pyzmq's types (and the fork-safe subclasses)."""
    assert isinstance(app.context, pyzmq.Context) and isinstance(app.push, pyzmq.Socket)
    assert type(app.push) is zmqfork.Socket and app.context is pyzmq.Context.instance()
    async_ctx = zmq.asyncio.Context()
    try:
        sock = async_ctx.socket(pyzmq.PAIR)
        assert isinstance(async_ctx, zmq.asyncio.Context) and isinstance(sock, zmq.asyncio.Socket)
        assert isinstance(pyzmq.Socket(async_ctx, pyzmq.PAIR), pyzmq.Socket)
    finally:
        async_ctx.destroy(linger=0)


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_import_time_socket_works_in_child(app: ModuleType, pull: zmqfork.Socket, kind: str) -> None:
    """A child (any fork kind) sends on the module's import-time socket; the parent receives it."""
    app.report("parent")
    assert pull.recv_string() == "parent"

    def child() -> int:
        app.report(f"child {os.getpid()}")
        app.context.destroy(linger=TIMEOUT_MS)
        return os.getpid()

    handle = start_child(child, kind=kind)
    assert pull.recv_string() == f"child {handle.result()}"
    app.report("parent again")
    assert pull.recv_string() == "parent again"


@pytest.mark.parametrize("kind", ["libc", "raw"])
def test_pyzmq_poller_in_child_does_not_spin(app: ModuleType, kind: str) -> None:
    """zmq.Poller over an inherited fork-safe socket polls the child's socket (plain pyzmq would spin)."""

    def child() -> List[int]:
        poller = pyzmq.Poller()
        poller.register(app.push, pyzmq.POLLOUT)
        events = [mask for _, mask in poller.poll(TIMEOUT_MS)]
        app.context.destroy(linger=0)
        return events

    assert run_in_child(child, kind=kind, timeout=TIMEOUT_MS / 1000) == [pyzmq.POLLOUT]


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_asyncio_context_made_after_patch_works_in_child(patched: None, pull: zmqfork.Socket, kind: str) -> None:
    """zmq.asyncio.Context() under the patch: a child with a new event loop sends on the inherited socket."""
    actx = zmq.asyncio.Context()
    try:
        push = actx.socket(pyzmq.PUSH)
        push.connect(pull.get_string(zmqfork.LAST_ENDPOINT))

        async def send(text: str) -> None:
            await push.send_string(text)

        asyncio.run(send("parent"))
        assert pull.recv_string() == "parent"

        def child() -> None:
            asyncio.run(asyncio.wait_for(send(f"child {os.getpid()}"), TIMEOUT_MS / 1000))
            actx.destroy(linger=TIMEOUT_MS)

        handle = start_child(child, kind=kind)
        assert pull.recv_string() == f"child {handle.pid}"
        handle.result()
    finally:
        actx.destroy(linger=0)


def test_bound_socket_raises_inherited_bind_error(patched: None) -> None:
    """The proxies' semantics hold: a patched socket bound in the parent raises InheritedBindError in the child."""
    ctx = pyzmq.Context()
    try:
        sock = ctx.socket(pyzmq.PULL)
        sock.bind_to_random_port("tcp://127.0.0.1")

        def child() -> str:
            with pytest.raises(zmqfork.InheritedBindError):
                sock.recv(pyzmq.NOBLOCK)
            sock.close()
            ctx.term()
            return "raised, then closed"

        assert run_in_child(child, kind="os") == "raised, then closed"
    finally:
        ctx.destroy(linger=0)


def test_options_and_close_in_the_parent(patched: None, pull: zmqfork.Socket) -> None:
    """Options set as attributes are read back; closing closes once; the context terminates."""
    ctx = pyzmq.Context()
    sock = ctx.socket(pyzmq.PUSH)
    sock.linger = 0
    sock.sndhwm = 7
    assert (sock.linger, sock.getsockopt(pyzmq.SNDHWM)) == (0, 7)
    with sock.connect(pull.get_string(zmqfork.LAST_ENDPOINT)):
        sock.send(b"x")
        assert pull.recv() == b"x"
    sock.close()
    assert sock.closed
    ctx.term()
    assert ctx.closed


def test_unpatch_restores_pyzmq_and_objects_made_before_stay_plain() -> None:
    """Before patch and after unpatch, zmq.Context() is pyzmq's own; a shadow of a foreign context stays pyzmq's."""
    before = pyzmq.Context()
    zmqfork.patch()
    zmqfork.patch()  # idempotent
    try:
        shadow = pyzmq.Context(shadow=before.underlying)
        assert type(shadow) is pyzmq.Context
    finally:
        zmqfork.unpatch()
    after = pyzmq.Context()
    try:
        assert type(before) is pyzmq.Context and type(after) is pyzmq.Context
        assert "__new__" not in pyzmq.Context.__dict__ and "__new__" not in pyzmq.Socket.__dict__
    finally:
        after.term()
        before.term()


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_shadows_subclasses_and_from_socket_are_redirected(patched: None, pull: zmqfork.Socket, kind: str) -> None:
    """Under the patch, shadows and copies of fork-safe sockets, custom socket classes and from_socket all rebuild in a child."""

    class Tagged(pyzmq.Socket):  # type: ignore[type-arg]
        """A library's own socket class."""

    ctx = pyzmq.Context()
    try:
        push = ctx.socket(pyzmq.PUSH)
        push.connect(pull.get(pyzmq.LAST_ENDPOINT).decode())
        tagged = ctx.socket(pyzmq.PUSH, socket_class=Tagged)
        tagged.connect(pull.get(pyzmq.LAST_ENDPOINT).decode())
        shadow = pyzmq.Socket.shadow(push.underlying)
        copied = copy.copy(push)
        wrapped = zmq.asyncio.Socket.from_socket(push)
        made = [shadow, copied, tagged, wrapped, pyzmq.Context.shadow(ctx.underlying)]
        assert all(isinstance(obj, (zmqfork.Socket, zmqfork.Context)) for obj in made)
        assert isinstance(tagged, Tagged) and isinstance(wrapped, zmq.asyncio.Socket)

        def child() -> None:
            shadow.send(b"shadow")
            copied.send(b"copy")
            tagged.send(b"tagged")

            async def send() -> None:
                await wrapped.send(b"from_socket")

            asyncio.run(send())
            ctx.destroy(linger=TIMEOUT_MS)

        run_in_child(child, kind=kind)
        assert sorted(pull.recv() for _ in range(4)) == [b"copy", b"from_socket", b"shadow", b"tagged"]
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_context_subclasses_and_instance_are_redirected(patched: None, pull: zmqfork.Socket, kind: str) -> None:
    """A library's own zmq.Context subclass gets a fork-safe subclass of itself; Context.instance() is one context."""

    class LibraryContext(pyzmq.Context):  # type: ignore[type-arg]
        """A library's own context class."""

    ctx = LibraryContext()
    try:
        assert isinstance(ctx, LibraryContext) and isinstance(ctx, zmqfork.Context)
        assert pyzmq.Context.instance() is zmqfork.Context.instance()
        push = ctx.socket(pyzmq.PUSH)
        push.connect(pull.get(pyzmq.LAST_ENDPOINT).decode())

        def child() -> None:
            push.send(b"library context")
            ctx.destroy(linger=TIMEOUT_MS)

        run_in_child(child, kind=kind)
        assert pull.recv() == b"library context"
    finally:
        ctx.destroy(linger=0)
