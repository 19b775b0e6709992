"""What a socket does with its binds when it finds itself in a forked child."""

from __future__ import annotations

__all__ = ["POLICIES", "check_policy"]

#: "reconnect": replay options and connects; a socket with binds raises
#: InheritedBindError. "rebind": replay binds too. "close": the socket is
#: closed in the child.
POLICIES = ("reconnect", "rebind", "close")


def check_policy(value: object) -> str:
    """Return ``value`` if it is a known on_fork policy, else raise ValueError naming the choices."""
    if not isinstance(value, str) or value not in POLICIES:
        raise ValueError(f"on_fork must be one of {', '.join(map(repr, POLICIES))}; got {value!r}")
    return value
