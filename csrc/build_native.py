"""cffi build script for zmqfork's native module (API mode, built at install).

setup.py names this file in ``cffi_modules``; nothing imports it at run time.
The declarations live in ``cdef.h`` and the C sources beside it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

# Build choices, in one place.
MODULE_NAME = "zmqfork._native_c"
SOURCES = [
    "forkdetect.c",
    "fdtrack_table.c",
    "fdtrack_gate.c",
    "fdtrack_hooks.c",
    "fdtrack_install.c",
    "fdtrack_stubs.c",
    "elfhook.c",
    "mutexguard.c",
]
#: Set to 1 by CI and the tests: warnings become errors.  A user's install
#: shows them and goes on, so a new compiler's new warning cannot break it.
STRICT_ENV = "ZMQFORK_STRICT_BUILD"
STRICT_WARNINGS = os.environ.get(STRICT_ENV, "") == "1"
IS_LINUX = sys.platform.startswith("linux")

ffibuilder = FFI()
ffibuilder.cdef((HERE / "cdef.h").read_text())

# -fexceptions: an unwind through a hooked call (a cancellation, with glibc)
# runs the wrapper's cleanup attribute too; with glibc the exit guard's
# cleanup buffer alone covers cancellation and longjmp (csrc/fdtrack.h), and
# the two never both leave the gate.  No cost when nothing unwinds.
compile_args = ["-std=gnu11", "-fvisibility=hidden", "-fexceptions", "-Wall", "-Wextra"]
if STRICT_WARNINGS:
    compile_args += ["-Werror"]

# Paths relative to the project root: setuptools refuses absolute source paths.
csrc = HERE.relative_to(Path.cwd()) if HERE.is_relative_to(Path.cwd()) else HERE
ffibuilder.set_source(
    MODULE_NAME,
    '#include "zmqfork.h"\n#include "zmqfork_testing.h"\n',
    sources=[str(csrc / name) for name in SOURCES],
    include_dirs=[str(csrc)],
    extra_compile_args=compile_args,
    libraries=["dl", "pthread"] if IS_LINUX else ["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
