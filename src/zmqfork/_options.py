"""Socket options as attributes (``sock.linger = 0``, ``sock.rcvtimeo``), without ``__getattr__``.

pyzmq maps unknown attributes to options in ``__getattr__``; a class with
``__getattr__`` makes every attribute load slower (CPython cannot specialise
it), which would cost the hot path of a proxy about 60 ns per send+recv.
Instead, each option gets a real property, in lower and upper case.
"""

from __future__ import annotations

import errno
from typing import Any, Callable

import zmq

__all__ = ["add_option_properties", "option_for_attribute"]


def _option_property(option: int, name: str) -> property:
    def fget(self: Any) -> Any:
        try:
            return self.get(option)
        except zmq.ZMQError as exc:
            # As pyzmq: reading a write-only option is an AttributeError.
            if exc.errno in (errno.EINVAL, errno.EFAULT):
                raise AttributeError(f"{name} attribute is write-only") from None
            raise

    def fset(self: Any, value: Any) -> None:
        self.set(option, value)

    return property(fget, fset, doc=f"The zmq.{name} socket option.")


def add_option_properties(cls: type) -> type:
    """Class decorator: a property for every ``zmq.SocketOption`` the class does not define already."""
    for name, option in zmq.SocketOption.__members__.items():
        for spelling in (name.lower(), name):
            if not any(spelling in klass.__dict__ for klass in cls.__mro__):
                setattr(cls, spelling, _option_property(int(option), name))
    return cls


def option_for_attribute(owner: str, key: str) -> int:
    """The zmq constant an attribute name stands for, in any case; AttributeError naming it if none."""
    upper = key.upper()
    value: Callable[..., Any] | int | None = getattr(zmq.constants, upper, None)
    if not isinstance(value, int):
        raise AttributeError(f"{owner} has no such option: {upper}")
    return value
