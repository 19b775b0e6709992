"""``zmqfork.patch()``: fork safety for code that uses pyzmq directly (``import zmq``).

While patched, ``zmq.Context()``, ``zmq.Context.instance()`` and
``zmq.asyncio.Context()`` make *fork-safe pyzmq objects*: instances of
subclasses of pyzmq's own classes, so ``isinstance(ctx, zmq.Context)`` and
``isinstance(sock, zmq.Socket)`` hold and every pyzmq method is pyzmq's.

How: each fork-safe pyzmq object sits on a zmqfork proxy (``zmqfork.Context``
or ``zmqfork.Socket``) that owns the real libzmq object, records the recipe
and rebuilds in a forked child.  The pyzmq object is a *shadow* of the
proxy's current pyzmq object (pyzmq's ``shadow=`` mechanism).  Calls that
change the recipe (options, connects, binds, monitors, groups) and closing go
through the proxy; the other calls first compare the process token, and in a
child re-run pyzmq's own ``__init__`` so the object shadows the rebuilt
socket, then run pyzmq's method.  The patch itself is a ``__new__`` on
``zmq.Context`` and ``zmq.Socket`` (so it reaches code that imported those
names before patching) and a check of registered sockets in ``Poller.poll``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import zmq
import zmq._future
import zmq.asyncio
from zmq.backend import Context as _BackendContext
from zmq.backend import Socket as _BackendSocket

from zmqfork._abandon import abandon_socket
from zmqfork._generation import TOKEN
from zmqfork.context import Context as _ProxyContext
from zmqfork.socket import Socket as _ProxySocket

__all__ = ["patch", "unpatch", "ForkSafeContext", "ForkSafeSocket", "ForkSafeAsyncContext", "ForkSafeAsyncSocket"]


class _FollowsSocket:
    """Mixin (before a pyzmq socket class): a pyzmq socket that shadows a zmqfork.Socket's live socket."""

    _zf_proxy: _ProxySocket
    _zf_token: int

    def __init__(self, context: Any, socket_type: int = -1, **kwargs: Any) -> None:
        proxy_context = getattr(context, "_zf_proxy", None)
        if not isinstance(proxy_context, _ProxyContext):
            raise TypeError(
                f"{type(self).__name__} needs a context made by zmq.Context() under zmqfork.patch(), "
                f"not {type(context).__name__}"
            )
        if kwargs.pop("io_loop", None) is not None:
            raise TypeError("io_loop is not supported (deprecated by pyzmq): the running loop is used")
        copy_threshold = kwargs.pop("copy_threshold", None)
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(kwargs))}")
        self._zf_proxy = proxy_context.socket(socket_type, copy_threshold=copy_threshold)
        self.context = context
        self._zf_follow()

    def _zf_shadow(self, live: zmq.Socket[Any]) -> None:
        raise NotImplementedError  # pragma: no cover - each concrete class runs its pyzmq __init__

    def _zf_check(self) -> None:
        """In a forked child, rebuild the proxy's socket and shadow the new one."""
        if TOKEN[0] != self._zf_token:
            self._zf_follow()

    def _zf_follow(self) -> None:
        proxy = self._zf_proxy
        live = proxy._live()  # rebuilds in a child; raises what the proxy raises
        context = self.context
        self._zf_token = proxy._token  # first: pyzmq's __init__ below calls get()
        if proxy._closed:  # closed, or on_fork="close" in this child
            abandon_socket(self)  # type: ignore[arg-type]
            return
        self._zf_shadow(live)
        self.context = context

    # ---- calls that go through the proxy (recorded for the child) -----------

    def set(self, option: int, optval: Any) -> None:
        """Set a socket option; it is replayed in a forked child."""
        self._zf_check()
        self._zf_proxy.set(option, optval)

    setsockopt = set

    def connect(self, addr: str) -> Any:
        """Connect to ``addr``; replayed in a forked child.  Returns pyzmq's disconnecting context manager."""
        self._zf_check()
        self._zf_proxy.connect(addr)
        return self._connect_cm(addr)  # type: ignore[attr-defined]

    def disconnect(self, addr: str) -> None:
        """Disconnect from ``addr``."""
        self._zf_check()
        self._zf_proxy.disconnect(addr)

    def bind(self, addr: str) -> Any:
        """Bind to ``addr``; in a forked child as the ``on_fork`` policy says (default: raise on use)."""
        self._zf_check()
        self._zf_proxy.bind(addr)
        return self._bind_cm(addr)  # type: ignore[attr-defined]

    def unbind(self, addr: str) -> None:
        """Unbind from ``addr``."""
        self._zf_check()
        self._zf_proxy.unbind(addr)

    def monitor(self, addr: Optional[str], events: int = zmq.EVENT_ALL) -> None:
        """Start (or, with None, stop) publishing socket events; replayed in a forked child."""
        self._zf_check()
        self._zf_proxy.monitor(addr, events)

    def join(self, group: Any) -> None:
        """Join a group (DRAFT RADIO/DISH); replayed in a forked child."""
        self._zf_check()
        self._zf_proxy.join(group)

    def leave(self, group: Any) -> None:
        """Leave a group (DRAFT RADIO/DISH)."""
        self._zf_check()
        self._zf_proxy.leave(group)

    def close(self, linger: Optional[int] = None) -> None:
        """Close the socket; in a forked child that has not used it, nothing is called in libzmq."""
        proxy = self._zf_proxy
        if TOKEN[0] == self._zf_token and not proxy.closed:
            super().close(linger)  # type: ignore[misc]  # pyzmq's own (asyncio: cancels pending futures)
            abandon_socket(proxy._sock)  # closed just now, through this shadow
        else:
            abandon_socket(self)  # type: ignore[arg-type]
        proxy.close()

    @property
    def closed(self) -> bool:
        """Whether the socket is closed; an unused inherited socket is open: it rebuilds on use."""
        return bool(self._zf_proxy.closed)

    # ---- calls that run pyzmq's method on the current generation's socket ---

    def get(self, option: int) -> Any:
        """Get a socket option; see ``zmq.Socket.get``."""
        self._zf_check()
        return super().get(option)  # type: ignore[misc]

    getsockopt = get

    def send(self, data: Any, flags: int = 0, copy: bool = True, track: bool = False, **kwargs: Any) -> Any:
        """Send one frame; see ``zmq.Socket.send``."""
        self._zf_check()
        return super().send(data, flags, copy, track, **kwargs)  # type: ignore[misc]

    def recv(self, flags: int = 0, copy: bool = True, track: bool = False) -> Any:
        """Receive one frame; see ``zmq.Socket.recv``."""
        self._zf_check()
        return super().recv(flags, copy, track)  # type: ignore[misc]

    def send_multipart(self, msg_parts: Any, flags: int = 0, copy: bool = True, track: bool = False, **kwargs: Any) -> Any:
        """Send a multipart message; see ``zmq.Socket.send_multipart``."""
        self._zf_check()
        return super().send_multipart(msg_parts, flags, copy, track, **kwargs)  # type: ignore[misc]

    def recv_multipart(self, flags: int = 0, copy: bool = True, track: bool = False) -> Any:
        """Receive a multipart message; see ``zmq.Socket.recv_multipart``."""
        self._zf_check()
        return super().recv_multipart(flags, copy, track)  # type: ignore[misc]

    def recv_into(self, buffer: Any, /, *, nbytes: int = 0, flags: int = 0) -> Any:
        """Receive into a buffer; see ``zmq.Socket.recv_into``."""
        self._zf_check()
        return super().recv_into(buffer, nbytes=nbytes, flags=flags)  # type: ignore[misc]

    def poll(self, timeout: Optional[int] = None, flags: int = zmq.POLLIN) -> Any:
        """Poll this socket; see ``zmq.Socket.poll``."""
        self._zf_check()
        return super().poll(timeout, flags)  # type: ignore[misc]

    @property
    def underlying(self) -> int:
        """The address of the libzmq socket of this process generation."""
        self._zf_check()
        return int(super().underlying)  # type: ignore[misc]


