"""zmqfork's descriptor tracking installed while the process is at its descriptor limit.

    install_at_descriptor_limit.py KIND   (KIND: os, libc or raw)

The install's probe eventfd (which teaches it the anonymous inode's print)
then fails with EMFILE.  The print must be learned from libzmq's first
eventfd instead: libzmq's eventfds still carry the mark, so an eventfd of the
application's dup2()ed onto one of their numbers survives in a child forked
by KIND.  zmqfork's package is loaded module by module, so that only the
install runs at the limit.  Prints one JSON line.
"""

from __future__ import annotations

import fcntl
import importlib.machinery  # noqa: F401 - what zmqfork._descriptors imports, loaded before the limit
import importlib.util
import json
import os
import sys
import types

import zmq  # noqa: F401 - loaded before the limit, as an application would have it

from forking import at_descriptor_limit, run_in_child

F_GETSIG = 11
kind = sys.argv[1]
package = importlib.util.find_spec("zmqfork")
assert package is not None and package.submodule_search_locations is not None
stub = types.ModuleType("zmqfork")
stub.__path__ = list(package.submodule_search_locations)
sys.modules["zmqfork"] = stub  # its submodules, without the package's __init__ (which installs at once)
from zmqfork import _native  # noqa: E402,F401 - what zmqfork._descriptors imports, loaded before the limit

spec = importlib.util.find_spec("zmqfork._descriptors")
assert spec is not None and spec.loader is not None
code = spec.loader.get_code("zmqfork._descriptors")  # type: ignore[attr-defined]  # read before the limit
module = types.ModuleType("zmqfork._descriptors")
module.__file__ = spec.origin
sys.modules["zmqfork._descriptors"] = module
with at_descriptor_limit():
    exec(code, module.__dict__)  # the install: its probe eventfd gets EMFILE
del sys.modules["zmqfork"]
import zmqfork  # noqa: E402

assert module.state().on, module.state().reason
ctx = zmqfork.Context()
sock = ctx.socket(zmq.PAIR)
number = sock.FD
marked = fcntl.fcntl(number, F_GETSIG) != 0
mine = os.eventfd(1234)
os.dup2(mine, number)  # the application takes the number over with its own eventfd


def child() -> object:
    if kind == "raw":
        zmqfork.generation()  # no handler ran: the first zmqfork call cleans up
    try:
        return os.eventfd_read(number)
    except OSError as exc:
        return repr(exc)


print(json.dumps({"libzmq_eventfd_marked": marked, "child_reads": run_in_child(child, kind=kind)}))
os._exit(0)  # libzmq's eventfd was taken from under it: no orderly teardown
