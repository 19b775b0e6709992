"""The recipe of a socket: what was done to it, in order, so a forked child can do it again.

Only calls that succeeded are recorded, so nothing that failed in the parent
is replayed.  The recipe stays bounded: an option set again before the next
endpoint step or filter replaces the earlier value (every filter is kept, as
libzmq adds each to a list), an unsubscribe cancels its subscribe, an unbind
or a disconnect what libzmq ended, a ``monitor(None)`` the monitor.
"""

from __future__ import annotations

import re
from typing import Any, Callable, List, NamedTuple, Optional

import zmq
from zmq.backend import Socket as _BackendSocket

from zmqfork.errors import RebuildError

__all__ = ["Step", "SocketRecipe", "SECRET_OPTIONS"]

#: Options whose values never appear in a repr, a log line or an error.
SECRET_OPTIONS = frozenset({zmq.CURVE_SECRETKEY, zmq.PLAIN_PASSWORD})

# Options whose every set adds to a list of filters (a peer must match one).  libzmq reads an accept
# filter's text as the IPV6 option says at that moment, so a filter also keeps its place among the sets.
_FILTER_OPTIONS = frozenset({zmq.TCP_ACCEPT_FILTER, zmq.IPC_FILTER_PID, zmq.IPC_FILTER_UID, zmq.IPC_FILTER_GID})
# Options that add up rather than replace: every set counts.
_CUMULATIVE_OPTIONS = frozenset({zmq.SUBSCRIBE, zmq.UNSUBSCRIBE}) | _FILTER_OPTIONS


class Step(NamedTuple):
    """One recorded call: ``kind`` is "set", "connect", "bind", "monitor", "join"."""

    kind: str
    option: int = 0
    value: Any = None
    endpoint: str = ""
    #: For binds: the endpoint the parent actually got (wildcards resolved).
    resolved: str = ""

    def describe(self) -> str:
        """A human-readable form that never shows a secret value."""
        if self.kind == "set":
            name = _option_name(self.option)
            shown = "<hidden>" if self.option in SECRET_OPTIONS else repr(self.value)
            return f"set({name}, {shown})"
        if self.kind == "monitor":
            return f"monitor({self.endpoint!r}, events={self.value})"
        if self.kind == "join":
            return f"join({self.value!r})"
        return f"{self.kind}({self.endpoint!r})"

    def __repr__(self) -> str:
        return self.describe()


def _is_inproc(step: Step) -> bool:
    return step.endpoint.startswith("inproc://")


def _filed_under(step: Step, key: str) -> bool:
    """Whether libzmq files ``step`` (a bind or a connect) under ``key``."""
    return (step.kind == "bind" and step.resolved == key) or (step.kind == "connect" and step.endpoint == key)


def _tcp_resolution(endpoint: str, ipv6: bool) -> Optional[str]:
    """``tcp://host:port`` as libzmq resolves a connect's (first address; IPv4 mapped under ipv6), or None."""
    import socket  # only for an unbind or disconnect spelled unlike what it ends

    host, sep, port_text = endpoint[len("tcp://"):].rpartition(":")
    digits = re.match(r"\s*[+-]?\d+", port_text)  # libzmq reads the port with atoi() into 16 bits
    port = int(digits.group()) & 0xFFFF if digits else 0
    if not sep or not port or ";" in host:
        return None
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    try:
        found = socket.getaddrinfo(host.strip("[]"), port, family, socket.SOCK_STREAM, 0,
                                   socket.AI_NUMERICSERV | (socket.AI_V4MAPPED if ipv6 else 0))
    except (OSError, UnicodeError):
        return None
    address = found[0][4][0] if found else None
    if address is None:
        return None
    return f"tcp://[{address}]:{port}" if family == socket.AF_INET6 else f"tcp://{address}:{port}"


def _option_name(option: int) -> str:
    try:
        return f"zmq.{zmq.SocketOption(option).name}"
    except ValueError:
        return str(option)


