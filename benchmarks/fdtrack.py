"""Measurement 6: what descriptor tracking costs: a hooked call, and the child's cleanup.

Every figure compares hooked ("on") with unhooked ("off") calls.  Parts 2
and 3 run worker processes of the same shape with and without
``ZMQFORK_DISABLE=fdtrack``; both import zmqfork, only the environment
differs, and each worker checks that tracking really is on or off.

1. The wrapper alone.  ``tests/native/hooktarget.c`` is compiled once and
   copied; one worker loads both copies with ctypes and hooks one of them with
   ``_native.testing_fdtrack_hook_object`` (what the tests use;
   ``fdtrack_install`` hooks one object per process and has hooked libzmq
   already).  Its C loops make one hooked call per iteration (``close(-1)``:
   EBADF, no descriptor touched) or two (``eventfd`` + ``close``); the copies
   alternate in rotating order after warm-up.
2. A libzmq operation made of hooked calls: ``zmq_socket`` + ``zmq_close``
   through ctypes (no pyzmq wrapper) in a context that already has a socket.
   ``strace -f`` counts two hooked calls per cycle: ``eventfd2`` for the new
   socket's mailbox, on the calling thread, and its ``close``, on libzmq's
   reaper thread.  So a repetition is timed in process CPU time (all threads)
   and ends once the descriptor count is back where it started.  One
   persistent worker per mode; the driver asks them for repetitions in turn.
3. The child's cleanup: N PUSH sockets with live tcp connections to a PULL
   sink, then ``os.fork()`` repeated.  Child start is the parent's stamp
   before the fork to the child's first instruction; the atfork child handler
   runs inside fork(), so it includes the closing.  The child also reports
   its own CPU time at that instruction: a new process's CPU clock starts at
   zero, so this leaves out the parent's copying of the page tables and the
   wait to be scheduled, which dominate the noise of the wall time.  And it
   reports how many descriptors the cleanup closed and how many it still
   holds.  One worker per (mode, N) per round, in rotating order, as in
   ``forkcost.py``.

"Per hooked call" and "per closed descriptor" are medians of paired
differences (on - off, per repetition or per round), divided by the count.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (  # noqa: E402
    REPO,
    compile_shared,
    fd_count,
    fork_with,
    free_tcp_endpoint,
    read_line,
    rotations,
    summary,
    wait_child,
    write_all,
)

#: "on": the hooks installed at import; "off": ``ZMQFORK_DISABLE=fdtrack``.
MODES = ("on", "off")
#: hooktarget's timing loops and the hooked calls each iteration makes.
LOOPS = {"t_loop_close_bad": 1, "t_loop_eventfd_close": 2}
#: The child's times: from the parent's stamp before fork() (wall), and its own CPU time, both to its first instruction.
CHILD_TIMES = ("child_ns", "child_cpu_ns")
#: zmq_socket + zmq_close: eventfd (the mailbox) and its close, counted once with strace -f.
SOCKET_CYCLE_CALLS = 2
HOOKTARGET = os.path.join(REPO, "tests", "native", "hooktarget.c")


def _env(mode: str) -> Dict[str, str]:
    """This process's environment with ``fdtrack`` added to or removed from ``$ZMQFORK_DISABLE``."""
    env = dict(os.environ)
    names = [n.strip() for n in env.pop("ZMQFORK_DISABLE", "").split(",") if n.strip() not in ("", "fdtrack")]
    if mode == "off":
        names.append("fdtrack")
    if names:
        env["ZMQFORK_DISABLE"] = ",".join(names)
    return env


def _worker_cmd(kind: str, *args: str) -> List[str]:
    """The command line that runs this file as a ``kind`` worker."""
    return [sys.executable, os.path.abspath(__file__), "--worker", kind, *args]


def _check_mode(mode: str) -> None:
    """Raise unless descriptor tracking is on exactly when ``mode`` says it should be."""
    import zmqfork

    on = zmqfork.detection().fdtrack
    if on != (mode == "on"):
        raise RuntimeError(f"mode {mode} but descriptor tracking is {'on' if on else 'off'}")


def _paired(on: Sequence[Optional[float]], off: Sequence[Optional[float]], count: float) -> Dict[str, float]:
    """Summary of (on - off) / count over pairs taken in the same repetition or round (None: no sample)."""
    return summary([(a - b) / count for a, b in zip(on, off) if a is not None and b is not None])


