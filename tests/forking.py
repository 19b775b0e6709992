"""Test helpers that fork: run a function in a child made by os.fork, libc fork or a raw syscall.

The child sends its result (or its traceback) down a pipe and exits with a
status; the parent waits with a timeout, kills the child if it overruns, and
raises if the child failed.  No child is ever left behind.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import platform
import select
import signal
import time
import traceback
import warnings
from typing import Any, Callable, Iterator, Tuple

__all__ = [
    "FORK_KINDS",
    "Child",
    "ChildFailed",
    "fd_numbers",
    "fork_with",
    "kill_leftover_children",
    "run_in_child",
    "start_child",
    "wait_child",
]

#: How a child can be made: Python's os.fork (atfork handlers + Python hooks),
#: libc fork() through ctypes (atfork handlers only), a raw clone syscall
#: (neither: only the wipe-on-fork page can tell).
FORK_KINDS = ("os", "libc", "raw")

_SYS_CLONE = {"x86_64": 56, "aarch64": 220}
# PyDLL keeps the GIL held across the call, so the child starts owning it.
_libc = ctypes.PyDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SIGCHLD = int(signal.SIGCHLD)


# Process groups of the children start_child made and has not reaped yet.
# Each test child leads its own group, which its descendants join, so that
# one killpg() ends a whole family even if the test itself was interrupted.
_live_groups: set = set()
_is_test_child = False


class ChildFailed(AssertionError):
    """The child raised, exited non-zero, or overran its timeout."""


def fork_with(kind: str) -> int:
    """Fork by ``kind`` (one of FORK_KINDS); returns 0 in the child, the pid in the parent."""
    if kind == "os":
        with warnings.catch_warnings():
            # Python 3.12+ warns that forking a process with threads (libzmq's) is unsafe:
            # making that safe is the point of zmqfork.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")
            return os.fork()
    if kind == "libc":
        pid = _libc.fork()
    elif kind == "raw":
        number = _SYS_CLONE.get(platform.machine())
        if number is None:
            raise RuntimeError(f"no raw clone syscall number known for {platform.machine()}")
        pid = _libc.syscall(number, _SIGCHLD, 0, 0, 0, 0)
    else:
        raise ValueError(f"unknown fork kind {kind!r}; choose from {FORK_KINDS}")
    if pid < 0:
        raise OSError(ctypes.get_errno(), f"{kind} fork failed")
    return int(pid)


def wait_child(pid: int, timeout: float) -> int:
    """Wait for ``pid`` up to ``timeout`` seconds; kill it on overrun. Returns its wait status."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            _kill_group(pid)
            os.waitpid(pid, 0)
            raise ChildFailed(f"child {pid} did not finish within {timeout}s and was killed")
        time.sleep(0.005)


def _read_all(fd: int, deadline: float) -> bytes:
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class Child:
    """A forked child running a function; ``result()`` waits for what it returned."""

    def __init__(self, pid: int, read_end: int, kind: str) -> None:
        self.pid = pid
        self.kind = kind
        self._read_end = read_end

    def result(self, timeout: float = 30.0) -> Any:
        """Wait up to ``timeout`` seconds; return the child's value or raise ChildFailed."""
        try:
            data = _read_all(self._read_end, time.monotonic() + timeout)
        finally:
            os.close(self._read_end)
        status = wait_child(self.pid, timeout)
        _live_groups.discard(self.pid)
        where = f"child {self.pid} ({self.kind} fork)"
        if not data:
            raise ChildFailed(f"{where} reported nothing; wait status {status}")
        verdict, value = pickle.loads(data)
        if verdict != "ok":
            raise ChildFailed(f"{where} failed:\n{value}")
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            raise ChildFailed(f"{where} exited with wait status {status}")
        return value


def start_child(fn: Callable[[], Any], *, kind: str = "os") -> Child:
    """Fork by ``kind`` and run ``fn`` in the child, which then exits; returns at once in the parent."""
    global _is_test_child
    read_end, write_end = os.pipe()
    pid = fork_with(kind)
    if pid == 0:  # child
        code = 1
        try:
            if not _is_test_child:
                os.setpgid(0, 0)
                _is_test_child = True
            _live_groups.clear()
            os.close(read_end)
            try:
                payload = pickle.dumps(("ok", fn()))
                code = 0
            except BaseException:
                payload = pickle.dumps(("error", traceback.format_exc()))
            view = memoryview(payload)
            while view:
                view = view[os.write(write_end, view):]
        finally:
            os._exit(code)
    os.close(write_end)
    if not _is_test_child:
        try:
            os.setpgid(pid, pid)  # also here: no race with the child's own call
        except OSError:
            pass  # the child already exited (or already did it)
        _live_groups.add(pid)
    return Child(pid, read_end, kind)


def _kill_group(pid: int) -> None:
    try:
        if pid in _live_groups:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_leftover_children() -> int:
    """Kill and reap every child family start_child made and nobody waited for; returns how many."""
    killed = 0
    for pid in list(_live_groups):
        _kill_group(pid)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        _live_groups.discard(pid)
        killed += 1
    return killed


def run_in_child(fn: Callable[[], Any], *, kind: str = "os", timeout: float = 30.0) -> Any:
    """Run ``fn`` in a child forked by ``kind`` and return what it returned (pickled back).

    Raises ChildFailed with the child's traceback if it raised, exited
    abnormally or overran ``timeout``.
    """
    return start_child(fn, kind=kind).result(timeout)


def fd_numbers() -> Iterator[Tuple[int, str]]:
    """This process's open descriptors with what each refers to (from /proc/self/fd)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            yield int(name), os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
