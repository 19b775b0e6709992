"""The process generation as Python sees it: the token check and per-generation locks.

A proxy records ``current_token()`` when it builds its pyzmq object and
compares ``TOKEN[0]`` with it before every call; a mismatch means it runs in a
forked child and must rebuild.
"""

from __future__ import annotations

import threading

from zmqfork._native import TOKEN, refresh

__all__ = ["TOKEN", "current_token", "generation_lock", "STALE"]

#: A token value no process ever has: proxies that must take the slow path on
#: every call (a socket whose rebuild failed) record it.
STALE = -1

_locks: dict[int, threading.RLock] = {}


def current_token() -> int:
    """The token of this process generation, never 0 (re-arms it after a fork without handlers)."""
    token = TOKEN[0]
    return token if token else refresh()


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
