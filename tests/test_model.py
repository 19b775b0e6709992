"""Model-based: random socket operations interleaved with forks; in each child the proxy behaves as a fresh socket built from the same recipe.

Every operation is applied to the zmqfork socket and to a plain pyzmq socket
of the same type (in a context of its own); both must succeed or fail alike,
and only what succeeded enters the model.  At each fork, the child checks its
proxy against the model under the socket's ``on_fork`` policy: its options
equal those of a fresh pyzmq socket given the model's options; it starts with
no message; it is connected to exactly the model's endpoints (as many times as
the model says) and bound to its inproc endpoints; a SUB has exactly the
model's subscriptions; binds to tcp raise InheritedBindError or are made
again; under "close" the socket is closed.

Not run by default (set ZMQFORK_MODEL=1): terminating the contexts after
such random sequences crashes libzmq 4.3.5's reaper thread (SIGSEGV in
zmq_ctx_term) in about one run in two, with plain pyzmq as with zmqfork and
without any fork; until that is isolated, the crash takes pytest down with it.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import pytest
import zmq as pyzmq
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import zmqfork as zmq
from forking import FORK_KINDS, run_in_child
from reliability import count

TYPES = {"PUSH": zmq.PUSH, "PULL": zmq.PULL, "SUB": zmq.SUB}
# Endpoint names; each example prefixes the inproc ones with its own number.
CONNECT_TO = [f"inproc://connect-{n}" for n in range(3)]
BIND_TO = ["inproc://bound-0", "inproc://bound-1", "tcp://127.0.0.1:*"]
TOPICS = [b"a", b"ab", b"b"]
OPTIONS = {
    zmq.LINGER: st.integers(-3, 3000),  # below -1: EINVAL
    zmq.SNDHWM: st.integers(-2, 2000),
    zmq.RCVHWM: st.integers(-2, 2000),
    zmq.RCVTIMEO: st.integers(-1, 5000),
    zmq.SNDTIMEO: st.integers(-1, 5000),
    zmq.RECONNECT_IVL: st.integers(-1, 1000),
    zmq.MAXMSGSIZE: st.integers(-1, 1 << 20),
    zmq.ROUTING_ID: st.binary(min_size=0, max_size=4),
}
READABLE = [option for option in OPTIONS]
PEER_TIMEOUT_MS = 5_000


_examples = [0]


def outcome(call: Any) -> Tuple[Optional[type], Optional[int]]:
    """(exception type, errno) of ``call()``, or (None, None) if it succeeded."""
    try:
        call()
    except (pyzmq.ZMQError, TypeError, ValueError) as exc:
        return type(exc), getattr(exc, "errno", None)
    return None, None


class ForkModel(RuleBasedStateMachine):
    """One zmqfork socket, its plain pyzmq twin, and the model of what a child must rebuild."""

    @initialize(name=st.sampled_from(sorted(TYPES)), policy=st.sampled_from(zmq.POLICIES))
    def make(self, name: str, policy: str) -> None:
        self.type = TYPES[name]
        self.policy = policy
        _examples[0] += 1
        self.prefix = f"inproc://model-{_examples[0]}-"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(self.type, on_fork=policy)
        self.twin_ctx = pyzmq.Context()
        self.twin = self.twin_ctx.socket(self.type)
        self.options: Dict[int, Any] = {}
        self.subscriptions: Counter[bytes] = Counter()
        self.connects: Counter[str] = Counter()
        self.binds: List[Tuple[str, str]] = []  # (endpoint, what the parent got)
        self.forks = 0

    def teardown(self) -> None:
        if hasattr(self, "sock"):
            self.ctx.destroy(linger=0)
            self.twin_ctx.destroy(linger=0)

    def name(self, endpoint: str) -> str:
        """This example's own name for ``endpoint``."""
        return endpoint.replace("inproc://", self.prefix, 1) if endpoint.startswith("inproc://") and endpoint != "inproc://" else endpoint

    def both(self, call: Any) -> bool:
        """Apply ``call`` to the proxy and the twin; they must agree; True if it succeeded."""
        mine = outcome(lambda: call(self.sock))
        theirs = outcome(lambda: call(self.twin))
        assert mine == theirs
        return mine == (None, None)

    # ---- operations -------------------------------------------------------

    @rule(data=st.data(), option=st.sampled_from(sorted(OPTIONS)))
    def set_option(self, data: st.DataObject, option: int) -> None:
        value = data.draw(OPTIONS[option])
        if self.both(lambda s: s.set(option, value)):
            self.options[option] = value

    @precondition(lambda self: self.type == zmq.SUB)
    @rule(topic=st.sampled_from(TOPICS), subscribe=st.booleans())
    def subscription(self, topic: bytes, subscribe: bool) -> None:
        option = zmq.SUBSCRIBE if subscribe else zmq.UNSUBSCRIBE
        assert self.both(lambda s: s.set(option, topic))
        if subscribe:
            self.subscriptions[topic] += 1
        elif self.subscriptions[topic]:
            self.subscriptions[topic] -= 1

    @rule(endpoint=st.sampled_from([*CONNECT_TO, "inproc://", "bogus://x"]))
    def connect(self, endpoint: str) -> None:
        endpoint = self.name(endpoint)
        if self.both(lambda s: s.connect(endpoint)):
            self.connects[endpoint] += 1

    @rule(endpoint=st.sampled_from(CONNECT_TO))
    def disconnect(self, endpoint: str) -> None:
        endpoint = self.name(endpoint)
        if self.both(lambda s: s.disconnect(endpoint)):
            del self.connects[endpoint]  # libzmq drops every connection to the endpoint

    @rule(endpoint=st.sampled_from(BIND_TO))
    def bind(self, endpoint: str) -> None:
        endpoint = self.name(endpoint)
        if self.both(lambda s: s.bind(endpoint)):
            self.binds.append((endpoint, self.sock.last_endpoint.decode()))

    @rule(endpoint=st.sampled_from(BIND_TO[:2]))
    def unbind(self, endpoint: str) -> None:
        endpoint = self.name(endpoint)
        if self.both(lambda s: s.unbind(endpoint)):
            self.binds = [bound for bound in self.binds if bound[0] != endpoint]

    @precondition(lambda self: self.type == zmq.PUSH)
    @rule()
    def send(self) -> None:
        # Queued in the parent (nobody reads): must never reach a child's peer.
        outcome(lambda: self.sock.send(b"from the parent", zmq.NOBLOCK))

    @precondition(lambda self: self.type != zmq.PUSH)
    @rule()
    def receive(self) -> None:
        with pytest.raises(zmq.Again):
            self.sock.recv(zmq.NOBLOCK)

    @invariant()
    def parent_options_match(self) -> None:
        if hasattr(self, "sock"):
            for option, value in self.options.items():
                assert self.sock.get(option) == value

    # ---- the fork -----------------------------------------------------------

    @rule(kind=st.sampled_from(FORK_KINDS))
    def fork(self, kind: str) -> None:
        self.forks += 1
        tcp_bound = [got for endpoint, got in self.binds if not endpoint.startswith("inproc://")]
        found = run_in_child(self.child_check, kind=kind, timeout=30)
        if self.policy == "close":
            assert found == ("closed", zmq.ENOTSOCK)
        elif self.policy == "reconnect" and tcp_bound:
            assert found == ("InheritedBindError", tuple(tcp_bound))
        else:
            options, reference, report = found
            assert options == reference
            assert report == self.expected_traffic()

    def expected_traffic(self) -> Dict[str, Any]:
        inproc_bound = [endpoint for endpoint, _ in self.binds if endpoint.startswith("inproc://")]
        pipes = Counter(self.connects) + Counter(inproc_bound)
        if self.type == zmq.SUB:
            topics = sorted(topic for topic, n in self.subscriptions.items() if n)
            return {endpoint: sorted(topics * n) for endpoint, n in sorted(pipes.items())}
        return {endpoint: n for endpoint, n in sorted(pipes.items())}

    def child_check(self) -> Any:
        """Runs in the child: what the proxy shows, and what a fresh socket built from the model shows."""
        sock = self.sock
        if self.policy == "close":
            closed = sock.closed
            try:
                sock.send(b"x")
            except zmq.ZMQError as exc:
                return ("closed" if closed else "open", exc.errno)
            return ("sent", 0)
        try:
            options = {option: sock.get(option) for option in READABLE}
        except zmq.InheritedBindError as exc:
            return (type(exc).__name__, exc.endpoints)
        fresh_ctx = pyzmq.Context()
        fresh = fresh_ctx.socket(self.type)
        for option, value in self.options.items():
            fresh.set(option, value)
        reference = {option: fresh.get(option) for option in READABLE}
        report = self.child_traffic()
        return options, reference, report  # and no term: see the module docstring

    def child_traffic(self) -> Dict[str, Any]:
        """Peers on every endpoint the proxy might know: which ones is it really attached to, and how often?"""
        sock, ctx = self.sock, self.ctx
        if self.type != zmq.PUSH:
            try:
                sock.recv(zmq.NOBLOCK)
                raise AssertionError("the child's socket received something the parent had queued")
            except zmq.Again:
                pass
        peer_type = {zmq.PUSH: zmq.PULL, zmq.PULL: zmq.PUSH, zmq.SUB: zmq.XPUB}[self.type]
        peers = {}
        for endpoint in map(self.name, CONNECT_TO):
            peer = ctx.socket(peer_type)
            peer.rcvtimeo = PEER_TIMEOUT_MS
            peer.sndtimeo = PEER_TIMEOUT_MS
            if peer_type == zmq.XPUB:
                peer.xpub_verbose = 1
            peer.bind(endpoint)
            peers[endpoint] = peer
        for endpoint, _ in self.binds:
            if endpoint.startswith("inproc://"):
                peer = ctx.socket(peer_type)
                peer.rcvtimeo = PEER_TIMEOUT_MS
                if peer_type == zmq.XPUB:
                    peer.xpub_verbose = 1
                peer.connect(endpoint)
                peers[endpoint] = peer
        sock.get(zmq.EVENTS)  # let the proxy process the attach commands of its peers
        expected = self.expected_traffic()
        seen: Dict[str, Any] = {}
        if self.type == zmq.PUSH:
            sock.sndtimeo = PEER_TIMEOUT_MS
            for _ in range(sum(expected.values())):
                sock.send(b"from the child")
            for endpoint, peer in peers.items():
                got = 0
                for _ in range(expected.get(endpoint, 0)):
                    assert peer.recv() == b"from the child"
                    got += 1
                got += _drain(peer)
                if got:
                    seen[endpoint] = got
        elif self.type == zmq.PULL:
            # Peers not expected to reach the proxy send first: a wrong pipe would deliver before the right ones.
            order = sorted(peers, key=lambda endpoint: endpoint in expected)
            for endpoint in order:
                for _ in range(max(1, expected.get(endpoint, 1))):
                    if endpoint in expected:
                        peers[endpoint].send(endpoint.encode())
                    else:  # no pipe, so Again, unless the proxy is wrongly attached
                        outcome(lambda: peers[endpoint].send(endpoint.encode(), zmq.NOBLOCK))
            sock.rcvtimeo = PEER_TIMEOUT_MS
            for _ in range(sum(expected.values())):
                endpoint = sock.recv().decode()
                seen[endpoint] = seen.get(endpoint, 0) + 1
            extra = _drain(sock)
            if extra:
                seen["extra"] = extra
        else:  # SUB: each attached pipe announces the whole subscription set to its XPUB
            for endpoint, peer in peers.items():
                topics = []
                for _ in range(len(expected.get(endpoint, []))):
                    message = peer.recv()
                    assert message[:1] == b"\x01", message
                    topics.append(message[1:])
                while True:
                    try:
                        topics.append(peer.recv(zmq.NOBLOCK)[1:])
                    except zmq.Again:
                        break
                if endpoint in expected or topics:
                    seen[endpoint] = sorted(topics)
        return dict(sorted(seen.items()))


def _drain(sock: zmq.Socket) -> int:
    got = 0
    while True:
        try:
            sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return got
        got += 1


ForkModel.TestCase.settings = settings(
    max_examples=count("MODEL_EXAMPLES", 100),
    stateful_step_count=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestForkModel = pytest.mark.skipif(
    not os.environ.get("ZMQFORK_MODEL"),
    reason="ZMQFORK_MODEL unset: libzmq 4.3.5 crashes in zmq_ctx_term after some of these sequences (see docstring)",
)(ForkModel.TestCase)

