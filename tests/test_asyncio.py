"""zmqfork.asyncio: awaitable proxies that work in the parent and are rebuilt in a forked child."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Iterator, List, Tuple

import pytest

import zmqfork as zmq
import zmqfork.asyncio as zaio
from forking import FORK_KINDS, run_in_child, start_child

TIMEOUT_S = 10.0


@pytest.fixture
def actx() -> Iterator[zaio.Context]:
    """A zmqfork.asyncio Context destroyed with linger 0 after the test."""
    context = zaio.Context()
    yield context
    context.destroy(linger=0)


def push_pull(ctx: zaio.Context) -> Tuple[zaio.Socket, zaio.Socket]:
    """An async PULL bound on tcp and an async PUSH connected to it, both made in the parent."""
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    return push, pull


def run(coro: Any) -> Any:
    """Run ``coro`` in a fresh event loop, bounded by TIMEOUT_S."""
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def test_types_mirror_zmq_asyncio(actx: zaio.Context) -> None:
    """Sockets of a zmqfork.asyncio Context are zmqfork sockets with awaitable I/O."""
    sock = actx.socket(zmq.PAIR)
    assert isinstance(sock, zaio.Socket) and isinstance(sock, zmq.Socket)
    assert repr(sock).startswith("<zmqfork.asyncio.Socket(zmq.PAIR)")
    assert zaio.Context.instance() is zaio.Context.instance() is not zmq.Context.instance()


def test_awaitable_api_in_the_parent(actx: zaio.Context) -> None:
    """send/recv, multipart, json, pyobj, string, recv_into, poll and Poller all await as in zmq.asyncio."""
    push, pull = push_pull(actx)

    async def main() -> List[Any]:
        got: List[Any] = []
        await push.send(b"frame")
        got.append(await pull.recv())
        await push.send_multipart([b"a", b"b"])
        got.append(await pull.recv_multipart())
        await push.send_json({"k": [1, 2]})
        got.append(await pull.recv_json())
        await push.send_pyobj((1, "x"))
        got.append(await pull.recv_pyobj())
        await push.send_string("text")
        got.append(await pull.recv_string())
        await push.send(b"12345")
        buf = bytearray(8)
        got.append((await pull.recv_into(buf), bytes(buf[:5])))
        got.append(await pull.poll(timeout=0))
        await push.send(b"polled")
        got.append(await pull.poll(timeout=int(TIMEOUT_S * 1000)))
        poller = zaio.Poller()
        poller.register(pull, zmq.POLLIN)
        got.append(await poller.poll(int(TIMEOUT_S * 1000)) == [(pull, zmq.POLLIN)])
        got.append(await pull.recv())
        return got

    assert run(main()) == [
        b"frame",
        [b"a", b"b"],
        {"k": [1, 2]},
        (1, "x"),
        "text",
        (5, b"12345"),
        0,
        zmq.POLLIN,
        True,
        b"polled",
    ]


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_child_with_new_loop_sends_and_receives_on_inherited_sockets(actx: zaio.Context, kind: str) -> None:
    """A child (any fork kind) runs asyncio.run and uses inherited async sockets: send, recv and Poller."""
    push, pull = push_pull(actx)
    router = actx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = actx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")

    async def warm_up() -> None:  # the parent's shadows attach to the parent's loop
        await push.send(b"warm")
        assert await pull.recv() == b"warm"
        await dealer.send(b"hello")
        ident, _ = await router.recv_multipart()
        await router.send_multipart([ident, b"welcome"])
        assert await dealer.recv() == b"welcome"

    run(warm_up())

    def child() -> List[Any]:
        async def main() -> List[Any]:
            await push.send_json({"pid": os.getpid()})
            await dealer.send(b"ping")
            poller = zaio.Poller()
            poller.register(dealer, zmq.POLLIN)
            ready = await poller.poll(int(TIMEOUT_S * 1000))
            return [ready == [(dealer, zmq.POLLIN)], await dealer.recv_string()]

        result = run(main())
        actx.destroy(linger=int(TIMEOUT_S * 1000))
        return result

    async def serve() -> int:
        ident, ping = await router.recv_multipart()
        assert ping == b"ping"
        await router.send_multipart([ident, b"pong"])
        sent = await pull.recv_json()
        return int(sent["pid"])

    handle = start_child(child, kind=kind)
    sender = run(serve())
    assert handle.result(TIMEOUT_S) == [True, "pong"]
    assert sender == handle.pid


@pytest.mark.parametrize("spelling", ["positional", "shadow=", "Context.shadow(address)"])
def test_asyncio_context_shadowing_a_sync_one_follows_it_across_fork(spelling: str) -> None:
    """zmq.asyncio.Context(ctx), as pyzmq spells it, works on a zmqfork Context; in a child it shadows the rebuilt one."""
    ctx = zmq.Context()
    make = {
        "positional": lambda: zaio.Context(ctx),
        "shadow=": lambda: zaio.Context(shadow=ctx),
        "Context.shadow(address)": lambda: zaio.Context.shadow(ctx.underlying),
    }[spelling]
    actx = make()
    push = actx.socket(zmq.PUSH)  # made through the shadow: ctx.destroy() does not know it (as in pyzmq)
    try:
        assert actx._shadow and actx.underlying == ctx.underlying and actx.on_fork == ctx.on_fork
        pull = ctx.socket(zmq.PULL)
        pull.rcvtimeo = int(TIMEOUT_S * 1000)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")

        async def send(what: bytes) -> None:
            await push.send(what)

        run(send(b"parent"))
        assert pull.recv() == b"parent"

        def child() -> bool:
            run(send(b"child"))
            same = actx.underlying == ctx.underlying
            push.close(linger=int(TIMEOUT_S * 1000))
            ctx.destroy(linger=int(TIMEOUT_S * 1000))  # the term waits for the message (a close alone does not)
            return same

        handle = start_child(child, kind="libc")
        assert pull.recv() == b"child"
        assert handle.result(TIMEOUT_S) is True
    finally:
        push.close(linger=0)
        ctx.destroy(linger=0)


def test_parent_loop_is_untouched_by_the_child(actx: zaio.Context) -> None:
    """A recv pending on the parent's (still open) loop completes after a child used the inherited sockets."""
    push, pull = push_pull(actx)
    loop = asyncio.new_event_loop()
    try:
        pending = loop.run_until_complete(_start_recv(pull))

        async def send() -> None:
            await push.send(b"from the child")

        def child() -> None:
            run(send())
            pull.close()  # the inherited PULL, never used here: nothing in libzmq, nothing in the loop
            actx.destroy(linger=int(TIMEOUT_S * 1000))

        run_in_child(child, kind="os")
        received = loop.run_until_complete(asyncio.wait_for(pending, TIMEOUT_S))
    finally:
        loop.close()
    assert received == b"from the child"


