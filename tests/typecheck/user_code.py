"""User code written against ``import zmqfork as zmq``: CI checks it with ``mypy --strict``.

It must type-check exactly as the same code against pyzmq does, plus
zmqfork's own names.  It is never run by the tests (it would bind ports).
"""

from __future__ import annotations

import asyncio
import copy
from typing import List, Tuple

import zmqfork as zmq
import zmqfork.asyncio


def sync_app() -> Tuple[bytes, List[bytes]]:
    ctx = zmq.Context(io_threads=1, on_fork="rebind")
    shared = zmq.Context.instance()
    push: zmq.Socket[bytes] = ctx.socket(zmq.PUSH, on_fork="reconnect")
    pull = ctx.socket(zmq.PULL)
    port: int = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    push.linger = 0
    push.send(b"one")
    push.send_multipart([b"a", b"b"])
    push.send_json({"n": 1})
    push.send_string("text")
    first: bytes = pull.recv()
    parts: List[bytes] = pull.recv_multipart()
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    events = dict(poller.poll(1000))
    readable, _, _ = zmq.select([pull], [], [], 1.0)
    assert pull in events or pull in readable
    twin = copy.copy(push)
    shadow: zmq.Socket[bytes] = zmq.Socket.shadow(push.underlying)
    try:
        zmq.proxy(pull, push)
    except zmq.InheritedBindError as bind_error:
        endpoints: Tuple[str, ...] = bind_error.endpoints
        assert endpoints
    except zmq.ZMQError as exc:
        errno = exc.errno
        assert errno is None or errno > 0
    zmq.register_at_fork(after_in_child=lambda: None)
    noticed: bool = zmq.check_fork()
    assert isinstance(noticed, bool) and zmq.generation() > 0 and zmq.detection().atfork
    zmq.patch()
    zmq.unpatch()
    for sock in (push, pull, twin, shadow):
        sock.close(linger=0)
    ctx.term()
    shared.destroy()
    return first, parts


async def async_app() -> bytes:
    ctx = zmqfork.asyncio.Context(on_fork="close")
    sock = ctx.socket(zmq.PULL)
    sock.bind("inproc://typed")
    poller = zmqfork.asyncio.Poller()
    poller.register(sock, zmq.POLLIN)
    await poller.poll(10)
    message: bytes = await sock.recv()
    ctx.destroy()
    return message


if __name__ == "__main__":
    asyncio.run(async_app())
