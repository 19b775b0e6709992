"""In the process that made them, zmqfork's objects behave as pyzmq's: same API, same results, same errors."""

from __future__ import annotations

import socket
from typing import Any, Callable, List, Tuple

import pytest
import zmq as pyzmq

import zmqfork as zmq


def pair(ctx: Any, endpoint: str = "inproc://api") -> Tuple[Any, Any]:
    a = ctx.socket(pyzmq.PAIR)
    a.bind(endpoint)
    b = ctx.socket(pyzmq.PAIR)
    b.connect(endpoint)
    a.rcvtimeo = b.rcvtimeo = 5000
    return a, b


def test_every_other_name_is_pyzmqs_own() -> None:
    """import zmqfork as zmq: constants, errors and Frame are pyzmq's objects."""
    assert zmq.ZMQError is pyzmq.ZMQError and zmq.Again is pyzmq.Again
    assert zmq.Frame is pyzmq.Frame and zmq.PUSH == pyzmq.PUSH
    assert zmq.zmq_version() == pyzmq.zmq_version()
    assert zmq.Context is not pyzmq.Context and zmq.Socket is not pyzmq.Socket
    assert issubclass(zmq.InheritedBindError, pyzmq.ZMQError)
    assert {"Context", "Socket", "Poller", "InheritedBindError", "generation", "detection"} <= set(zmq.__all__)


def test_send_recv_family(ctx: zmq.Context) -> None:
    """Every send/recv variant round-trips exactly as on pyzmq."""
    a, b = pair(ctx)
    a.send(b"raw")
    assert b.recv() == b"raw"
    a.send_multipart([b"x", b"y"])
    assert b.recv_multipart() == [b"x", b"y"]
    a.send_json({"k": [1, 2]})
    assert b.recv_json() == {"k": [1, 2]}
    a.send_pyobj({1, 2})
    assert b.recv_pyobj() == {1, 2}
    a.send_string("žluťoučký")
    assert b.recv_string() == "žluťoučký"
    a.send_serialized([1, 2], lambda obj: [bytes(obj)])
    assert b.recv_serialized(lambda frames: list(frames[0])) == [1, 2]
    buf = bytearray(8)
    a.send(b"into")
    assert b.recv_into(buf) == 4 and bytes(buf[:4]) == b"into"


def test_zero_copy_frames_and_tracking(ctx: zmq.Context) -> None:
    """copy=False sends and receives Frames; track=True returns a MessageTracker that completes."""
    a, b = pair(ctx)
    payload = b"z" * 100_000
    tracker = a.send(payload, copy=False, track=True)
    assert isinstance(tracker, pyzmq.MessageTracker)
    frame = b.recv(copy=False)
    assert isinstance(frame, pyzmq.Frame) and frame.bytes == payload
    del frame  # inproc shares the buffer: the send completes once the receiver lets go
    tracker.wait(5)
    assert tracker.done
    a.send_multipart([b"p", b"q"], copy=False)
    assert [f.bytes for f in b.recv_multipart(copy=False)] == [b"p", b"q"]


