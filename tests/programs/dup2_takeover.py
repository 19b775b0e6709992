"""The application dup2()s a file onto a number libzmq's object holds.

    dup2_takeover.py OBJECT KIND TAKEOVER   (KIND: os, libc or raw)

TAKEOVER says what the object made and what the application puts there:
``file`` (a socket, replaced by a file of the application's), ``eventfd`` (an
eventfd, replaced by an eventfd of the application's: the same anonymous
inode) or ``other-socket`` (a socket, replaced by a dup of another socket the
object made: a description libzmq made, but not the one at that number).  The
dup2 closes the object's descriptor without the wrapper seeing it.  In a child
forked by KIND the number must still hold what the application put there.
Prints one JSON line.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
import tempfile

import zmqfork
from zmqfork import _native
from forking import run_in_child

path, kind, takeover = sys.argv[1], sys.argv[2], sys.argv[3]
lib = ctypes.CDLL(path)
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
number = lib.t_eventfd(0, 0) if takeover == "eventfd" else lib.t_socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
assert number >= 0 and _native.fdtrack_is_tracked(number)
with tempfile.TemporaryFile() as handle:
    if takeover == "file":
        handle.write(b"mine")
        handle.flush()
        mine = handle.fileno()
    elif takeover == "eventfd":
        mine = os.eventfd(int.from_bytes(b"mine", "little"))
    else:
        mine = os.dup(lib.t_socket(socket.AF_UNIX, socket.SOCK_STREAM, 0))
    expected = os.fstat(mine).st_ino
    os.dup2(mine, number)

    def child() -> object:
        if kind == "raw":
            zmqfork.generation()  # no handler ran: the first zmqfork call cleans up
        try:
            if takeover == "file":
                return os.pread(number, 4, 0).decode()
            if takeover == "eventfd":
                return os.eventfd_read(number).to_bytes(4, "little").decode()
            return "mine" if os.fstat(number).st_ino == expected else "another file"
        except OSError as exc:
            return repr(exc)

    print(json.dumps({"child_reads": run_in_child(child, kind=kind), "still_listed": _native.fdtrack_is_tracked(number)}))
