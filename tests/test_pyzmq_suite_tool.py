"""tools/pyzmq_suite.py: the allow-list, the comparison that sets its exit status, and the rerun of failures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "pyzmq_suite.py"


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pyzmq_suite", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def make_run(tool: ModuleType, mode: str, outcomes: Dict[str, str]) -> object:
    run = tool.Run(mode)
    run.outcomes = dict(outcomes)
    return run


def test_allow_list_needs_a_reason_and_no_duplicates(tool: ModuleType, tmp_path: Path) -> None:
    """An entry without a reason, or listed twice, is refused with its line number; comments are skipped."""
    allow = tmp_path / "allow.txt"
    allow.write_text("# comment\n\ntest_a.py::T::test_x  pins the repr\n")
    assert tool.read_allow_list(allow) == {"test_a.py::T::test_x": "pins the repr"}
    allow.write_text("# comment\ntest_a.py::T::test_x\n")
    with pytest.raises(tool.SetupError, match=r"allow.txt:2: write '<test id> <reason>'"):
        tool.read_allow_list(allow)
    allow.write_text("test_a.py::test_x one\ntest_a.py::test_x two\n")
    with pytest.raises(tool.SetupError, match=r"allow.txt:2: test_a.py::test_x is listed twice"):
        tool.read_allow_list(allow)


def test_only_tests_passing_on_plain_pyzmq_count_and_the_allow_list_excuses_them(
    tool: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain-pass that fails, errors, skips or is missing in a zmqfork run counts; allowed ones are not unexpected."""
    plain = make_run(tool, "plain", {"a": "passed", "b": "failed", "c": "passed", "d": "passed", "e": "passed", "f": "passed"})
    swapped = make_run(tool, "swapped", {"a": "failed", "b": "passed", "c": "passed", "e": "skipped", "f": "passed"})
    patched = make_run(tool, "patched", {"a": "passed", "b": "failed", "c": "error", "d": "passed", "e": "passed", "f": "passed"})
    regressions, unexpected = tool.report([plain, swapped, patched], {"c": "pins the repr", "f": "old", "z": "gone"})
    assert (regressions, unexpected) == (4, 3)  # swapped a, d (missing), e (skipped); patched c (allowed)
    out = capsys.readouterr().out
    assert "swapped  missing  d" in out and "patched  error    c  -- allowed: pins the repr" in out
    assert "allow-listed but not a test of this pyzmq's suite: z" in out
    assert "allow-listed but passing in every zmqfork run (remove it): f" in out
    assert tool.report([plain, plain, plain], {}) == (0, 0)


def test_junit_ids_are_pytest_ids(tool: ModuleType) -> None:
    """junit class names map back to the ids pytest takes (file::class::name)."""
    assert tool.test_id("tests.test_socket.TestSocket", "test_copy") == "test_socket.py::TestSocket::test_copy"
    assert tool.test_id("tests.test_auth", "test_curve[ok-*-True]") == "test_auth.py::test_curve[ok-*-True]"


def test_a_failure_that_passes_on_rerun_is_flaky_and_one_that_keeps_failing_stays_failed(
    tool: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run_suite reruns failures in a fresh process: a test passing the second time is passed and listed as flaky."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fake.py").write_text(
        "import os\n"
        "def test_ok():\n    pass\n"
        "def test_flaky():\n"
        "    first = not os.path.exists('ran')\n"
        "    open('ran', 'w').close()\n"
        "    assert not first, 'first time'\n"
        "def test_broken():\n    assert False, 'always'\n"
    )
    run = tool.run_suite("plain", tmp_path, ["tests/test_fake.py"], 60, 120)
    assert run.outcomes == {
        "test_fake.py::test_ok": "passed",
        "test_fake.py::test_flaky": "passed",
        "test_fake.py::test_broken": "failed",
    }
    assert list(run.flaky) == ["test_fake.py::test_flaky"] and "passed on rerun 1" in run.flaky["test_fake.py::test_flaky"]
    assert (tmp_path / "plain-rerun2.xml").exists()  # the broken test was run three times in all
    assert "2 passed, 1 failed, 0 error, 0 skipped, 1 passed only on rerun" in capsys.readouterr().out


def test_a_run_past_its_bound_is_killed_and_reported(
    tool: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pytest run that outlives run_timeout is killed (with its session) and the run says so; no rerun follows."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_hang.py").write_text("import time\ndef test_hang():\n    time.sleep(120)\n")
    run = tool.run_suite("plain", tmp_path, ["tests/test_hang.py"], 60, 3)
    assert run.problem == "killed after 3 s" and run.outcomes == {}
    assert run.seconds < 30 and not (tmp_path / "plain-rerun1.log").exists()
    assert "--- plain: killed after 3 s; last lines of its output:" in capsys.readouterr().out