class SocketRecipe:
    """The ordered, compacted list of steps that rebuilds a socket."""

    def __init__(self) -> None:
        self.steps: List[Step] = []

    def __repr__(self) -> str:
        return f"SocketRecipe({self.steps!r})"

    # ---- recording -------------------------------------------------------

    def record_option(self, option: int, value: Any) -> None:
        """Record a successful ``setsockopt``."""
        if option == zmq.UNSUBSCRIBE and self._cancel(Step("set", zmq.SUBSCRIBE, value)):
            return
        if option not in _CUMULATIVE_OPTIONS:
            # Replace an earlier value set since the last endpoint step or filter.
            for index in range(len(self.steps) - 1, -1, -1):
                step = self.steps[index]
                if step.kind != "set" or step.option in _FILTER_OPTIONS:
                    break
                if step.option == option:
                    del self.steps[index]
                    break
        self.steps.append(Step("set", option, value))

    def record_connect(self, endpoint: str) -> None:
        """Record a successful ``connect``."""
        self.steps.append(Step("connect", endpoint=endpoint))

    def record_bind(self, endpoint: str, resolved: str) -> None:
        """Record a successful ``bind`` of ``endpoint`` that the system resolved to ``resolved``."""
        self.steps.append(Step("bind", endpoint=endpoint, resolved=resolved or endpoint))

    def record_end(self, endpoint: str, *, ipv6: bool = False) -> None:
        """Record a successful ``unbind`` or ``disconnect``: in libzmq, one call that ends an endpoint.

        libzmq files a bind under the endpoint it got (``resolved``) and a
        connect under the endpoint as given, and ends everything filed under
        ``endpoint`` (every connect to it, however many), else under what a
        tcp ``endpoint`` resolves to as a connect's would, with the socket's
        ``ipv6`` option (``tcp://localhost:5555`` ends a bind that got
        ``tcp://127.0.0.1:5555``).  An inproc name ends its bind, else its
        connects.
        """
        if endpoint.startswith("inproc://"):
            if not self._drop(lambda step: step.kind == "bind" and step.endpoint == endpoint):
                self._drop(lambda step: step.kind == "connect" and step.endpoint == endpoint)
            return
        if self._drop(lambda step: _filed_under(step, endpoint)) or not endpoint.startswith("tcp://"):
            return
        key = _tcp_resolution(endpoint, ipv6)
        if key is not None:
            self._drop(lambda step: _filed_under(step, key))

    def _drop(self, ended: Callable[[Step], bool]) -> bool:
        kept = [step for step in self.steps if not ended(step)]
        dropped = len(kept) != len(self.steps)
        self.steps = kept
        return dropped

    def record_monitor(self, endpoint: Optional[str], events: int) -> None:
        """Record a successful ``monitor``; ``endpoint=None`` stops monitoring."""
        self.steps = [step for step in self.steps if step.kind != "monitor"]
        if endpoint is not None:
            self.steps.append(Step("monitor", value=events, endpoint=endpoint))

    def record_join(self, group: bytes) -> None:
        """Record a successful ``join`` (DRAFT RADIO/DISH groups)."""
        self.steps.append(Step("join", value=group))

    def record_leave(self, group: bytes) -> None:
        """Record a successful ``leave``: it cancels the join."""
        self._cancel(Step("join", value=group))

    def _cancel(self, twin: Step) -> bool:
        for index in range(len(self.steps) - 1, -1, -1):
            if self.steps[index] == twin:
                del self.steps[index]
                return True
        return False

    # ---- reading ---------------------------------------------------------

    def bound_endpoints(self) -> List[str]:
        """The endpoints this socket is bound to that the parent owns, as the system resolved them.

        inproc endpoints are left out: they live in a context, and the child's
        context is its own, so binding them again takes nothing from the parent.
        """
        return [step.resolved for step in self.steps if step.kind == "bind" and not _is_inproc(step)]

    def replay(self, sock: zmq.Socket[Any], *, rebind: bool) -> None:
        """Apply every step to a fresh pyzmq socket, binds only if ``rebind``.

        Raises RebuildError naming the step that failed.
        """
        for step in self.steps:
            try:
                _apply(sock, step, rebind)
            except zmq.ZMQError as exc:
                raise RebuildError(step.describe(), exc) from None


def _apply(sock: zmq.Socket[Any], step: Step, rebind: bool) -> None:
    # pyzmq's compiled methods: a zmqfork socket replaying its own recipe must not record it again.
    kind = step.kind
    if kind == "set":
        _BackendSocket.set(sock, step.option, step.value)
    elif kind == "connect":
        _BackendSocket.connect(sock, step.endpoint)
    elif kind == "bind":
        if rebind or _is_inproc(step):
            _BackendSocket.bind(sock, step.endpoint)
    elif kind == "monitor":
        _BackendSocket.monitor(sock, step.endpoint, step.value)
    elif kind == "join":
        _BackendSocket.join(sock, step.value)
    else:  # pragma: no cover - Step kinds are closed
        raise AssertionError(f"unknown recipe step {kind!r}")
