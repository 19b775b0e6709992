"""Child program of tests/test_descriptors.py (test_fake_libzmq_descriptors_closed_in_child); its result is the JSON on its last stdout line."""

import ctypes, json, os, sys
import zmqfork
from zmqfork import _native
from forking import run_in_child

backend = ctypes.CDLL(sys.argv[1])
assert _native.fdtrack_install(sys.argv[1]) == _native.FDTRACK_ON
fd = backend.backend_make_fd()
assert _native.fdtrack_is_tracked(fd)
gone = run_in_child(lambda: not os.path.exists("/proc/self/fd/%d" % fd), kind="os")
assert backend.backend_close_fd(fd) == 0 and not _native.fdtrack_is_tracked(fd)
print(json.dumps(gone))
