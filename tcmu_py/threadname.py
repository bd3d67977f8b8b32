"""Thread names the kernel shows (``top -H``, ``ps -L``, perf, /proc/PID/task/*/comm).

Python's threads otherwise all carry the process's name, so a busy collector and a busy
device loop look alike there. The C threads of the native loop name themselves
(``tcmu_py_name_thread`` in _ring.c: "tcmu-py-loop", "tcmu-py-io", "tcmu-py-nbd").
"""

from __future__ import annotations

import threading

#: The kernel keeps the first 15 bytes of a thread's name (TASK_COMM_LEN, with its NUL).
MAX_BYTES = 15


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread `name` (default: its `threading` name) as the kernel shows it,
    cut to `MAX_BYTES` bytes. Best effort: where /proc cannot be written, nothing changes."""
    text = threading.current_thread().name if name is None else name
    raw = text.encode(errors="replace")[:MAX_BYTES]
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "wb") as f:
            f.write(raw)
    except OSError:
        pass