def test_options_as_methods_and_attributes(ctx: zmq.Context) -> None:
    """set/get, setsockopt/getsockopt, _string variants, attributes and hwm work as in pyzmq."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.setsockopt(zmq.RCVTIMEO, 123)
    sock.set_string(zmq.ROUTING_ID, "me")
    sock.hwm = 77
    assert (sock.linger, sock.getsockopt(zmq.RCVTIMEO), sock.get_string(zmq.ROUTING_ID)) == (0, 123, "me")
    assert (sock.sndhwm, sock.rcvhwm, sock.get_hwm()) == (77, 77, 77)
    assert sock.type == zmq.DEALER and sock.socket_type == zmq.DEALER
    assert sock.context is ctx
    assert isinstance(sock.FD, int) and sock.fileno() == sock.FD
    with pytest.raises(AttributeError, match="no such option: NOT_AN_OPTION"):
        sock.not_an_option = 1
    sock.copy_threshold = 10
    assert sock.copy_threshold == 10


def test_subscribe_as_method_and_attribute(ctx: zmq.Context) -> None:
    """sub.subscribe(...) and sub.subscribe = ... both subscribe, as in pyzmq."""
    pub = ctx.socket(zmq.PUB)
    pub.bind("inproc://subs")
    sub = ctx.socket(zmq.SUB)
    sub.rcvtimeo = 5000
    sub.subscribe("a")
    sub.subscribe = b"b"
    sub.connect("inproc://subs")
    steps = [step.describe() for step in sub._zf_recipe.steps]
    assert steps == ["set(zmq.RCVTIMEO, 5000)", "set(zmq.SUBSCRIBE, b'a')", "set(zmq.SUBSCRIBE, b'b')", "connect('inproc://subs')"]


def test_bind_and_connect_return_context_managers(ctx: zmq.Context) -> None:
    """with sock.bind(...)/connect(...) unbinds/disconnects on exit, and the recipe forgets them."""
    sock = ctx.socket(zmq.PUSH)
    with sock.bind("tcp://127.0.0.1:*") as same:
        assert same is sock
        assert sock._zf_recipe.bound_endpoints()
    assert not sock._zf_recipe.bound_endpoints()
    with sock.connect("inproc://nowhere"):
        pass
    assert sock._zf_recipe.steps == []


def test_context_options_defaults_and_instance() -> None:
    """Context options, default socket options and Context.instance() behave as in pyzmq."""
    ctx = zmq.Context(io_threads=2)
    try:
        assert ctx.get(zmq.IO_THREADS) == 2
        ctx.max_sockets = 64
        assert ctx.max_sockets == 64
        ctx.linger = 5  # a socket option: a default for new sockets
        assert ctx.sockopts == {zmq.LINGER: 5}
        sock = ctx.socket(zmq.SUB)
        assert sock.linger == 5
        del ctx.linger
        assert ctx.sockopts == {}
    finally:
        ctx.destroy(linger=0)
    assert ctx.closed
    assert zmq.Context.instance() is zmq.Context.instance()
    with pytest.raises(TypeError, match="io_threads must be an int"):
        zmq.Context(io_threads="2")  # type: ignore[arg-type]


ErrorCase = Callable[[Any, Any], Any]

SAME_ERROR_CASES = {
    "unknown socket type": lambda ctx, sock: ctx.socket(12345),
    "option of the wrong type": lambda ctx, sock: sock.setsockopt(zmq.LINGER, "long"),
    "unknown option": lambda ctx, sock: sock.setsockopt(99999, 1),
    "invalid endpoint": lambda ctx, sock: sock.connect("nonsense"),
    "unsupported transport": lambda ctx, sock: sock.bind("carrier-pigeon://x"),
    "negative linger": lambda ctx, sock: sock.setsockopt(zmq.LINGER, -5),
    "send on a closed socket": lambda ctx, sock: (sock.close(), sock.send(b"x")),
    "option on a closed socket": lambda ctx, sock: (sock.close(), sock.get(zmq.TYPE)),
    "socket on a terminated context": lambda ctx, sock: (sock.close(), ctx.term(), ctx.socket(zmq.PUSH)),
    "send of a str": lambda ctx, sock: sock.send("text"),
    "recv with a bad flag type": lambda ctx, sock: sock.recv("now"),
    "disconnect of an unknown endpoint": lambda ctx, sock: sock.disconnect("tcp://127.0.0.1:1"),
}


def test_failed_calls_are_not_recorded(ctx: zmq.Context) -> None:
    """A setsockopt or connect that raised leaves the recipe untouched: nothing half-applied is replayed."""
    sock = ctx.socket(zmq.SUB)
    sock.connect("inproc://ok")
    before = list(sock._zf_recipe.steps)
    for bad in (lambda: sock.set(zmq.LINGER, "x"), lambda: sock.connect("nonsense://"), lambda: sock.set(99999, 1)):
        with pytest.raises((zmq.ZMQError, TypeError)):
            bad()
    assert sock._zf_recipe.steps == before


def test_recipe_stays_bounded_and_keeps_order(ctx: zmq.Context) -> None:
    """Re-setting an option, unsubscribing, disconnecting and unbinding cancel earlier steps."""
    sock = ctx.socket(zmq.SUB)
    for value in range(1000):
        sock.rcvtimeo = value
        sock.subscribe(b"t")
        sock.unsubscribe(b"t")
        sock.connect("inproc://loop")
        sock.disconnect("inproc://loop")
    sock.sndhwm = 5
    sock.connect("inproc://kept")
    sock.sndhwm = 6
    assert [step.describe() for step in sock._zf_recipe.steps] == [
        "set(zmq.RCVTIMEO, 999)",
        "set(zmq.SNDHWM, 5)",
        "connect('inproc://kept')",
        "set(zmq.SNDHWM, 6)",
    ]


def test_every_accept_filter_is_replayed(ctx: zmq.Context) -> None:
    """TCP_ACCEPT_FILTER adds a filter at each set (libzmq): the child's rebound socket accepts what the parent's did."""
    from forking import run_in_child

    def accepts_from_localhost(pull: zmq.Socket) -> bytes:
        port = int(pull.last_endpoint.rsplit(b":", 1)[1])
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send(b"accepted")
        try:
            return pull.recv()
        finally:
            push.close()

    pull = ctx.socket(zmq.PULL, on_fork="rebind")
    pull.rcvtimeo = 10_000
    for mask in (b"127.0.0.1", b"127.0.0.2", b"127.0.0.1"):
        pull.setsockopt(zmq.TCP_ACCEPT_FILTER, mask)
    pull.bind("tcp://127.0.0.1:*")  # a wildcard port: the child binds one of its own
    assert [step.value for step in pull._zf_recipe.steps if step.option == zmq.TCP_ACCEPT_FILTER] == [
        b"127.0.0.1",
        b"127.0.0.2",
        b"127.0.0.1",
    ]
    # libzmq reads a filter as IPV6 says when it is set: an IPv6 filter needs IPV6 before it, set again or not.
    six = ctx.socket(zmq.PULL, on_fork="rebind")
    six.ipv6 = True
    six.setsockopt(zmq.TCP_ACCEPT_FILTER, b"::1")
    six.ipv6 = True
    six.bind("tcp://127.0.0.1:*")  # not [::1]: a host without IPv6 loopback still runs this
    assert accepts_from_localhost(pull) == b"accepted"

    def child() -> Tuple[bytes, bool]:
        try:
            return accepts_from_localhost(pull), six.poll(0) == 0  # six rebuilt: IPV6 replayed before the filter
        finally:
            ctx.destroy(linger=0)

    assert run_in_child(child) == (b"accepted", True)


def test_an_unbind_spelled_unlike_its_bind_cancels_it(ctx: zmq.Context) -> None:
    """libzmq resolves a tcp unbind (localhost undoes 127.0.0.1): the child's socket has no bind left to refuse."""
    from forking import run_in_child

    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    kept = pull.bind_to_random_port("tcp://127.0.0.1")
    pull.unbind(f"tcp://localhost:{port}")
    assert [step.resolved for step in pull._zf_recipe.steps if step.kind == "bind"] == [f"tcp://127.0.0.1:{kept}"]
    pull.unbind(f"tcp://localhost:{kept}")
    pull.connect("inproc://after-the-unbinds")

    def child() -> int:
        try:
            return pull.poll(0)  # raised InheritedBindError while the recipe kept the undone binds
        finally:
            ctx.destroy(linger=0)

    assert run_in_child(child) == 0


