"""Measurement 7: a prefork server's start-up: a master holding M sockets forks N workers.

For each alternative, a master process (this file with ``--master``; the
"raw" master never imports zmqfork) makes M PUSH sockets with its
alternative's Context and connects each over tcp to a raw pyzmq PULL sink
that the driver (the ``run()`` process) bound; the driver receives one
message per socket before any timing, so every socket has a live connection.
Then, for each burst, on the driver's word, the master stamps the time and
forks N workers back to back with ``os.fork()``.  Worker i sends one message
(the burst and its pid) on socket i mod M:

- "raw", raw pyzmq plus the setup a worker must write by hand: a new pyzmq
  Context, a PUSH, connect, send (the inherited sockets are left alone);
- "pidcheck" and "zmqfork": send on the inherited socket, which rebuilds
  itself inside that ``send`` (only that one: the others wait to be used);
- "atfork": send on the inherited socket, which the ``register_at_fork`` hook
  has already rebuilt, together with the other M - 1.

The worker stamps the return of that ``send`` and writes the stamp to a pipe
the master reads (in the message it could only carry a stamp from before the
``send``, and the proxies rebuild inside it).  Then it waits, as a server's
worker goes on running, until the master releases it; the master does that
when the driver has all N messages or gave up waiting, then reaps every
worker with a timeout and counts those that did not exit cleanly.

Per burst, from the master's stamp before its first fork (CLOCK_MONOTONIC,
system-wide): the last message received at the sink (stamped by the driver
as it arrives), the last worker's ``send`` returned, and the master's fork
loop.  A burst whose N messages do not all arrive is not timed, its missing
messages count as not delivered, and its master does no more bursts (the
driver waits DELIVERY_GRACE for a message a worker says it sent; a worker
that failed says so at once).  One master per (alternative, N, M) per round,
in rotating order, but none after one that lost messages or failed; each
master does a warm-up burst, then the timed ones.  The driver starts every master in its own session and kills that
session at the end, so no worker is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (ALTERNATIVES, fork_with, raise_nofile, read_line, rotations, summary, wait_child,  # noqa: E402
                    write_all)

#: Timeouts (s): a master's start and setup, a burst's messages, a master's reply, a released worker's wait.
START_TIMEOUT = 60.0
BURST_TIMEOUT = 30.0
#: How long (s) the driver waits for the messages of the workers that sent, once the master said which did.
DELIVERY_GRACE = 10.0
REPLY_TIMEOUT = 30.0
WORKER_TIMEOUT = 120.0
#: The measures, each from the master's stamp before its first fork.
MEASURES = ("received", "sent", "forked")


# ---- the master and its workers ------------------------------------------------------------


def _worker(mode: str, sock: Any, addr: str, burst: int, release: int, stamps: int, unused: List[int]) -> NoReturn:
    """One worker: send on the inherited socket (or a hand-made one), report the stamp, wait for release."""
    code = 1
    try:
        for fd in unused:  # the master's ends: the release pipe's EOF must come from the master alone
            os.close(fd)
        import zmq

        if mode == "raw":
            ctx = zmq.Context()
            sock = ctx.socket(zmq.PUSH)
            sock.connect(addr)
        sock.send(b"%d %d" % (burst, os.getpid()))
        sent = time.perf_counter_ns()
        write_all(stamps, b"%d\n" % sent)
        os.close(stamps)  # when every worker has closed it (or died or failed), the master reads EOF
        code = 0
        read_line(release, WORKER_TIMEOUT)  # EOF when the master releases us
    except BaseException:
        traceback.print_exc()  # to the master's stderr, which the driver keeps
    finally:
        os._exit(code)


def master(mode: str, addr: str, nsockets: int, nworkers: int, bursts: int) -> None:
    """The master: M connected sockets, then bursts of N workers on the driver's word (stdin/stdout)."""
    raise_nofile(8 * nsockets + 256)  # an "atfork" worker holds the inherited descriptors and a rebuilt set
    import zmq

    import alternatives

    def say(reply: Dict[str, Any]) -> None:
        write_all(1, json.dumps(reply).encode() + b"\n")

    ctx = alternatives.get(mode).Context()
    ctx.set(zmq.MAX_SOCKETS, nsockets + 64)
    socks = []
    for _ in range(nsockets):
        s = ctx.socket(zmq.PUSH)
        s.connect(addr)
        s.send(b"setup")
        socks.append(s)
    say({"ready": True, "zmqfork_loaded": "zmqfork" in sys.modules})
    for burst in range(bursts):
        if read_line(0, START_TIMEOUT + BURST_TIMEOUT).strip() != b"go":
            break
        release_r, release_w = os.pipe()
        stamps_r, stamps_w = os.pipe()
        pids = []
        t0 = time.perf_counter_ns()
        for i in range(nworkers):
            pid = fork_with("os")
            if pid == 0:
                _worker(mode, socks[i % nsockets], addr, burst, release_r, stamps_w, [release_w, stamps_r])
            pids.append(pid)
        forked = time.perf_counter_ns()
        os.close(release_r)
        os.close(stamps_w)
        sent = [int(x) for x in read_line(stamps_r, BURST_TIMEOUT, until_eof=True).split()]
        os.close(stamps_r)
        say({"t0": t0, "forked": forked, "sent": sent})
        read_line(0, BURST_TIMEOUT + REPLY_TIMEOUT)  # "release", or the driver is gone: release anyway
        os.close(release_w)
        deadline = time.monotonic() + REPLY_TIMEOUT / 2
        failed = 0
        for pid in pids:
            status = wait_child(pid, max(0.0, deadline - time.monotonic()))
            failed += status is None or os.waitstatus_to_exitcode(status) != 0
        say({"failed": failed})
    for s in socks:
        s.close(0)
    ctx.term()


