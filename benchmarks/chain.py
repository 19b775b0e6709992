"""Measurement 4: endurance, the fork chain under ``ulimit -n 1024``.

For each alternative, a runner process (this file with ``--runner``) binds a
raw pyzmq PULL sink on tcp and starts the chain root as a fresh interpreter
(this file with ``--root``; nothing of the runner is inherited) in its own
session, with ``RLIMIT_NOFILE`` soft limit 1024.  Each generation:

- "raw": makes a pyzmq Context and PUSH, connects to the sink (the inherited
  ones are simply dropped, as naive code would);
- proxies ("pidcheck", "atfork", "zmqfork"): uses the PUSH proxy made in the
  root, which rebuilds itself in each child;

then sends its generation number, writes a status line (generation, open
fds, time) to a pipe shared by the whole chain, forks the next generation,
closes its socket with linger, terminates its context and exits.

The runner is a child subreaper, so it reaps every generation; it stops at the
cap, at an overall timeout, or when the chain dies (pipe EOF), then kills the
chain's process group (the session it created) and reaps, so no process is
left behind.  Reported: generations completed, messages delivered, fds at the
first and last generation and fds per generation (least-squares slope),
forks per second, and why the chain stopped (the chain's last stderr line,
e.g. libzmq's "Too many open files" abort).

Each alternative's chain runs three times, the runs interleaved in rotating
order (A B C D, B C D A, C D A B); every figure is reported as the median
over the runs with its spread, and the stop reasons are counted.  The runs
stay in the JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import rotations, summary  # noqa: E402

ALTS = ("raw", "pidcheck", "atfork", "zmqfork")
FD_LIMIT = 1024
# A sampled generation (every 64th) that the leaking alternatives reach too: they stop near 150.
EARLY_GENERATIONS = 128
PR_SET_CHILD_SUBREAPER = 36


def root(alt: str, addr: str, cap: int, status_fd: int) -> None:
    """The chain itself; runs in the root and, through fork, in every generation."""
    import zmq

    import alternatives
    from common import write_all

    make = alternatives.get(alt).Context
    ctx = push = None
    if alt != "raw":
        ctx = make()
        push = ctx.socket(zmq.PUSH)
        push.set(zmq.LINGER, 2000)
        push.connect(addr)
    gen = 0
    while True:
        try:
            if alt == "raw":
                ctx = make()
                push = ctx.socket(zmq.PUSH)
                push.set(zmq.LINGER, 2000)
                push.connect(addr)
            push.send(b"%d" % gen)
            nfds = len(os.listdir("/proc/self/fd"))
            write_all(status_fd, b"ok %d %d %d\n" % (gen, nfds, time.monotonic_ns()))
            if gen % 64 == 0 or gen == 1:  # memory shape, sampled: it costs a read of /proc
                with open("/proc/self/maps", "rb") as f:
                    maps = sum(1 for _ in f)
                with open("/proc/self/statm", "rb") as f:
                    size, rss = (int(x) for x in f.read().split()[:2])
                write_all(status_fd, b"mem %d %d %d %d\n" % (gen, maps, size, rss))
            pid = os.fork() if gen < cap else -1
        except BaseException as exc:
            try:
                write_all(status_fd, b"error %d %s\n" % (gen, repr(exc).encode()[:200]))
            finally:
                os._exit(1)
        if pid == 0:
            gen += 1
            continue
        try:  # this generation is done: flush its message and exit
            push.close(2000)
            ctx.term()
        finally:
            os._exit(0)


def runner(alt: str, cap: int, timeout: float) -> Dict[str, Any]:
    import zmq

    from common import free_tcp_endpoint

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, cap + 1024)), hard))
    libc = ctypes.CDLL(None, use_errno=True)
    subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    ctx = zmq.Context()
    sink = ctx.socket(zmq.PULL)
    addr = free_tcp_endpoint()
    sink.bind(addr)
    r, w = os.pipe()
    errlog = tempfile.TemporaryFile()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--root", "--alt", alt, "--addr", addr,
         "--cap", str(cap), "--status-fd", str(w)],
        pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog,
        start_new_session=True, preexec_fn=limit,
    )
    pgid = proc.pid  # start_new_session: the root leads its own session and process group
    os.close(w)
    statuses: Dict[int, tuple] = {}
    errors: List[str] = []
    delivered = set()
    memory: Dict[int, tuple] = {}
    poller = zmq.Poller()
    poller.register(sink, zmq.POLLIN)
    poller.register(r, zmq.POLLIN)
    buf = b""
    deadline = time.monotonic() + timeout
    stop = "pipe closed (every generation exited)"
    eof = False
    t_start = time.monotonic()
    while not eof:
        if time.monotonic() > deadline:
            stop = f"overall timeout ({timeout:.0f} s)"
            break
        for sock, _ in poller.poll(200):
            if sock is sink:
                while True:
                    try:
                        delivered.add(int(sink.recv(zmq.NOBLOCK)))
                    except zmq.Again:
                        break
            else:
                chunk = os.read(r, 65536)
                if not chunk:
                    eof = True
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    parts = line.split(b" ", 2)
                    if parts[0] == b"ok":
                        gen, nfds, t = (int(x) for x in line.split()[1:])
                        statuses[gen] = (nfds, t)
                    elif parts[0] == b"mem":
                        g, maps, size, rss = (int(x) for x in line.split()[1:])
                        memory[g] = (maps, size, rss)
                    elif parts[0] == b"error":
                        errors.append(line.decode(errors="replace"))
        _reap_some()
    # drain late messages briefly (the last generations flush as they exit)
    drain_until = time.monotonic() + 1.0
    while time.monotonic() < drain_until and len(delivered) < len(statuses):
        if sink.poll(100):
            delivered.add(int(sink.recv()))
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    leftovers = _reap_all(time.monotonic() + 5.0)
    os.close(r)
    errlog.seek(0)
    stderr_lines = [ln for ln in errlog.read().decode(errors="replace").splitlines() if ln.strip()]
    sink.close(0)
    ctx.term()

    gens = sorted(statuses)
    completed = 0
    while completed in statuses:  # consecutive generations from 0
        completed += 1
    result: Dict[str, Any] = {
        "alternative": alt, "cap": cap, "fd_limit": FD_LIMIT, "subreaper": subreaper,
        "generations_completed": completed, "delivered": len(delivered),
        "elapsed_s": time.monotonic() - t_start, "leftover_processes_killed": leftovers,
    }
    if gens:
        fds = [statuses[g][0] for g in gens]
        result["fds_first"] = fds[0]
        result["fds_last"] = fds[-1]
        result["fds_per_generation"] = _slope(gens, fds)
        if len(gens) > 1:
            span = (statuses[gens[-1]][1] - statuses[gens[0]][1]) / 1e9
            result["forks_per_second"] = (len(gens) - 1) / span if span > 0 else None
            # the rate along the chain, in up to 8 segments (does it slow down as it goes?)
            seg = max(1, len(gens) // 8)
            rates = []
            for i in range(0, len(gens) - seg, seg):
                dt = (statuses[gens[i + seg]][1] - statuses[gens[i]][1]) / 1e9
                rates.append([gens[i], round(seg / dt, 1) if dt > 0 else None])
            result["forks_per_second_by_segment"] = rates
    if memory:
        page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
        mg = sorted(memory)
        result["memory_samples"] = [[g, memory[g][0], memory[g][1] * page_kib, memory[g][2] * page_kib] for g in mg]
        result["mappings_first"], result["mappings_last"] = memory[mg[0]][0], memory[mg[-1]][0]
        # Slopes over the forked generations (the root is a fresh interpreter, not a child), and over the first
        # EARLY_GENERATIONS alone, which every alternative reaches: the chains stop at very different lengths.
        forked = [g for g in mg if g >= 1]
        early = [g for g in forked if g <= EARLY_GENERATIONS]
        result["mappings_per_generation"] = _slope(forked, [memory[g][0] for g in forked])
        result["rss_kib_per_generation"] = _slope(forked, [memory[g][2] * page_kib for g in forked])
        result["vsz_kib_per_generation"] = _slope(forked, [memory[g][1] * page_kib for g in forked])
        if EARLY_GENERATIONS in memory:  # else this run stopped before; a shorter slope would not compare
            result["rss_kib_per_generation_early"] = _slope(early, [memory[g][2] * page_kib for g in early])
    if completed >= cap + 1:
        result["stop_reason"] = f"reached the cap ({cap} generations)"
        result["stopped"] = result["stop_reason"]
    else:
        why = errors[-1] if errors else (stderr_lines[-1] if stderr_lines else stop)
        result["stop_reason"] = why.split(" ", 2)[-1] if why.startswith("error ") else why
        result["stopped"] = f"generation {completed}: {why}"
    result["stderr_tail"] = stderr_lines[-3:]
    return result


def _slope(xs: List[int], ys: List[int]) -> Optional[float]:
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def _reap_some() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _reap_all(deadline: float) -> int:
    """Reap every remaining child (orphaned generations come to us as subreaper)."""
    n = 0
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return n
        if pid:
            n += 1
        else:
            time.sleep(0.01)
    return n


#: What is summarised over an alternative's runs (median, quartiles, min, max).
SUMMARISED = ("generations_completed", "delivered", "fds_first", "fds_last", "fds_per_generation",
              "forks_per_second", "forks_per_second_first", "forks_per_second_last", "mappings_per_generation",
              "rss_kib_per_generation", "rss_kib_per_generation_early", "vsz_kib_per_generation", "elapsed_s")


def _aggregate(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """An alternative's runs in one place: each summarised figure, the stop reasons counted, the runs themselves."""
    done = [r for r in runs if "error" not in r]
    for r in done:  # the rate in the first and last eighth of the chain (does it slow down as it goes?)
        rates = [rate for _, rate in r.get("forks_per_second_by_segment", []) if rate]
        if len(rates) > 1:
            r["forks_per_second_first"], r["forks_per_second_last"] = rates[0], rates[-1]
    out: Dict[str, Any] = {key: summary([r[key] for r in done if r.get(key) is not None]) for key in SUMMARISED}
    reasons: Dict[str, int] = {}
    for r in done:
        reasons[r["stop_reason"]] = reasons.get(r["stop_reason"], 0) + 1
    out["stop_reasons"] = reasons
    out["errors"] = [r["error"] for r in runs if "error" in r]
    out["runs"] = runs
    return out


