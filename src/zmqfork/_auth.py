"""zmq.auth across fork: an authenticator started on a zmqfork context starts again in a forked child.

pyzmq's ``zmq.auth`` answers ZAP requests from a thread (``ThreadAuthenticator``)
or an asyncio task (``AsyncioAuthenticator``) on a REP socket bound to
``inproc://zeromq.zap.01`` in the context.  A forked child has neither the
thread nor the task.  zmqfork wraps ``Authenticator.start`` and ``stop`` (once
``zmq.auth.base`` is imported: zmqfork does not import it, as it imports
``logging``), so a context knows its running authenticators.  When the
context is re-initialised in a child, each one lets go of its inherited
sockets (no libzmq call) and is started again: the same object, so its
configuration (allow/deny lists, PLAIN passwords, CURVE certificates,
``allow_any``, credentials providers, domains) is what the parent had.  An
asyncio authenticator is started when an event loop is running: at once if
one is, else at the first awaitable operation of one of the context's
sockets.
"""

from __future__ import annotations

import sys
import weakref
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence

from zmqfork._generation import notice

if TYPE_CHECKING:
    from zmqfork.context import Context

__all__ = ["watch_authenticators", "let_go_of_authenticators", "restart_authenticators", "restart_waiting_authenticators"]

_BASE = "zmq.auth.base"


def let_go_of_authenticators(context: Context) -> None:
    """When a fork is noticed: each authenticator of ``context`` lets go of its inherited thread or task and sockets.

    Plain Python, no libzmq call: its sockets are the parent's (closing an
    inherited zmqfork socket only marks it), its thread does not exist here.
    Done at once, so that calls on the authenticator before the context is
    used again (``stop()``) find nothing to stop.
    """
    for ref in context._zf_authenticators:
        auth = ref()
        if auth is not None:
            _let_go_of_sockets(auth)


def restart_authenticators(context: Context) -> None:
    """In a forked child, start again the authenticators the parent had started on ``context``.

    Called when the context is re-initialised; asyncio authenticators that
    find no running event loop wait in ``_zf_authenticators_waiting`` for
    ``restart_waiting_authenticators``.
    """
    _restart(context, [ref for ref in context._zf_authenticators if ref() is not None])


def restart_waiting_authenticators(context: Context) -> None:
    """Start the asyncio authenticators that waited for an event loop, if one is running now."""
    _restart(context, context._zf_authenticators_waiting)


def _restart(context: Context, refs: List[Any]) -> None:
    loop_running = _loop_running()
    waiting = []
    for ref in refs:
        auth = ref()
        if auth is None:
            continue
        if _is_asyncio(auth) and not loop_running:
            waiting.append(ref)
            continue
        auth.start()
    context.__dict__["_zf_authenticators_waiting"] = waiting


def _loop_running() -> bool:
    import asyncio  # only here: importing zmqfork must not import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _is_asyncio(auth: Any) -> bool:
    module = sys.modules.get("zmq.auth.asyncio")
    return module is not None and isinstance(auth, module.AsyncioAuthenticator)


def _let_go_of_sockets(auth: Any) -> None:
    """Drop the inherited thread or task and close the inherited sockets (unused here: nothing reaches libzmq)."""
    thread = auth.__dict__.get("thread")
    for sock in (auth.__dict__.get("zap_socket"), auth.__dict__.get("pipe"), getattr(thread, "pipe", None)):
        if sock is not None:
            sock.close()
    auth.zap_socket = None
    if "thread" in auth.__dict__:  # ThreadAuthenticator: the parent's thread does not exist here
        auth.thread = None
        auth.pipe = None
    for name in list(auth.__dict__):
        if name.endswith(("__task", "__poller")):  # AsyncioAuthenticator's: the parent's loop is not ours
            auth.__dict__[name] = None


def _wrap(base: ModuleType) -> None:
    """Make ``Authenticator.start``/``stop`` tell a zmqfork context which authenticators run on it.

    Every subclass's own ``stop`` (``ThreadAuthenticator``'s sends on its
    pipe before it calls ``super().stop()``) notices a fork first, so that in
    a child it finds the inherited pipe already let go of.
    """
    from zmqfork.context import Context

    authenticator = base.Authenticator
    start: Callable[[Any], None] = authenticator.start
    stop: Callable[[Any], None] = authenticator.stop
    if getattr(start, "__wrapped__", None) is not None:
        return

    def started(self: Any) -> None:
        start(self)
        context = self.context
        if isinstance(context, Context):
            refs = context._zf_authenticators
            if not any(ref() is self for ref in refs):
                refs.append(weakref.ref(self))

    def stopped(self: Any) -> None:
        context = getattr(self, "context", None)
        if isinstance(context, Context):
            context._zf_authenticators[:] = [ref for ref in context._zf_authenticators if ref() not in (self, None)]
        stop(self)

    _install(authenticator, "start", started, start)
    _install(authenticator, "stop", stopped, stop)
    original_init_subclass = authenticator.__dict__.get("__init_subclass__")

    def subclass_made(cls: Any, /, **kwargs: Any) -> None:
        super(authenticator, cls).__init_subclass__(**kwargs)
        _wrap_subclass_stop(cls)

    if original_init_subclass is None:
        authenticator.__init_subclass__ = classmethod(subclass_made)
    pending = list(authenticator.__subclasses__())
    while pending:  # subclasses made before zmq.auth was seen
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        _wrap_subclass_stop(cls)


def _wrap_subclass_stop(cls: Any) -> None:
    """A subclass's own ``stop`` notices a fork first."""
    own_stop = cls.__dict__.get("stop")
    if own_stop is not None and getattr(own_stop, "__wrapped__", None) is None:
        _install(cls, "stop", _noticing_first(own_stop), own_stop)


def _noticing_first(function: Callable[[Any], None]) -> Callable[[Any], None]:
    def stop(self: Any) -> None:
        notice()
        function(self)

    return stop


def _install(owner: Any, name: str, wrapper: Callable[[Any], None], original: Callable[[Any], None]) -> None:
    wrapper.__name__ = original.__name__
    wrapper.__doc__ = original.__doc__
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)


class _WhenImported:
    """A meta path finder that finds nothing itself: it wraps the loader of one module so that a hook runs
    right after the module executes.  (Not an ``importlib.abc.MetaPathFinder``: that module imports
    ``importlib.resources``, pathlib, tempfile and shutil, memory every later fork copies.)"""

    def __init__(self, name: str, hook: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.hook = hook

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:  # the finders after this one: files, zip archives, frozen modules
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader: Any = spec.loader
        execute = loader.exec_module
        hook = self.hook

        def exec_module(module: ModuleType) -> None:
            execute(module)
            hook(module)

        loader.exec_module = exec_module
        return spec


def watch_authenticators() -> None:
    """Wrap ``zmq.auth``'s Authenticator now if it is imported, else as soon as it is."""
    base = sys.modules.get(_BASE)
    if base is not None:
        _wrap(base)
    elif not any(isinstance(finder, _WhenImported) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WhenImported(_BASE, _wrap))

