"""Run one sanitizer canary the way the tests run zmqfork's C module; tools/sanitize.sh's self-check.

    python tools/sanitizer_canary.py CASE WHERE

CASE names a function of the canary module (tools/sanitizer_canary.c, built by
tools/sanitize.sh with the module's own flags): ``clean``, ``heap_overflow``,
``use_after_free``, ``global_overflow``, ``stack_overflow``,
``shift_overflow``.  WHERE is ``process`` (this process) or a fork kind
(``os``, ``libc``, ``raw``): a child forked by zmqfork._children.fork_by, as
the tests fork, that calls it and leaves through os._exit.

Either way the call comes with the sanitized zmqfork imported, its descriptor
hooks installed in libzmq, and a context with live I/O threads that has just
made a tcp round trip, so a report is made under the same conditions as one
from the module.  Whether it was reported is for the caller to see (in the
report files and the output); this exits 0 unless the run itself broke.
"""

from __future__ import annotations

import os
import sys

import zmqfork
import zmqfork_sanitizer_canary as canary
from zmqfork._children import fork_by, wait_or_kill

ARGUMENTS = {
    "clean": 16,
    "heap_overflow": 16,
    "use_after_free": 16,
    "global_overflow": 16,  # the canary's table has 16 bytes
    "stack_overflow": 16,  # and so has its local array
    "shift_overflow": 40,
}


def main(case: str, where: str) -> int:
    function = getattr(canary.lib, f"canary_{case}")
    argument = ARGUMENTS[case]
    assert zmqfork.detection().fdtrack, zmqfork.detection()
    ctx = zmqfork.Context()
    pull = ctx.socket(zmqfork.PULL)
    pull.rcvtimeo = 10_000
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmqfork.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send(b"up")
    assert pull.recv() == b"up"
    if where == "process":
        print(f"canary_{case}({argument}) returned {function(argument)}")
    else:
        pid = fork_by(where)
        if pid == 0:
            push.send(b"child")  # the child rebuilds its sockets first, as a test child does
            function(argument)
            os._exit(0)
        status = wait_or_kill(pid, 30)
        print(f"canary_{case}({argument}) in a {where}-forked child: wait status {status}")
    ctx.destroy(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
