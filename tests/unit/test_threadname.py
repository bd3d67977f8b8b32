"""`tcmu_py.threadname`: a thread's name as the kernel shows it."""

from __future__ import annotations

import threading
from pathlib import Path

from tcmu_py.threadname import MAX_BYTES, name_os_thread


def _comm_of(thread_name: str, name: str | None) -> str:
    seen: list[str] = []

    def body() -> None:
        name_os_thread(name)
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text())

    t = threading.Thread(target=body, name=thread_name)
    t.start()
    t.join(10)
    return seen[0].rstrip("\n")


def test_a_thread_takes_its_threading_name_cut_to_what_the_kernel_keeps() -> None:
    assert _comm_of("dedup-gc-a-pool-with-a-long-name", None) == "dedup-gc-a-pool"
    assert len("dedup-gc-a-pool") == MAX_BYTES


def test_a_name_given_wins_over_the_threading_name() -> None:
    assert _comm_of("ignored", "tcmu:disk0") == "tcmu:disk0"


def test_the_process_s_own_thread_name_is_left_alone() -> None:
    before = Path("/proc/self/comm").read_text()
    _comm_of("other", "tcmu:other")
    assert Path("/proc/self/comm").read_text() == before
