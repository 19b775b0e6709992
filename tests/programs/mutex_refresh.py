"""A guarded mutex after a raw fork: reset only if its holder is not a thread of the child.

    mutex_refresh.py HOLDER   (HOLDER: "parent" - a parent thread holds it at the fork;
                                       "child" - a thread the child starts holds it)

zmqfork resets registered mutexes in a child (pyzmq's collector mutex).  After
a fork that skipped the handlers the reset comes at the child's first zmqfork
call, when the child may have started threads: a mutex one of them holds must
be left alone; one a parent thread held must be reset.  Prints one JSON line:
whether the child's main thread can take the mutex after its first zmqfork call.
"""

from __future__ import annotations

import ctypes
import errno
import json
import sys
import threading

from zmqfork import _native
from forking import run_in_child

holder = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
mutex = ctypes.create_string_buffer(64)
attr = ctypes.create_string_buffer(16)
PTHREAD_MUTEX_RECURSIVE = 1
assert libc.pthread_mutexattr_init(attr) == 0
assert libc.pthread_mutexattr_settype(attr, PTHREAD_MUTEX_RECURSIVE) == 0
assert libc.pthread_mutex_init(mutex, attr) == 0
_native.guard_recursive_mutex(ctypes.addressof(mutex))


def hold(taken: threading.Event, release: threading.Event) -> None:
    assert libc.pthread_mutex_lock(mutex) == 0
    taken.set()
    release.wait(30)
    libc.pthread_mutex_unlock(mutex)


def start_holder() -> threading.Event:
    taken, release = threading.Event(), threading.Event()
    threading.Thread(target=hold, args=(taken, release), daemon=True).start()
    assert taken.wait(10), "the holder never took the mutex"
    return release


def child() -> str:
    release = start_holder() if holder == "child" else None
    _native.refresh()  # the first zmqfork call after the raw fork: the deferred reset
    rc = libc.pthread_mutex_trylock(mutex)
    if rc == 0:
        libc.pthread_mutex_unlock(mutex)
    if release is not None:
        release.set()
    return "taken" if rc == 0 else "busy" if rc == errno.EBUSY else f"error {rc}"


release = start_holder() if holder == "parent" else None
try:
    print(json.dumps({"main_thread": run_in_child(child, kind="raw", timeout=30)}))
finally:
    if release is not None:
        release.set()
