"""The core promise: proxies inherited across fork work in the child, wherever the fork came from."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Tuple

import pytest

import zmqfork as zmq
import zmqfork.context as context_module
from forking import FORK_KINDS, open_fds, run_in_child, start_child

TIMEOUT_MS = 10_000


def pull_pair(ctx: zmq.Context) -> Tuple[zmq.Socket, zmq.Socket]:
    """A PULL bound on tcp and a PUSH connected to it, both made in the parent."""
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = TIMEOUT_MS
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    return pull, push


def finish_child(ctx: zmq.Context) -> None:
    """What a well-behaved child does before it exits: deliver, close, terminate."""
    ctx.destroy()


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_child_sends_on_inherited_push(ctx: zmq.Context, kind: str) -> None:
    """A child made by os.fork, libc fork or a raw clone sends on an inherited PUSH; the parent gets its pid."""
    pull, push = pull_pair(ctx)

    def child() -> int:
        push.send_string(str(os.getpid()))
        finish_child(ctx)
        return os.getpid()

    handle = start_child(child, kind=kind)
    received = int(pull.recv_string())
    assert received == handle.result() == handle.pid


def _mp_target(push: zmq.Socket, ctx: zmq.Context) -> None:
    push.send_string(f"mp {os.getpid()}")
    ctx.destroy()


# Python 3.12+ warns that forking a process with threads (libzmq's) may deadlock: forking it is the point.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_multiprocessing_fork_start_method(ctx: zmq.Context) -> None:
    """multiprocessing with the fork start method: the worker uses the parent's PUSH proxy."""
    pull, push = pull_pair(ctx)
    mp = multiprocessing.get_context("fork")
    proc = mp.Process(target=_mp_target, args=(push, ctx))
    proc.start()
    try:
        assert pull.recv_string() == f"mp {proc.pid}"
    finally:
        proc.join(TIMEOUT_MS / 1000)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == 0


_python_hook_ran: List[int] = []
os.register_at_fork(after_in_child=lambda: _python_hook_ran.append(os.getpid()))


def test_libc_fork_is_invisible_to_python_but_not_to_zmqfork(ctx: zmq.Context) -> None:
    """libc fork() through ctypes runs no os.register_at_fork hook, yet the inherited proxy works."""
    pull, push = pull_pair(ctx)

    def child() -> Tuple[bool, int]:
        push.send(b"from libc child")
        finish_child(ctx)
        return os.getpid() in _python_hook_ran, zmq.generation()

    handle = start_child(child, kind="libc")
    assert pull.recv() == b"from libc child"
    hook_ran, child_generation = handle.result()
    assert not hook_ran, "os.register_at_fork hook ran: this was not a fork Python never sees"
    assert child_generation != zmq.generation()


def test_raw_clone_skips_handlers_and_is_still_detected(ctx: zmq.Context) -> None:
    """A raw clone syscall runs no atfork handler: the wiped token page alone reveals the fork."""
    if not zmq.detection().wipeonfork:
        pytest.skip("MADV_WIPEONFORK is not available: " + zmq.detection().unavailable["wipeonfork"])
    pull, push = pull_pair(ctx)
    parent_generation = zmq.generation()

    def child() -> Tuple[int, int]:
        token_seen = zmq._native.TOKEN[0]
        push.send(b"from raw child")
        finish_child(ctx)
        return token_seen, zmq.generation()

    handle = start_child(child, kind="raw")
    assert pull.recv() == b"from raw child"
    token_seen, child_generation = handle.result()
    assert token_seen == 0, "the atfork child handler ran, so this was not a raw clone"
    assert child_generation not in (0, parent_generation)


