"""What zmqfork can see about itself: the generation, the detection mechanisms and descriptor tracking."""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

from zmqfork import _descriptors, _native
from zmqfork._generation import notice
from zmqfork._threads import ForeignThread, foreign_threads

__all__ = ["COUNTER_FIELDS", "Detection", "detection", "generation"]


class Detection(NamedTuple):
    """Which fork-detection mechanisms are in force in this process, and why the others are not.

    ``atfork``: pthread_atfork handlers (forks through libc ``fork()``, including
    ``os.fork()`` and C extensions).  ``wipeonfork``: a ``MADV_WIPEONFORK`` token
    page (also forks that skip the handlers, such as a raw clone syscall).
    ``unavailable`` maps each of these, and ``"fdtrack"``, to why it is off.

    ``fdtrack``: libzmq's descriptors are tracked and closed in a forked child
    (``fdtrack_object`` is the hooked file, ``fdtrack_functions`` the calls
    hooked in it).  ``fds_tracked``: descriptors libzmq owns now;
    ``fds_closed``: closed in this process by the cleanup after the fork that
    made it; ``fds_closed_total``: by every cleanup in this process and its
    ancestors; ``fds_untracked``: libzmq's descriptors that may survive into a
    child (see ``zmqfork._descriptors.DescriptorTracking.untracked``);
    ``fds_cleanup_ns``: how long the cleanup after the fork that made this
    process took (identifying and closing the inherited descriptors), 0 if
    none ran (like ``fds_closed``, a child of a fork that skipped the atfork
    handlers shows its parent's figures until its first zmqfork call).

    ``foreign_threads``: the threads of this process other than the caller and
    libzmq's (``zmqfork.foreign_threads()``), whose state at a fork stays the
    application's concern.
    """

    atfork: bool
    wipeonfork: bool
    unavailable: Dict[str, str]
    fdtrack: bool = False
    fdtrack_object: Optional[str] = None
    fdtrack_functions: Tuple[str, ...] = ()
    fds_tracked: int = 0
    fds_closed: int = 0
    fds_closed_total: int = 0
    fds_untracked: int = 0
    fds_cleanup_ns: int = 0
    foreign_threads: Tuple[ForeignThread, ...] = ()


#: Each descriptor counter (zmqfork_fdtrack_counts in csrc/zmqfork.h) and its Detection field.
COUNTER_FIELDS: Dict[str, str] = {
    "tracked": "fds_tracked",
    "closed_last": "fds_closed",
    "closed_total": "fds_closed_total",
    "untracked": "fds_untracked",
    "cleanup_ns": "fds_cleanup_ns",
}


def detection() -> Detection:
    """Report the fork-detection mechanisms in force and the state of descriptor tracking."""
    active = _native.mechanisms()
    reasons = {name: why for name, why in _native.mechanism_errors().items() if why is not None}
    fds = _descriptors.state()
    if fds.reason is not None:
        reasons["fdtrack"] = fds.reason
    return Detection(
        atfork="atfork" in active,
        wipeonfork="wipeonfork" in active,
        unavailable=reasons,
        fdtrack=fds.on,
        fdtrack_object=fds.object,
        fdtrack_functions=fds.functions,
        **{field: getattr(fds, counter) for counter, field in COUNTER_FIELDS.items()},
        foreign_threads=foreign_threads(),
    )


def generation() -> int:
    """The generation of this process: non-zero, different in every forked child."""
    return notice()
