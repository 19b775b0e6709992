"""Closing libzmq's descriptors in a forked child: the hooks are installed when this module is imported.

zmqfork interposes on the descriptor calls of the loaded libzmq (see
``csrc/fdtrack_hooks.c``) and keeps a table of the descriptors it owns.  In a child,
before any other code runs, those descriptors are closed with ``close()``:
the parent keeps its sockets, listeners and connections to itself, and the
child's descriptor count does not grow with each generation.  Descriptors the
application opened itself are never touched.

Installed once, at import of ``zmqfork``, before any zmqfork Context exists.
Descriptors of pyzmq contexts made before that are not tracked.
"""

from __future__ import annotations

import importlib.machinery
import sys
from typing import NamedTuple, Optional, Tuple

import zmq  # noqa: F401  - loads pyzmq's backend, whose libzmq is hooked

from zmqfork import _native

__all__ = ["DescriptorTracking", "backend_path", "install", "state"]

# pyzmq's compiled backends, in the order pyzmq prefers them.
_BACKEND_MODULES = ("zmq.backend.cython._zmq", "zmq.backend.cffi._cffi")

_skipped_reason: Optional[str] = None


class DescriptorTracking(NamedTuple):
    """Whether libzmq's descriptors are tracked, where, and what was closed.

    ``reason`` says why tracking is off (None when on).  ``object`` is the
    loaded file whose calls are hooked (pyzmq's bundled libzmq, a system
    libzmq, or the backend itself when libzmq is linked into it).  ``tracked``
    counts the descriptors libzmq owns now; ``closed_last`` those closed in
    this process by the cleanup after the fork that made it; ``closed_total``
    those closed by every cleanup in this process and its ancestors;
    ``untracked`` libzmq's descriptors that may survive into a child, in this
    process and its ancestors: those that did not fit the table, those a table
    found untrustworthy had to forget (a hooked close() slot held something
    else), those a cleanup after a fork that skipped the handlers could not
    identify, and calls in flight at a fork that did not wait for them;
    ``cleanup_ns`` how long this process's cleanup took.  The five counters
    are the fields of csrc/zmqfork.h's struct zmqfork_fdtrack_counts, in its
    order.
    """

    on: bool
    reason: Optional[str]
    object: Optional[str]
    functions: Tuple[str, ...]
    tracked: int
    closed_last: int
    closed_total: int
    untracked: int
    cleanup_ns: int


def backend_path() -> Optional[str]:
    """The file of pyzmq's loaded compiled backend, or None if none is loaded."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for name in _BACKEND_MODULES:
        path = getattr(sys.modules.get(name), "__file__", None)
        if isinstance(path, str) and path.endswith(suffixes):
            return path
    return None


def install() -> None:
    """Install the descriptor hooks unless ``$ZMQFORK_DISABLE`` names ``fdtrack``; never raises.

    Only the first install in a process does anything; the outcome is
    reported by ``state()`` and ``zmqfork.detection()``.
    """
    global _skipped_reason
    if "fdtrack" in _native.disabled_features():
        _skipped_reason = f"disabled by ${_native.DISABLE_ENV}"
        return
    path = backend_path()
    if path is None:
        _skipped_reason = "pyzmq's compiled backend (cython _zmq or cffi _cffi) is not loaded"
        return
    _native.fdtrack_install(path)


def state() -> DescriptorTracking:
    """The current state of descriptor tracking in this process."""
    status = _native.fdtrack_status()
    on = status == _native.FDTRACK_ON
    if on:
        reason = None
    elif status == _native.FDTRACK_NOT_INSTALLED and _skipped_reason is not None:
        reason = _skipped_reason
    else:
        reason = _native.fdtrack_reason()
    return DescriptorTracking(
        on=on,
        reason=reason,
        object=_native.fdtrack_object(),
        functions=_native.fdtrack_functions(),
        **_native.fdtrack_counts(),
    )


install()
