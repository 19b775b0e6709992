"""The one module that imports zmqfork's compiled part; the rest of the package speaks Python.

It initialises fork detection at import and turns the C contract of
``csrc/zmqfork.h`` into Python values and exceptions.
"""

from __future__ import annotations

import errno
import os

from zmqfork._native_c import ffi, lib

__all__ = ["TOKEN", "DISABLE_ENV", "disabled_features", "refresh", "mechanisms", "mechanism_errors"]

#: Environment variable naming features to switch off, comma-separated:
#: ``atfork``, ``wipeonfork``.  Read once, at import; meant for tests and for
#: diagnosing a platform.
DISABLE_ENV = "ZMQFORK_DISABLE"

_KNOWN_FEATURES = ("atfork", "wipeonfork")


def disabled_features() -> frozenset[str]:
    """The features named in ``$ZMQFORK_DISABLE``; raises ValueError on an unknown name."""
    raw = os.environ.get(DISABLE_ENV, "")
    names = frozenset(part.strip() for part in raw.split(",") if part.strip())
    unknown = sorted(names.difference(_KNOWN_FEATURES))
    if unknown:
        raise ValueError(
            f"${DISABLE_ENV} names unknown feature(s) {', '.join(unknown)}; "
            f"known: {', '.join(_KNOWN_FEATURES)}"
        )
    return names


def _init_flags(disabled: frozenset[str]) -> int:
    flags = 0
    if "atfork" in disabled:
        flags |= lib.ZMQFORK_INIT_NO_ATFORK
    if "wipeonfork" in disabled:
        flags |= lib.ZMQFORK_INIT_NO_WIPEONFORK
    return flags


_rc = lib.zmqfork_init(_init_flags(disabled_features()))
if _rc != 0:
    raise OSError(_rc, f"zmqfork could not set up fork detection: {os.strerror(_rc)}")

#: The live token as a one-element memoryview of unsigned 64-bit ints.
#: ``TOKEN[0]`` is the whole fast-path check: it changes in every child, and
#: reads 0 after a fork that skipped the atfork handlers until refresh() runs.
TOKEN: memoryview = memoryview(ffi.buffer(lib.zmqfork_token(), 8)).cast("B").cast("Q")


def refresh() -> int:
    """Return the current non-zero token, allocating a new generation after a fork that wiped it."""
    return int(lib.zmqfork_refresh())


def mechanisms() -> frozenset[str]:
    """The fork-detection mechanisms in force: a subset of {"atfork", "wipeonfork"}."""
    bits = lib.zmqfork_mechanisms()
    found = set()
    if bits & lib.ZMQFORK_MECH_ATFORK:
        found.add("atfork")
    if bits & lib.ZMQFORK_MECH_WIPEONFORK:
        found.add("wipeonfork")
    return frozenset(found)


def _reason(err: int) -> str | None:
    if err == 0:
        return None
    if err == errno.ECANCELED:
        return f"disabled by ${DISABLE_ENV}"
    if err == errno.EOPNOTSUPP:
        return "the kernel accepts invalid madvise advice, so MADV_WIPEONFORK cannot be trusted"
    if err == errno.ENOSYS:
        return "not supported on this platform"
    return os.strerror(err)


def mechanism_errors() -> dict[str, str | None]:
    """For each detection mechanism, None when it is in force, else why it is not."""
    return {
        "atfork": _reason(lib.zmqfork_atfork_errno()),
        "wipeonfork": _reason(lib.zmqfork_wipeonfork_errno()),
    }
