"""Fork-safe ZeroMQ: ``import zmqfork as zmq``.

``Context`` and ``Socket`` are zmqfork's subclasses of pyzmq's: in a forked
child, wherever the fork came from, they re-initialise themselves in place on
new libzmq objects.  Every other name (``Poller``, ``select``, ``proxy``,
constants, ``ZMQError``, ``Frame``, ...) is pyzmq's own; pyzmq's functions
that read a socket's handle (``zmq_poll``, ``proxy``, ...) are made
fork-aware at import (see ``zmqfork._compiled``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import zmq as _zmq

if TYPE_CHECKING:  # a type checker keeps a name's first binding: zmqfork's, before the star import
    from zmqfork.context import Context as Context
    from zmqfork.socket import Socket as Socket
from zmq import *  # type: ignore[assignment]  # noqa: F401,F403  - pyzmq's other names, re-exported unchanged

from zmqfork import _descriptors  # noqa: F401  - hooks libzmq's descriptor calls, before any Context
from zmqfork import _pyzmq_gc  # noqa: F401  - pyzmq's zero-copy collector mutex is reset in children
from zmqfork._auth import watch_authenticators as _watch_authenticators
from zmqfork._compiled import install as _install_fork_aware_functions

from zmqfork._afterfork import register_at_fork
from zmqfork._generation import check_fork
from zmqfork._policy import POLICIES
from zmqfork._report import Detection, detection, generation
from zmqfork._threads import ForeignThread, foreign_threads
from zmqfork._version import __version__
from zmqfork.context import Context as Context  # replaces pyzmq's at run time
from zmqfork.errors import InheritedBindError, RebuildError
from zmqfork.socket import Socket as Socket

__all__ = [
    *(name for name in _zmq.__all__ if name not in {"Context", "Socket"}),
    "Context",
    "Socket",
    "InheritedBindError",
    "RebuildError",
    "POLICIES",
    "Detection",
    "detection",
    "generation",
    "ForeignThread",
    "foreign_threads",
    "register_at_fork",
    "check_fork",
    "patch",
    "unpatch",
    "__version__",
]

_install_fork_aware_functions()
_watch_authenticators()

if TYPE_CHECKING:
    from zmqfork._patching import patch, unpatch

# Loaded on first use: patching imports asyncio (and with it ssl, subprocess,
# ...), which would make every process that imports zmqfork bigger and so
# every fork slower.
_LAZY = {"patch": "zmqfork._patching", "unpatch": "zmqfork._patching", "asyncio": "zmqfork.asyncio"}


def __getattr__(name: str) -> Any:
    """Names pyzmq resolves lazily (submodules, DRAFT names) are pyzmq's, except zmqfork's own ``asyncio``."""
    if name in _LAZY:  # never hand out pyzmq's zmq.asyncio, which is not fork-safe
        module = importlib.import_module(_LAZY[name])
        return module if name == "asyncio" else getattr(module, name)
    return getattr(_zmq, name)
