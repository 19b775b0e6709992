"""Letting go of pyzmq objects inherited from the parent without calling libzmq.

In a forked child, libzmq objects made by the parent must never be used again
(closing them queues commands no thread will read; terminating can hang).
Marking the pyzmq wrappers closed makes every later pyzmq call on them,
including their ``__del__``, answer from Python alone.  The flags are set
through the compiled classes' own descriptors: pyzmq's ``__setattr__`` walks
the class hierarchy, which in a fresh child costs page copies on every step.

A context's sockets are not walked: every socket zmqfork makes belongs to a
proxy, which lets go of its own socket when it rebuilds, closes or is freed.
"""

from __future__ import annotations

from typing import Any

import zmq
from zmq.backend import Context as _BackendContext
from zmq.backend import Socket as _BackendSocket

__all__ = ["abandon_socket", "abandon_context"]


def abandon_socket(sock: zmq.Socket[Any] | None) -> None:
    """Make an inherited pyzmq socket behave as closed, without calling libzmq."""
    if sock is not None:
        _SOCKET_CLOSED.__set__(sock, True)


def abandon_context(ctx: zmq.Context[Any] | None) -> None:
    """Make an inherited pyzmq context behave as closed, without calling libzmq."""
    if ctx is not None:
        _CONTEXT_CLOSED.__set__(ctx, True)


_SOCKET_CLOSED: Any = _BackendSocket.__dict__["_closed"]
_CONTEXT_CLOSED: Any = _BackendContext.__dict__["closed"]
