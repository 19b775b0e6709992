"""A module written for plain pyzmq, as a library would be: it makes its context and socket at import time.

It knows nothing of zmqfork.  It connects a PUSH to ``$PATCHED_APP_ENDPOINT``.
"""

import os

import zmq

context = zmq.Context.instance()
push = context.socket(zmq.PUSH)
push.connect(os.environ["PATCHED_APP_ENDPOINT"])


def report(text: str) -> None:
    """Send ``text`` to the endpoint."""
    push.send_string(text)
