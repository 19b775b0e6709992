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
from forking import ChildFailed, fork_with, read_until_eof, run_in_child, run_session, wait_child
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


def open_fds() -> Set[int]:
    """This process's open descriptors (not counting the one listing them)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:  # the directory descriptor of the listing itself, closed by now
            continue
        found.add(fd)
    return found


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

STORM = r"""
import socket, sys, threading
port = int(sys.argv[1])
stop = threading.Event()
made = [0] * 4

def run(slot):
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                made[slot] += 1
        except OSError:
            pass

threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
while sum(made) < 20:  # the storm is on before the forks start
    threading.Event().wait(0.001)
sys.stdout.write("started\n"); sys.stdout.flush()
sys.stdin.read()  # until the test closes our stdin
stop.set()
for t in threads:
    t.join()
print(sum(made))
"""


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
            subprocess.Popen([sys.executable, "-c", STORM, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
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

CHAIN = r"""
import ctypes, json, os, resource, struct, sys, time, traceback, warnings

generations = int(sys.argv[1])
warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER: orphans come back to us
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

import zmqfork as zmq

def fd_count():
    return len(os.listdir("/proc/self/fd")) - 1  # not the listing's own descriptor

ctx = zmq.Context()
pull = ctx.socket(zmq.PULL)
# ipc, not tcp: thousands of tcp connects to one port make the kernel's search
# for a free ephemeral port slow (TIME_WAIT); tcp descriptors are tested apart.
address = "ipc://" + os.path.join(sys.argv[2], "pull")
pull.bind(address)
start = time.monotonic()
if os.fork() == 0:
    inherited = [pull, ctx]
    gen = 1
    try:
        while True:
            for obj in inherited:  # drop what the parent made, without libzmq
                obj.close() if isinstance(obj, zmq.Socket) else obj.term()
            count = fd_count()
            c = zmq.Context()
            push = c.socket(zmq.PUSH)
            push.connect(address)
            push.send(struct.pack("!ii", gen, count))
            if gen < generations and os.fork() == 0:
                inherited = [push, c]
                gen += 1
                continue
            push.close(linger=20000)  # delivered before we go
            c.term()
            os._exit(0)
    except BaseException:
        traceback.print_exc()
        os._exit(1)

counts = {}
while len(counts) < generations and pull.poll(20000):
    gen, count = struct.unpack("!ii", pull.recv())
    counts[gen] = count
elapsed = time.monotonic() - start
failed = 0
deadline = time.monotonic() + 30
while time.monotonic() < deadline:  # reap every generation
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid == 0:
        time.sleep(0.005)
    elif status != 0:
        failed += 1
print(json.dumps({"counts": counts, "failed": failed, "elapsed": elapsed}))
"""

CHAIN_GENERATIONS = int(os.environ.get("ZMQFORK_CHAIN_GENERATIONS", "4096"))


@pytest.mark.slow
def test_fork_chain_under_ulimit(tmp_path: Path) -> None:
    """4096 generations under ulimit -n 1024: each connects and sends, then forks the next; all arrive, fd count constant."""
    result = last_json(run_python(CHAIN, str(CHAIN_GENERATIONS), str(tmp_path), timeout=300))
    counts = {int(gen): count for gen, count in result["counts"].items()}  # type: ignore[index]
    missing = sorted(set(range(1, CHAIN_GENERATIONS + 1)) - set(counts))
    assert not missing, f"{len(missing)} generations never arrived, first {missing[:5]}"
    assert len(set(counts.values())) == 1, f"fd count varies: {sorted(set(counts.values()))}"
    assert result["failed"] == 0  # type: ignore[index]


# ---- 7. degradation -------------------------------------------------------------------

DEGRADED = r"""
import json, os, sys
import zmqfork
from forking import run_in_child

found = zmqfork.detection()
ctx = zmqfork.Context()
pull = ctx.socket(zmqfork.PULL)
port = pull.bind_to_random_port("tcp://127.0.0.1")
push = ctx.socket(zmqfork.PUSH)
push.connect("tcp://127.0.0.1:%d" % port)

def child():
    push.send(b"from the child")  # the inherited proxy rebuilds
    push.close(linger=10000)
    ctx.term()  # the child's own context: delivers before the child exits
    return zmqfork.detection().fdtrack

child_fdtrack = run_in_child(child, kind="os", timeout=30)
assert pull.poll(10000)
message = pull.recv()
ctx.destroy(linger=0)
print(json.dumps({"fdtrack": found.fdtrack, "why": found.unavailable.get("fdtrack"),
                  "object": found.fdtrack_object, "child_fdtrack": child_fdtrack,
                  "message": message.decode()}))
