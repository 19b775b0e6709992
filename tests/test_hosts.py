"""Real prefork hosts, run as users run them: gunicorn's sync workers with --preload, Celery's prefork pool.

Each host imports an application module (``tests/hosts/``) once, in its
master, which makes zmqfork sockets there (``hosts/host_sockets.py``), and then
forks its workers.  The test binds the other ends, keeps one request or task
in every worker at once (each waits on its REQ until the test lets it go), and
checks that:

- every worker's message arrived on the master's PUSH, from that worker's own
  pid, and says what the worker answered (HTTP) or was given (Celery);
- the workers are the master's children, one message from each per round;
- no worker holds any of the descriptors libzmq had in the master (its
  listener, its connections, its eventfds and epolls), compared as open file
  descriptions with kcmp(2), and sockets also by inode.

The host runs in a session of its own; it is stopped with SIGTERM and, if it
overruns, killed with its whole process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import pytest

import zmqfork as zmq
from reliability import children_of, no_children_left, wait_until  # noqa: F401  - a fixture

HOSTS = Path(__file__).resolve().parent / "hosts"
WORKERS = 3
ROUNDS = 2
#: Seconds any single wait may take (the host's start, a round, its shutdown).
TIMEOUT = 60.0

pytestmark = pytest.mark.usefixtures("no_children_left")


class Sink:
    """The test's ends of the master's sockets: a PULL for reports, a ROUTER that holds workers until released."""

    def __init__(self, ctx: zmq.Context, folder: Path) -> None:
        self.pull = ctx.socket(zmq.PULL)
        self.pull.linger = 0
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.report_path = folder / "master.json"
        self.env = {
            "ZMQFORK_HOST_SINK": f"tcp://127.0.0.1:{self.pull.bind_to_random_port('tcp://127.0.0.1')}",
            "ZMQFORK_HOST_HOLD": f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}",
            "ZMQFORK_HOST_REPORT": str(self.report_path),
        }

    def receive(self, what: str, log: Path) -> str:
        """The next report on the PULL; fails the test, showing the host's log, if none comes in TIMEOUT."""
        if not self.pull.poll(int(TIMEOUT * 1000)):
            pytest.fail(f"no {what} within {TIMEOUT}s; host log:\n{_tail(log)}")
        return self.pull.recv_string()

    def hold_one_round(self, log: Path) -> List[str]:
        """Wait until WORKERS workers each wait to be let go, then let them all go; returns what each said."""
        held: List[Tuple[bytes, str]] = []
        while len(held) < WORKERS:
            if not self.router.poll(int(TIMEOUT * 1000)):
                pytest.fail(f"only {len(held)} of {WORKERS} workers reported within {TIMEOUT}s: {held}; "
                            f"host log:\n{_tail(log)}")
            identity, _, message = self.router.recv_multipart()
            held.append((identity, message.decode()))
        for identity, _ in held:
            self.router.send_multipart([identity, b"", b"go"])
        return [message for _, message in held]


@pytest.fixture
def sink(ctx: zmq.Context, tmp_path: Path) -> Sink:
    """The test's PULL and ROUTER, bound on 127.0.0.1, and where the master writes its descriptor report."""
    return Sink(ctx, tmp_path)


