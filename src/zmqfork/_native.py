"""The one module that imports zmqfork's compiled part; the rest of the package speaks Python.

It initialises fork detection at import and turns the C contract of
``csrc/zmqfork.h`` into Python values and exceptions.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Optional

from zmqfork._native_c import ffi, lib

__all__ = [
    "TOKEN",
    "NOTICED_FLAG",
    "DISABLE_ENV",
    "disabled_features",
    "refresh",
    "mechanisms",
    "mechanism_errors",
    "FDTRACK_ON",
    "FDTRACK_NOT_INSTALLED",
    "fdtrack_install",
    "fdtrack_status",
    "fdtrack_reason",
    "fdtrack_object",
    "fdtrack_functions",
    "FDTRACK_COUNTERS",
    "fdtrack_counts",
    "fdtrack_tracked_fds",
    "fdtrack_is_tracked",
    "testing_fdtrack_hook_object",
    "testing_fdtrack_delay",
    "testing_fdtrack_in_window",
    "testing_fdtrack_table_size",
    "testing_fdtrack_fail_patch",
    "guard_recursive_mutex",
    "WORD_SIZE",
    "words_at",
    "store_null",
]

#: Environment variable naming features to switch off, comma-separated:
#: ``atfork``, ``wipeonfork``, ``fdtrack``.  Read once, at import; meant for tests and for
#: diagnosing a platform.
DISABLE_ENV = "ZMQFORK_DISABLE"

_KNOWN_FEATURES = ("atfork", "wipeonfork", "fdtrack")


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
#: ``TOKEN[0]`` changes in every child, and reads 0 after a fork that skipped
#: the atfork handlers until refresh() runs.
TOKEN: memoryview = memoryview(ffi.buffer(lib.zmqfork_token(), 8)).cast("B").cast("Q")

#: ``NOTICED_FLAG[0]`` is 0 in a forked child until zmqfork notices the fork:
#: ``if not NOTICED_FLAG[0]`` is the whole fast-path check.  The byte lives in
#: the token's page (zmqfork_noticed_flag): the C child handler and refresh()
#: clear it, and where wipe-on-fork is in force the kernel zeroes it in every
#: child too, so forks that skip the handlers clear it as well.  Indexing a
#: one-byte memoryview costs what indexing an mmap does, without loading the
#: mmap module and a page of its own into every process.
NOTICED_FLAG: memoryview = memoryview(ffi.buffer(lib.zmqfork_noticed_flag(), 1))
NOTICED_FLAG[0] = 1


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


# ---- descriptor tracking (csrc/fdtrack_*.c) ----------------------------------

#: zmqfork_fdtrack_status() when the hooks are installed.
FDTRACK_ON: int = lib.ZMQFORK_FDTRACK_ON
#: zmqfork_fdtrack_status() before any install was attempted.
FDTRACK_NOT_INSTALLED: int = lib.ZMQFORK_FDTRACK_ENOTINSTALLED


def _fspath(path: str) -> bytes:
    return os.fsencode(path)


def fdtrack_install(backend_path: str) -> int:
    """Install the descriptor hooks on the libzmq that ``backend_path`` (a loaded object) uses.

    Returns the C status code (FDTRACK_ON on success).  Only the first call in
    a process does anything.
    """
    return int(lib.zmqfork_fdtrack_install(_fspath(backend_path)))


def fdtrack_status() -> int:
    """The C status code of descriptor tracking."""
    return int(lib.zmqfork_fdtrack_status())


def fdtrack_reason() -> str:
    """Why descriptor tracking is off, as the C code explained it ("on" when it is on)."""
    return ffi.string(lib.zmqfork_fdtrack_reason()).decode("utf-8", "replace")


def fdtrack_object() -> str | None:
    """The path of the hooked object, or None when tracking is off."""
    name = ffi.string(lib.zmqfork_fdtrack_object())
    return os.path.normpath(os.fsdecode(name)) if name else None


def fdtrack_functions() -> tuple[str, ...]:
    """The names of the functions hooked in that object."""
    names = ffi.string(lib.zmqfork_fdtrack_functions()).decode("ascii", "replace")
    return tuple(names.split(",")) if names else ()


#: The names of descriptor tracking's counters, in the order of the C struct
#: zmqfork_fdtrack_counts (csrc/zmqfork.h, which says what each counts).
FDTRACK_COUNTERS: tuple[str, ...] = tuple(name for name, _ in ffi.typeof("struct zmqfork_fdtrack_counts").fields)


def fdtrack_counts() -> dict[str, int]:
    """Descriptor tracking's counters, keyed by FDTRACK_COUNTERS: the C struct's fields, nothing renamed or dropped."""
    counts = ffi.new("struct zmqfork_fdtrack_counts *")
    lib.zmqfork_fdtrack_counts(counts)
    return {name: int(getattr(counts, name)) for name in FDTRACK_COUNTERS}


def fdtrack_tracked_fds() -> list[int]:
    """The descriptors in the table now (a snapshot), ascending."""
    size = 256
    while True:
        buf = ffi.new("int[]", size)
        count = int(lib.zmqfork_fdtrack_snapshot(buf, size))
        if count <= size:
            return [int(buf[i]) for i in range(count)]
        size = count + 64


def fdtrack_is_tracked(fd: int) -> bool:
    """Whether ``fd`` is in the table."""
    return bool(lib.zmqfork_fdtrack_is_tracked(fd))


def testing_fdtrack_hook_object(path: str) -> int:
    """TESTING ONLY: hook the loaded object ``path`` itself; returns the C status code."""
    return int(lib.zmqfork_testing_fdtrack_hook_object(_fspath(path)))


def testing_fdtrack_delay(microseconds: int) -> None:
    """TESTING ONLY: make hooked calls sleep inside their fork-atomic window (0 turns it off)."""
    lib.zmqfork_testing_fdtrack_delay(microseconds)


def testing_fdtrack_in_window() -> int:
    """TESTING ONLY: how many hooked calls sleep in that window now."""
    return int(lib.zmqfork_testing_fdtrack_in_window())


def testing_fdtrack_table_size(descriptors: int) -> None:
    """TESTING ONLY: make the table, when first mapped, cover only ``descriptors`` numbers (then overflow slots)."""
    lib.zmqfork_testing_fdtrack_table_size(descriptors)


# Keeps the callback of testing_fdtrack_fail_patch alive until it has fired.
_testing_fail_callback: object = None


def testing_fdtrack_fail_patch(after_slots: int, before_failing: Optional[Callable[[], None]] = None) -> None:
    """TESTING ONLY: make the next hook install fail after ``after_slots`` GOT slots, calling ``before_failing`` first."""
    global _testing_fail_callback
    _testing_fail_callback = ffi.callback("void(void)", before_failing) if before_failing is not None else None
    lib.zmqfork_testing_fdtrack_fail_patch(after_slots, _testing_fail_callback or ffi.NULL)


def guard_recursive_mutex(address: int) -> None:
    """Have the recursive pthread mutex at ``address`` reset to unlocked in every forked child."""
    rc = lib.zmqfork_guard_recursive_mutex(ffi.cast("void *", address))
    if rc != 0:
        raise OSError(rc, f"zmqfork could not guard the mutex at {address:#x}: {os.strerror(rc)}")


#: The size of a pointer, in bytes.
WORD_SIZE: int = ffi.sizeof("uintptr_t")


def words_at(address: int, count: int) -> list[int]:
    """The ``count`` pointer-sized words stored at ``address`` (memory the caller knows to be that long)."""
    words = ffi.cast("uintptr_t *", address)
    return [int(words[i]) for i in range(count)]


def store_null(address: int) -> None:
    """Store a NULL pointer at ``address`` (a pointer field the caller has found)."""
    ffi.cast("void **", address)[0] = ffi.NULL