class ForkSafeSocket(_FollowsSocket, zmq.Socket[Any]):  # type: ignore[misc]
    """A ``zmq.Socket`` made while patched: rebuilt in a forked child like ``zmqfork.Socket``."""

    def _zf_shadow(self, live: zmq.Socket[Any]) -> None:
        zmq.Socket.__init__(self, shadow=live)


class ForkSafeAsyncSocket(_FollowsSocket, zmq.asyncio.Socket):  # type: ignore[misc]
    """A ``zmq.asyncio.Socket`` made while patched; pending awaitables of the parent stay with the parent."""

    def _zf_shadow(self, live: zmq.Socket[Any]) -> None:
        # pyzmq's own __init__: fresh future queues; the loop is found again on first use.
        zmq.asyncio.Socket.__init__(self, _from_socket=live)  # type: ignore[call-overload]  # _AsyncSocket's
        self._current_loop = None


class _FollowsContext:
    """Mixin (before a pyzmq context class): a pyzmq context that shadows a zmqfork.Context's live context."""

    _zf_proxy: _ProxyContext
    _zf_token: int

    def __init__(self, io_threads: int = 1) -> None:
        proxy = _ProxyContext(io_threads)
        self._zf_proxy = proxy
        self._zf_token = proxy._token
        super().__init__(shadow=proxy._live())  # type: ignore[call-arg]

    def _zf_check(self) -> None:
        if TOKEN[0] != self._zf_token:
            live = self._zf_proxy._live()
            self._zf_token = self._zf_proxy._token
            # Point pyzmq's handle at the child's context; default options and the socket list stay.
            _BackendContext.__init__(self, shadow=live.underlying)  # type: ignore[arg-type]  # a mixin of it

    def socket(self, socket_type: int, socket_class: Any = None, **kwargs: Any) -> Any:
        """Create a socket; fork-safe unless ``socket_class`` is some other pyzmq class."""
        self._zf_check()
        return super().socket(socket_type, socket_class, **kwargs)  # type: ignore[misc]

    def set(self, option: int, optval: Any) -> None:
        """Set a context option; it is replayed on the context of a forked child."""
        self._zf_proxy.set(option, optval)

    def get(self, option: int) -> Any:
        """Get a context option."""
        return self._zf_proxy.get(option)

    def term(self) -> None:
        """Terminate the context; in a forked child that never used it, nothing is called in libzmq."""
        self._zf_proxy.term()
        self.closed = True

    def destroy(self, linger: Optional[int] = None) -> None:
        """Close this context's sockets (with ``linger`` if given), then terminate it."""
        if self.closed:
            return
        for sock in list(getattr(self, "_sockets", None) or ()):
            if not sock.closed:
                sock.close(linger)
        self.term()

    @property
    def underlying(self) -> int:
        """The address of the libzmq context of this process generation."""
        self._zf_check()
        return int(super().underlying)  # type: ignore[misc]


