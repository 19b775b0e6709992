"""One family: zmqfork's objects are pyzmq's, so everything in pyzmq that takes a socket or context takes them.

Each pyzmq entry point is tried in the parent and in a child of each fork
kind, where the socket it is handed was inherited and has not been used yet.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import select
import threading
import warnings
from typing import Any, Callable, List, Tuple

import pytest
import zmq as pyzmq
import zmq.asyncio
import zmq.devices
import zmq.log.handlers
import zmq.utils.monitor

import zmqfork
from forking import FORK_KINDS, run_in_child

TIMEOUT_MS = 10_000


def pair(ctx: zmqfork.Context, kind: int = pyzmq.PUSH) -> Tuple[zmqfork.Socket, zmqfork.Socket]:
    """An inproc PULL and a ``kind`` socket connected to it, both zmqfork's: a child rebuilds both, in its own context."""
    pair.count += 1  # type: ignore[attr-defined]
    endpoint = f"inproc://family-{pair.count}"  # type: ignore[attr-defined]
    pull = ctx.socket(pyzmq.PULL)
    pull.rcvtimeo = TIMEOUT_MS
    pull.bind(endpoint)
    push = ctx.socket(kind)
    push.connect(endpoint)
    return pull, push


pair.count = 0  # type: ignore[attr-defined]


def in_parent_and_children(check: Callable[[], Any]) -> None:
    """Run ``check`` here, then in a child of each fork kind; it must return True everywhere."""
    assert check() is True
    for kind in FORK_KINDS:
        assert run_in_child(check, kind=kind) is True, kind


def test_isinstance_and_pyzmq_classes(ctx: zmqfork.Context) -> None:
    """zmqfork's classes are subclasses of pyzmq's; the names pyzmq users reach for are pyzmq's own."""
    sock = ctx.socket(pyzmq.PAIR)
    actx = zmqfork.asyncio.Context()
    try:
        asock = actx.socket(pyzmq.PAIR)
        assert isinstance(ctx, pyzmq.Context) and isinstance(sock, pyzmq.Socket)
        assert isinstance(actx, pyzmq.asyncio.Context) and isinstance(asock, pyzmq.asyncio.Socket)
        assert isinstance(asock, zmqfork.Socket) and isinstance(actx, zmqfork.Context)
        assert zmqfork.Poller is pyzmq.Poller and zmqfork.select is pyzmq.select
        assert issubclass(zmqfork.asyncio.Poller, pyzmq.asyncio.Poller)
    finally:
        actx.destroy(linger=0)


def test_pyzmq_poller_and_select_answer_with_the_sockets(ctx: zmqfork.Context) -> None:
    """pyzmq's own Poller and select, given inherited zmqfork sockets, rebuild them and report the sockets."""
    pull, push = pair(ctx)

    def check() -> bool:
        push.send(b"x")
        poller = pyzmq.Poller()
        poller.register(pull, pyzmq.POLLIN)
        polled = dict(poller.poll(TIMEOUT_MS))
        readable, _, _ = pyzmq.select([pull], [], [], TIMEOUT_MS / 1000)
        ok = polled == {pull: pyzmq.POLLIN} and readable == [pull] and pull.poll(0) == pyzmq.POLLIN
        return ok and pull.recv() == b"x"

    in_parent_and_children(check)


