"""Pickling by recipe: a zmqfork socket or context travels to another process as what rebuilds it.

A pickled Context is its class (for a fork-safe twin of a library's class,
that class: ``asked_for``), I/O threads, ``on_fork`` policy, context
options and default socket options; a pickled Socket is its class, type,
``on_fork`` policy, copy threshold, recipe and its Context (pickled once per
pickle, so sockets of one Context pickled together share one context after
unpickling).  Unpickling builds nothing: the objects come back exactly like
objects inherited across fork, and rebuild at first use in whatever process
uses them (binds follow ``on_fork``: by default ``InheritedBindError`` on use).
That holds in the process that pickled them too: a round trip gives new,
independent objects.  (``copy.copy`` and ``copy.deepcopy`` stay pyzmq's: a
shadow.)

Refused when pickling, with the reason: a closed socket or context, a shadow
of a socket zmqfork does not own, an object whose class has an ``__init__``
other than pyzmq's and zmqfork's (what it set up would not travel), a socket
with an ``inproc://`` endpoint or a monitor (inproc lives in one process's
context), and option values that are not plain bytes, str or numbers.  CURVE
and PLAIN secrets travel in the pickle; they never appear in a repr or an
error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, Type
from weakref import WeakSet

import zmq

from zmqfork._generation import adopt
from zmqfork._recipe import SocketRecipe, Step

if TYPE_CHECKING:
    from zmqfork.context import Context
    from zmqfork.socket import Socket

__all__ = ["reduce_context", "reduce_socket"]

#: A generation token no process ever has: unpickled objects are stale until used.
_NEVER = 0

_PLAIN_VALUES = (bytes, str, int, float)


def asked_for(cls: type) -> type:
    """The class a fork-safe twin was made for (``cls`` itself if it is none): the one pickle can name."""
    return cls.__dict__.get("_zf_asked_for", cls)  # type: ignore[no-any-return]


def _check_no_own_init(owner: Any) -> None:
    """Refuse an object whose class has an ``__init__`` other than pyzmq's and zmqfork's: its setup would not travel."""
    for klass in type(owner).__mro__:
        if "__init__" in vars(klass) and klass.__module__.partition(".")[0] not in ("zmq", "zmqfork", "builtins"):
            raise TypeError(
                f"cannot pickle {owner!r}: its class has an __init__ of its own "
                f"({klass.__module__}.{klass.__qualname__}), and only the recipe travels, not what that __init__ "
                "set up; pickle a socket or context of a class that only adds methods, or give the class __reduce__"
            )


def reduce_context(ctx: Context) -> Tuple[Callable[..., Context], Tuple[Any, ...]]:
    """``Context.__reduce__``: the state that makes an equivalent context in any process."""
    if ctx.closed:
        raise TypeError(f"cannot pickle {ctx!r}: it is terminated")
    origin = ctx._zf_origin
    if origin is not None:
        return reduce_context(origin)
    if ctx._shadow:
        raise TypeError(f"cannot pickle {ctx!r}: it shadows a libzmq context zmqfork does not own")
    _check_no_own_init(ctx)
    options = dict(ctx._zf_options)
    defaults = dict(ctx.sockopts)
    _check_plain(ctx, [*options.items(), *defaults.items()])
    return _unpickle_context, (asked_for(type(ctx)), ctx._zf_io_threads, ctx.on_fork, options, defaults)


def reduce_socket(sock: Socket[Any]) -> Tuple[Callable[..., Socket[Any]], Tuple[Any, ...]]:
    """``Socket.__reduce__``: the recipe and its Context (pickled once per pickle)."""
    if sock.closed:
        raise TypeError(f"cannot pickle {sock!r}: it is closed")
    recipe = sock._zf_recipe
    if recipe is None:
        raise TypeError(f"cannot pickle {sock!r}: it shadows a libzmq socket zmqfork does not own")
    _check_no_own_init(sock)
    for step in recipe.steps:
        if step.kind == "monitor":
            raise TypeError(f"cannot pickle {sock!r}: it has a monitor ({step.describe()}), which lives in this process")
        if step.endpoint.startswith("inproc://"):
            raise TypeError(
                f"cannot pickle {sock!r}: {step.describe()} is an inproc endpoint, which lives in one "
                "process's context; use tcp:// or ipc:// for sockets that travel"
            )
    _check_plain(sock, [(step.option, step.value) for step in recipe.steps if step.kind == "set"])
    origin = sock._zf_origin
    cls = asked_for(type(sock))
    if origin is not None:
        return _unpickle_shadow, (cls, origin)
    return _unpickle_socket, (cls, sock.context, sock._zf_type, sock._zf_on_fork, sock.copy_threshold,
                              [tuple(step) for step in recipe.steps])


def _check_plain(owner: Any, options: Any) -> None:
    for option, value in options:
        if not isinstance(value, _PLAIN_VALUES):
            raise TypeError(
                f"cannot pickle {owner!r}: option {option} holds a {type(value).__name__}; "
                "only bytes, str, int and float option values travel"
            )


def _unpickle_context(asked: Type[zmq.Context[Any]], io_threads: int, on_fork: str, options: Dict[int, Any],
                      defaults: Dict[int, Any]) -> Context:
    from zmqfork.context import fork_safe_context_class

    cls = fork_safe_context_class(asked)
    ctx = cls.__new__(cls)
    ctx._zf_mark_inherited()  # no libzmq context yet: pyzmq's compiled methods refuse until rebuilt
    ctx._zf_init(_NEVER, io_threads, on_fork, options, None)
    ctx.__dict__.update(sockopts=defaults, _sockets=WeakSet())  # what pyzmq's __init__ sets
    adopt(ctx)
    return ctx


def _unpickle_socket(cls: Type[zmq.Socket[Any]], ctx: Context, socket_type: int, on_fork: str, copy_threshold: int,
                     steps: Any) -> Socket[Any]:
    recipe = SocketRecipe()
    recipe.steps = [Step(*step) for step in steps]
    sock = _new_stale_socket(cls, ctx, socket_type, on_fork, recipe, None)
    sock.copy_threshold = copy_threshold
    return sock


def _unpickle_shadow(cls: Type[zmq.Socket[Any]], origin: Socket[Any]) -> Socket[Any]:
    sock = _new_stale_socket(cls, origin.context, origin._zf_type,  # type: ignore[arg-type]  # zmqfork's
                             origin._zf_on_fork, origin._zf_recipe, origin)
    sock.__dict__["_shadow"] = True
    return sock


def _new_stale_socket(asked: Type[zmq.Socket[Any]], ctx: Context, socket_type: int, on_fork: str,
                      recipe: Optional[SocketRecipe], origin: Optional[Socket[Any]]) -> Socket[Any]:
    """A socket object with no libzmq socket yet, as an inherited one is: it rebuilds at first use."""
    from zmqfork.context import fork_safe_socket_class

    cls = fork_safe_socket_class(asked)
    sock = cls.__new__(cls)
    sock._zf_mark_inherited()  # pyzmq's compiled methods refuse it until it is rebuilt
    sock._zf_init(_NEVER, socket_type, on_fork, recipe, origin)
    kind = zmq.SocketType(socket_type)
    sock.__dict__.update(type=kind, _type_name=kind.name)  # what pyzmq's __init__ sets
    sock.context = ctx
    ctx._add_socket(sock)
    adopt(sock)
    return sock
