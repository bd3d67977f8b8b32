"""`tcmu_py.lazy_ffi`: C declarations parsed on first use, so that listing the handlers does
not import cffi's parser."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from tcmu_py.lazy_ffi import LazyFFI

_PROBE = """
import json, sys
from tcmu_py.handler import load_handlers
registry = load_handlers()
for name in ("ceph", "mirror"):
    registry[name]
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "pycparser")))
"""


def test_importing_the_ceph_and_mirror_handlers_parses_no_c() -> None:
    """librbd's and libnbd's declarations are parsed when first used, not at import: every
    daemon that reads a YAML imports every handler (its sections), and pycparser's import alone
    took ~0.5 s of each under the lab's emulation."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert json.loads(out) == []


def test_the_declarations_work_once_used() -> None:
    ffi = LazyFFI("typedef struct { int a; long b; } pair_t; int abs(int);")
    assert ffi._ffi is None
    p = ffi.new("pair_t *", {"a": 3, "b": 4})
    assert (p.a, p.b) == (3, 4)
    assert ffi.sizeof("pair_t") >= 12
    libc = ffi.dlopen(None)
    assert libc.abs(-5) == 5


def test_threads_share_one_ffi() -> None:
    ffi = LazyFFI("typedef int my_int;")
    seen: list[object] = []
    barrier = threading.Barrier(8)

    def use() -> None:
        barrier.wait()
        seen.append(ffi.typeof("my_int"))
        seen.append(ffi._ffi)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len({id(x) for x in seen[1::2]}) == 1
