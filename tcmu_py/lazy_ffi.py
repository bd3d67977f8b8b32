"""cffi ABI-mode declarations parsed on first use.

`cffi.FFI.cdef` imports pycparser and parses C text: ~25 ms for one of the handlers' bindings on
a host, ~0.5 s under the lab's software emulation. A module that binds a C library in ABI mode
(librbd for ``ceph``, libnbd for ``mirror``) is imported by every process that lists the
handlers (a daemon reading a YAML looks for each handler's sections; `tcmu-py status` and the
handlers' commands do too), most of which never call into the library.
"""

from __future__ import annotations

import threading
from typing import Any


class LazyFFI:
    """A `cffi.FFI` with `cdef` declared, made when one of its attributes is first asked for
    (``ffi.new``, ``ffi.dlopen``, ``ffi.NULL`` ...); thread-safe. Use it as the FFI itself."""

    def __init__(self, cdef: str) -> None:
        self._cdef = cdef
        self._ffi: Any = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        ffi = self._ffi
        if ffi is None:
            with self._lock:
                if self._ffi is None:
                    import cffi

                    made = cffi.FFI()
                    made.cdef(self._cdef)
                    self._ffi = made
                ffi = self._ffi
        return getattr(ffi, name)
