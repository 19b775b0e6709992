"""Measurement 1: per-call cost of send+recv (PUSH/PULL) and a REQ/REP round trip.

All alternatives live in the same process; repetitions are interleaved (the
order of alternatives rotates every repetition) after warm-up repetitions
that are discarded.  Each repetition times ``n`` operations and yields ns per
operation.  A case whose alternative fails to deliver the right message is
reported as broken; it never stops the run.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Dict, List

import zmq

import alternatives
from common import PERCALL_ALTERNATIVES, free_tcp_endpoint, rotations, summary

# (case id, pattern, transport, payload size)
CASES = [
    ("pushpull-inproc-1B", "pushpull", "inproc", 1),
    ("pushpull-inproc-1KiB", "pushpull", "inproc", 1024),
    ("pushpull-tcp-1B", "pushpull", "tcp", 1),
    ("pushpull-tcp-1KiB", "pushpull", "tcp", 1024),
    ("reqrep-inproc-1B", "reqrep", "inproc", 1),
    ("reqrep-tcp-1B", "reqrep", "tcp", 1),
]


def _endpoint(transport: str, tag: str) -> str:
    return f"inproc://bench-{tag}" if transport == "inproc" else free_tcp_endpoint()


def _make_pair(alt: str, pattern: str, transport: str, tag: str):
    ctx = alternatives.get(alt).Context()
    if pattern == "pushpull":
        a, b = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    else:
        a, b = ctx.socket(zmq.REP), ctx.socket(zmq.REQ)
    addr = _endpoint(transport, tag)
    a.bind(addr)
    b.connect(addr)
    return ctx, b, a  # ctx, client side (PUSH/REQ), server side (PULL/REP)


def _loop_pushpull(push, pull, msg: bytes, n: int) -> float:
    for _ in range(3):  # the loop must move the right bytes, or the case is broken
        push.send(msg)
        got = pull.recv()
        if got != msg:
            raise AssertionError(f"received {len(got)} bytes, expected {len(msg)}")
    t0 = time.perf_counter_ns()
    for _ in range(n):
        push.send(msg)
        pull.recv()
    return (time.perf_counter_ns() - t0) / n


def _loop_reqrep(req, rep, msg: bytes, n: int) -> float:
    req.send(msg)
    if rep.recv() != msg:
        raise AssertionError("REP received wrong message")
    rep.send(msg)
    if req.recv() != msg:
        raise AssertionError("REQ received wrong reply")
    t0 = time.perf_counter_ns()
    for _ in range(n):
        req.send(msg)
        rep.recv()
        rep.send(msg)
        req.recv()
    return (time.perf_counter_ns() - t0) / n


def run(quick: bool, log: Callable[[str], None]) -> Dict[str, Any]:
    warmup, reps = (1, 5) if quick else (3, 15)
    scale = 0.5 if quick else 1.0
    iters = {"inproc": int(20000 * scale), "tcp": int(2000 * scale)}
    results: Dict[str, Any] = {"warmup": warmup, "repetitions": reps, "iterations": iters, "cases": {}}
    pairs: Dict[tuple, Any] = {}
    broken: Dict[tuple, str] = {}
    for case, pattern, transport, _size in CASES:
        for alt in PERCALL_ALTERNATIVES:
            try:
                pairs[case, alt] = _make_pair(alt, pattern, transport, f"{case}-{alt}")
            except Exception as exc:
                broken[case, alt] = f"setup: {exc!r}"
    samples: Dict[tuple, List[float]] = {key: [] for key in pairs}
    gc_was = gc.isenabled()
    try:
        for rep, order in rotations(PERCALL_ALTERNATIVES, warmup + reps):
            for case, pattern, transport, size in CASES:
                msg = b"x" * size
                for alt in order:
                    if (case, alt) in broken or (case, alt) not in pairs:
                        continue
                    _ctx, client, server = pairs[case, alt]
                    loop = _loop_pushpull if pattern == "pushpull" else _loop_reqrep
                    gc.disable()
                    try:
                        ns = loop(client, server, msg, iters[transport])
                    except Exception as exc:
                        broken[case, alt] = repr(exc)
                        continue
                    finally:
                        if gc_was:
                            gc.enable()
                    if rep >= warmup:
                        samples[case, alt].append(ns)
            log(f"  per-call repetition {rep + 1}/{warmup + reps}{' (warm-up)' if rep < warmup else ''}")
    finally:
        for ctx, client, server in pairs.values():
            try:
                client.close(0)
                server.close(0)
                ctx.term()
            except Exception:
                pass
    for case, pattern, transport, size in CASES:
        row: Dict[str, Any] = {"pattern": pattern, "transport": transport, "size": size, "alternatives": {}}
        raw = summary(samples.get((case, "raw"), []))
        for alt in PERCALL_ALTERNATIVES:
            if (case, alt) in broken:
                row["alternatives"][alt] = {"broken": broken[case, alt]}
                continue
            s = summary(samples[case, alt])
            if raw and s:
                s["ratio_to_raw"] = s["median"] / raw["median"]
            row["alternatives"][alt] = s
        results["cases"][case] = row
    return results
