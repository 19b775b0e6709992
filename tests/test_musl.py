"""The C module built against musl libc and run by the native driver, as tests/test_arch.py runs it on each CPU.

The driver (tests/native/archdriver.c), the csrc/ sources, hooktarget.c in
every RELRO mode and the fake libzmq and backend are built by test_arch's own
``build`` with ``musl-gcc`` (Debian: musl-tools), and the very test functions
of test_arch run against that build: fork detection, the GOT patcher, the fork
gate and the install.  The programs run natively under musl's dynamic loader
(/lib/ld-musl-<cpu>.so.1), which binds every symbol at load (no lazy binding).

musl-gcc searches musl's headers only; csrc/ also includes Linux's own
(<linux/futex.h>), which do not depend on the C library: the build adds the
host's kernel headers (/usr/include/linux, asm, asm-generic) and nothing else
of /usr/include.  Skipped, with the reason, when musl-gcc, the musl loader or
the kernel headers are absent.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

import test_arch as arch
from test_arch import (  # noqa: F401  - test_arch's tests, collected here again with this module's `built`
    Built,
    Target,
    test_fork_detection,
    test_fork_waits_for_call_in_its_window,
    test_install_finds_libzmq_behind_backend,
    test_install_reports_missing_backend,
)
from test_descriptors import RELRO_MODES

MUSL_GCC = shutil.which("musl-gcc")
LOADER = Path(f"/lib/ld-musl-{platform.machine()}.so.1")
KERNEL_HEADERS = Path("/usr/include")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="musl and ELF GOT patching are Linux-only")


def multiarch_include() -> Optional[Path]:
    """The host's per-architecture include directory (holding asm/), from the host compiler."""
    host_cc = arch.native_target().cc
    if host_cc is None:
        return None
    triple = subprocess.run([host_cc, "-print-multiarch"], capture_output=True, text=True, timeout=30).stdout.strip()
    return KERNEL_HEADERS / triple if triple else KERNEL_HEADERS


def missing() -> Optional[str]:
    """Why the musl build cannot run here, or None."""
    if MUSL_GCC is None:
        return "musl-gcc absent (Debian: apt-get install musl-tools)"
    if not LOADER.exists():
        return f"no musl dynamic loader at {LOADER} (Debian: apt-get install musl)"
    arch_dir = multiarch_include()
    if arch_dir is None or not (KERNEL_HEADERS / "linux" / "futex.h").exists() or not (arch_dir / "asm").is_dir():
        return "no Linux kernel headers under /usr/include (Debian: apt-get install linux-libc-dev)"
    return None


MISSING = missing()


def musl_compiler(where: Path) -> Path:
    """A musl-gcc that also sees the kernel's headers (and no other header of /usr/include)."""
    arch_dir = multiarch_include()
    assert MUSL_GCC is not None and arch_dir is not None
    headers = where / "kernel-headers"
    headers.mkdir()
    for name, real in {"linux": KERNEL_HEADERS / "linux", "asm-generic": KERNEL_HEADERS / "asm-generic",
                       "asm": arch_dir / "asm"}.items():
        (headers / name).symlink_to(real)
    wrapper = where / "musl-gcc-kernel-headers"
    wrapper.write_text(f'#!/bin/sh\nexec "{MUSL_GCC}" -isystem "{headers}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """test_arch's build, made with musl-gcc; skips when musl-tools are absent."""
    if MISSING:
        pytest.skip(f"musl: {MISSING}")
    where = tmp_path_factory.mktemp("arch-musl")
    # Run through env -u LD_PRELOAD: musl's loader cannot load a glibc library
    # that a run may preload (tools/sanitize.sh preloads glibc's libasan).
    # No -fexceptions: musl's cancellation does not unwind (it runs its own cleanup handlers, so a
    # thread cancelled in a hooked call stays counted: forks wait the bound), and the host gcc's
    # unwinder (libgcc_eh) needs glibc's _dl_find_object, which musl lacks.
    target = Target("musl", str(musl_compiler(where)), ("env", "-u", "LD_PRELOAD"), arch.native_target().relocs,
                    unwind_flags=())
    return arch.build(target, where / "build")


def test_driver_links_musl(built: Built) -> None:
    """The driver really is a musl program: its interpreter is musl's loader, and glibc is nowhere in it."""
    headers = arch.readelf("-lW", str(built.dir / "archdriver"))
    assert f"[Requesting program interpreter: {LOADER}]" in headers
    assert "libc.so.6" not in arch.readelf("-dW", str(built.dir / "archdriver"))


def test_module_sources_are_every_c_file() -> None:
    """The build compiles every C file of csrc/ (test_arch reads csrc/build_native.py's list): none is forgotten."""
    assert sorted(arch.module_sources()) == sorted(arch.CSRC.glob("*.c"))


@pytest.mark.parametrize("mode", sorted(RELRO_MODES))
def test_objects_differ_as_claimed(built: Built, mode: str) -> None:
    """The musl toolchain too yields each RELRO mode's segment, binding and relocation kind."""
    arch.test_objects_differ_as_claimed(built, mode)


@pytest.mark.parametrize("order", ["patch-first", "call-first"])
@pytest.mark.parametrize("mode", sorted(RELRO_MODES))
def test_got_patcher(built: Built, mode: str, order: str) -> None:
    """test_arch's GOT patcher test on the musl build."""
    arch.test_got_patcher(built, mode, order)
