"""A raw clone(CLONE_FILES) child: memory of its own, the parent's descriptor table.

    clone_files_child.py VIA   (VIA: zmqfork or libzmq: the child's first call)

Without CLONE_VM the child's token page is wiped, so its first zmqfork call
(or, without wipe-on-fork, its first libzmq call) runs the deferred cleanup;
but the descriptors are the parent's own, which its libzmq is using: nothing
may be closed.  The parent then checks that every descriptor it tracked is
still open and that a message still goes through.  Prints one JSON line.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import sys

import zmq

import zmqfork
from zmqfork import _native
from forking import wait_child

via = sys.argv[1]
ctx = zmqfork.Context()
a = ctx.socket(zmq.PAIR)
port = a.bind_to_random_port("tcp://127.0.0.1")
b = ctx.socket(zmq.PAIR)
b.connect(f"tcp://127.0.0.1:{port}")
b.send(b"before")
assert a.poll(10_000) and a.recv() == b"before"
tracked = _native.fdtrack_tracked_fds()

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_CLONE = {"x86_64": 56, "aarch64": 220}[platform.machine()]
CLONE_FILES, SIGCHLD = 0x400, 17
pid = libc.syscall(SYS_CLONE, CLONE_FILES | SIGCHLD, 0, 0, 0, 0)
if pid == 0:
    code = 1
    try:
        if via == "zmqfork":
            zmqfork.generation()
        else:
            zmq.Context().term()  # a plain pyzmq context: libzmq's own hooked calls
        code = 0
    finally:
        os._exit(code)
assert pid > 0, ctypes.get_errno()
status = wait_child(pid, 30.0)
closed = [fd for fd in tracked if not os.path.exists(f"/proc/self/fd/{fd}")]
b.send(b"after")
works = bool(a.poll(10_000)) and a.recv() == b"after"
print(json.dumps({"child_status": status, "closed_in_parent": closed, "parent_works": works}))
ctx.destroy(linger=0)
