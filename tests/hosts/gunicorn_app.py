"""A WSGI application for ``gunicorn --preload``: zmqfork sockets made at import, in the master.

Every request is answered with ``"<worker pid> <request path>"``, and the same
text is first sent on the master's PUSH from the worker that serves it
(see ``host_sockets.MasterSockets.report``).
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Tuple

from host_sockets import MasterSockets

sockets = MasterSockets.from_environment()


def application(environ: dict, start_response: Callable[[str, List[Tuple[str, str]]], object]) -> Iterable[bytes]:
    """Report the request on the zmqfork PUSH, wait to be let go, answer with what was sent."""
    body = sockets.report(environ["PATH_INFO"].lstrip("/")).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
