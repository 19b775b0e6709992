"""zmq.auth across fork: an authenticator started on a zmqfork context keeps deciding in a forked child.

The parent starts a ThreadAuthenticator (or an AsyncioAuthenticator) that
accepts one PLAIN user or one CURVE client certificate.  In a child of each
fork kind, a server made there must accept exactly that client and refuse
another: the child's authenticator is the parent's, started again with its
configuration.  Each handshake is decided by the client's monitor events, so
no test waits for something not to happen.
"""

from __future__ import annotations

import asyncio
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import zmq as pyzmq
import zmq.auth
import zmq.utils.monitor
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.thread import ThreadAuthenticator

import zmqfork
import zmqfork.asyncio
from forking import FORK_KINDS, run_in_child

TIMEOUT_MS = 10_000
DECISIONS = (
    pyzmq.EVENT_HANDSHAKE_SUCCEEDED
    | pyzmq.EVENT_HANDSHAKE_FAILED_AUTH
    | pyzmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | pyzmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)

Options = Dict[int, Any]


#: epoll_wait, epoll_pwait, epoll_pwait2 (x86_64) and epoll_pwait (aarch64), as /proc/<tid>/syscall numbers them.
_EPOLL_WAITS = {"x86_64": {232, 281, 441}, "aarch64": {22, 441}}


def wait_until_idle_in_its_loop(thread: threading.Thread) -> None:
    """Return once ``thread`` sleeps in its event loop's epoll wait, holding and wanting no GIL.

    A fork from C (libc through ctypes, a raw clone) skips CPython's own
    after-fork reset of the GIL: if another Python thread was waiting for
    the GIL at that instant, the child can hang on it (README, Limits).
    The authenticator's thread waits for the GIL only for a moment after
    each request, so the parent forks once it is back in its loop.
    """
    path = f"/proc/self/task/{thread.native_id}/syscall"
    waits = _EPOLL_WAITS[platform.machine()]
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        with open(path) as handle:
            call = handle.read().split(maxsplit=1)[:1]
        if call and call[0].isdigit() and int(call[0]) in waits:
            return
        assert time.monotonic() < deadline, f"the authenticator's thread never went back to its loop ({call})"
        time.sleep(0.001)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """A CURVE server key pair, an allowed client (its public certificate in a directory) and an unknown client."""
    base = tmp_path_factory.mktemp("certs")
    allowed_dir = base / "allowed"
    allowed_dir.mkdir()
    public_file, secret_file = zmq.auth.create_certificates(str(base), "client")
    os.replace(public_file, allowed_dir / Path(public_file).name)
    client_public, client_secret = zmq.auth.load_certificate(secret_file)
    server_public, server_secret = pyzmq.curve_keypair()
    stranger_public, stranger_secret = pyzmq.curve_keypair()
    return {
        "location": str(allowed_dir),
        "server": {pyzmq.CURVE_SERVER: 1, pyzmq.CURVE_PUBLICKEY: server_public, pyzmq.CURVE_SECRETKEY: server_secret},
        "allowed": {pyzmq.CURVE_SERVERKEY: server_public, pyzmq.CURVE_PUBLICKEY: client_public,
                    pyzmq.CURVE_SECRETKEY: client_secret},
        "stranger": {pyzmq.CURVE_SERVERKEY: server_public, pyzmq.CURVE_PUBLICKEY: stranger_public,
                     pyzmq.CURVE_SECRETKEY: stranger_secret},
    }


def cases(mechanism: str, keys: Dict[str, Any]) -> Tuple[Options, Options, Options]:
    """Server options, an allowed client's and a refused client's."""
    if mechanism == "plain":
        server: Options = {pyzmq.PLAIN_SERVER: 1}
        return server, {pyzmq.PLAIN_USERNAME: b"admin", pyzmq.PLAIN_PASSWORD: b"secret"}, {
            pyzmq.PLAIN_USERNAME: b"admin", pyzmq.PLAIN_PASSWORD: b"wrong"}
    return keys["server"], keys["allowed"], keys["stranger"]


def configure(auth: Any, mechanism: str, keys: Dict[str, Any]) -> None:
    auth.allow("127.0.0.1")
    if mechanism == "plain":
        auth.configure_plain(domain="*", passwords={"admin": "secret"})
    else:
        auth.configure_curve(domain="*", location=keys["location"])


def start_handshake(ctx: Any, server_options: Options, client_options: Options) -> Tuple[List[Any], Any]:
    """Bind a server and connect a client with these options; returns the sockets and the client's monitor."""
    server = ctx.socket(pyzmq.PULL, socket_class=pyzmq.Socket)
    for option, value in server_options.items():
        server.set(option, value)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(pyzmq.PUSH, socket_class=pyzmq.Socket)
    for option, value in client_options.items():
        client.set(option, value)
    monitor = client.get_monitor_socket(DECISIONS)
    client.connect(f"tcp://127.0.0.1:{port}")
    return [server, client, monitor], monitor


