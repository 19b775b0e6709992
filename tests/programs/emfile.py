"""Child program of tests/test_descriptors.py (test_libzmq_sees_real_errno_under_emfile); its result is the JSON on its last stdout line."""

import json, os, resource, sys
import zmq
import zmqfork
from zmqfork import _native

ctx = zmqfork.Context()  # one eventfd; the first socket needs five more
highest = max(int(name) for name in os.listdir("/proc/self/fd"))
fillers = []
while True:  # fill every free number below the limit we are about to set
    fd = os.open("/dev/null", os.O_RDONLY)
    if fd > highest:
        os.close(fd)
        break
    fillers.append(fd)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
try:
    ctx.socket(zmqfork.PUSH)
    outcome = "no error"
except zmq.ZMQError as exc:
    outcome = exc.errno
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
tracked = _native.fdtrack_tracked_fds()
print(json.dumps({"errno": outcome, "tracked_open": all(os.path.exists("/proc/self/fd/%d" % fd) for fd in tracked),
                  "tracked": len(tracked)}))
