"""zmqfork.asyncio: fork-safe ``zmq.asyncio``, awaitable sockets that rebuild themselves in a forked child.

``Context``, ``Socket`` and ``Poller`` mirror ``zmq.asyncio``'s: ``send``,
``recv``, ``*_multipart``, ``*_json``, ``*_pyobj``, ``*_string`` and ``poll``
return awaitables.  A Socket is a ``zmqfork.Socket`` (same recipe, same
rebuild, same ``on_fork`` policies) that, in each process generation, keeps a
``zmq.asyncio.Socket`` shadowing that generation's pyzmq socket and lets it do
the asynchronous work.  In a forked child, the parent's shadow (and the event
loop it was attached to) is let go untouched; the child's first call makes a
new shadow, which attaches to the loop running then, typically a fresh
``asyncio.run``.
"""

from __future__ import annotations

from typing import Any, Awaitable, ClassVar, Dict, List, Optional, Tuple, Type

import zmq
import zmq.asyncio

from zmqfork._abandon import abandon_socket
from zmqfork._generation import TOKEN
from zmqfork.context import Context as _Context
from zmqfork.socket import Socket as _Socket

__all__ = ["Context", "Socket", "Poller"]


class Socket(_Socket):
    """A ZeroMQ socket with ``zmq.asyncio.Socket``'s awaitable API that stays usable across fork.

    Made by ``zmqfork.asyncio.Context().socket(socket_type, on_fork=None)``.
    Everything ``zmqfork.Socket`` says about forks holds; the I/O methods
    return awaitables, as in ``zmq.asyncio``.  Pending awaitables of the
    parent stay with the parent.
    """

    # This generation's zmq.asyncio shadow of the live pyzmq socket, made on first use.
    _aio: Optional[zmq.asyncio.Socket] = None

    def _aio_socket(self) -> zmq.asyncio.Socket:
        """The ``zmq.asyncio.Socket`` over this generation's pyzmq socket (rebuilding that first if needed)."""
        live = self._live()
        if self._closed:
            raise zmq.ZMQError(zmq.ENOTSUP)
        aio = self._aio
        if aio is None or _shadowed(aio) is not live:
            if aio is not None:
                # The parent's shadow: its event loop and its libzmq socket are not ours to touch.
                abandon_socket(aio)
            aio = self._aio = zmq.asyncio.Socket.from_socket(live)
        return aio

    # ---- awaitable I/O, done by pyzmq's zmq.asyncio.Socket -------------------

    def send(  # type: ignore[override]
        self, data: Any, flags: int = 0, copy: bool = True, track: bool = False, **kwargs: Any
    ) -> Awaitable[Optional[zmq.MessageTracker]]:
        """Send one message frame; an awaitable, see ``zmq.asyncio.Socket.send``."""
        return self._aio_socket().send(data, flags, copy, track, **kwargs)

    def recv(self, flags: int = 0, copy: bool = True, track: bool = False) -> Awaitable[Any]:
        """Receive one message frame; an awaitable, see ``zmq.asyncio.Socket.recv``."""
        return self._aio_socket().recv(flags, copy, track)

    def send_multipart(  # type: ignore[override]
        self, msg_parts: Any, flags: int = 0, copy: bool = True, track: bool = False, **kwargs: Any
    ) -> Awaitable[Optional[zmq.MessageTracker]]:
        """Send a multipart message; an awaitable, see ``zmq.asyncio.Socket.send_multipart``."""
        return self._aio_socket().send_multipart(msg_parts, flags, copy, track, **kwargs)

    def recv_multipart(  # type: ignore[override]
        self, flags: int = 0, copy: bool = True, track: bool = False
    ) -> Awaitable[List[Any]]:
        """Receive a multipart message; an awaitable, see ``zmq.asyncio.Socket.recv_multipart``."""
        return self._aio_socket().recv_multipart(flags, copy, track)

    def recv_into(self, buffer: Any, /, *, nbytes: int = 0, flags: int = 0) -> Awaitable[int]:  # type: ignore[override]
        """Receive into a buffer; an awaitable of the byte count, see ``zmq.asyncio.Socket.recv_into``."""
        return self._aio_socket().recv_into(buffer, nbytes=nbytes, flags=flags)

    def poll(self, timeout: Optional[int] = None, flags: int = zmq.POLLIN) -> Awaitable[int]:  # type: ignore[override]
        """Poll this socket for events; an awaitable of the event mask, see ``zmq.asyncio.Socket.poll``."""
        poll: Any = self._aio_socket().poll  # pyzmq's stub types it as the Poller's
        return poll(timeout, flags)  # type: ignore[no-any-return]

    def get(self, option: int) -> Any:
        """Get a socket option; reading ``zmq.EVENTS`` wakes pending awaitables, as in ``zmq.asyncio``."""
        return self._aio_socket().get(option)

    getsockopt = get

    def _deserialize(self, recvd: Any, load: Any) -> Any:
        # pyzmq's recv_json/recv_pyobj/recv_string/recv_serialized call this
        # with the awaitable from recv: chain the decoding onto it.
        return self._aio_socket()._deserialize(recvd, load)

    # ---- lifecycle -------------------------------------------------------------------

    def close(self, linger: Optional[int] = None) -> None:
        """Close the socket: pending awaitables are cancelled, as in ``zmq.asyncio``.

        In a forked child that has not used it, closing calls nothing in
        libzmq and leaves the parent's event loop alone.
        """
        aio = self._aio
        if aio is not None and not self._closed and TOKEN[0] == self._token and _shadowed(aio) is self._sock:
            # pyzmq's own close: cancels pending futures, leaves the loop, closes the libzmq socket.
            aio.close(linger)
            abandon_socket(self._sock)  # closed just now, through its shadow
        super().close(linger)

    def __repr__(self) -> str:
        return "<zmqfork.asyncio" + super().__repr__()[len("<zmqfork") :]


def _shadowed(aio: zmq.asyncio.Socket) -> Any:
    """The pyzmq socket a zmq.asyncio.Socket made by ``from_socket`` does its I/O on."""
    return aio._shadow_sock


class Context(_Context):
    """A ZeroMQ context whose sockets are awaitable (``zmqfork.asyncio.Socket``) and stay usable across fork.

    ``Context(io_threads=1, on_fork="reconnect")``, as ``zmqfork.Context``.
    """

    _instance: ClassVar[Optional[_Context]] = None
    _socket_class: ClassVar[Type[_Socket]] = Socket

    def __repr__(self) -> str:
        return "<zmqfork.asyncio" + super().__repr__()[len("<zmqfork") :]


class Poller(zmq.Poller):
    """An asyncio poller over zmqfork sockets (awaitable or not), pyzmq sockets and file descriptors.

    ``await poller.poll(timeout)`` answers with the objects that were
    registered, as ``zmq.asyncio.Poller`` does; a zmqfork socket rebuilt in a
    forked child is still reported as itself.
    """

    async def poll(self, timeout: Optional[int] = -1) -> List[Tuple[Any, int]]:  # type: ignore[override]
        """Wait up to ``timeout`` milliseconds (-1 or None: forever) for events."""
        inner = zmq.asyncio.Poller()
        registered: Dict[int, Any] = {}
        for obj, flags in self.sockets:
            if isinstance(obj, Socket):
                live: Any = obj._aio_socket()
            elif isinstance(obj, _Socket):
                live = obj._live()
            else:
                live = obj
            registered[id(live)] = obj
            inner.register(live, flags)
        events = await inner.poll(timeout)
        return [(registered.get(id(live), live), mask) for live, mask in events]