# ---- the driver ----------------------------------------------------------------------------


def _collect(sink: Any, proc: subprocess.Popen, burst: Optional[int], want: int,
             deadline: float) -> Tuple[Dict[int, int], Optional[Dict[str, Any]]]:
    """Receive ``burst``'s messages (None: the setup messages) until ``want`` arrived, the deadline, or the master died.

    For a burst, the master's report (which workers sent) is read as it comes:
    then only the messages of the workers that sent are waited for, and for at
    most DELIVERY_GRACE more.  Returns each sender's arrival stamp
    (perf_counter_ns) by pid (setup messages: by count) and the report if it came.
    """
    import zmq

    assert proc.stdout is not None
    arrivals: Dict[int, int] = {}
    report: Optional[Dict[str, Any]] = None
    poller = zmq.Poller()
    poller.register(sink, zmq.POLLIN)
    if burst is not None:
        poller.register(proc.stdout.fileno(), zmq.POLLIN)
    while len(arrivals) < want and time.monotonic() < deadline and proc.poll() is None:
        ready = dict(poller.poll(200))
        if report is None and proc.stdout.fileno() in ready:
            report = _ask(proc, None, REPLY_TIMEOUT)
            poller.unregister(proc.stdout.fileno())
            want = len(report["sent"])
            deadline = min(deadline, time.monotonic() + DELIVERY_GRACE)
        if sink not in ready:
            continue
        while True:
            try:
                msg = sink.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            t = time.perf_counter_ns()
            if burst is None:
                if msg == b"setup":
                    arrivals[len(arrivals)] = t
                continue
            tag, pid = (int(x) for x in msg.split())
            if tag == burst:
                arrivals.setdefault(pid, t)
    return arrivals, report


def _ask(proc: subprocess.Popen, command: Optional[bytes], timeout: float) -> Dict[str, Any]:
    """Send ``command`` (if any) to the master and return its one-line JSON reply."""
    assert proc.stdin is not None and proc.stdout is not None
    if command is not None:
        proc.stdin.write(command + b"\n")
        proc.stdin.flush()
    line = read_line(proc.stdout.fileno(), timeout)
    if not line:
        asked = f" to {command.decode()!r}" if command else ""
        raise RuntimeError(f"no answer from the master{asked}: it exited, or was silent for {timeout:.0f} s")
    reply: Dict[str, Any] = json.loads(line)
    return reply