"""


def test_disabled_tracking_degrades() -> None:
    """With $ZMQFORK_DISABLE=fdtrack, proxies still rebuild in a child and detection() says why tracking is off."""
    result = last_json(run_python(DEGRADED, env={"ZMQFORK_DISABLE": "fdtrack"}))
    assert result == {
        "fdtrack": False,
        "why": "disabled by $ZMQFORK_DISABLE",
        "object": None,
        "child_fdtrack": False,
        "message": "from the child",
    }


INSTALL = r"""
import ctypes, json, sys
import zmqfork
from zmqfork import _native

for path in sys.argv[2:]:
    ctypes.CDLL(path)
first = _native.fdtrack_install(sys.argv[1])
again = _native.fdtrack_install(sys.argv[1])
found = zmqfork.detection()
print(json.dumps({"status": first, "again": again, "on": found.fdtrack,
                  "why": found.unavailable.get("fdtrack"), "object": found.fdtrack_object}))
"""


def install_in_subprocess(backend: str, *preload: str) -> Dict[str, object]:
    """Run the C install on ``backend`` (after loading ``preload``) in a fresh process with tracking not yet installed."""
    return last_json(run_python(INSTALL, backend, *preload, env={"ZMQFORK_DISABLE": "fdtrack"}))  # type: ignore[return-value]


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


HOOKTARGET = r"""
import ctypes, errno, json, os, select, socket, stat, sys, time
from zmqfork import _native
from forking import fork_with, wait_child

path = sys.argv[1]
lib = ctypes.CDLL(path, use_errno=True)
lazy_first = sys.argv[2] == "call-first"
if lazy_first:  # resolve some slots lazily before the patch
    assert lib.t_close(-1) == -1

def maps():
    real = os.path.realpath(path)
    with open("/proc/self/maps") as handle:
        return [line.split()[:2] for line in handle if line.rstrip().endswith(real)]

before = maps()
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
assert maps() == before, (before, maps())  # every page got its protection back
tracked = _native.fdtrack_is_tracked

def errno_after(fn, *args):
    lib.t_set_errno(4321)
    result = fn(*args)
    return result, lib.t_errno()

# Successes: tracked, errno untouched.
fd, err = errno_after(lib.t_socket, socket.AF_UNIX, socket.SOCK_STREAM, 0)
assert fd >= 0 and err == 4321 and tracked(fd)
assert errno_after(lib.t_close, fd) == (0, 4321) and not tracked(fd)
# Failures: the original's result and errno.
assert errno_after(lib.t_close, fd) == (-1, errno.EBADF)
assert errno_after(lib.t_socket, 12345, socket.SOCK_STREAM, 0) == (-1, errno.EAFNOSUPPORT)
assert errno_after(lib.t_eventfd, 0, -1) == (-1, errno.EINVAL)
assert errno_after(lib.t_dup, -1) == (-1, errno.EBADF)
assert errno_after(lib.t_epoll_create, 0) == (-1, errno.EINVAL)

efd = lib.t_eventfd(0, os.EFD_CLOEXEC); assert tracked(efd)
ep1 = lib.t_epoll_create1(0); assert tracked(ep1)
ep0 = lib.t_epoll_create(1); assert tracked(ep0)
pair = (ctypes.c_int * 2)()
assert lib.t_socketpair(socket.AF_UNIX, socket.SOCK_STREAM, pair) == 0 and tracked(pair[0]) and tracked(pair[1])
pipe = (ctypes.c_int * 2)()
assert lib.t_pipe(pipe) == 0 and tracked(pipe[0]) and tracked(pipe[1])
pipe2 = (ctypes.c_int * 2)()
assert lib.t_pipe2(pipe2, os.O_CLOEXEC) == 0 and tracked(pipe2[0]) and tracked(pipe2[1])
null = lib.t_open(b"/dev/null", os.O_RDONLY); assert tracked(null)
os.umask(0)
made = os.path.join(os.path.dirname(path), "made-%d" % os.getpid())
created = lib.t_open_mode(made.encode(), os.O_CREAT | os.O_WRONLY, 0o640)
assert tracked(created) and stat.S_IMODE(os.stat(made).st_mode) == 0o640  # the variadic mode got through

# accept/accept4 on a non-blocking listener: EAGAIN first, then a real connection.
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.bind(("127.0.0.1", 0)); listener.listen(4); listener.setblocking(False)
assert errno_after(lib.t_accept4, listener.fileno(), 0) == (-1, errno.EAGAIN)
assert errno_after(lib.t_accept, listener.fileno()) == (-1, errno.EAGAIN)
clients = [socket.create_connection(listener.getsockname()) for _ in range(2)]
for _ in range(100):
    if select.select([listener], [], [], 0.1)[0]:
        break
accepted4 = lib.t_accept4(listener.fileno(), os.O_CLOEXEC); assert accepted4 >= 0 and tracked(accepted4)
select.select([listener], [], [], 5)
accepted = lib.t_accept(listener.fileno()); assert accepted >= 0 and tracked(accepted)
assert not tracked(listener.fileno()) and not any(tracked(c.fileno()) for c in clients)