# ---- 1. the wrapper alone ----------------------------------------------------------------


def wrapper_worker(hooked: str, plain: str, iterations: int, reps: int, warmup: int) -> Dict[str, Any]:
    """ns per iteration of each hooktarget loop in the hooked and the plain copy, alternating."""
    from zmqfork import _native

    libs = {"hooked": ctypes.CDLL(hooked), "plain": ctypes.CDLL(plain)}
    status = _native.testing_fdtrack_hook_object(hooked)
    if status != _native.FDTRACK_ON:
        raise RuntimeError(f"hooking {hooked} failed with status {status}")
    for copy, lib in libs.items():  # only the hooked copy's descriptors reach the table
        fd = lib.t_eventfd(0, os.EFD_CLOEXEC)
        if _native.fdtrack_is_tracked(fd) != (copy == "hooked"):
            raise RuntimeError(f"the {copy} copy's eventfd is {'' if copy == 'plain' else 'not '}tracked")
        lib.t_close(fd)
        for loop in LOOPS:
            getattr(lib, loop).restype = ctypes.c_long
            getattr(lib, loop).argtypes = [ctypes.c_long]
    samples: Dict[str, Dict[str, List[float]]] = {loop: {copy: [] for copy in libs} for loop in LOOPS}
    order = [(loop, copy) for loop in LOOPS for copy in libs]
    for rep, rotated in rotations(order, warmup + reps):
        for loop, copy in rotated:
            t0 = time.perf_counter_ns()
            done = getattr(libs[copy], loop)(iterations)
            elapsed = time.perf_counter_ns() - t0
            if done != iterations:  # every close(-1) fails, every eventfd succeeds
                raise RuntimeError(f"{loop} in the {copy} copy counted {done} of {iterations}")
            if rep >= warmup:
                samples[loop][copy].append(elapsed / iterations)
    return samples


def _build_hooktarget(directory: str) -> List[str]:
    """Compile hooktarget.c and copy it: [to be hooked, to stay plain] (two files, so two loaded objects)."""
    hooked, plain = (os.path.join(directory, f"hooktarget-{copy}.so") for copy in ("hooked", "plain"))
    compile_shared(HOOKTARGET, hooked)
    shutil.copyfile(hooked, plain)
    return [hooked, plain]


def _run_worker(mode: str, args: List[str], timeout: float) -> Any:
    """Run a one-shot worker in ``mode``'s environment; its last stdout line, parsed."""
    out = subprocess.run(_worker_cmd(*args), env=_env(mode), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} worker ({mode}) failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wrapper(quick: bool) -> Dict[str, Any]:
    """Part 1: ns per iteration of each hooktarget loop, hooked and plain, and per hooked call."""
    iterations, reps, warmup = (10_000, 5, 2) if quick else (50_000, 20, 3)
    with tempfile.TemporaryDirectory(prefix="zmqfork-bench-") as directory:
        paths = _build_hooktarget(directory)
        samples = _run_worker("on", ["wrapper", *paths, "--iterations", str(iterations), "--reps", str(reps),
                                     "--warmup", str(warmup)], timeout=300)
    loops = {}
    for loop, calls in LOOPS.items():
        on, off = samples[loop]["hooked"], samples[loop]["plain"]
        loops[loop] = {"hooked_calls": calls, "on": summary(on), "off": summary(off),
                       "per_call": _paired(on, off, calls)}
    return {"iterations": iterations, "repetitions": reps, "warmup": warmup, "loops": loops}


# ---- 2. zmq_socket + zmq_close -------------------------------------------------------------


