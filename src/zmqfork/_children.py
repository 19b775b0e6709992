"""Forking a child by each kind of fork, for ``python -m zmqfork doctor`` and ``demo``.

A child made here runs one function, writes its JSON result down a pipe and
exits; the parent reads with a deadline and kills a child that overruns.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import select
import signal
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

__all__ = ["FORK_KINDS", "ChildOutcome", "fork_by", "unavailable_reason", "run_in_child", "wait_or_kill", "read_until_eof", "write_all", "kill_family", "open_fds", "wait_for_other_threads_to_wait"]

#: The kinds of fork, with how the report names them: Python's os.fork (atfork
#: handlers and Python hooks), libc fork() called from C (atfork handlers
#: only), the raw clone syscall (neither: only the wipe-on-fork page sees it).
FORK_KINDS: Dict[str, str] = {"os": "os.fork()", "libc": "libc fork()", "raw": "raw clone syscall"}

_SYS_CLONE = {"x86_64": 56, "aarch64": 220}
# Syscalls a thread sleeps in while it holds no libc lock: waiting for I/O, a
# timer, a child or a futex (a futex waiter wants a lock, it does not hold it),
# or resuming one of those after a signal (restart_syscall).
_WAITING_SYSCALLS = {
    # read, poll, select, nanosleep, accept, recvfrom, wait4, futex, restart_syscall,
    # clock_nanosleep, epoll_wait, pselect6, ppoll, epoll_pwait, accept4, epoll_pwait2
    "x86_64": {0, 7, 23, 35, 43, 45, 61, 202, 219, 230, 232, 270, 271, 281, 288, 441},
    # epoll_pwait, read, pselect6, ppoll, futex, nanosleep, clock_nanosleep, restart_syscall,
    # accept, recvfrom, accept4, wait4, epoll_pwait2
    "aarch64": {22, 63, 72, 73, 98, 101, 115, 128, 202, 207, 242, 260, 441},
}
#: How long a raw clone waits for the other threads to go quiet before it forks anyway.
RAW_CLONE_QUIET_WAIT = 2.0
# PyDLL keeps the GIL held across the call, so the child starts owning it.
_libc = ctypes.PyDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def unavailable_reason(kind: str) -> Optional[str]:
    """Why this platform cannot fork by ``kind``, or None if it can."""
    if kind == "raw" and (not platform.system() == "Linux" or platform.machine() not in _SYS_CLONE):
        return f"no raw clone syscall known for {platform.system()} {platform.machine()}"
    return None


def fork_by(kind: str) -> int:
    """Fork by ``kind`` (a FORK_KINDS key): 0 in the child, the child's pid in the parent."""
    if kind == "os":
        with warnings.catch_warnings():
            # Python 3.12+ warns that forking with threads (libzmq's) is unsafe; this is the point.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")
            return os.fork()
    if kind == "libc":
        pid = int(_libc.fork())
    elif kind == "raw":
        reason = unavailable_reason(kind)
        if reason is not None:
            raise OSError(reason)
        wait_for_other_threads_to_wait(RAW_CLONE_QUIET_WAIT)  # best effort: a busy thread does not stop it
        pid = int(_libc.syscall(_SYS_CLONE[platform.machine()], int(signal.SIGCHLD), 0, 0, 0, 0))
    else:
        raise ValueError(f"unknown fork kind {kind!r}; choose from {', '.join(FORK_KINDS)}")
    if pid < 0:
        raise OSError(ctypes.get_errno(), f"{FORK_KINDS[kind]} failed")
    return pid


def wait_for_other_threads_to_wait(timeout: float, samples: int = 3) -> list[tuple[str, str]]:
    """Wait until every other thread sleeps in a waiting syscall, ``samples`` checks in a row.

    Returns the threads still busy at ``timeout`` (tid, syscall), or [] once
    they all wait.  A raw clone copies the locks other threads hold at that
    instant (glibc's malloc arenas among them) and, unlike libc fork(),
    nothing resets them in the child: a child whose first allocation wants
    such a lock waits forever.  libzmq's I/O threads are busy for a moment
    after each connect or send, so a raw clone is best made once they are
    back in epoll_wait.
    """
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while True:
        busy = _busy_threads()
        in_a_row = 0 if busy else in_a_row + 1
        if in_a_row >= samples or time.monotonic() >= deadline:
            return busy
        time.sleep(0.0005)


def _busy_threads() -> list[tuple[str, str]]:
    """The other threads of this process not sleeping in a waiting syscall: (tid, what /proc says)."""
    waiting = _WAITING_SYSCALLS.get(platform.machine(), set())
    me = str(threading.get_native_id())
    busy = []
    for tid in os.listdir("/proc/self/task"):
        if tid == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/syscall") as f:
                call = f.read().split(maxsplit=1)[:1] or ["running"]
        except OSError:
            continue  # the thread ended
        if not (call[0].isdigit() and int(call[0]) in waiting):
            busy.append((tid, call[0]))
    return busy


def wait_or_kill(pid: int, timeout: float) -> Optional[int]:
    """Wait up to ``timeout`` seconds for ``pid``; kill it on overrun. Its wait status, None if killed."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            kill_family(pid)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.005)


def kill_family(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads, or ``pid`` alone if it leads none."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone


@dataclass(frozen=True)
class ChildOutcome:
    """What a child reported: its JSON value, or an error (traceback, overrun, bad exit)."""

    pid: int
    value: Any = None
    error: Optional[str] = None


def run_in_child(fn: Callable[[], Any], kind: str, timeout: float) -> ChildOutcome:
    """Fork by ``kind``, run ``fn`` in the child and return what it returned (JSON round-trip).

    Never raises for a child's failure: the outcome says what went wrong.
    """
    read_end, write_end = os.pipe()
    pid = fork_by(kind)
    if pid == 0:  # child: report, then leave without running the parent's cleanup
        code = 1
        try:
            os.close(read_end)
            try:
                payload = json.dumps({"ok": fn()}).encode()
                code = 0
            except BaseException:
                payload = json.dumps({"error": traceback.format_exc()}).encode()
            write_all(write_end, payload)
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    try:
        data = read_until_eof(read_end, deadline)
    finally:
        os.close(read_end)
        status = wait_or_kill(pid, max(0.0, deadline - time.monotonic()) + 1.0)
    if status is None:
        return ChildOutcome(pid, error=f"the child did not finish within {timeout:g}s and was killed")
    try:
        report = json.loads(data) if data else {"error": f"the child reported nothing (wait status {status})"}
    except ValueError:
        report = {"error": f"the child's report was cut short (wait status {status})"}
    if "error" in report:
        return ChildOutcome(pid, error=str(report["error"]))
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        return ChildOutcome(pid, error=f"the child exited with wait status {status}")
    return ChildOutcome(pid, value=report["ok"])


def write_all(fd: int, payload: bytes) -> None:
    """Write all of ``payload`` to ``fd``, however many writes it takes."""
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view) :]


def read_until_eof(fd: int, deadline: float) -> bytes:
    """Everything readable from ``fd`` until EOF or ``deadline`` (a time.monotonic() value)."""
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


def open_fds() -> frozenset[int]:
    """The descriptors open in this process now."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(listing)
        except OSError:
            continue
        # listdir itself had one open: keep only those still open afterwards.
        return frozenset(fd for fd in map(int, names) if _is_open(fd))
    return frozenset(fd for fd in range(min(os.sysconf("SC_OPEN_MAX"), 65536)) if _is_open(fd))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
