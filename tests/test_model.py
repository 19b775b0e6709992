"""Model-based: random socket operations interleaved with forks; in each child the proxy behaves as a fresh socket built from the same recipe.

Every operation is applied to the zmqfork socket and to a plain pyzmq socket
of the same type (in a context of its own); both must succeed or fail alike,
and only what succeeded enters the model.  At each fork (os.fork, libc fork
or raw clone), the child checks its proxy against the model under the
socket's ``on_fork`` policy and reports through a pipe (tests/forking.py):

- its options equal those of a fresh pyzmq socket given the model's options;
- it starts with no message, and nothing the parent queued reaches a peer;
- it is attached exactly as the model says: peers bound on every connect
  endpoint and connected to every inproc bind count, per endpoint, one
  message per connection (PUSH sends, PULL receives);
- a SUB filters as the model's subscriptions say, on every connection:
  peers publish one probe per topic and the SUB gets each matching probe
  once per connection to that peer, no other;
- tcp binds raise InheritedBindError under "reconnect" and are made again
  under "rebind"; under "close" the socket is closed.

Every example ends with such a check (a fork at teardown, unless its last
step was a fork).  Runs in CI with a fixed seed and bounded counts (about
35 s on a loaded 2-core machine); ``ZMQFORK_MODEL_SEED``,
``ZMQFORK_MODEL_EXAMPLES`` and ``ZMQFORK_MODEL_STEPS`` explore further, and
``--hypothesis-show-statistics`` shows what the forks covered.

In the parent, the socket is checked too: a peer connected to one of its
inproc binds reaches it (a PULL gets what the peer sends, a SUB the probes
its subscriptions match).

The test steers clear of two libzmq crashes:

- libzmq 4.3.5 crashes (SIGSEGV, use after free in the reaper thread or in
  ``zmq_ctx_term``) when a socket closed with two or more pending inproc
  connects to one endpoint is followed by ``zmq_ctx_term``: see
  tests/libzmq_pending_term_crash.py, a pyzmq-only reproduction.  Teardown
  therefore binds a peer on every connect endpoint before destroying the
  contexts, so that no connect is pending when they are terminated.
- libzmq 4.3.5 crashes (SIGSEGV in ``zmq_setsockopt``) when SNDHWM or RCVHWM
  is set on a socket soon after an inproc peer of it closed: see
  tests/libzmq_hwm_after_peer_close_crash.py (this test crashed 2 runs in 6
  when it closed its parent-side peers after each check).  The parent-side
  peers therefore stay open until the contexts are destroyed.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import zmq as pyzmq
from hypothesis import HealthCheck, event, seed, settings
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
# What a SUB's peers publish: each probe is followed by "@endpoint", so b"a"
# matches the first two, b"ab" the second, b"b" the third; b"c" nothing.
PROBES = [b"a", b"ab", b"b", b"c"]
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
READABLE = sorted(OPTIONS)
# inproc traffic within one thread needs no other thread: a message that is
# coming is there at once, so a short wait only delays the report of a wrong rebuild.
PEER_TIMEOUT_MS = 500
CHILD_TIMEOUT = 30.0

_examples = [0]


def outcome(call: Callable[[], Any]) -> Tuple[Optional[type], Optional[int]]:
    """(exception type, errno) of ``call()``, or (None, None) if it succeeded."""
    try:
        call()
    except (pyzmq.ZMQError, TypeError, ValueError) as exc:
        return type(exc), getattr(exc, "errno", None)
    return None, None


class ForkModel(RuleBasedStateMachine):
    """One zmqfork socket, its plain pyzmq twin, and the model of what a child must rebuild."""

    @initialize(
        name=st.sampled_from(sorted(TYPES)),
        policy=st.sampled_from(zmq.POLICIES),
        connects=st.lists(st.sampled_from(CONNECT_TO), max_size=2),
        topics=st.lists(st.sampled_from(TOPICS), max_size=2),
    )
    def make(self, name: str, policy: str, connects: List[str], topics: List[bytes]) -> None:
        """A socket with a head start (so that more forks see connections and subscriptions)."""
        self.type = TYPES[name]
        self.policy = policy
        _examples[0] += 1
        self.prefix = f"inproc://model-{os.getpid()}-{_examples[0]}-"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(self.type, on_fork=policy)
        self.twin_ctx = pyzmq.Context()
        self.twin = self.twin_ctx.socket(self.type)
        self.options: Dict[int, Any] = {}
        self.subscriptions: Counter[bytes] = Counter()
        self.connects: Counter[str] = Counter()
        # (endpoint asked for, what the proxy got, what the twin got)
        self.binds: List[Tuple[str, str, str]] = []
        self.checked = False  # has a child checked the model as it is now?
        self.parent_peers: List[zmq.Socket] = []  # the receive rule's peers, open until teardown
        for endpoint in connects:
            self.connect(endpoint)
        if self.type == zmq.SUB:
            for topic in topics:
                self.subscription(topic, True)

    def teardown(self) -> None:
        if not hasattr(self, "sock"):
            return
        try:
            # Every example that got this far without an error ends with a
            # fork (shown as "state.teardown()" in a failing case), so that
            # its last state is checked too.
            if not self.checked and sys.exc_info()[0] is None:
                self.fork(FORK_KINDS[_examples[0] % len(FORK_KINDS)])
        finally:
            self.destroy()

    def destroy(self) -> None:
        # libzmq 4.3.5 crashes in zmq_ctx_term when a closed socket left two or
        # more pending inproc connects to one endpoint (module docstring,
        # tests/libzmq_pending_term_crash.py).  Let each socket process the
        # commands its disconnects queued, then give every pending connect a
        # peer while the socket is still open, so that none is left for term.
        for ctx, sock in ((self.ctx, self.sock), (self.twin_ctx, self.twin)):
            sock.get(zmq.EVENTS)
            for endpoint in CONNECT_TO:
                ctx.socket(zmq.PAIR).bind(self.name(endpoint))
        self.ctx.destroy(linger=0)
        self.twin_ctx.destroy(linger=0)

    def name(self, endpoint: str) -> str:
        """This example's own name for ``endpoint``."""
        if endpoint.startswith("inproc://") and endpoint != "inproc://":
            return endpoint.replace("inproc://", self.prefix, 1)
        return endpoint

    def both(self, call: Callable[[Any], Any]) -> bool:
        """Apply ``call`` to the proxy and the twin; they must agree; True if it succeeded."""
        mine = outcome(lambda: call(self.sock))
        theirs = outcome(lambda: call(self.twin))
        assert mine == theirs
        if mine == (None, None):
            self.checked = False
            return True
        return False

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
            self.binds.append((endpoint, self.sock.last_endpoint.decode(), self.twin.last_endpoint.decode()))

    @rule(endpoint=st.sampled_from(BIND_TO[:2]))
    def unbind(self, endpoint: str) -> None:
        endpoint = self.name(endpoint)
        if self.both(lambda s: s.unbind(endpoint)):
            self.binds = [bound for bound in self.binds if bound[0] != endpoint]

    @precondition(lambda self: any(not bound[0].startswith("inproc://") for bound in self.binds))
    @rule(data=st.data())
    def unbind_tcp(self, data: st.DataObject) -> None:
        """Unbind a tcp bind by the endpoint it resolved to: the child no longer owes it."""
        tcp = [bound for bound in self.binds if not bound[0].startswith("inproc://")]
        bound = data.draw(st.sampled_from(tcp))
        mine = outcome(lambda: self.sock.unbind(bound[1]))
        assert mine == outcome(lambda: self.twin.unbind(bound[2])) == (None, None)
        self.binds.remove(bound)
        self.checked = False

    @precondition(lambda self: self.type == zmq.PUSH)
    @rule()
    def send(self) -> None:
        # Queued in the parent (nobody reads): must never reach a child's peer.
        self.both(lambda s: s.send(b"from the parent", zmq.NOBLOCK))

    @precondition(lambda self: self.type != zmq.PUSH and self.inproc_binds())
    @rule(data=st.data())
    def receive(self, data: st.DataObject) -> None:
        """In the parent, a peer connected to one of the socket's inproc binds reaches it as the model says.

        A PULL receives what the peer sends; a SUB the probes its
        subscriptions match, once each.  The peer stays, idle, until the
        context is destroyed (see the module docstring), and the socket's
        children rebuild from the recipe alone: the model does not change.
        """
        endpoint = data.draw(st.sampled_from(self.inproc_binds()))
        peer = self.ctx.socket(zmq.PUSH if self.type == zmq.PULL else zmq.XPUB)
        self.parent_peers.append(peer)  # kept: a collected socket is closed
        peer.sndtimeo = PEER_TIMEOUT_MS
        if self.type == zmq.SUB:
            peer.xpub_verbose = 1
        peer.connect(endpoint)
        self.sock.get(zmq.EVENTS)  # let the socket process the peer's attach command
        if self.type == zmq.PULL:
            peer.send(b"from a parent peer")
            expected = [b"from a parent peer"]
        else:
            _wait_for_subscriptions(peer, {topic: 1 for topic, n in self.subscriptions.items() if n})
            for probe in PROBES:
                peer.send(probe)
            expected = self.matching_probes()
        # Polled: the socket's own RCVTIMEO is the model's to set.
        got = []
        while len(got) < len(expected) and self.sock.poll(PEER_TIMEOUT_MS):
            got.append(self.sock.recv(zmq.NOBLOCK))
        assert sorted(got) == sorted(expected)
        assert self.sock.poll(0) == 0, "more than the peer sent"

    def inproc_binds(self) -> List[str]:
        return [endpoint for endpoint, _, _ in self.binds if endpoint.startswith("inproc://")]

    @invariant()
    def parent_options_match(self) -> None:
        if hasattr(self, "sock"):
            for option, value in self.options.items():
                assert self.sock.get(option) == value

    # ---- the fork -----------------------------------------------------------

    @rule(kind=st.sampled_from(FORK_KINDS))
    def fork(self, kind: str) -> None:
        tcp_bound = tuple(got for endpoint, got, _ in self.binds if not endpoint.startswith("inproc://"))
        # Shown by --hypothesis-show-statistics: what the forks covered.
        event(f"fork: {self.policy}, {'tcp bound' if tcp_bound else 'no tcp bind'}")
        pipes = self.pipes()
        total = sum(pipes.values())
        event(f"fork: {'0' if not total else '1' if total == 1 else '2-4' if total < 5 else '5+'} connections")
        if max(pipes.values(), default=0) > 1:
            event("fork: several connections to one endpoint")
        if self.type == zmq.SUB:
            event(f"fork: SUB with {len(+self.subscriptions)} active topics")
        self.checked = True  # (set first: a failed check is not repeated at teardown)
        found = run_in_child(self.child_check, kind=kind, timeout=CHILD_TIMEOUT)
        if self.policy == "close":
            assert found == ("closed", zmq.ENOTSOCK)
        elif self.policy == "reconnect" and tcp_bound:
            assert found == ("InheritedBindError", tcp_bound)
        else:
            options, reference, report = found
            assert options == reference
            assert report == self.expected_traffic()

    def pipes(self) -> Counter[str]:
        """How many connections a fresh socket built from the model has, per endpoint its peers use."""
        inproc_bound = [endpoint for endpoint, _, _ in self.binds if endpoint.startswith("inproc://")]
        return Counter(self.connects) + Counter(inproc_bound)

    def matching_probes(self) -> List[bytes]:
        """The probes a SUB gets, once per connection, under the model's subscriptions."""
        topics = [topic for topic, n in self.subscriptions.items() if n]
        return [probe for probe in PROBES if any(probe.startswith(topic) for topic in topics)]

    def expected_traffic(self) -> Dict[str, Any]:
        pipes = self.pipes()
        if self.type == zmq.SUB:
            matching = self.matching_probes()
            expected = {endpoint: sorted(matching * n) for endpoint, n in pipes.items() if matching}
            return dict(sorted(expected.items()))
        return dict(sorted(pipes.items()))

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
            return (type(exc).__name__, tuple(exc.endpoints))
        fresh_ctx = pyzmq.Context()
        fresh = fresh_ctx.socket(self.type)
        for option, value in self.options.items():
            fresh.set(option, value)
        reference = {option: fresh.get(option) for option in READABLE}
        report = self.child_traffic()
        return options, reference, report  # the child exits without term: nothing to wait for

    def child_traffic(self) -> Dict[str, Any]:
        """Peers on every endpoint the proxy might know: which ones is it really attached to, and how often?"""
        sock, ctx = self.sock, self.ctx
        if self.type != zmq.PUSH:
            with pytest.raises(zmq.Again):  # nothing from the parent
                sock.recv(zmq.NOBLOCK)
        peer_type = {zmq.PUSH: zmq.PULL, zmq.PULL: zmq.PUSH, zmq.SUB: zmq.XPUB}[self.type]
        peers = {}
        inproc_bound = [endpoint for endpoint, _, _ in self.binds if endpoint.startswith("inproc://")]
        for endpoint in [*map(self.name, CONNECT_TO), *inproc_bound]:
            peer = ctx.socket(peer_type)
            peer.rcvtimeo = PEER_TIMEOUT_MS
            peer.sndtimeo = PEER_TIMEOUT_MS
            if peer_type == zmq.XPUB:
                peer.xpub_verbose = 1  # every connection's subscriptions, not only the first
            if endpoint in inproc_bound:
                peer.connect(endpoint)
            else:
                peer.bind(endpoint)
            peers[endpoint] = peer
        sock.get(zmq.EVENTS)  # let the proxy process the attach commands of its peers
        expected = self.pipes()
        sock.rcvtimeo = PEER_TIMEOUT_MS
        sock.sndtimeo = PEER_TIMEOUT_MS
        # Mismatches are reported, never raised, so that one wrong rebuild fails
        # the same assertion in the parent whatever the socket type.
        seen: Dict[str, Any] = {}
        if self.type == zmq.PUSH:
            # Round robin: one message per connection, so each peer gets one per connection it has.
            unsent = sum(expected.values())
            while unsent and outcome(lambda: sock.send(b"from the child")) == (None, None):
                unsent -= 1
            if unsent:
                seen["unsent"] = unsent
            for endpoint, peer in peers.items():
                got = _receive(peer, expected.get(endpoint, 0))
                if got:
                    seen[endpoint] = got if set(got) != {b"from the child"} else len(got)
        elif self.type == zmq.PULL:
            # Peers not expected to reach the proxy send first: a wrong pipe would deliver before the right ones.
            for endpoint in sorted(peers, key=lambda endpoint: endpoint in expected):
                for _ in range(expected.get(endpoint, 1)):
                    outcome(lambda: peers[endpoint].send(endpoint.encode(), zmq.NOBLOCK))
            for message in _receive(sock, sum(expected.values())):
                endpoint = message.decode()
                seen[endpoint] = seen.get(endpoint, 0) + 1
        else:
            seen = self._sub_traffic(sock, peers, expected)
        return dict(sorted(seen.items()))

    def _sub_traffic(self, sock: zmq.Socket, peers: Dict[str, zmq.Socket], expected: Counter[str]) -> Dict[str, Any]:
        """Each XPUB peer waits for its connections' subscriptions, publishes the probes; the SUB says what it got."""
        active = [topic for topic, n in self.subscriptions.items() if n]
        deadline = time.monotonic() + PEER_TIMEOUT_MS / 1000
        for endpoint, peer in peers.items():
            _wait_for_subscriptions(peer, {topic: expected.get(endpoint, 0) for topic in active}, deadline)
        for endpoint, peer in peers.items():
            for probe in PROBES:
                peer.send(probe + b"@" + endpoint.encode())
        total = sum(len(probes) for probes in self.expected_traffic().values())
        seen: Dict[str, List[bytes]] = {}
        for message in _receive(sock, total):
            probe, _, endpoint = message.partition(b"@")
            seen.setdefault(endpoint.decode(), []).append(probe)
        return {endpoint: sorted(probes) for endpoint, probes in seen.items()}


