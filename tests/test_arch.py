"""The C module on each CPU it supports, without Python: natively, and on aarch64 under qemu-user.

tests/native/archdriver.c is linked with the csrc/ sources and run, one
scenario per fresh process: fork detection (fork, raw clone, each forced
fallback), the GOT patcher on hooktarget.c in every RELRO mode, the fork gate,
and the install through a fake backend.  The driver prints one line per check;
a test passes when every line is "ok" and the checks it must run all ran.
The aarch64 targets are skipped unless aarch64-linux-gnu-gcc and qemu-aarch64
are on PATH; the native target runs wherever gcc does.
"""

from __future__ import annotations

import ast
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from forking import run_session
from test_descriptors import RELOC_NAMES, RELRO_MODES, assert_built_as

TESTS = Path(__file__).resolve().parent
NATIVE = TESTS / "native"
CSRC = TESTS.parent / "csrc"
DRIVER = NATIVE / "archdriver.c"
STRICT = ["-Wall", "-Wextra", "-Werror"]
RUN_TIMEOUT = 60.0
BUILD_TIMEOUT = 120.0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF GOT patching is Linux-only")


def module_sources() -> List[Path]:
    """The C files of the native module, as csrc/build_native.py lists them (one list, not a glob)."""
    tree = ast.parse((CSRC / "build_native.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SOURCES" for t in node.targets):
            return [CSRC / name for name in ast.literal_eval(node.value)]
    raise AssertionError("csrc/build_native.py has no SOURCES list")


# ---- targets ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A CPU to build for and how to run its programs."""

    name: str
    cc: Optional[str]  # compiler on PATH, None when absent
    runner: Tuple[str, ...] = ()  # prefix to run a program (the emulator), empty for native
    relocs: Optional[Tuple[str, str]] = None  # (JUMP_SLOT, GLOB_DAT) names readelf prints
    missing: Optional[str] = None  # why this target cannot run here
    build: str = ""  # targets with the same build share binaries
    #: The module's own: -fexceptions lets any unwinding through a hooked call run its cleanup (on glibc, the
    #: wrapper's cleanup buffer covers cancellation and longjmp even without it).
    unwind_flags: Tuple[str, ...] = ("-fexceptions",)

    @property
    def build_key(self) -> str:
        return self.build or self.name


def native_target() -> Target:
    """The host CPU with the host compiler."""
    cc = shutil.which("gcc") or shutil.which("cc")
    machine = platform.machine()
    relocs = RELOC_NAMES.get(machine)
    return Target("native", cc, relocs=relocs, missing=None if cc else "no C compiler (gcc or cc) on PATH")


def qemu_target(name: str, extra: Sequence[str] = ()) -> Target:
    """aarch64 through the cross compiler and qemu-user, with the cross C library as sysroot."""
    cc = shutil.which("aarch64-linux-gnu-gcc")
    qemu = shutil.which("qemu-aarch64")
    sysroot = os.environ.get("QEMU_LD_PREFIX") or "/usr/aarch64-linux-gnu"
    missing = None
    if cc is None or qemu is None:
        missing = ("aarch64 tools absent: needs aarch64-linux-gnu-gcc and qemu-aarch64 on PATH "
                   "(Debian: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)")
    elif not (Path(sysroot) / "lib" / "ld-linux-aarch64.so.1").exists():
        missing = f"no aarch64 C library under {sysroot} (set QEMU_LD_PREFIX to its sysroot)"
    elif extra and "-p pagesize" not in subprocess.run(
        [qemu, "-h"], capture_output=True, text=True, timeout=30
    ).stdout:
        missing = "this qemu-aarch64 has no -p option to emulate another page size"
    runner = (qemu or "qemu-aarch64", *extra, "-L", sysroot)
    return Target(name, cc, runner, RELOC_NAMES["aarch64"], missing, build="aarch64")


TARGETS: Dict[str, Target] = {
    "native": native_target(),
    "aarch64": qemu_target("aarch64"),
    # Some aarch64 kernels (RHEL, Ampere images) use 64 KiB pages: RELRO and
    # mprotect then work on 64 KiB, while the linker aligns RELRO to 4 KiB.
    "aarch64-64k-pages": qemu_target("aarch64-64k-pages", ("-p", "65536")),
}
BUILDS = ["native", "aarch64"]


# ---- building -----------------------------------------------------------------------


@dataclass
class Built:
    """The driver and objects of one target, and how to run the driver."""

    target: Target
    dir: Path

    def so(self, name: str) -> Path:
        return self.dir / name

    def run(self, *args: str) -> "Report":
        """Run the driver with ``args`` (in its own session, killed on overrun)."""
        argv = [*self.target.runner, str(self.dir / "archdriver"), *args]
        status, out, err = run_session(argv, timeout=RUN_TIMEOUT)
        return Report(argv, status, out, err)


def compile_with(cc: str, out: Path, sources: Sequence[Path], *flags: str) -> Path:
    """Compile strictly; raise with the compiler's message on failure."""
    cmd = [cc, "-O1", *STRICT, "-o", str(out), *map(str, sources), *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stderr}")
    return out


def build(target: Target, where: Path) -> Built:
    """The driver (csrc/ linked in), hooktarget.c in every RELRO mode, a fake libzmq and backend."""
    assert target.cc is not None
    cc = target.cc
    where.mkdir(parents=True, exist_ok=True)
    shared = ["-shared", "-fPIC"]

    def fake_backend() -> None:
        compile_with(cc, where / "libzmq.so.5", [NATIVE / "fakezmq.c"], *shared, "-Wl,-soname,libzmq.so.5")
        compile_with(cc, where / "backend.so", [NATIVE / "fakebackend.c"], *shared, f"-L{where}",
                     "-l:libzmq.so.5", "-Wl,-rpath,$ORIGIN")

    jobs: List[Callable[[], object]] = [
        partial(compile_with, cc, where / "archdriver", [DRIVER, *module_sources()], "-std=gnu11", f"-I{CSRC}",
                *target.unwind_flags, "-ldl", "-pthread"),
        fake_backend,
    ]
    jobs += [
        partial(compile_with, cc, where / f"hooktarget-{mode}.so", [NATIVE / "hooktarget.c"], *shared, *flags)
        for mode, flags in RELRO_MODES.items()
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for job in [pool.submit(job) for job in jobs]:
            job.result()
    return Built(target, where)


_built: Dict[str, Built] = {}


@pytest.fixture(scope="module", params=list(TARGETS))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """Each target's build (shared between targets that run the same binaries); skips absent targets."""
    target = TARGETS[request.param]
    if target.missing:
        pytest.skip(f"{target.name}: {target.missing}")
    key = target.build_key
    if key not in _built:
        _built[key] = build(target, tmp_path_factory.mktemp(f"arch-{key}"))
    yield Built(target, _built[key].dir)


# ---- reading the driver's report ----------------------------------------------------


@dataclass
class Report:
    """The driver's exit status and check lines."""

    argv: List[str]
    status: int
    out: str
    err: str

    def lines(self, verdict: str) -> List[str]:
        return [line[len(verdict) + 1:] for line in self.out.splitlines() if line.startswith(verdict + " ")]

    def passed(self) -> List[str]:
        return self.lines("ok")

    def info(self, name: str) -> List[str]:
        return [line.split(": ", 1)[1] for line in self.lines("info") if line.startswith(name + ":")]

    def assert_ok(self, *required: str) -> None:
        """Exit 0, no failed check, and every ``required`` check ran and passed."""
        where = f"{' '.join(self.argv)}\n--- stdout\n{self.out}--- stderr\n{self.err}"
        assert self.lines("FAIL") == [], where
        missing = sorted(set(required) - set(self.passed()))
        assert missing == [], f"checks that did not run: {missing}\n{where}"
        assert self.status == 0, where


# ---- the tests ------------------------------------------------------------------------


def readelf(*args: str) -> str:
    """readelf's output (host binutils read any ELF machine), or skip when absent."""
    tool = shutil.which("readelf") or shutil.which("aarch64-linux-gnu-readelf")
    if tool is None:
        pytest.skip("no readelf")
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.mark.parametrize("built", BUILDS, indirect=True)  # one run per set of objects
@pytest.mark.parametrize("mode", sorted(RELRO_MODES))
def test_objects_differ_as_claimed(built: Built, mode: str) -> None:
    """Each RELRO mode really yields its RELRO segment, binding and JUMP_SLOT or GLOB_DAT calls on this CPU."""
    if built.target.relocs is None:
        pytest.skip(f"relocation names of {platform.machine()} not listed")
    assert_built_as(str(built.so(f"hooktarget-{mode}.so")), mode, readelf, built.target.relocs)


@pytest.mark.parametrize("flags", ["", "no-atfork", "no-wipeonfork"])
def test_fork_detection(built: Built, flags: str) -> None:
    """Children and grandchildren of fork() and a raw clone get the token the mechanisms in force promise, and the wipe-on-fork probe does not trust an emulator."""
    report = built.run("detect", *filter(None, [flags]))
    report.assert_ok(
        "init", "token_nonzero_and_stable", "mechanisms_match_errnos", "wipeonfork_errno_matches_kernel",
        "wipeonfork_claim_truthful", "fork_child_token", "fork_grandchild_token", "raw_clone_child_token",
        "raw_clone_grandchild_token", "fork_child", "raw_clone_child", "parent_token_unchanged",
        "no_atfork_forced" if flags == "no-atfork" else "atfork_installed",
    )


@pytest.mark.parametrize("order", ["patch-first", "call-first"])
@pytest.mark.parametrize("mode", sorted(RELRO_MODES))
def test_got_patcher(built: Built, mode: str, order: str) -> None:
    """Every hooked call keeps the real result and errno and keeps the table; a fork child closes exactly the tracked descriptors."""
    report = built.run("hook", str(built.so(f"hooktarget-{mode}.so")), order)
    calls = ["socket", "close", "eventfd", "eventfd_arguments", "epoll_create1", "epoll_create", "socketpair",
             "pipe", "pipe2", "open", "open_create", "open_variadic_mode", "accept4", "accept4_flags", "accept",
             "dup", "dup2", "dup2_same", "dup3", "dup3_same", "close_bad_fd", "socket_bad_family",
             "eventfd_bad_flags", "dup_bad_fd", "epoll_create1_bad_flags", "open_missing", "accept4_eagain",
             "accept_eagain", "close_twice"]
    report.assert_ok(
        "hook_object", "page_protections_restored", "status_untouched", *calls, "app_sockets_untracked",
        "table_is_exact", "fork_child_closed_exactly_tracked", "fork_child_table_empty", "fork_child_closed_count",
        "fork_child_app_pipe_works", "fork_child_tracks_new", "fork_child", "parent_after_fork",
        "raw_clone_child_app_pipe_works", "raw_clone_child_table", "raw_clone_child", "parent_after_raw_clone",
        "table_empty_after_close",
        *(["call_first"] if order == "call-first" else []),
    )
    # A raw clone child catches up at its first hooked call, with or without wipe-on-fork ("raw_clone_child_table"
    # above); every inherited descriptor is closed or, where a deferred cleanup cannot confirm it, counted.


def test_fork_waits_for_call_in_its_window(built: Built) -> None:
    """A fork while a hooked create or close sits in its window waits for it, and the child holds nothing of it."""
    report = built.run("gate", str(built.so("hooktarget-partial.so")))
    report.assert_ok(
        "hook_object", "gate_create_in_window", "gate_create_child_holds_nothing", "gate_create_fork_waited",
        "gate_create_tracked", "gate_close_in_window", "gate_close_child_holds_nothing", "gate_close_fork_waited",
        "gate_close_untracked",
    )


def test_install_finds_libzmq_behind_backend(built: Built) -> None:
    """zmqfork_fdtrack_install on a backend linked to libzmq.so.5 hooks that libzmq, whose descriptor a child then lacks."""
    report = built.run("install", str(built.so("backend.so")), str(built.so("libzmq.so.5")))
    report.assert_ok("install", "install_object", "install_functions", "install_tracks", "install_child_closed",
                     "install_child", "install_untracks")


def _declarations(text: str) -> Dict[str, str]:
    """Exported function declarations (zmqfork_ but not zmqfork__) in C text: name -> normalised declaration."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    found = {}
    for match in re.finditer(r"([A-Za-z_][\w \t\*]*?\b(zmqfork_(?!_)\w+)\s*\([^;{]*\))\s*;", text):
        found[match.group(2)] = " ".join(match.group(1).replace("*", " * ").split())
    return found


def test_cdef_mirrors_the_headers() -> None:
    """csrc/cdef.h declares exactly the functions of zmqfork.h and zmqfork_testing.h, with the same signatures, and the same counters struct."""
    cdef = (CSRC / "cdef.h").read_text()
    headers = (CSRC / "zmqfork.h").read_text() + (CSRC / "zmqfork_testing.h").read_text()
    assert _declarations(cdef) == _declarations(headers)
    struct = re.compile(r"struct zmqfork_fdtrack_counts \{([^}]*)\}")
    assert struct.search(cdef).group(1).split() == struct.search(headers).group(1).split()  # type: ignore[union-attr]


@pytest.mark.parametrize("strict", ["1", ""])
def test_warnings_are_errors_only_when_asked(strict: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """csrc/build_native.py adds -Werror only with ZMQFORK_STRICT_BUILD=1 (CI, tests), so a user's install shows warnings and goes on."""
    import runpy

    monkeypatch.setenv("ZMQFORK_STRICT_BUILD", strict)
    script = runpy.run_path(str(CSRC / "build_native.py"))
    assert {"-Wall", "-Wextra"} <= set(script["compile_args"])
    assert ("-Werror" in script["compile_args"]) == (strict == "1")


def test_install_reports_missing_backend(built: Built) -> None:
    """An install on an object that is not loaded fails with ENOBACKEND and a reason naming it."""
    built.run("install-missing", "/nonexistent/_zmq.so").assert_ok("install_missing")