def socket_cycle_worker(mode: str, batch: int) -> None:
    """Per line on stdin, time ``batch`` zmq_socket+zmq_close cycles; print process CPU ns per cycle.

    The first line printed describes the worker: how many tracked descriptors
    one socket adds and how many are left after closing (1 and 0 with hooks on).
    """
    import zmq

    from zmqfork import _descriptors, _native

    _check_mode(mode)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, batch + 64)  # zmq_close frees the slot only when the reaper gets to it
    keep = ctx.socket(zmq.PULL)  # the reaper and I/O threads exist before the first cycle
    libzmq = ctypes.CDLL(_descriptors.backend_path())  # dlsym searches the backend's dependencies
    libzmq.zmq_socket.restype = ctypes.c_void_p
    libzmq.zmq_socket.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libzmq.zmq_close.argtypes = [ctypes.c_void_p]
    address, push = ctx.underlying, int(zmq.PUSH)
    baseline = fd_count()

    def settle() -> None:
        """Wait until the reaper has closed every mailbox."""
        deadline = time.monotonic() + 30
        while fd_count() != baseline:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{fd_count()} descriptors open, {baseline} expected")
            time.sleep(0.0002)

    tracked = _native.fdtrack_counts()["tracked"]
    probe = [libzmq.zmq_socket(address, push) for _ in range(16)]
    per_socket = (_native.fdtrack_counts()["tracked"] - tracked) / len(probe)
    for sock in probe:
        libzmq.zmq_close(sock)
    settle()
    print(json.dumps({"tracked_per_socket": per_socket,
                      "tracked_left_after_close": _native.fdtrack_counts()["tracked"] - tracked}), flush=True)
    for _ in sys.stdin:
        t0 = time.process_time_ns()
        for _ in range(batch):
            sock = libzmq.zmq_socket(address, push)
            if not sock:
                raise RuntimeError("zmq_socket failed")
            libzmq.zmq_close(sock)
        settle()
        print(json.dumps((time.process_time_ns() - t0) / batch), flush=True)
    keep.close(0)
    ctx.term()


def _socket_cycles(quick: bool) -> Dict[str, Any]:
    """Part 2: CPU ns per zmq_socket+zmq_close cycle in two persistent workers, asked in turn."""
    batch, reps, warmup = (500, 6, 2) if quick else (2000, 40, 4)
    procs = {mode: subprocess.Popen(_worker_cmd("socket-cycle", "--mode", mode, "--batch", str(batch)),
                                    env=_env(mode), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
             for mode in MODES}

    def answer(mode: str) -> Any:
        line = read_line(procs[mode].stdout.fileno(), 60.0)  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"socket-cycle worker ({mode}) stopped answering")
        return json.loads(line)

    try:
        info = {mode: answer(mode) for mode in MODES}
        samples: Dict[str, List[float]] = {mode: [] for mode in MODES}
        for rep in range(warmup + reps):
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                write_all(procs[mode].stdin.fileno(), b"go\n")  # type: ignore[union-attr]
                ns = answer(mode)
                if rep >= warmup:
                    samples[mode].append(ns)
    finally:
        for proc in procs.values():
            proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    result: Dict[str, Any] = {"batch": batch, "repetitions": reps, "warmup": warmup,
                              "hooked_calls": SOCKET_CYCLE_CALLS,
                              "per_call": _paired(samples["on"], samples["off"], SOCKET_CYCLE_CALLS)}
    for mode in MODES:
        result[mode] = {**summary(samples[mode]), **info[mode]}
    return result


# ---- 3. the child's cleanup ----------------------------------------------------------------