def _attached(sock: zmq.Socket) -> List[str]:
    return [f"{step.kind} {step.resolved if step.kind == 'bind' else step.endpoint}"
            for step in sock._zf_recipe.steps if step.kind in ("bind", "connect")]


@pytest.mark.parametrize("case", ["ipv6 mapped", "port spelled 0NNNN", "unbind a connect", "disconnect a bind",
                                  "a connect spelled as the unbind", "inproc"])
def test_unbind_and_disconnect_end_what_libzmq_ends(ctx: zmq.Context, case: str) -> None:
    """libzmq ends binds and connects alike, filed under a key (see SocketRecipe.record_end); the recipe follows."""
    sock = ctx.socket(zmq.ROUTER)
    if case == "ipv6 mapped":
        sock.ipv6 = True
        port = sock.bind_to_random_port("tcp://127.0.0.1")  # libzmq got tcp://[::ffff:127.0.0.1]:port
        sock.unbind(f"tcp://127.0.0.1:{port}")
        expected: List[str] = []
    elif case == "port spelled 0NNNN":
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        sock.unbind(f"tcp://127.0.0.1:0{port}")
        expected = []
    elif case == "unbind a connect":
        sock.connect("tcp://127.0.0.1:5")
        sock.unbind("tcp://127.0.0.1:5")
        expected = []
    elif case == "disconnect a bind":
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        sock.disconnect(f"tcp://127.0.0.1:{port}")
        expected = []
    elif case == "a connect spelled as the unbind":  # libzmq finds the connect under that very string first
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        sock.connect(f"tcp://localhost:{port}")
        sock.unbind(f"tcp://localhost:{port}")
        expected = [f"bind tcp://127.0.0.1:{port}"]
    else:
        sock.bind("inproc://ended")
        sock.connect("inproc://ended-too")
        sock.unbind("inproc://ended")
        sock.disconnect("inproc://ended-too")
        expected = []
    assert _attached(sock) == expected