# dup of an application descriptor makes a descriptor of the object's; dup2/dup3 onto a number make it theirs.
app_r, app_w = os.pipe()
assert not tracked(app_r)
copy = lib.t_dup(app_r); assert tracked(copy) and not tracked(app_r)
assert lib.t_dup2(efd, app_w) == app_w and tracked(app_w)     # app_w is now the object's eventfd
assert lib.t_dup2(app_r, app_r) == app_r and not tracked(app_r)  # dup2(fd, fd) changes nothing
spare = os.open("/dev/null", os.O_RDONLY); assert not tracked(spare)
assert lib.t_dup3(efd, spare, os.O_CLOEXEC) == spare and tracked(spare)
assert errno_after(lib.t_dup3, efd, efd, 0) == (-1, errno.EINVAL)

theirs = sorted({fd for fd in [efd, ep1, ep0, pair[0], pair[1], pipe[0], pipe[1], pipe2[0], pipe2[1],
                               null, created, accepted4, accepted, copy, app_w, spare]})
assert theirs == [fd for fd in _native.fdtrack_tracked_fds() if fd in theirs]
mine = [app_r, listener.fileno()] + [c.fileno() for c in clients]

# In a child, theirs are closed and mine are open.
rd, wr = os.pipe()
pid = fork_with("os")
if pid == 0:
    bad = [fd for fd in theirs if os.path.exists("/proc/self/fd/%d" % fd)]
    bad += [-fd for fd in mine if not os.path.exists("/proc/self/fd/%d" % fd)]
    os.write(wr, json.dumps(bad).encode())
    os._exit(0)
os.close(wr)
select.select([rd], [], [], 20)
child_bad = json.loads(os.read(rd, 65536) or b"null")
assert wait_child(pid, 20) == 0
print(json.dumps({"child_bad": child_bad, "closed_in_parent": [fd for fd in theirs if not os.path.exists("/proc/self/fd/%d" % fd)]}))
"""


@pytest.mark.parametrize("order", ["patch-first", "call-first"])
@pytest.mark.parametrize("mode", sorted(RELRO_MODES))
def test_got_patcher_relro_matrix(mode: str, order: str, native_dir: Path) -> None:
    """The GOT patcher hooks every call of an object built with no, partial or full RELRO and -fno-plt, keeping results and errno."""
    lib = compile_so(native_dir / f"hooktarget-{mode}.so", [NATIVE / "hooktarget.c"], *RELRO_MODES[mode])
    # The matrix must really differ the way it claims.
    headers = readelf("-lW", str(lib))
    dynamic = readelf("-dW", str(lib))
    relocs = readelf("-rW", str(lib))
    assert ("GNU_RELRO" in headers) == (mode in ("partial", "full", "noplt"))
    assert ("BIND_NOW" in dynamic or "FLAGS_1" in dynamic and "NOW" in dynamic) == (mode in ("full", "noplt"))
    socket_relocs = [line for line in relocs.splitlines() if " socket@" in line or " socket +" in line]
    kinds = {line.split()[2] for line in socket_relocs}
    assert kinds == ({"R_X86_64_GLOB_DAT"} if mode.startswith("noplt") else {"R_X86_64_JUMP_SLOT"}) or (
        platform.machine() != "x86_64"
    ), kinds
    result = last_json(run_python(HOOKTARGET, str(lib), order))
    assert result == {"child_bad": [], "closed_in_parent": []}


GATE = r"""
import ctypes, json, os, select, sys, threading, time
from zmqfork import _native
from forking import fork_with, wait_child

path, which, delay = sys.argv[1], sys.argv[2], int(sys.argv[3])
lib = ctypes.CDLL(path)
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
victim = lib.t_eventfd(0, 0) if which == "close" else -1
before = set(int(name) for name in os.listdir("/proc/self/fd"))
r, w = os.pipe()
_native.testing_fdtrack_delay(delay)  # each hooked call sleeps this long inside its window
thread = threading.Thread(target=(lambda: lib.t_eventfd(0, 0)) if which == "create" else (lambda: lib.t_close(victim)),
                          daemon=True)
thread.start()
deadline = time.monotonic() + 10
while _native.testing_fdtrack_in_window() == 0:
    assert time.monotonic() < deadline, "the call never reached its window"
    time.sleep(0.001)
started = time.monotonic()
pid = fork_with("os")  # the prepare handler must wait for the call in its window
if pid == 0:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            found[fd] = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            pass
    extra = {fd: target for fd, target in found.items() if fd not in before | {r, w}}
    os.write(w, json.dumps({"extra": extra, "victim_open": victim in found,
                            "untracked": _native.fdtrack_counts()["untracked"]}).encode())
    os._exit(0)
