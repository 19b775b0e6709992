"""Reproduction (pyzmq only, no zmqfork): zmq_setsockopt(SNDHWM or RCVHWM) crashes after an inproc peer closed.

Not a test: run it by hand, ``python tests/libzmq_hwm_after_peer_close_crash.py``.
With the pyzmq 27.3.0 wheel (libzmq 4.3.5) it exits with SIGSEGV (status 139
from a shell) within a few thousand rounds, for SNDHWM and for RCVHWM alike,
on a SUB with an XPUB peer as on a PULL with a PUSH peer; setting LINGER the
same way never crashed.  tests/test_model.py avoids the pattern.

The pattern, each round: a socket binds an inproc endpoint, a peer in the
same context connects and is closed with linger 0, and the socket sets its
HWM.  Setting an HWM on a socket with pipes sends the new limits to the peer
end of each pipe (``pipe_t::send_hwms_to_peer``, a ``pipe_hwm`` command);
the crash is in the calling thread, inside ``zmq_setsockopt``.  That the
peer's pipe end was already freed by the termination handshake the close
started is our reading of libzmq's source (src/pipe.cpp), not traced with a
debug build; libzmq's later fix "pipe should only send to peer when active"
(zeromq/libzmq#4647, after 4.3.5) guards a similar send to a terminating peer.

Usage: python libzmq_hwm_after_peer_close_crash.py [SNDHWM|RCVHWM] [ROUNDS=20000]
"""

import sys

import zmq


def main() -> int:
    option = getattr(zmq, sys.argv[1] if len(sys.argv) > 1 else "SNDHWM")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    print(f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}", flush=True)
    for _ in range(rounds):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.bind("inproc://endpoint")
        peer = ctx.socket(zmq.XPUB)
        peer.connect("inproc://endpoint")
        sock.get(zmq.EVENTS)  # attach the peer's pipe
        peer.close(linger=0)
        for hwm in (10, 11, 12):
            sock.setsockopt(option, hwm)  # SIGSEGV now and then
            sock.get(zmq.EVENTS)
        ctx.destroy(linger=0)
    print(f"no crash in {rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
