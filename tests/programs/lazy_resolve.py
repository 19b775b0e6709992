"""Child program of tests/test_descriptors.py (test_lazy_binder_overwriting_a_patched_slot); its result is the JSON on its last stdout line."""

import ctypes, json, os, sys, threading, time
from zmqfork import _native
from forking import run_in_child

path, kind = sys.argv[1], sys.argv[2]
lib = ctypes.CDLL(path, mode=os.RTLD_LAZY | os.RTLD_DEEPBIND)  # its close() binds to lazyresolve's
resolver = ctypes.CDLL(os.path.join(os.path.dirname(path), "liblazyresolve.so"))
resolver.lazy_arm()
first_call = threading.Thread(target=lambda: lib.t_close(-1), daemon=True)  # its first close(): the lazy resolver
first_call.start()
try:
    deadline = time.monotonic() + 10
    while not resolver.lazy_waiting():
        assert time.monotonic() < deadline, "the first call never reached the resolver"
        time.sleep(0.001)
    assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON  # patched under the waiting resolver
finally:
    resolver.lazy_release()  # a failed step must not leave the thread waiting in the resolver
first_call.join(10)
assert not first_call.is_alive()

fd = lib.t_eventfd(0, 0)
assert _native.fdtrack_is_tracked(fd)
assert lib.t_close(fd) == 0
overwritten = _native.fdtrack_is_tracked(fd)  # the resolver wrote the plain close() over the wrapper
rd, wr = os.pipe()
os.dup2(wr, fd)  # the application gets the number back

def child():
    if kind == "raw":
        _native.refresh()
    return os.path.exists("/proc/self/fd/%d" % fd), _native.fdtrack_counts()["untracked"]

child_sees_it_open, child_untracked = run_in_child(child, kind=kind)
after = lib.t_eventfd(0, 0)
tracked_after = _native.fdtrack_is_tracked(after)
lib.t_close(after)
print(json.dumps({"overwritten": overwritten, "child_sees_it_open": child_sees_it_open,
                  "close_hooked_after_fork": tracked_after and not _native.fdtrack_is_tracked(after),
                  "child_untracked": child_untracked}))
