"""The CI skip guard (tests/skipguard.py): a skip or xfail without an allow-list entry fails the run.

Each test runs pytest in a subprocess on a small generated suite whose
conftest loads the guard, and checks the exit status and the report.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest

import skipguard
from forking import run_session

TESTS = Path(__file__).resolve().parent

SUITE = """
import pytest

def test_passes():
    pass

def test_skips_for_lack_of_a_tool():
    pytest.skip("frobnicator absent")

@pytest.mark.parametrize("cpu", ["x86", "sparc"])
def test_skips_on_a_cpu(cpu):
    if cpu == "sparc":
        pytest.skip("sparc: emulator absent")

@pytest.mark.xfail(strict=True, reason="a known defect of the driver")
def test_fails_as_expected():
    assert False
"""

ALL_ALLOWED = """
# comment, then a blank line

test_suite.py::test_skips_for_lack_of_a_tool | frobnicator absent | the frobnicator is optional
test_suite.py::test_skips_on_a_cpu* | sparc: * | no sparc emulator on the machine
test_suite.py::test_fails_as_expected | a known defect * | fixed in the next driver
"""


def run_suite(tmp_path: Path, allow: Optional[str], *, ci: str = "", args: Tuple[str, ...] = ()) -> Tuple[int, str]:
    """Run SUITE with the guard loaded; ``allow`` is written as the allow-list and passed with --allowed-skips."""
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(SUITE))
    (tmp_path / "conftest.py").write_text("from skipguard import pytest_addoption, pytest_configure\n")
    # --rootdir: test ids relative to tmp_path whatever the working directory (pytest's default depends on it).
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rN", "--rootdir", str(tmp_path),
            str(tmp_path), *args]
    if allow is not None:
        (tmp_path / "allowed").write_text(textwrap.dedent(allow))
        argv += ["--allowed-skips", str(tmp_path / "allowed")]
    env: Dict[str, str] = {"PYTHONPATH": str(TESTS), "CI": ci}
    status, out, err = run_session(argv, env=env, timeout=120)
    return status, out + err


def test_every_skip_allowed_passes(tmp_path: Path) -> None:
    """With an entry for each skip and the xfail, the run passes."""
    status, out = run_suite(tmp_path, ALL_ALLOWED)
    assert status == 0, out
    assert "2 passed, 2 skipped, 1 xfailed" in out and "not on the allow-list" not in out


def test_unlisted_skip_fails_the_run(tmp_path: Path) -> None:
    """A skip with no entry fails the run, which names it and its message; the covered ones are not listed."""
    allow = ALL_ALLOWED.replace("test_suite.py::test_skips_for_lack_of_a_tool", "# removed")
    status, out = run_suite(tmp_path, allow)
    assert status == pytest.ExitCode.TESTS_FAILED, out
    assert "skipped: test_suite.py::test_skips_for_lack_of_a_tool: frobnicator absent" in out
    assert "test_skips_on_a_cpu[sparc]" not in out.split("not on the allow-list")[1]


def test_unlisted_xfail_fails_the_run(tmp_path: Path) -> None:
    """An xfail hides a failure as a skip does: without an entry it fails the run too."""
    allow = ALL_ALLOWED.replace("test_suite.py::test_fails_as_expected", "# removed")
    status, out = run_suite(tmp_path, allow)
    assert status == pytest.ExitCode.TESTS_FAILED, out
    assert "xfail: test_suite.py::test_fails_as_expected: a known defect of the driver" in out


def test_entry_for_another_message_does_not_cover(tmp_path: Path) -> None:
    """An entry covers its test only when the skip says what the entry expects: another reason still fails."""
    allow = ALL_ALLOWED.replace("| frobnicator absent |", "| compiler absent |")
    status, out = run_suite(tmp_path, allow)
    assert status == pytest.ExitCode.TESTS_FAILED, out
    assert "test_skips_for_lack_of_a_tool: frobnicator absent" in out
    assert "matched nothing" in out and "line 4" in out


def test_ci_environment_turns_the_guard_on(tmp_path: Path) -> None:
    """Without --allowed-skips, $CI=true applies the default list (.ci/allowed-skips), which knows none of these."""
    status, out = run_suite(tmp_path, None, ci="true")
    assert status == pytest.ExitCode.TESTS_FAILED, out
    assert str(skipguard.DEFAULT_ALLOW_LIST) in out


def test_off_outside_ci(tmp_path: Path) -> None:
    """Outside CI and without the option, skips are only reported, as pytest always does."""
    status, out = run_suite(tmp_path, None, ci="")
    assert status == 0, out


def test_malformed_allow_list_is_a_usage_error(tmp_path: Path) -> None:
    """An entry without its reason stops the run before any test, naming the file, the line and the format."""
    status, out = run_suite(tmp_path, "test_suite.py::* | frobnicator absent\n")
    assert status == pytest.ExitCode.USAGE_ERROR, out
    assert "allowed:1: expected '<test id pattern> | <skip message pattern> | <reason>'" in out


def test_missing_allow_list_is_a_usage_error(tmp_path: Path) -> None:
    """A --allowed-skips file that does not exist is a usage error naming it."""
    status, out = run_suite(tmp_path, None, args=("--allowed-skips", str(tmp_path / "nowhere")))
    assert status == pytest.ExitCode.USAGE_ERROR, out
    assert "nowhere" in out
