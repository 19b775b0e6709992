"""Child program of tests/test_descriptors.py (test_failed_install_leaves_no_stale_entry); its result is the JSON on its last stdout line."""

import ctypes, json, os, sys
from zmqfork import _native
from forking import run_in_child

path = sys.argv[1]
lib = ctypes.CDLL(path)
made = []
# close, socket, accept, accept4 and eventfd are patched (hooks[] order), then epoll_create1 fails.
_native.testing_fdtrack_fail_patch(5, lambda: made.append(lib.t_eventfd(0, 0)))
status = _native.testing_fdtrack_hook_object(path)
[fd] = made
tracked_before_failure = _native.fdtrack_is_tracked(fd)
assert lib.t_close(fd) == 0
stale = _native.fdtrack_is_tracked(fd)
# The application gets the number back; a child must not close it.
rd, wr = os.pipe()
os.dup2(wr, fd)
child_sees_it_open = run_in_child(lambda: os.path.exists("/proc/self/fd/%d" % fd), kind="os")
print(json.dumps({"status": status, "tracked_before_failure": tracked_before_failure, "stale": stale,
                  "child_sees_it_open": child_sees_it_open}))
