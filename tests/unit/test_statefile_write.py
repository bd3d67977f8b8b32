"""tcmu_py.statefile.write_atomically / write_json: the one durable atomic file write.

Each promise of the module rules is checked by making the system call it depends on misbehave:
short writes, a failing fsync, a failing rename, concurrent writers, and a directory fsync that
must follow the rename.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from tcmu_py import statefile
from tcmu_py.statefile import write_atomically, write_json


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_every_byte_is_written_when_the_kernel_writes_less_than_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    sizes = []

    def short_write(fd: int, data: bytes | memoryview) -> int:
        sizes.append(len(data))
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(statefile.os, "write", short_write)
    data = bytes(range(256)) * 3
    write_atomically(tmp_path / "f", data)
    assert (tmp_path / "f").read_bytes() == data
    assert len(sizes) == -(-len(data) // 7)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    target = tmp_path / "state.json"
    write_json(target, {"v": 1})

    def boom(*args: object) -> None:
        raise OSError(5, f"{failing} failed")

    monkeypatch.setattr(statefile.os, failing, boom)
    with pytest.raises(OSError, match=f"{failing} failed"):
        write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert _temporaries(tmp_path) == []


def test_the_directory_is_fsynced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(a: str, b: str) -> None:
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(statefile.os, "fsync", fsync)
    monkeypatch.setattr(statefile.os, "replace", replace)
    write_atomically(tmp_path / "f", b"x")
    assert events == ["fsync file", "rename", "fsync dir"]


def test_file_is_private_and_json_matches_the_previous_format(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
        write_json(tmp_path / "s.json", {"b": 1, "a": 2}, sort_keys=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o600
    assert (tmp_path / "a.json").read_text() == '{\n "b": 1,\n "a": [\n  1,\n  2\n ]\n}\n'
    assert (tmp_path / "s.json").read_text() == '{\n "a": 2,\n "b": 1\n}\n'


def test_concurrent_writers_never_share_a_temporary(tmp_path: Path) -> None:
    """Temporary names are unique, so writers racing on one file each rename a whole file."""
    target = tmp_path / "f"
    payloads = [bytes([i]) * 4096 for i in range(8)]
    start = threading.Barrier(len(payloads))

    def writer(data: bytes) -> None:
        start.wait(timeout=10)
        for _ in range(20):
            write_atomically(target, data)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert target.read_bytes() in payloads
    assert _temporaries(tmp_path) == []
