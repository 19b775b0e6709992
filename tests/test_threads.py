"""zmqfork.foreign_threads(): the threads of this process that are neither the caller nor libzmq's."""

from __future__ import annotations

import os
import sys
import threading
from typing import Iterator, List, Tuple

import pytest

import zmqfork
from forking import FORK_KINDS, run_in_child, run_session
from reliability import wait_other_threads_idle, wait_until
from zmqfork._threads import is_libzmq_thread_name


def kernel_threads() -> List[Tuple[int, str]]:
    """Every thread of this process with its kernel name, read here independently of zmqfork."""
    found = []
    for entry in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{entry}/comm") as handle:
                found.append((int(entry), handle.read().strip()))
        except OSError:
            continue
    return found


def libzmq_tids() -> List[int]:
    return [tid for tid, name in kernel_threads() if name.startswith("ZMQbg/")]


@pytest.fixture
def libzmq_running(ctx: zmqfork.Context) -> Iterator[zmqfork.Context]:
    """A context whose I/O and reaper threads are running and have named themselves."""
    sock = ctx.socket(zmqfork.PUSH)  # the first socket starts libzmq's threads
    assert wait_until(lambda: len(libzmq_tids()) >= 2), kernel_threads()
    yield ctx
    sock.close(linger=0)


@pytest.fixture
def app_thread() -> Iterator[threading.Thread]:
    """A thread of the application's own, named ``app-worker``, waiting until the test ends."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(60,), name="app-worker", daemon=True)
    thread.start()
    yield thread
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


def test_lists_the_applications_threads_not_libzmqs_nor_the_caller(
    libzmq_running: zmqfork.Context, app_thread: threading.Thread
) -> None:
    """A thread the application started appears with its name; libzmq's threads and the calling thread do not."""
    listed = zmqfork.foreign_threads()
    assert (app_thread.native_id, "app-worker") in listed
    tids = {thread.tid for thread in listed}
    assert not tids & set(libzmq_tids()), (listed, kernel_threads())
    assert threading.get_native_id() not in tids
    # Everything else the kernel lists is there: nothing dropped but libzmq's and the caller.
    expected = {tid for tid, _ in kernel_threads()} - set(libzmq_tids()) - {threading.get_native_id()}
    assert tids == expected
    assert zmqfork.detection().foreign_threads == listed


def test_from_another_thread_the_main_thread_is_listed(libzmq_running: zmqfork.Context) -> None:
    """Called from a thread, the list holds the main thread (under its Python name) and not the caller."""
    seen: List[Tuple[int, Tuple[zmqfork.ForeignThread, ...]]] = []
    caller = threading.Thread(
        target=lambda: seen.append((threading.get_native_id(), zmqfork.foreign_threads())), name="asker"
    )
    caller.start()
    caller.join(10)
    assert seen, "the asking thread did not finish"
    caller_tid, listed = seen[0]
    assert zmqfork.ForeignThread(threading.main_thread().native_id, "MainThread") in listed
    assert caller_tid not in {thread.tid for thread in listed}


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_a_forked_child_lists_its_own_threads(
    kind: str, libzmq_running: zmqfork.Context, app_thread: threading.Thread
) -> None:
    """In a child, the list is what the child has: none of the parent's threads, then a thread it starts itself."""
    assert zmqfork.foreign_threads()  # the parent has app-worker
    sock = libzmq_running.socket(zmqfork.PUSH)

    def child() -> Tuple[object, object, object]:
        alone = zmqfork.foreign_threads()
        sock.connect("tcp://127.0.0.1:9")  # rebuilt here: the child's own libzmq threads start
        assert wait_until(lambda: len(libzmq_tids()) >= 2), kernel_threads()
        with_libzmq = zmqfork.foreign_threads()
        stop = threading.Event()
        own = threading.Thread(target=stop.wait, args=(60,), name="child-worker", daemon=True)
        own.start()
        try:
            with_own = zmqfork.foreign_threads()
            expected = (zmqfork.ForeignThread(own.native_id, "child-worker"),)
        finally:
            stop.set()
            own.join(10)
        libzmq_running.destroy(linger=0)
        return alone, with_libzmq, (with_own == expected, with_own)

    if kind == "raw":
        wait_other_threads_idle()  # a raw clone copies whatever lock a running thread holds
    alone, with_libzmq, (own_listed, with_own) = run_in_child(child, kind=kind)
    sock.close(linger=0)
    assert alone == () and with_libzmq == (), (alone, with_libzmq)
    assert own_listed, with_own


WARNING_PROBE = """
import os, sys, time, warnings
import zmqfork

ctx = zmqfork.Context()
sock = ctx.socket(zmqfork.PUSH)  # starts libzmq's I/O and reaper threads
deadline = time.monotonic() + 10
while sum(open(f"/proc/self/task/{t}/comm").read().startswith("ZMQbg/") for t in os.listdir("/proc/self/task")) < 2:
    assert time.monotonic() < deadline, "libzmq's threads did not name themselves"
    time.sleep(0.01)
listed = zmqfork.foreign_threads()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
os.waitpid(pid, 0)
print(repr(listed), any("multi-threaded" in str(w.message) for w in caught))
sock.close(linger=0)
ctx.term()
"""


def test_python_fork_warning_is_about_libzmqs_threads_alone() -> None:
    """A fresh program with a zmqfork socket: nothing listed, yet Python 3.12+ warns at os.fork() (libzmq's threads)."""
    status, out, err = run_session([sys.executable, "-c", WARNING_PROBE], timeout=60)
    assert status == 0, err
    assert out.split() == ["()", str(sys.version_info >= (3, 12))], (out, err)


@pytest.mark.parametrize(
    "name, libzmq",
    [
        ("ZMQbg/IO/0", True),
        ("ZMQbg/Reaper", True),
        ("7/ZMQbg/IO/0", True),  # a context with THREAD_NAME_PREFIX 7
        ("12345678/ZMQbg/", True),  # the longest prefix that survives the kernel's 15 bytes
        ("python", False),
        ("app-worker", False),
        ("ZMQbgx", False),
        ("my/ZMQbgx/1", False),
    ],
)
def test_libzmq_thread_names(name: str, libzmq: bool) -> None:
    """libzmq's names, with or without a context's THREAD_NAME_PREFIX, are told from others."""
    assert is_libzmq_thread_name(name) is libzmq
