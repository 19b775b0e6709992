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

The driver interleaves workers: each round runs every (mode, N) once, in
rotating order; the first forks of each worker are warm-up and discarded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MODES = ("raw", "pidcheck", "atfork", "zmqfork")


def worker(mode: str, nsockets: int, forks: int, warmup: int) -> Dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 3 * nsockets + 256) if hard != resource.RLIM_INFINITY else 3 * nsockets + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    import zmq

    import alternatives
    from common import free_tcp_endpoint, read_line, wait_child

    alt = alternatives.get(mode)
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
    with open("/proc/self/maps") as f:
        mappings = sum(1 for _ in f)
    with open("/proc/self/status") as f:
        rss_kib = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), None)
    parent_ns: List[int] = []
    child_ns: List[int] = []
    failures = 0
    for i in range(warmup + forks):
        r, w = os.pipe()
        t0 = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:
            tc = time.perf_counter_ns()
            try:
                os.write(w, b"%d\n" % tc)
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
            parent_ns.append(t1 - t0)
            child_ns.append(int(line) - t0)
    for s in socks:
        s.close(0)
    sink.close(0)
    return {"parent_ns": parent_ns, "child_ns": child_ns, "fds": fds, "failures": failures,
            "mappings": mappings, "rss_kib": rss_kib,
            "zmqfork_loaded": "zmqfork" in sys.modules}


def run(quick: bool, log: Callable[[str], None]) -> Dict[str, Any]:
    from common import summary

    counts = (0, 10, 100) if quick else (0, 10, 100, 1000)
    rounds, forks, warmup = (2, 6, 2) if quick else (6, 25, 5)
    samples: Dict[tuple, Dict[str, List[int]]] = {
        (m, n): {"parent_ns": [], "child_ns": []} for m in MODES for n in counts
    }
    info: Dict[tuple, Dict[str, Any]] = {}
    configs = [(m, n) for n in counts for m in MODES]
    for rnd in range(rounds):
        shift = rnd % len(configs)
        for mode, n in configs[shift:] + configs[:shift]:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode,
                   "--sockets", str(n), "--forks", str(forks), "--warmup", str(warmup)]
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
            samples[mode, n]["parent_ns"] += data["parent_ns"]
            samples[mode, n]["child_ns"] += data["child_ns"]
            meta = info.setdefault((mode, n), {})
            meta["fds"] = data["fds"]
            meta["mappings"] = data["mappings"]
            meta["rss_kib"] = data["rss_kib"]
            meta["zmqfork_loaded"] = data["zmqfork_loaded"]
            meta["failures"] = meta.get("failures", 0) + data["failures"]
        log(f"  fork-cost round {rnd + 1}/{rounds}")
    result: Dict[str, Any] = {"rounds": rounds, "forks_per_worker": forks, "warmup_forks": warmup,
                              "cases": {}}
    for n in counts:
        row: Dict[str, Any] = {}
        for mode in MODES:
            cell = dict(info.get((mode, n), {}))
            cell["parent"] = summary(samples[mode, n]["parent_ns"])
            cell["child"] = summary(samples[mode, n]["child_ns"])
            row[mode] = cell
        for mode in MODES:
            for key in ("parent", "child"):
                raw, mine = row["raw"][key], row[mode][key]
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
    a = p.parse_args()
    if not a.worker:
        print(json.dumps(run(True, lambda m: print(m, file=sys.stderr)), indent=1))
    else:
        print(json.dumps(worker(a.mode, a.sockets, a.forks, a.warmup)))