def test_compiled_poll_never_gets_a_stale_handle(ctx: zmqfork.Context) -> None:
    """zmq.zmq_poll on a list, the very first call in a child, is handed rebuilt sockets."""
    pull, push = pair(ctx)
    parent_handles = (pull.underlying, push.underlying)

    def check() -> bool:
        events = pyzmq.zmq_poll([(push, pyzmq.POLLOUT)], TIMEOUT_MS)
        rebuilt = push.underlying not in parent_handles or os.getpid() == parent_pid
        return events == [(push, pyzmq.POLLOUT)] and rebuilt

    parent_pid = os.getpid()
    in_parent_and_children(check)


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_proxy_steerable_and_device_relay_inherited_sockets(ctx: zmqfork.Context, kind: str) -> None:
    """pyzmq's proxy_steerable (and zmq.device, zmq.proxy) run on inherited sockets in a child, and stop on TERMINATE."""
    sink = ctx.socket(pyzmq.PULL)
    sink.rcvtimeo = TIMEOUT_MS
    sink_port = sink.bind_to_random_port("tcp://127.0.0.1")
    front = ctx.socket(pyzmq.PULL)
    front.bind_to_random_port("tcp://127.0.0.1")
    back = ctx.socket(pyzmq.PUSH)
    back.connect(f"tcp://127.0.0.1:{sink_port}")

    def child() -> str:
        front.close()  # inherited bind: made again here
        inner = ctx.socket(pyzmq.PULL)
        port = inner.bind_to_random_port("tcp://127.0.0.1")
        control = ctx.socket(pyzmq.PAIR)
        control.bind("inproc://control")
        steer = ctx.socket(pyzmq.PAIR)
        steer.connect("inproc://control")
        capture = ctx.socket(pyzmq.PUSH)
        capture.bind("inproc://capture")
        caught = ctx.socket(pyzmq.PULL)
        caught.rcvtimeo = TIMEOUT_MS
        caught.connect("inproc://capture")
        errors: List[BaseException] = []

        def run() -> None:
            try:
                pyzmq.proxy_steerable(inner, back, capture, control)
            except BaseException as exc:  # reported below
                errors.append(exc)

        relay = threading.Thread(target=run, daemon=True)
        relay.start()
        feeder = ctx.socket(pyzmq.PUSH)
        feeder.connect(f"tcp://127.0.0.1:{port}")
        feeder.send(b"through the proxy")
        caught.recv()  # the proxy has relayed it
        steer.send(b"TERMINATE")
        relay.join(TIMEOUT_MS / 1000)
        if relay.is_alive() or errors:
            return f"relay alive={relay.is_alive()} errors={errors!r}"
        ctx.destroy(linger=TIMEOUT_MS)
        return "ok"

    assert run_in_child(child, kind=kind) == "ok"
    assert sink.recv() == b"through the proxy"
    assert front.closed is False  # the parent's own socket is untouched


@pytest.mark.parametrize("relay", ["proxy", "device"])
def test_proxy_and_device_take_zmqfork_sockets(ctx: zmqfork.Context, relay: str) -> None:
    """zmq.proxy and zmq.device accept zmqfork sockets (they raised TypeError on zmqfork's former proxies)."""
    sink = ctx.socket(pyzmq.PULL)
    sink.rcvtimeo = TIMEOUT_MS
    sink_port = sink.bind_to_random_port("tcp://127.0.0.1")
    relay_ctx = zmqfork.Context()
    inner = relay_ctx.socket(pyzmq.PULL)
    port = inner.bind_to_random_port("tcp://127.0.0.1")
    out = relay_ctx.socket(pyzmq.PUSH)
    out.connect(f"tcp://127.0.0.1:{sink_port}")
    errors: List[BaseException] = []

    def run() -> None:
        try:
            if relay == "proxy":
                pyzmq.proxy(inner, out)
            else:
                pyzmq.device(pyzmq.QUEUE, inner, out)
        except pyzmq.ContextTerminated:
            pass
        except BaseException as exc:  # reported by the test
            errors.append(exc)
        finally:
            inner.close(linger=0)
            out.close(linger=0)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    feeder = ctx.socket(pyzmq.PUSH)
    feeder.connect(f"tcp://127.0.0.1:{port}")
    feeder.send(relay.encode())
    assert sink.recv() == relay.encode()
    relay_ctx.term()  # the relay returns on ETERM and closes its sockets, then term returns
    thread.join(TIMEOUT_MS / 1000)
    assert not thread.is_alive() and not errors


def test_devices_run_on_a_zmqfork_context(ctx: zmqfork.Context) -> None:
    """zmq.devices.ThreadProxy and ProcessDevice (which forks) relay with zmqfork's Context as their factory."""
    sink = ctx.socket(pyzmq.PULL)
    sink.rcvtimeo = TIMEOUT_MS
    sink_port = sink.bind_to_random_port("tcp://127.0.0.1")
    feeders = []
    for device_class in (zmq.devices.ThreadProxy, zmq.devices.ProcessDevice):
        if device_class is zmq.devices.ThreadProxy:
            device = device_class(pyzmq.PULL, pyzmq.PUSH)
        else:
            device = device_class(pyzmq.QUEUE, pyzmq.PULL, pyzmq.PUSH)
        device.context_factory = zmqfork.Context.instance
        in_port = device.bind_in_to_random_port("tcp://127.0.0.1")
        device.connect_out(f"tcp://127.0.0.1:{sink_port}")
        device.start()
        feeder = ctx.socket(pyzmq.PUSH)
        feeder.connect(f"tcp://127.0.0.1:{in_port}")
        feeder.send(device_class.__name__.encode())
        feeders.append((device, feeder))
        assert sink.recv() == device_class.__name__.encode()
    for device, feeder in feeders:
        feeder.close(linger=0)
        if isinstance(device, zmq.devices.ProcessDevice):
            device.launcher.terminate()
            device.launcher.join(TIMEOUT_MS / 1000)
            assert not device.launcher.is_alive()


