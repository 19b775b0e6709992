"""The alternatives zmqfork is measured against, written as fairly as we know how.

- ``raw``: pyzmq itself (``zmq.Context``); unsafe across fork, the floor.
- ``pidcheck``: a proxy that compares ``os.getpid()`` with the pid it was
  built in on every call and rebuilds on change (the redis-py pattern).
- ``atfork``: a proxy reset by an ``os.register_at_fork(after_in_child=...)``
  hook, which rebuilds every live context and socket in the child at once, so
  the hot path carries no check at all (the pymongo / grpc-python pattern).
- ``zmqfork``: ``zmqfork.Context``.

For the per-call measurement only:

- ``patched``: zmqfork's objects as code that does ``import zmq`` gets them
  under ``zmqfork.patch()`` (made while patched, timed unpatched);
- ``checkfree``: a ``zmq.Socket`` subclass built the way zmqfork's is (``send``
  and ``recv`` call the compiled backend directly) without any fork check:
  the limit of what zmqfork's check can cost.

The two proxies use zmqfork's tricks, so that only the fork check differs:
``send`` and ``recv`` call the compiled backend's functions directly
(skipping pyzmq's Python ``Socket.send`` and the method lookup on
``zmq.Socket``), the proxy class defines no ``__getattr__`` (CPython cannot
specialise attribute loads on a class that has one; zmqfork generates option
properties instead, these proxies offer explicit methods only), and the
inherited pyzmq objects are let go without calling libzmq (marked closed, as
zmqfork's ``_abandon`` does).  Connects and options are recorded and replayed
on rebuild; binds are not replayed (zmqfork's default "reconnect" policy).
"""

from __future__ import annotations

import os
import weakref
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import zmq
from zmq.backend import Socket as _BackendSocket

__all__ = ["get", "PidCheckContext", "AtForkContext"]

_backend_send = _BackendSocket.send
_backend_recv = _BackendSocket.recv
_getpid = os.getpid


def _abandon_socket(sock: Optional[zmq.Socket]) -> None:
    """Let an inherited pyzmq socket go without calling libzmq."""
    if sock is not None:
        sock._closed = True


def _abandon_context(ctx: Optional[zmq.Context]) -> None:
    """Let an inherited pyzmq context (and its sockets) go without calling libzmq."""
    if ctx is None:
        return
    for sock in list(getattr(ctx, "_sockets", None) or ()):
        _abandon_socket(sock)
    ctx.closed = True


class _Recipe:
    """What a rebuilt socket must replay: options and connects, in order."""

    __slots__ = ("steps",)

    def __init__(self) -> None:
        self.steps: List[Tuple[str, Any, Any]] = []

    def replay(self, sock: zmq.Socket) -> None:
        for kind, a, b in self.steps:
            if kind == "opt":
                sock.set(a, b)
            elif kind == "connect":
                sock.connect(a)


# ---- pid check --------------------------------------------------------------------


class PidCheckContext:
    def __init__(self, io_threads: int = 1) -> None:
        self._io_threads = io_threads
        self._options: Dict[int, Any] = {}
        self._pid = _getpid()
        self._zctx = zmq.Context(io_threads)

    def _current(self) -> zmq.Context:
        pid = _getpid()
        if pid != self._pid:
            _abandon_context(self._zctx)
            zctx = zmq.Context(self._io_threads)
            for opt, val in self._options.items():
                zctx.set(opt, val)
            self._zctx = zctx
            self._pid = pid
        return self._zctx

    def set(self, option: int, value: Any) -> None:
        self._current().set(option, value)
        self._options[option] = value

    def socket(self, socket_type: int) -> "PidCheckSocket":
        return PidCheckSocket(self, socket_type)

    def term(self) -> None:
        if self._pid != _getpid():
            _abandon_context(self._zctx)
        else:
            self._zctx.term()

    def destroy(self, linger: Optional[int] = None) -> None:
        if self._pid != _getpid():
            _abandon_context(self._zctx)
        else:
            self._zctx.destroy(linger)


class PidCheckSocket:
    def __init__(self, ctx: PidCheckContext, socket_type: int) -> None:
        self._ctx = ctx
        self._type = socket_type
        self._recipe = _Recipe()
        self._pid = _getpid()
        self._sock = ctx._current().socket(socket_type)

    def _rebuild(self) -> None:
        pid = _getpid()
        _abandon_socket(self._sock)
        sock = self._ctx._current().socket(self._type)
        self._recipe.replay(sock)
        self._sock = sock
        self._pid = pid

    def _live(self) -> zmq.Socket:
        if _getpid() != self._pid:
            self._rebuild()
        return self._sock

    # -- hot path
    def send(self, data: Any, flags: int = 0, copy: bool = True, track: bool = False,
             routing_id: Optional[int] = None, group: Optional[str] = None) -> Any:
        if _getpid() != self._pid:
            self._rebuild()
        if routing_id is None and group is None:
            return _backend_send(self._sock, data, flags, copy, track)
        return self._sock.send(data, flags, copy, track, routing_id, group)

    def recv(self, flags: int = 0, copy: bool = True, track: bool = False) -> Any:
        if _getpid() != self._pid:
            self._rebuild()
        return _backend_recv(self._sock, flags, copy, track)

    # -- recorded calls
    def set(self, option: int, value: Any) -> None:
        self._live().set(option, value)
        self._recipe.steps.append(("opt", option, value))

    setsockopt = set

    def connect(self, addr: str) -> None:
        self._live().connect(addr)
        self._recipe.steps.append(("connect", addr, None))

    def bind(self, addr: str) -> None:
        self._live().bind(addr)

    def get(self, option: int) -> Any:
        return self._live().get(option)

    def poll(self, timeout: Optional[int] = None, flags: int = zmq.POLLIN) -> int:
        return self._live().poll(timeout, flags)

    def close(self, linger: Optional[int] = None) -> None:
        if _getpid() != self._pid:
            _abandon_socket(self._sock)
        else:
            self._sock.close(linger)


