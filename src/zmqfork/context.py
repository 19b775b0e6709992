"""zmqfork.Context: a ``zmq.Context`` that re-initialises itself in place in a forked child.

In the process that made it, a Context is a ``zmq.Context``.  In a forked
child, its first use gives the same object a new libzmq context with the
context options replayed; the inherited one is never called.  Its sockets
are zmqfork sockets, whatever ``socket_class`` asks for (a fork-safe
subclass of it is made), and rebuild themselves in this context.
"""

from __future__ import annotations

import errno
import sys
from typing import Any, Dict, List, Optional, Type, Union

import zmq
from zmq.backend import Context as _BackendContext

from zmqfork import _log
from zmqfork._generation import (
    NOTICED_FLAG,
    TOKEN,
    adopt,
    disown_handle,
    generation_lock,
    let_go_instead_of_del,
    notice,
    origin_in_family,
    own_handle,
)
from zmqfork._handles import nulling_handle
from zmqfork._pickling import reduce_context
from zmqfork._policy import check_policy
from zmqfork.socket import Socket

__all__ = ["Context", "fork_safe_socket_class", "fork_safe_context_class"]

# pyzmq's flag and handle, read and written without calling libzmq.
_CLOSED_FLAG: Any = _BackendContext.__dict__["closed"]
_HANDLE: Any = _BackendContext.__dict__["underlying"]
_null_handle = nulling_handle(_BackendContext)


