"""Measurement 5: the detection matrix, found by running it.

For each alternative and each way of forking (``os.fork()``; libc ``fork()``
through ctypes, which runs pthread_atfork handlers but not Python's
``register_at_fork`` hooks; a raw ``clone`` syscall, which runs neither), a
worker process (this file with ``--worker``) makes a raw pyzmq REP bound on
tcp and the alternative's REQ connected to it, does one round trip, forks,
and the child does a round trip on the inherited REQ.  The cell says
"works" if the worker's REP got the child's request and the child got the
reply, else "broken" with what went wrong (request never delivered, child
error, child hung and killed).  Workers run concurrently; each child is
bounded by a timeout and killed if it overruns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Callable, Dict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ALTS = ("raw", "pidcheck", "atfork", "zmqfork")
KINDS = ("os", "libc", "raw")


def worker(alt: str, kind: str, timeout: float) -> Dict[str, Any]:
    import zmq

    import alternatives
    from common import fork_with, free_tcp_endpoint, read_line, wait_child, write_all

    sctx = zmq.Context()
    rep = sctx.socket(zmq.REP)
    addr = free_tcp_endpoint()
    rep.bind(addr)
    ctx = alternatives.get(alt).Context()
    req = ctx.socket(zmq.REQ)
    req.set(zmq.RCVTIMEO, int(timeout * 1000))
    req.set(zmq.LINGER, 1000)
    req.connect(addr)
    req.send(b"parent")
    rep.recv()
    rep.send(b"ok")
    req.recv()
    r, w = os.pipe()
    pid = fork_with(kind)
    if pid == 0:
        code = 1
        try:
            req.send(b"child")
            reply = req.recv()
            write_all(w, b"got %s\n" % reply)
            code = 0
        except BaseException as exc:
            try:
                write_all(w, b"error %s\n" % repr(exc).encode()[:200])
            except BaseException:
                pass
        finally:
            os._exit(code)
    os.close(w)
    verdict, detail = "broken", ""
    if rep.poll(int(timeout * 1000)):
        got = rep.recv()
        rep.send(b"child-ok")
        line = read_line(r, timeout).decode(errors="replace").strip()
        if got == b"child" and line == "got child-ok":
            verdict = "works"
        else:
            detail = f"request {got!r}; child said {line!r}"
    else:
        line = read_line(r, 0.5).decode(errors="replace").strip()
        detail = "request never delivered" + (f"; child: {line}" if line else "")
    status = wait_child(pid, 2.0 if verdict == "works" else 0.5)
    if status is None:
        detail += ("; " if detail else "") + "child hung (killed)"
        if verdict == "works":
            verdict = "broken"
    os.close(r)
    return {"alternative": alt, "kind": kind, "verdict": verdict, "detail": detail}


def run(quick: bool, log: Callable[[str], None]) -> Dict[str, Any]:
    timeout = 3.0 if quick else 5.0
    procs = {}
    for alt in ALTS:
        for kind in KINDS:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--alt", alt,
                   "--kind", kind, "--timeout", str(timeout)]
            procs[alt, kind] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    matrix: Dict[str, Dict[str, Any]] = {alt: {} for alt in ALTS}
    for (alt, kind), proc in procs.items():
        try:
            out, err = proc.communicate(timeout=timeout * 3 + 30)
            cell = json.loads(out.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            cell = {"verdict": "broken", "detail": "worker timed out"}
        except Exception:
            cell = {"verdict": "broken", "detail": f"worker failed: {err.strip().splitlines()[-1:]}"}
        matrix[alt][kind] = {"verdict": cell["verdict"], "detail": cell.get("detail", "")}
    log("  detection matrix done")
    return {"timeout_s": timeout, "matrix": matrix}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--alt", choices=ALTS, default="raw")
    p.add_argument("--kind", choices=KINDS, default="os")
    p.add_argument("--timeout", type=float, default=3.0)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.alt, a.kind, a.timeout)))
    else:
        print(json.dumps(run(True, lambda m: print(m, file=sys.stderr)), indent=1))
