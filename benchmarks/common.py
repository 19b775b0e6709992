"""Shared helpers for the benchmarks: statistics, environment description, forking, child control.

Everything here is standard library plus pyzmq; zmqfork itself is imported
only by the modules that measure it, so a "without zmqfork" process really
never loads it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import select
import signal
import statistics
import sys
import time
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

#: Order in which alternatives appear everywhere (tables, JSON, interleaving).
ALTERNATIVES = ("raw", "pidcheck", "atfork", "zmqfork")
#: The per-call measurement adds zmqfork reached through patch() and zmqfork's hot path without its check.
PERCALL_ALTERNATIVES = ALTERNATIVES + ("patched", "checkfree")
ALT_LABEL = {
    "raw": "raw pyzmq",
    "pidcheck": "pid-check proxy",
    "atfork": "register_at_fork proxy",
    "zmqfork": "zmqfork",
    "patched": "zmqfork via patch()",
    "checkfree": "check-free subclass",
}

FORK_KINDS = ("os", "libc", "raw")
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}
# PyDLL keeps the GIL held across the call: the child starts owning it.
_libc = ctypes.PyDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def fork_with(kind: str) -> int:
    """Fork by ``kind``: "os" (os.fork), "libc" (libc fork() via ctypes), "raw" (clone syscall)."""
    if kind == "os":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")
            return os.fork()
    if kind == "libc":
        pid = _libc.fork()
    elif kind == "raw":
        number = _SYS_CLONE.get(platform.machine())
        if number is None:
            raise RuntimeError(f"no clone syscall number known for {platform.machine()}")
        pid = _libc.syscall(number, int(signal.SIGCHLD), 0, 0, 0, 0)
    else:
        raise ValueError(f"unknown fork kind {kind!r}")
    if pid < 0:
        raise OSError(ctypes.get_errno(), f"{kind} fork failed")
    return int(pid)


def wait_child(pid: int, timeout: float) -> Optional[int]:
    """Wait for ``pid`` up to ``timeout`` s; SIGKILL and reap it on overrun (returns None then)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return None
        time.sleep(0.001)


def read_line(fd: int, timeout: float, until_eof: bool = False) -> bytes:
    """Read from ``fd`` until a newline (or only EOF, with ``until_eof``), EOF or ``timeout``; returns what was read."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(max(1, int(remaining * 1000))):
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n") and not until_eof:
            break
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def pin_to_one_cpu() -> None:
    """Run this process, the threads it starts (libzmq's) and its children on one CPU, the first it may use.

    With libzmq's threads on another CPU, a fork's copy-on-write protection
    must flush that CPU's TLB too: a worker's fork() took either about 210 or
    about 480 us at random, for every mode alike, drowning the differences
    measured.  Call it first thing in a worker, before any thread starts.
    """
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def compile_shared(source: str, out: str) -> str:
    """Compile one C file into the shared object ``out`` with the system's compiler (-O2); RuntimeError if none."""
    import shutil
    import subprocess

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", out, source], check=True, capture_output=True, timeout=120)
    return out


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def raise_nofile(want: int) -> None:
    """Raise this process's soft ``RLIMIT_NOFILE`` to ``want``, or to the hard limit if that is lower; never lowers it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def rotations(items: Sequence[T], rounds: int) -> Iterator[Tuple[int, List[T]]]:
    """``(round, order)`` for ``rounds`` rounds of ``items``, each round's order rotated one place further.

    Interleaving this way spreads drifts of the machine (load, frequency,
    page cache) over every item, and no item always runs first.
    """
    for rnd in range(rounds):
        shift = rnd % len(items)
        yield rnd, list(items[shift:]) + list(items[:shift])


# ---- statistics ---------------------------------------------------------------


def summary(values: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles, min, max and count of ``values`` (empty dict if none)."""
    vals = sorted(values)
    if not vals:
        return {}
    if len(vals) >= 4:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1, q3 = vals[0], vals[-1]
    return {
        "median": statistics.median(vals),
        "q1": q1,
        "q3": q3,
        "min": vals[0],
        "max": vals[-1],
        "n": len(vals),
    }


def fmt_ns(ns: Optional[float]) -> str:
    """A duration in ns, printed with a unit that keeps it short."""
    if ns is None:
        return "-"
    if abs(ns) < 10_000:
        return f"{ns:.0f} ns"
    if abs(ns) < 10_000_000:
        return f"{ns / 1000:.1f} µs"
    return f"{ns / 1e6:.1f} ms"


def fmt_cell(s: Optional[Dict[str, float]]) -> str:
    """Median with its interquartile range."""
    if not s:
        return "-"
    return f"{fmt_ns(s['median'])} [{fmt_ns(s['q1'])}–{fmt_ns(s['q3'])}]".replace(" ns]", "]")


# ---- environment ----------------------------------------------------------------


def environment(with_zmqfork: bool = True) -> Dict[str, object]:
    import zmq

    env: Dict[str, object] = {
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "kernel": platform.release(),
        "system": platform.system(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "glibc": "-".join(platform.libc_ver()),
        "hostname": platform.node(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        env["loadavg_at_start"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    try:
        import subprocess

        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()

        env["git_commit"] = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "src", "csrc")
        env["zmqfork_tree"] = "clean" if not dirty else "uncommitted changes: " + ", ".join(
            line[3:] for line in dirty.splitlines())
    except Exception:
        pass
    if with_zmqfork:
        try:
            import zmqfork

            env["zmqfork"] = zmqfork.__version__
            env["zmqfork_detection"] = repr(zmqfork.detection())
        except Exception as exc:  # reported, never fatal
            env["zmqfork"] = f"unavailable: {exc!r}"
    return env


def free_tcp_endpoint() -> str:
    """tcp://127.0.0.1:<port> with a port free right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def chunks(seq: Iterable, n: int) -> List[list]:
    out: List[list] = []
    cur: list = []
    for x in seq:
        cur.append(x)
        if len(cur) == n:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out