class Context(zmq.Context[Socket[bytes]]):
    """A ``zmq.Context`` whose sockets stay usable across fork.

    ``Context(io_threads=1, *, on_fork="reconnect")``; ``shadow=`` as in
    pyzmq (a shadow of a zmqfork Context follows it across fork).
    ``on_fork`` is the default bind policy of its sockets in a forked child:

    - ``"reconnect"``: options and connects are replayed, binds are not; a
      socket that had binds raises ``zmqfork.InheritedBindError`` when used.
    - ``"rebind"``: binds are replayed too.
    - ``"close"``: sockets are closed in the child.

    Context options set with ``set`` (or as attributes) are replayed on the
    child's fresh context; ``setsockopt`` sets defaults for new sockets, as in
    pyzmq.
    """

    _repr_cls = "zmqfork.Context"
    _socket_class: Type[Socket[Any]] = Socket
    #: ``Context.instance()`` is pyzmq's: one per class and per process (a new one in a forked child).
    _instance = None  # this class's own, not pyzmq's

    _zf_on_fork: str
    _zf_gen: int
    _zf_io_threads: int
    #: Context options to replay; a shadow shares its origin's.
    _zf_options: Dict[int, Any]
    _zf_origin: Optional[Context]
    _zf_terminated: bool
    #: Weak references to the zmq.auth authenticators started on this context, restarted in a child
    #: (see zmqfork._auth); those of asyncio wait for a running event loop.
    _zf_authenticators: List[Any]
    _zf_authenticators_waiting: List[Any]

    def __init__(
        self,
        io_threads: Union[int, zmq.Context[Any]] = 1,
        shadow: Union[zmq.Context[Any], int] = 0,
        *,
        on_fork: Optional[str] = None,
    ) -> None:
        if isinstance(io_threads, zmq.Context):  # positional Context(other_context), as pyzmq
            io_threads, shadow = 1, io_threads
        if isinstance(io_threads, bool) or not isinstance(io_threads, int):
            raise TypeError(f"io_threads must be an int, not {type(io_threads).__name__}")
        if shadow and on_fork is not None:
            raise TypeError("on_fork is for contexts zmqfork owns; a shadow follows the context it shadows")
        origin = _origin_of(shadow) if shadow else None
        if origin is not None:
            origin._zf_live()
            shadow = origin  # its current libzmq context, even for an address taken before a fork
        options = origin._zf_options if origin is not None else {}
        policy = origin.on_fork if origin is not None else check_policy("reconnect" if on_fork is None else on_fork)
        self._zf_init(notice(), io_threads, policy, options, origin)
        super().__init__(io_threads, shadow)  # type: ignore[call-overload]
        if origin is None and not self._shadow:
            own_handle(self, _HANDLE.__get__(self))
        adopt(self)

    def _zf_init(self, gen: int, io_threads: int, on_fork: str, options: Dict[int, Any], origin: Optional[Context]) -> None:
        """zmqfork's state of a context (made, or unpickled: zmqfork._pickling)."""
        self.__dict__.update(
            _zf_on_fork=on_fork,
            _zf_gen=gen,
            _zf_io_threads=io_threads,
            _zf_options=options,
            _zf_origin=origin,
            _zf_terminated=False,
            _zf_authenticators=[],
            _zf_authenticators_waiting=[],
        )

    # ---- the fork check and the re-initialisation --------------------------

    def _zf_live(self) -> None:
        """Re-initialise this context in place if it is stale (inherited from the parent)."""
        if not NOTICED_FLAG[0]:
            notice()
        if self._zf_gen != TOKEN[0]:
            token = notice()
            with generation_lock(token):
                if self._zf_gen != token:
                    self._zf_rebuild(token)

    def _zf_rebuild(self, token: int) -> None:
        self._zf_mark_inherited()
        origin = self._zf_origin
        if origin is not None:
            origin._zf_live()
            if origin._zf_terminated:
                self.__dict__["_zf_terminated"] = True
        if not self._zf_terminated:
            if origin is not None:
                _BackendContext.__init__(self, shadow=_HANDLE.__get__(origin))
            elif self._shadow:
                raise zmq.ZMQError(
                    errno.ENOTSUP,
                    "this context shadows a libzmq context that zmqfork does not own; it cannot be "
                    "re-initialised in a forked child: shadow a zmqfork context, or create it after the fork",
                )
            else:
                _BackendContext.__init__(self, self._zf_io_threads)
                for option, value in self._zf_options.items():
                    _BackendContext.set(self, option, value)
                own_handle(self, _HANDLE.__get__(self))
        # Current before anything that may run user code (a log handler, an authenticator).
        self.__dict__["_zf_gen"] = token
        _log.debug("zmqfork: new context for %r in forked child", self)
        if self._zf_authenticators:
            from zmqfork._auth import restart_authenticators

            restart_authenticators(self)

    def _zf_mark_inherited(self) -> None:
        """Make pyzmq treat the inherited libzmq context as closed and forget it, without calling libzmq.

        Its authenticators, if any, let go of their inherited thread or task
        and sockets; they start again when the context is re-initialised.
        """
        _CLOSED_FLAG.__set__(self, True)
        _null_handle(self)
        if self.__dict__.get("_zf_authenticators"):
            from zmqfork._auth import let_go_of_authenticators

            let_go_of_authenticators(self)

    # ---- sockets -------------------------------------------------------------

    def socket(
        self,
        socket_type: int,
        socket_class: Optional[Any] = None,
        *,
        on_fork: Optional[str] = None,
        **kwargs: Any,
    ) -> Any:
        """Create a fork-safe socket of ``socket_type``; see ``zmq.Context.socket``.

        ``on_fork`` overrides the Context's bind policy for this socket.  A
        ``socket_class`` that is not a zmqfork socket class is replaced by a
        fork-safe subclass of it.
        """
        if isinstance(socket_class, str):
            raise TypeError(f"pass on_fork by keyword: ctx.socket(socket_type, on_fork={socket_class!r})")
        if socket_class is not None and not (isinstance(socket_class, type) and issubclass(socket_class, zmq.Socket)):
            raise TypeError(f"socket_class must be a zmq.Socket subclass, not {socket_class!r}")
        self._zf_live()
        if on_fork is not None:
            kwargs["on_fork"] = check_policy(on_fork)
        cls = fork_safe_socket_class(socket_class or self._socket_class)
        sock = super().socket(socket_type, cls, **kwargs)
        if "_zf_gen" not in sock.__dict__:
            zmq.Socket.close(sock)
            raise TypeError(
                f"socket_class {socket_class!r}: its __init__ must call super().__init__(...) "
                "(not zmq.Socket.__init__ directly), so that zmqfork's __init__ runs too"
            )
        return sock

    @property
    def on_fork(self) -> str:
        """The default bind policy of this context's sockets in a forked child: "reconnect", "rebind" or "close"."""
        return self._zf_on_fork

    @on_fork.setter
    def on_fork(self, value: str) -> None:
        self.__dict__["_zf_on_fork"] = check_policy(value)

    # ---- options -----------------------------------------------------------------

    def set(self, option: int, optval: Any) -> None:
        """Set a context option; it is replayed on the context of a forked child."""
        self._zf_live()
        super().set(option, optval)
        self._zf_options[option] = optval

    def get(self, option: int) -> Any:
        """Get a context option."""
        self._zf_live()
        return super().get(option)

    @property
    def underlying(self) -> int:
        """The address of the libzmq context of this process generation (re-initialised first in a child)."""
        self._zf_live()
        return int(_HANDLE.__get__(self))

    # ---- lifecycle -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the context was terminated.  An inherited context is open: it re-initialises on use."""
        if self._zf_gen != TOKEN[0]:
            return self._zf_terminated
        return bool(_CLOSED_FLAG.__get__(self))

    @closed.setter
    def closed(self, value: bool) -> None:
        _CLOSED_FLAG.__set__(self, value)

    def term(self) -> None:
        """Terminate the context, as ``zmq.Context.term`` (blocks until its sockets are closed).

        In a forked child that never used it, nothing is called in libzmq.
        """
        if self._zf_gen == TOKEN[0]:
            disown_handle(self, _HANDLE.__get__(self))
            super().term()
        else:
            self._zf_mark_inherited()
        self.__dict__["_zf_terminated"] = True

    def destroy(self, linger: Optional[int] = None) -> None:
        """Close every socket of this context (with ``linger`` if given), then terminate it; see ``zmq.Context.destroy``.

        In a forked child, sockets never used there are let go, unbuilt.
        """
        token = TOKEN[0]
        for sock in list(self.__dict__.get("_sockets") or ()):
            if getattr(sock, "_zf_gen", token) != token:
                sock.close()
        super().destroy(linger)

    def __reduce__(self) -> Any:
        """Pickled by recipe: unpickled in any process, it makes a new libzmq context at first use (see zmqfork._pickling)."""
        return reduce_context(self)

    def __del__(self) -> None:
        if not let_go_instead_of_del(self):
            super().__del__()


