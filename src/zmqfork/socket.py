"""zmqfork.Socket: a ``zmq.Socket`` that rebuilds itself in place when it finds itself in a forked child.

In the process that made it, a Socket is a ``zmq.Socket``: pyzmq's methods,
pyzmq's errors, accepted by every pyzmq function.  It also records its recipe
(options, subscriptions, connects, monitors, binds, in order).  In a forked
child, its first use re-initialises the same Python object on a new libzmq
socket, in the fresh context of its ``zmqfork.Context``, and replays the
recipe (binds by its ``on_fork`` policy).  The inherited libzmq socket is
never called: ``notice()`` marks it closed through pyzmq's own flag.

A Socket made with ``shadow=`` of another zmqfork socket (``Socket.shadow``,
``copy.copy``) follows it: in a child it shadows the rebuilt socket.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, Optional, Tuple, TypeVar, Union

import zmq
from zmq.backend import Socket as _BackendSocket

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
from zmqfork._pickling import reduce_socket
from zmqfork._policy import check_policy
from zmqfork._recipe import SocketRecipe
from zmqfork.errors import InheritedBindError, RebuildError

if TYPE_CHECKING:
    from zmqfork.context import Context

__all__ = ["Socket", "forget_handle"]

# The compiled backend's methods: pyzmq's Socket.send is a Python method that
# only adds routing_id/group handling on top of the backend's.
_backend_send = _BackendSocket.send
_backend_recv = _BackendSocket.recv
_backend_recv_into = _BackendSocket.recv_into
# pyzmq's flag and handle, read and written without calling libzmq.
_CLOSED_FLAG: Any = _BackendSocket.__dict__["_closed"]
_HANDLE: Any = _BackendSocket.__dict__["underlying"]
_null_handle = nulling_handle(_BackendSocket)


#: What recv returns, as in pyzmq's ``zmq.Socket[bytes]`` (its asyncio sockets return futures).
_RecvT_co = TypeVar("_RecvT_co", covariant=True)


class Socket(zmq.Socket[_RecvT_co]):
    """A ``zmq.Socket`` that stays usable across fork.

    Made by ``zmqfork.Context().socket(socket_type, on_fork=None)`` (or
    ``zmqfork.Socket(ctx, socket_type, on_fork=None)``).  ``on_fork`` overrides
    the Context's bind policy for this socket: see ``zmqfork.Context``.

    In the parent it is a plain ``zmq.Socket``.  In a forked child the first
    use rebuilds it in place: same object, new libzmq socket, recipe replayed.
    Messages queued in the parent stay with the parent.
    """

    _repr_cls = "zmqfork.Socket"

    #: The token of the generation whose libzmq socket this object holds.
    _zf_gen: int
    _zf_type: int
    _zf_on_fork: str
    #: What rebuilds it; a shadow shares its origin's; None for a shadow of a foreign socket.
    _zf_recipe: Optional[SocketRecipe]
    #: For a shadow of a zmqfork socket: that socket, which it follows across fork.
    _zf_origin: Optional[Socket[Any]]
    _zf_closed: bool
    #: (generation, error): every call in that generation raises it, until close.
    _zf_failure: Optional[Tuple[int, zmq.ZMQError]]

    def __init__(
        self,
        ctx_or_socket: Any = None,
        socket_type: int = 0,
        *,
        shadow: Union[zmq.Socket[Any], int] = 0,
        copy_threshold: Optional[int] = None,
        on_fork: Optional[str] = None,
    ) -> None:
        from zmqfork.context import Context

        if isinstance(ctx_or_socket, zmq.Socket):  # positional Socket(other_socket), as pyzmq
            ctx_or_socket, shadow = None, ctx_or_socket
        origin: Optional[Socket[Any]] = None
        if shadow:
            if on_fork is not None:
                raise TypeError("on_fork is for sockets zmqfork owns; a shadow follows the socket it shadows")
            origin = _origin_of(shadow)
            if origin is not None:
                origin._zf_live()
                shadow = origin  # its current libzmq socket, even for an address taken before a fork
            recipe = origin._zf_recipe if origin is not None else None
            policy = origin._zf_on_fork if origin is not None else "reconnect"
        else:
            if not isinstance(ctx_or_socket, Context):
                raise TypeError(
                    f"zmqfork.Socket needs a zmqfork.Context, not {type(ctx_or_socket).__name__}; "
                    "use zmqfork.Context().socket(socket_type)"
                )
            ctx_or_socket._zf_live()
            policy = ctx_or_socket.on_fork if on_fork is None else check_policy(on_fork)
            recipe = SocketRecipe()
        self._zf_init(notice(), socket_type, policy, recipe, origin)
        super().__init__(ctx_or_socket, socket_type, shadow=shadow, copy_threshold=copy_threshold)  # type: ignore[call-overload,misc]
        self.__dict__["_zf_type"] = int(self.type)
        if origin is not None:
            self.context = origin.context
        else:
            own_handle(self, _HANDLE.__get__(self))
        adopt(self)

    def _zf_init(
        self, gen: int, socket_type: int, on_fork: str, recipe: Optional[SocketRecipe], origin: Optional[Socket[Any]]
    ) -> None:
        """zmqfork's state of a socket (made, or unpickled: zmqfork._pickling)."""
        self.__dict__.update(
            _zf_gen=gen,
            _zf_type=socket_type,
            _zf_on_fork=on_fork,
            _zf_recipe=recipe,
            _zf_origin=origin,
            _zf_closed=False,
            _zf_failure=None,
        )

    # ---- the fork check and the rebuild -----------------------------------

    def _zf_live(self) -> None:
        """Rebuild this socket in place if it is stale (inherited from the parent): every slow path's check."""
        if not NOTICED_FLAG[0]:
            notice()
        if self._zf_gen != TOKEN[0]:
            self._zf_revive()

    def _zf_revive(self) -> None:
        token = notice()
        failure = self._zf_failure
        if failure is not None and failure[0] == token:
            raise failure[1]
        with generation_lock(token):
            if self._zf_gen != token:
                self._zf_rebuild(token)

    def _zf_rebuild(self, token: int) -> None:
        self._zf_mark_inherited()
        self.__dict__["_zf_failure"] = None  # a failure of an earlier generation is tried again here
        origin = self._zf_origin
        if origin is not None:
            origin._zf_live()
            if not origin._zf_closed:
                _BackendSocket.__init__(self, shadow=_HANDLE.__get__(origin))
                self.context = origin.context
        elif not (self._zf_closed or self._zf_on_fork == "close"):
            self._zf_build(token)
            if self._zf_gen == token:  # rebuilt meanwhile, by a log handler that uses it
                return
        if self._zf_closed or self._zf_on_fork == "close" or (origin is not None and origin._zf_closed):
            # Stays marked: every call raises what a closed pyzmq socket raises.
            self.__dict__.update(_zf_closed=True, _zf_gen=token)
            _log.debug("zmqfork: %r closed in forked child (on_fork=%r)", self, self._zf_on_fork)
            return
        self.__dict__["_zf_gen"] = token
        if origin is None:
            own_handle(self, _HANDLE.__get__(self))
        self._zf_after_rebuild()
        _log.debug("zmqfork: rebuilt %r in forked child from %r", self, self._zf_recipe)

    def _zf_build(self, token: int) -> None:
        """A new libzmq socket for this object, in the child's context, with the recipe replayed."""
        recipe = self._zf_recipe
        if recipe is None:
            self._zf_fail(
                token,
                zmq.ZMQError(
                    errno.ENOTSUP,
                    "this socket shadows a libzmq socket that zmqfork does not own; it cannot be "
                    "rebuilt in a forked child: shadow a zmqfork socket, or create it after the fork",
                ),
            )
            return
        rebind = self._zf_on_fork == "rebind"
        bound = recipe.bound_endpoints()
        if bound and not rebind:
            self._zf_fail(token, InheritedBindError(bound))
        context: Context = self.context  # type: ignore[assignment]  # a zmqfork socket's context is zmqfork's
        context._zf_live()  # may run user code (a log handler) that uses this very socket
        if context._zf_terminated:
            self._zf_fail(token, zmq.ContextTerminated())
        if self._zf_closed or self._zf_gen == token:  # closed, or rebuilt, meanwhile
            return
        _BackendSocket.__init__(self, context, self._zf_type, copy_threshold=self.copy_threshold)
        try:
            recipe.replay(self, rebind=rebind)
        except RebuildError as exc:
            _BackendSocket.close(self, linger=0)
            self._zf_fail(token, exc)

    def _zf_after_rebuild(self) -> None:
        """Reset per-process state layered on the libzmq socket (zmqfork.asyncio resets its loop state)."""

    def _zf_fail(self, token: int, error: zmq.ZMQError) -> None:
        """Make every later call in generation ``token`` raise ``error`` (until close), and raise it now."""
        self.__dict__["_zf_failure"] = (token, error)
        raise error

    def _zf_mark_inherited(self) -> None:
        """Make pyzmq treat the inherited libzmq socket as closed and forget its handle, without calling libzmq.

        pyzmq's compiled functions (zmq_poll, proxy) read the handle directly:
        with NULL they get what a closed pyzmq socket gives them.
        """
        forget_handle(self)

    # ---- the hot path ------------------------------------------------------
    # The fork check is inline (see zmqfork._generation); a socket marked
    # stale raises ENOTSOCK from the backend before any libzmq call, and is
    # rebuilt and the call made again.

    def send(  # type: ignore[override]  # pyzmq's overloads; the same parameters
        self,
        data: Any,
        flags: int = 0,
        copy: bool = True,
        track: bool = False,
        routing_id: Optional[int] = None,
        group: Optional[str] = None,
    ) -> Optional[zmq.MessageTracker]:
        """Send one message frame; see ``zmq.Socket.send``."""
        if not NOTICED_FLAG[0]:  # the first call since a fork: rebuild before the call, not after it fails
            self._zf_live()
        if routing_id is None and group is None:
            try:
                return _backend_send(self, data, flags, copy, track)
            except zmq.ZMQError:
                if self._zf_gen == TOKEN[0]:
                    raise
            self._zf_revive()
            return _backend_send(self, data, flags, copy, track)
        self._zf_live()
        return super().send(data, flags, copy, track, routing_id, group)  # type: ignore[no-any-return]

    def recv(self, flags: int = 0, copy: bool = True, track: bool = False) -> Any:
        """Receive one message frame; see ``zmq.Socket.recv``."""
        if not NOTICED_FLAG[0]:
            self._zf_live()
        try:
            return _backend_recv(self, flags, copy, track)
        except zmq.ZMQError:
            if self._zf_gen == TOKEN[0]:
                raise
        self._zf_revive()
        return _backend_recv(self, flags, copy, track)

    def recv_into(self, buffer: Any, /, *, nbytes: int = 0, flags: int = 0) -> int:
        """Receive into a buffer; see ``zmq.Socket.recv_into``."""
        self._zf_live()
        return int(_backend_recv_into(self, buffer, nbytes=nbytes, flags=flags))

    # ---- calls that change the recipe --------------------------------------

    def set(self, option: int, optval: Any) -> None:
        """Set a socket option; it is replayed in a forked child."""
        self._zf_live()
        super().set(option, optval)
        if self._zf_recipe is not None:
            self._zf_recipe.record_option(option, optval)

    setsockopt = set

    def get(self, option: int) -> Any:
        """Get a socket option; see ``zmq.Socket.get``."""
        self._zf_live()
        return super().get(option)

    getsockopt = get

    def connect(self, addr: str) -> Any:
        """Connect to ``addr``; replayed in a forked child.  Returns pyzmq's disconnecting context manager."""
        self._zf_live()
        result = super().connect(addr)
        if self._zf_recipe is not None:
            self._zf_recipe.record_connect(_text(addr))
        return result

    def disconnect(self, addr: Union[str, bytes]) -> None:
        """Disconnect from ``addr``; the connect is then no longer replayed."""
        self._zf_live()
        super().disconnect(addr)
        if self._zf_recipe is not None:
            self._zf_recipe.record_end(_text(addr), ipv6=bool(self.get(zmq.IPV6)))

    def bind(self, addr: str) -> Any:
        """Bind to ``addr``; in a forked child as the ``on_fork`` policy says.  Returns pyzmq's unbinding context manager."""
        self._zf_live()
        result = super().bind(addr)
        if self._zf_recipe is not None:
            resolved = _BackendSocket.get(self, zmq.LAST_ENDPOINT)
            self._zf_recipe.record_bind(_text(addr), _text(resolved) if isinstance(resolved, bytes) else _text(addr))
        return result

    def unbind(self, addr: Union[str, bytes]) -> None:
        """Unbind from ``addr``."""
        self._zf_live()
        super().unbind(addr)
        if self._zf_recipe is not None:
            self._zf_recipe.record_end(_text(addr), ipv6=bool(self.get(zmq.IPV6)))

    def monitor(self, addr: Union[str, bytes, None], events: int = zmq.EVENT_ALL) -> None:
        """Start (or, with ``addr=None``, stop) publishing socket events on a PAIR at ``addr``; replayed in a child."""
        self._zf_live()
        super().monitor(addr, events)
        if self._zf_recipe is not None:
            self._zf_recipe.record_monitor(None if addr is None else _text(addr), events)

    def join(self, group: Any) -> None:
        """Join a group (DRAFT RADIO/DISH); replayed in a forked child."""
        self._zf_live()
        super().join(group)
        if self._zf_recipe is not None:
            self._zf_recipe.record_join(group.encode("utf-8") if isinstance(group, str) else group)

    def leave(self, group: Any) -> None:
        """Leave a group (DRAFT RADIO/DISH)."""
        self._zf_live()
        super().leave(group)
        if self._zf_recipe is not None:
            self._zf_recipe.record_leave(group.encode("utf-8") if isinstance(group, str) else group)

    def poll(self, timeout: Optional[int] = None, flags: int = zmq.POLLIN) -> int:
        """Poll this socket for events; see ``zmq.Socket.poll``."""
        self._zf_live()
        return super().poll(timeout, flags)

    @property
    def underlying(self) -> int:
        """The address of the libzmq socket of this process generation (rebuilt first in a child)."""
        self._zf_live()
        return int(_HANDLE.__get__(self))

    # ---- lifecycle -----------------------------------------------------------

    def close(self, linger: Optional[int] = None) -> None:
        """Close the socket, as ``zmq.Socket.close``.

        In a forked child that has not used it, nothing is called in libzmq:
        the inherited socket is let go.
        """
        if self._zf_gen != TOKEN[0]:
            self._zf_mark_inherited()
            self.__dict__.update(_zf_closed=True, _zf_failure=None)
            if self.context:
                self.context._rm_socket(self)
            return
        disown_handle(self, _HANDLE.__get__(self))
        super().close(linger)
        self.__dict__["_zf_closed"] = True

    @property
    def closed(self) -> bool:
        """Whether the socket is closed.  An unused inherited socket is open (it rebuilds on use), unless ``on_fork="close"``."""
        if self._zf_gen != TOKEN[0]:
            return self._zf_closed or self._zf_on_fork == "close"
        return self._zf_closed or bool(super().closed)

    @property
    def on_fork(self) -> str:
        """What this socket does with its binds in a forked child: "reconnect", "rebind" or "close"."""
        return self._zf_on_fork

    def __repr__(self) -> str:
        text = super().__repr__()
        if self._zf_gen != TOKEN[0] and not self.closed:  # pyzmq's says closed: its flag is what marks it stale
            text = text.replace(" closed>", ">")
        return text

    def __reduce__(self) -> Any:
        """Pickled by recipe: unpickled in any process, it rebuilds at first use (see zmqfork._pickling)."""
        return reduce_socket(self)

    def __del__(self) -> None:
        if not let_go_instead_of_del(self):
            super().__del__()


def forget_handle(sock: zmq.Socket[Any]) -> None:
    """Mark a pyzmq socket closed and set its handle to NULL, without calling libzmq."""
    _CLOSED_FLAG.__set__(sock, True)
    if _HANDLE.__get__(sock):
        _null_handle(sock)


def _text(endpoint: Union[str, bytes]) -> str:
    """An endpoint as the recipe keeps it: pyzmq takes bytes too."""
    return endpoint.decode("utf-8", "replace") if isinstance(endpoint, bytes) else endpoint


def _origin_of(shadow: Any) -> Optional[Socket[Any]]:
    """The zmqfork socket that ``shadow`` (a socket or an address) stands for, or None if it is foreign."""
    origin: Optional[Socket[Any]] = origin_in_family(shadow, Socket)
    return origin
