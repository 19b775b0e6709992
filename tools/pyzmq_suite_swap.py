"""pytest plugin: pyzmq's own tests run as if written with ``import zmqfork as zmq``.

Loaded with ``-p pyzmq_suite_swap`` (tools/ on PYTHONPATH) by
tools/pyzmq_suite.py.  Every import statement executed by a module under the
suite's tests/ directory (conftest.py, zmq_test_utils.py, test_*.py, at
module level or inside a function) that names ``zmq`` gets zmqfork instead,
and one that names ``zmq.asyncio`` gets ``zmqfork.asyncio``:

- ``import zmq`` and ``import zmq.<sub>`` bind zmqfork, so ``zmq.Context``,
  ``zmq.Socket``, ``zmq.Poller``, ``zmq.select``, ``zmq.Context.instance()``
  (zmq_test_utils' ``BaseZMQTestCase.Context``, conftest's ``Context``
  fixture), class bodies such as ``Poller = zmq.Poller`` and subclasses such
  as ``class KwargTestContext(zmq.Context)`` all reach zmqfork's classes;
- ``import zmq.asyncio as zaio`` and ``from zmq.asyncio import X`` bind
  zmqfork.asyncio;
- ``from zmq import X`` takes X from zmqfork (pyzmq's object wherever
  zmqfork re-exports pyzmq's, e.g. ``zmq.devices``, ``zmq.auth``);
- ``from zmq.<other> import X`` (zmq.log, zmq.utils.monitor, ...) is pyzmq's.

pyzmq's library and zmqfork's own modules keep seeing pyzmq, as they do for a
user who writes ``import zmqfork as zmq``: rebinding ``zmq.Socket`` on the
module itself would also redirect pyzmq's internal ``isinstance(x,
zmq.Socket)`` checks and zmqfork's own look-ups of pyzmq's classes.
"""

from __future__ import annotations

import builtins
import os
from types import ModuleType
from typing import Any, Callable, Mapping, Optional, Sequence

import zmqfork
import zmqfork.asyncio

_SUITE_DIR = os.path.join(os.path.realpath(os.getcwd()), "tests") + os.sep
_SUBSTITUTES = {"zmq": zmqfork, "zmq.asyncio": zmqfork.asyncio}
_real_import: Callable[..., ModuleType] = builtins.__import__


def _import(
    name: str,
    globals: Optional[Mapping[str, Any]] = None,
    locals: Optional[Mapping[str, Any]] = None,
    fromlist: Optional[Sequence[str]] = (),
    level: int = 0,
) -> ModuleType:
    """``__import__`` that hands zmqfork to the suite's modules where they import zmq."""
    module = _real_import(name, globals, locals, fromlist, level)
    if level != 0 or not (name == "zmq" or name.startswith("zmq.")):
        return module
    origin = (globals or {}).get("__file__") or ""
    if not os.path.realpath(origin).startswith(_SUITE_DIR):
        return module
    if not fromlist:
        return zmqfork  # ``import zmq.x`` binds the top-level name; ``as`` then reads its attribute
    return _SUBSTITUTES.get(name, module)


builtins.__import__ = _import
