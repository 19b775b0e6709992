"""zmqfork.Poller and select: pyzmq's poller, handed the sockets of the current process generation."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import zmq

from zmqfork.socket import Socket

__all__ = ["Poller", "select"]


class Poller(zmq.Poller):
    """A ``zmq.Poller`` that accepts zmqfork sockets, pyzmq sockets and plain fds.

    ``poll()`` answers with the objects that were registered: a zmqfork socket
    rebuilt in a forked child is still reported as itself.
    """

    def poll(self, timeout: Optional[float] = None) -> List[Tuple[Any, int]]:
        """Wait up to ``timeout`` milliseconds (None: forever) for events; see ``zmq.Poller.poll``."""
        if timeout is None or timeout < 0:
            timeout = -1
        items: List[Tuple[Any, int]] = []
        proxies: Dict[int, Socket] = {}
        for obj, flags in self.sockets:
            if isinstance(obj, Socket):
                live = obj._live()
                proxies[id(live)] = obj
                items.append((live, flags))
            else:
                items.append((obj, flags))
        events = zmq.zmq_poll(items, timeout=int(timeout))
        return [(proxies.get(id(obj), obj), mask) for obj, mask in events]


def select(
    rlist: Sequence[Any], wlist: Sequence[Any], xlist: Sequence[Any], timeout: Optional[float] = None
) -> Tuple[List[Any], List[Any], List[Any]]:
    """``zmq.select`` for zmqfork sockets too: ``timeout`` in seconds, None waits forever."""
    poller = Poller()
    for obj in {*rlist, *wlist, *xlist}:
        flags = (
            (zmq.POLLIN if obj in rlist else 0)
            | (zmq.POLLOUT if obj in wlist else 0)
            | (zmq.POLLERR if obj in xlist else 0)
        )
        poller.register(obj, flags)
    events = poller.poll(None if timeout is None else int(timeout * 1000))
    readable = [obj for obj, mask in events if mask & zmq.POLLIN]
    writable = [obj for obj, mask in events if mask & zmq.POLLOUT]
    errored = [obj for obj, mask in events if mask & zmq.POLLERR]
    return readable, writable, errored
