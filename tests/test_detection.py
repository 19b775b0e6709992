"""Fork detection itself: the token, the generation, the mechanisms and their test switches."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import zmqfork
from forking import run_in_child, run_session

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def run_python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter with extra environment; return its stdout."""
    status, out, err = run_session(
        [sys.executable, "-c", textwrap.dedent(code)], env={"PYTHONPATH": str(HERE), **env}, timeout=60
    )
    assert status == 0, err
    return out


def test_generation_is_stable_in_the_parent_and_new_in_every_child() -> None:
    """The parent's generation does not move; each child's differs from the parent's and its siblings'."""
    parent = zmqfork.generation()
    children = {run_in_child(zmqfork.generation, kind=kind) for kind in ("os", "libc", "os")}
    assert zmqfork.generation() == parent
    assert parent not in children
    assert all(generation > 0 for generation in children)


def test_both_mechanisms_are_in_force_on_this_linux() -> None:
    """On Linux >= 4.14 both atfork handlers and the wipe-on-fork page are active."""
    report = zmqfork.detection()
    assert report.atfork, report
    if sys.platform.startswith("linux") and tuple(map(int, re.findall(r"\d+", os.uname().release)[:2])) >= (4, 14):
        assert report.wipeonfork, report
        assert "wipeonfork" not in report.unavailable


def test_handlers_are_installed_once_however_often_the_module_is_reloaded() -> None:
    """Reloading zmqfork's modules does not install the atfork handlers again (one generation per fork)."""
    out = run_python(
        """
        import importlib, os
        import zmqfork, zmqfork._native
        for _ in range(5):
            importlib.reload(zmqfork._native)
            importlib.reload(zmqfork)
        from forking import run_in_child, run_session
        parent = zmqfork.generation()
        child = run_in_child(lambda: zmqfork._native.TOKEN[0], kind="libc")
        print(child - parent)
        """,
        ZMQFORK_DISABLE="wipeonfork",
    )
    assert out.strip() == "1"


FALLBACK_CHECK = """
    import zmqfork as zmq
    from forking import run_in_child, run_session
    report = zmq.detection()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = 10000
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    parent = zmq.generation()

    def child():
        push.send(b"hello")
        ctx.destroy()
        return zmq.generation()

    for kind in KINDS:
        generation = run_in_child(child, kind=kind)
        assert generation != parent, kind
        assert pull.recv() == b"hello", kind
    print(report.atfork, report.wipeonfork, report.unavailable)
    ctx.destroy(linger=0)
"""


def test_without_wipeonfork_libc_fork_is_still_seen_through_the_atfork_counter() -> None:
    """With wipe-on-fork switched off, forks through libc are detected by the atfork handlers alone."""
    out = run_python(f"KINDS = ('os', 'libc')\n{textwrap.dedent(FALLBACK_CHECK)}", ZMQFORK_DISABLE="wipeonfork")
    assert out.strip() == "True False {'wipeonfork': 'disabled by $ZMQFORK_DISABLE'}"


def test_without_atfork_the_wipeonfork_page_alone_sees_every_fork() -> None:
    """With the atfork handlers switched off, the wipe-on-fork page detects all three fork kinds."""
    if not zmqfork.detection().wipeonfork:
        pytest.skip("MADV_WIPEONFORK is not available here")
    out = run_python(f"KINDS = ('os', 'libc', 'raw')\n{textwrap.dedent(FALLBACK_CHECK)}", ZMQFORK_DISABLE="atfork")
    assert out.strip() == "False True {'atfork': 'disabled by $ZMQFORK_DISABLE'}"


def test_unknown_disable_switch_is_refused_by_name() -> None:
    """A misspelt $ZMQFORK_DISABLE feature fails the import with a message naming it and the known ones."""
    result = subprocess.run(
        [sys.executable, "-c", "import zmqfork"],
        env={**os.environ, "ZMQFORK_DISABLE": "wipeonfrok"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "wipeonfrok" in result.stderr and "known: atfork" in result.stderr


def test_cdef_declares_only_what_the_header_declares() -> None:
    """Every name cffi is given in csrc/cdef.h is declared in csrc/zmqfork.h or zmqfork_testing.h (no drift)."""
    cdef = (ROOT / "csrc" / "cdef.h").read_text()
    header = (ROOT / "csrc" / "zmqfork.h").read_text() + (ROOT / "csrc" / "zmqfork_testing.h").read_text()
    names = re.findall(r"\b(zmqfork_\w+)\s*\(", cdef) + re.findall(r"#define\s+(ZMQFORK_\w+)", cdef)
    assert names
    missing = [name for name in names if not re.search(rf"\b{name}\b", header)]
    assert not missing, f"declared for cffi but not in zmqfork.h: {missing}"
