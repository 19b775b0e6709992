"""Measurement 2: fork cost with 0/10/100/1000 live sockets with tcp connections.

Each case runs in its own worker process (this file with ``--worker``); the
only difference between modes is which alternative makes the N PUSH sockets
(and, for "zmqfork", that zmqfork is imported at all; the "raw" worker never
loads it).  Every worker has the same shape: a raw pyzmq PULL sink bound on
tcp, N PUSH sockets connected to it, one message per socket received (so each
socket has a live tcp connection: 2 fds plus its mailbox), then ``os.fork()``
repeated.  Per fork:

- parent latency: ``perf_counter_ns`` before ``os.fork()`` to its return in the parent;
- child start: the same start stamp to the child's first Python instruction
  after ``os.fork()`` returns (CLOCK_MONOTONIC is system-wide), which
  includes every atfork handler and ``register_at_fork`` hook.

Each worker, its libzmq threads and its children run on one CPU (the
first the driver may use): unpinned, a fork must also flush the TLB of the
CPU where a libzmq thread last ran, and each worker's ``fork()`` took either
about 210 or about 480 us at random, whatever the mode.

The child's start is also split.  zmqfork's child reports how long its
descriptor cleanup took (``fds_cleanup_ns``, timed inside the atfork handler)
and how many it closed, so "everything else" is the child's start minus the
cleanup.  The cleanup is set beside two floors, run by the raw child after its
stamp over the same descriptors (every one opened since before the first
context), on alternate forks (``closeloop.c``): a plain C loop of ``close()``,
the floor of any cleanup; and the checks zmqfork's cleanup makes, without its
table (``fstat()`` per socket, ``fcntl()`` per eventfd or epoll,
``close_range()`` per run), the floor of a cleanup that must not close a
descriptor the application put at one of the numbers.

The driver interleaves workers: each round runs every (mode, N) once, in
rotating order; the first forks of each worker are warm-up and discarded.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MODES = ("raw", "pidcheck", "atfork", "zmqfork")
NOT_RUN = -2  # a floor this fork did not run (the loops return -1 when a call failed)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def worker(mode: str, nsockets: int, forks: int, warmup: int, closeloop: str) -> Dict[str, Any]:
    from common import pin_to_one_cpu

    pin_to_one_cpu()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 3 * nsockets + 256) if hard != resource.RLIM_INFINITY else 3 * nsockets + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    import zmq

    import alternatives
    from common import free_tcp_endpoint, read_line, wait_child

    alt = alternatives.get(mode)
    counts: Callable[[], Dict[str, int]] = lambda: {}
    if mode == "zmqfork":
        from zmqfork import _native

        counts = _native.fdtrack_counts
    before = {fd for fd in (int(name) for name in os.listdir("/proc/self/fd")) if is_open(fd)}
    sink_ctx = zmq.Context()
    sink_ctx.set(zmq.MAX_SOCKETS, nsockets + 64)
    sink = sink_ctx.socket(zmq.PULL)
    sink.set(zmq.BACKLOG, nsockets + 64)  # else connects beyond the default 100 wait for SYN retries
    addr = free_tcp_endpoint()
    sink.bind(addr)
    ctx = alt.Context()
    ctx.set(zmq.MAX_SOCKETS, nsockets + 64)
    socks = []
    for _ in range(nsockets):
        s = ctx.socket(zmq.PUSH)
        s.set(zmq.LINGER, 0)
        s.connect(addr)
        socks.append(s)
    for s in socks:
        s.send(b"x")
    sink.set(zmq.RCVTIMEO, 10000)
    for _ in range(nsockets):
        sink.recv()
    fds = len(os.listdir("/proc/self/fd"))
    # libzmq's descriptors (the sink's too, which zmqfork also closes), and the plain C loops that close them;
    # not the listing's own directory descriptor, closed by now (a child's pipe would take its number).
    listed = (int(name) for name in os.listdir("/proc/self/fd"))
    libzmq_fds = sorted(fd for fd in listed if fd not in before and is_open(fd))
    close_array = (ctypes.c_int * len(libzmq_fds))(*libzmq_fds)
    anonymous = (ctypes.c_ubyte * len(libzmq_fds))(
        *(os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:") for fd in libzmq_fds))
    inodes = (ctypes.c_uint64 * len(libzmq_fds))(*(os.fstat(fd).st_ino for fd in libzmq_fds))
    floors = ctypes.CDLL(closeloop) if closeloop and mode == "raw" else None
    if floors is not None:
        floors.close_loop.restype = floors.check_close_loop.restype = ctypes.c_long
    with open("/proc/self/maps") as f:
        mappings = sum(1 for _ in f)
    with open("/proc/self/status") as f:
        rss_kib = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), None)
    parent_ns: List[int] = []
    child_ns: List[int] = []
    cleanup_ns: List[int] = []
    rest_ns: List[int] = []  # the child's start without its descriptor cleanup
    closed: List[int] = []
    # The floors' times per descriptor (each worker divides by its own count), and the floors that failed.
    loop_per_fd: List[float] = []
    check_per_fd: List[float] = []
    floor_failures = 0
    failures = 0
    for i in range(warmup + forks):
        r, w = os.pipe()
        t0 = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:
            tc = time.perf_counter_ns()
            try:
                done = counts()
                loop = check = NOT_RUN
                if floors is not None and i % 2:
                    check = floors.check_close_loop(close_array, anonymous, inodes, len(libzmq_fds))
                elif floors is not None:
                    loop = floors.close_loop(close_array, len(libzmq_fds))
                os.write(w, b"%d %d %d %d %d\n" % (tc, done.get("cleanup_ns", -1), done.get("closed_last", -1),
                                                   loop, check))
            finally:
                os._exit(0)
        t1 = time.perf_counter_ns()
        os.close(w)
        line = read_line(r, 10.0)
        os.close(r)
        status = wait_child(pid, 10.0)
        if not line or status is None:
            failures += 1
            continue
        if i >= warmup:
            tc, cleanup, closed_now, loop, check = map(int, line.split())
            parent_ns.append(t1 - t0)
            child_ns.append(tc - t0)
            if cleanup >= 0:
                cleanup_ns.append(cleanup)
                closed.append(closed_now)
                rest_ns.append(tc - t0 - cleanup)
            for ns, into in ((loop, loop_per_fd), (check, check_per_fd)):
                if ns >= 0:
                    into.append(ns / len(libzmq_fds))
                elif ns != NOT_RUN:
                    floor_failures += 1
    for s in socks:
        s.close(0)
    sink.close(0)
    return {"parent_ns": parent_ns, "child_ns": child_ns, "fds": fds, "failures": failures,
            "cleanup_ns": cleanup_ns, "child_rest_ns": rest_ns, "closed": closed,
            "loop_per_fd": loop_per_fd, "check_per_fd": check_per_fd, "floor_failures": floor_failures,
            "libzmq_fds": len(libzmq_fds),
            "mappings": mappings, "rss_kib": rss_kib,
            "zmqfork_loaded": "zmqfork" in sys.modules}


#: Per-fork samples a worker returns, pooled over its rounds.
SAMPLES = ("parent_ns", "child_ns", "cleanup_ns", "child_rest_ns", "loop_per_fd", "check_per_fd", "closed")


def run(quick: bool, log: Callable[[str], None]) -> Dict[str, Any]:
    from common import compile_shared, rotations, summary

    counts = (0, 10, 100) if quick else (0, 10, 100, 1000)
    rounds, forks, warmup = (2, 6, 2) if quick else (6, 25, 5)
    samples: Dict[tuple, Dict[str, List[int]]] = {(m, n): {k: [] for k in SAMPLES} for m in MODES for n in counts}
    info: Dict[tuple, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="zmqfork-forkcost-") as where:
        try:
            closeloop = compile_shared(os.path.join(HERE, "closeloop.c"), os.path.join(where, "closeloop.so"))
        except (RuntimeError, subprocess.SubprocessError) as exc:
            closeloop = ""
            log(f"  fork cost: no plain close() loop to compare the cleanup with ({exc})")
        for rnd, order in rotations([(m, n) for n in counts for m in MODES], rounds):
            for mode, n in order:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode, "--sockets", str(n),
                       "--forks", str(forks), "--warmup", str(warmup), "--closeloop", closeloop]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                    data = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
                except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
                    out, data = None, None
                    info.setdefault((mode, n), {})["error"] = repr(exc)
                if data is None:
                    err = out.stderr.strip().splitlines()[-1:] if out is not None else []
                    info.setdefault((mode, n), {})["error"] = f"worker failed: {err}"
                    continue
                for key in SAMPLES:
                    samples[mode, n][key] += data[key]
                meta = info.setdefault((mode, n), {})
                for key in ("fds", "mappings", "rss_kib", "zmqfork_loaded", "libzmq_fds"):
                    meta[key] = data[key]
                meta["failures"] = meta.get("failures", 0) + data["failures"]
                meta["floor_failures"] = meta.get("floor_failures", 0) + data["floor_failures"]
            log(f"  fork-cost round {rnd + 1}/{rounds}")
    result: Dict[str, Any] = {"rounds": rounds, "forks_per_worker": forks, "warmup_forks": warmup,
                              "cases": {}}
    for n in counts:
        row: Dict[str, Any] = {}
        for mode in MODES:
            cell = dict(info.get((mode, n), {}))
            got = samples[mode, n]
            cell["parent"] = summary(got["parent_ns"])
            cell["child"] = summary(got["child_ns"])
            if got["cleanup_ns"]:
                cell["cleanup"] = summary(got["cleanup_ns"])
                cell["child_rest"] = summary(got["child_rest_ns"])
                cell["closed"] = max(got["closed"])
                cell["cleanup_per_fd"] = summary([ns / c for ns, c in zip(got["cleanup_ns"], got["closed"]) if c])
            if got["loop_per_fd"]:
                cell["close_loop_per_fd"] = summary(got["loop_per_fd"])
            if got["check_per_fd"]:
                cell["check_loop_per_fd"] = summary(got["check_per_fd"])
            row[mode] = cell
        for mode in MODES:
            for key in ("parent", "child", "child_rest"):
                raw, mine = row["raw"]["child" if key == "child_rest" else key], row[mode].get(key)
                if raw and mine:
                    mine["ratio_to_raw"] = mine["median"] / raw["median"]
        result["cases"][str(n)] = row
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--mode", choices=MODES, default="raw")
    p.add_argument("--sockets", type=int, default=0)
    p.add_argument("--forks", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--closeloop", default="", help="closeloop.c built as a shared object (the raw child runs it)")
    a = p.parse_args()
    if not a.worker:
        print(json.dumps(run(True, lambda m: print(m, file=sys.stderr)), indent=1))
    else:
        print(json.dumps(worker(a.mode, a.sockets, a.forks, a.warmup, a.closeloop)))
