"""The process generation as Python sees it: the token check, per-generation locks, noticing a fork.

A proxy records ``current_token()`` when it builds its pyzmq object and
compares ``TOKEN[0]`` with it before every call; a mismatch means it runs in a
forked child and must rebuild.  The first ``current_token()`` in a child
notices the fork: it runs the ``zmqfork.register_at_fork`` callbacks.
"""

from __future__ import annotations

import threading

from zmqfork._afterfork import run_after_fork_callbacks
from zmqfork._native import TOKEN, refresh

__all__ = ["TOKEN", "current_token", "check_fork", "generation_lock", "STALE"]

#: A token value no process ever has: proxies that must take the slow path on
#: every call (a socket whose rebuild failed) record it.
STALE = -1

_locks: dict[int, threading.RLock] = {}


def current_token() -> int:
    """The token of this process generation, never 0 (re-arms it after a fork without handlers).

    In a child, the first call notices the fork: see ``check_fork``.
    """
    token = TOKEN[0]
    if token and token == _noticed:
        return token
    return _notice_fork()[0]


def check_fork() -> bool:
    """Notice a fork now; True if this process is a child whose fork nothing had noticed yet.

    Noticing a fork runs the ``zmqfork.register_at_fork`` callbacks, in
    registration order, once per child.  zmqfork's own objects notice a fork
    by themselves at their first call in the child: call this where the
    callbacks must run before anything else does, typically first thing after
    a fork made in C.  In the process that imported zmqfork it returns False.
    """
    return _notice_fork()[1]


# The token whose fork was noticed (callbacks done); the one being noticed now.
_noticed = TOKEN[0] or refresh()
_noticing = 0


def _notice_fork() -> tuple[int, bool]:
    """The current token, and whether this call ran the after-fork callbacks for it."""
    global _noticed, _noticing
    token = TOKEN[0] or refresh()
    if token == _noticed:
        return token, False
    # Other threads wait here until the callbacks are done; a callback that
    # calls zmqfork (same thread, re-entrant lock) finds _noticing set.
    with generation_lock(token):
        if token in (_noticed, _noticing):
            return token, False
        _noticing = token
        try:
            run_after_fork_callbacks(token)
        finally:
            _noticed = token
    return token, True


def generation_lock(token: int) -> threading.RLock:
    """The lock that serialises rebuilds in the generation ``token``.

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
