"""The threads of this process that are not libzmq's: what a fork leaves to the application.

Python 3.12+ warns at ``os.fork()`` in any process with more than one thread,
and a libzmq context alone has two (``ZMQbg/IO/0``, ``ZMQbg/Reaper``).  zmqfork
covers libzmq's threads; ``foreign_threads()`` lists the others, whose state at
fork (locks held, work half done) stays the application's concern.
"""

from __future__ import annotations

import os
import re
import threading
from typing import NamedTuple, Tuple

__all__ = ["ForeignThread", "foreign_threads", "is_libzmq_thread_name"]

# libzmq names its threads "ZMQbg/IO/<n>" and "ZMQbg/Reaper", after
# "<THREAD_NAME_PREFIX>/" if the context has one; the kernel keeps 15 bytes.
_LIBZMQ_NAME = re.compile(r"(?:^|/)ZMQbg(?:/|$)")


class ForeignThread(NamedTuple):
    """A thread of this process that is not libzmq's: its kernel thread id and its name.

    ``name`` is the ``threading.Thread`` name when Python knows the thread,
    else the name the kernel has for it (``/proc/self/task/<tid>/comm``).
    """

    tid: int
    name: str


def is_libzmq_thread_name(name: str) -> bool:
    """Whether a kernel thread name is one libzmq gives its background threads (``ZMQbg/...``)."""
    return _LIBZMQ_NAME.search(name) is not None


def foreign_threads() -> Tuple[ForeignThread, ...]:
    """The threads of this process other than the calling one and libzmq's, in tid order.

    Empty when the calling thread forks a process whose only other threads
    are libzmq's: then Python 3.12+'s "This process ... is multi-threaded"
    DeprecationWarning at ``os.fork()`` is about libzmq's threads alone, which
    zmqfork covers (see the README, "Threads at fork").  Anything listed is
    the application's (or another library's): locks it holds at the fork are
    copied held into the child.  libzmq's threads are recognised by the name
    they give themselves, a moment after libzmq starts them (at a context's
    first socket); on a platform without ``/proc`` nothing can be listed and
    the result is empty.
    """
    me = threading.get_native_id()
    python_names = {thread.native_id: thread.name for thread in threading.enumerate()}
    try:
        tids = sorted(int(entry) for entry in os.listdir("/proc/self/task"))
    except OSError:
        return ()
    found = []
    for tid in tids:
        if tid == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as handle:
                kernel_name = handle.read().rstrip("\n")
        except OSError:
            continue  # the thread ended meanwhile
        if not is_libzmq_thread_name(kernel_name):
            found.append(ForeignThread(tid, python_names.get(tid, kernel_name)))
    return tuple(found)