@contextlib.contextmanager
def running(argv: Sequence[str], env: Dict[str, str], log: Path) -> Iterator["subprocess.Popen[bytes]"]:
    """Run a host in a session of its own, output to ``log``; stop it with SIGTERM, kill its group on overrun.

    Fails the test if the host does not exit by itself within TIMEOUT of the
    SIGTERM or leaves any process of its group behind.
    """
    path = os.pathsep.join(filter(None, [str(HOSTS), os.environ.get("PYTHONPATH")]))
    with open(log, "wb") as output:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            env={**os.environ, **env, "PYTHONPATH": path}, start_new_session=True,
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TIMEOUT)
            overran = False
        except subprocess.TimeoutExpired:
            overran = True
        group_left = not wait_until(lambda: not _group_alive(proc.pid), TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not overran, f"{argv[2]} did not stop within {TIMEOUT}s of SIGTERM; log:\n{_tail(log)}"
    assert not group_left, f"{argv[2]} left processes of its group running; log:\n{_tail(log)}"
    assert proc.returncode == 0, f"{argv[2]} exited with {proc.returncode} after SIGTERM; log:\n{_tail(log)}"


def test_gunicorn_sync_workers_with_preload(sink: Sink, tmp_path: Path) -> None:
    """gunicorn --preload, 3 sync workers: each worker's requests arrive on the master's PUSH, none holds its libzmq descriptors."""
    with socket.socket() as probe:  # a free port for gunicorn to bind (gunicorn retries if it is taken meanwhile)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "gunicorn.log"
    argv = [sys.executable, "-m", "gunicorn", "--preload", "--workers", str(WORKERS), "--worker-class", "sync",
            "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "10", "--timeout", str(int(TIMEOUT * 2)),
            "gunicorn_app:application"]

    def request(tags: Sequence[str]) -> Callable[[List[str]], None]:
        started = _requests_in_parallel(f"http://127.0.0.1:{port}", tags)

        def answered_as_reported(held: List[str]) -> None:
            assert sorted(_joined(started, log)) == sorted(held)

        return answered_as_reported

    with running(argv, sink.env, log) as proc:
        _every_worker_reports(sink, proc.pid, log, request)


def test_celery_prefork_pool(sink: Sink, tmp_path: Path) -> None:
    """Celery's prefork pool (3 processes), filesystem transport: each pool process's tasks arrive on the master's PUSH, none holds its libzmq descriptors."""
    queue = tmp_path / "celery"
    for folder in ("queue", "processed", "control"):
        (queue / folder).mkdir(parents=True)
    env = {**sink.env, "ZMQFORK_HOST_QUEUE": str(queue)}
    log = tmp_path / "celery.log"
    argv = [sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "--pool=prefork",
            f"--concurrency={WORKERS}", "-O", "fair", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "--loglevel=INFO"]
    spec = importlib.util.spec_from_file_location("celery_app", HOSTS / "celery_app.py")
    assert spec is not None and spec.loader is not None
    celery_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(celery_app)
    app = celery_app.make_app(str(queue))  # the worker's configuration, without its task module

    def send(tags: Sequence[str]) -> Callable[[List[str]], None]:
        for tag in tags:
            app.send_task(celery_app.TASK, args=(tag,))
        return lambda held: None

    with running(argv, env, log) as proc:
        _every_worker_reports(sink, proc.pid, log, send)


def _every_worker_reports(sink: Sink, pid: int, log: Path, submit: Callable[[Sequence[str]], Callable[[List[str]], None]]) -> None:
    """ROUNDS times, ``submit`` one job per worker and hold them all at once; then check reports and descriptors.

    ``submit(tags)`` starts the jobs and returns a check to run on what the
    held workers said, once they are let go.
    """
    master = _master_started(sink, pid, log)
    workers = _all_workers_up(master, log)
    held_in_all: List[str] = []
    for round_number in range(ROUNDS):
        tags = [f"job-{round_number}-{i}" for i in range(WORKERS)]
        check = submit(tags)
        held = sink.hold_one_round(log)
        check(held)
        # One job in each worker at once: every worker, each with its own pid.
        assert {int(message.split()[0]) for message in held} == workers, (held, workers)
        assert sorted(message.split()[1] for message in held) == tags, held
        held_in_all.extend(held)
    reported = [sink.receive("report of a job", log) for _ in held_in_all]
    assert sorted(reported) == sorted(held_in_all)
    assert not sink.pull.poll(0), f"an unexpected report: {sink.pull.recv_string()!r}"
    _assert_no_worker_holds_libzmq_descriptors(master, workers)


def _master_started(sink: Sink, pid: int, log: Path) -> Dict[str, object]:
    """The master's report, once its hello arrived (sent after the report was written) from the host's own pid."""
    assert sink.receive("hello from the master", log) == f"master {pid}"
    report: Dict[str, object] = json.loads(sink.report_path.read_text())
    assert report["pid"] == pid
    links = list(report["fds"].values())  # type: ignore[union-attr]
    # The master's listener (the PUB's bind) and its connections, and libzmq's eventfds and epolls.
    assert sum(link.startswith("socket:") for link in links) >= 3, links
    assert any(link == "anon_inode:[eventfd]" for link in links), links
    assert any(link == "anon_inode:[eventpoll]" for link in links), links
    return report


def _all_workers_up(report: Dict[str, object], log: Path) -> Set[int]:
    """Wait until the master has WORKERS children; returns their pids."""
    master = int(report["pid"])  # type: ignore[call-overload]
    if not wait_until(lambda: len(children_of(master)) == WORKERS, TIMEOUT):
        pytest.fail(f"the master has {len(children_of(master))} children, not {WORKERS}; log:\n{_tail(log)}")
    return set(children_of(master))


def _requests_in_parallel(base: str, tags: Sequence[str]) -> List[Tuple[threading.Thread, List[object]]]:
    """Start one GET per tag, each in a thread; returns (thread, [its answer or exception])."""

    def get(tag: str, out: List[object]) -> None:
        try:
            with urllib.request.urlopen(f"{base}/{tag}", timeout=TIMEOUT) as response:
                out.append(response.read().decode())
        except BaseException as exc:  # noqa: BLE001 - reported by _joined
            out.append(exc)

    started = []
    for tag in tags:
        out: List[object] = []
        thread = threading.Thread(target=get, args=(tag, out), name=f"client-{tag}", daemon=True)
        thread.start()
        started.append((thread, out))
    return started


def _joined(started: List[Tuple[threading.Thread, List[object]]], log: Path) -> List[str]:
    answers = []
    for thread, out in started:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), f"{thread.name} got no answer within {TIMEOUT}s"
        if not (out and isinstance(out[0], str)):
            pytest.fail(f"{thread.name} failed: {out!r}; log:\n{_tail(log)}")
        answers.append(out[0])
    return answers