def test_zmqstream_and_monitor_messages_in_a_child(ctx: zmqfork.Context) -> None:
    """ZMQStream and recv_monitor_message work on inherited zmqfork sockets in a child."""
    ioloop = pytest.importorskip("tornado.ioloop")
    from zmq.eventloop.zmqstream import ZMQStream

    pull, push = pair(ctx)
    watched = ctx.socket(pyzmq.DEALER)

    def check() -> bool:
        import asyncio

        asyncio.set_event_loop(asyncio.new_event_loop())
        loop = ioloop.IOLoop.current()
        got: List[Any] = []
        stream = ZMQStream(pull)
        stream.on_recv(lambda msg: (got.append(msg), loop.stop()))
        push.send(b"via stream")
        loop.call_later(TIMEOUT_MS / 1000, loop.stop)
        loop.start()
        stream.stop_on_recv()
        listener = ctx.socket(pyzmq.ROUTER)
        endpoint = f"tcp://127.0.0.1:{listener.bind_to_random_port('tcp://127.0.0.1')}"
        monitor = watched.get_monitor_socket(pyzmq.EVENT_CONNECTED)
        monitor.rcvtimeo = TIMEOUT_MS
        watched.connect(endpoint)
        event = zmq.utils.monitor.recv_monitor_message(monitor)
        watched.disconnect(endpoint)
        watched.disable_monitor()
        listener.close(linger=0)
        return got == [[b"via stream"]] and event["event"] == pyzmq.EVENT_CONNECTED

    in_parent_and_children(check)


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_pubhandler_publishes_from_a_child(ctx: zmqfork.Context, kind: str) -> None:
    """A zmq.log PUBHandler on an inherited zmqfork PUB publishes the child's log records."""
    from forking import start_child

    sub = ctx.socket(pyzmq.SUB)
    sub.rcvtimeo = TIMEOUT_MS
    sub.subscribe(b"")
    sub_port = sub.bind_to_random_port("tcp://127.0.0.1")
    pub = ctx.socket(pyzmq.PUB)
    pub.connect(f"tcp://127.0.0.1:{sub_port}")
    acked_r, acked_w = os.pipe()

    def child() -> bool:
        handler = zmq.log.handlers.PUBHandler(pub)
        logger = logging.getLogger("zmqfork-family-pubhandler")
        logger.propagate = False
        logger.addHandler(handler)
        for _ in range(TIMEOUT_MS // 10):  # a PUB drops until connected: publish until the reader has one
            logger.warning("from the child")
            if select.select([acked_r], [], [], 0.01)[0]:
                return True
        return False

    try:
        handle = start_child(child, kind=kind)
        topic, message = sub.recv_multipart()
        os.write(acked_w, b"a")
        assert handle.result() is True
        assert topic.startswith(b"WARNING") and b"from the child" in message
    finally:
        os.close(acked_r)
        os.close(acked_w)


def test_copy_shadow_and_socket_class_follow_across_fork(ctx: zmqfork.Context) -> None:
    """copy.copy, Socket.shadow, Context.shadow and a custom socket_class all work in a child."""

    sent: List[int] = []

    class Counting(pyzmq.Socket):  # type: ignore[type-arg]
        def send(self, *args: Any, **kwargs: Any) -> Any:
            sent.append(os.getpid())
            return super().send(*args, **kwargs)

    pull, push = pair(ctx)
    shadow_push = zmqfork.Socket.shadow(push.underlying)
    copied = copy.copy(push)
    ctx_shadow = zmqfork.Context.shadow(ctx.underlying)
    counting = ctx.socket(pyzmq.PUSH, socket_class=Counting)
    counting.connect(f"inproc://family-{pair.count}")  # type: ignore[attr-defined]
    assert shadow_push._shadow and copied._shadow and ctx_shadow._shadow
    assert isinstance(counting, Counting) and isinstance(counting, zmqfork.Socket)

    def check() -> bool:
        shadow_push.send(b"1")
        copied.send(b"2")
        counting.send(b"3")
        got = sorted(pull.recv() for _ in range(3))
        return (
            got == [b"1", b"2", b"3"]
            and shadow_push.underlying == push.underlying
            and ctx_shadow.underlying == ctx.underlying
            and sent[-1:] == [os.getpid()]
        )

    in_parent_and_children(check)


def test_context_managers_and_resource_warnings() -> None:
    """Context managers close and terminate; an unclosed socket warns as pyzmq's does, in the parent only."""
    with zmqfork.Context() as ctx, ctx.socket(pyzmq.PAIR) as sock:
        sock.bind("inproc://cm")
    assert sock.closed and ctx.closed
    ctx = zmqfork.Context()
    sock = ctx.socket(pyzmq.PAIR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del sock
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    inherited = ctx.socket(pyzmq.PAIR)

    def child() -> bool:
        nonlocal inherited
        with warnings.catch_warnings(record=True) as in_child:
            warnings.simplefilter("always")
            del inherited
            gc.collect()
        return not in_child

    assert run_in_child(child) is True
    inherited.close()
    ctx.term()


def test_asyncio_from_socket_in_a_child(ctx: zmqfork.Context) -> None:
    """zmq.asyncio.Socket.from_socket of an inherited zmqfork socket, made in the child, sends from there."""
    pull, push = pair(ctx)

    def check() -> bool:
        import asyncio

        async def main() -> None:
            await pyzmq.asyncio.Socket.from_socket(push).send(b"async")

        asyncio.run(main())
        return pull.recv() == b"async"

    in_parent_and_children(check)


# ---- found by an independent review: each failed before its fix ---------------------------------------


def closed_pyzmq_socket_poll() -> List[Tuple[Any, int]]:
    """What pyzmq's Poller answers for a fresh, closed pyzmq socket (the reference for a closed one)."""
    plain = pyzmq.Context()
    fresh = plain.socket(pyzmq.PULL)
    fresh.close()
    poller = pyzmq.Poller()
    poller.register(fresh, pyzmq.POLLIN)
    events = [(0 if sock is fresh else sock, mask) for sock, mask in poller.poll(0)]
    plain.term()
    return events


def test_a_socket_closed_in_a_child_polls_like_a_closed_pyzmq_socket(ctx: zmqfork.Context) -> None:
    """Closed in the child (by close() or on_fork="close"), a socket hands pyzmq's poll no parent handle: no hang."""
    by_policy = ctx.socket(pyzmq.PULL, on_fork="close")
    by_policy.bind("tcp://127.0.0.1:*")
    by_hand = ctx.socket(pyzmq.PULL)

    def check() -> bool:
        if os.getpid() == parent_pid:
            return True
        reference = closed_pyzmq_socket_poll()
        by_hand.close()
        results = []
        for sock in (by_policy, by_hand):
            poller = pyzmq.Poller()
            poller.register(sock, pyzmq.POLLIN)
            results.append([(0 if polled is sock else polled, mask) for polled, mask in poller.poll(0)])
        return sock.closed and results == [reference, reference]

    parent_pid = os.getpid()
    in_parent_and_children(check)


def test_sockets_of_a_context_terminated_in_a_child_raise_context_terminated(ctx: zmqfork.Context) -> None:
    """term() on an unused inherited context, then a socket of it: ContextTerminated, no libzmq call on the parent's."""
    _, push = pair(ctx)

    def check() -> bool:
        if os.getpid() == parent_pid:
            return True
        ctx.term()
        with pytest.raises(pyzmq.ContextTerminated):
            push.send(b"after term")
        return ctx.closed and ctx.underlying == 0

    parent_pid = os.getpid()
    in_parent_and_children(check)


def test_debug_logging_through_a_pubhandler_on_a_rebuilt_socket(ctx: zmqfork.Context) -> None:
    """zmqfork's DEBUG log lines sent through a PUBHandler on a zmqfork PUB rebuild it once, without recursion."""
    pub = ctx.socket(pyzmq.PUB)
    pub.connect("tcp://127.0.0.1:9")  # never answered: only the rebuild matters

    def check() -> bool:
        if os.getpid() == parent_pid:
            return True
        handler = zmq.log.handlers.PUBHandler(pub)
        logger = logging.getLogger("zmqfork")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        before = len(os.listdir("/proc/self/fd"))
        logging.getLogger("zmqfork-family").warning("first")
        pub.send_multipart([b"topic", b"second"])
        return len(os.listdir("/proc/self/fd")) <= before + 8  # one context and one socket, not one per level

    parent_pid = os.getpid()
    logging.getLogger("zmqfork-family").addHandler(logging.NullHandler())
    in_parent_and_children(check)


def test_family_survives_threads_making_sockets_while_another_notices() -> None:
    """Listing the family while other threads add to it never fails (it was a WeakSet iterated unguarded)."""
    from zmqfork._generation import family

    ctx = zmqfork.Context()
    done = threading.Event()
    errors: List[BaseException] = []

    def make() -> None:
        while not done.is_set():
            ctx.socket(pyzmq.PUSH).close()

    maker = threading.Thread(target=make, daemon=True)
    maker.start()
    try:
        for _ in range(20_000):
            try:
                family()
            except BaseException as exc:
                errors.append(exc)
                break
    finally:
        done.set()
        maker.join(TIMEOUT_MS / 1000)
        ctx.destroy(linger=0)
    assert not errors and not maker.is_alive()


def test_tornado_future_sockets_are_fork_safe(ctx: zmqfork.Context) -> None:
    """socket_class=zmq.eventloop.future.Socket (any pyzmq awaitable socket) rebuilds in a child and delivers."""
    pytest.importorskip("tornado")
    import zmq.eventloop.future as future

    pull, _ = pair(ctx)
    sock = ctx.socket(pyzmq.PUSH, socket_class=future.Socket)
    sock.connect(f"inproc://family-{pair.count}")  # type: ignore[attr-defined]
    assert isinstance(sock, future.Socket) and isinstance(sock, zmqfork.Socket)

    def check() -> bool:
        import asyncio

        async def send() -> None:
            await sock.send(b"tornado future")

        asyncio.run(send())
        return pull.recv() == b"tornado future"

    in_parent_and_children(check)


def test_shadows_of_addresses_taken_before_the_fork_follow_the_rebuilt_objects(ctx: zmqfork.Context) -> None:
    """Socket.shadow/Context.shadow of an address noted in the parent shadow the child's rebuilt objects."""
    pull, push = pair(ctx)
    socket_address, context_address = push.underlying, ctx.underlying

    def check() -> bool:
        shadow = zmqfork.Socket.shadow(socket_address)
        context_shadow = zmqfork.Context.shadow(context_address)
        shadow.send(b"via the old address")
        return (
            pull.recv() == b"via the old address"
            and shadow.underlying == push.underlying
            and context_shadow.underlying == ctx.underlying
        )

    in_parent_and_children(check)


def test_bad_socket_classes_and_policies_are_named() -> None:
    """A socket_class that skips zmqfork's __init__, on_fork on a shadow, and a bad on_fork assigned: clear errors."""

    class Explicit(pyzmq.Socket):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pyzmq.Socket.__init__(self, *args, **kwargs)

    ctx = zmqfork.Context()
    try:
        with pytest.raises(TypeError, match="super"):
            ctx.socket(pyzmq.PUSH, socket_class=Explicit)
        with pytest.raises(TypeError, match="on_fork"):
            zmqfork.Context(shadow=ctx, on_fork="close")
        with pytest.raises(ValueError, match="on_fork"):
            ctx.on_fork = "bogus"
        ctx.on_fork = "rebind"
        assert ctx.socket(pyzmq.PUSH).on_fork == "rebind"
    finally:
        ctx.destroy(linger=0)


def test_the_address_of_a_closed_socket_is_no_longer_its_own(ctx: zmqfork.Context) -> None:
    """Once a zmqfork socket or context closed its libzmq object (whose memory libzmq may reuse), its address is foreign."""
    from zmqfork._generation import origin_in_family

    sock = ctx.socket(pyzmq.PUSH)
    address = sock.underlying
    assert origin_in_family(address, zmqfork.Socket) is sock
    sock.close()
    assert origin_in_family(address, zmqfork.Socket) is None
    other = zmqfork.Context()
    context_address = other.underlying
    assert origin_in_family(context_address, zmqfork.Context) is other
    other.term()
    assert origin_in_family(context_address, zmqfork.Context) is None