def test_sub_keeps_exactly_its_subscriptions(ctx: zmq.Context) -> None:
    """A SUB subscribed in the parent gets exactly the subscribed topics in the child."""
    xpub = ctx.socket(zmq.XPUB)
    xpub.xpub_verbose = 1
    xpub.rcvtimeo = TIMEOUT_MS
    port = xpub.bind_to_random_port("tcp://127.0.0.1")
    sub = ctx.socket(zmq.SUB)
    sub.subscribe(b"a")
    sub.subscribe(b"b")
    sub.subscribe(b"gone")
    sub.unsubscribe(b"gone")
    sub.connect(f"tcp://127.0.0.1:{port}")
    assert sorted(xpub.recv() for _ in range(2)) == [b"\x01a", b"\x01b"]

    def child() -> List[bytes]:
        sub.rcvtimeo = TIMEOUT_MS  # first use: rebuilds and replays the subscriptions
        received = []
        while not received or received[-1] != b"b-end":
            received.append(sub.recv())
        finish_child(ctx)
        return received

    handle = start_child(child)
    # The child's subscriptions arrive: the event to publish on.
    assert sorted(xpub.recv() for _ in range(2)) == [b"\x01a", b"\x01b"]
    for topic in (b"a:1", b"c:1", b"gone:1", b"b:1", b"b-end"):
        xpub.send(topic)
    assert handle.result() == [b"a:1", b"b:1", b"b-end"]


def test_routing_id_is_replayed_and_seen_by_router(ctx: zmq.Context) -> None:
    """A ROUTER in the parent sees the routing id the DEALER was given in the parent, from the child."""
    router = ctx.socket(zmq.ROUTER)
    router.router_handover = 1  # the child's connection takes over the parent's identity
    router.rcvtimeo = TIMEOUT_MS
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.routing_id = b"worker-7"
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello from parent")  # the parent's connection is up before the fork
    assert router.recv_multipart() == [b"worker-7", b"hello from parent"]

    def child() -> bytes:
        dealer.send(b"hello from child")
        routing_id = dealer.routing_id
        finish_child(ctx)
        return routing_id

    handle = start_child(child)
    assert router.recv_multipart() == [b"worker-7", b"hello from child"]
    assert handle.result() == b"worker-7"


def test_rcvtimeo_is_replayed_so_recv_times_out_instead_of_spinning(ctx: zmq.Context) -> None:
    """RCVTIMEO set in the parent makes the child's recv raise Again instead of spinning forever."""
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = 200
    pull.connect("tcp://127.0.0.1:9")  # nobody there: nothing will ever arrive

    def child() -> Tuple[str, int]:
        try:
            pull.recv()
        except zmq.Again:
            outcome = "Again"
        else:
            outcome = "received"
        timeout = pull.rcvtimeo
        ctx.destroy(linger=0)
        return outcome, timeout

    assert run_in_child(child, timeout=10) == ("Again", 200)


def test_reconnect_policy_refuses_inherited_binds_and_parent_keeps_endpoint(
    ctx: zmq.Context, tmp_path: Path
) -> None:
    """Default policy: the child cannot use a socket bound in the parent; the parent keeps its ipc endpoint."""
    endpoint = f"ipc://{tmp_path}/parent.ipc"
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = TIMEOUT_MS
    pull.bind(endpoint)

    def child() -> Tuple[str, Tuple[str, ...], bool, str, bool]:
        try:
            pull.recv(zmq.NOBLOCK)
        except zmq.InheritedBindError as exc:
            first = exc
        try:
            pull.poll(0)
        except zmq.InheritedBindError as exc:
            again = exc
        pull.close()
        ctx.destroy(linger=0)
        return (
            type(first).__name__,
            first.endpoints,
            isinstance(first, zmq.ZMQError),
            str(again),
            pull.closed,
        )

    name, endpoints, is_zmq_error, message, closed_after = run_in_child(child)
    assert name == "InheritedBindError" and is_zmq_error
    assert endpoints == (endpoint,)
    assert endpoint in message and 'on_fork="rebind"' in message and "after the fork" in message
    assert closed_after
    # The ipc endpoint still reaches the parent.
    with zmq.Context() as other:
        push = other.socket(zmq.PUSH)
        push.connect(endpoint)
        push.send(b"still mine")
        assert pull.recv() == b"still mine"
        push.close()


