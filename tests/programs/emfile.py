"""Child program of tests/test_descriptors.py (test_libzmq_sees_real_errno_under_emfile); its result is the JSON on its last stdout line."""

import json, os
import zmq
import zmqfork
from zmqfork import _native
from forking import at_descriptor_limit

ctx = zmqfork.Context()  # one eventfd; the first socket needs five more
with at_descriptor_limit():
    try:
        ctx.socket(zmqfork.PUSH)
        outcome = "no error"
    except zmq.ZMQError as exc:
        outcome = exc.errno
tracked = _native.fdtrack_tracked_fds()
print(json.dumps({"errno": outcome, "tracked_open": all(os.path.exists("/proc/self/fd/%d" % fd) for fd in tracked),
                  "tracked": len(tracked)}))
