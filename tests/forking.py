"""Test helpers that fork: run a function in a child made by os.fork, libc fork or a raw syscall.

The child sends its result (or its traceback) down a pipe and exits with a
status; the parent waits with a timeout, kills the child if it overruns, and
raises if the child failed.  No child is ever left behind.  Forking itself,
waiting, reading and listing open descriptors are zmqfork's own helpers
(zmqfork._children, used by ``python -m zmqfork doctor``); this module adds
pickled results, exceptions and process groups for tests.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import signal
import subprocess
import time
import traceback
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Set, Tuple

from zmqfork._children import FORK_KINDS as _KIND_NAMES
from zmqfork._children import fork_by as fork_with
from zmqfork._children import kill_family, open_fds, read_until_eof, wait_or_kill, write_all

__all__ = [
    "FORK_KINDS",
    "Child",
    "ChildFailed",
    "at_descriptor_limit",
    "descriptor_fate",
    "fork_with",
    "kill_leftover_children",
    "open_fds",
    "run_in_child",
    "run_session",
    "start_child",
    "wait_child",
]

#: How a child can be made: Python's os.fork (atfork handlers + Python hooks),
#: libc fork() through ctypes (atfork handlers only), a raw clone syscall
#: (neither: only the wipe-on-fork page can tell).
FORK_KINDS = tuple(_KIND_NAMES)


# Process groups of the children start_child made and has not reaped yet.
# Each test child leads its own group, which its descendants join, so that
# one killpg() ends a whole family even if the test itself was interrupted.
_live_groups: Set[int] = set()
_is_test_child = False


class ChildFailed(AssertionError):
    """The child raised, exited non-zero, or overran its timeout."""


def wait_child(pid: int, timeout: float) -> int:
    """Wait for ``pid`` up to ``timeout`` seconds; kill its family on overrun. Returns its wait status."""
    status = wait_or_kill(pid, timeout)
    if status is None:
        raise ChildFailed(f"child {pid} did not finish within {timeout}s and was killed")
    return status


class Child:
    """A forked child running a function; ``result()`` waits for what it returned."""

    def __init__(self, pid: int, read_end: int, kind: str) -> None:
        self.pid = pid
        self.kind = kind
        self._read_end = read_end

    def result(self, timeout: float = 30.0) -> Any:
        """Wait up to ``timeout`` seconds; return the child's value or raise ChildFailed."""
        try:
            data = read_until_eof(self._read_end, time.monotonic() + timeout)
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
            write_all(write_end, payload)
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


def kill_leftover_children() -> int:
    """Kill and reap every child family start_child made and nobody waited for; returns how many."""
    killed = 0
    for pid in list(_live_groups):
        kill_family(pid)
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


def run_session(argv: Sequence[str], *, env: Optional[Dict[str, str]] = None, timeout: float) -> Tuple[int, str, str]:
    """Run ``argv`` in a session of its own, with ``env`` added to this environment.

    Returns (exit status, stdout, stderr).  Raises AssertionError if it
    overruns ``timeout`` seconds; either way, whatever it left running in its
    session is killed.
    """
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_family(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(argv)} overran {timeout}s\nstdout:\n{out}\nstderr:\n{err}") from None
    finally:
        try:  # anything it left behind in its session
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return proc.returncode, out, err


@contextlib.contextmanager
def at_descriptor_limit() -> Iterator[None]:
    """Inside, every descriptor number below the soft limit is taken: the next one opened fails with EMFILE.

    Fills each free number up to the highest open one with /dev/null and lowers
    the limit to just above it; restores the limit and closes the fillers after.
    """
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    fillers = []
    while True:
        fd = os.open(os.devnull, os.O_RDONLY)
        if fd > highest:
            os.close(fd)
            break
        fillers.append(fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in fillers:
            os.close(fd)


def descriptor_fate(fd: int, untracked_before: int) -> str:
    """In a child after its cleanup: "closed", or "open, counted" / "open, not counted" as an untracked descriptor."""
    from zmqfork import _native

    try:
        os.fstat(fd)
    except OSError:
        return "closed"
    return "open, counted" if _native.fdtrack_counts()["untracked"] > untracked_before else "open, not counted"