# ---- descriptors ------------------------------------------------------------------------------------------

_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
_KCMP_FILE = 0


def _same_open_file(pid1: int, fd1: int, pid2: int, fd2: int) -> Optional[bool]:
    """Whether two processes' descriptors are the same open file description (kcmp(2)); None if kcmp is unavailable."""
    if _KCMP is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(_KCMP, pid1, pid2, _KCMP_FILE, fd1, fd2)
    if result == 0:
        return True
    if result > 0:
        return False
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM, errno.EACCES):
        return None
    if err == errno.EBADF:
        return False  # closed meanwhile
    raise OSError(err, f"kcmp({pid1}, {pid2}, KCMP_FILE, {fd1}, {fd2})")


def _fd_links(pid: int) -> Dict[int, str]:
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return found


def _assert_no_worker_holds_libzmq_descriptors(master: Dict[str, object], workers: Set[int]) -> None:
    """No worker has any of the master's libzmq descriptors open (kcmp), nor any of its libzmq sockets (inode)."""
    master_pid = int(master["pid"])  # type: ignore[call-overload]
    recorded = {int(fd): link for fd, link in master["fds"].items()}  # type: ignore[union-attr]
    now = _fd_links(master_pid)
    # The master still has each of them (no number was closed and reused since the report).
    assert all(now.get(fd) == link for fd, link in recorded.items()), (recorded, now)
    master_sockets = {link for link in recorded.values() if link.startswith("socket:")}
    unchecked = []
    for worker in sorted(workers):
        links = _fd_links(worker)
        held_sockets = sorted(link for link in links.values() if link in master_sockets)
        assert not held_sockets, f"worker {worker} holds the master's libzmq sockets {held_sockets}"
        # The comparison sees descriptions the workers do share with the master: its standard error.
        shared = _same_open_file(master_pid, 2, worker, 2)
        if shared is None:
            unchecked.append(worker)
            continue
        assert shared, "kcmp does not see the standard error the master shares with its workers"
        held = [(mfd, recorded[mfd], wfd) for mfd in recorded for wfd in links
                if _same_open_file(master_pid, mfd, worker, wfd)]
        assert not held, f"worker {worker} holds the master's libzmq descriptors (master fd, what, worker fd): {held}"
    if unchecked:
        pytest.skip(f"sockets checked by inode; eventfds and epolls not compared: kcmp(2) unavailable here "
                    f"(workers {unchecked})")


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"
