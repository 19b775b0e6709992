"""Errors zmqfork adds to pyzmq's; both are ``zmq.ZMQError`` subclasses."""

from __future__ import annotations

import errno as _errno
from typing import Sequence

import zmq

__all__ = ["InheritedBindError", "RebuildError"]


class InheritedBindError(zmq.ZMQError):
    """A socket that was bound in the parent was used in a forked child under ``on_fork="reconnect"``.

    Binds belong to the parent: replaying one would steal an ipc endpoint or
    fail on a tcp port.  ``endpoints`` lists the parent's bound endpoints.
    """

    def __init__(self, endpoints: Sequence[str]) -> None:
        self.endpoints = tuple(endpoints)
        super().__init__(
            _errno.EADDRINUSE,
            "this socket was bound in the parent process to "
            f"{', '.join(self.endpoints)}; binds are not replayed in a forked child. "
            "Create the socket after the fork, or pass on_fork=\"rebind\" to "
            "bind again in the child.",
        )


class RebuildError(zmq.ZMQError):
    """Replaying a socket's recipe in a forked child failed; ``step`` says which step."""

    def __init__(self, step: str, cause: zmq.ZMQError) -> None:
        self.step = step
        super().__init__(cause.errno, f"rebuilding the socket in a forked child failed at {step}: {cause}")
