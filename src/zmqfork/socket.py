"""zmqfork.Socket: a pyzmq socket that rebuilds itself when it finds itself in a forked child.

In the process that made it, a Socket is a thin proxy over a ``zmq.Socket``.
In a forked child, its first call notices the fork (one memory load), lets the
inherited pyzmq socket go without calling libzmq, and builds a fresh socket in
a fresh context, replaying the recipe: options, subscriptions, connects and
monitors in their original order, and binds according to ``on_fork``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import zmq
from zmq.backend import Socket as _BackendSocket

from zmqfork import _log
from zmqfork._abandon import abandon_socket
from zmqfork._generation import STALE, TOKEN, current_token, generation_lock
from zmqfork._options import add_option_properties, option_for_attribute
from zmqfork._policy import check_policy
from zmqfork._recipe import SocketRecipe
from zmqfork.errors import InheritedBindError, RebuildError

if TYPE_CHECKING:
    from zmqfork.context import Context

__all__ = ["Socket"]


# The compiled backend's send and recv: pyzmq's own Socket.send is a Python
# method that only adds routing_id/group handling on top of it.
_backend_send = _BackendSocket.send
_backend_recv = _BackendSocket.recv
_PyzmqSocket = zmq.Socket


@add_option_properties
class Socket:
    """A ZeroMQ socket that stays usable across fork.

    Made by ``zmqfork.Context.socket(socket_type, on_fork=None)``.  It has the
    whole synchronous ``zmq.Socket`` API and raises pyzmq's errors.

    In the parent it behaves exactly as a ``zmq.Socket``.  In a forked child
    the first call rebuilds it (see ``on_fork``); messages queued in the
    parent stay with the parent.
    """

    _ctx: Context
    _sock: zmq.Socket[Any]
    _token: int
    _type: int
    _on_fork: str
    _recipe: SocketRecipe
    _closed: bool
    _failure: Optional[zmq.ZMQError]
    _monitor_socket: Optional[Socket] = None
    _shadow = False

    def __init__(
        self,
        context: Context,
        socket_type: int,
        *,
        on_fork: Optional[str] = None,
        copy_threshold: Optional[int] = None,
    ) -> None:
        from zmqfork.context import Context

        if not isinstance(context, Context):
            raise TypeError(
                f"zmqfork.Socket needs a zmqfork.Context, not {type(context).__name__}; "
                "use zmqfork.Context().socket(socket_type)"
            )
        policy = context.on_fork if on_fork is None else check_policy(on_fork)
        token = current_token()
        if copy_threshold is None:
            sock = context._current(token).socket(socket_type)
        else:
            sock = context._current(token).socket(socket_type, copy_threshold=copy_threshold)
        self.__dict__.update(
            _ctx=context,
            _sock=sock,
            _token=token,
            _type=sock.type,
            _on_fork=policy,
            _recipe=SocketRecipe(),
            _closed=False,
            _failure=None,
        )

    # ---- generation check and rebuild -----------------------------------

    def _live(self) -> zmq.Socket[Any]:
        """The pyzmq socket of this process generation, rebuilt if needed."""
        if TOKEN[0] != self._token:
            self._refresh()
        return self._sock

    def _refresh(self) -> None:
        if self._failure is not None:
            raise self._failure
        token = current_token()
        if token == self._token:
            return
        with generation_lock(token):
            if token != self._token:
                self._rebuild(token)

    def _rebuild(self, token: int) -> None:
        inherited = self._sock
        abandon_socket(inherited)
        if self._closed or self._on_fork == "close":
            # Keep the abandoned socket: it raises what a closed pyzmq socket raises.
            self._closed = True
            self._token = token
            _log.debug("zmqfork: %r closed in forked child (on_fork=%r)", self, self._on_fork)
            return
        rebind = self._on_fork == "rebind"
        bound = self._recipe.bound_endpoints()
        if bound and not rebind:
            self._fail(InheritedBindError(bound))
        sock = self._ctx._current(token).socket(self._type, copy_threshold=inherited.copy_threshold)
        try:
            self._recipe.replay(sock, rebind=rebind)
        except RebuildError as exc:
            sock.close(linger=0)
            self._fail(exc)
        self._sock = sock
        self._token = token
        _log.debug("zmqfork: rebuilt %r in forked child from %r", self, self._recipe)

    def _fail(self, error: zmq.ZMQError) -> None:
        """Make every later call raise ``error`` (until close), and raise it now."""
        self._failure = error
        self._token = STALE
        raise error

    def _drop_inherited(self) -> bool:
        """In a child that has not rebuilt this socket, let the inherited one go; True if it did."""
        if TOKEN[0] == self._token and self._failure is None:
            return False
        abandon_socket(self._sock)
        self._token = current_token()
        self._failure = None
        return True

    # ---- the hot path ------------------------------------------------------

    def send(
        self,
        data: Any,
        flags: int = 0,
        copy: bool = True,
        track: bool = False,
        routing_id: Optional[int] = None,
        group: Optional[str] = None,
    ) -> Optional[zmq.MessageTracker]:
        """Send one message frame; see ``zmq.Socket.send``."""
        if TOKEN[0] != self._token:
            self._refresh()
        if routing_id is None and group is None:
            return _backend_send(self._sock, data, flags, copy, track)
        return self._sock.send(data, flags, copy, track, routing_id, group)  # type: ignore[no-any-return]

    def recv(self, flags: int = 0, copy: bool = True, track: bool = False) -> Any:
        """Receive one message frame; see ``zmq.Socket.recv``."""
        if TOKEN[0] != self._token:
            self._refresh()
        return _backend_recv(self._sock, flags, copy, track)

    # ---- calls that change the recipe --------------------------------------

    def set(self, option: int, optval: Any) -> None:
        """Set a socket option; it is replayed in a forked child."""
        self._live().set(option, optval)
        self._recipe.record_option(option, optval)

    setsockopt = set

    def get(self, option: int) -> Any:
        """Get a socket option; see ``zmq.Socket.get``."""
        return self._live().get(option)

    getsockopt = get

    def connect(self, addr: str) -> Any:
        """Connect to ``addr``; the connect is replayed in a forked child.

        Returns a context manager that disconnects on exit, as pyzmq does.
        """
        self._live().connect(addr)
        self._recipe.record_connect(addr)
        return self._connect_cm(addr)  # type: ignore[misc]  # pyzmq's, run on this proxy

    def disconnect(self, addr: str) -> None:
        """Disconnect from ``addr``; the connect is then no longer replayed."""
        self._live().disconnect(addr)
        self._recipe.record_disconnect(addr)

    def bind(self, addr: str) -> Any:
        """Bind to ``addr``.  Binds belong to the parent: see ``on_fork``.

        Returns a context manager that unbinds on exit, as pyzmq does.
        """
        sock = self._live()
        sock.bind(addr)
        resolved = sock.get(zmq.LAST_ENDPOINT)
        self._recipe.record_bind(addr, resolved.decode("utf-8", "replace") if isinstance(resolved, bytes) else addr)
        return self._bind_cm(addr)  # type: ignore[misc]  # pyzmq's, run on this proxy

    def unbind(self, addr: str) -> None:
        """Unbind from ``addr``."""
        self._live().unbind(addr)
        self._recipe.record_unbind(addr)

    def monitor(self, addr: Optional[str], events: int = zmq.EVENT_ALL) -> None:
        """Start (or, with ``addr=None``, stop) publishing socket events on a PAIR at ``addr``."""
        self._live().monitor(addr, events)
        self._recipe.record_monitor(addr, events)

    def join(self, group: Any) -> None:
        """Join a group (DRAFT RADIO/DISH); replayed in a forked child."""
        self._live().join(group)
        self._recipe.record_join(group.encode("utf-8") if isinstance(group, str) else group)

    def leave(self, group: Any) -> None:
        """Leave a group (DRAFT RADIO/DISH)."""
        self._live().leave(group)
        self._recipe.record_leave(group.encode("utf-8") if isinstance(group, str) else group)

    # ---- lifecycle -----------------------------------------------------------

    def close(self, linger: Optional[int] = None) -> None:
        """Close the socket.

        In a forked child that has not used it, closing calls nothing in
        libzmq: the inherited socket is simply let go.
        """
        if self._closed:
            return
        if not self._drop_inherited():
            self._sock.close(linger)
        self._closed = True
        self._ctx._forget(self)

    @property
    def closed(self) -> bool:
        """Whether the socket is closed.  An unused inherited socket is open: it rebuilds on use."""
        if self._closed:
            return True
        if TOKEN[0] != self._token:
            if self._on_fork == "close" and self._failure is None:
                self._refresh()
                return True
            return False
        closed: bool = self._sock.closed
        return closed

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *args: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # Never let pyzmq's __del__ reach libzmq with an inherited socket.
        sock = self.__dict__.get("_sock")
        try:
            if sock is not None and TOKEN[0] != self._token:
                abandon_socket(sock)
        except Exception:  # interpreter teardown: module globals may be gone
            pass

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        try:
            name = zmq.SocketType(self._type).name
        except ValueError:
            name = str(self._type)
        return f"<zmqfork.Socket(zmq.{name}) at {hex(id(self))}{state}>"

    # ---- plain attributes --------------------------------------------------

    @property
    def context(self) -> Context:
        """The zmqfork Context this socket belongs to."""
        return self._ctx

    @property
    def type(self) -> zmq.SocketType:
        """The socket type."""
        return zmq.SocketType(self._type)

    socket_type = type

    @property
    def on_fork(self) -> str:
        """What this socket does with its binds in a forked child: "reconnect", "rebind" or "close"."""
        return self._on_fork

    @property
    def underlying(self) -> int:
        """The address of the libzmq socket of this process generation."""
        return int(self._live().underlying)

    @property
    def copy_threshold(self) -> int:
        """Messages smaller than this are always copied, as in pyzmq."""
        return int(self._live().copy_threshold)

    @copy_threshold.setter
    def copy_threshold(self, value: int) -> None:
        self._live().copy_threshold = value

    def __setattr__(self, key: str, value: Any) -> None:
        """Attributes are options, as in pyzmq: ``sock.linger = 0``, ``sock.subscribe = b"topic"``."""
        if key in self.__dict__ or key.lower() not in ("subscribe", "unsubscribe") and any(
            key in klass.__dict__ or key in klass.__dict__.get("__annotations__", {}) for klass in type(self).__mro__
        ):
            object.__setattr__(self, key, value)
            return
        option = option_for_attribute(type(self).__name__, key)
        if option in (zmq.SUBSCRIBE, zmq.UNSUBSCRIBE) and isinstance(value, str):
            value = value.encode("utf-8")
        self.set(option, value)

    def poll(self, timeout: Optional[int] = None, flags: int = zmq.POLLIN) -> int:
        """Poll this socket for events; see ``zmq.Socket.poll``."""
        return self._live().poll(timeout, flags)

    def recv_into(self, buffer: Any, /, *, nbytes: int = 0, flags: int = 0) -> int:
        """Receive into a buffer; see ``zmq.Socket.recv_into``."""
        return int(self._live().recv_into(buffer, nbytes=nbytes, flags=flags))

    # ---- pyzmq's own conveniences, run on top of this proxy ------------------
    # These are pyzmq's functions, not copies: they call self.send/recv/set/
    # get/bind/connect, which are the fork-safe methods above.
    _connect_cm = _PyzmqSocket._connect_cm
    _bind_cm = _PyzmqSocket._bind_cm
    _deserialize = _PyzmqSocket._deserialize
    send_multipart = _PyzmqSocket.send_multipart
    recv_multipart = _PyzmqSocket.recv_multipart
    send_serialized = _PyzmqSocket.send_serialized
    recv_serialized = _PyzmqSocket.recv_serialized
    send_string = _PyzmqSocket.send_string
    recv_string = _PyzmqSocket.recv_string
    send_unicode = _PyzmqSocket.send_string
    recv_unicode = _PyzmqSocket.recv_string
    send_pyobj = _PyzmqSocket.send_pyobj
    recv_pyobj = _PyzmqSocket.recv_pyobj
    send_json = _PyzmqSocket.send_json
    recv_json = _PyzmqSocket.recv_json
    set_string = _PyzmqSocket.set_string
    get_string = _PyzmqSocket.get_string
    setsockopt_string = setsockopt_unicode = _PyzmqSocket.set_string
    getsockopt_string = getsockopt_unicode = _PyzmqSocket.get_string
    subscribe = _PyzmqSocket.subscribe
    unsubscribe = _PyzmqSocket.unsubscribe
    bind_to_random_port = _PyzmqSocket.bind_to_random_port
    get_hwm = _PyzmqSocket.get_hwm
    set_hwm = _PyzmqSocket.set_hwm
    hwm = _PyzmqSocket.hwm
    fileno = _PyzmqSocket.fileno
    get_monitor_socket = _PyzmqSocket.get_monitor_socket
    disable_monitor = _PyzmqSocket.disable_monitor
