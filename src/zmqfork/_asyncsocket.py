"""The fork-safe layer of pyzmq's awaitable sockets: ``zmq.asyncio``'s, ``zmq.eventloop.future``'s, any ``_AsyncSocket``.

pyzmq's awaitable sockets do their I/O on ``_shadow_sock``, a plain pyzmq
shadow of their own libzmq socket, and watch its descriptor in an event
loop.  ``AwaitableSocket`` goes before such a class in a zmqfork socket's
MRO: every awaitable operation queues through ``_add_recv_event`` or
``_add_send_event``, where the fork check goes first; a rebuilt socket gets
a new shadow, empty queues and no loop (it attaches to the loop running at
its next use); in a forked child the parent's loop, selector and pending
awaitables are left alone.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

import zmq

from zmqfork._auth import restart_waiting_authenticators
from zmqfork._generation import TOKEN
from zmqfork.socket import _HANDLE, forget_handle
from zmqfork.socket import Socket as _Socket

__all__ = ["AwaitableSocket"]


class AwaitableSocket:
    """Mixin, before a ``zmq._future._AsyncSocket`` subclass and ``zmqfork.Socket`` in the MRO."""

    _zf_gen: int
    context: Any
    __dict__: Any

    def _add_recv_event(self, *args: Any, **kwargs: Any) -> Any:
        self._zf_live_in_loop()
        return super()._add_recv_event(*args, **kwargs)  # type: ignore[misc]

    def _add_send_event(self, *args: Any, **kwargs: Any) -> Any:
        self._zf_live_in_loop()
        return super()._add_send_event(*args, **kwargs)  # type: ignore[misc]

    def _zf_live_in_loop(self) -> None:
        self._zf_live()  # type: ignore[attr-defined]
        context = self.context
        if getattr(context, "_zf_authenticators_waiting", None):  # an AsyncioAuthenticator waits for a loop
            restart_waiting_authenticators(context)

    def _zf_mark_inherited(self) -> None:
        super()._zf_mark_inherited()  # type: ignore[misc]
        shadow = self.__dict__.get("_shadow_sock")
        if shadow is not None and not isinstance(shadow, _Socket):  # pyzmq's own shadow of our handle
            forget_handle(shadow)

    def _zf_after_rebuild(self) -> None:
        # What pyzmq's _AsyncSocket.__init__ sets up, for the new libzmq socket.
        # A shadow that is a zmqfork socket (from_socket, patch()) keeps itself current.
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
        """Close the socket: pending awaitables are cancelled, as in pyzmq.

        In a forked child that has not used it, nothing is called in libzmq
        and the parent's event loop is left alone.
        """
        if self._zf_gen != TOKEN[0]:
            _Socket.close(self, linger)  # type: ignore[arg-type]
        else:
            super().close(linger)  # type: ignore[misc]
