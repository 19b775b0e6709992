"""Child program of tests/test_descriptors.py (test_hooked_object_stays_loaded); its result is the JSON on its last stdout line."""

import ctypes, json, os, sys
from zmqfork import _native
from forking import run_in_child

path = sys.argv[1]
libdl = ctypes.CDLL(None)
libdl.dlopen.restype = ctypes.c_void_p
libdl.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
libdl.dlclose.argtypes = [ctypes.c_void_p]
handle = libdl.dlopen(path.encode(), os.RTLD_LAZY)
assert handle
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
assert libdl.dlclose(handle) == 0  # the only reference the application had
mapped = any(line.rstrip().endswith(os.path.realpath(path)) for line in open("/proc/self/maps"))
print(json.dumps({"mapped": mapped, "child": run_in_child(lambda: "ok", kind="os")}))
