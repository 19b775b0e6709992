"""zmqfork.Context: a pyzmq context that is replaced by a fresh one in a forked child.

Each process generation gets one pyzmq context per zmqfork Context, built on
first use and shared by that Context's sockets.  The inherited one is let go
without calling libzmq.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Type, TypeVar
from weakref import WeakSet

import zmq
from zmq.backend import Context as _BackendContext
from zmq.sugar.attrsettr import AttributeSetter

from zmqfork import _log
from zmqfork._abandon import abandon_context
from zmqfork._generation import TOKEN, current_token, generation_lock
from zmqfork._policy import check_policy
from zmqfork.socket import Socket

__all__ = ["Context"]


_C = TypeVar("_C", bound="Context")
_PyzmqContext = zmq.Context


def _new_pyzmq_context(io_threads: int) -> zmq.Context[Any]:
    """A plain ``zmq.Context``, made without ``zmq.Context.__new__`` (which ``zmqfork.patch()`` redirects)."""
    zctx: zmq.Context[Any] = _BackendContext.__new__(_PyzmqContext)
    _PyzmqContext.__init__(zctx, io_threads)
    return zctx


class Context(AttributeSetter):
    """A ZeroMQ context whose sockets stay usable across fork.

    ``Context(io_threads=1, on_fork="reconnect")``.  ``on_fork`` is the default
    bind policy of its sockets in a forked child:

    - ``"reconnect"``: options and connects are replayed, binds are not; a
      socket that had binds raises ``zmqfork.InheritedBindError`` when used.
    - ``"rebind"``: binds are replayed too.
    - ``"close"``: sockets are closed in the child.

    Context options set with ``set`` (or as attributes) are replayed on the
    child's fresh context; ``setsockopt`` sets defaults for new sockets, as in
    pyzmq.
    """

    _instance: ClassVar[Optional[Context]] = None
    #: What ``socket()`` makes unless told otherwise (zmqfork.asyncio makes async sockets).
    _socket_class: ClassVar[Type[Socket]] = Socket

    on_fork: str
    sockopts: Dict[int, Any]
    _zctx: zmq.Context[Any]
    _token: int
    _io_threads: int
    _options: Dict[int, Any]
    _sockets: WeakSet[Socket]
    _closed: bool
    _shadow = False
    _warn_destroy_close = False

    def __init__(self, io_threads: int = 1, on_fork: str = "reconnect") -> None:
        if isinstance(io_threads, bool) or not isinstance(io_threads, int):
            raise TypeError(f"io_threads must be an int, not {type(io_threads).__name__}")
        policy = check_policy(on_fork)
        self.__dict__.update(
            on_fork=policy,
            sockopts={},
            _zctx=_new_pyzmq_context(io_threads),
            _token=current_token(),
            _io_threads=io_threads,
            _options={},
            _sockets=WeakSet(),
            _closed=False,
        )

    @classmethod
    def instance(cls: Type[_C], io_threads: int = 1) -> _C:
        """The process-wide Context, made on first call.

        The same object serves in forked children, where it rebuilds itself.
        """
        inst = cls.__dict__.get("_instance")
        if inst is None or inst.closed:
            with generation_lock(current_token()):
                inst = cls.__dict__.get("_instance")
                if inst is None or inst.closed:
                    inst = cls(io_threads)
                    cls._instance = inst
        return inst

    # ---- generation check and rebuild -----------------------------------

    def _current(self, token: int) -> zmq.Context[Any]:
        """The pyzmq context of generation ``token``, built on first use in a child."""
        if self._token != token:
            with generation_lock(token):
                if self._token != token:
                    self._rebuild(token)
        return self._zctx

    def _rebuild(self, token: int) -> None:
        if self._closed:
            raise zmq.ZMQError(zmq.ENOTSUP)
        abandon_context(self._zctx)
        zctx = _new_pyzmq_context(self._io_threads)
        for option, value in self._options.items():
            zctx.set(option, value)
        self._zctx = zctx
        self._token = token
        _log.debug("zmqfork: new context for %r in forked child", self)

    def _live(self) -> zmq.Context[Any]:
        return self._current(current_token())

    def _forget(self, sock: Socket) -> None:
        self._sockets.discard(sock)

    # ---- sockets -------------------------------------------------------------

    def socket(
        self,
        socket_type: int,
        on_fork: Optional[str] = None,
        *,
        socket_class: Optional[Type[Socket]] = None,
        copy_threshold: Optional[int] = None,
    ) -> Socket:
        """Create a fork-safe socket of ``socket_type``.

        ``on_fork`` overrides the Context's bind policy for this socket.
        Default socket options set with ``setsockopt`` are applied, ignoring
        those that do not apply to this socket type, as pyzmq does.
        """
        if self.closed:
            raise zmq.ZMQError(zmq.ENOTSUP)
        cls = self._socket_class if socket_class is None else socket_class
        if not (isinstance(cls, type) and issubclass(cls, Socket)):
            raise TypeError(f"socket_class must be a zmqfork.Socket subclass, not {cls!r}")
        sock = cls(self, socket_type, on_fork=on_fork, copy_threshold=copy_threshold)
        for option, value in self.sockopts.items():
            try:
                sock.set(option, value)
            except zmq.ZMQError:
                pass
        self._sockets.add(sock)
        return sock

    # ---- options -----------------------------------------------------------------

    def set(self, option: int, optval: int) -> None:
        """Set a context option; it is replayed on the context of a forked child."""
        self._live().set(option, optval)
        self._options[option] = optval

    def get(self, option: int) -> Any:
        """Get a context option."""
        return self._live().get(option)

    # pyzmq's own functions for default socket options, run on this proxy.
    setsockopt = _PyzmqContext.setsockopt
    getsockopt = _PyzmqContext.getsockopt
    _set_attr_opt = _PyzmqContext._set_attr_opt
    _get_attr_opt = _PyzmqContext._get_attr_opt
    __delattr__ = _PyzmqContext.__delattr__

    # ---- lifecycle -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the context was terminated."""
        if self._closed:
            return True
        return self._token == TOKEN[0] and bool(self._zctx.closed)

    @property
    def underlying(self) -> int:
        """The address of the libzmq context of this process generation."""
        return int(self._live().underlying)

    def term(self) -> None:
        """Terminate the context, as ``zmq.Context.term`` (blocks until its sockets are closed).

        In a forked child that never used it, nothing is called in libzmq.
        """
        if self._closed:
            return
        if self._token != current_token():
            abandon_context(self._zctx)
        else:
            self._zctx.term()
        self._closed = True

    def destroy(self, linger: Optional[int] = None) -> None:
        """Close every socket of this Context (with ``linger`` if given), then terminate it."""
        if self._closed:
            return
        for sock in list(self._sockets):
            sock.close(linger)
        self.term()

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *args: Any) -> None:
        self.destroy()

    def __del__(self) -> None:
        # Never let pyzmq's __del__ reach libzmq with an inherited context.
        zctx = self.__dict__.get("_zctx")
        try:
            if zctx is not None and self._token != TOKEN[0]:
                abandon_context(zctx)
        except Exception:  # interpreter teardown: module globals may be gone
            pass

    def __repr__(self) -> str:
        closed = " closed" if self._closed else ""
        return f"<zmqfork.Context({len(self._sockets)} sockets) at {hex(id(self))}{closed}>"
