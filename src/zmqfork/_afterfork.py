"""Callbacks for forked children, whatever made the fork: ``zmqfork.register_at_fork``.

``os.register_at_fork`` hooks run only after ``os.fork()``.  A fork made in C
(a C extension, ctypes, a prefork server's master) or by a raw clone syscall
runs no Python code in the child, and its atfork handler has no GIL, so the
callbacks registered here run later: in the child, at the first zmqfork call
that notices the fork (``zmqfork._generation.current_token``), or at an
explicit ``zmqfork.check_fork()``.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

from zmqfork import _log
from zmqfork._native import TOKEN, refresh

__all__ = ["register_at_fork", "run_after_fork_callbacks"]


# (callback, token of the generation that registered it), in registration order.
_callbacks: List[Tuple[Callable[[], object], int]] = []


def register_at_fork(*, after_in_child: Callable[[], object]) -> None:
    """Call ``after_in_child()`` in every process forked from this one (and their children).

    Mirrors ``os.register_at_fork(after_in_child=...)``, but also sees forks
    made by libc ``fork()`` from C and by the raw clone syscall.  Callbacks run
    in the child, in registration order, once per child, before the first
    zmqfork call that notices the fork or at ``zmqfork.check_fork()``; never
    in the process that registered them.  An exception in one is logged on
    the ``zmqfork`` logger and the others still run.

    Forks are seen as far as ``zmqfork.detection()`` says: a raw clone only
    with wipe-on-fork.  For ``before`` and ``after_in_parent`` hooks, use
    ``os.register_at_fork``: those run in the parent, where Python already
    sees every ``os.fork()``.
    """
    if not callable(after_in_child):
        raise TypeError(f"after_in_child must be callable, not {type(after_in_child).__name__}")
    _callbacks.append((after_in_child, TOKEN[0] or refresh()))


def run_after_fork_callbacks(token: int) -> None:
    """Run, in registration order, every callback registered by an ancestor of generation ``token``.

    Called once per generation by ``current_token()``, under that
    generation's lock.  A callback registered in this very generation (after
    the fork, before it was noticed) is for this process's children only.
    """
    for callback, registered_in in list(_callbacks):
        if registered_in == token:
            continue
        try:
            callback()
        except Exception:
            _log.exception("zmqfork: after-fork callback %r raised in the child", callback)
