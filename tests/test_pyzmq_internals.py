"""What zmqfork relies on in pyzmq's internals, checked against the installed pyzmq (every matrix cell runs it).

zmqfork's classes subclass pyzmq's and re-initialise them in place; these are
the behaviours of pyzmq's compiled backend and Python layer that make that
possible.  If a pyzmq release changes one, this file says which.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import zmq
import zmq.asyncio
import zmq.sugar.poll
from zmq.backend import Context as BackendContext
from zmq.backend import Socket as BackendSocket

import zmqfork  # noqa: F401  - its import wraps pyzmq's compiled functions


@pytest.fixture
def plain() -> Any:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_the_backends_init_can_run_again_on_the_same_object(plain: zmq.Context[Any]) -> None:
    """Socket.__init__ and Context.__init__ of the compiled backend, run again, give the object a new libzmq object."""
    sock = plain.socket(zmq.PUSH)
    first = sock.underlying
    BackendSocket.__init__(sock, plain, zmq.PUSH)
    assert sock.underlying not in (0, first) and not sock.closed
    sock.close()
    zmq.Socket.shadow(first).close()  # the first libzmq socket, let go by the second __init__
    ctx = zmq.Context()
    before = ctx.underlying
    BackendContext.__init__(ctx, 1)
    assert ctx.underlying not in (0, before)
    ctx.term()
    zmq.Context.shadow(before).term()


def test_the_closed_flags_are_writable_members_the_compiled_methods_obey(plain: zmq.Context[Any]) -> None:
    """``_closed`` (sockets) and ``closed`` (contexts) are set without libzmq, and the compiled methods refuse then."""
    sock = plain.socket(zmq.PUSH)
    BackendSocket.__dict__["_closed"].__set__(sock, True)
    with pytest.raises(zmq.ZMQError) as info:
        BackendSocket.send(sock, b"x")
    assert info.value.errno == zmq.ENOTSOCK
    BackendSocket.__dict__["_closed"].__set__(sock, False)
    sock.close()
    ctx = zmq.Context()
    BackendContext.__dict__["closed"].__set__(ctx, True)
    BackendContext.__dict__["closed"].__set__(ctx, False)
    ctx.term()


def test_the_backends_socket_init_forgets_the_handle_before_it_refuses(plain: zmq.Context[Any]) -> None:
    """Socket.__init__ with no context sets the handle to NULL, then raises TypeError, before any libzmq call."""
    sock = plain.socket(zmq.PUSH)
    handle = sock.underlying
    with pytest.raises(TypeError):
        BackendSocket.__init__(sock)
    assert sock.underlying == 0
    zmq.Socket.shadow(handle).close()  # the libzmq socket itself is untouched: closed here for real


@pytest.mark.parametrize("cls", [BackendSocket, BackendContext], ids=["socket", "context"])
def test_the_handle_has_one_place_in_the_object(cls: type) -> None:
    """A shadow=ADDRESS backend socket or context holds ADDRESS in exactly one word of its memory, where NULL reads back
    as ``underlying == 0``: zmqfork finds it at import and forgets inherited handles there (nothing raised or run)."""
    from zmqfork._handles import handle_offset

    assert handle_offset(cls) is not None


@pytest.mark.parametrize("way", ["offset", "pyzmq"])
def test_forgetting_a_handle_keeps_the_rest_of_the_object(way: str, plain: zmq.Context[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Either way of forgetting a handle (the place found, or pyzmq's own: __init__'s TypeError for a socket, term() of a
    closed context) leaves a socket's context and copy threshold as they were, and calls no libzmq: the libzmq socket
    and context are still alive."""
    from zmqfork import _handles

    if way == "pyzmq":
        monkeypatch.setattr(_handles, "handle_offset", lambda cls: None)
    sock = plain.socket(zmq.PUSH)
    sock.copy_threshold = 1234
    handle = sock.underlying
    _handles.nulling_handle(BackendSocket)(sock)
    assert (sock.underlying, sock.context, sock.copy_threshold) == (0, plain, 1234)
    BackendSocket.__dict__["_closed"].__set__(sock, True)  # its handle is gone: pyzmq must not close it
    real = zmq.Socket.shadow(handle)
    assert real.get(zmq.TYPE) == zmq.PUSH  # the libzmq socket is alive
    real.close()
    ctx = zmq.Context()
    handle = ctx.underlying
    BackendContext.__dict__["closed"].__set__(ctx, True)
    _handles.nulling_handle(BackendContext)(ctx)
    assert ctx.underlying == 0
    again = zmq.Context.shadow(handle)
    again.socket(zmq.PUSH).close()  # the libzmq context is alive
    again.term()


def test_terminating_a_closed_context_only_forgets_its_handle() -> None:
    """Context.term() on a context whose closed flag is set calls no zmq_ctx_destroy and sets the handle to NULL."""
    ctx = zmq.Context()
    handle = ctx.underlying
    BackendContext.__dict__["closed"].__set__(ctx, True)
    BackendContext.term(ctx)
    assert ctx.underlying == 0
    zmq.Context.shadow(handle).term()  # still alive: terminated here for real


def test_the_python_layer_hooks_zmqfork_uses() -> None:
    """pyzmq's repr names _repr_cls; its Poller finds zmq_poll as a module global; awaitable sockets queue through two methods."""
    assert "_repr_cls" in inspect.getsource(zmq.Socket.__repr__)
    assert "_repr_cls" in inspect.getsource(zmq.Context.__repr__)
    assert hasattr(zmq.sugar.poll.zmq_poll, "__wrapped__"), "zmqfork's fork-aware zmq_poll is where Poller looks"
    for name in ("_add_recv_event", "_add_send_event", "_shadow_sock"):
        assert name in inspect.getsource(zmq._future._AsyncSocket), name
    for name in ("_recv_futures", "_send_futures", "_state", "_fd", "_current_loop"):
        assert name in inspect.getsource(zmq._future._AsyncSocket.__init__) or hasattr(zmq._future._AsyncSocket, name)
