"""Descriptor tracking: a forked child holds none of libzmq's inherited descriptors, and all of the application's.

Tests that need a fresh process (resource limits, a disabled feature, an
install of their own) run a script in a subprocess in its own session, killed
as a group if it overruns.  Fork tests report through pipes and exit codes.
"""

from __future__ import annotations

import json
import os
import platform
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import pytest
import zmq as pyzmq

import zmqfork
from zmqfork import _native
from forking import ChildFailed, fork_with, open_fds, read_until_eof, run_in_child, run_session, wait_child
from reliability import wait_until

TESTS = Path(__file__).resolve().parent
NATIVE = TESTS / "native"
ON_LINUX = sys.platform.startswith("linux")
GCC = shutil.which("gcc") or shutil.which("cc")

pytestmark = pytest.mark.skipif(not ON_LINUX, reason="descriptor tracking is Linux-only")


# ---- helpers ---------------------------------------------------------------


def run_python(code: str, *args: str, env: Optional[Dict[str, str]] = None, timeout: float = 60.0) -> str:
    """Run ``code`` in a fresh interpreter (own session); return stdout, raise on failure or overrun."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))
    status, out, err = run_session(
        [sys.executable, "-c", textwrap.dedent(code), *args], env={"PYTHONPATH": path, **(env or {})}, timeout=timeout
    )
    if status != 0:
        raise AssertionError(f"script failed ({status})\nstdout:\n{out}\nstderr:\n{err}")
    return out


def last_json(output: str) -> object:
    """The JSON document on the last line of a script's output."""
    return json.loads(output.strip().splitlines()[-1])


PROGRAMS = TESTS / "programs"


def run_program(name: str, *args: str, env: Optional[Dict[str, str]] = None, timeout: float = 60.0) -> object:
    """Run tests/programs/``name`` in a fresh interpreter (own session); the JSON on its last stdout line."""
    return last_json(run_python((PROGRAMS / name).read_text(), *args, env=env, timeout=timeout))



def fd_identity(fd: int) -> Optional[Tuple[str, ...]]:
    """What open file description ``fd`` refers to, from /proc/self/fd and /proc/self/fdinfo.

    Sockets and pipes by inode, eventfds by eventfd-id, epolls by their
    interest list (tfd lines); None if ``fd`` is not open.
    """
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
        with open(f"/proc/self/fdinfo/{fd}") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "eventfd-id" in fields:
        return ("eventfd", fields["eventfd-id"])
    if target == "anon_inode:[eventpoll]":
        return ("epoll", *sorted(line for line in lines if line.startswith("tfd:")))
    return (target, fields.get("mnt_id", ""), fields.get("ino", ""))


def identities(fds: Iterable[int]) -> Dict[int, Tuple[str, ...]]:
    """fd_identity of each open descriptor in ``fds``."""
    found = {}
    for fd in fds:
        ident = fd_identity(fd)
        if ident is not None:
            found[fd] = ident
    return found


