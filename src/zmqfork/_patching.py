"""``zmqfork.patch()``: fork safety for code that uses pyzmq directly (``import zmq``).

While patched, pyzmq's constructors make zmqfork's objects: ``zmq.Context()``
(and ``Context.instance()``, ``Context.shadow`` of a zmqfork context) makes a
``zmqfork.Context``, ``zmq.asyncio.Context()`` a ``zmqfork.asyncio.Context``,
and ``zmq.Socket(...)`` or ``zmq.asyncio.Socket(...)`` on a zmqfork context
(or shadowing a zmqfork socket) the zmqfork socket.  These are subclasses of
pyzmq's classes: the very objects ``import zmqfork as zmq`` makes.  The patch
is a ``__new__`` on ``zmq.Context`` and ``zmq.Socket``, so it reaches code
that imported those names before patching.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import zmq
from zmq.backend import Context as _BackendContext
from zmq.backend import Socket as _BackendSocket

from zmqfork.context import Context, fork_safe_context_class, fork_safe_socket_class
from zmqfork.context import _origin_of as _context_origin
from zmqfork.socket import _origin_of as _socket_origin

__all__ = ["patch", "unpatch"]


def _new_context(cls: type, *args: Any, **kwargs: Any) -> Any:
    # pyzmq's signature: Context(io_threads=1, shadow=0), or Context(other_context).
    shadow = kwargs.get("shadow", 0)
    if args and isinstance(args[0], zmq.Context):
        shadow = args[0]
    elif len(args) > 1:
        shadow = args[1]
    if shadow and _context_origin(shadow) is None:
        return _BackendContext.__new__(cls)  # a shadow of a context zmqfork does not own stays pyzmq's
    return _BackendContext.__new__(fork_safe_context_class(cls))


_pyzmq_instance = zmq.Context.__dict__["instance"].__func__


def _instance(cls: Any, io_threads: int = 1) -> Any:
    # pyzmq's own Context.instance(), on the fork-safe class: zmq.Context.instance() and
    # zmqfork.Context.instance() are one and the same process-wide context while patched.
    return _pyzmq_instance(fork_safe_context_class(cls), io_threads)


def _new_socket(cls: type, *args: Any, **kwargs: Any) -> Any:
    # pyzmq's signatures: Socket(ctx, type, ...), Socket(other_socket), Socket(shadow=...),
    # and zmq.asyncio's Socket(_from_socket=...).
    first = args[0] if args else kwargs.get("ctx_or_socket", kwargs.get("context"))
    shadow = kwargs.get("shadow") or kwargs.get("_from_socket") or (first if isinstance(first, zmq.Socket) else 0)
    ours = _socket_origin(shadow) is not None if shadow else isinstance(first, Context)
    return _BackendSocket.__new__(fork_safe_socket_class(cls) if ours else cls)


# What patch() replaced, to put back: (class, attribute, the class's own value or None).
_saved: List[Tuple[type, str, Optional[Any]]] = []


def patch() -> None:
    """Make pyzmq's constructors return zmqfork's fork-safe objects, for any code, from now on.

    ``zmq.Context()``, ``zmq.Context.instance()``, ``zmq.asyncio.Context()``
    and the sockets they make are zmqfork's; ``isinstance(ctx, zmq.Context)``
    and ``isinstance(sock, zmq.Socket)`` hold, as they are subclasses of
    pyzmq's classes.  Objects made before stay plain pyzmq.  Calling it again
    does nothing; ``unpatch()`` undoes it.
    """
    if _saved:
        return
    replacements = (
        (zmq.Context, "__new__", staticmethod(_new_context)),
        (zmq.Context, "instance", classmethod(_instance)),
        (zmq.Socket, "__new__", staticmethod(_new_socket)),
    )
    for owner, name, value in replacements:
        _saved.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, value)


def unpatch() -> None:
    """Undo ``patch()``: new objects are plain pyzmq again; those made while patched stay fork-safe."""
    while _saved:
        owner, name, original = _saved.pop()
        if original is None:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