def cleanup_worker(mode: str, nsockets: int, forks: int, warmup: int) -> Dict[str, Any]:
    """Fork ``warmup + forks`` times with ``nsockets`` PUSH sockets connected over tcp; the children's start and cleanup."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 3 * nsockets + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    import zmq

    from zmqfork import _native

    _check_mode(mode)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, nsockets + 64)
    sink = ctx.socket(zmq.PULL)
    sink.set(zmq.RCVTIMEO, 10_000)
    sink.set(zmq.BACKLOG, nsockets + 64)  # else connects beyond the default 100 wait for SYN retries
    addr = free_tcp_endpoint()
    sink.bind(addr)
    pushes = [ctx.socket(zmq.PUSH) for _ in range(nsockets)]
    for sock in pushes:
        sock.connect(addr)
        sock.send(b"x")
    for _ in pushes:  # one message from each: every connection is up
        sink.recv()
    result: Dict[str, Any] = {"fds": fd_count(), "tracked": _native.fdtrack_counts()["tracked"],
                              "child_ns": [], "child_cpu_ns": [], "closed": [], "child_fds": [], "failures": 0}
    for i in range(warmup + forks):
        r, w = os.pipe()
        t0 = time.perf_counter_ns()
        pid = fork_with("os")
        if pid == 0:
            started, cpu = time.perf_counter_ns(), time.process_time_ns()  # a new process's CPU clock starts at 0
            try:
                os.write(w, b"%d %d %d %d\n" % (started, cpu, _native.fdtrack_counts()["closed_last"], fd_count()))
            finally:
                os._exit(0)
        os.close(w)
        line = read_line(r, 10.0)
        os.close(r)
        if wait_child(pid, 10.0) is None or not line:
            result["failures"] += 1
        elif i >= warmup:
            started, cpu, closed, left = map(int, line.split())
            result["child_ns"].append(started - t0)
            result["child_cpu_ns"].append(cpu)
            result["closed"].append(closed)
            result["child_fds"].append(left)
    ctx.destroy(linger=0)
    return result


def _cleanup(quick: bool, log: Callable[[str], None]) -> Dict[str, Any]:
    """Part 3: the children's start with N sockets, hooks on and off, per round and per closed descriptor."""
    counts = (0, 100) if quick else (0, 100, 1000)
    rounds, forks, warmup = (2, 8, 2) if quick else (10, 25, 5)
    configs = [(mode, n) for n in counts for mode in MODES]
    runs: Dict[tuple, List[Dict[str, Any]]] = {config: [] for config in configs}
    for rnd, order in rotations(configs, rounds):
        for mode, n in order:
            runs[mode, n].append(_run_worker(mode, ["cleanup", "--mode", mode, "--sockets", str(n), "--forks",
                                                    str(forks), "--warmup", str(warmup)], timeout=120))
        log(f"  fdtrack cleanup round {rnd + 1}/{rounds}")
    cases: Dict[str, Any] = {}
    for n in counts:
        row: Dict[str, Any] = {}
        for mode in MODES:
            done = runs[mode, n]
            row[mode] = {
                **{key: summary([ns for run in done for ns in run[key]]) for key in CHILD_TIMES},
                "fds": done[-1]["fds"],
                "tracked": done[-1]["tracked"],
                "closed": sorted({c for run in done for c in run["closed"]}),
                "child_fds": sorted({c for run in done for c in run["child_fds"]}),
                "failures": sum(run["failures"] for run in done),
            }
        closed = max(row["on"]["closed"], default=0)
        row["difference"], row["per_fd"] = {}, {}
        for key in CHILD_TIMES:
            on, off = ([summary(run[key]).get("median") for run in runs[mode, n]] for mode in MODES)
            row["difference"][key] = _paired(on, off, 1)
            # With no sockets, the context's few descriptors are lost in the noise of fork().
            row["per_fd"][key] = _paired(on, off, closed) if n and closed else {}
        cases[str(n)] = row
    return {"rounds": rounds, "forks_per_worker": forks, "warmup_forks": warmup, "cases": cases}


def run(quick: bool, log: Callable[[str], None]) -> Dict[str, Any]:
    """All three measurements; a part that fails is reported as its error, the others still run."""
    result: Dict[str, Any] = {}
    parts: Dict[str, Callable[[], Dict[str, Any]]] = {
        "wrapper": lambda: _wrapper(quick),
        "socket_cycle": lambda: _socket_cycles(quick),
        "cleanup": lambda: _cleanup(quick, log),
    }
    for name, part in parts.items():
        try:
            result[name] = part()
        except Exception as exc:  # reported in the table, never fatal
            result[name] = {"error": repr(exc)}
        log(f"  fdtrack {name} done")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=("wrapper", "socket-cycle", "cleanup"))
    p.add_argument("paths", nargs="*", help="wrapper: the object to hook and its plain copy")
    p.add_argument("--mode", choices=MODES, default="on")
    p.add_argument("--iterations", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--sockets", type=int, default=0)
    p.add_argument("--forks", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    if a.worker == "wrapper":
        print(json.dumps(wrapper_worker(a.paths[0], a.paths[1], a.iterations, a.reps, a.warmup)))
    elif a.worker == "socket-cycle":
        socket_cycle_worker(a.mode, a.batch)
    elif a.worker == "cleanup":
        print(json.dumps(cleanup_worker(a.mode, a.sockets, a.forks, a.warmup)))
    else:
        print(json.dumps(run(True, lambda m: print(m, file=sys.stderr)), indent=1))
