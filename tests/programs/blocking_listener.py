"""os.fork() while a libzmq I/O thread waits in accept4() on a blocking listener handed over with ZMQ_USE_FD.

    blocking_listener.py

A PULL socket binds through a blocking listening socket (ZMQ_USE_FD, as with
systemd socket activation, or prefork workers sharing one listener).  A
client connects; libzmq's I/O thread is woken and enters its hooked
accept4(), where zmqfork's testing delay holds it before it looks for the
client; this program takes the client first, as another worker would.  The
I/O thread then waits in accept4() for a client that never comes.
os.fork() must return and the child must work; without that, this program
hangs until killed.  Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time

import zmq

import zmqfork
from zmqfork import _native
from forking import run_in_child

SYS_ACCEPT4 = {"x86_64": 288, "aarch64": 242}[platform.machine()]

listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.bind(("127.0.0.1", 0))
listener.listen(16)
assert listener.getblocking()
port = listener.getsockname()[1]
ctx = zmqfork.Context()
pull = ctx.socket(zmq.PULL)
pull.setsockopt(zmq.USE_FD, listener.fileno())
pull.bind(f"tcp://127.0.0.1:{port}")


def wait_until(what: str, predicate) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 20
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)  # polls state that no event announces


def waiting_in_accept4() -> bool:
    """Whether a thread of this process waits in accept4 on the listener."""
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/syscall") as handle:
                fields = handle.read().split()
        except OSError:
            continue
        if fields[:2] == [str(SYS_ACCEPT4), hex(listener.fileno())]:
            return True
    return False


_native.testing_fdtrack_delay(2_000_000)  # the I/O thread's accept4 pauses before it looks for the client
client = socket.create_connection(("127.0.0.1", port))
wait_until("libzmq's I/O thread never entered accept4", lambda: _native.testing_fdtrack_in_window() != 0)
taken, _ = listener.accept()  # another worker takes the client
_native.testing_fdtrack_delay(0)
wait_until("libzmq's I/O thread never waited in accept4", waiting_in_accept4)


def child() -> str:
    inner = zmqfork.Context()
    try:
        a, b = inner.socket(zmq.PAIR), inner.socket(zmq.PAIR)
        a.bind("inproc://child")
        b.connect("inproc://child")
        a.send(b"works")
        assert b.poll(10000) and b.recv() == b"works"
    finally:
        inner.destroy(linger=0)
    return "ok"


result = run_in_child(child, kind="os", timeout=30)
blocked = waiting_in_accept4()
later = socket.create_connection(("127.0.0.1", port))  # lets libzmq's accept4 return
print(json.dumps({"child": result, "io_thread_still_in_accept4": blocked}), flush=True)
os._exit(0)  # the I/O thread may still be between accept4 and its table update