waited = time.monotonic() - started
still_in_window = _native.testing_fdtrack_in_window() != 0
_native.testing_fdtrack_delay(0)
thread.join(10)
os.close(w)
select.select([r], [], [], 20)
child = json.loads(os.read(r, 65536))
assert wait_child(pid, 20) == 0
print(json.dumps({"waited": waited, "still_in_window": still_in_window, **child}), flush=True)
os._exit(0)  # a call stuck in its window may still sleep in its thread
"""


@pytest.mark.parametrize("which", ["create", "close"])
def test_fork_waits_for_hooked_call_in_its_window(which: str, native_dir: Path) -> None:
    """A fork while a hooked call sits between the real call and the table update (40 ms, under the 100 ms bound) waits for it; the child holds nothing of it."""
    lib = compile_so(native_dir / "hooktarget-gate.so", [NATIVE / "hooktarget.c"])
    result = last_json(run_python(GATE, str(lib), which, "40000"))
    assert result["extra"] == {} and result["victim_open"] is False  # type: ignore[index]
    assert result["untracked"] == 0  # type: ignore[index]


@pytest.mark.parametrize("which", ["create", "close"])
def test_fork_waits_no_longer_than_the_bound(which: str, native_dir: Path) -> None:
    """A hooked call stuck in its window for 60 s does not hold a fork back (the wait is bounded): the fork returns while the call is still inside, and the child counts what the call may leave open as untracked."""
    lib = compile_so(native_dir / "hooktarget-gate.so", [NATIVE / "hooktarget.c"])
    # Without the bound the fork waits the full 60 s and the script overruns its 40 s.
    result = last_json(run_python(GATE, str(lib), which, "60000000", timeout=40))
    assert result["still_in_window"] is True  # type: ignore[index]
    assert result["untracked"] >= 1  # type: ignore[index]
    if which == "create":  # the eventfd was made before the fork and never tracked: left open, not closed
        assert list(result["extra"].values()) == ["anon_inode:[eventfd]"]  # type: ignore[index]
    else:  # the close had taken the number out of the table but not closed it yet
        assert result["extra"] == {} and result["victim_open"] is True  # type: ignore[index]


def test_finds_system_libzmq(native_dir: Path) -> None:
    """A backend linked to a separate libzmq.so.5 (distro pyzmq): the hooks go on that libzmq, not on the backend."""
    fake = compile_so(native_dir / "libzmq.so.5", [NATIVE / "fakezmq.c"], "-Wl,-soname,libzmq.so.5")
    backend = compile_so(
        native_dir / "backend_shared.so",
        [NATIVE / "fakebackend.c"],
        f"-L{native_dir}",
        "-l:libzmq.so.5",
        "-Wl,-rpath,$ORIGIN",
    )
    assert "libzmq.so.5" in readelf("-dW", str(backend))
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


TRACK_FAKE = r"""
import ctypes, json, os, sys
import zmqfork
from zmqfork import _native
from forking import run_in_child

backend = ctypes.CDLL(sys.argv[1])
assert _native.fdtrack_install(sys.argv[1]) == _native.FDTRACK_ON
fd = backend.backend_make_fd()
assert _native.fdtrack_is_tracked(fd)
gone = run_in_child(lambda: not os.path.exists("/proc/self/fd/%d" % fd), kind="os")
assert backend.backend_close_fd(fd) == 0 and not _native.fdtrack_is_tracked(fd)
print(json.dumps(gone))
"""


def test_fake_libzmq_descriptors_closed_in_child(native_dir: Path) -> None:
    """Through a fake system libzmq, a descriptor it makes is tracked and closed in a child."""
    compile_so(native_dir / "libzmq.so.5", [NATIVE / "fakezmq.c"], "-Wl,-soname,libzmq.so.5")
    backend = compile_so(
        native_dir / "backend_track.so", [NATIVE / "fakebackend.c"], f"-L{native_dir}", "-l:libzmq.so.5",
        "-Wl,-rpath,$ORIGIN",
    )
    assert last_json(run_python(TRACK_FAKE, str(backend), env={"ZMQFORK_DISABLE": "fdtrack"})) is True


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


EMFILE = r"""
import json, os, resource, sys
import zmq
import zmqfork
from zmqfork import _native

ctx = zmqfork.Context()  # one eventfd; the first socket needs five more
highest = max(int(name) for name in os.listdir("/proc/self/fd"))
fillers = []
while True:  # fill every free number below the limit we are about to set
    fd = os.open("/dev/null", os.O_RDONLY)
    if fd > highest:
        os.close(fd)
        break
    fillers.append(fd)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
try:
    ctx.socket(zmqfork.PUSH)
    outcome = "no error"
