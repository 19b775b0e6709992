"""A child of a raw fork closes what it inherited, opens its own descriptors on the same numbers, then touches zmqfork.

    raw_fork_reuse.py PARENT   (PARENT: "alive" waits for the child; "gone" exits first)

The parent holds libzmq descriptors (a context with a tcp pair).  The child
(raw clone: no atfork handler runs) closes every inherited descriptor but
0-2, daemon style, and opens a file, a socketpair, an eventfd, an epoll and a
pipe until it has covered every number libzmq had.  Its first zmqfork call
runs the deferred cleanup, which must close none of them.  With PARENT=gone
the cleanup runs after the parent exited (no kcmp against it).  The child
prints one JSON line on stdout and exits 0; the parent exits 0.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import sys
import tempfile

import zmqfork
from forking import fork_with, open_fds, wait_child


def libzmq_descriptors(ctx: zmqfork.Context) -> list:
    """Open a tcp pair in ctx with one message through; the descriptors libzmq made for it."""
    before = open_fds()
    pull = ctx.socket(zmqfork.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmqfork.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send(b"ping")
    assert pull.poll(10000) and pull.recv() == b"ping"
    return sorted(open_fds() - before - {max(before | open_fds()) + 1})


def child(mode: str, exited: int, theirs: list, workdir: str) -> dict:
    if mode == "gone":  # the parent's exit closes the pipe's last write end: EOF here
        ready, _, _ = select.select([exited], [], [], 20)
        assert ready and os.read(exited, 1) == b"", "the parent did not exit"
    os.closerange(3, 65536)
    mine: dict = {}
    kinds = ["file", "socketpair", "eventfd", "epoll", "pipe"]
    keep = []
    while not set(theirs) <= set(mine):
        kind = kinds[len(keep) % len(kinds)]
        if kind == "file":
            handle = open(os.path.join(workdir, f"f{len(keep)}"), "w+b")
            handle.write(b"mine")
            handle.flush()
            keep.append(handle)
            mine[handle.fileno()] = kind
        elif kind == "socketpair":
            pair = socket.socketpair()
            keep.append(pair)
            for sock in pair:
                mine[sock.fileno()] = kind
        elif kind == "eventfd":
            fd = os.eventfd(0)
            keep.append(fd)
            mine[fd] = kind
        elif kind == "epoll":
            ep = select.epoll()
            keep.append(ep)
            mine[ep.fileno()] = kind
        else:
            rd, wr = os.pipe()
            keep.append((rd, wr))
            mine[rd] = mine[wr] = kind
    generation = zmqfork.generation()  # the first zmqfork call: the deferred cleanup runs here
    broken = []
    for item in keep:
        try:
            if isinstance(item, int):
                os.eventfd_write(item, 2)
                assert os.eventfd_read(item) == 2
            elif isinstance(item, tuple) and isinstance(item[0], socket.socket):
                item[0].sendall(b"x")
                assert item[1].recv(1) == b"x"
            elif isinstance(item, tuple):
                os.write(item[1], b"y")
                assert os.read(item[0], 1) == b"y"
            elif isinstance(item, select.epoll):
                item.poll(0)
            else:
                item.seek(0)
                assert item.read() == b"mine"
        except OSError as exc:
            broken.append(repr(exc))
    state = zmqfork.detection()
    return {"covered": sorted(set(theirs) & set(mine)), "broken": broken, "generation_changed": generation != 0,
            "untracked": state.fds_untracked}


def main() -> None:
    mode = sys.argv[1]
    ctx = zmqfork.Context()
    theirs = libzmq_descriptors(ctx)
    exited, alive = os.pipe()
    with tempfile.TemporaryDirectory() as workdir:
        pid = fork_with("raw")
        if pid == 0:
            code = 1
            try:
                os.close(alive)
                print(json.dumps(child(mode, exited, theirs, workdir)), flush=True)
                if mode == "gone":  # the parent left without removing it
                    shutil.rmtree(workdir, ignore_errors=True)
                code = 0
            finally:
                os._exit(code)
        if mode == "gone":
            os._exit(0)  # the child reports on the stdout it shares
        status = wait_child(pid, 30)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    ctx.destroy(linger=0)


if __name__ == "__main__":
    main()
