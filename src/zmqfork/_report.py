"""What zmqfork can see about itself: the generation and the detection mechanisms in force."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from zmqfork import _native
from zmqfork._generation import current_token

__all__ = ["Detection", "detection", "generation"]


@dataclass(frozen=True)
class Detection:
    """Which fork-detection mechanisms are in force in this process, and why the others are not.

    ``atfork``: pthread_atfork handlers (forks through libc ``fork()``, including
    ``os.fork()`` and C extensions).  ``wipeonfork``: a ``MADV_WIPEONFORK`` token
    page (also forks that skip the handlers, such as a raw clone syscall).
    """

    atfork: bool
    wipeonfork: bool
    unavailable: Dict[str, str] = field(default_factory=dict)


def detection() -> Detection:
    """Report the fork-detection mechanisms in force."""
    active = _native.mechanisms()
    reasons = {name: why for name, why in _native.mechanism_errors().items() if why is not None}
    return Detection(atfork="atfork" in active, wipeonfork="wipeonfork" in active, unavailable=reasons)


def generation() -> int:
    """The generation of this process: non-zero, different in every forked child."""
    return current_token()