def _wait_for_subscriptions(peer: zmq.Socket, connections: Dict[bytes, int], deadline: Optional[float] = None) -> None:
    """Until ``deadline``, let XPUB ``peer`` receive each topic's subscription from each of its ``connections``.

    A connection announces each active topic at least once (on attach, or
    when subscribed later); wait for that, then take whatever else is queued
    (repeats, unsubscriptions).
    """
    if deadline is None:
        deadline = time.monotonic() + PEER_TIMEOUT_MS / 1000
    missing = Counter({b"\x01" + topic: n for topic, n in connections.items()})
    while +missing and time.monotonic() < deadline:
        try:
            message = peer.recv(zmq.NOBLOCK)
        except zmq.Again:
            peer.poll(10)
            continue
        missing[message] -= 1
    _receive(peer, 0)


def _receive(sock: zmq.Socket, wanted: int) -> List[bytes]:
    """Up to ``wanted`` messages, each waited for up to the socket's RCVTIMEO, then whatever else is queued."""
    got: List[bytes] = []
    flags = 0
    while True:
        if len(got) >= wanted:
            flags = zmq.NOBLOCK
        try:
            got.append(sock.recv(flags))
        except zmq.Again:
            return got


# Fixed seed in CI (deterministic sequences); ZMQFORK_MODEL_SEED picks another.
seed(count("MODEL_SEED", 20261128))(ForkModel)
ForkModel.TestCase.settings = settings(
    max_examples=count("MODEL_EXAMPLES", 600),
    stateful_step_count=count("MODEL_STEPS", 25),
    deadline=None,
    database=None,
    report_multiple_bugs=False,  # shrink one failure, not every variant of it
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestForkModel = ForkModel.TestCase
