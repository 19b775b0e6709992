#!/usr/bin/env python3
"""Run pyzmq's own test suite three ways and compare the outcomes.

Downloads the source distribution of the installed pyzmq version from the
package index (``pip download --no-binary :all: --no-deps
--no-build-isolation``; scikit-build-core must be importable, since with
build isolation pip builds cmake from source first), unpacks only its tests/
and pytest.ini into a temporary directory, and runs the test files in FILES:

- plain: pyzmq as it is;
- swapped: pyzmq's tests see ``import zmqfork as zmq`` (tools/pyzmq_suite_swap.py);
- patched: under ``zmqfork.patch()`` (tools/pyzmq_suite_patch.py).

Each test has a timeout (pytest-timeout) and each run a bound in seconds.
Tests that fail are rerun (at most RERUNS times, in a fresh process): one
that then passes counts as passed and is listed as flaky, since pyzmq's own
suite has timing races.  Prints one line per run, the counts side by side,
and every test that passed on plain pyzmq but not in a zmqfork run.  Exit status: 0 when each such test
is on the allow-list (default tools/pyzmq_suite_allow.txt: one ``<test id>
<reason>`` per line), 1 when one is not, 2 when the suite could not be run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

TOOLS = Path(__file__).resolve().parent
FILES = (
    "socket pubsub reqrep pair multipart poll context monitor security error message "
    "asyncio auth device proxy_steerable zmqstream log"
).split()
PLUGINS = {"plain": None, "swapped": "pyzmq_suite_swap", "patched": "pyzmq_suite_patch"}
NEEDED = {  # importable name -> what to pip install
    "scikit_build_core": "scikit-build-core",
    "pytest_timeout": "pytest-timeout",
    "pytest_asyncio": "pytest-asyncio",
    "tornado": "tornado",
}
OUTCOMES = ("passed", "failed", "error", "skipped")
RERUNS = 2


class SetupError(Exception):
    """The suite could not be fetched or run; the message says what to do."""


@dataclass
class Run:
    """One pytest run: the outcome and first message line of each test, by test id."""

    mode: str
    seconds: float = 0.0
    problem: str = ""  # why the run did not finish normally
    outcomes: Dict[str, str] = field(default_factory=dict)
    messages: Dict[str, str] = field(default_factory=dict)
    flaky: Dict[str, str] = field(default_factory=dict)  # test id -> what happened, for tests that passed on rerun

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)


def fetch_tests(version: str, work: Path) -> Path:
    """Download pyzmq's sdist and unpack its tests/ and pytest.ini; return the unpacked root."""
    missing = [pip for name, pip in NEEDED.items() if importlib.util.find_spec(name) is None]
    if missing:
        raise SetupError(f"missing in this environment: {', '.join(missing)}; run: pip install {' '.join(missing)}")
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
         "--no-build-isolation", f"pyzmq=={version}", "-d", str(work)],
        capture_output=True, text=True, timeout=300,
    )
    sdists = sorted(work.glob(f"pyzmq-{version}.tar.gz"))
    if download.returncode != 0 or not sdists:
        raise SetupError(f"pip download of pyzmq=={version} failed:\n{download.stderr[-2000:]}")
    with tarfile.open(sdists[0]) as tar:
        top = f"pyzmq-{version}/"
        wanted = [m for m in tar.getmembers()
                  if (m.name.startswith(top + "tests/") or m.name == top + "pytest.ini")
                  and (m.isfile() or m.isdir()) and ".." not in Path(m.name).parts]
        if not any(m.name == top + "tests/conftest.py" for m in wanted):
            raise SetupError(f"{sdists[0].name} has no tests/conftest.py: this script runs the tests/ "
                             "directory of recent pyzmq source distributions")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(work, members=wanted, filter="data")
        else:  # Python without extraction filters: members were checked above
            tar.extractall(work, members=wanted)
    return work / top


