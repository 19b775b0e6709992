"""pyzmq's compiled functions that read a socket's libzmq handle, made fork-aware.

``zmq_poll`` (behind ``zmq.Poller``, ``zmq.select`` and ``Socket.poll``),
``proxy``, ``proxy_steerable`` (behind ``zmq.device`` and ``zmq.devices``) and
``monitored_queue`` read the handle of each socket they are given straight
from the compiled object: no Python method of the socket runs.  In a forked
child, a zmqfork socket that has not been used yet still holds the parent's
handle, which must never reach libzmq.

At import, zmqfork replaces these functions, in pyzmq's own modules, by
wrappers that first rebuild every stale zmqfork socket they are handed,
then call pyzmq's function.  In the process that imported zmqfork (no fork
noticed) a wrapper costs one comparison and a call; other objects pass
through untouched.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Iterable

from zmqfork._generation import NOTICED, NOTICED_FLAG, TOKEN, notice
from zmqfork.socket import Socket

__all__ = ["install"]

# No zmqfork socket can be stale before the first fork is noticed.
_IMPORTED_IN = NOTICED[0]


def _revive(objects: Iterable[Any]) -> None:
    """Rebuild every stale zmqfork socket among ``objects`` (noticing a fork first if needed)."""
    if not NOTICED_FLAG[0]:
        notice()
    token = TOKEN[0]
    if token == _IMPORTED_IN:
        return
    for obj in objects:
        if isinstance(obj, Socket) and obj._zf_gen != token:
            obj._zf_live()


def _sockets_as_arguments(function: Callable[..., Any]) -> Callable[..., Any]:
    """For proxy-like functions: every argument may be a socket."""

    @functools.wraps(function)
    def fork_aware(*args: Any, **kwargs: Any) -> Any:
        _revive((*args, *kwargs.values()))
        return function(*args, **kwargs)

    return fork_aware


def _sockets_in_poll_items(function: Callable[..., Any]) -> Callable[..., Any]:
    """For zmq_poll: the first argument is a list of (socket, events) pairs."""

    @functools.wraps(function)
    def fork_aware(sockets: Any, *args: Any, **kwargs: Any) -> Any:
        _revive(item[0] for item in sockets)
        return function(sockets, *args, **kwargs)

    return fork_aware


_WRAPPERS = {
    "zmq_poll": _sockets_in_poll_items,
    "proxy": _sockets_as_arguments,
    "proxy_steerable": _sockets_as_arguments,
    "monitored_queue": _sockets_as_arguments,
}


def install() -> None:
    """Put the fork-aware wrappers wherever pyzmq's modules hold the compiled functions (once)."""
    import zmq.backend

    for name, wrap in _WRAPPERS.items():
        original = getattr(zmq.backend, name, None)
        if original is None or hasattr(original, "__wrapped__"):
            continue
        wrapper = wrap(original)
        for module_name, module in list(sys.modules.items()):
            if module is not None and (module_name == "zmq" or module_name.startswith("zmq.")):
                if getattr(module, name, None) is original:
                    setattr(module, name, wrapper)