def finish(sockets: List[Any], event: Any) -> bool:
    for sock in sockets:
        sock.close(linger=0)
    return bool(event["event"] == pyzmq.EVENT_HANDSHAKE_SUCCEEDED)


def handshake(ctx: Any, server_options: Options, client_options: Options) -> bool:
    """True if the client's handshake with a fresh server succeeded, False if it was refused."""
    sockets, monitor = start_handshake(ctx, server_options, client_options)
    if not monitor.poll(TIMEOUT_MS):
        raise AssertionError("no handshake decision: is an authenticator answering?")
    return finish(sockets, zmq.utils.monitor.recv_monitor_message(monitor))


async def handshake_in_loop(ctx: Any, server_options: Options, client_options: Options) -> bool:
    """handshake(), waiting in the running event loop (where an AsyncioAuthenticator answers)."""
    sockets, monitor = start_handshake(ctx, server_options, client_options)  # the monitor is awaitable here
    try:
        message = await asyncio.wait_for(monitor.recv_multipart(), TIMEOUT_MS / 1000)
    except asyncio.TimeoutError:
        raise AssertionError("no handshake decision: is an authenticator answering?") from None
    return finish(sockets, zmq.utils.monitor.parse_monitor_message(message))


@pytest.fixture
def thread_auth(request: pytest.FixtureRequest) -> Iterator[Tuple[zmqfork.Context, ThreadAuthenticator]]:
    ctx = zmqfork.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    yield ctx, auth
    auth.stop()
    ctx.destroy(linger=0)


@pytest.mark.parametrize("kind", FORK_KINDS)
@pytest.mark.parametrize("mechanism", ["plain", "curve"])
def test_thread_authenticator_decides_in_a_child(
    thread_auth: Tuple[zmqfork.Context, ThreadAuthenticator], keys: Dict[str, Any], mechanism: str, kind: str
) -> None:
    """A ThreadAuthenticator's configuration holds in a child: the allowed client is accepted, the other refused."""
    ctx, auth = thread_auth
    configure(auth, mechanism, keys)
    server, allowed, refused = cases(mechanism, keys)
    assert (handshake(ctx, server, allowed), handshake(ctx, server, refused)) == (True, False)

    def child() -> Tuple[bool, bool, bool]:
        decided = handshake(ctx, server, allowed), handshake(ctx, server, refused)
        return (*decided, auth.is_alive())

    wait_until_idle_in_its_loop(auth.thread)
    assert run_in_child(child, kind=kind) == (True, False, True)
    assert (handshake(ctx, server, allowed), handshake(ctx, server, refused)) == (True, False)


@pytest.mark.parametrize("kind", FORK_KINDS)
def test_stopping_an_inherited_authenticator_in_a_child(
    thread_auth: Tuple[zmqfork.Context, ThreadAuthenticator], kind: str
) -> None:
    """stop() on the parent's ThreadAuthenticator, as a child's first call, finds nothing to stop and returns."""
    ctx, auth = thread_auth

    def child() -> Tuple[bool, bool]:
        auth.stop()
        return auth.is_alive(), auth.pipe is None

    wait_until_idle_in_its_loop(auth.thread)
    assert run_in_child(child, kind=kind) == (False, True)
    assert auth.is_alive()


@pytest.mark.parametrize("kind", FORK_KINDS)
@pytest.mark.parametrize("mechanism", ["plain", "curve"])
def test_asyncio_authenticator_decides_in_a_child(keys: Dict[str, Any], mechanism: str, kind: str) -> None:
    """An AsyncioAuthenticator started in the parent answers in the child's event loop, with its configuration."""
    ctx = zmqfork.asyncio.Context()
    server, allowed, refused = cases(mechanism, keys)

    def child() -> Tuple[bool, bool]:
        async def decide() -> Tuple[bool, bool]:
            return await handshake_in_loop(ctx, server, allowed), await handshake_in_loop(ctx, server, refused)

        return asyncio.run(decide())

    kept: List[AsyncioAuthenticator] = []  # an application keeps its authenticator: zmqfork holds it weakly

    async def parent() -> Tuple[bool, bool]:
        auth = AsyncioAuthenticator(ctx)
        kept.append(auth)
        auth.start()
        configure(auth, mechanism, keys)
        return await handshake_in_loop(ctx, server, allowed), await handshake_in_loop(ctx, server, refused)

    try:
        # The loop ends (and its authenticator task with it), but the authenticator is still started:
        # the child, forked with no other Python thread running, starts it again in its own loop.
        assert asyncio.run(parent()) == (True, False)
        assert run_in_child(child, kind=kind) == (True, False)
    finally:
        ctx.destroy(linger=0)