def test_secrets_never_show_in_a_recipe(ctx: zmq.Context) -> None:
    """CURVE secret keys and PLAIN passwords are replayed but never shown."""
    public, secret = pyzmq.curve_keypair()
    sock = ctx.socket(zmq.DEALER)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = public
    other = ctx.socket(zmq.DEALER)
    other.plain_password = b"hunter2"
    shown = repr(sock._zf_recipe) + repr(other._zf_recipe) + repr(sock) + repr(other)
    assert secret.decode() not in shown and "hunter2" not in shown
    assert "<hidden>" in shown


def test_monitor_socket(ctx: zmq.Context) -> None:
    """get_monitor_socket gives a PAIR of events, disable_monitor stops it, as in pyzmq."""
    server = ctx.socket(zmq.PULL)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(zmq.PUSH)
    monitor = client.get_monitor_socket()
    monitor.rcvtimeo = 5000
    client.connect(f"tcp://127.0.0.1:{port}")
    from zmq.utils.monitor import recv_monitor_message

    events = set()
    while zmq.EVENT_CONNECTED not in events:
        events.add(recv_monitor_message(monitor)["event"])
    client.disable_monitor()
    assert not [step for step in client._zf_recipe.steps if step.kind == "monitor"]


def test_poller_and_select_in_the_parent(ctx: zmq.Context) -> None:
    """Poller and select accept zmqfork sockets and answer with them."""
    a, b = pair(ctx)
    poller = zmq.Poller()
    poller.register(b, zmq.POLLIN)
    assert poller.poll(0) == []
    a.send(b"x")
    assert poller.poll(1000) == [(b, zmq.POLLIN)]
    assert zmq.select([b], [], [], 1) == ([b], [], [])
    assert b.poll(1000) == zmq.POLLIN


# ---- bad input everywhere -------------------------------------------------------------------