except zmq.ZMQError as exc:
    outcome = exc.errno
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
tracked = _native.fdtrack_tracked_fds()
print(json.dumps({"errno": outcome, "tracked_open": all(os.path.exists("/proc/self/fd/%d" % fd) for fd in tracked),
                  "tracked": len(tracked)}))
"""


def test_libzmq_sees_real_errno_under_emfile() -> None:
    """Out of descriptors, libzmq's own errno checks see EMFILE through the hooks (it asserts on anything else)."""
    import errno

    result = last_json(run_python(EMFILE))
    assert result["errno"] == errno.EMFILE
    assert result["tracked_open"] and result["tracked"] >= 1


ROLLBACK = r"""
import ctypes, json, os, sys
from zmqfork import _native
from forking import run_in_child

path = sys.argv[1]
lib = ctypes.CDLL(path)
made = []
# close, socket, accept, accept4 and eventfd are patched (hooks[] order), then epoll_create1 fails.
_native.testing_fdtrack_fail_patch(5, lambda: made.append(lib.t_eventfd(0, 0)))
status = _native.testing_fdtrack_hook_object(path)
[fd] = made
tracked_before_failure = _native.fdtrack_is_tracked(fd)
assert lib.t_close(fd) == 0
stale = _native.fdtrack_is_tracked(fd)
# The application gets the number back; a child must not close it.
rd, wr = os.pipe()
os.dup2(wr, fd)
child_sees_it_open = run_in_child(lambda: os.path.exists("/proc/self/fd/%d" % fd), kind="os")
print(json.dumps({"status": status, "tracked_before_failure": tracked_before_failure, "stale": stale,
                  "child_sees_it_open": child_sees_it_open}))
"""


def test_failed_install_leaves_no_stale_entry(native_dir: Path) -> None:
    """An install that fails after a descriptor was tracked leaves close() hooked: the number leaves the table when closed, and a child does not close it once reused."""
    lib = compile_so(native_dir / "hooktarget-rollback.so", [NATIVE / "hooktarget.c"])
    result = last_json(run_python(ROLLBACK, str(lib)))
    assert result == {
        "status": _native.lib.ZMQFORK_FDTRACK_EPATCH,
        "tracked_before_failure": True,
        "stale": False,
        "child_sees_it_open": True,
    }


LAZY = r"""
import ctypes, json, os, sys, threading, time
from zmqfork import _native
from forking import run_in_child

path, kind = sys.argv[1], sys.argv[2]
lib = ctypes.CDLL(path, mode=os.RTLD_LAZY | os.RTLD_DEEPBIND)  # its close() binds to lazyresolve's
resolver = ctypes.CDLL(os.path.join(os.path.dirname(path), "liblazyresolve.so"))
resolver.lazy_arm()
first_call = threading.Thread(target=lambda: lib.t_close(-1), daemon=True)  # its first close(): the lazy resolver
first_call.start()
try:
    deadline = time.monotonic() + 10
    while not resolver.lazy_waiting():
        assert time.monotonic() < deadline, "the first call never reached the resolver"
        time.sleep(0.001)
    assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON  # patched under the waiting resolver
finally:
    resolver.lazy_release()  # a failed step must not leave the thread waiting in the resolver
first_call.join(10)
assert not first_call.is_alive()

fd = lib.t_eventfd(0, 0)
assert _native.fdtrack_is_tracked(fd)
assert lib.t_close(fd) == 0
overwritten = _native.fdtrack_is_tracked(fd)  # the resolver wrote the plain close() over the wrapper
rd, wr = os.pipe()
os.dup2(wr, fd)  # the application gets the number back

def child():
    if kind == "raw":
        _native.refresh()
    return os.path.exists("/proc/self/fd/%d" % fd), _native.fdtrack_counts()["untracked"]

child_sees_it_open, child_untracked = run_in_child(child, kind=kind)
after = lib.t_eventfd(0, 0)
tracked_after = _native.fdtrack_is_tracked(after)
lib.t_close(after)
print(json.dumps({"overwritten": overwritten, "child_sees_it_open": child_sees_it_open,
                  "close_hooked_after_fork": tracked_after and not _native.fdtrack_is_tracked(after),
                  "child_untracked": child_untracked}))
"""


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
    result = last_json(run_python(LAZY, str(lib), kind))
    assert result["overwritten"] is True, "the race did not happen: the test proves nothing"  # type: ignore[index]
    assert result["child_sees_it_open"] is True  # type: ignore[index]
    assert result["child_untracked"] >= 1  # type: ignore[index]  # what the table forgot is counted
    if kind != "raw":  # a raw fork runs no handler in the parent
        assert result["close_hooked_after_fork"] is True  # type: ignore[index]


