"""Measurement 3: rebuild latency in a forked child.

Each mode runs in its own worker process of the same shape: a raw pyzmq PULL
sink bound on tcp and one PUSH (made by the mode's alternative; raw pyzmq for
"hand") connected to it, one message delivered.  Then, repeatedly, the worker
forks (``os.fork()``) and the child

- "hand": makes a pyzmq Context, a PUSH, connects and sends, by hand
  (the inherited PUSH is left alone);
- "pidcheck" / "atfork" / "zmqfork": sends on the inherited proxy, which
  rebuilds itself (the atfork proxy already did, in its hook).

Timed in the child, from its first instruction after ``fork()`` returns to the
return of that first ``send``; also reported from the parent's stamp just
before ``fork()`` (this includes atfork handlers and ``register_at_fork``
hooks, where the atfork proxy does its rebuild).  The child then flushes
(close with linger, term) and exits; the worker checks the sink received the
child's message, so a rebuild that does not deliver counts as broken.
The "hand" worker never imports zmqfork.  Each worker, its libzmq threads
and its children run on one CPU, as in forkcost.py (unpinned, the same worker
measured ~490 or ~850 us for the hand-written setup from one run to the next).

Then the "hand" and "zmqfork" workers fork a few more children that take the
same steps one at a time, each timed and with the page faults it took
(``getrusage``): where the first send's time goes.  By hand: pyzmq's
Context (``zmq_ctx_new``), the socket (libzmq starts its I/O and reaper
threads with the first one), connect, send.  zmqfork: noticing the fork
(marking the inherited objects, Python only), the context re-initialised
(``zmq_ctx_new``, options replayed), the socket re-initialised (libzmq's
threads start, the recipe's connect replayed), send.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MODES = ("hand", "pidcheck", "atfork", "zmqfork")

#: The steps of the profile, as reported.
PROFILE_STEPS = {
    "hand": ("Context()", "socket(PUSH): libzmq's threads start", "connect()", "send()"),
    "zmqfork": ("noticing the fork (Python)", "context re-initialised", "socket re-initialised: libzmq's threads "
                "start, connect replayed", "send()"),
}


def worker(mode: str, reps: int, warmup: int) -> Dict[str, Any]:
    from common import pin_to_one_cpu

    pin_to_one_cpu()
    import zmq

    import alternatives
    from common import free_tcp_endpoint, read_line, wait_child, write_all

    sink_ctx = zmq.Context()
    sink = sink_ctx.socket(zmq.PULL)
    addr = free_tcp_endpoint()
    sink.bind(addr)
    sink.set(zmq.RCVTIMEO, 5000)
    ctx = alternatives.get("raw" if mode == "hand" else mode).Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(addr)
    push.send(b"hello")
    sink.recv()
    first: List[int] = []
    from_fork: List[int] = []
    failures: List[str] = []
    for i in range(warmup + reps):
        msg = b"rebuild %d" % i
        r, w = os.pipe()
        t_fork = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                t0 = time.perf_counter_ns()
                if mode == "hand":
                    c = zmq.Context()
                    s = c.socket(zmq.PUSH)
                    s.connect(addr)
                    s.send(msg)
                    t1 = time.perf_counter_ns()
                    s.close(2000)
                    c.term()
                else:
                    push.send(msg)
                    t1 = time.perf_counter_ns()
                    push.close(2000)
                    ctx.term()
                write_all(w, b"%d %d\n" % (t0, t1))
                code = 0
            except BaseException as exc:
                try:
                    write_all(w, b"error %r\n" % (exc,))
                except BaseException:
                    pass
            finally:
                os._exit(code)
        os.close(w)
        line = read_line(r, 10.0)
        os.close(r)
        try:
            got = sink.recv()
        except zmq.Again:
            got = None
        status = wait_child(pid, 10.0)
        if status is None:
            failures.append("child timed out")
            continue
        if not line or line.startswith(b"error"):
            failures.append(line.decode(errors="replace").strip() or f"child status {status}")
            continue
        if got != msg:
            failures.append(f"message not delivered (got {got!r})")
            continue
        t0, t1 = (int(x) for x in line.split())
        if i >= warmup:
            first.append(t1 - t0)
            from_fork.append(t1 - t_fork)
    steps: List[List[int]] = []
    faults: List[List[int]] = []
    for i in range(warmup + reps // 2 if mode in PROFILE_STEPS else 0):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                write_all(w, _profiled_child(mode, ctx, push, addr) + b"\n")
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        line = read_line(r, 10.0)
        os.close(r)
        sink.recv()
        if wait_child(pid, 10.0) is None or not line:
            failures.append("profiled child failed")
        elif i >= warmup:
            values = [int(x) for x in line.split()]
            steps.append(values[:4])
            faults.append(values[4:])
    return {"first_send_ns": first, "from_fork_ns": from_fork, "failures": failures,
            "profile_ns": steps, "profile_faults": faults, "zmqfork_loaded": "zmqfork" in sys.modules}


def _profiled_child(mode: str, ctx: Any, push: Any, addr: str) -> bytes:
    """In a forked child: the first send's steps one at a time; their ns and minor faults, as one line."""
    import resource

    import zmq

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    marks = [(time.perf_counter_ns(), faults())]
    if mode == "hand":
        c = zmq.Context()
        marks.append((time.perf_counter_ns(), faults()))
        s = c.socket(zmq.PUSH)
        marks.append((time.perf_counter_ns(), faults()))
        s.connect(addr)
        marks.append((time.perf_counter_ns(), faults()))
        s.send(b"profiled")
        marks.append((time.perf_counter_ns(), faults()))
    else:
        from zmqfork._generation import notice

        notice()
        marks.append((time.perf_counter_ns(), faults()))
        ctx._zf_live()
        marks.append((time.perf_counter_ns(), faults()))
        push._zf_live()
        marks.append((time.perf_counter_ns(), faults()))
        push.send(b"profiled")
        marks.append((time.perf_counter_ns(), faults()))
        c, s = ctx, push
    s.close(2000)
    c.term()
    took = [marks[k + 1][0] - marks[k][0] for k in range(4)]
    took += [marks[k + 1][1] - marks[k][1] for k in range(4)]
    return " ".join(map(str, took)).encode()


