"""``python -m zmqfork demo``: the fork chain, with zmqfork or (``--raw``) with plain pyzmq.

The first process binds a PULL and watches.  Each generation makes a context
and a PUSH, connects, sends its generation number and descriptor count,
forks the next generation and exits.  With plain pyzmq every child inherits
the descriptors of every ancestor's libzmq context and never closes them: the
count grows until libzmq runs out of descriptors and the chain breaks.  With
zmqfork the count stays flat.

zmqfork's descriptor hooks, once imported, clean up after plain pyzmq
contexts too; so ``--raw`` runs the chain in a fresh interpreter with every
zmqfork mechanism switched off by ``$ZMQFORK_DISABLE``.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Dict, List, Optional, TextIO

import zmq as pyzmq

import zmqfork
from zmqfork._children import fork_by, open_fds
from zmqfork._native import DISABLE_ENV, disabled_features

__all__ = ["DEFAULT_GENERATIONS", "DEFAULT_FD_LIMIT", "ChainResult", "run_chain", "main"]

DEFAULT_GENERATIONS = 200
#: The soft descriptor limit the chain runs under (a common default): plain
#: pyzmq breaks at about generation 145 under it.
DEFAULT_FD_LIMIT = 1024
#: Seconds the chain may go without any news (a message or a process ending) before it counts as hung.
STALL_TIMEOUT = 15.0
_PR_SET_CHILD_SUBREAPER = 36
_ALL_MECHANISMS = ("atfork", "wipeonfork", "fdtrack")


@dataclass
class ChainResult:
    """What the first process saw: descriptor counts by generation, and how the chain ended."""

    generations: int
    fds: Dict[int, int] = field(default_factory=dict)
    #: Wait statuses of generations that did not exit cleanly, by pid.
    failures: Dict[int, str] = field(default_factory=dict)
    stalled: bool = False

    @property
    def received(self) -> int:
        """How many generations reported."""
        return len(self.fds)

    @property
    def complete(self) -> bool:
        """Every generation reported and exited cleanly."""
        return self.received == self.generations and not self.failures and not self.stalled

    def growth(self) -> float:
        """Descriptors gained per generation, from the first report to the last."""
        if len(self.fds) < 2:
            return 0.0
        first, last = min(self.fds), max(self.fds)
        return (self.fds[last] - self.fds[first]) / (last - first)


def _become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux), so every generation is reaped here; True if it worked."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


def _generation_process(zmq: ModuleType, endpoint: str, first: int, last: int) -> None:
    """The body of every generation after the first process; never returns."""
    code = 1
    try:
        number = first
        while True:
            ctx = zmq.Context()
            push = ctx.socket(pyzmq.PUSH)
            push.connect(endpoint)
            push.send_json({"gen": number, "pid": os.getpid(), "fds": len(open_fds())})
            if number < last and fork_by("os") == 0:
                number += 1  # the child carries on as the next generation
                continue
            push.close(linger=int(STALL_TIMEOUT * 1000))
            ctx.term()
            code = 0
            break
    finally:
        os._exit(code)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def run_chain(generations: int, raw: bool, fd_limit: int, progress: Optional[TextIO] = None) -> ChainResult:
    """Run the chain of ``generations`` processes under a soft descriptor limit of ``fd_limit``."""
    zmq: ModuleType = pyzmq if raw else zmqfork
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = fd_limit if hard == resource.RLIM_INFINITY else min(fd_limit, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    core = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))  # libzmq aborts when it runs out: no core files
    reaper = _become_subreaper()
    result = ChainResult(generations)
    ctx = zmq.Context()
    pull = ctx.socket(pyzmq.PULL)
    pull.linger = 0
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    if progress is not None:
        progress.flush()
    first_pid = fork_by("os")
    if first_pid == 0:
        _generation_process(zmq, f"tcp://127.0.0.1:{port}", 1, generations)
    pids: List[int] = [first_pid]
    try:
        last_news = time.monotonic()
        while True:
            if pull.poll(50):
                report = pull.recv_json()
                result.fds[int(report["gen"])] = int(report["fds"])
                pids.append(int(report["pid"]))
                last_news = time.monotonic()
                if progress is not None:
                    _draw(progress, result, raw)
                continue
            if _reap(result, pids, reaper):
                last_news = time.monotonic()
            chain_over = not _has_children() if reaper else result.received == generations
            if chain_over and not pull.poll(0):
                break
            if time.monotonic() - last_news > STALL_TIMEOUT:
                result.stalled = True
                break
    finally:
        _kill_leftovers(pids)
        ctx.destroy(linger=0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        resource.setrlimit(resource.RLIMIT_CORE, core)
    if progress is not None and progress.isatty():
        progress.write("\n")
    return result


def _reap(result: ChainResult, pids: List[int], any_child: bool) -> bool:
    """Reap finished generations, recording abnormal ends; True if any was reaped."""
    reaped = False
    while True:
        try:
            pid, status = os.waitpid(-1 if any_child else pids[0], os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped = True
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            result.failures[pid] = _describe_status(status)


def _has_children() -> bool:
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _kill_leftovers(pids: List[int]) -> None:
    """Kill and reap any generation still running (only this process's own children)."""
    for pid in pids:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        except ChildProcessError:
            continue


def _draw(out: TextIO, result: ChainResult, raw: bool) -> None:
    width = 30
    done = result.received * width // result.generations
    last = max(result.fds)
    bar = "#" * done + "-" * (width - done)
    line = f"[{bar}] generation {last}/{result.generations}  fds {result.fds[last]}  received {result.received}"
    if out.isatty():
        out.write("\r" + line)
    elif last == result.generations or last % max(1, result.generations // 10) == 0:
        out.write(line + "\n")
    out.flush()


def verdict(result: ChainResult, raw: bool, fd_limit: int) -> str:
    """The one-line conclusion of a chain run."""
    who = "plain pyzmq" if raw else "zmqfork"
    if not result.fds:
        return f"{who}: no generation reported"
    first, last = min(result.fds), max(result.fds)
    span = f"descriptors {result.fds[first]} -> {result.fds[last]}"
    per = result.growth()
    if not result.complete:
        why = ", ".join(sorted(set(result.failures.values()))) or ("stalled" if result.stalled else "ended early")
        return (
            f"{who}: the chain broke after generation {last} of {result.generations} ({why}); "
            f"{span}, about {per:.1f} more per generation"
        )
    if per >= 0.5:
        reach = int(last + (fd_limit - result.fds[last]) / per)
        return (
            f"{who}: {result.received}/{result.generations} generations, but {span} (about {per:.1f} more per "
            f"generation): it would break near generation {reach} under a limit of {fd_limit}"
        )
    return f"{who}: {result.received}/{result.generations} generations, {span}: fork-safe"


def _rerun_without_zmqfork(generations: int, fd_limit: int, out: TextIO) -> int:
    """Run ``demo --raw`` in a fresh interpreter where zmqfork's mechanisms are all off."""
    command = [sys.executable, "-m", "zmqfork", "demo", "--raw"]
    command += ["--generations", str(generations), "--fd-limit", str(fd_limit)]
    env = dict(os.environ, **{DISABLE_ENV: ",".join(_ALL_MECHANISMS)})
    out.flush()
    try:
        return subprocess.run(command, env=env, stdout=out, timeout=60 + generations).returncode
    except subprocess.TimeoutExpired:
        print("plain pyzmq: the demo did not finish in time and was stopped", file=out)
        return 1


def main(generations: int, raw: bool, fd_limit: int, out: TextIO = sys.stdout) -> int:
    """Run the demo; 0 if the chain completed with a flat descriptor count, else 1."""
    if generations < 1:
        raise ValueError(f"--generations must be at least 1, not {generations}")
    if raw and not disabled_features().issuperset(_ALL_MECHANISMS):
        return _rerun_without_zmqfork(generations, fd_limit, out)
    who = "plain pyzmq" if raw else "zmqfork"
    print(f"Fork chain of {generations} generations on {who}, descriptor limit {fd_limit}", file=out)
    result = run_chain(generations, raw, fd_limit, progress=out)
    samples = sorted(result.fds)[:: max(1, len(result.fds) // 10)]
    if result.fds and max(result.fds) not in samples:
        samples.append(max(result.fds))
    print("fds by generation: " + "  ".join(f"{gen}:{result.fds[gen]}" for gen in samples), file=out)
    print(f"messages received: {result.received} of {generations}", file=out)
    print(verdict(result, raw, fd_limit), file=out)
    return 0 if result.complete and result.growth() < 0.5 else 1