def _origin_of(shadow: Any) -> Optional[Context]:
    """The zmqfork Context that ``shadow`` (a context or an address) stands for, or None if it is foreign."""
    origin: Optional[Context] = origin_in_family(shadow, Context)
    return origin


_fork_safe_classes: Dict[Any, Any] = {}


def _fork_safe_twin(cls: type, *bases: type) -> type:
    """A class named and documented as ``cls``, made of ``bases`` (``cls`` and a zmqfork class, in MRO order).

    Its name leads pickle to ``cls``, not to it: pickling by recipe names
    ``cls`` instead (``zmqfork._pickling.asked_for``), and the unpickling
    process makes its own twin of it.
    """
    return type(cls.__name__, bases, {"__module__": cls.__module__, "__doc__": cls.__doc__, "_zf_asked_for": cls})


def fork_safe_socket_class(cls: Type[zmq.Socket[Any]]) -> Type[Socket[Any]]:
    """The zmqfork socket class to make where the ``zmq.Socket`` subclass ``cls`` was asked for.

    pyzmq's own classes map to zmqfork's; another ``zmq.Socket`` subclass
    gets a fork-safe subclass of itself (made once), whose methods run
    before zmqfork's.
    """
    if issubclass(cls, Socket):
        return cls
    safe: Any = _fork_safe_classes.get(cls)
    if safe is None:
        aio = sys.modules.get("zmq.asyncio")  # not imported: cls cannot be one of its classes
        future = sys.modules.get("zmq._future")  # not imported: cls cannot be an awaitable socket
        if cls is zmq.Socket:
            safe = Socket
        elif aio is not None and cls is aio.Socket:
            from zmqfork.asyncio import Socket as safe
        elif future is not None and issubclass(cls, future._AsyncSocket):
            from zmqfork._asyncsocket import AwaitableSocket

            safe = _fork_safe_twin(cls, AwaitableSocket, cls, Socket)
        else:
            safe = _fork_safe_twin(cls, cls, Socket)
        _fork_safe_classes[cls] = safe
    return safe  # type: ignore[no-any-return]


def fork_safe_context_class(cls: Type[zmq.Context[Any]]) -> Type[Context]:
    """The zmqfork context class to make where the ``zmq.Context`` subclass ``cls`` was asked for.

    pyzmq's own classes map to zmqfork's; another ``zmq.Context`` subclass
    (a library's own, ``zmq.eventloop.future.Context``) gets a fork-safe
    subclass of itself (made once), whose methods run before zmqfork's.
    """
    if issubclass(cls, Context):
        return cls
    safe: Any = _fork_safe_classes.get(cls)
    if safe is None:
        aio = sys.modules.get("zmq.asyncio")  # not imported: cls cannot be one of its classes
        base: Type[Context] = Context
        if aio is not None and issubclass(cls, aio.Context):
            from zmqfork.asyncio import Context as AsyncContext

            base = AsyncContext
        pyzmq_own = cls is zmq.Context or (aio is not None and cls is aio.Context)
        safe = base if pyzmq_own else _fork_safe_twin(cls, cls, base)
        _fork_safe_classes[cls] = safe
    return safe  # type: ignore[no-any-return]
