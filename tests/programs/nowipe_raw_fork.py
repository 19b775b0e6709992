"""Without wipe-on-fork, a raw fork while another thread is inside a hooked call.

    nowipe_raw_fork.py OBJECT   (run with ZMQFORK_DISABLE=wipeonfork)

The token cannot tell the child it is one; getpid() must.  The child's first
hooked call must clean up the inherited table (closing the parent's tracked
descriptors, counting the call that was in flight) and reset the gate the
parent's thread left raised, so that the child's own fork does not wait for a
thread it does not have.  Prints one JSON line.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
import threading
import time

from zmqfork import _native
from forking import run_in_child

assert "wipeonfork" not in _native.mechanisms(), "run with ZMQFORK_DISABLE=wipeonfork"
path = sys.argv[1]
lib = ctypes.CDLL(path)
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
theirs = [lib.t_eventfd(0, 0), lib.t_eventfd(0, 0), lib.t_socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)]
assert all(_native.fdtrack_is_tracked(fd) for fd in theirs)
_native.testing_fdtrack_delay(30_000_000)  # the thread's eventfd sits in its window past the child's whole life
threading.Thread(target=lib.t_eventfd, args=(0, 0), daemon=True).start()
deadline = time.monotonic() + 10
while _native.testing_fdtrack_in_window() == 0:
    assert time.monotonic() < deadline, "the call never reached its window"
    time.sleep(0.001)
untracked_before = _native.fdtrack_counts()["untracked"]


def child() -> dict:
    _native.testing_fdtrack_delay(0)
    fd = lib.t_eventfd(0, 0)  # the first hooked call in this child
    counts = _native.fdtrack_counts()
    still_open = [number for number in theirs if number != fd and _open(number)]
    grandchild = run_in_child(lambda: "ok", kind="os", timeout=20)
    return {"closed": counts["closed_last"], "untracked": counts["untracked"] - untracked_before,
            "tracked": counts["tracked"], "own_tracked": _native.fdtrack_is_tracked(fd), "still_open": still_open,
            "grandchild": grandchild}


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


print(json.dumps(run_in_child(child, kind="raw", timeout=30)), flush=True)
os._exit(0)  # the thread still sleeps in its window