def test_id(classname: str, name: str) -> str:
    """``tests.test_socket.TestSocket`` + ``test_copy`` -> ``test_socket.py::TestSocket::test_copy``."""
    parts = classname.split(".")
    module = next(i for i, part in enumerate(parts) if part.startswith("test_"))
    return "::".join([parts[module] + ".py", *parts[module + 1:], name])


def read_junit(path: Path) -> Tuple[Dict[str, str], Dict[str, str]]:
    """The outcome of each test in a junit report, and the first line of each non-pass's message."""
    outcomes: Dict[str, str] = {}
    messages: Dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = test_id(case.get("classname", ""), case.get("name", ""))
        tags = {child.tag: child for child in case}
        outcome, tag = next(((o, t) for o, t in (("error", "error"), ("failed", "failure"), ("skipped", "skipped"))
                             if t in tags), ("passed", ""))
        outcomes[tid] = outcome
        if tag:
            messages[tid] = (tags[tag].get("message", "").strip().splitlines() or [""])[0][:160]
    return outcomes, messages


def pytest(mode: str, root: Path, name: str, tests: List[str], test_timeout: int, run_timeout: float) -> Run:
    """Run pytest on ``tests`` in ``root`` with the mode's plugin, bounded by ``run_timeout`` seconds."""
    run = Run(mode)
    junit, log = root / f"{name}.xml", root / f"{name}.log"
    junit.unlink(missing_ok=True)  # never read a report left by an earlier run in a kept --workdir
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE",
           f"--timeout={test_timeout}", "--timeout-method=signal", f"--junitxml={junit}", *tests]
    plugin = PLUGINS[mode]
    if plugin:
        cmd[3:3] = ["-p", plugin]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TOOLS), os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code: Optional[int] = proc.wait(timeout=run_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: pytest and any child it forked
            proc.wait()
            code = None
    run.seconds = time.monotonic() - start
    if code is None:
        run.problem = f"killed after {run_timeout:.0f} s"
    elif code not in (0, 1):
        run.problem = f"pytest exited {code}"
    if junit.exists():
        run.outcomes, run.messages = read_junit(junit)
    elif not run.problem:
        run.problem = "pytest wrote no report"
    if run.problem:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        print(f"--- {name}: {run.problem}; last lines of its output:", *tail, "---", sep="\n", flush=True)
    return run


def run_suite(mode: str, root: Path, files: List[str], test_timeout: int, run_timeout: int) -> Run:
    """Run the files, then rerun, in a fresh process, each test that failed or errored (at most RERUNS times).

    pyzmq's suite has timing races (PUB/SUB slow joiners synchronised by
    sleeps: test_log's test_blank_root_topic hangs in about 1 run of 6 on
    plain pyzmq) and a failure can leave state that fails the tests after it
    (test_log's handlers stay on a shared logger), so a test that passes on a
    rerun counts as passed and is listed as flaky.  The run and its reruns
    together are bounded by ``run_timeout`` seconds.
    """
    deadline = time.monotonic() + run_timeout
    run = pytest(mode, root, mode, files, test_timeout, run_timeout)
    for attempt in range(1, RERUNS + 1):
        failed = [tid for tid, outcome in run.outcomes.items() if outcome in ("failed", "error")]
        left = deadline - time.monotonic()
        if not failed or run.problem or left < test_timeout:
            break
        again = pytest(mode, root, f"{mode}-rerun{attempt}", [f"tests/{tid}" for tid in failed], test_timeout, left)
        run.seconds += again.seconds
        for tid in failed:
            if again.outcomes.get(tid) == "passed":
                run.flaky[tid] = f"{run.outcomes[tid]} ({run.messages.pop(tid)}), passed on rerun {attempt}"
                run.outcomes[tid] = "passed"
        if again.problem:
            break
    counts = ", ".join(f"{run.count(o)} {o}" for o in OUTCOMES)
    flaky = f", {len(run.flaky)} passed only on rerun" if run.flaky else ""
    problem = f"; {run.problem}" if run.problem else ""
    print(f"{mode:>8}: {counts}{flaky} ({run.seconds:.0f} s){problem}", flush=True)
    return run


def read_allow_list(path: Path) -> Dict[str, str]:
    """Test id -> reason, from lines ``<test id> <reason>``; ``#`` starts a comment line."""
    allowed: Dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tid, _, reason = line.partition(" ")
        if "::" not in tid or not reason.strip():
            raise SetupError(f"{path}:{number}: write '<test id> <reason>', e.g. "
                             f"'test_socket.py::TestSocket::test_repr pins the class name in repr'; got {line!r}")
        if tid in allowed:
            raise SetupError(f"{path}:{number}: {tid} is listed twice")
        allowed[tid] = reason.strip()
    return allowed


def report(runs: List[Run], allowed: Dict[str, str]) -> Tuple[int, int]:
    """Print the comparison; return how many (test, run) pairs passed on plain pyzmq only, and how many of those are not allowed."""
    plain, *others = runs
    print(f"\n{'':>8}" + "".join(f"{run.mode:>9}" for run in runs))
    for outcome in OUTCOMES:
        print(f"{outcome:>8}" + "".join(f"{run.count(outcome):>9}" for run in runs))
    passed_plain = sorted(t for t, o in plain.outcomes.items() if o == "passed")
    regressions = unexpected = 0
    print("\nPassed on plain pyzmq, not in a zmqfork run:")
    for run in others:
        for tid in passed_plain:
            outcome = run.outcomes.get(tid, "missing")
            if outcome == "passed":
                continue
            reason = allowed.get(tid)
            regressions += 1
            unexpected += reason is None
            note = f"allowed: {reason}" if reason else run.messages.get(tid, "")
            print(f"  {run.mode:<8} {outcome:<8} {tid}  -- {note}")
    for run in runs:
        for tid, what in sorted(run.flaky.items()):
            print(f"  note: flaky in {run.mode}: {tid}: {what}")
    for tid in sorted(allowed):
        if tid not in plain.outcomes:
            print(f"  note: allow-listed but not a test of this pyzmq's suite: {tid}")
        elif all(run.outcomes.get(tid) == "passed" for run in others):
            print(f"  note: allow-listed but passing in every zmqfork run (remove it): {tid}")
    return regressions, unexpected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow", type=Path, default=TOOLS / "pyzmq_suite_allow.txt",
                        help="allow-list file (default: %(default)s)")
    parser.add_argument("--test-timeout", type=int, default=60, help="seconds per test (default: %(default)s)")
    parser.add_argument("--run-timeout", type=int, default=600,
                        help="seconds per run, its reruns included (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, help="unpack and run here, and keep it (default: a temporary directory)")
    args = parser.parse_args()
    version = importlib.metadata.version("pyzmq")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pyzmq-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        allowed = read_allow_list(args.allow)
        root = fetch_tests(version, work)
        files = []
        for name in FILES:
            if (root / "tests" / f"test_{name}.py").exists():
                files.append(f"tests/test_{name}.py")
            else:
                print(f"skipping test_{name}.py: not in pyzmq {version}'s tests")
        print(f"pyzmq {version}: running {len(files)} of its test files three ways", flush=True)
        runs = [run_suite(mode, root, files, args.test_timeout, args.run_timeout) for mode in PLUGINS]
        if runs[0].problem:
            raise SetupError(f"the plain pyzmq run did not finish ({runs[0].problem}): nothing to compare against")
        print(f"{sum(r.seconds for r in runs):.0f} s in all")
        regressions, unexpected = report(runs, allowed)
    except SetupError as error:
        print(f"pyzmq suite: cannot run: {error}")
        return 2
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = ", ".join(f"{run.mode} {run.count('passed')}" for run in runs)
    flaky = sum(len(run.flaky) for run in runs)
    print(f"pyzmq suite (pyzmq {version}): tests passing: {summary}{f' ({flaky} only on rerun)' if flaky else ''}; "
          f"{regressions} failures of tests that pass on plain pyzmq, {unexpected} of them not allow-listed")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
