"""zmqfork.asyncio: ``zmq.asyncio``'s classes, re-initialised in place in a forked child.

``Socket`` is a ``zmq.asyncio.Socket`` and a ``zmqfork.Socket``: pyzmq's
awaitable API over zmqfork's recipe and rebuild.  In a forked child the
parent's pending awaitables, event loop and selector are left alone (the
child never touches the parent's selector, whose epoll instance it shares);
the first use rebuilds the socket and starts from empty queues, attaching to
whatever loop is running then, typically a fresh ``asyncio.run``.
"""

from __future__ import annotations

from typing import Any, Optional, Type, Union

import zmq
import zmq.asyncio

from zmqfork._asyncsocket import AwaitableSocket
from zmqfork.context import Context as _Context
from zmqfork.socket import Socket as _Socket

__all__ = ["Context", "Socket", "Poller"]


class Socket(AwaitableSocket, zmq.asyncio.Socket, _Socket[Any]):  # type: ignore[misc]
    """A ``zmq.asyncio.Socket`` that stays usable across fork (everything ``zmqfork.Socket`` says holds)."""

    _repr_cls = "zmqfork.asyncio.Socket"


class Context(zmq.asyncio.Context, _Context):
    """A ``zmq.asyncio.Context`` whose sockets are ``zmqfork.asyncio.Socket``; see ``zmqfork.Context``."""

    _repr_cls = "zmqfork.asyncio.Context"
    _socket_class = Socket
    _instance = None  # this class's own, not zmqfork.Context's

    def __init__(
        self,
        io_threads: Union[int, zmq.Context[Any]] = 1,
        shadow: Union[zmq.Context[Any], int] = 0,
        *,
        on_fork: Optional[str] = None,
    ) -> None:
        _Context.__init__(self, io_threads, shadow, on_fork=on_fork)  # not zmq.asyncio's: it would drop on_fork


class Poller(zmq.asyncio.Poller):
    """``zmq.asyncio.Poller``; sockets that are not awaitable are wrapped in ``zmqfork.asyncio.Socket``."""

    _socket_class: Type[Socket] = Socket
