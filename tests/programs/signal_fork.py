"""Child program of tests/test_descriptors.py (test_fork_from_signal_handler_inside_hooked_call); its result is the JSON on its last stdout line."""

import ctypes, json, os, select, signal, sys, threading, time
from zmqfork import _native
from forking import run_in_child, wait_child

path, how = sys.argv[1], sys.argv[2]
lib = ctypes.CDLL(path, use_errno=True)
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
watched = lib.t_eventfd(0, 0)  # tracked: the child's cleanup must close it
victim = lib.t_eventfd(0, 0)   # closed by the call the signal interrupts
assert _native.fdtrack_is_tracked(watched) and _native.fdtrack_is_tracked(victim)
rd, wr = os.pipe()
def address(name):
    return ctypes.c_void_p(int(_native.ffi.cast("uintptr_t", _native.ffi.addressof(_native.lib, name))))

refresh = address("zmqfork_refresh") if how == "_Fork" else None
if lib.sf_install(signal.SIGUSR1, wr, watched, address("zmqfork_testing_fdtrack_delay"), refresh) != 0:
    print(json.dumps({"skip": os.strerror(ctypes.get_errno())}))
    sys.exit(0)
_native.testing_fdtrack_delay(500_000)  # the close sleeps inside the gate
thread = threading.Thread(target=lib.sf_close, args=(victim,), daemon=True)
thread.start()
deadline = time.monotonic() + 10
while _native.testing_fdtrack_in_window() == 0:
    assert time.monotonic() < deadline, "the close never reached its window"
    time.sleep(0.001)
signal.pthread_kill(thread.ident, signal.SIGUSR1)  # its handler forks, on the thread inside the gate
thread.join(10)
returned = not thread.is_alive()
_native.testing_fdtrack_delay(0)
pid = lib.sf_child_pid()
ready, _, _ = select.select([rd], [], [], 30 if pid > 0 else 0)
report = os.read(rd, 1).decode() if ready else "nothing"
status = wait_child(pid, 30) if pid > 0 else None
if returned:  # else the thread still holds the gate and any fork would wait for it
    later_fork = run_in_child(lambda: "ok", kind="os", timeout=20)  # the parent's gate still works
else:
    later_fork = "not tried"
print(json.dumps({"returned": returned, "report": report, "status": status, "later_fork": later_fork,
                  "victim_tracked": _native.fdtrack_is_tracked(victim)}))
