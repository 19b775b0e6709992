"""Letting go of pyzmq objects inherited from the parent without calling libzmq.

In a forked child, libzmq objects made by the parent must never be used again
(closing them queues commands no thread will read; terminating can hang).
Marking the pyzmq wrappers closed makes every later pyzmq call on them,
including their ``__del__``, answer from Python alone.
"""

from __future__ import annotations

from typing import Any

import zmq

__all__ = ["abandon_socket", "abandon_context"]


def abandon_socket(sock: zmq.Socket[Any] | None) -> None:
    """Make an inherited pyzmq socket behave as closed, without calling libzmq."""
    if sock is not None:
        sock._closed = True


def abandon_context(ctx: zmq.Context[Any] | None) -> None:
    """Make an inherited pyzmq context and its sockets behave as closed, without calling libzmq."""
    if ctx is None:
        return
    for sock in list(getattr(ctx, "_sockets", None) or ()):
        abandon_socket(sock)
    ctx.closed = True
