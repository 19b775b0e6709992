"""Types of the compiled module (built by csrc/build_native.py); only zmqfork._native imports it."""

from typing import Any

class _FFI:
    def string(self, cdata: Any, maxlen: int = ...) -> bytes: ...
    def buffer(self, cdata: Any, size: int = ...) -> Any: ...
    def new(self, cdecl: str, init: Any = ...) -> Any: ...

ffi: _FFI
lib: Any
