"""Forgetting the libzmq handle of a pyzmq socket or context without calling libzmq or raising.

pyzmq's compiled functions (``zmq_poll``, ``proxy``) read a socket's handle
directly, so an inherited socket or context must hold NULL there in a forked
child.  pyzmq's own ways do it without calling libzmq (the backend's
``Socket.__init__`` sets it to NULL before it refuses a call with no context,
``Context.term()`` of a context marked closed only forgets it), but they run
code, and a raised and caught exception makes objects, that nothing else in
a fresh child touches: each page they write is a copy-on-write fault.  So the
handle's place in the object is found once, at import, by giving a probe a
known handle (``shadow=``) and looking for it in the probe's memory; where
exactly one place holds it and writing NULL there reads back as NULL through
pyzmq's own ``underlying``, the handle is forgotten by writing NULL there.
Otherwise pyzmq's way is taken.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from zmq.backend import Context as _BackendContext
from zmq.backend import Socket as _BackendSocket

from zmqfork._native import WORD_SIZE, store_null, words_at

__all__ = ["handle_offset", "nulling_handle"]

#: A handle value no real object has: the probe's, searched for in its memory.
_PROBE_HANDLE = 0x5A17_F00D_5A17_F000

#: Each backend class's pyzmq member that marks an object closed.
_CLOSED_MEMBER: dict[Any, str] = {_BackendSocket: "_closed", _BackendContext: "closed"}


def handle_offset(cls: Any) -> Optional[int]:
    """The offset of the libzmq handle in an object of the backend class ``cls``, or None if it cannot be pinned down."""
    probe = cls.__new__(cls)
    cls.__init__(probe, shadow=_PROBE_HANDLE)  # no libzmq call: a shadow only stores the address
    cls.__dict__[_CLOSED_MEMBER[cls]].__set__(probe, True)  # whatever happens below, pyzmq never frees it
    underlying = cls.__dict__["underlying"]
    try:
        words = words_at(id(probe), cls.__basicsize__ // WORD_SIZE)
        found = [i for i, word in enumerate(words) if word == _PROBE_HANDLE]
        if len(found) != 1:
            return None
        offset = found[0] * WORD_SIZE
        store_null(id(probe) + offset)
        return offset if underlying.__get__(probe) == 0 else None
    finally:
        if underlying.__get__(probe) != 0:
            _PYZMQS_WAY[cls](probe)


def _socket_by_init(sock: Any) -> None:
    context, threshold = sock.context, sock.copy_threshold
    try:  # pyzmq's __init__ sets the handle to NULL first, then refuses: no context given
        _BackendSocket.__init__(sock)
    except TypeError:
        pass
    _BackendSocket.__dict__["context"].__set__(sock, context)
    _BackendSocket.__dict__["copy_threshold"].__set__(sock, threshold)


def _context_by_term(ctx: Any) -> None:
    _BackendContext.__dict__["closed"].__set__(ctx, True)
    _BackendContext.term(ctx)  # closed: pyzmq only forgets the handle (no zmq_ctx_destroy)


_PYZMQS_WAY: dict[Any, Callable[[Any], None]] = {_BackendSocket: _socket_by_init, _BackendContext: _context_by_term}


def nulling_handle(cls: Any) -> Callable[[Any], None]:
    """A function that sets the handle of an object of the backend class ``cls`` to NULL, calling no libzmq."""
    offset = handle_offset(cls)
    if offset is None:
        return _PYZMQS_WAY[cls]
    return lambda obj: store_null(id(obj) + offset)
