"""Another library's close() hook that does not chain to zmqfork's wrapper, in a RELRO GOT page.

    foreign_close.py OBJECT   (hooktarget.c + gotslot.c + foreignclose.c, -fno-plt, full RELRO)

A descriptor the object made is tracked; the foreign hook then closes it
without the wrapper seeing it, and the application gets the number back for
an eventfd of its own (the same anonymous inode, so only the slot check can
tell).  A forked child must not close it.  Prints one JSON line.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

from zmqfork import _native
from forking import run_in_child

path = sys.argv[1]
lib = ctypes.CDLL(path)
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
fd = lib.t_eventfd(0, 0)
assert _native.fdtrack_is_tracked(fd)
assert lib.fc_install() == 0, "could not install the foreign hook"
assert lib.t_close(fd) == 0 and lib.fc_calls() == 1  # through the foreign hook: the wrapper never saw it
stale = _native.fdtrack_is_tracked(fd)
app = os.eventfd(0)
assert app == fd, (app, fd)  # the application gets the number back


def child() -> dict:
    try:
        os.eventfd_write(app, 5)
        works = os.eventfd_read(app) == 5
    except OSError as exc:
        works = repr(exc)
    return {"works": works, "untracked": _native.fdtrack_counts()["untracked"]}


print(json.dumps({"stale_in_parent": stale, **run_in_child(child, kind="os")}))
