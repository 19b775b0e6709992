"""What multiprocessing children run in tests/test_pickling.py: importable by name, as spawn and forkserver need.

Each child reports ``<tag> <pid>`` on a zmqfork REQ socket it was handed and
waits for the parent's answer, so that a report counts only once it arrived.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import zmq

import zmqfork

_worker_socket: Optional[Any] = None


def report(sock: Any, tag: str) -> int:
    """Send ``tag`` and this pid on ``sock`` (a REQ), wait for the answer; return the pid."""
    sock.send_string(f"{tag} {os.getpid()}")
    if sock.recv() != b"ok":
        raise AssertionError("the parent did not answer ok")
    return os.getpid()


def init_worker(sock: Any) -> None:
    """A pool worker's initializer: keep the socket it was handed, and report once."""
    global _worker_socket
    _worker_socket = sock
    report(sock, "init")


def task(tag: str) -> int:
    """A pool task: report on the socket the initializer kept."""
    assert _worker_socket is not None, "the initializer did not run"
    return report(_worker_socket, tag)


class TaggedSocket(zmq.Socket):  # type: ignore[type-arg]
    """A library's own socket class, passed as ``socket_class``: zmqfork makes a fork-safe twin of it."""


class LibraryContext(zmq.Context):  # type: ignore[type-arg]
    """A library's own context class: under ``zmqfork.patch()``, a fork-safe twin of it is made."""


def report_as_tagged(sock: Any, tag: str) -> int:
    """``report``, once ``sock`` is checked to have come back a fork-safe TaggedSocket."""
    if not (isinstance(sock, TaggedSocket) and isinstance(sock, zmqfork.Socket)):
        raise AssertionError(f"unpickled as {type(sock).__mro__}")
    return report(sock, tag)
