"""zmqfork.asyncio: ``zmq.asyncio``'s classes, re-initialised in place in a forked child.

``Socket`` is a ``zmq.asyncio.Socket`` and a ``zmqfork.Socket``: pyzmq's
awaitable API over zmqfork's recipe and rebuild.  In a forked child the
parent's pending awaitables, event loop and selector are left alone (the
child never touches the parent's selector, whose epoll instance it shares);
the first use rebuilds the socket and starts from empty queues, attaching to
whatever loop is running then, typically a fresh ``asyncio.run``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional, Type, Union

import zmq
import zmq.asyncio

from zmqfork._auth import restart_waiting_authenticators
from zmqfork._generation import TOKEN
from zmqfork.context import Context as _Context
from zmqfork.socket import _CLOSED_FLAG, _HANDLE
from zmqfork.socket import Socket as _Socket

__all__ = ["Context", "Socket", "Poller"]


class Socket(zmq.asyncio.Socket, _Socket[Any]):  # type: ignore[misc]
    """A ``zmq.asyncio.Socket`` that stays usable across fork (everything ``zmqfork.Socket`` says holds)."""

    _repr_cls = "zmqfork.asyncio.Socket"

    # Every awaitable operation (send, recv, poll, their variants and
    # Poller.poll) queues through these two: the fork check goes first.
    def _add_recv_event(self, *args: Any, **kwargs: Any) -> Any:
        self._zf_live_in_loop()
        return super()._add_recv_event(*args, **kwargs)  # type: ignore[misc]

    def _add_send_event(self, *args: Any, **kwargs: Any) -> Any:
        self._zf_live_in_loop()
        return super()._add_send_event(*args, **kwargs)  # type: ignore[misc]

    def _zf_live_in_loop(self) -> None:
        self._zf_live()
        context: Any = self.context
        if getattr(context, "_zf_authenticators_waiting", None):  # an AsyncioAuthenticator waits for a loop
            restart_waiting_authenticators(context)

    def _zf_mark_inherited(self) -> None:
        super()._zf_mark_inherited()
        shadow = self.__dict__.get("_shadow_sock")
        if shadow is not None and not isinstance(shadow, _Socket):  # pyzmq's own shadow of our handle
            _CLOSED_FLAG.__set__(shadow, True)

    def _zf_after_rebuild(self) -> None:
        # What zmq.asyncio.Socket.__init__ sets up, for the new libzmq socket:
        # I/O goes through _shadow_sock, which a zmqfork socket keeps current itself.
        shadow: Any = self.__dict__.get("_shadow_sock")  # none yet in an unpickled socket
        if not isinstance(shadow, _Socket):
            shadow = zmq.Socket.shadow(_HANDLE.__get__(self))
        self.__dict__.update(
            _shadow_sock=shadow,
            _recv_futures=deque(),
            _send_futures=deque(),
            _state=0,
            _current_loop=None,
            _fd=shadow.FD,
        )

    def close(self, linger: Optional[int] = None) -> None:
        """Close the socket: pending awaitables are cancelled, as in ``zmq.asyncio``.

        In a forked child that has not used it, nothing is called in libzmq
        and the parent's event loop is left alone.
        """
        if self._zf_gen != TOKEN[0]:
            _Socket.close(self, linger)
        else:
            super().close(linger)


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
        on_fork: str = "reconnect",
    ) -> None:
        _Context.__init__(self, io_threads, shadow, on_fork=on_fork)  # not zmq.asyncio's: it would drop on_fork


class Poller(zmq.asyncio.Poller):
    """``zmq.asyncio.Poller``; sockets that are not awaitable are wrapped in ``zmqfork.asyncio.Socket``."""

    _socket_class: Type[Socket] = Socket