def run(quick: bool, log: Callable[[str], None]) -> Dict[str, Any]:
    """Every alternative's chain ``repeats`` times, interleaved in rotating order; medians over the runs."""
    # A full run: 25-35 s for zmqfork's 4096 generations, 1-2 s for the others, which stop near 150;
    # the 90 s cut leaves room for a slow machine and bounds the whole section.
    cap, timeout, repeats = (300, 12.0, 3) if quick else (4096, 90.0, 3)
    runs: Dict[str, List[Dict[str, Any]]] = {alt: [] for alt in ALTS}
    for rnd, order in rotations(ALTS, repeats):
        for alt in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--runner", "--alt", alt,
                   "--cap", str(cap), "--timeout", str(timeout)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60)
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            except Exception as exc:
                res = {"error": repr(exc)}
            runs[alt].append(res)
            log(f"  chain run {rnd + 1}/{repeats}, {alt}: {res.get('generations_completed', '?')} generations; "
                f"{res.get('stopped', res.get('error'))}")
    return {"cap": cap, "timeout_s": timeout, "fd_limit": FD_LIMIT, "early_generations": EARLY_GENERATIONS,
            "repeats": repeats,
            "alternatives": {alt: _aggregate(runs[alt]) for alt in ALTS}}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--runner", action="store_true")
    p.add_argument("--root", action="store_true")
    p.add_argument("--alt", choices=ALTS, default="raw")
    p.add_argument("--addr")
    p.add_argument("--cap", type=int, default=300)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--status-fd", type=int)
    a = p.parse_args()
    if a.root:
        root(a.alt, a.addr, a.cap, a.status_fd)
    elif a.runner:
        print(json.dumps(runner(a.alt, a.cap, a.timeout)))
    else:
        print(json.dumps(run(True, lambda m: print(m, file=sys.stderr)), indent=1))
