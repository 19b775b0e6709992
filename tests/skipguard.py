"""A pytest plugin that fails the session on any skip or xfail not on an allow-list with its reason.

Active when ``$CI`` is ``true`` (or ``1``), or when ``--allowed-skips FILE``
is given; tests/conftest.py imports its two hooks (``-p skipguard`` with
tests/ on the path works too).  The allow-list (by default
``.ci/allowed-skips`` beside ``tests/``) has one entry per line::

    <test id pattern> | <skip message pattern> | <why this skip is acceptable>

Both patterns are shell-style (``fnmatch``, case-sensitive): the first matches
the test id as pytest prints it (``tests/test_arch.py::test_x[aarch64]``), the
second the skip message (or the xfail reason), so that a test allowed to skip
for one reason still fails the run when it skips for another.  Blank lines
and lines starting with ``#`` are ignored.  A test that skips, or fails as
expected (xfail), without a matching entry fails the session; entries that
matched nothing are listed, since they may be stale.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Set, Tuple, Union

import pytest

__all__ = ["AllowEntry", "SkipGuard", "is_active", "parse_allow_list", "pytest_addoption", "pytest_configure"]

DEFAULT_ALLOW_LIST = Path(__file__).resolve().parent.parent / ".ci" / "allowed-skips"
OPTION = "--allowed-skips"


@dataclass(frozen=True)
class AllowEntry:
    """One allowed skip: which tests, which skip message, and why it is acceptable."""

    test: str
    message: str
    reason: str
    line: int

    def covers(self, nodeid: str, message: str) -> bool:
        return fnmatch.fnmatchcase(nodeid, self.test) and fnmatch.fnmatchcase(message, self.message)


def parse_allow_list(text: str, source: str) -> List[AllowEntry]:
    """The entries of an allow-list; raises ValueError naming the line that is malformed."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [field.strip() for field in line.split(" | ")]
        if len(fields) != 3 or not all(fields):
            raise ValueError(
                f"{source}:{number}: expected '<test id pattern> | <skip message pattern> | <reason>' "
                f"(three non-empty fields separated by ' | '), got {raw!r}"
            )
        test, message, reason = fields
        entries.append(AllowEntry(test, message, reason, number))
    return entries


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ``--allowed-skips`` command-line option."""
    parser.addoption(
        OPTION,
        metavar="FILE",
        default=None,
        help="fail the session on any skip or xfail not allowed by FILE (default when $CI is true: "
        ".ci/allowed-skips); see tests/skipguard.py for the format",
    )


def is_active(config: pytest.Config) -> bool:
    """True when the run must fail on unlisted skips: ``--allowed-skips`` given, or ``$CI`` true."""
    return config.getoption(OPTION) is not None or os.environ.get("CI", "").lower() in ("true", "1")


def _message(report: Union[pytest.TestReport, pytest.CollectReport]) -> str:
    """What the skip or xfail said."""
    wasxfail = getattr(report, "wasxfail", None)
    if wasxfail is not None:
        return str(wasxfail)
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        text = str(longrepr[2])
        return text[len("Skipped: "):] if text.startswith("Skipped: ") else text
    return str(longrepr)


class SkipGuard:
    """Collects every skip and xfail of the session and fails it on one the allow-list does not cover."""

    def __init__(self, entries: Sequence[AllowEntry], source: str) -> None:
        self.entries = list(entries)
        self.source = source
        self.used: Set[AllowEntry] = set()
        self.unlisted: List[Tuple[str, str, str]] = []  # (test id, outcome, message)

    def _seen(self, nodeid: str, outcome: str, message: str) -> None:
        entry = next((entry for entry in self.entries if entry.covers(nodeid, message)), None)
        if entry is None:
            self.unlisted.append((nodeid, outcome, message))
        else:
            self.used.add(entry)

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped:
            self._seen(report.nodeid, "xfail" if hasattr(report, "wasxfail") else "skipped", _message(report))

    @pytest.hookimpl
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:
            self._seen(report.nodeid, "skipped at collection", _message(report))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.unlisted and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: "pytest.TerminalReporter") -> None:
        write = terminalreporter.write_line
        if self.unlisted:
            terminalreporter.section("skips not on the allow-list", red=True, bold=True)
            write(f"{len(self.unlisted)} skip(s) or xfail(s) not allowed by {self.source}; fix the cause, "
                  "or add an entry '<test id pattern> | <message pattern> | <reason>':")
            for nodeid, outcome, message in self.unlisted:
                write(f"  {outcome}: {nodeid}: {message}")
        stale = [entry for entry in self.entries if entry not in self.used]
        if stale:
            write(f"allow-list entries that matched nothing in this run ({self.source}): "
                  + ", ".join(f"line {entry.line}" for entry in stale))


def pytest_configure(config: pytest.Config) -> None:
    """Register the guard when it is active; a missing or malformed allow-list is a usage error."""
    if not is_active(config):
        return
    path = Path(config.getoption(OPTION) or DEFAULT_ALLOW_LIST)
    try:
        entries = parse_allow_list(path.read_text(), str(path))
    except (OSError, ValueError) as exc:
        raise pytest.UsageError(f"skip allow-list: {exc}") from exc
    config.pluginmanager.register(SkipGuard(entries, str(path)), "skipguard-session")