def run(quick: bool, log: Callable[[str], None]) -> Dict[str, Any]:
    from common import rotations, summary

    rounds, reps, warmup = (2, 8, 2) if quick else (6, 30, 5)
    first: Dict[str, List[int]] = {m: [] for m in MODES}
    from_fork: Dict[str, List[int]] = {m: [] for m in MODES}
    failures: Dict[str, List[str]] = {m: [] for m in MODES}
    profile_ns: Dict[str, List[List[int]]] = {m: [] for m in PROFILE_STEPS}
    profile_faults: Dict[str, List[List[int]]] = {m: [] for m in PROFILE_STEPS}
    for rnd, order in rotations(MODES, rounds):
        for mode in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode,
                   "--reps", str(reps), "--warmup", str(warmup)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
                data = json.loads(out.stdout.strip().splitlines()[-1])
            except Exception as exc:
                failures[mode].append(f"worker failed: {exc!r}")
                continue
            first[mode] += data["first_send_ns"]
            from_fork[mode] += data["from_fork_ns"]
            failures[mode] += data["failures"]
            if mode in PROFILE_STEPS:
                profile_ns[mode] += data["profile_ns"]
                profile_faults[mode] += data["profile_faults"]
        log(f"  rebuild round {rnd + 1}/{rounds}")
    out_cases: Dict[str, Any] = {}
    hand = summary(first["hand"])
    hand_ff = summary(from_fork["hand"])
    for mode in MODES:
        cell: Dict[str, Any] = {"first_send": summary(first[mode]), "from_fork": summary(from_fork[mode]),
                                "failures": len(failures[mode]), "failure_examples": sorted(set(failures[mode]))[:3]}
        if hand and cell["first_send"]:
            cell["first_send"]["ratio_to_hand"] = cell["first_send"]["median"] / hand["median"]
        if hand_ff and cell["from_fork"]:
            cell["from_fork"]["ratio_to_hand"] = cell["from_fork"]["median"] / hand_ff["median"]
        out_cases[mode] = cell
    profile = {mode: [{"step": name, "ns": summary([row[k] for row in profile_ns[mode]]),
                       "faults": summary([row[k] for row in profile_faults[mode]])}
                      for k, name in enumerate(PROFILE_STEPS[mode])]
               for mode in PROFILE_STEPS}
    return {"rounds": rounds, "reps_per_worker": reps, "warmup": warmup, "modes": out_cases, "profile": profile}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--mode", choices=MODES, default="hand")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    if not a.worker:
        print(json.dumps(run(True, lambda m: print(m, file=sys.stderr)), indent=1))
    else:
        print(json.dumps(worker(a.mode, a.reps, a.warmup)))
