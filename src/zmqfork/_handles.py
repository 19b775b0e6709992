"""Forgetting the libzmq handle of a pyzmq socket without calling libzmq or raising.

pyzmq's compiled functions (``zmq_poll``, ``proxy``) read a socket's handle
directly, so an inherited socket must hold NULL there in a forked child.  The
backend's ``Socket.__init__`` sets it to NULL before it refuses a call with no
context (``TypeError``), and that is the portable way; but a raised and caught
exception runs code and makes objects that nothing else in a fresh child
touches, and each page it writes is a copy-on-write fault.  So the handle's
place in the object is found once, at import, by giving a probe socket a
known handle (``shadow=``) and looking for it in the object's memory; where
exactly one place holds it and writing NULL there reads back as NULL through
pyzmq's own ``underlying``, ``forget`` writes NULL there.  Otherwise it takes
the ``TypeError`` way.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from zmq.backend import Socket as _BackendSocket

from zmqfork._native import WORD_SIZE, store_null, words_at

__all__ = ["handle_offset", "nulling_handle"]

#: A handle value no real object has: the probe's, searched for in its memory.
_PROBE_HANDLE = 0x5A17_F00D_5A17_F000

_HANDLE: Any = _BackendSocket.__dict__["underlying"]
_CLOSED_FLAG: Any = _BackendSocket.__dict__["_closed"]


def handle_offset() -> Optional[int]:
    """The offset of the libzmq handle in a backend socket object, or None if it cannot be pinned down."""
    probe = _BackendSocket.__new__(_BackendSocket)
    _BackendSocket.__init__(probe, shadow=_PROBE_HANDLE)  # no libzmq call: a shadow only stores the address
    _CLOSED_FLAG.__set__(probe, True)  # whatever happens below, pyzmq never closes the probe's "socket"
    try:
        words = words_at(id(probe), type(probe).__basicsize__ // WORD_SIZE)
        found = [i for i, word in enumerate(words) if word == _PROBE_HANDLE]
        if len(found) != 1:
            return None
        offset = found[0] * WORD_SIZE
        store_null(id(probe) + offset)
        return offset if _HANDLE.__get__(probe) == 0 else None
    finally:
        if _HANDLE.__get__(probe) != 0:
            _forget_by_init(probe)


def _forget_by_init(sock: Any) -> None:
    context, threshold = sock.context, sock.copy_threshold
    try:  # pyzmq's __init__ sets the handle to NULL first, then refuses: no context given
        _BackendSocket.__init__(sock)
    except TypeError:
        pass
    _BackendSocket.__dict__["context"].__set__(sock, context)
    _BackendSocket.__dict__["copy_threshold"].__set__(sock, threshold)


def nulling_handle(offset: Optional[int]) -> Callable[[Any], None]:
    """A function that sets a backend socket's handle to NULL: by writing at ``offset``, or pyzmq's way if None."""
    if offset is None:
        return _forget_by_init
    return lambda sock: store_null(id(sock) + offset)
