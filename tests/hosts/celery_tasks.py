"""The module ``celery -A celery_tasks worker`` imports in its master: zmqfork sockets made at import.

The task runs in a prefork pool process and reports there, on the master's
PUSH, with its own pid (see ``host_sockets.MasterSockets.report``).
"""

from __future__ import annotations

import os

from celery_app import TASK, make_app
from host_sockets import MasterSockets

app = make_app(os.environ["ZMQFORK_HOST_QUEUE"])
sockets = MasterSockets.from_environment()


@app.task(name=TASK)
def report(tag: str) -> None:
    """Send ``"<pid> <tag>"`` on the master's PUSH; wait until the test lets this pool process go."""
    sockets.report(tag)
