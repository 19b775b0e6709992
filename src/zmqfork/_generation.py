"""The process generation as Python sees it: the one fork check, noticing a fork, per-generation locks.

Every zmqfork object records in ``_zf_gen`` the token of the generation
whose libzmq object it holds.  The one fork check is ``not NOTICED_FLAG[0]``:
a byte that every fork clears (zmqfork._native) and ``notice()`` sets again,
so it reads 0 in a forked child until some zmqfork call notices the fork.
It reads no attribute of any object (attribute loads on pyzmq's classes are
slow) and costs one index of a byte, so it is written inline in the hot
path; everything else calls ``notice()``.

Noticing a fork (``notice()``, once per child) re-arms the token, marks every
live zmqfork object's inherited libzmq object closed through pyzmq's own flag
(so no compiled pyzmq method can reach libzmq with it), and runs the
``zmqfork.register_at_fork`` callbacks.  A marked object is *stale*
(``obj._zf_gen != TOKEN[0]``) and rebuilds itself in place at its next use.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, List, Protocol, Tuple

from zmqfork._afterfork import run_after_fork_callbacks
from zmqfork._native import NOTICED_FLAG, TOKEN, refresh

__all__ = ["TOKEN", "NOTICED_FLAG", "NOTICED", "notice", "check_fork", "generation_lock", "adopt", "own_handle", "disown_handle", "family", "origin_in_family",
           "let_go_instead_of_del", "Inherited"]


class Inherited(Protocol):
    """What every zmqfork context and socket provides to ``notice()``."""

    def _zf_mark_inherited(self) -> None:
        """Mark the inherited libzmq object closed without calling libzmq or any user code."""


#: The token whose fork was noticed last (this process's, once NOTICED_FLAG[0] is set).
NOTICED: List[int] = [TOKEN[0] or refresh()]

# Every live zmqfork context and socket, to mark when a fork is noticed: id -> weak reference.
# A dict, not a WeakSet: list(dict.values()) copies atomically under the GIL.
_family: Dict[int, "weakref.ref[Any]"] = {}
# libzmq addresses, this generation's and inherited ones -> the zmqfork object that has or had it.
_by_handle: Dict[int, "weakref.ref[Any]"] = {}
_noticing = 0
_locks: Dict[int, threading.RLock] = {}


def _weakly(table: Dict[int, "weakref.ref[Any]"], key: int, obj: Any) -> None:
    """``table[key]`` = a weak reference to ``obj`` that removes itself, if still there, when ``obj`` dies."""

    def forget(ref: "weakref.ref[Any]") -> None:
        if table.get(key) is ref:
            table.pop(key, None)

    table[key] = weakref.ref(obj, forget)


def adopt(obj: Inherited) -> None:
    """Register a new zmqfork context or socket, so that a forked child marks it stale."""
    _weakly(_family, id(obj), obj)


def own_handle(obj: Any, address: int) -> None:
    """Record that ``obj`` holds the libzmq object at ``address``, for shadows made from the address."""
    if address:
        _weakly(_by_handle, address, obj)


def disown_handle(obj: Any, address: int) -> None:
    """``obj`` is about to close the libzmq object at ``address``, whose memory libzmq may then reuse."""
    ref = _by_handle.get(address)
    if ref is not None and ref() is obj:
        _by_handle.pop(address, None)


def origin_in_family(shadow: Any, cls: type) -> Any:
    """The zmqfork ``cls`` object that ``shadow`` (such an object, or a libzmq address) stands for; None if foreign.

    An address of this generation's libzmq object or of one inherited from
    the parent (taken before the fork) both stand for the object; the address
    of one it closed does not (``disown_handle``: libzmq may reuse it).  A
    shadow of a shadow stands for the first one's origin.
    """
    found: Any = shadow
    if isinstance(shadow, int) and not isinstance(shadow, bool):
        ref = _by_handle.get(shadow)
        found = ref() if ref is not None else None
    if not isinstance(found, cls):
        return None
    origin: Any = found.__dict__.get("_zf_origin")
    return origin or found


def let_go_instead_of_del(obj: Any) -> bool:
    """For ``__del__``: True if pyzmq's ``__del__`` must not run on ``obj``, which this then lets go.

    That is: ``__init__`` failed before anything was built, the interpreter is
    tearing down, or ``obj`` holds an inherited libzmq object (marked closed
    here, never called).
    """
    gen = obj.__dict__.get("_zf_gen")
    if gen is None:
        return True
    try:
        inherited = gen != TOKEN[0]
    except Exception:  # interpreter teardown: module globals may be gone
        return True
    if inherited:
        obj._zf_mark_inherited()
    return bool(inherited)


def family() -> List[Any]:
    """Every live zmqfork context and socket (a copy)."""
    members = (ref() for ref in list(_family.values()))
    return [obj for obj in members if obj is not None]


def notice() -> int:
    """The token of this process generation; in a child, the first call notices the fork.

    Noticing marks every live zmqfork object stale, then runs the after-fork
    callbacks in registration order.  Other threads wait until that is done;
    a callback that calls zmqfork (same thread, re-entrant lock) goes on.
    """
    return _notice()[0]


def check_fork() -> bool:
    """Notice a fork now; True if this process is a child whose fork nothing had noticed yet.

    Noticing a fork runs the ``zmqfork.register_at_fork`` callbacks, in
    registration order, once per child.  zmqfork's own objects notice a fork
    by themselves at their first call in the child: call this where the
    callbacks must run before anything else does, typically first thing after
    a fork made in C.  In the process that imported zmqfork it returns False.
    """
    return _notice()[1]


def _notice() -> Tuple[int, bool]:
    """The current token, and whether this call noticed the fork (marked the family, ran the callbacks)."""
    global _noticing
    token = TOKEN[0] or refresh()
    if token == NOTICED[0]:
        NOTICED_FLAG[0] = 1  # a fork's cleared flag whose token is already noticed
        return token, False
    with generation_lock(token):
        if token in (NOTICED[0], _noticing):
            return token, False
        _noticing = token
        try:
            for obj in family():
                obj._zf_mark_inherited()
            run_after_fork_callbacks(token)
        finally:
            NOTICED[0] = token
            NOTICED_FLAG[0] = 1
    return token, True


def generation_lock(token: int) -> threading.RLock:
    """The lock that serialises noticing and rebuilds in the generation ``token``.

    Locks are made fresh for each generation, so a lock some thread of the
    parent held at fork time can never block the child.  Relies on the GIL
    making ``dict.setdefault`` atomic.
    """
    lock = _locks.get(token)
    if lock is None:
        lock = _locks.setdefault(token, threading.RLock())
        for stale in list(_locks):  # list(dict) copies atomically under the GIL
            if stale != token:
                _locks.pop(stale, None)
    return lock