def test_rebind_policy_binds_again_in_the_child(ctx: zmq.Context) -> None:
    """on_fork="rebind": the child binds the same wildcard endpoint again and gets its own port."""
    pull = ctx.socket(zmq.PULL, on_fork="rebind")
    pull.rcvtimeo = TIMEOUT_MS
    pull.bind("tcp://127.0.0.1:*")
    parent_endpoint = pull.last_endpoint

    def child() -> Tuple[bytes, bytes]:
        child_endpoint = pull.last_endpoint
        push = ctx.socket(zmq.PUSH)
        push.connect(child_endpoint.decode())
        push.send(b"to my own rebound socket")
        received = pull.recv()
        ctx.destroy(linger=0)
        return child_endpoint, received

    child_endpoint, received = run_in_child(child)
    assert child_endpoint != parent_endpoint
    assert received == b"to my own rebound socket"


def test_rebind_policy_names_the_endpoint_when_the_bind_fails(ctx: zmq.Context) -> None:
    """on_fork="rebind" of a fixed tcp port the parent still holds fails with an error naming it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        fixed = "tcp://127.0.0.1:%d" % probe.getsockname()[1]
    pull = ctx.socket(zmq.PULL, on_fork="rebind")
    pull.bind(fixed)

    def child() -> Tuple[str, str]:
        try:
            pull.recv(zmq.NOBLOCK)
        except zmq.RebuildError as exc:
            outcome = (type(exc).__name__, str(exc))
        ctx.destroy(linger=0)
        return outcome

    name, message = run_in_child(child)
    assert name == "RebuildError"
    assert fixed in message and "bind" in message


def test_close_policy_closes_the_socket_in_the_child(ctx: zmq.Context) -> None:
    """on_fork="close": the child's socket is closed and raises what a closed pyzmq socket raises."""
    push = ctx.socket(zmq.PUSH, on_fork="close")
    push.connect("tcp://127.0.0.1:9")
    with zmq.Context() as plain_ctx:
        reference = plain_ctx.socket(zmq.PUSH)
        reference.close()
        with pytest.raises(zmq.ZMQError) as expected:
            reference.send(b"x")

    def child() -> Tuple[bool, int, str]:
        closed = push.closed
        try:
            push.send(b"x")
        except zmq.ZMQError as exc:
            return closed, exc.errno, str(exc)
        return closed, 0, "sent"

    assert run_in_child(child) == (True, expected.value.errno, str(expected.value))
    assert not push.closed


def test_unknown_policy_is_a_value_error_listing_the_choices(ctx: zmq.Context) -> None:
    """on_fork must be one of the three policies."""
    with pytest.raises(ValueError, match="'reconnect', 'rebind', 'close'.*'sometimes'"):
        ctx.socket(zmq.PUSH, on_fork="sometimes")
    with pytest.raises(ValueError, match="on_fork"):
        zmq.Context(on_fork="never")


@pytest.mark.parametrize("grandchild_kind", ["libc", "raw", "os"])
def test_grandchild_of_a_c_level_fork(ctx: zmq.Context, grandchild_kind: str) -> None:
    """A grandchild of a libc-fork child sees its own generation and its inherited proxy works."""
    pull, push = pull_pair(ctx)

    def grandchild() -> int:
        push.send(b"grandchild")
        finish_child(ctx)
        return zmq.generation()

    def child() -> Tuple[int, int]:
        push.send(b"child")  # the child rebuilds first: the grandchild inherits a rebuilt proxy
        mine = zmq.generation()
        theirs = run_in_child(grandchild, kind=grandchild_kind)
        finish_child(ctx)
        return mine, theirs

    handle = start_child(child, kind="libc")
    assert sorted(pull.recv() for _ in range(2)) == [b"child", b"grandchild"]
    mine, theirs = handle.result()
    assert len({zmq.generation(), mine, theirs}) == 3


