"""zmqfork's log messages, on the ``zmqfork`` logger, without importing ``logging`` for them.

Importing ``logging`` registers ``os.register_at_fork`` hooks that make every
``os.fork()`` of the process slower (about 40 µs in the parent here), so
zmqfork does not import it for its own sake.  Nothing is lost: a process that
has not imported ``logging`` cannot have configured a level or a handler for
debug messages, and an error imports it when it happens.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["debug", "exception"]

LOGGER = "zmqfork"


def debug(message: str, *args: Any) -> None:
    """Log at DEBUG level, if the process uses ``logging`` at all."""
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.getLogger(LOGGER).debug(message, *args)


def exception(message: str, *args: Any) -> None:
    """Log at ERROR level with the exception being handled (importing ``logging`` if needed)."""
    import logging

    logging.getLogger(LOGGER).exception(message, *args)