class ForkSafeContext(_FollowsContext, zmq.Context[Any]):
    """A ``zmq.Context`` made while patched; its sockets are ``ForkSafeSocket``."""

    _socket_class = ForkSafeSocket


class ForkSafeAsyncContext(_FollowsContext, zmq.asyncio.Context):
    """A ``zmq.asyncio.Context`` made while patched; its sockets are ``ForkSafeAsyncSocket``."""

    _socket_class = ForkSafeAsyncSocket  # type: ignore[assignment]  # a subclass, as pyzmq expects


# ---- the patch ---------------------------------------------------------------

_CONTEXT_CLASSES: Dict[type, type] = {zmq.Context: ForkSafeContext, zmq.asyncio.Context: ForkSafeAsyncContext}
_SOCKET_CLASSES: Dict[type, type] = {zmq.Socket: ForkSafeSocket, zmq.asyncio.Socket: ForkSafeAsyncSocket}

# What patch() replaced, to put back: (class, attribute, the class's own value or None).
_saved: List[Tuple[type, str, Any]] = []


def _new_context(cls: type, *args: Any, **kwargs: Any) -> Any:
    shadowing = kwargs.get("shadow") or (args and isinstance(args[0], zmq.Context))
    target = _CONTEXT_CLASSES.get(cls) if not shadowing else None
    return _BackendContext.__new__(target or cls)


def _new_socket(cls: type, *args: Any, **kwargs: Any) -> Any:
    context = args[0] if args else kwargs.get("ctx_or_socket", kwargs.get("context"))
    target = _SOCKET_CLASSES.get(cls) if isinstance(context, _FollowsContext) and not kwargs.get("shadow") else None
    return _BackendSocket.__new__(target or cls)


def _checking_poll(poll: Callable[..., Any]) -> Callable[..., Any]:
    def checked_poll(self: zmq.Poller, timeout: Any = None) -> Any:
        for sock, _ in self.sockets:
            if isinstance(sock, _FollowsSocket):
                sock._zf_check()
        return poll(self, timeout)

    checked_poll.__doc__ = poll.__doc__
    checked_poll.__wrapped__ = poll  # type: ignore[attr-defined]
    return checked_poll


def patch() -> None:
    """Make ``zmq.Context()``, ``zmq.Context.instance()``, ``zmq.asyncio.Context()`` and their sockets fork-safe.

    Affects objects made after the call, by any code, including code that did
    ``from zmq import Context`` earlier; objects made before stay plain
    pyzmq.  ``isinstance(ctx, zmq.Context)`` and ``isinstance(sock,
    zmq.Socket)`` stay true.  ``Poller.poll`` (sync and asyncio) rebuilds
    registered fork-safe sockets before polling.  Calling it again does nothing.
    """
    if _saved:
        return
    replacements = [
        (zmq.Context, "__new__", staticmethod(_new_context)),
        (zmq.Socket, "__new__", staticmethod(_new_socket)),
        (zmq.Poller, "poll", _checking_poll(zmq.Poller.poll)),
        (zmq._future._AsyncPoller, "poll", _checking_poll(zmq._future._AsyncPoller.poll)),
    ]
    for owner, name, value in replacements:
        _saved.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, value)


def unpatch() -> None:
    """Undo ``patch()``: new objects are plain pyzmq again; those made while patched stay fork-safe."""
    while _saved:
        owner, name, original = _saved.pop()
        if original is None:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