def test_poller_reports_the_registered_proxy_after_a_rebuild(ctx: zmq.Context) -> None:
    """A Poller made in the parent answers, in the child, with the registered proxy and plain fd."""
    pull = ctx.socket(zmq.PULL)
    pull.connect("inproc://poller-test")
    read_fd, write_fd = os.pipe()
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(read_fd, zmq.POLLIN)

    def child() -> Tuple[bool, bool, bytes]:
        push = ctx.socket(zmq.PUSH)
        push.bind("inproc://poller-test")
        os.write(write_fd, b"!")
        # This poll rebuilds the PULL, which connects to the child's PUSH.
        got_fd = dict(poller.poll(TIMEOUT_MS)).get(read_fd) == zmq.POLLIN
        push.send(b"ready")
        got_proxy = dict(poller.poll(TIMEOUT_MS)).get(pull) == zmq.POLLIN
        message = pull.recv()
        ctx.destroy(linger=0)
        return got_proxy, got_fd, message

    try:
        assert run_in_child(child) == (True, True, b"ready")
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_req_rep_round_trips_between_parent_and_child(ctx: zmq.Context) -> None:
    """REQ inherited by the child talks to the parent's REP: ten round trips."""
    rep = ctx.socket(zmq.REP)
    rep.rcvtimeo = TIMEOUT_MS
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    req = ctx.socket(zmq.REQ)
    req.rcvtimeo = TIMEOUT_MS
    req.connect(f"tcp://127.0.0.1:{port}")

    def child() -> List[int]:
        answers = []
        for number in range(10):
            req.send_json(number)
            answers.append(req.recv_json())
        finish_child(ctx)
        return answers

    handle = start_child(child)
    for _ in range(10):
        rep.send_json(rep.recv_json() * 2)
    assert handle.result() == [n * 2 for n in range(10)]