SIGFORK = r"""
import ctypes, json, os, select, signal, sys, threading, time
from zmqfork import _native
from forking import run_in_child, wait_child

path, how = sys.argv[1], sys.argv[2]
lib = ctypes.CDLL(path, use_errno=True)
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
watched = lib.t_eventfd(0, 0)  # tracked: the child's cleanup must close it
victim = lib.t_eventfd(0, 0)   # closed by the call the signal interrupts
assert _native.fdtrack_is_tracked(watched) and _native.fdtrack_is_tracked(victim)
rd, wr = os.pipe()
def address(name):
    return ctypes.c_void_p(int(_native.ffi.cast("uintptr_t", _native.ffi.addressof(_native.lib, name))))

refresh = address("zmqfork_refresh") if how == "_Fork" else None
if lib.sf_install(signal.SIGUSR1, wr, watched, address("zmqfork_testing_fdtrack_delay"), refresh) != 0:
    print(json.dumps({"skip": os.strerror(ctypes.get_errno())}))
    sys.exit(0)
_native.testing_fdtrack_delay(500_000)  # the close sleeps inside the gate
thread = threading.Thread(target=lib.sf_close, args=(victim,), daemon=True)
thread.start()
deadline = time.monotonic() + 10
while _native.testing_fdtrack_in_window() == 0:
    assert time.monotonic() < deadline, "the close never reached its window"
    time.sleep(0.001)
signal.pthread_kill(thread.ident, signal.SIGUSR1)  # its handler forks, on the thread inside the gate
thread.join(10)
returned = not thread.is_alive()
_native.testing_fdtrack_delay(0)
pid = lib.sf_child_pid()
ready, _, _ = select.select([rd], [], [], 30 if pid > 0 else 0)
report = os.read(rd, 1).decode() if ready else "nothing"
status = wait_child(pid, 30) if pid > 0 else None
if returned:  # else the thread still holds the gate and any fork would wait for it
    later_fork = run_in_child(lambda: "ok", kind="os", timeout=20)  # the parent's gate still works
else:
    later_fork = "not tried"
print(json.dumps({"returned": returned, "report": report, "status": status, "later_fork": later_fork,
                  "victim_tracked": _native.fdtrack_is_tracked(victim)}))
"""


@pytest.mark.parametrize("how", ["fork", "_Fork"])
def test_fork_from_signal_handler_inside_hooked_call(how: str, native_dir: Path) -> None:
    """A signal handler that forks (fork, or _Fork and an immediate catch-up) on a thread parked inside a hooked close(): the fork does not wait for that thread, the child finishes the close and can fork again, and the gate keeps working."""
    lib = compile_so(native_dir / "hooktarget-sigfork.so", [NATIVE / "hooktarget.c", NATIVE / "sigfork.c"], "-ldl")
    result = last_json(run_python(SIGFORK, str(lib), how, timeout=60))
    if "skip" in result:  # type: ignore[operator]
        pytest.skip(f"_Fork: {result['skip']}")  # type: ignore[index]
    assert result == {"returned": True, "report": "O", "status": 0, "later_fork": "ok", "victim_tracked": False}


UNLOAD = r"""
import ctypes, json, os, sys
from zmqfork import _native
from forking import run_in_child

path = sys.argv[1]
libdl = ctypes.CDLL(None)
libdl.dlopen.restype = ctypes.c_void_p
libdl.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
libdl.dlclose.argtypes = [ctypes.c_void_p]
handle = libdl.dlopen(path.encode(), os.RTLD_LAZY)
assert handle
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
assert libdl.dlclose(handle) == 0  # the only reference the application had
mapped = any(line.rstrip().endswith(os.path.realpath(path)) for line in open("/proc/self/maps"))
print(json.dumps({"mapped": mapped, "child": run_in_child(lambda: "ok", kind="os")}))
"""


def test_hooked_object_stays_loaded(native_dir: Path) -> None:
    """A hooked object stays mapped after the application's dlclose: the fork handlers check its GOT slots."""
    lib = compile_so(native_dir / "hooktarget-unload.so", [NATIVE / "hooktarget.c"])
    assert last_json(run_python(UNLOAD, str(lib))) == {"mapped": True, "child": "ok"}


