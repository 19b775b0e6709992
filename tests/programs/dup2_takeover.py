"""The application dup2()s its own file onto a number libzmq's object holds.

    dup2_takeover.py OBJECT KIND MADE   (KIND: os, libc or raw; MADE: socket or eventfd)

The object (hooktarget.c) makes a socket or an eventfd, which is tracked; the
application then dup2()s a file of its own onto that number (for an eventfd,
an eventfd of its own: the same anonymous inode), which closes the object's
descriptor without the wrapper seeing it.  In a child forked by KIND the
number must still be the application's file.  Prints one JSON line.
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

path, kind, made = sys.argv[1], sys.argv[2], sys.argv[3]
lib = ctypes.CDLL(path)
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
number = lib.t_socket(socket.AF_UNIX, socket.SOCK_STREAM, 0) if made == "socket" else lib.t_eventfd(0, 0)
assert number >= 0 and _native.fdtrack_is_tracked(number)
with tempfile.TemporaryFile() as handle:
    if made == "socket":
        handle.write(b"mine")
        handle.flush()
        mine = handle.fileno()
    else:
        mine = os.eventfd(int.from_bytes(b"mine", "little"))
    os.dup2(mine, number)

    def child() -> object:
        if kind == "raw":
            zmqfork.generation()  # no handler ran: the first zmqfork call cleans up
        try:
            if made == "socket":
                return os.pread(number, 4, 0).decode()
            return os.eventfd_read(number).to_bytes(4, "little").decode()
        except OSError as exc:
            return repr(exc)

    print(json.dumps({"child_reads": run_in_child(child, kind=kind), "still_listed": _native.fdtrack_is_tracked(number)}))