def test_threads_racing_to_rebuild_make_one_context(ctx: zmq.Context) -> None:
    """Eight threads of a child touch eight inherited sockets at once: the Context is re-initialised once for all."""
    sockets = [ctx.socket(zmq.PUSH) for _ in range(8)]
    for sock in sockets:
        sock.connect("inproc://race")
    parent_handle = ctx.underlying

    def child() -> Tuple[int, int, bool]:
        backend = context_module._BackendContext
        inits: List[int] = []

        class CountingBackend:
            """Stands in for pyzmq's compiled Context class where zmqfork re-initialises a context."""

            @staticmethod
            def __init__(context: Any, *args: Any, **kwargs: Any) -> None:
                backend.__init__(context, *args, **kwargs)
                inits.append(1)

            set = staticmethod(backend.set)

        context_module._BackendContext = CountingBackend
        barrier = threading.Barrier(len(sockets))

        def touch(index: int) -> None:
            barrier.wait(5)
            sockets[index].get(zmq.TYPE)

        threads = [threading.Thread(target=touch, args=(i,)) for i in range(len(sockets))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        fresh = ctx.underlying != parent_handle and all(sock.context is ctx for sock in sockets)
        ctx.destroy(linger=0)
        return len(inits), sum(t.is_alive() for t in threads), fresh

    assert run_in_child(child) == (1, 0, True)


def test_parent_keeps_working_while_children_come_and_go(ctx: zmq.Context) -> None:
    """The parent's inproc pair carries every message in order across 30 forks of mixed kinds."""
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = TIMEOUT_MS
    pull.bind("inproc://parent-only")
    push = ctx.socket(zmq.PUSH)
    push.connect("inproc://parent-only")

    def child() -> bool:
        push.send(b"child noise")  # rebuilt in the child: goes nowhere the parent sees
        pull.close()
        ctx.destroy(linger=0)
        return True

    for number in range(30):
        push.send_string(f"before {number}")
        handle = start_child(child, kind=FORK_KINDS[number % len(FORK_KINDS)])
        push.send_string(f"after {number}")
        assert handle.result()
        assert pull.recv_string() == f"before {number}"
        assert pull.recv_string() == f"after {number}"
    assert pull.poll(0) == 0


def test_close_and_term_in_an_unused_child_build_nothing(ctx: zmq.Context) -> None:
    """A child that only closes and terminates creates no context (no new descriptor; the inherited handle forgotten)."""
    pull, push = pull_pair(ctx)

    def child() -> Tuple[FrozenSet[int], FrozenSet[int], bool, bool, bool]:
        before = open_fds()
        push.close()
        pull.close()
        ctx.term()
        after = open_fds()
        unbuilt = context_module._HANDLE.__get__(ctx) == 0 and ctx._zf_gen != zmq.generation()
        return before, after, unbuilt, push.closed, ctx.closed

    before, after, unbuilt, push_closed, ctx_closed = run_in_child(child)
    assert after <= before, f"opened in the child: {sorted(after - before)}"
    assert unbuilt and push_closed and ctx_closed
    push.send(b"parent unaffected")
    assert pull.recv() == b"parent unaffected"


def test_curve_keys_hwm_and_linger_are_replayed(ctx: zmq.Context) -> None:
    """A CURVE client configured in the parent completes the handshake from the child; HWM and LINGER survive."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    server = ctx.socket(zmq.PULL)
    server.curve_server = 1
    server.curve_secretkey = server_secret
    server.rcvtimeo = TIMEOUT_MS
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(zmq.PUSH)
    client.curve_secretkey = client_secret
    client.curve_publickey = client_public
    client.curve_serverkey = server_public
    client.sndhwm = 17
    client.linger = 4321
    client.connect(f"tcp://127.0.0.1:{port}")

    def child() -> Tuple[int, int, int]:
        client.send(b"encrypted from child")
        options = client.sndhwm, client.linger, client.mechanism
        finish_child(ctx)
        return options

    handle = start_child(child)
    assert server.recv() == b"encrypted from child"
    assert handle.result() == (17, 4321, zmq.CURVE)


def test_monitor_is_replayed_in_the_child(ctx: zmq.Context) -> None:
    """A socket monitored in the parent reports its own connection events in the child."""
    from zmq.utils.monitor import recv_monitor_message

    server = ctx.socket(zmq.PULL)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(zmq.PUSH)
    monitor = client.get_monitor_socket(zmq.EVENT_CONNECTED)
    monitor.rcvtimeo = TIMEOUT_MS

    def child() -> int:
        client.connect(f"tcp://127.0.0.1:{port}")
        event = recv_monitor_message(monitor)["event"]
        ctx.destroy(linger=0)
        return int(event)

    assert run_in_child(child) == zmq.EVENT_CONNECTED


def test_context_options_and_instance_in_the_child() -> None:
    """Context options are replayed on the child's fresh context; Context.instance() is one per process, as in pyzmq."""
    ctx = zmq.Context.instance()
    ctx.max_sockets = 77
    parent_underlying = ctx.underlying

    def child() -> Tuple[bool, bool, int, bool]:
        own = zmq.Context.instance()
        fresh = own is not ctx and own is zmq.Context.instance() and type(own) is zmq.Context
        sock = ctx.socket(zmq.PUSH)  # the parent's instance still works here
        result = fresh, own.max_sockets != 77, ctx.max_sockets, ctx.underlying != parent_underlying
        sock.close()
        return result

    assert run_in_child(child) == (True, True, 77, True)
    assert zmq.Context.instance() is ctx


def test_inherited_zero_copy_frame_freed_in_the_child(ctx: zmq.Context) -> None:
    """Zero-copy frames sent in the parent and freed in the child neither crash nor hang the child."""
    a = ctx.socket(zmq.PAIR)
    a.bind("inproc://frames")
    b = ctx.socket(zmq.PAIR)
    b.connect("inproc://frames")
    frames = [zmq.Frame(bytes([n]) * 100_000, copy=False) for n in range(4)]
    for frame in frames:
        a.send(frame, copy=False)
    received = [b.recv(copy=False) for _ in frames]

    def child() -> bool:
        import gc

        frames.clear()
        received.clear()
        gc.collect()
        b.rcvtimeo = TIMEOUT_MS  # rebuild the peer first: a PAIR send waits for one
        a.send(b"after")
        ok = b.recv() == b"after"
        ctx.destroy(linger=0)
        return ok

    assert run_in_child(child, timeout=15)


def test_inproc_binds_are_replayed_under_every_policy(ctx: zmq.Context) -> None:
    """inproc endpoints belong to the context, so the child's fresh context binds them again."""
    server = ctx.socket(zmq.PAIR)
    server.rcvtimeo = TIMEOUT_MS
    server.bind("inproc://local")
    client = ctx.socket(zmq.PAIR)
    client.connect("inproc://local")

    def child() -> bytes:
        client.send(b"inside the child")
        message = server.recv()
        ctx.destroy(linger=0)
        return message

    assert run_in_child(child) == b"inside the child"


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_frame_freed_in_child_while_a_parent_thread_held_pyzmqs_gc_lock(ctx: zmq.Context, kind: str) -> None:
    """A zero-copy Frame freed in the child does not hang even if a parent thread held pyzmq's gc mutex at fork."""
    import ctypes

    from zmq.utils import garbage

    a = ctx.socket(zmq.PAIR)
    a.bind("inproc://gc-lock")
    b = ctx.socket(zmq.PAIR)
    b.connect("inproc://gc-lock")
    frame = zmq.Frame(b"g" * 100_000, copy=False)
    a.send(frame, copy=False)
    b.recv()  # a copy: now the parent's Frame holds the last reference to its buffer
    mutex = garbage.gc._push_mutex
    assert mutex, "pyzmq made no gc mutex for a zero-copy Frame"
    pthread = ctypes.CDLL(None)
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        pthread.pthread_mutex_lock(ctypes.c_void_p(mutex))
        locked.set()
        release.wait(30)
        pthread.pthread_mutex_unlock(ctypes.c_void_p(mutex))

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(10)

        def child() -> bool:
            nonlocal frame
            zmq.check_fork()  # after a raw clone, the first zmqfork call does the handler's work
            frame = None  # frees the buffer: pyzmq's callback takes the gc mutex
            ctx.destroy(linger=0)
            return True

        assert run_in_child(child, kind=kind, timeout=15)
    finally:
        release.set()
        holder.join(10)


def test_messages_queued_in_the_parent_stay_in_the_parent(ctx: zmq.Context) -> None:
    """The child's rebuilt socket starts empty: what the parent queued is neither carried over nor sent twice."""
    push = ctx.socket(zmq.PUSH)
    push.connect("inproc://queued")  # nobody has bound it yet: the messages wait in the parent's queue
    for number in range(3):
        push.send_string(f"queued in parent {number}")

    def child() -> List[str]:
        pull = ctx.socket(zmq.PULL)
        pull.rcvtimeo = TIMEOUT_MS
        pull.bind("inproc://queued")
        push.send_string("sent by child")
        push.send_string("end")  # one queue, in order: anything carried over would come first
        received = []
        while not received or received[-1] != "end":
            received.append(pull.recv_string())
        ctx.destroy(linger=0)
        return received

    assert run_in_child(child) == ["sent by child", "end"]
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = TIMEOUT_MS
    pull.bind("inproc://queued")
    assert [pull.recv_string() for _ in range(3)] == [f"queued in parent {n}" for n in range(3)]


def test_disconnect_after_repeated_connects_leaves_the_child_disconnected(ctx: zmq.Context) -> None:
    """libzmq's disconnect ends every connection to the endpoint; the child is not connected there either."""
    push = ctx.socket(zmq.PUSH)
    push.connect("inproc://twice")
    push.connect("inproc://twice")
    push.connect("inproc://kept")
    push.disconnect("inproc://twice")

    def where_messages_go() -> Dict[str, int]:
        """Send 4 messages round-robin; count what each endpoint's PULL got (inproc: there at once)."""
        pulls = {name: ctx.socket(zmq.PULL) for name in ("twice", "kept")}
        for name, pull in pulls.items():
            pull.bind(f"inproc://{name}")
        for _ in range(4):
            push.send(b"m", zmq.NOBLOCK)
        got = {}
        for name, pull in pulls.items():
            got[name] = 0
            while pull.poll(0):
                pull.recv()
                got[name] += 1
            pull.close()
        return got

    def child() -> Dict[str, int]:
        got = where_messages_go()
        ctx.destroy(linger=0)
        return got

    assert run_in_child(child) == {"twice": 0, "kept": 4}
    assert where_messages_go() == {"twice": 0, "kept": 4}  # the parent, for reference
