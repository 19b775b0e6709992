"""Child program of tests/test_descriptors.py (test_fork_waits_for_hooked_call_in_its_window, test_fork_waits_no_longer_than_the_bound); its result is the JSON on its last stdout line."""

import ctypes, json, os, select, sys, threading, time
from zmqfork import _native
from forking import fork_with, wait_child

path, which, delay = sys.argv[1], sys.argv[2], int(sys.argv[3])
lib = ctypes.CDLL(path)
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
victim = lib.t_eventfd(0, 0) if which == "close" else -1
before = set(int(name) for name in os.listdir("/proc/self/fd"))
r, w = os.pipe()
_native.testing_fdtrack_delay(delay)  # each hooked call sleeps this long inside its window
thread = threading.Thread(target=(lambda: lib.t_eventfd(0, 0)) if which == "create" else (lambda: lib.t_close(victim)),
                          daemon=True)
thread.start()
deadline = time.monotonic() + 10
while _native.testing_fdtrack_in_window() == 0:
    assert time.monotonic() < deadline, "the call never reached its window"
    time.sleep(0.001)
started = time.monotonic()
pid = fork_with("os")  # the prepare handler must wait for the call in its window
if pid == 0:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            found[fd] = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            pass
    extra = {fd: target for fd, target in found.items() if fd not in before | {r, w}}
    os.write(w, json.dumps({"extra": extra, "victim_open": victim in found,
                            "untracked": _native.fdtrack_counts()["untracked"]}).encode())
    os._exit(0)
waited = time.monotonic() - started
still_in_window = _native.testing_fdtrack_in_window() != 0
_native.testing_fdtrack_delay(0)
thread.join(10)
os.close(w)
select.select([r], [], [], 20)
child = json.loads(os.read(r, 65536))
assert wait_child(pid, 20) == 0
print(json.dumps({"waited": waited, "still_in_window": still_in_window, **child}), flush=True)
os._exit(0)  # a call stuck in its window may still sleep in its thread