# ---- register_at_fork ----------------------------------------------------------------

_at_fork_contexts: "weakref.WeakSet[AtForkContext]" = weakref.WeakSet()
_at_fork_sockets: "weakref.WeakSet[AtForkSocket]" = weakref.WeakSet()
_hook_installed = False


def _after_in_child() -> None:
    # Contexts first: the sockets are rebuilt in their context's fresh pyzmq context.
    for ctx in list(_at_fork_contexts):
        ctx._reset()
    for sock in list(_at_fork_sockets):
        sock._reset()


def _install_hook() -> None:
    global _hook_installed
    if not _hook_installed:
        os.register_at_fork(after_in_child=_after_in_child)
        _hook_installed = True


class AtForkContext:
    def __init__(self, io_threads: int = 1) -> None:
        _install_hook()
        self._io_threads = io_threads
        self._options: Dict[int, Any] = {}
        self._closed = False
        self._zctx = zmq.Context(io_threads)
        _at_fork_contexts.add(self)

    def _reset(self) -> None:
        _abandon_context(self._zctx)
        if self._closed:
            return
        zctx = zmq.Context(self._io_threads)
        for opt, val in self._options.items():
            zctx.set(opt, val)
        self._zctx = zctx

    def set(self, option: int, value: Any) -> None:
        self._zctx.set(option, value)
        self._options[option] = value

    def socket(self, socket_type: int) -> "AtForkSocket":
        return AtForkSocket(self, socket_type)

    def term(self) -> None:
        self._closed = True
        _at_fork_contexts.discard(self)
        self._zctx.term()

    def destroy(self, linger: Optional[int] = None) -> None:
        self._closed = True
        _at_fork_contexts.discard(self)
        self._zctx.destroy(linger)


class AtForkSocket:
    def __init__(self, ctx: AtForkContext, socket_type: int) -> None:
        self._ctx = ctx
        self._type = socket_type
        self._recipe = _Recipe()
        self._sock = ctx._zctx.socket(socket_type)
        _at_fork_sockets.add(self)

    def _reset(self) -> None:
        _abandon_socket(self._sock)
        sock = self._ctx._zctx.socket(self._type)
        self._recipe.replay(sock)
        self._sock = sock

    # -- hot path: nothing to check, the hook already rebuilt everything
    def send(self, data: Any, flags: int = 0, copy: bool = True, track: bool = False,
             routing_id: Optional[int] = None, group: Optional[str] = None) -> Any:
        if routing_id is None and group is None:
            return _backend_send(self._sock, data, flags, copy, track)
        return self._sock.send(data, flags, copy, track, routing_id, group)

    def recv(self, flags: int = 0, copy: bool = True, track: bool = False) -> Any:
        return _backend_recv(self._sock, flags, copy, track)

    def set(self, option: int, value: Any) -> None:
        self._sock.set(option, value)
        self._recipe.steps.append(("opt", option, value))

    setsockopt = set

    def connect(self, addr: str) -> None:
        self._sock.connect(addr)
        self._recipe.steps.append(("connect", addr, None))

    def bind(self, addr: str) -> None:
        self._sock.bind(addr)

    def get(self, option: int) -> Any:
        return self._sock.get(option)

    def poll(self, timeout: Optional[int] = None, flags: int = zmq.POLLIN) -> int:
        return self._sock.poll(timeout, flags)

    def close(self, linger: Optional[int] = None) -> None:
        _at_fork_sockets.discard(self)
        self._sock.close(linger)


# ---- registry ---------------------------------------------------------------------------


def get(name: str) -> SimpleNamespace:
    """The alternative ``name``: a namespace with ``Context`` (callable like zmq.Context)."""
    if name == "raw":
        return SimpleNamespace(name=name, Context=zmq.Context)
    if name == "pidcheck":
        return SimpleNamespace(name=name, Context=PidCheckContext)
    if name == "atfork":
        return SimpleNamespace(name=name, Context=AtForkContext)
    if name == "zmqfork":
        import zmqfork  # only when asked: "without zmqfork" processes never load it

        return SimpleNamespace(name=name, Context=zmqfork.Context)
    if name == "patched":
        return SimpleNamespace(name=name, Context=_patched_context)
    if name == "checkfree":
        return SimpleNamespace(name=name, Context=CheckFreeContext)
    raise ValueError(f"unknown alternative {name!r}")


def _patched_context(io_threads: int = 1) -> zmq.Context:
    """``zmq.Context()`` as code that imports pyzmq gets it under ``zmqfork.patch()``."""
    import zmqfork

    zmqfork.patch()
    try:
        ctx = zmq.Context(io_threads)
    finally:
        zmqfork.unpatch()
    assert isinstance(ctx, zmqfork.Context), type(ctx)
    return ctx


class CheckFreeSocket(zmq.Socket):
    """zmqfork's hot path without the fork check: the compiled backend's send and recv, called directly."""

    def send(self, data: Any, flags: int = 0, copy: bool = True, track: bool = False,
             routing_id: Optional[int] = None, group: Optional[str] = None) -> Any:
        if routing_id is None and group is None:
            return _backend_send(self, data, flags, copy, track)
        return super().send(data, flags, copy, track, routing_id, group)

    def recv(self, flags: int = 0, copy: bool = True, track: bool = False) -> Any:
        return _backend_recv(self, flags, copy, track)


class CheckFreeContext(zmq.Context):
    """A ``zmq.Context`` whose sockets are ``CheckFreeSocket``."""

    _socket_class = CheckFreeSocket