async def _start_recv(sock: zaio.Socket) -> "asyncio.Future[Any]":
    """A recv future registered on the running loop, left pending."""
    return asyncio.ensure_future(sock.recv())


def test_inherited_bound_socket_raises_in_child(actx: zaio.Context) -> None:
    """Under on_fork="reconnect", an inherited bound async socket raises InheritedBindError in the child."""
    _, pull = push_pull(actx)

    def child() -> str:
        try:
            run(pull.recv())
        except zmq.InheritedBindError as exc:
            return "tcp://127.0.0.1" in str(exc) and "raised"
        return "no error"

    assert run_in_child(child, kind="libc") == "raised"


def test_close_cancels_pending_awaitables(actx: zaio.Context) -> None:
    """Closing an async socket cancels its pending recv, as zmq.asyncio does, and closes it once."""
    _, pull = push_pull(actx)

    async def main() -> bool:
        pending = asyncio.ensure_future(pull.recv())
        await asyncio.sleep(0)
        pull.close()
        with pytest.raises(asyncio.CancelledError):
            await pending
        return bool(pull.closed)

    assert run(main()) is True

    async def after_close() -> None:
        await pull.recv()

    with pytest.raises(zmq.ZMQError):
        run(after_close())


def test_zmqfork_asyncio_attribute_is_zmqforks_own() -> None:
    """``zmqfork.asyncio`` reached as an attribute is zmqfork's module, never pyzmq's zmq.asyncio."""
    import importlib
    import subprocess
    import sys

    code = "import zmqfork; assert zmqfork.asyncio.__name__ == 'zmqfork.asyncio', zmqfork.asyncio"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert importlib.import_module("zmqfork").asyncio is zaio
