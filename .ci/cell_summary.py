"""Print a CI matrix cell's one summary line from pytest's JUnit XML report; exit 0 only if the cell passed.

Usage: cell_summary.py NAME SECONDS PYTEST_STATUS [JUNIT_XML | -FAILURE]

With a report: "cell NAME: N passed, N failed, N skipped[, N xfailed] in S s"
(failed counts failures and errors; the skip guard has already judged the
skips and xfails).  The cell passed when pytest exited 0 and
nothing failed.  With -FAILURE instead of a report (the cell broke before its
tests, e.g. its install failed): "cell NAME: FAILED (FAILURE) in S s".
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree
from typing import Dict, List


def counts(path: str) -> Dict[str, int]:
    """How many test cases of the report passed, failed (failure or error), were skipped, were xfails."""
    found = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcomes = {child.tag: child.get("type", "") for child in case}
        if "failure" in outcomes or "error" in outcomes:
            found["failed"] += 1
        elif outcomes.get("skipped") == "pytest.xfail":
            found["xfailed"] += 1
        elif "skipped" in outcomes:
            found["skipped"] += 1
        else:
            found["passed"] += 1
    return found


def main(argv: List[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    name, seconds, status, source = argv
    if source.startswith("-"):
        print(f"cell {name}: FAILED ({source[1:]}) in {seconds} s")
        return 1
    try:
        found = counts(source)
    except (OSError, ElementTree.ParseError) as exc:
        print(f"cell {name}: FAILED (no test report: {exc}) in {seconds} s")
        return 1
    ok = status == "0" and found["failed"] == 0
    xfailed = f", {found['xfailed']} xfailed" if found["xfailed"] else ""
    verdict = "" if ok else f" - FAILED (pytest exit status {status})"
    print(f"cell {name}: {found['passed']} passed, {found['failed']} failed, {found['skipped']} skipped{xfailed} "
          f"in {seconds} s{verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
