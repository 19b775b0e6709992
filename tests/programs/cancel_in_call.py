"""A thread taken out of a hooked close() leaves the fork gate.

    cancel_in_call.py OBJECT cancel|longjmp   (hooktarget.c + cancelcall.c)

The close sleeps in its window (nanosleep: a cancellation point, and
interruptible) when the thread is cancelled, or gets a signal whose handler
siglongjmp()s out of it.  A fork after that must find no call in flight: the
child counts none as untracked.  Prints one JSON line.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

from zmqfork import _native
from forking import run_in_child

path, how = sys.argv[1:3]
lib = ctypes.CDLL(path)
leave = {"cancel": lib.cc_cancel_and_join, "longjmp": lib.cc_jump_and_join}[how]
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
victim = lib.t_eventfd(0, 0)
_native.testing_fdtrack_delay(30_000_000)
assert lib.cc_start(victim) == 0
deadline = time.monotonic() + 10
while _native.testing_fdtrack_in_window() == 0:
    assert time.monotonic() < deadline, "the close never reached its window"
    time.sleep(0.001)
left = leave()
_native.testing_fdtrack_delay(0)
before = _native.fdtrack_counts()["untracked"]
child_untracked = run_in_child(lambda: _native.fdtrack_counts()["untracked"], kind="os", timeout=20)
print(json.dumps({"left": left, "in_window": _native.testing_fdtrack_in_window(),
                  "in_flight_at_fork": child_untracked - before}))