OVERWRITE = r"""
import ctypes, json, os, sys
from zmqfork import _native
from forking import run_in_child

path, writer = sys.argv[1], sys.argv[2]
lib = ctypes.CDLL(path)
lib.t_close_slot.restype = ctypes.c_void_p
slot = ctypes.c_void_p.from_address(lib.t_close_slot())
plain = slot.value  # bound at load: the plain close()
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
wrapper = slot.value
assert wrapper != plain
fd = lib.t_eventfd(0, 0)
assert _native.fdtrack_is_tracked(fd)
# What the lazy binder would write (a racing first call: the value the slot had), or another library's hook.
foreign = ctypes.cast(lib.t_dup, ctypes.c_void_p).value
slot.value = plain if writer == "binder" else foreign
child_sees_fd = run_in_child(lambda: os.path.exists("/proc/self/fd/%d" % fd), kind="os")
print(json.dumps({"slot": {wrapper: "wrapper", plain: "plain", foreign: "foreign"}.get(slot.value, "other"),
                  "still_tracked": _native.fdtrack_is_tracked(fd), "child_sees_fd": child_sees_fd}))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads its GOT entry with x86_64 assembly")
@pytest.mark.parametrize("writer", ["binder", "foreign"])
def test_fork_handlers_repair_only_the_binders_writes(writer: str, native_dir: Path) -> None:
    """A watched close() slot that gets its pre-patch value back (the lazy binder) is repaired and the table forgotten; another library's hook there is left alone, and the table forgotten too."""
    lib = compile_so(
        native_dir / "hooktarget-gotslot.so", [NATIVE / "hooktarget.c", NATIVE / "gotslot.c"], *RELRO_MODES["noplt-lazy"]
    )
    result = last_json(run_python(OVERWRITE, str(lib), writer))
    # The fd may have been closed and reused through the plain close (or the foreign hook, which may not chain to
    # the wrapper): forgotten, not closed.  Only the binder's write is repaired.
    assert result == {"slot": "wrapper" if writer == "binder" else "foreign", "still_tracked": False, "child_sees_fd": True}


LAZYSLOT = r"""
import ctypes, json, os, sys
from zmqfork import _native
from forking import run_in_child

path, writer = sys.argv[1], sys.argv[2]
lib = ctypes.CDLL(path, mode=os.RTLD_LAZY)
lib.t_close_plt_slot.restype = ctypes.c_void_p
address = lib.t_close_plt_slot()
if not address:
    print(json.dumps({"skip": "no DT_RELA JUMP_SLOT for close()"}))
    sys.exit(0)
slot = ctypes.c_void_p.from_address(address)
plain = ctypes.cast(ctypes.CDLL(None).close, ctypes.c_void_p).value  # what the binder resolves close() to
unresolved = slot.value  # close() never called yet: the object's own PLT entry
assert unresolved != plain
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
wrapper = slot.value
assert wrapper not in (unresolved, plain)
fd = lib.t_eventfd(0, 0)
assert _native.fdtrack_is_tracked(fd)
# The binder's first resolution (the plain close), or another library's hook after zmqfork's.
foreign = ctypes.cast(lib.t_dup, ctypes.c_void_p).value
slot.value = plain if writer == "binder" else foreign
child_sees_fd = run_in_child(lambda: os.path.exists("/proc/self/fd/%d" % fd), kind="os")
print(json.dumps({"slot": {wrapper: "wrapper", plain: "plain", foreign: "foreign", unresolved: "unresolved"}.get(slot.value, "other"),
                  "still_tracked": _native.fdtrack_is_tracked(fd), "child_sees_fd": child_sees_fd}))
"""


@pytest.mark.parametrize("writer", ["binder", "foreign"])
def test_fork_handlers_leave_a_foreign_hook_on_a_lazy_slot(writer: str, native_dir: Path) -> None:
    """A close() slot still unresolved (lazy PLT) when patched: the binder's value there is repaired and the table forgotten; another library's later hook is left alone and the table forgotten too (close() calls may bypass the wrapper)."""
    if os.environ.get("LD_BIND_NOW"):
        pytest.skip("LD_BIND_NOW: nothing is bound lazily")
    lib = compile_so(
        native_dir / "hooktarget-pltslot.so", [NATIVE / "hooktarget.c", NATIVE / "pltslot.c"], *RELRO_MODES["norelro"]
    )
    result = last_json(run_python(LAZYSLOT, str(lib), writer))
    if "skip" in result:  # type: ignore[operator]
        pytest.skip(result["skip"])  # type: ignore[index]
    # The fd may have been closed and reused through the plain close (or the foreign hook, which may not chain to
    # the wrapper): forgotten, not closed.  Only the binder's write is repaired.
    assert result == {"slot": "wrapper" if writer == "binder" else "foreign", "still_tracked": False, "child_sees_fd": True}