WRONG_TYPE_CASES = {
    "connect to a non-string": lambda ctx, sock: sock.connect(123),
    "bind to None": lambda ctx, sock: sock.bind(None),
    "disconnect from a non-string": lambda ctx, sock: sock.disconnect(5),
    "unbind a non-string": lambda ctx, sock: sock.unbind(5),
    "send an int": lambda ctx, sock: sock.send(123),
    "send with string flags": lambda ctx, sock: sock.send(b"x", flags="a"),
    "recv with string flags": lambda ctx, sock: sock.recv(flags="x"),
    "option named by a string": lambda ctx, sock: sock.setsockopt("LINGER", 1),
    "option set to None": lambda ctx, sock: sock.setsockopt(zmq.LINGER, None),
    "option value too large": lambda ctx, sock: sock.set(zmq.LINGER, 2**40),
    "subscribe with str through set": lambda ctx, sock: sock.set(zmq.SUBSCRIBE, "x"),
    "secret key of the wrong length": lambda ctx, sock: sock.set(zmq.CURVE_SECRETKEY, b"short"),
    "monitor to a non-string": lambda ctx, sock: sock.monitor(5),
    "poll with a string timeout": lambda ctx, sock: sock.poll("x"),
    "socket type as a string": lambda ctx, sock: ctx.socket("PUSH"),
    "context option named by a string": lambda ctx, sock: ctx.set("x", 1),
    "context option of the wrong type": lambda ctx, sock: ctx.set(zmq.IO_THREADS, "x"),
    "connect to an endpoint without address": lambda ctx, sock: sock.connect("tcp://"),
    "connect to a port that is not a number": lambda ctx, sock: sock.connect("tcp://127.0.0.1:notaport"),
    "bind on a closed socket": lambda ctx, sock: (sock.close(), sock.bind("inproc://closed")),
    "option set on a closed socket": lambda ctx, sock: (sock.close(), sock.set(zmq.LINGER, 0)),
    "recv on a closed socket": lambda ctx, sock: (sock.close(), sock.recv()),
    "poll on a closed socket": lambda ctx, sock: (sock.close(), sock.poll(0)),
}

ERROR_CASES = {**SAME_ERROR_CASES, **WRONG_TYPE_CASES}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_pyzmqs(case: str) -> None:
    """Bad input (wrong types and values, closed objects) raises pyzmq's exception type, errno and message."""
    outcomes = []
    for module in (pyzmq, zmq):
        ctx = module.Context()
        sock = ctx.socket(zmq.PUSH)
        try:
            ERROR_CASES[case](ctx, sock)
        except Exception as exc:  # noqa: BLE001 - comparing whatever each raises
            outcomes.append((type(exc), getattr(exc, "errno", None), str(exc)))
        else:
            outcomes.append((None, None, "no error"))
        finally:
            ctx.destroy(linger=0)
    assert outcomes[0][0] is not None, f"pyzmq raised nothing for {case}"
    assert outcomes[1] == outcomes[0]




@pytest.mark.parametrize(
    "call, error, named",
    [
        (lambda: zmq.Context(io_threads="2"), TypeError, "io_threads"),
        (lambda: zmq.Context(io_threads=True), TypeError, "io_threads"),
        (lambda: zmq.Context(on_fork=3), TypeError, "on_fork must be a str"),
        (lambda: zmq.Context(on_fork=["close"]), TypeError, "on_fork must be a str"),
        (lambda: zmq.Context().socket(zmq.PUSH, on_fork="later"), ValueError, "on_fork"),
        (lambda: zmq.Context().socket(zmq.PUSH, socket_class=int), TypeError, "socket_class"),
        (lambda: zmq.Socket(pyzmq.Context(), zmq.PUSH), TypeError, "zmqfork.Context"),
    ],
)
def test_zmqforks_own_parameters_are_checked_by_name(call: Callable[[], Any], error: type, named: str) -> None:
    """Parameters pyzmq does not have raise ValueError/TypeError naming what was wrong."""
    with pytest.raises(error, match=named):
        call()


