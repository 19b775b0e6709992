"""The application asks for signals on a socket libzmq's object made.

    app_signal_on_libzmq_socket.py OBJECT KIND   (KIND: os, libc or raw)

The object (hooktarget.c) makes a socket pair, both tracked.  The application
turns on O_ASYNC for one end (F_SETOWN to itself, F_SETSIG to a signal of its
own choosing, as signal-driven I/O does): a write to the other end must reach
its handler with that signal.  Then, in a child forked by KIND, that end must
be closed like every descriptor of libzmq's (the application's F_SETSIG must
not hide it), or else be counted as untracked.  Prints one JSON line.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import sys

import zmqfork
from zmqfork import _native
from forking import descriptor_fate, run_in_child

F_SETSIG = 10
path, kind = sys.argv[1], sys.argv[2]
lib = ctypes.CDLL(path)
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
pair = (ctypes.c_int * 2)()
assert lib.t_socketpair(socket.AF_UNIX, socket.SOCK_STREAM, pair) == 0
mine, other = pair[0], pair[1]
assert _native.fdtrack_is_tracked(mine) and _native.fdtrack_is_tracked(other)

wake_r, wake_w = os.pipe()
my_signal = signal.SIGRTMIN + 6
signal.signal(my_signal, lambda *_: os.write(wake_w, b"s"))
fcntl.fcntl(mine, fcntl.F_SETOWN, os.getpid())
fcntl.fcntl(mine, F_SETSIG, my_signal)
fcntl.fcntl(mine, fcntl.F_SETFL, fcntl.fcntl(mine, fcntl.F_GETFL) | os.O_ASYNC | os.O_NONBLOCK)
os.write(other, b"x")
signalled = bool(select.select([wake_r], [], [], 10)[0])
fcntl.fcntl(mine, fcntl.F_SETFL, fcntl.fcntl(mine, fcntl.F_GETFL) & ~os.O_ASYNC)
before = _native.fdtrack_counts()["untracked"]


def child() -> object:
    if kind == "raw":
        zmqfork.generation()  # no handler ran: the first zmqfork call cleans up
    return descriptor_fate(mine, before)


print(json.dumps({"handler_ran": signalled, "child": run_in_child(child, kind=kind)}))
