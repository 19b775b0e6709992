"""Print the newest release of each pyzmq series pyproject.toml allows (26.x, 27.x, ...), oldest first, one per line.

pyzmq numbers its releases <series>.<minor>.<patch> and changes its backend
between series (25 to 26 merged the extension modules): the CI matrix tests
the newest release of each series.  The range is pyproject's ``pyzmq>=N``
(and ``<M`` if present); the releases are what ``pip index versions pyzmq``
lists on the package index now, so a new series joins the matrix by itself.
Pre-releases are left out.  Exits 1 with the reason if the requirement or
the index cannot be read.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
Version = Tuple[int, ...]


def declared_range() -> Tuple[Version, Optional[Version]]:
    """(floor, ceiling or None) of the pyzmq requirement in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"pyzmq\s*([^"]*)"', text)
    if found is None:
        raise SystemExit("pyzmq_releases: no pyzmq requirement in pyproject.toml")
    floor = re.search(r">=\s*([\d.]+)", found.group(1))
    ceiling = re.search(r"<\s*([\d.]+)", found.group(1))
    if floor is None:
        raise SystemExit(f"pyzmq_releases: pyzmq requirement {found.group(0)} has no >= floor")
    return parse(floor.group(1)), parse(ceiling.group(1)) if ceiling else None


def parse(text: str) -> Version:
    return tuple(int(part) for part in text.split("."))


def released() -> List[Version]:
    """Every final release of pyzmq on the index, from pip."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "pyzmq"], capture_output=True, text=True, timeout=120
    )
    listed = re.search(r"^Available versions:\s*(.+)$", result.stdout, re.MULTILINE)
    if result.returncode != 0 or listed is None:
        raise SystemExit(f"pyzmq_releases: pip index versions pyzmq failed:\n{result.stdout}{result.stderr}")
    return [parse(v) for v in map(str.strip, listed.group(1).split(",")) if re.fullmatch(r"\d+(\.\d+)*", v)]


def newest_per_series(versions: List[Version], floor: Version, ceiling: Optional[Version]) -> List[Version]:
    """The newest of ``versions`` in [floor, ceiling) for each first component, oldest series first."""
    newest: Dict[int, Version] = {}
    for version in versions:
        if version >= floor and (ceiling is None or version < ceiling):
            newest[version[0]] = max(newest.get(version[0], version), version)
    return [newest[series] for series in sorted(newest)]


def main() -> int:
    floor, ceiling = declared_range()
    releases = newest_per_series(released(), floor, ceiling)
    if not releases:
        raise SystemExit("pyzmq_releases: no pyzmq release in the declared range")
    for version in releases:
        print(".".join(map(str, version)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
