"""Print a CI matrix cell's one summary line from pytest's JUnit XML report; exit 0 only if the cell passed.

Usage: cell_summary.py NAME SECONDS PYTEST_STATUS [JUNIT_XML | -FAILURE]

With a report: "cell NAME: N passed, N failed, N skipped in S s" (failed
counts failures and errors; skipped counts skips and xfails, which the skip
guard has already judged).  The cell passed when pytest exited 0 and
nothing failed.  With -FAILURE instead of a report (the cell broke before its
tests, e.g. its install failed): "cell NAME: FAILED (FAILURE) in S s".
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree
from typing import List


def counts(path: str) -> tuple[int, int, int]:
    """(passed, failed, skipped) over every test suite in the report."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = failed = skipped = 0
    for suite in suites:
        total += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return total - failed - skipped, failed, skipped


def main(argv: List[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    name, seconds, status, source = argv
    if source.startswith("-"):
        print(f"cell {name}: FAILED ({source[1:]}) in {seconds} s")
        return 1
    try:
        passed, failed, skipped = counts(source)
    except (OSError, ElementTree.ParseError) as exc:
        print(f"cell {name}: FAILED (no test report: {exc}) in {seconds} s")
        return 1
    ok = status == "0" and failed == 0
    verdict = "" if ok else f" - FAILED (pytest exit status {status})"
    print(f"cell {name}: {passed} passed, {failed} failed, {skipped} skipped in {seconds} s{verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
