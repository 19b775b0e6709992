"""python -m zmqfork doctor and demo, run as a user would, in a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, Optional, Tuple

import pytest

from forking import run_session


def run_cli(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 120.0) -> Tuple[int, str, str]:
    """Run ``python -m zmqfork ARGS`` in its own session; return (exit status, stdout, stderr)."""
    return run_session([sys.executable, "-m", "zmqfork", *args], env=env, timeout=timeout)


def test_doctor_json_all_checks_pass() -> None:
    """The doctor's JSON names the versions and mechanisms; every fork kind passes every check; exit 0."""
    code, out, err = run_cli("doctor", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True, (out, err)
    assert {"zmqfork", "pyzmq", "libzmq", "detection", "checks"} <= set(report)
    assert report["detection"]["atfork"] and report["detection"]["wipeonfork"] and report["detection"]["fdtrack"]
    checks = {(check["fork"], check["name"]): check["status"] for check in report["checks"]}
    for fork in ("os.fork()", "libc fork()", "raw clone syscall"):
        for name in ("detection", "descriptors", "rebuild"):
            assert checks[fork, name] == "pass"
    assert checks["parent", "unaffected"] == "pass"


def test_doctor_text_report() -> None:
    """The text report lists detection, descriptor tracking (with the hooked object) and ends with a verdict."""
    code, out, _ = run_cli("doctor")
    assert code == 0
    assert "wipe-on-fork page     on" in out and "hooked object" in out
    assert "Other threads           none (libzmq's are covered)" in out
    assert out.rstrip().splitlines()[-1].startswith("OK: 10 passed, 0 failed, 0 skipped")


def test_doctor_without_wipeonfork_skips_raw_clone_and_exits_1() -> None:
    """With wipe-on-fork off, the raw clone checks are skipped with the reason (never run: they would spin)."""
    code, out, _ = run_cli("doctor", "--json", env={"ZMQFORK_DISABLE": "wipeonfork"})
    report = json.loads(out)
    raw = [check for check in report["checks"] if check["fork"] == "raw clone syscall"]
    assert code == 1 and report["ok"] is False
    assert raw and all(check["status"] == "skip" and "wipe-on-fork" in check["detail"] for check in raw)
    assert all(check["status"] == "pass" for check in report["checks"] if check["fork"] != "raw clone syscall")


def test_doctor_without_descriptor_tracking_reports_why() -> None:
    """With descriptor tracking off, the descriptor checks are skipped and say why."""
    code, out, _ = run_cli("doctor", "--json", env={"ZMQFORK_DISABLE": "fdtrack"})
    report = json.loads(out)
    statuses = {check["name"]: check["status"] for check in report["checks"] if check["fork"] == "libc fork()"}
    assert code == 1 and statuses == {"detection": "pass", "descriptors": "skip", "rebuild": "pass"}
    assert "ZMQFORK_DISABLE" in report["detection"]["unavailable"]["fdtrack"]


def test_demo_chain_on_zmqfork_stays_flat() -> None:
    """The zmqfork chain completes, every generation reports, the descriptor count stays flat; exit 0."""
    code, out, err = run_cli("demo", "--generations", "40")
    assert code == 0, (out, err)
    assert "messages received: 40 of 40" in out
    assert out.rstrip().splitlines()[-1].endswith("fork-safe")


def test_demo_raw_chain_breaks_on_plain_pyzmq() -> None:
    """On plain pyzmq, descriptors grow each generation until the chain breaks under the limit; exit 1."""
    code, out, err = run_cli("demo", "--raw", "--generations", "60", "--fd-limit", "160")
    verdict = out.rstrip().splitlines()[-1]
    assert code == 1, (out, err)
    assert verdict.startswith("plain pyzmq: the chain broke after generation"), out
    assert "more per generation" in verdict


@pytest.mark.parametrize("args", [["demo", "--generations", "0"], ["demo", "--generations", "x"], ["nothing"], []])
def test_bad_arguments_are_usage_errors(args: list) -> None:
    """Bad commands and counts are reported by argparse with exit status 2."""
    code, _, err = run_cli(*args)
    assert code == 2 and "usage:" in err
