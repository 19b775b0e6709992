"""Reproduction (pyzmq only, no zmqfork): zmq_ctx_term crashes after a socket with pending inproc connects is closed.

Not a test: run it by hand, ``python tests/libzmq_pending_term_crash.py``.
It exits with SIGSEGV (status 139 from a shell), usually within a second,
with the pyzmq 27.3.0 wheel (libzmq 4.3.5); ``ctx_t::terminate`` is the same
on libzmq master as of 2026.  tests/test_model.py avoids the pattern.

The pattern: a socket connects two or more times to the same inproc endpoint
that nobody has bound (each connect leaves a *pending connection* in the
context), the socket is closed, and the context is terminated.  Each round
below does exactly that, and nothing else.

Why, from libzmq's source (src/ctx.cpp, src/pair.cpp, src/pipe.cpp): closing
the socket hands it to the reaper thread, which terminates its pipes; each
sends ``pipe_term`` to the pipe's other end, which still belongs to the closed
socket, so the command waits in that socket's mailbox, served by the reaper.
Meanwhile ``zmq_ctx_term`` (ctx_t::terminate), in the calling thread,
resolves every pending connection by binding a temporary PAIR socket to the
endpoint: ``connect_inproc_sockets`` moves the waiting pipe ends to the PAIR
(``set_tid``) and attaches them; PAIR keeps the first and terminates the others
at once (``pair_t::xattach_pipe``).  Those pipes are then freed after their
term handshake, while the reaper may still hold a ``pipe_term`` addressed to
them in the closed socket's mailbox: it then runs ``process_command`` on freed
memory (seen with a debug build of 4.3.5: ``object_t::process_command`` from
``socket_base_t::in_event`` in the reaper thread; also ``pipe_t::terminate``
from ``ctx_t::terminate`` -> ``socket_base_t::bind`` -> ``connect_pending``
in the calling thread).  One pending connect per endpoint did not crash in
40,000 rounds; two did now and then, ten almost at once.  Related libzmq
issues: #887/#888 (the temporary PAIR), #4544 (open: an assertion in the same
``connect_inproc_sockets`` path at termination).

Usage: python libzmq_pending_term_crash.py [CONNECTS=10] [ROUNDS=20000] [SPIN=1000]
(SPIN varies, round by round, how long term waits after close: it moves the
calling thread across the reaper's window.)
"""

import sys

import zmq


def main() -> int:
    connects = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    spin = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    print(f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}: {connects} pending connects per round", flush=True)
    for i in range(rounds):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        for _ in range(connects):
            sock.connect("inproc://never-bound")
        sock.close(linger=0)
        for _ in range(i % spin):
            pass
        ctx.term()  # SIGSEGV now and then
    print(f"no crash in {rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
