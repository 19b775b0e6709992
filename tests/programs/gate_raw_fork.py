"""Child program of tests/test_descriptors.py (test_raw_fork_from_signal_handler_waiting_at_closed_gate); its result is the JSON on its last stdout line."""

import ctypes, json, os, select, signal, sys, threading, time
from zmqfork import _native
from forking import wait_child

path = sys.argv[1]
lib = ctypes.CDLL(path, use_errno=True)
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
delay = ctypes.c_void_p(int(_native.ffi.cast("uintptr_t", _native.ffi.addressof(_native.lib, "zmqfork_testing_fdtrack_delay"))))
rd, wr = os.pipe()
if lib.gf_install(signal.SIGUSR1, wr, delay) != 0:
    print(json.dumps({"skip": "_Fork: " + os.strerror(ctypes.get_errno())}))
    sys.exit(0)
futex = str(lib.gf_sys_futex())

def in_futex(thread):
    with open("/proc/self/task/%d/syscall" % thread.native_id) as handle:
        return handle.read().split()[0] == futex

def wait_until(what, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)  # polling interval only: every step waits for its condition

try:
    open("/proc/self/task/%d/syscall" % threading.get_native_id()).read()
except OSError as error:
    print(json.dumps({"skip": "cannot read /proc/self/task/*/syscall: %s" % error}))
    sys.exit(0)

held, waiting = lib.t_eventfd(0, 0), lib.t_eventfd(0, 0)
_native.testing_fdtrack_delay(3_000_000)  # the window the setup has to fit in; nothing waits for it to end
holder = threading.Thread(target=lib.t_close, args=(held,), daemon=True)
holder.start()
wait_until("the held close never reached its window", lambda: _native.testing_fdtrack_in_window() != 0)
forker = threading.Thread(target=lib.gf_fork_and_reap, daemon=True)
forker.start()  # its prepare handler closes the gate and waits for the held close
wait_until("the fork never waited for the held close", lambda: lib.gf_forking() and in_futex(forker))
waiter = threading.Thread(target=lib.gf_close, args=(waiting,), daemon=True)
waiter.start()
wait_until("the second close never waited at the closed gate", lambda: lib.gf_closing() and in_futex(waiter))
signal.pthread_kill(waiter.ident, signal.SIGUSR1)  # its handler _Fork()s on the thread waiting at the gate
wait_until("the handler never forked", lambda: lib.gf_child_pid() != 0)
during_window = _native.testing_fdtrack_in_window() != 0  # so the gate was still closed at the fork
_native.testing_fdtrack_delay(0)  # the parent's later calls need no window
pid = lib.gf_child_pid()

report, status = "nothing", None
deadline = time.monotonic() + 30
while time.monotonic() < deadline:  # a report, or the child's end (its alarm ends a hang)
    if select.select([rd], [], [], 0.05)[0]:
        report = os.read(rd, 1).decode()
        break
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    status = None
if status is None:
    status = wait_child(pid, 30)
child = "exit %d" % os.WEXITSTATUS(status) if os.WIFEXITED(status) else "signal %d" % os.WTERMSIG(status)
for thread in (holder, forker, waiter):
    thread.join(30)
print(json.dumps({"during_window": during_window, "report": report, "child": child,
                  "parent_threads_done": not any(t.is_alive() for t in (holder, forker, waiter))}))
