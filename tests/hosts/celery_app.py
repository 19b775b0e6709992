"""The Celery application both sides use: kombu's filesystem transport in ``$ZMQFORK_HOST_QUEUE``, no broker, no results.

The worker imports ``celery_tasks``, which adds the task and the master's
sockets; the test sends tasks by name through ``make_app(folder)`` alone, so
that it never makes the master's sockets itself.
"""

from __future__ import annotations

import os

from celery import Celery

__all__ = ["TASK", "make_app"]

#: The name of the task ``celery_tasks`` defines.
TASK = "zmqfork_host.report"


def make_app(folder: str) -> Celery:
    """A Celery app whose queue is ``folder`` (made by the test, given to the worker as ``$ZMQFORK_HOST_QUEUE``)."""
    app = Celery("zmqfork_host")
    app.conf.update(
        broker_url="filesystem://",
        broker_transport_options={
            "data_folder_in": os.path.join(folder, "queue"),
            "data_folder_out": os.path.join(folder, "queue"),
            "processed_folder": os.path.join(folder, "processed"),
            "control_folder": os.path.join(folder, "control"),  # else "control/" in the current directory
            "polling_interval": 0.05,
        },
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        # The filesystem transport has no fanout exchange: no remote control, no events.
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )
    return app
