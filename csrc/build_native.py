"""cffi build script for zmqfork's native module (API mode, built at install).

setup.py names this file in ``cffi_modules``; nothing imports it at run time.
The declarations live in ``cdef.h`` and the C sources beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

# Build choices, in one place.
MODULE_NAME = "zmqfork._native_c"
SOURCES = ["forkdetect.c", "fdtrack.c", "elfhook.c", "mutexguard.c"]
STRICT_WARNINGS = True  # -Wall -Wextra -Werror on our sources
IS_LINUX = sys.platform.startswith("linux")

ffibuilder = FFI()
ffibuilder.cdef((HERE / "cdef.h").read_text())

compile_args = ["-std=gnu11", "-fvisibility=hidden"]
if STRICT_WARNINGS:
    compile_args += ["-Wall", "-Wextra", "-Werror"]

# Paths relative to the project root: setuptools refuses absolute source paths.
csrc = HERE.relative_to(Path.cwd()) if HERE.is_relative_to(Path.cwd()) else HERE
ffibuilder.set_source(
    MODULE_NAME,
    '#include "zmqfork.h"\n',
    sources=[str(csrc / name) for name in SOURCES],
    include_dirs=[str(csrc)],
    extra_compile_args=compile_args,
    libraries=["dl", "pthread"] if IS_LINUX else ["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
