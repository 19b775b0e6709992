"""Child program of tests/test_descriptors.py (test_disabled_tracking_degrades); its result is the JSON on its last stdout line."""

import ctypes, json, sys
import zmqfork
from zmqfork import _native

for path in sys.argv[2:]:
    ctypes.CDLL(path)
first = _native.fdtrack_install(sys.argv[1])
again = _native.fdtrack_install(sys.argv[1])
found = zmqfork.detection()
print(json.dumps({"status": first, "again": again, "on": found.fdtrack,
                  "why": found.unavailable.get("fdtrack"), "object": found.fdtrack_object}))