def roundtrip(ctx: zmqfork.Context) -> Tuple[zmqfork.Socket, zmqfork.Socket, int]:
    """A bound PULL and a connected PUSH in ``ctx`` with one message through: listener + 2 tcp fds."""
    pull = ctx.socket(zmqfork.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmqfork.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send(b"ping")
    assert pull.poll(10000), "no message through the tcp pair"
    assert pull.recv() == b"ping"
    return pull, push, port


# ---- install and reporting ---------------------------------------------------


def test_hooks_installed_on_pyzmq_libzmq() -> None:
    """At import, the hooks sit on the libzmq pyzmq loaded, and detection() says so."""
    found = zmqfork.detection()
    assert found.fdtrack, found.unavailable
    assert "fdtrack" not in found.unavailable
    assert found.fdtrack_object
    name = os.path.basename(found.fdtrack_object)
    assert name.startswith("libzmq"), found.fdtrack_object
    # The wheel's libzmq imports these (FACTS.md); all of them must be hooked.
    for call in ("socket", "accept4", "eventfd", "epoll_create1", "close"):
        assert call in found.fdtrack_functions


def test_table_counts_what_libzmq_makes() -> None:
    """The table grows by exactly what libzmq creates (1 for a context, 5 for its first socket, 1 per bind) and empties on destroy."""
    before_fds = open_fds()
    before = _native.fdtrack_counts()["tracked"]
    ctx = zmqfork.Context()
    try:
        ctx.underlying  # the pyzmq context exists
        assert _native.fdtrack_counts()["tracked"] == before + 1
        sock = ctx.socket(zmqfork.PULL)
        assert _native.fdtrack_counts()["tracked"] == before + 6
        sock.bind("tcp://127.0.0.1:*")
        assert _native.fdtrack_counts()["tracked"] == before + 7
        made = open_fds() - before_fds
        assert made == set(_native.fdtrack_tracked_fds()) - before_fds
        assert all(_native.fdtrack_is_tracked(fd) for fd in made)
    finally:
        ctx.destroy(linger=0)
    assert _native.fdtrack_counts()["tracked"] == before
    assert not any(_native.fdtrack_is_tracked(fd) for fd in made)


# ---- 2. the child holds none of libzmq's descriptors --------------------------


@pytest.mark.parametrize("kind", ["os", "libc", "raw"])
def test_child_holds_no_libzmq_descriptor(kind: str) -> None:
    """After os.fork, libc fork and a raw clone, no descriptor libzmq had is open in the child, by number or identity."""
    before = open_fds()
    ctx = zmqfork.Context()
    try:
        keep = roundtrip(ctx)  # noqa: F841 - sockets must live until the fork
        libzmq_fds = open_fds() - before
        assert len(libzmq_fds) >= 9, sorted(libzmq_fds)  # ctx + 2 sockets' mailboxes, io thread, reaper, listener, 2 tcp
        assert libzmq_fds <= set(_native.fdtrack_tracked_fds())
        parent_ids = identities(libzmq_fds)
        assert len(set(parent_ids.values())) == len(parent_ids), parent_ids

        def child() -> Dict[str, object]:
            if kind == "raw":
                zmqfork.generation()  # no handlers ran: the first zmqfork call cleans up
            still_open = sorted(fd for fd in libzmq_fds if fd_identity(fd) is not None)
            mine = identities(open_fds())
            same = sorted(fd for fd, ident in mine.items() if ident in parent_ids.values())
            return {
                "still_open": still_open,
                "same_identity": same,
                "closed": zmqfork.detection().fds_closed,
                "tracked": zmqfork.detection().fds_tracked,
            }

        result = run_in_child(child, kind=kind, timeout=30)
        assert result["still_open"] == []
        assert result["same_identity"] == []
        assert result["closed"] >= len(libzmq_fds)
        assert result["tracked"] == 0
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("kind", ["os", "libc", "raw"])
def test_application_descriptors_between_libzmq_runs_survive(kind: str) -> None:
    """libzmq's numbers in runs broken by the application's own (closed a run at a time inside the fork):
    every application pipe made between them works in the child, and none of libzmq's is open there."""
    before = open_fds()
    ctx = zmqfork.Context()
    pipes: List[Tuple[int, int]] = []
    keep = []
    try:
        for _ in range(4):
            keep.append(roundtrip(ctx))
            pipes.append(os.pipe())
        mine = {fd for pair in pipes for fd in pair}
        libzmq_fds = open_fds() - before - mine
        assert libzmq_fds <= set(_native.fdtrack_tracked_fds())
        assert min(mine) < max(libzmq_fds) and max(mine) > min(libzmq_fds), "the pipes do not break libzmq's runs"

        def child() -> Dict[str, object]:
            if kind == "raw":
                zmqfork.generation()
            for rd, wr in pipes:
                os.write(wr, b"x")
                assert os.read(rd, 1) == b"x"
            return {"still_open": sorted(fd for fd in libzmq_fds if fd_identity(fd) is not None)}

        assert run_in_child(child, kind=kind, timeout=30) == {"still_open": []}
    finally:
        ctx.destroy(linger=0)
        for pair in pipes:
            for fd in pair:
                os.close(fd)


def test_raw_clone_child_cleans_up_at_first_hooked_call() -> None:
    """After a raw clone, a child that makes a pyzmq context before any zmqfork call still loses the inherited descriptors, not the new one."""
    before = identities(open_fds())
    ctx = zmqfork.Context()
    try:
        keep = roundtrip(ctx)  # noqa: F841
        inherited = {fd: ident for fd, ident in identities(open_fds()).items() if before.get(fd) != ident}

        def child() -> Dict[str, object]:
            fresh = pyzmq.Context()  # zmq_ctx_new's eventfd: the first hooked call in this child
            tracked = _native.fdtrack_tracked_fds()
            now = identities(open_fds())
            made = sorted(fd for fd, ident in now.items() if ident[0] == "eventfd" and before.get(fd) != ident)
            still_open = sorted(fd for fd, ident in now.items() if ident in inherited.values())
            try:
                sock = fresh.socket(pyzmq.PAIR)
                sock.bind("inproc://raw-child")
                sock.close(linger=0)
            finally:
                fresh.term()
            return {"made": made, "tracked": tracked, "inherited_open": still_open,
                    "closed": _native.fdtrack_counts()["closed_last"]}

        result = run_in_child(child, kind="raw", timeout=30)
        assert len(result["made"]) == 1  # type: ignore[arg-type]
        assert result["tracked"] == result["made"]
        assert result["inherited_open"] == []
        assert result["closed"] >= len(inherited)  # type: ignore[operator]
    finally:
        ctx.destroy(linger=0)


def test_grandchild_is_cleaned_too() -> None:
    """A child's own libzmq descriptors are closed in its child (the table is per process and refilled)."""
    ctx = zmqfork.Context()
    try:
        keep = roundtrip(ctx)  # noqa: F841

        def child() -> Tuple[int, int]:
            before = open_fds()
            inner = zmqfork.Context()
            keep = roundtrip(inner)  # noqa: F841
            made = open_fds() - before
            ids = identities(made)

            def grandchild() -> List[int]:
                return sorted(fd for fd, ident in identities(open_fds()).items() if ident in ids.values())

            leaked = run_in_child(grandchild, kind="os", timeout=20)
            inner.destroy(linger=0)
            return len(made), len(leaked)

        made, leaked = run_in_child(child, kind="os", timeout=40)
        assert made >= 9
        assert leaked == 0
    finally:
        ctx.destroy(linger=0)


# ---- 3. the application's descriptors survive ----------------------------------


@pytest.mark.parametrize("kind", ["os", "libc", "raw"])
def test_application_descriptors_survive(kind: str, tmp_path: Path) -> None:
    """A socket, a pipe, a file, an eventfd and an epoll made by the application (Python or libc) stay usable in the child."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ctx = zmqfork.Context()
    left, right = socket.socketpair()
    rd, wr = os.pipe()
    path = tmp_path / "data"
    path.write_bytes(b"file content")
    handle = open(path, "rb")
    efd = os.eventfd(0)
    ep = select.epoll()
    ep.register(rd, select.EPOLLIN)
    c_efd = libc.eventfd(0, 0)  # made by "another C library": libc directly
    c_ep = libc.epoll_create1(0)
    assert c_efd >= 0 and c_ep >= 0
    try:
        keep = roundtrip(ctx)  # noqa: F841 - libzmq's descriptors exist next to ours
        ours = [left.fileno(), right.fileno(), rd, wr, handle.fileno(), efd, ep.fileno(), c_efd, c_ep]
        assert not any(_native.fdtrack_is_tracked(fd) for fd in ours)

        def child() -> str:
            if kind == "raw":
                zmqfork.generation()
            assert zmqfork.detection().fds_closed >= 9
            left.sendall(b"hello")
            assert right.recv(5) == b"hello"
            os.write(wr, b"x")
            assert [fd for fd, _ in ep.poll(5)] == [rd]
            assert os.read(rd, 1) == b"x"
            handle.seek(0)
            assert handle.read() == b"file content"
            os.eventfd_write(efd, 3)
            assert os.eventfd_read(efd) == 3
            os.eventfd_write(c_efd, 4)
            assert os.eventfd_read(c_efd) == 4
            inner = select.epoll.fromfd(os.dup(c_ep))
            inner.register(c_efd, select.EPOLLOUT)
            assert inner.poll(5)
            return "ok"

        assert run_in_child(child, kind=kind, timeout=30) == "ok"
    finally:
        ctx.destroy(linger=0)
        for sock in (left, right):
            sock.close()
        for fd in (rd, wr, efd, c_efd, c_ep):
            os.close(fd)
        handle.close()
        ep.close()


def test_reused_numbers_survive() -> None:
    """Numbers libzmq closed and the application then got back are not closed in the child."""
    ctx = zmqfork.Context()
    before = open_fds()
    keep = roundtrip(ctx)
    libzmq_fds = open_fds() - before
    ctx.destroy(linger=0)
    del keep
    assert wait_until(lambda: not (open_fds() & libzmq_fds))
    pipes = [os.pipe() for _ in range(len(libzmq_fds))]
    try:
        reused = {fd for pair in pipes for fd in pair} & libzmq_fds
        assert reused, "the kernel hands out the lowest free numbers"
        assert not any(_native.fdtrack_is_tracked(fd) for fd in reused)

        def child() -> bool:
            for rd, wr in pipes:
                os.write(wr, b"y")
                if os.read(rd, 1) != b"y":
                    return False
            return True

        assert run_in_child(child, kind="os", timeout=30)
    finally:
        for rd, wr in pipes:
            os.close(rd)
            os.close(wr)


# ---- 4. port release, 5. the peer sees the disconnect -------------------------


class StayingChild:
    """A child forked from here that stays alive until released; it uses nothing inherited."""

    def __init__(self) -> None:
        self._ready_r, ready_w = os.pipe()
        release_r, self._release_w = os.pipe()
        self.pid = fork_with("os")
        if self.pid == 0:
            code = 1
            try:
                os.close(self._ready_r)
                os.close(self._release_w)
                os.write(ready_w, b"r")
                select.select([release_r], [], [], 60)
                code = 0
            finally:
                os._exit(code)
        os.close(ready_w)
        os.close(release_r)
        ready, _, _ = select.select([self._ready_r], [], [], 30)
        assert ready and os.read(self._ready_r, 1) == b"r", "child did not start"

    def alive(self) -> bool:
        """Whether the child is still running."""
        done, _ = os.waitpid(self.pid, os.WNOHANG)
        if done:
            self.pid = 0
        return not done

    def release(self) -> None:
        """Let the child exit and reap it."""
        os.close(self._release_w)
        os.close(self._ready_r)
        if self.pid:
            wait_child(self.pid, 30)


def test_port_released_while_child_alive() -> None:
    """After the parent closes its bound socket and terminates, the port can be bound again though the child lives."""
    ctx = zmqfork.Context()
    pull = ctx.socket(zmqfork.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    child = StayingChild()
    try:
        pull.close(linger=0)
        ctx.term()
        again = zmqfork.Context()
        try:
            sock = again.socket(zmqfork.PULL)
            sock.bind(f"tcp://127.0.0.1:{port}")  # EADDRINUSE if the child held the listener
            assert child.alive()
        finally:
            again.destroy(linger=0)
    finally:
        child.release()


def test_peer_sees_disconnect_while_child_alive() -> None:
    """A peer connected to the parent gets EVENT_DISCONNECTED when the parent closes, though a forked child lives."""
    from zmq.utils.monitor import recv_monitor_message

    server_ctx = zmqfork.Context()
    peer_ctx = zmqfork.Context()
    try:
        server = server_ctx.socket(zmqfork.PULL)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        peer = peer_ctx.socket(zmqfork.PUSH)
        events = peer.get_monitor_socket(pyzmq.EVENT_CONNECTED | pyzmq.EVENT_DISCONNECTED)
        peer.connect(f"tcp://127.0.0.1:{port}")
        assert events.poll(10000), "no EVENT_CONNECTED"
        assert recv_monitor_message(events)["event"] == pyzmq.EVENT_CONNECTED
        child = StayingChild()
        try:
            server.close(linger=0)
            server_ctx.term()
            assert events.poll(10000), "the peer never saw the parent go: the child holds the connection"
            assert recv_monitor_message(events)["event"] == pyzmq.EVENT_DISCONNECTED
            assert child.alive()
        finally:
            child.release()
        peer.disable_monitor()
    finally:
        server_ctx.destroy(linger=0)
        peer_ctx.destroy(linger=0)


# ---- 6. the race: accepts in the I/O thread while another thread forks -----------



def fork_and_list_leaks(kind: str, allowed: Set[int], timeout: float = 20.0) -> List[Tuple[int, str]]:
    """Fork by ``kind``; the child lists its open descriptors not in ``allowed`` (plus its report pipe)."""
    rd, wr = os.pipe()
    pid = fork_with(kind)
    if pid == 0:
        code = 1
        try:
            os.close(rd)
            leaked = []
            for fd in sorted(open_fds() - allowed - {wr}):
                try:
                    leaked.append((fd, os.readlink(f"/proc/self/fd/{fd}")))
                except OSError:
                    leaked.append((fd, "?"))
            os.write(wr, json.dumps(leaked).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wr)
    try:
        report = read_until_eof(rd, time.monotonic() + timeout)
    finally:
        os.close(rd)
    status = wait_child(pid, timeout)
    if not report or not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        raise ChildFailed(f"child {pid} reported nothing; status {status}")
    return [tuple(item) for item in json.loads(report)]


#: Storm processes (4 connecting threads each).
STORMS = 2


def test_accept_storm_while_forking() -> None:
    """While libzmq accepts a storm of connections, 200 forks from another thread: no child holds a libzmq descriptor."""
    baseline = open_fds()
    ctx = zmqfork.Context()
    storms: List[subprocess.Popen[bytes]] = []
    try:
        router = ctx.socket(zmqfork.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        storms += [
            subprocess.Popen([sys.executable, str(PROGRAMS / "storm.py"), str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            for _ in range(STORMS)
        ]
        for storm in storms:
            assert storm.stdout is not None and storm.stdout.readline() == b"started\n"
        pipes = {f.fileno() for storm in storms for f in (storm.stdin, storm.stdout) if f is not None}
        results: List[List[Tuple[int, str]]] = []
        errors: List[BaseException] = []

        def forker() -> None:
            try:
                for i in range(200):
                    results.append(fork_and_list_leaks(("os", "libc")[i % 2], baseline | pipes))
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=forker)
        thread.start()
        thread.join(180)
        assert not thread.is_alive(), "forking thread hung"
        assert not errors, errors
        connections = 0
        for storm in storms:
            assert storm.stdin is not None and storm.stdout is not None
            storm.stdin.close()
            connections += int(storm.stdout.read() or 0)
            storm.wait(30)
        assert connections >= 200, "the storm was too weak to race with the forks"
        assert len(results) == 200
        leaks = [leak for leak in results if leak]
        assert leaks == [], f"{len(leaks)} of 200 children held libzmq descriptors: {leaks[:3]}"
    finally:
        for storm in storms:
            if storm.poll() is None:
                storm.kill()
                storm.wait(30)
        ctx.destroy(linger=0)


# ---- 1. the fork chain ------------------------------------------------------------


CHAIN_GENERATIONS = int(os.environ.get("ZMQFORK_CHAIN_GENERATIONS", "4096"))


@pytest.mark.slow
def test_fork_chain_under_ulimit(tmp_path: Path) -> None:
    """4096 generations under ulimit -n 1024: each connects and sends, then forks the next; all arrive, fd count constant."""
    result = run_program("fork_chain.py", str(CHAIN_GENERATIONS), str(tmp_path), timeout=300)
    counts = {int(gen): count for gen, count in result["counts"].items()}  # type: ignore[index]
    missing = sorted(set(range(1, CHAIN_GENERATIONS + 1)) - set(counts))
    assert not missing, f"{len(missing)} generations never arrived, first {missing[:5]}"
    assert len(set(counts.values())) == 1, f"fd count varies: {sorted(set(counts.values()))}"
    assert result["failed"] == 0  # type: ignore[index]


# ---- 7. degradation -------------------------------------------------------------------



def test_disabled_tracking_degrades() -> None:
    """With $ZMQFORK_DISABLE=fdtrack, proxies still rebuild in a child and detection() says why tracking is off."""
    result = run_program("degraded.py", env={"ZMQFORK_DISABLE": "fdtrack"})
    assert result == {
        "fdtrack": False,
        "why": "disabled by $ZMQFORK_DISABLE",
        "object": None,
        "child_fdtrack": False,
        "message": "from the child",
    }




def install_in_subprocess(backend: str, *preload: str) -> Dict[str, object]:
    """Run the C install on ``backend`` (after loading ``preload``) in a fresh process with tracking not yet installed."""
    return run_program("install.py", backend, *preload, env={"ZMQFORK_DISABLE": "fdtrack"})  # type: ignore[return-value]


def test_install_reports_missing_backend() -> None:
    """An install on an object that is not loaded fails cleanly, and the reason names it."""
    result = install_in_subprocess("/nonexistent/_zmq.so")
    assert result["status"] == _native.lib.ZMQFORK_FDTRACK_ENOBACKEND
    assert result["again"] == result["status"]
    assert not result["on"]
    assert "/nonexistent/_zmq.so" in str(result["why"]) and "not loaded" in str(result["why"])


# ---- native objects: RELRO matrix and the three ways libzmq is found ------------------

RELRO_MODES = {
    "norelro": ["-Wl,-z,norelro", "-Wl,-z,lazy"],
    "partial": ["-Wl,-z,relro", "-Wl,-z,lazy"],
    "full": ["-Wl,-z,relro", "-Wl,-z,now"],
    "noplt": ["-fno-plt", "-Wl,-z,relro", "-Wl,-z,now"],
    "noplt-lazy": ["-fno-plt", "-Wl,-z,norelro", "-Wl,-z,lazy"],
}


#: The (JUMP_SLOT, GLOB_DAT) relocation names readelf prints, by CPU.
RELOC_NAMES = {"x86_64": ("R_X86_64_JUMP_SLOT", "R_X86_64_GLOB_DAT"), "aarch64": ("R_AARCH64_JUMP_SLOT", "R_AARCH64_GLOB_DAT")}


def assert_built_as(lib: str, mode: str, readelf: Callable[..., str], relocs: Optional[Tuple[str, str]]) -> None:
    """``lib`` (hooktarget.c built with RELRO_MODES[mode]) has its RELRO segment, binding and JUMP_SLOT or GLOB_DAT calls.

    ``relocs`` names the two relocation types on the object's CPU; None skips that check.
    """
    assert ("GNU_RELRO" in readelf("-lW", lib)) == (mode in ("partial", "full", "noplt"))
    dynamic = readelf("-dW", lib)
    assert ("BIND_NOW" in dynamic or "FLAGS_1" in dynamic and "NOW" in dynamic) == (mode in ("full", "noplt"))
    if relocs is not None:
        lines = readelf("-rW", lib).splitlines()
        kinds = {line.split()[2] for line in lines if " socket@" in line or " socket +" in line}
        jump_slot, glob_dat = relocs
        assert kinds == ({glob_dat} if mode.startswith("noplt") else {jump_slot}), kinds


def compile_so(out: Path, sources: List[Path], *flags: str) -> Path:
    """Build a shared object with gcc; skip the test if there is no compiler."""
    if GCC is None:
        pytest.skip("no C compiler")
    cmd = [GCC, "-shared", "-fPIC", "-O1", "-o", str(out), *map(str, sources), *flags]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out


def readelf(*args: str) -> str:
    """readelf's output, or skip when binutils are missing."""
    tool = shutil.which("readelf")
    if tool is None:
        pytest.skip("no readelf")
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture(scope="module")
def native_dir() -> Iterable[Path]:
    """A directory for the test objects of this module."""
    with tempfile.TemporaryDirectory(prefix="zmqfork-native-") as name:
        yield Path(name)




@pytest.mark.parametrize("order", ["patch-first", "call-first"])
@pytest.mark.parametrize("mode", sorted(RELRO_MODES))
def test_got_patcher_relro_matrix(mode: str, order: str, native_dir: Path) -> None:
    """The GOT patcher hooks every call of an object built with no, partial or full RELRO and -fno-plt, keeping results and errno."""
    lib = compile_so(native_dir / f"hooktarget-{mode}.so", [NATIVE / "hooktarget.c"], *RELRO_MODES[mode])
    assert_built_as(str(lib), mode, readelf, RELOC_NAMES.get(platform.machine()))  # the matrix differs as claimed
    result = run_program("hook_matrix.py", str(lib), order)
    assert result == {"child_bad": [], "closed_in_parent": []}




@pytest.mark.parametrize("which", ["create", "close"])
def test_fork_waits_for_hooked_call_in_its_window(which: str, native_dir: Path) -> None:
    """A fork while a hooked call sits between the real call and the table update (40 ms, under the 100 ms bound) waits for it; the child holds nothing of it."""
    lib = compile_so(native_dir / "hooktarget-gate.so", [NATIVE / "hooktarget.c"])
    result = run_program("gate_window.py", str(lib), which, "40000")
    assert result["extra"] == {} and result["victim_open"] is False  # type: ignore[index]
    assert result["untracked"] == 0  # type: ignore[index]


@pytest.mark.parametrize("which", ["create", "close"])
def test_fork_waits_no_longer_than_the_bound(which: str, native_dir: Path) -> None:
    """A hooked call stuck in its window for 60 s does not hold a fork back (the wait is bounded): the fork returns while the call is still inside, and the child counts what the call may leave open as untracked."""
    lib = compile_so(native_dir / "hooktarget-gate.so", [NATIVE / "hooktarget.c"])
    # Without the bound the fork waits the full 60 s and the script overruns its 40 s.
    result = run_program("gate_window.py", str(lib), which, "60000000", timeout=40)
    assert result["still_in_window"] is True  # type: ignore[index]
    assert result["untracked"] >= 1  # type: ignore[index]
    if which == "create":  # the eventfd was made before the fork and never tracked: left open, not closed
        assert list(result["extra"].values()) == ["anon_inode:[eventfd]"]  # type: ignore[index]
    else:  # the close had taken the number out of the table but not closed it yet
        assert result["extra"] == {} and result["victim_open"] is True  # type: ignore[index]


def test_finds_system_libzmq(native_dir: Path) -> None:
    """A backend linked to a separate libzmq.so.5 (distro pyzmq): the hooks go on that libzmq, not on the backend."""
    # Named apart from the real libzmq.so.5, which a pyzmq built against the system libzmq has loaded already.
    fake = compile_so(native_dir / "libfakezmq.so.5", [NATIVE / "fakezmq.c"], "-Wl,-soname,libfakezmq.so.5")
    backend = compile_so(
        native_dir / "backend_shared.so",
        [NATIVE / "fakebackend.c"],
        f"-L{native_dir}",
        "-l:libfakezmq.so.5",
        "-Wl,-rpath,$ORIGIN",
    )
    assert "libfakezmq.so.5" in readelf("-dW", str(backend))
    result = install_in_subprocess(str(backend), str(backend))
    assert result["status"] == _native.FDTRACK_ON, result
    assert result["on"] and os.path.realpath(str(result["object"])) == os.path.realpath(fake)


@pytest.mark.parametrize("visibility", ["exported", "hidden"])
def test_finds_libzmq_linked_into_backend(visibility: str, native_dir: Path) -> None:
    """A backend with libzmq linked in (zmq_ctx_new exported or hidden): the backend itself is hooked."""
    backend = compile_so(
        native_dir / f"backend_static_{visibility}.so",
        [NATIVE / "fakebackend.c", NATIVE / "fakezmq.c"],
        f"-DHIDE_ZMQ={int(visibility == 'hidden')}",
    )
    symbols = readelf("--dyn-syms", "-W", str(backend))
    assert (" zmq_ctx_new" in symbols) == (visibility == "exported")
    result = install_in_subprocess(str(backend), str(backend))
    assert result["status"] == _native.FDTRACK_ON, result
    assert os.path.realpath(str(result["object"])) == os.path.realpath(backend)




def test_fake_libzmq_descriptors_closed_in_child(native_dir: Path) -> None:
    """Through a fake system libzmq, a descriptor it makes is tracked and closed in a child."""
    compile_so(native_dir / "libfakezmq.so.5", [NATIVE / "fakezmq.c"], "-Wl,-soname,libfakezmq.so.5")
    backend = compile_so(
        native_dir / "backend_track.so", [NATIVE / "fakebackend.c"], f"-L{native_dir}", "-l:libfakezmq.so.5",
        "-Wl,-rpath,$ORIGIN",
    )
    assert run_program("track_fake.py", str(backend), env={"ZMQFORK_DISABLE": "fdtrack"}) is True


@pytest.mark.parametrize(
    "source, expected",
    [("nothing.c", "imports none of the descriptor calls"), ("noclose.c", "does not import close()")],
)
def test_install_refuses_object_it_cannot_track(source: str, expected: str, native_dir: Path) -> None:
    """An object importing no descriptor call, or making descriptors without close(), is refused with a reason."""
    obj = compile_so(native_dir / source.replace(".c", ".so"), [NATIVE / source])
    result = install_in_subprocess(str(obj), str(obj))
    assert result["status"] == _native.lib.ZMQFORK_FDTRACK_ENOIMPORTS
    assert not result["on"] and expected in str(result["why"])




def test_libzmq_sees_real_errno_under_emfile() -> None:
    """Out of descriptors, libzmq's own errno checks see EMFILE through the hooks (it asserts on anything else)."""
    import errno

    result = run_program("emfile.py")
    assert result["errno"] == errno.EMFILE
    assert result["tracked_open"] and result["tracked"] >= 1




def test_failed_install_leaves_no_stale_entry(native_dir: Path) -> None:
    """An install that fails after a descriptor was tracked leaves close() hooked: the number leaves the table when closed, and a child does not close it once reused."""
    lib = compile_so(native_dir / "hooktarget-rollback.so", [NATIVE / "hooktarget.c"])
    result = run_program("rollback.py", str(lib))
    assert result == {
        "status": _native.lib.ZMQFORK_FDTRACK_EPATCH,
        "tracked_before_failure": True,
        "stale": False,
        "child_sees_it_open": True,
    }




@pytest.mark.parametrize("kind", ["os", "libc", "raw"])
def test_lazy_binder_overwriting_a_patched_slot(kind: str, native_dir: Path) -> None:
    """A lazy resolution of close() in flight during install overwrites the patched slot; the next fork (or raw-fork cleanup) sees it: the child closes nothing it should not, and the slot is patched again."""
    if os.environ.get("LD_BIND_NOW"):
        pytest.skip("LD_BIND_NOW: nothing is bound lazily")
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("AddressSanitizer's runtime refuses RTLD_DEEPBIND, which this test needs (google/sanitizers#611)")
    compile_so(native_dir / "liblazyresolve.so", [NATIVE / "lazyresolve.c"], "-Wl,-z,now", "-Wl,-soname,liblazyresolve.so")
    lib = compile_so(
        native_dir / "hooktarget-lazy.so", [NATIVE / "hooktarget.c"], f"-L{native_dir}", "-l:liblazyresolve.so",
        "-Wl,-rpath,$ORIGIN", "-Wl,-z,lazy",
    )
    result = run_program("lazy_resolve.py", str(lib), kind)
    assert result["overwritten"] is True, "the race did not happen: the test proves nothing"  # type: ignore[index]
    assert result["child_sees_it_open"] is True  # type: ignore[index]
    assert result["child_untracked"] >= 1  # type: ignore[index]  # what the table forgot is counted
    if kind != "raw":  # a raw fork runs no handler in the parent
        assert result["close_hooked_after_fork"] is True  # type: ignore[index]




@pytest.mark.parametrize("how", ["fork", "_Fork"])
def test_fork_from_signal_handler_inside_hooked_call(how: str, native_dir: Path) -> None:
    """A signal handler that forks (fork, or _Fork and an immediate catch-up) on a thread parked inside a hooked close(): the fork does not wait for that thread, the child finishes the close and can fork again, and the gate keeps working."""
    lib = compile_so(native_dir / "hooktarget-sigfork.so", [NATIVE / "hooktarget.c", NATIVE / "sigfork.c"], "-ldl")
    result = run_program("signal_fork.py", str(lib), how, timeout=60)
    if "skip" in result:  # type: ignore[operator]
        pytest.skip(f"_Fork: {result['skip']}")  # type: ignore[index]
    assert result == {"returned": True, "report": "O", "status": 0, "later_fork": "ok", "victim_tracked": False}




def test_hooked_object_stays_loaded(native_dir: Path) -> None:
    """A hooked object stays mapped after the application's dlclose: the fork handlers check its GOT slots."""
    lib = compile_so(native_dir / "hooktarget-unload.so", [NATIVE / "hooktarget.c"])
    assert run_program("unload.py", str(lib)) == {"mapped": True, "child": "ok"}




@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads its GOT entry with x86_64 assembly")
@pytest.mark.parametrize("writer", ["binder", "foreign"])
def test_fork_handlers_repair_only_the_binders_writes(writer: str, native_dir: Path) -> None:
    """A watched close() slot that gets its pre-patch value back (the lazy binder) is repaired and the table forgotten; another library's hook there is left alone, and the table forgotten too."""
    lib = compile_so(
        native_dir / "hooktarget-gotslot.so", [NATIVE / "hooktarget.c", NATIVE / "gotslot.c"], *RELRO_MODES["noplt-lazy"]
    )
    result = run_program("overwrite_slot.py", str(lib), writer)
    # The fd may have been closed and reused through the plain close (or the foreign hook, which may not chain to
    # the wrapper): forgotten, not closed.  Only the binder's write is repaired.
    assert result == {"slot": "wrapper" if writer == "binder" else "foreign", "still_tracked": False, "child_sees_fd": True}




@pytest.mark.parametrize("writer", ["binder", "foreign"])
def test_fork_handlers_leave_a_foreign_hook_on_a_lazy_slot(writer: str, native_dir: Path) -> None:
    """A close() slot still unresolved (lazy PLT) when patched: the binder's value there is repaired and the table forgotten; another library's later hook is left alone and the table forgotten too (close() calls may bypass the wrapper)."""
    if os.environ.get("LD_BIND_NOW"):
        pytest.skip("LD_BIND_NOW: nothing is bound lazily")
    lib = compile_so(
        native_dir / "hooktarget-pltslot.so", [NATIVE / "hooktarget.c", NATIVE / "pltslot.c"], *RELRO_MODES["norelro"]
    )
    result = run_program("lazy_plt_slot.py", str(lib), writer)
    # The fd may have been closed and reused through the plain close (or the foreign hook, which may not chain to
    # the wrapper): forgotten, not closed.  Only the binder's write is repaired.
    assert result == {"slot": "wrapper" if writer == "binder" else "foreign", "still_tracked": False, "child_sees_fd": True}




def test_raw_fork_from_signal_handler_waiting_at_closed_gate(native_dir: Path) -> None:
    """A _Fork() from a signal handler on a thread waiting at the gate another thread's fork() closed: the child's call stops waiting (its token no longer matches the table), catches up and finishes; the parent's threads all finish too."""
    lib = compile_so(native_dir / "hooktarget-gatefork.so", [NATIVE / "hooktarget.c", NATIVE / "gatefork.c"], "-ldl")
    result = run_program("gate_raw_fork.py", str(lib), timeout=90)
    if "skip" in result:  # type: ignore[operator]
        pytest.skip(result["skip"])  # type: ignore[index]
    assert result["during_window"] is True, "the held close left before the fork: the test proves nothing"  # type: ignore[index]
    assert result == {"during_window": True, "report": "O", "child": "exit 0", "parent_threads_done": True}


# ---- the child never closes what is not, at that moment, libzmq's ----------------------------

@pytest.mark.parametrize("parent", ["alive", "gone"])
def test_raw_fork_child_reopening_inherited_numbers_keeps_its_files(parent: str) -> None:
    """A raw-fork child that closes what it inherited and opens files, sockets, eventfds, epolls and pipes on libzmq's numbers keeps all of them working through its first zmqfork call (the deferred cleanup), whether its parent is still alive (kcmp) or gone (prints only)."""
    result = run_program("raw_fork_reuse.py", parent)
    assert result["covered"], "the child reused none of libzmq's numbers: the test proves nothing"  # type: ignore[index]
    assert result["broken"] == []  # type: ignore[index]
    assert result["generation_changed"] is True  # type: ignore[index]


def test_non_chaining_foreign_close_hook_in_relro() -> None:
    """Another library's close() hook in a RELRO GOT page that does not chain to the wrapper: the table is forgotten, and the application's eventfd that got a stale number back survives in the child."""
    with tempfile.TemporaryDirectory(prefix="zmqfork-foreign-") as where:
        lib = compile_so(
            Path(where) / "hooktarget-foreign.so",
            [NATIVE / "hooktarget.c", NATIVE / "gotslot.c", NATIVE / "foreignclose.c"],
            *RELRO_MODES["noplt"], "-ldl",
        )
        if platform.machine() != "x86_64":
            pytest.skip("gotslot.c finds the GOT entry with x86_64 assembly")
        assert "GNU_RELRO" in readelf("-lW", str(lib))
        result = run_program("foreign_close.py", str(lib))
    assert result["stale_in_parent"] is True, "the foreign close went through the wrapper: proves nothing"  # type: ignore[index]
    assert result["works"] is True  # type: ignore[index]
    assert result["untracked"] >= 1  # type: ignore[index]


@pytest.mark.parametrize("takeover", ["file", "eventfd", "other-socket"])
@pytest.mark.parametrize("kind", ["os", "libc", "raw"])
def test_dup2_onto_a_tracked_number(kind: str, takeover: str, native_dir: Path) -> None:
    """The application dup2()s onto a number the hooked object's socket or eventfd held its own file, its own eventfd
    (the same anonymous inode: told apart by libzmq's mark) or a dup of another socket the object made (a description
    libzmq made, not the one at that number): a child (every fork kind) keeps what the application put there."""
    lib = compile_so(native_dir / "hooktarget-dup2.so", [NATIVE / "hooktarget.c"])
    result = run_program("dup2_takeover.py", str(lib), kind, takeover)
    assert result == {"child_reads": "mine", "still_listed": True}


@pytest.mark.parametrize("kind", ["os", "libc", "raw"])
def test_application_signal_on_a_libzmq_socket(kind: str, native_dir: Path) -> None:
    """The application's signal-driven I/O on a socket the hooked object made gets its own signal (zmqfork marks no
    socket), and the socket is still closed in a child (every fork kind): its F_SETSIG hides nothing."""
    lib = compile_so(native_dir / "hooktarget-signal.so", [NATIVE / "hooktarget.c"])
    result = run_program("app_signal_on_libzmq_socket.py", str(lib), kind)
    assert result == {"handler_ran": True, "child": "closed"}


# Without wipe-on-fork a raw clone is seen only by a hooked call (it compares pids), not by zmqfork.generation().
@pytest.mark.parametrize("via,wipe", [("zmqfork", "on"), ("libzmq", "on"), ("libzmq", "off")])
def test_clone_sharing_the_descriptor_table_closes_nothing(via: str, wipe: str) -> None:
    """A raw clone(CLONE_FILES) child shares the parent's descriptors: its first zmqfork or libzmq call closes none of
    them (kcmp(KCMP_FILES) tells the table is shared), and the parent's sockets still work."""
    env = {"ZMQFORK_DISABLE": "wipeonfork"} if wipe == "off" else None
    result = run_program("clone_files_child.py", via, env=env)
    assert result == {"child_status": 0, "closed_in_parent": [], "parent_works": True}


@pytest.mark.parametrize("kind", ["os", "libc", "raw"])
def test_libzmq_eventfd_whose_mark_was_reset_is_counted(kind: str) -> None:
    """The application resets the signal of libzmq's eventfd (F_SETSIG 0): a child cannot tell it from the
    application's own, so it leaves it open, and counts it as untracked."""
    assert run_program("eventfd_mark_reset.py", kind) == {"child": "open, counted"}


@pytest.mark.parametrize("kind", ["os", "libc", "raw"])
def test_install_at_the_descriptor_limit_still_marks_eventfds(kind: str) -> None:
    """Tracking installed at the descriptor limit (its probe eventfd fails) learns the anonymous inode from libzmq's
    first eventfd: libzmq's eventfds are marked, and the application's eventfd dup2()ed onto one survives a fork."""
    assert run_program("install_at_descriptor_limit.py", kind) == {"libzmq_eventfd_marked": True, "child_reads": 1234}


def test_fork_returns_while_io_thread_waits_in_blocking_accept() -> None:
    """A libzmq I/O thread waiting in accept4() on a blocking ZMQ_USE_FD listener does not hold os.fork() back, and the child works."""
    result = run_program("blocking_listener.py", timeout=90)
    assert result == {"child": "ok", "io_thread_still_in_accept4": True}


def test_raw_fork_without_wipeonfork_during_hooked_call(native_dir: Path) -> None:
    """Without wipe-on-fork, a raw fork while a thread is inside a hooked call: the child's first hooked call cleans the inherited table (getpid tells), counts the call in flight, and the child can fork again."""
    lib = compile_so(native_dir / "hooktarget-nowipe.so", [NATIVE / "hooktarget.c"])
    result = run_program("nowipe_raw_fork.py", str(lib), env={"ZMQFORK_DISABLE": "wipeonfork"})
    assert result == {"closed": 3, "untracked": 1, "tracked": 1, "own_tracked": True, "still_open": [],
                      "grandchild": "ok"}


@pytest.mark.parametrize("how", ["cancel", "longjmp"])
def test_hooked_call_left_abnormally_leaves_the_gate(how: str, native_dir: Path) -> None:
    """A thread cancelled inside a hooked close(), or jumped out of it by a signal handler's siglongjmp(), leaves the fork gate: the next fork finds no call in flight."""
    lib = compile_so(native_dir / f"hooktarget-{how}.so", [NATIVE / "hooktarget.c", NATIVE / "cancelcall.c"],
                     "-pthread")
    result = run_program("cancel_in_call.py", str(lib), how)
    assert result == {"left": 1, "in_window": 0, "in_flight_at_fork": 0}


def test_overflow_slots_hold_no_duplicates(native_dir: Path) -> None:
    """A number beyond the bitmap tracked twice (dup2 onto it again) leaves the table when closed once."""
    lib = compile_so(native_dir / "hooktarget-overflow.so", [NATIVE / "hooktarget.c"])
    result = run_program("overflow_dedupe.py", str(lib), env={"ZMQFORK_DISABLE": "fdtrack"})
    assert result == {"still_tracked": False, "tracked_delta": 0}


def test_detection_carries_every_descriptor_counter() -> None:
    """Every counter of the C struct reaches detection() under its documented name, untracked included."""
    from zmqfork._report import COUNTER_FIELDS

    assert tuple(COUNTER_FIELDS) == _native.FDTRACK_COUNTERS
    found = zmqfork.detection()._asdict()
    counts = _native.fdtrack_counts()
    assert {field: found[field] for field in COUNTER_FIELDS.values()} == {
        field: counts[counter] for counter, field in COUNTER_FIELDS.items()
    }


@pytest.mark.parametrize("holder, expected", [("parent", "taken"), ("child", "busy")])
def test_deferred_mutex_reset_spares_a_live_holder(holder: str, expected: str) -> None:
    """After a raw fork, the first zmqfork call resets a guarded mutex a parent thread held, but not one a thread of the child holds."""
    if "wipeonfork" not in _native.mechanisms():
        pytest.skip("a raw fork is detected only with wipe-on-fork")
    assert run_program("mutex_refresh.py", holder) == {"main_thread": expected}
