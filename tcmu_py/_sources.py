"""Digest of the sources the compiled ring binding is built from.

`_ffi_build.py` compiles the digest of `SOURCES` into the binding (``tcmu_py_source_digest()``);
`tcmu_py.ring` compares it with the digest of the sources beside it at import. A binding left
over from older sources (an editable install not rebuilt after a pull that changed `_ring.c`)
is then refused with a message saying how to rebuild, instead of failing later, inside a
device's loop thread, on a function or field it lacks. Standard library only: `_ffi_build.py`
loads this file by path, before the package can be imported.
"""

from __future__ import annotations

import hashlib
import os

#: The files that make up the binding: its builder (which holds the kernel's cdef), the
#: header and the C sources.
SOURCES = ("_ffi_build.py", "_ring.h", "_ring.c", "_jl_sum_scalar.c", "_jl_sum.h")


def digest(directory: str) -> str | None:
    """First 16 hex digits of SHA-256 over `SOURCES` in `directory`; None if one is missing (an
    installation that does not ship the sources cannot be checked)."""
    h = hashlib.sha256()
    for name in SOURCES:
        try:
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]
