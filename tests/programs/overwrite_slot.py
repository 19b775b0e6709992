"""Child program of tests/test_descriptors.py (test_fork_handlers_repair_only_the_binders_writes); its result is the JSON on its last stdout line."""

import ctypes, json, os, sys
from zmqfork import _native
from forking import run_in_child

path, writer = sys.argv[1], sys.argv[2]
lib = ctypes.CDLL(path)
lib.t_close_slot.restype = ctypes.c_void_p
slot = ctypes.c_void_p.from_address(lib.t_close_slot())
plain = slot.value  # bound at load: the plain close()
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
wrapper = slot.value
assert wrapper != plain
fd = lib.t_eventfd(0, 0)
assert _native.fdtrack_is_tracked(fd)
# What the lazy binder would write (a racing first call: the value the slot had), or another library's hook.
foreign = ctypes.cast(lib.t_dup, ctypes.c_void_p).value
slot.value = plain if writer == "binder" else foreign
child_sees_fd = run_in_child(lambda: os.path.exists("/proc/self/fd/%d" % fd), kind="os")
print(json.dumps({"slot": {wrapper: "wrapper", plain: "plain", foreign: "foreign"}.get(slot.value, "other"),
                  "still_tracked": _native.fdtrack_is_tracked(fd), "child_sees_fd": child_sees_fd}))