def test_failed_calls_are_not_replayed_in_the_child(ctx: zmq.Context) -> None:
    """After failed setsockopt/connect/bind calls, the child's socket has only what succeeded."""
    from forking import run_in_child

    sock = ctx.socket(zmq.DEALER)
    sock.linger = 5
    sock.connect("inproc://good")
    for bad in (
        lambda: sock.set(zmq.LINGER, -5),
        lambda: sock.set(zmq.LINGER, "x"),
        lambda: sock.set(zmq.ROUTING_ID, b""),
        lambda: sock.connect("tcp://127.0.0.1:notaport"),
        lambda: sock.connect(42),
        lambda: sock.bind("carrier-pigeon://x"),
    ):
        with pytest.raises((zmq.ZMQError, TypeError)):
            bad()

    def child() -> Tuple[int, bytes, bytes, list]:
        steps = [step.describe() for step in sock._zf_recipe.steps]
        result = sock.linger, sock.routing_id, sock.last_endpoint, steps
        ctx.destroy(linger=0)
        return result

    assert run_in_child(child) == (5, b"", b"inproc://good", ["set(zmq.LINGER, 5)", "connect('inproc://good')"])


# ---- secrets ----------------------------------------------------------------------------------


def test_secrets_never_reach_a_log_line_or_a_rebuild_error(ctx: zmq.Context) -> None:
    """Rebuild DEBUG logs and a failed replay's error show neither CURVE secret keys nor PLAIN passwords."""
    import binascii

    from forking import run_in_child

    from zmq.utils import z85

    public, secret = pyzmq.curve_keypair()
    raw_secret = z85.decode(secret)
    password = b"correct horse battery staple"
    curve = ctx.socket(zmq.DEALER)
    curve.curve_secretkey = raw_secret  # the 32-byte form
    curve.curve_publickey = public
    curve.curve_serverkey = public
    curve.connect("inproc://secret")
    plain = ctx.socket(zmq.DEALER)
    plain.plain_username = b"me"
    plain.plain_password = password
    plain.curve_secretkey = secret  # the z85 form
    plain.connect("inproc://secret")
    failing = ctx.socket(zmq.PULL, on_fork="rebind")
    failing.plain_password = password
    failing.curve_secretkey = secret
    with socket.socket() as probe:  # a free port (re-binding an unbound one races libzmq's async unbind)
        probe.bind(("127.0.0.1", 0))
        fixed = "tcp://127.0.0.1:%d" % probe.getsockname()[1]
    failing.bind(fixed)  # a fixed port the parent keeps: the child's replay of it fails

    def child() -> str:
        import io
        import logging

        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        logger = logging.getLogger("zmqfork")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        curve.get(zmq.LINGER)
        plain.get(zmq.LINGER)
        shown = [stream.getvalue()]
        try:
            failing.get(zmq.LINGER)
        except zmq.RebuildError as exc:
            shown += ["RebuildError", str(exc), repr(exc), repr(exc.args), exc.step]
        shown += [stream.getvalue(), repr(curve), repr(plain), repr(failing)]
        ctx.destroy(linger=0)
        return "\n".join(shown)

    text = run_in_child(child)
    assert "rebuilt" in text and "RebuildError" in text and fixed in text
    assert "<hidden>" in text
    for leak in (secret, raw_secret, binascii.hexlify(raw_secret), password):
        for form in (leak.decode("latin-1"), repr(leak)):
            assert form not in text


def test_import_loads_nothing_heavy_from_the_standard_library() -> None:
    """Importing zmqfork loads neither logging (its fork hooks slow every os.fork), dataclasses (inspect, ast)
    nor importlib.abc (importlib.resources, pathlib, tempfile, shutil, bz2, lzma): memory every fork copies."""
    import subprocess
    import sys

    probe = (
        "import sys, zmq; before = set(sys.modules); import zmqfork; "
        "print(' '.join(sorted({'logging', 'dataclasses', 'inspect', 'ast', 'importlib.abc', 'importlib.resources', 'pathlib', 'tempfile', 'shutil'} & (set(sys.modules) - before))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing zmqfork loaded {done.stdout.strip()}"
