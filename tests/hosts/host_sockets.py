"""What a prefork host's master makes at import, for tests/test_hosts.py: zmqfork sockets and a report.

A host's application module (``gunicorn_app``, ``celery_tasks``) calls
``MasterSockets.from_environment()`` when it is imported, which the host does
once, in its master, before forking its workers.  It makes, on one zmqfork
Context:

- ``push``, a PUSH connected to the test's PULL (``$ZMQFORK_HOST_SINK``): the
  socket under test, on which every worker reports;
- ``hold``, a REQ connected to the test's ROUTER (``$ZMQFORK_HOST_HOLD``): a
  worker asks it for leave to finish, so that the test can keep one request
  or task in each worker at once and so reach every worker without guessing;
- ``status``, a PUB bound to a port of its own: a libzmq listener in the
  master, which no worker may hold.

Then it waits until libzmq has made both connections, writes
``$ZMQFORK_HOST_REPORT``: the master's pid and, for every descriptor opened
while making them (libzmq's: its eventfds, epolls, listener and connections;
found without asking zmqfork), its number and what it is (``/proc/self/fd``
link), and sends ``"master <pid>"`` on the PUSH.  The test
compares these descriptors with the workers'.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Dict, Set, Tuple

import zmqfork as zmq

__all__ = ["MasterSockets", "TIMEOUT_MS"]

#: How long a worker waits for the test (to be let go) before giving up.
TIMEOUT_MS = 60_000


class MasterSockets:
    """The master's context and sockets; ``report(tag)`` is what a worker calls for each request or task."""

    def __init__(self, sink: str, hold: str, report_path: str) -> None:
        before = _open_descriptors()
        self.context = zmq.Context()
        self.push = self.context.socket(zmq.PUSH)
        self.push.linger = 0
        self.push.connect(sink)
        self.hold = self.context.socket(zmq.REQ)
        self.hold.linger = 0
        self.hold.rcvtimeo = TIMEOUT_MS
        self.hold.connect(hold)
        self.status = self.context.socket(zmq.PUB)
        self.status.linger = 0
        self.status.bind("tcp://127.0.0.1:*")
        for endpoint in (sink, hold):
            _wait_for_connection(endpoint, before)
        report = {"pid": os.getpid(), "fds": _descriptors_since(before)}
        _write_atomically(report_path, json.dumps(report))
        self.push.send_string(f"master {os.getpid()}")  # after the report: the test reads it when this arrives

    @classmethod
    def from_environment(cls) -> "MasterSockets":
        """Sockets to the endpoints the test put in the environment."""
        return cls(os.environ["ZMQFORK_HOST_SINK"], os.environ["ZMQFORK_HOST_HOLD"], os.environ["ZMQFORK_HOST_REPORT"])

    def report(self, tag: str) -> str:
        """In a worker: send ``"<pid> <tag>"`` on the PUSH, then wait until the test lets this worker go."""
        message = f"{os.getpid()} {tag}"
        self.push.send_string(message)
        self.hold.send_string(message)
        self.hold.recv()  # raises zmq.Again after TIMEOUT_MS: the test is gone
        return message


def _open_descriptors() -> Set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def _descriptors_since(before: Set[int]) -> Dict[str, str]:
    """Descriptors opened since ``before`` (by libzmq: this process opens nothing else meanwhile) -> /proc link."""
    found = {}
    for fd in sorted(_open_descriptors() - before):
        try:
            found[str(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the one that listed the directory
    return found


def _wait_for_connection(endpoint: str, before: Set[int]) -> None:
    """Wait until libzmq (which connects in its I/O thread) has a TCP connection to ``endpoint`` open."""
    host, port = endpoint.rsplit("/", 1)[1].rsplit(":", 1)
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not _connected((host, int(port)), before):
        if time.monotonic() > deadline:
            raise RuntimeError(f"libzmq made no connection to {endpoint} in {TIMEOUT_MS} ms")
        time.sleep(0.005)


def _connected(peer: Tuple[str, int], before: Set[int]) -> bool:
    for fd, link in _descriptors_since(before).items():
        if not link.startswith("socket:"):
            continue  # an eventfd or an epoll
        copy = os.dup(int(fd))  # a socket object of our own, closed below, leaves libzmq's descriptor alone
        try:
            probe = socket.socket(fileno=copy)
        except OSError:
            os.close(copy)
            continue
        try:
            if probe.family == socket.AF_INET and probe.getpeername() == peer:
                return True
        except OSError:
            pass  # a listener, or not connected yet
        finally:
            probe.close()
    return False


def _write_atomically(path: str, text: str) -> None:
    partial = f"{path}.partial"
    with open(partial, "w") as handle:
        handle.write(text)
    os.rename(partial, path)
