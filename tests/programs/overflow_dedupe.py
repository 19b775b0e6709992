"""A number beyond the bitmap, tracked twice, leaves the overflow slots when closed once.

    overflow_dedupe.py OBJECT   (run with ZMQFORK_DISABLE=fdtrack: the table is mapped here, small)

The table covers numbers 0-63 only, so 100 and 101 go to the overflow slots.
dup2 onto 101 and 100, close 101 (freeing the first slot), dup2 onto 100
again: that must not add a second entry for 100, or closing it once would
leave a stale one behind.  Prints one JSON line.
"""

from __future__ import annotations

import ctypes
import json
import sys

from zmqfork import _native

path = sys.argv[1]
lib = ctypes.CDLL(path)
_native.testing_fdtrack_table_size(64)
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
efd = lib.t_eventfd(0, 0)
tracked = _native.fdtrack_counts()["tracked"]
assert lib.t_dup2(efd, 101) == 101 and lib.t_dup2(efd, 100) == 100
assert _native.fdtrack_is_tracked(100) and _native.fdtrack_is_tracked(101)
assert lib.t_close(101) == 0
assert lib.t_dup2(efd, 100) == 100  # tracked already: no second entry
assert lib.t_close(100) == 0
print(json.dumps({"still_tracked": _native.fdtrack_is_tracked(100),
                  "tracked_delta": _native.fdtrack_counts()["tracked"] - tracked}))