GATEFORK = r"""
import ctypes, json, os, select, signal, sys, threading, time
from zmqfork import _native
from forking import wait_child

path = sys.argv[1]
lib = ctypes.CDLL(path, use_errno=True)
assert _native.testing_fdtrack_hook_object(path) == _native.FDTRACK_ON
delay = ctypes.c_void_p(int(_native.ffi.cast("uintptr_t", _native.ffi.addressof(_native.lib, "zmqfork_testing_fdtrack_delay"))))
rd, wr = os.pipe()
if lib.gf_install(signal.SIGUSR1, wr, delay) != 0:
    print(json.dumps({"skip": "_Fork: " + os.strerror(ctypes.get_errno())}))
    sys.exit(0)
futex = str(lib.gf_sys_futex())

def in_futex(thread):
    with open("/proc/self/task/%d/syscall" % thread.native_id) as handle:
        return handle.read().split()[0] == futex

def wait_until(what, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)  # polling interval only: every step waits for its condition

try:
    open("/proc/self/task/%d/syscall" % threading.get_native_id()).read()
except OSError as error:
    print(json.dumps({"skip": "cannot read /proc/self/task/*/syscall: %s" % error}))
    sys.exit(0)

held, waiting = lib.t_eventfd(0, 0), lib.t_eventfd(0, 0)
_native.testing_fdtrack_delay(3_000_000)  # the window the setup has to fit in; nothing waits for it to end
holder = threading.Thread(target=lib.t_close, args=(held,), daemon=True)
holder.start()
wait_until("the held close never reached its window", lambda: _native.testing_fdtrack_in_window() != 0)
forker = threading.Thread(target=lib.gf_fork_and_reap, daemon=True)
forker.start()  # its prepare handler closes the gate and waits for the held close
wait_until("the fork never waited for the held close", lambda: lib.gf_forking() and in_futex(forker))
waiter = threading.Thread(target=lib.gf_close, args=(waiting,), daemon=True)
waiter.start()
wait_until("the second close never waited at the closed gate", lambda: lib.gf_closing() and in_futex(waiter))
signal.pthread_kill(waiter.ident, signal.SIGUSR1)  # its handler _Fork()s on the thread waiting at the gate
wait_until("the handler never forked", lambda: lib.gf_child_pid() != 0)
during_window = _native.testing_fdtrack_in_window() != 0  # so the gate was still closed at the fork
_native.testing_fdtrack_delay(0)  # the parent's later calls need no window
pid = lib.gf_child_pid()

report, status = "nothing", None
deadline = time.monotonic() + 30
while time.monotonic() < deadline:  # a report, or the child's end (its alarm ends a hang)
    if select.select([rd], [], [], 0.05)[0]:
        report = os.read(rd, 1).decode()
        break
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    status = None
if status is None:
    status = wait_child(pid, 30)
child = "exit %d" % os.WEXITSTATUS(status) if os.WIFEXITED(status) else "signal %d" % os.WTERMSIG(status)
for thread in (holder, forker, waiter):
    thread.join(30)
print(json.dumps({"during_window": during_window, "report": report, "child": child,
                  "parent_threads_done": not any(t.is_alive() for t in (holder, forker, waiter))}))
"""


def test_raw_fork_from_signal_handler_waiting_at_closed_gate(native_dir: Path) -> None:
    """A _Fork() from a signal handler on a thread waiting at the gate another thread's fork() closed: the child's call stops waiting (its token no longer matches the table), catches up and finishes; the parent's threads all finish too."""
    lib = compile_so(native_dir / "hooktarget-gatefork.so", [NATIVE / "hooktarget.c", NATIVE / "gatefork.c"], "-ldl")
    result = last_json(run_python(GATEFORK, str(lib), timeout=90))
    if "skip" in result:  # type: ignore[operator]
        pytest.skip(result["skip"])  # type: ignore[index]
    assert result["during_window"] is True, "the held close left before the fork: the test proves nothing"  # type: ignore[index]
    assert result == {"during_window": True, "report": "O", "child": "exit 0", "parent_threads_done": True}


# ---- the child never closes what is not, at that moment, libzmq's ----------------------------

PROGRAMS = TESTS / "programs"


def run_program(name: str, *args: str, env: Optional[Dict[str, str]] = None, timeout: float = 60.0) -> object:
    """Run tests/programs/``name`` in a fresh interpreter (own session); the JSON on its last stdout line."""
    return last_json(run_python((PROGRAMS / name).read_text(), *args, env=env, timeout=timeout))


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


@pytest.mark.parametrize("kind", ["os", "libc", "raw"])
def test_dup2_onto_a_tracked_number(kind: str, native_dir: Path) -> None:
    """The application dup2()s its own file onto a number the hooked object's socket held: a child (every fork kind) keeps the file."""
    lib = compile_so(native_dir / "hooktarget-dup2.so", [NATIVE / "hooktarget.c"])
    result = run_program("dup2_takeover.py", str(lib), kind)
    assert result == {"child_reads": "mine", "still_listed": True}


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


def test_cancelled_hooked_call_leaves_the_gate(native_dir: Path) -> None:
    """A thread cancelled inside a hooked close() leaves the fork gate: the next fork finds no call in flight."""
    lib = compile_so(native_dir / "hooktarget-cancel.so", [NATIVE / "hooktarget.c", NATIVE / "cancelcall.c"],
                     "-pthread")
    result = run_program("cancel_in_call.py", str(lib))
    assert result == {"cancelled": 1, "in_window": 0, "in_flight_at_fork": 0}


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
