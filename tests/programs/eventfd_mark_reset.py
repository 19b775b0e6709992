"""The application resets the signal of libzmq's eventfd (F_SETSIG 0, the default).

    eventfd_mark_reset.py KIND   (KIND: os, libc or raw)

The eventfd (a zmqfork socket's FD) then lacks zmqfork's mark, so a child
forked by KIND cannot tell it from an eventfd of the application's at that
number: it must leave it open and count it as untracked, never leave it
uncounted.  Prints one JSON line.
"""

from __future__ import annotations

import fcntl
import json
import sys

import zmq

import zmqfork
from zmqfork import _native
from forking import descriptor_fate, run_in_child

F_SETSIG = 10
kind = sys.argv[1]
ctx = zmqfork.Context()
sock = ctx.socket(zmq.PAIR)
number = sock.FD
assert _native.fdtrack_is_tracked(number)
fcntl.fcntl(number, F_SETSIG, 0)
before = _native.fdtrack_counts()["untracked"]


def child() -> object:
    if kind == "raw":
        zmqfork.generation()  # no handler ran: the first zmqfork call cleans up
    return descriptor_fate(number, before)


print(json.dumps({"child": run_in_child(child, kind=kind)}))
ctx.destroy(linger=0)
