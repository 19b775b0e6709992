"""``python -m zmqfork doctor``: versions, fork detection, descriptor tracking, and a live self-test.

The self-test forks by ``os.fork()``, libc ``fork()`` and the raw clone
syscall.  Each child checks that it noticed the fork (detection), that none of
the parent's libzmq descriptors is open in it (descriptor cleanup), and sends
on an inherited socket, which the parent must receive (rebuild).  Last, the
parent's own sockets must still work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, TextIO

import zmq as pyzmq

import zmqfork
from zmqfork._children import FORK_KINDS, open_fds, run_in_child, unavailable_reason

__all__ = ["Check", "self_test", "report", "main"]

#: Seconds any single wait of the self-test may take.
TIMEOUT = 10.0


@dataclass(frozen=True)
class Check:
    """One self-test result: ``status`` is "pass", "fail" or "skip" (could not run here, ``detail`` says why)."""

    fork: str
    name: str
    status: str
    detail: str


def self_test() -> List[Check]:
    """Fork once by each kind and check detection, descriptor cleanup and rebuild; then the parent."""
    before = open_fds()
    ctx = zmqfork.Context()
    try:
        pull = ctx.socket(pyzmq.PULL)
        pull.linger = 0
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = ctx.socket(pyzmq.PUSH)
        push.linger = 0
        push.connect(f"tcp://127.0.0.1:{port}")
        # A round trip: the connection (and its descriptors) exists on both sides.
        push.send(b"warm-up")
        if not pull.poll(int(TIMEOUT * 1000)) or pull.recv() != b"warm-up":
            return [Check("parent", "setup", "fail", "a message between two sockets of this process did not arrive")]
        libzmq_fds = sorted(open_fds() - before)
        checks: List[Check] = []
        for kind in FORK_KINDS:
            checks.extend(_check_fork_kind(kind, ctx, push, pull, libzmq_fds))
        push.send(b"parent")
        alive = bool(pull.poll(int(TIMEOUT * 1000))) and pull.recv() == b"parent"
        checks.append(
            Check("parent", "unaffected", "pass" if alive else "fail", "its sockets still work after the children")
        )
        return checks
    finally:
        ctx.destroy(linger=0)


def _check_fork_kind(
    kind: str, ctx: Any, push: Any, pull: Any, libzmq_fds: List[int]
) -> List[Check]:
    label = FORK_KINDS[kind]
    reason = unavailable_reason(kind)
    if reason is None and kind == "raw" and not zmqfork.detection().wipeonfork:
        why = zmqfork.detection().unavailable.get("wipeonfork", "off")
        reason = f"a raw clone is only detected with wipe-on-fork, which is off ({why})"
    if reason is not None:
        return [Check(label, name, "skip", reason) for name in ("detection", "descriptors", "rebuild")]
    parent_generation = zmqfork.generation()

    def child() -> Dict[str, Any]:
        generation = zmqfork.generation()
        if generation == parent_generation:
            # The fork went unseen: touching the inherited sockets now would spin in libzmq.
            return {"detected": False, "generation": generation}
        open_now = open_fds()
        still_open = [fd for fd in libzmq_fds if fd in open_now]
        state = zmqfork.detection()
        push.send_string(f"{kind} {os.getpid()}")
        ctx.destroy(linger=int(TIMEOUT * 1000))
        return {
            "detected": True,
            "generation": generation,
            "still_open": still_open,
            "fdtrack": state.fdtrack,
            "fds_closed": state.fds_closed,
            "fds_untracked": state.fds_untracked,
            "fds_cleanup_ns": state.fds_cleanup_ns,
        }

    outcome = run_in_child(child, kind, TIMEOUT)
    if outcome.error is not None:
        return [Check(label, "child", "fail", outcome.error.strip().splitlines()[-1])]
    result = outcome.value
    if not result["detected"]:
        detail = f"the child did not notice the fork (generation {parent_generation} -> {result['generation']})"
        return [Check(label, "detection", "fail", detail)]
    checks = [Check(label, "detection", "pass", f"generation {parent_generation} -> {result['generation']}")]
    still_open = result["still_open"]
    if not result["fdtrack"]:
        why = zmqfork.detection().unavailable.get("fdtrack", "off")
        detail = f"descriptor tracking is off ({why}); {len(still_open)} of {len(libzmq_fds)} stayed open"
        checks.append(Check(label, "descriptors", "skip", detail))
    elif still_open:
        detail = f"{len(still_open)} of the parent's {len(libzmq_fds)} libzmq descriptors still open: {still_open}"
        checks.append(Check(label, "descriptors", "fail", detail))
    else:
        took = result["fds_cleanup_ns"] / 1000
        detail = f"all {len(libzmq_fds)} of the parent's libzmq descriptors closed in the child (cleanup {took:.0f} µs)"
        if result["fds_untracked"]:
            detail += f"; {result['fds_untracked']} untracked (may have survived into it)"
        checks.append(Check(label, "descriptors", "pass", detail))
    arrived = bool(pull.poll(int(TIMEOUT * 1000))) and pull.recv_string() == f"{kind} {outcome.pid}"
    detail = "the child's message on the inherited socket arrived" if arrived else "no message from the child"
    checks.append(Check(label, "rebuild", "pass" if arrived else "fail", detail))
    return checks


def report(checks: List[Check]) -> Dict[str, Any]:
    """Everything the doctor knows, as plain data (the ``--json`` output)."""
    return {
        "zmqfork": zmqfork.__version__,
        "pyzmq": pyzmq.pyzmq_version(),
        "libzmq": pyzmq.zmq_version(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "detection": zmqfork.detection()._asdict(),
        "checks": [dataclasses.asdict(check) for check in checks],
        "ok": all(check.status == "pass" for check in checks),
    }


def _print_text(data: Dict[str, Any], out: TextIO) -> None:
    det = data["detection"]
    why = det["unavailable"]

    def state(name: str) -> str:
        return "on" if det[name] else f"off ({why.get(name, 'unavailable')})"

    print(
        f"zmqfork {data['zmqfork']}  pyzmq {data['pyzmq']}  libzmq {data['libzmq']}  "
        f"Python {data['python']} on {data['platform']}",
        file=out,
    )
    print("\nFork detection", file=out)
    print(f"  atfork handlers       {state('atfork')}", file=out)
    print(f"  wipe-on-fork page     {state('wipeonfork')}", file=out)
    print(f"\nDescriptor tracking     {state('fdtrack')}", file=out)
    if det["fdtrack"]:
        print(f"  hooked object         {det['fdtrack_object']}", file=out)
        print(f"  hooked functions      {', '.join(det['fdtrack_functions'])}", file=out)
        print(f"  descriptors tracked   {det['fds_tracked']}", file=out)
        print(f"  untracked (may leak)  {det['fds_untracked']}", file=out)
    others = det["foreign_threads"]
    listed = ", ".join(f"{tid} {name!r}" for tid, name in others) if others else "none (libzmq's are covered)"
    print(f"\nOther threads           {listed}", file=out)
    print("\nSelf-test", file=out)
    for check in data["checks"]:
        print(f"  {check['fork']:<18} {check['name']:<12} {check['status'].upper():<5} {check['detail']}", file=out)
    counts = {status: sum(check["status"] == status for check in data["checks"]) for status in ("pass", "fail", "skip")}
    verdict = "OK" if data["ok"] else "NOT OK"
    print(f"\n{verdict}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped", file=out)


def main(as_json: bool, out: TextIO = sys.stdout) -> int:
    """Run the doctor; print text or JSON to ``out``; 0 if every check passed, else 1."""
    data = report(self_test())
    if as_json:
        json.dump(data, out, indent=2)
        out.write("\n")
    else:
        _print_text(data, out)
    return 0 if data["ok"] else 1
