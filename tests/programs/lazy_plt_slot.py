"""Child program of tests/test_descriptors.py (test_fork_handlers_leave_a_foreign_hook_on_a_lazy_slot); its result is the JSON on its last stdout line."""

import ctypes, json, os, sys
from zmqfork import _native
from forking import run_in_child

path, writer = sys.argv[1], sys.argv[2]
lib = ctypes.CDLL(path, mode=os.RTLD_LAZY)
lib.t_close_plt_slot.restype = ctypes.c_void_p
address = lib.t_close_plt_slot()
# The object is built with PLT and -z lazy: a missing JUMP_SLOT for close() is a broken build, not a skip.
assert address, "pltslot.c found no DT_RELA JUMP_SLOT for close() in the lazy PLT build"
slot = ctypes.c_void_p.from_address(address)
plain = ctypes.cast(ctypes.CDLL(None).close, ctypes.c_void_p).value  # what the binder resolves close() to
unresolved = slot.value  # close() never called yet: the object's own PLT entry
assert unresolved != plain
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
wrapper = slot.value
assert wrapper not in (unresolved, plain)
fd = lib.t_eventfd(0, 0)
assert _native.fdtrack_is_tracked(fd)
# The binder's first resolution (the plain close), or another library's hook after zmqfork's.
foreign = ctypes.cast(lib.t_dup, ctypes.c_void_p).value
slot.value = plain if writer == "binder" else foreign
child_sees_fd = run_in_child(lambda: os.path.exists("/proc/self/fd/%d" % fd), kind="os")
print(json.dumps({"slot": {wrapper: "wrapper", plain: "plain", foreign: "foreign", unresolved: "unresolved"}.get(slot.value, "other"),
                  "still_tracked": _native.fdtrack_is_tracked(fd), "child_sees_fd": child_sees_fd}))
