"""Why zmqfork's per-call cost is what it is: variants of the proxy's hot path, side by side.

``python benchmarks/hotpath_probe.py`` times 1 B inproc PUSH/PULL send+recv
for raw pyzmq, zmqfork as installed, and proxies that differ from zmqfork's
pre-51fb631 ``Socket`` in one thing at a time:

- ``mirror``: zmqfork's hot path as it was before commit 51fb631
  (AttributeSetter base, ``TOKEN[0] != self._token``, backend ``send``,
  ``self._sock.recv``): matched zmqfork then (630 vs 632 ns here);
- ``no_getattr``: the same without a ``__getattr__`` on the proxy class
  (CPython 3.11+ cannot specialise attribute loads on classes that define
  ``__getattr__``: every ``self._token``/``self._sock`` is a generic lookup);
- ``backend_recv``: recv calls the compiled backend's ``recv`` as a plain
  function instead of ``self._sock.recv`` (zmq.Socket also defines
  ``__getattr__``, so that method lookup is generic too);
- ``both``: both changes (what commit 51fb631 did; must now match zmqfork);
- ``no_check``: ``both`` without the token check (what the check costs).

Interleaved repetitions after warm-up; medians and interquartile ranges.
Not part of run.py: it is the evidence for the per-call analysis.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time

import zmq
from zmq.backend import Socket as _BackendSocket
from zmq.sugar.attrsettr import AttributeSetter

_backend_send = _BackendSocket.send
_backend_recv = _BackendSocket.recv

try:
    import zmqfork
    from zmqfork._generation import TOKEN
except Exception as exc:  # zmqfork mid-change: the probe still runs the mirrors
    zmqfork = None
    print(f"zmqfork not importable ({exc!r}); using a stand-in token", file=sys.stderr)
    TOKEN = memoryview(bytearray(8)).cast("Q")
    TOKEN[0] = 12345


class Mirror(AttributeSetter):
    def __init__(self, sock):
        self.__dict__.update(_sock=sock, _token=TOKEN[0])

    def _refresh(self):
        raise RuntimeError("forked")

    def send(self, data, flags=0, copy=True, track=False, routing_id=None, group=None):
        if TOKEN[0] != self._token:
            self._refresh()
        if routing_id is None and group is None:
            return _backend_send(self._sock, data, flags, copy, track)
        return self._sock.send(data, flags, copy, track, routing_id, group)

    def recv(self, flags=0, copy=True, track=False):
        if TOKEN[0] != self._token:
            self._refresh()
        return self._sock.recv(flags, copy, track)


class NoGetattr:
    def __init__(self, sock):
        self._sock = sock
        self._token = TOKEN[0]

    _refresh = Mirror._refresh
    send = Mirror.send
    recv = Mirror.recv


class BackendRecv(Mirror):
    def recv(self, flags=0, copy=True, track=False):
        if TOKEN[0] != self._token:
            self._refresh()
        return _backend_recv(self._sock, flags, copy, track)


class Both(NoGetattr):
    recv = BackendRecv.recv


class NoCheck(NoGetattr):
    def send(self, data, flags=0, copy=True, track=False, routing_id=None, group=None):
        if routing_id is None and group is None:
            return _backend_send(self._sock, data, flags, copy, track)
        return self._sock.send(data, flags, copy, track, routing_id, group)

    def recv(self, flags=0, copy=True, track=False):
        return _backend_recv(self._sock, flags, copy, track)


def _pair(ctx, name):
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"inproc://probe-{name}")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"inproc://probe-{name}")
    return push, pull


def _loop(push, pull, n):
    msg = b"x"
    t0 = time.perf_counter_ns()
    for _ in range(n):
        push.send(msg)
        pull.recv()
    return (time.perf_counter_ns() - t0) / n


def main() -> None:
    n, warmup, reps = 20000, 3, 15
    ctx = zmq.Context()
    cases = {"raw pyzmq": _pair(ctx, "raw")}
    if zmqfork is not None:
        zctx = zmqfork.Context()
        cases["zmqfork"] = _pair(zctx, "zmqfork")
    for name, cls in (("mirror", Mirror), ("no_getattr", NoGetattr), ("backend_recv", BackendRecv),
                      ("both", Both), ("no_check", NoCheck)):
        push, pull = _pair(ctx, name)
        cases[name] = (cls(push), cls(pull))
    samples = {k: [] for k in cases}
    names = list(cases)
    for rep in range(warmup + reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for k in order:
            gc.disable()
            ns = _loop(*cases[k], n)
            gc.enable()
            if rep >= warmup:
                samples[k].append(ns)
    raw = statistics.median(samples["raw pyzmq"])
    print(f"Python {sys.version.split()[0]}, pyzmq {zmq.__version__}; 1 B inproc send+recv, ns per pair")
    for k in names:
        v = sorted(samples[k])
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
        med = statistics.median(v)
        print(f"  {k:<13} {med:6.0f} ns  [{q1:.0f}-{q3:.0f}]  {med / raw:.2f}x raw")


if __name__ == "__main__":
    main()
