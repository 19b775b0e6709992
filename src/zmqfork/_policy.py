"""What a socket does with its binds when it finds itself in a forked child."""

from __future__ import annotations

__all__ = ["POLICIES", "check_policy"]

#: "reconnect": replay options and connects; a socket with binds raises
#: InheritedBindError. "rebind": replay binds too. "close": the socket is
#: closed in the child.
POLICIES = ("reconnect", "rebind", "close")


def check_policy(value: object) -> str:
    """Return ``value`` if it is a known on_fork policy; TypeError if not a str, ValueError naming the choices if unknown."""
    choices = ", ".join(map(repr, POLICIES))
    if not isinstance(value, str):
        raise TypeError(f"on_fork must be a str, one of {choices}; got {type(value).__name__} {value!r}")
    if value not in POLICIES:
        raise ValueError(f"on_fork must be one of {choices}; got {value!r}")
    return value
