"""Keeping pyzmq's zero-copy garbage collector from hanging a forked child.

Freeing a zero-copy ``zmq.Frame`` runs pyzmq's C callback, which takes a
recursive pthread mutex (``zmq.utils.garbage.gc._push_mutex``) before telling
pyzmq's collector thread.  If another thread of the parent held that mutex at
the moment of fork, a child freeing an inherited Frame would wait forever: the
holder does not exist there.  zmqfork registers every such mutex with its C
module, which resets it to unlocked in the child (in the atfork child handler,
or at the first zmqfork call after a fork that skipped the handlers).

pyzmq allocates the mutex lazily and again after its collector restarts in a
child, so the collector's ``_push_mutex`` attribute is watched: a property on a
subclass of pyzmq's GarbageCollector registers each value stored there.
"""

from __future__ import annotations

from typing import Any, Optional

from zmqfork import _native

__all__ = ["guard_pyzmq_gc", "UNGUARDED_REASON"]


def _register(address: Any) -> None:
    if address:
        _native.guard_recursive_mutex(int(address))


def guard_pyzmq_gc() -> Optional[str]:
    """Watch pyzmq's collector mutex; returns None, or why it cannot be watched."""
    try:
        from zmq.utils import garbage
    except ImportError as exc:  # pragma: no cover - pyzmq always has it today
        return f"pyzmq has no zmq.utils.garbage ({exc})"
    collector = garbage.gc
    base = type(collector)
    if "_push_mutex" not in vars(collector):
        return "pyzmq's garbage collector keeps no _push_mutex: nothing to guard"
    if getattr(base, "_zmqfork_guarded", False):
        return None

    class GuardedGarbageCollector(base):  # type: ignore[misc,valid-type]
        """pyzmq's GarbageCollector, registering each push mutex with zmqfork."""

        _zmqfork_guarded = True

        @property
        def _push_mutex(self) -> Any:
            return self.__dict__.get("_zmqfork_push_mutex")

        @_push_mutex.setter
        def _push_mutex(self, value: Any) -> None:
            _register(value)
            self.__dict__["_zmqfork_push_mutex"] = value

    current = vars(collector).pop("_push_mutex")
    collector.__class__ = GuardedGarbageCollector
    collector._push_mutex = current
    return None


#: None when pyzmq's collector mutex is guarded, else why not (done at import).
UNGUARDED_REASON = guard_pyzmq_gc()