def run_master(sink_ctx: Any, mode: str, nworkers: int, nsockets: int, bursts: int, warmup: int) -> Dict[str, Any]:
    """One master of ``mode`` with ``nsockets`` sockets: ``warmup`` + ``bursts`` bursts of ``nworkers`` workers."""
    import zmq

    out: Dict[str, Any] = {m: [] for m in MEASURES}
    out.update(not_delivered=0, failed_workers=0, errors=[])
    sink = sink_ctx.socket(zmq.PULL)
    sink.set(zmq.BACKLOG, 4096)  # the atfork workers connect N x M times at once
    sink.set(zmq.LINGER, 0)
    sink.bind("tcp://127.0.0.1:*")
    addr = sink.get(zmq.LAST_ENDPOINT).decode()
    errlog = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--master", "--mode", mode, "--addr", addr,
         "--sockets", str(nsockets), "--workers", str(nworkers), "--bursts", str(warmup + bursts)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog, start_new_session=True)
    try:
        out["zmqfork_loaded"] = _ask(proc, None, START_TIMEOUT)["zmqfork_loaded"]
        setup, _ = _collect(sink, proc, None, nsockets, time.monotonic() + START_TIMEOUT)
        if len(setup) < nsockets:
            raise RuntimeError(f"{len(setup)} of {nsockets} setup messages arrived")
        assert proc.stdin is not None
        for burst in range(warmup + bursts):
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            arrivals, report = _collect(sink, proc, burst, nworkers, time.monotonic() + BURST_TIMEOUT)
            if report is None:
                report = _ask(proc, None, REPLY_TIMEOUT)
            out["not_delivered"] += nworkers - len(arrivals)
            out["failed_workers"] += _ask(proc, b"release", REPLY_TIMEOUT)["failed"]
            if len(arrivals) < nworkers:
                break  # a lost message is waited for; the next bursts would only wait again
            if burst >= warmup and len(report["sent"]) == nworkers:
                t0 = report["t0"]
                out["received"].append(max(arrivals.values()) - t0)
                out["sent"].append(max(report["sent"]) - t0)
                out["forked"].append(report["forked"] - t0)
        proc.stdin.close()  # EOF: a master still waiting for "go" ends
        proc.wait(REPLY_TIMEOUT)
        if proc.returncode:
            raise RuntimeError(f"the master exited with status {proc.returncode}")
    except Exception as exc:
        errlog.seek(0)
        tail = [ln for ln in errlog.read().decode(errors="replace").splitlines() if ln.strip()][-1:]
        out["errors"].append(f"{exc}" + (f" ({tail[0]})" if tail else ""))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the master's session: any worker still there
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        errlog.close()
        sink.close(0)
    return out


def run(quick: bool, log: Callable[[str], None]) -> Dict[str, Any]:
    import zmq

    workers, sockets = ((4, 16), (10, 100)) if quick else ((4, 16, 64), (10, 100))
    rounds, bursts, warmup = (2, 2, 1) if quick else (4, 4, 1)  # full: about a minute on 2 cores
    raise_nofile(2 * max(workers) * max(sockets) + 1024)  # the sink's end of every atfork worker's connections
    configs = [(mode, n, m) for n in workers for m in sockets for mode in ALTERNATIVES]
    runs: Dict[tuple, List[Dict[str, Any]]] = {config: [] for config in configs}
    sink_ctx = zmq.Context()
    try:
        for rnd, order in rotations(configs, rounds):
            for mode, n, m in order:
                done = runs[mode, n, m]
                if any(r["not_delivered"] or r["errors"] for r in done):
                    continue  # each lost message costs a wait: one master that lost some says enough
                done.append(run_master(sink_ctx, mode, n, m, bursts, warmup))
            log(f"  prefork round {rnd + 1}/{rounds}")
    finally:
        sink_ctx.term()
    cases: Dict[str, Any] = {}
    for n in workers:
        for m in sockets:
            row: Dict[str, Any] = {}
            for mode in ALTERNATIVES:
                done = runs[mode, n, m]
                cell: Dict[str, Any] = {key: summary([ns for r in done for ns in r[key]]) for key in MEASURES}
                cell["masters"] = len(done)
                cell["not_delivered"] = sum(r["not_delivered"] for r in done)
                cell["failed_workers"] = sum(r["failed_workers"] for r in done)
                cell["errors"] = sorted({e for r in done for e in r["errors"]})[:3]
                cell["zmqfork_loaded"] = sorted({r["zmqfork_loaded"] for r in done if "zmqfork_loaded" in r})
                row[mode] = cell
            for mode in ALTERNATIVES:
                for key in MEASURES:
                    raw, mine = row["raw"][key], row[mode][key]
                    if raw and mine:
                        mine["ratio_to_raw"] = mine["median"] / raw["median"]
            cases[f"{n} x {m}"] = {"workers": n, "sockets": m, "alternatives": row}
    return {"rounds": rounds, "bursts_per_master": bursts, "warmup_bursts": warmup,
            "workers": list(workers), "sockets": list(sockets), "cases": cases}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--master", action="store_true")
    p.add_argument("--mode", choices=ALTERNATIVES, default="raw")
    p.add_argument("--addr")
    p.add_argument("--sockets", type=int, default=10)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--bursts", type=int, default=2)
    a = p.parse_args()
    if a.master:
        master(a.mode, a.addr, a.sockets, a.workers, a.bursts)
    else:
        print(json.dumps(run(True, lambda m: print(m, file=sys.stderr)), indent=1))
