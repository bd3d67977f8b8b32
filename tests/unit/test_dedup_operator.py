"""The dedup pool's operator paths on damaged or edited pools: opening never deletes what a lost
index would have named, ``tcmu-py dedup`` answers a damaged pool with one line naming the file
(exit 2), ``gc`` reports what it gave back, ``create-pool`` keeps what it is not told,
``check --repair`` says what it fixed and what it could not."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sqlite3
from pathlib import Path

import pytest

from tcmu_py import cli
from tcmu_py.errors import ConfigError
from tcmu_py.handlers.dedup import DedupPool, check_pool, create_pool, read_pool_status
from tcmu_py.handlers.dedup import config as dedup_config
from tcmu_py.handlers.dedup.store import (
    CONTAINER_DIR,
    DB_FILE,
    POOL_FILE,
    CollectProgress,
    container_file,
)
from tcmu_py.table import format_size

CS = 4096
#: Small containers, so a few hundred KiB of data spread over several of them.
CONTAINER_BYTES = 64 * CS


def chunk(seed: int) -> bytes:
    return random.Random(seed).randbytes(CS)


def filled_pool(tmp_path: Path, name: str = "p", compression: str = "none") -> str:
    """A pool of three containers (64 chunks each at most) with dead chunks in two of them:
    disk ``a`` holds chunks 0..99 then 100..199 of seeds 0..99 again, disk ``b`` the first 100."""
    path = str(tmp_path / name)
    create_pool(path, name, 64 << 20, 80, compression=compression)
    with DedupPool.open(path, container_bytes=CONTAINER_BYTES) as pool:
        a = pool.open_disk("a", 256 * CS)
        b = pool.open_disk("b", 256 * CS)
        data = b"".join(chunk(i) for i in range(100))
        a.write(0, [memoryview(data)])
        b.write(0, [memoryview(data)])
        a.write(100 * CS, [memoryview(b"".join(chunk(1000 + i) for i in range(80)))])
        a.unmap(100 * CS, 80 * CS)  # 80 dead chunks
        a.close()
        b.close()
    return path


def container_names(path: str) -> list[str]:
    return sorted(os.listdir(os.path.join(path, CONTAINER_DIR)))


def read_disk(pool: DedupPool, disk: str, nchunks: int) -> bytes:
    d = pool.open_disk(disk, 256 * CS)
    try:
        buf = bytearray(nchunks * CS)
        d.read(0, [memoryview(buf)])
        return bytes(buf)
    finally:
        d.close()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``tcmu-py dedup ARGV`` through the real command line (its error boundary included)."""
    capsys.readouterr()
    rc = cli.main(["dedup", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------------------
# D1: a lost index never costs the containers


def _lose_index(path: str, how: str) -> None:
    index = os.path.join(path, DB_FILE)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(index + suffix):
            os.unlink(index + suffix)
    if how == "empty":
        Path(index).touch(0o600)
    elif how == "no schema":
        db = sqlite3.connect(index)  # an SQLite file, but not a dedup index
        db.execute("CREATE TABLE other(x)")
        db.commit()
        db.close()


@pytest.mark.parametrize("how", ["missing", "empty", "no schema"])
def test_open_refuses_a_missing_or_empty_index_and_deletes_nothing(
        tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `_connect` made a new empty index and `_reclaim_leaks` deleted every container
    as a leak (the daemon's open, `gc`, `check --repair`). Now every open refuses, naming the
    index, and `status` says so in one line; only `create_pool` makes an index."""
    path = filled_pool(tmp_path)
    before = {n: Path(path, CONTAINER_DIR, n).read_bytes() for n in container_names(path)}
    _lose_index(path, how)
    index = os.path.join(path, DB_FILE)
    with pytest.raises(ConfigError, match=f"{index}: dedup index .*containers are kept"):
        DedupPool.open(path)
    with pytest.raises(ConfigError, match="restore the index from a backup"):
        check_pool(path, repair=True)
    for argv in (["gc", path], ["check", "--repair", path], ["check", path], ["status", path]):
        rc, out, err = run_cli(argv, capsys)
        assert rc == 2, argv
        assert err.count("\n") == 1 and index in err and "Traceback" not in err, argv
    assert {n: Path(path, CONTAINER_DIR, n).read_bytes() for n in container_names(path)} == before
    assert os.path.exists(index) == (how != "missing")  # nothing made in its place


def test_create_pool_refuses_a_directory_holding_containers(tmp_path: Path) -> None:
    """A pool whose pool.json and index are both gone is not made new over its containers
    (which the first open would then delete as leaks)."""
    path = filled_pool(tmp_path)
    for f in (POOL_FILE, DB_FILE):
        os.unlink(os.path.join(path, f))
    before = container_names(path)
    with pytest.raises(ConfigError, match="holds container files"):
        create_pool(path, "p", 64 << 20)
    assert container_names(path) == before and not os.path.exists(os.path.join(path, DB_FILE))


def test_a_new_pool_still_reclaims_its_first_uncommitted_container(tmp_path: Path) -> None:
    """The guard costs no real leak: a new pool whose first write did not commit loses the
    file at the next open."""
    path = str(tmp_path / "p")
    create_pool(path, "p", 64 << 20)
    Path(container_file(path, 1)).write_bytes(chunk(1))  # what a cut before COMMIT leaves
    with DedupPool.open(path):
        pass
    assert container_names(path) == []
    assert check_pool(path).clean


# ----------------------------------------------------------------------------------------------
# D11: a missing container is said at open


def test_open_logs_a_missing_container_as_an_error(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = filled_pool(tmp_path)
    gone = container_file(path, 1)
    os.unlink(gone)
    with caplog.at_level(logging.ERROR), DedupPool.open(path):
        pass
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(gone in m and "missing" in m for m in errors), errors


# ----------------------------------------------------------------------------------------------
# D2: a damaged pool is one line naming the file, exit 2


def _damage(path: str, how: str) -> str:
    """Damage the pool at `path`; the file the operator must be told of."""
    index = os.path.join(path, DB_FILE)
    containers = os.path.join(path, CONTAINER_DIR)
    if how == "garbage index":
        Path(index).write_bytes(random.Random(0).randbytes(17 * CS))
    elif how == "truncated index":
        os.truncate(index, 2 * CS)
    elif how == "damaged index pages":
        with open(index, "r+b") as f:
            f.seek(3 * CS)
            f.write(random.Random(0).randbytes(2 * CS))
    elif how == "containers is a file":
        for name in container_names(path):
            os.unlink(os.path.join(containers, name))
        os.rmdir(containers)
        Path(containers).write_text("x\n")
        return containers
    return index


@pytest.mark.parametrize("how", ["garbage index", "truncated index", "damaged index pages",
                                 "containers is a file"])
@pytest.mark.parametrize("argv", [["check"], ["check", "--repair"], ["gc"]])
def test_a_damaged_pool_is_one_line_naming_the_file(
        tmp_path: Path, how: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Before: sqlite3.DatabaseError / NotADirectoryError tracebacks, exit 1."""
    path = filled_pool(tmp_path)
    # Pages of the index are in its WAL until a checkpoint: fold them in before damaging it.
    db = sqlite3.connect(os.path.join(path, DB_FILE))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    file = _damage(path, how)
    rc, out, err = run_cli([*argv, path], capsys)
    assert rc == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tcmu-py: configuration error: {file}: "), err
    assert "expected" in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_gc_on_a_damaged_container_is_one_line_naming_it(
        tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    """gc compacts container 2 (part dead); its file gone or cut short was a FileNotFoundError
    or an EIO OSError (without the file's name) traceback."""
    path = filled_pool(tmp_path)
    file = container_file(path, 2)
    if damage == "deleted":
        os.unlink(file)
    else:
        os.truncate(file, 25 * CS)
    rc, out, err = run_cli(["gc", path], capsys)
    assert rc == 2, (out, err)
    (line,) = [x for x in err.splitlines() if x.startswith("tcmu-py:")]
    assert line.startswith(f"tcmu-py: configuration error: {file}: ") and "check" in line
    assert "Traceback" not in err


@pytest.mark.parametrize(("name", "argv"), [
    (".lock", ["check"]), (".lock", ["gc"]), (".pool.json.lock", ["check"]),
    (".pool.json.lock", ["gc"]),
    (".pool.json.lock", ["create-pool", "--name", "p", "--capacity", "64M"]),
])
def test_a_lock_file_this_user_cannot_open_is_one_line(
        tmp_path: Path, name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A PermissionError on a lock file (the tests run as root: os.open is made to refuse)."""
    path = filled_pool(tmp_path)
    file = os.path.join(path, name)
    real_open = os.open

    def refusing_open(p: str, *args: object, **kw: object) -> int:
        if os.fspath(p) == file:
            raise PermissionError(13, "Permission denied", p)
        return real_open(p, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing_open)
    rc, out, err = run_cli([argv[0], path, *argv[1:]], capsys)
    assert rc == 2, (out, err)
    assert err.splitlines() == [f"tcmu-py: configuration error: {file}: Permission denied, "
                                "expected a file (and directory) this user can read and write: "
                                "run as the pool's owner"]


def test_an_index_this_user_cannot_open_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = filled_pool(tmp_path)
    index = os.path.join(path, DB_FILE)

    def refusing_connect(*args: object, **kw: object) -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite3, "connect", refusing_connect)
    for argv in (["check", path], ["gc", path], ["status", path]):
        rc, out, err = run_cli(argv, capsys)
        assert rc == 2, (argv, out, err)
        assert err.splitlines() == [f"tcmu-py: configuration error: {index}: cannot use the "
                                    "dedup index (unable to open database file), expected a "
                                    "file (and directory) this user can read and write"], argv


# ----------------------------------------------------------------------------------------------
# D3: gc's progress and what it freed


def test_gc_progress_is_monotonic_and_freed_is_net(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "freed" summed the deleted containers' sizes (the live bytes moved out counted
    as freed: more than the file system got back), and progress was 1 - dead left / dead at
    the start, which went negative while moved bytes counted as dead. One collector step per
    progress line here (a slow gc's view), the pool's containers holding live and dead bytes."""
    path = filled_pool(tmp_path)

    def one_step(self: DedupPool, max_seconds: float, *, dead_percent: int = 50
                 ) -> CollectProgress:
        step = self.collect_step(dead_percent, batch_bytes=8 * CS)
        return step or CollectProgress(0, 0, 0, self.dead_bytes(), True)

    monkeypatch.setattr(DedupPool, "collect", one_step)
    before = read_pool_status(path).used
    with DedupPool.open(path) as pool:
        want = {d: read_disk(pool, d, 256) for d in ("a", "b")}
    capsys.readouterr()
    assert dedup_config.main(["gc", path]) == 0
    out = capsys.readouterr().out
    after = read_pool_status(path).used
    shown = re.findall(r"\] +(-?[\d.]+)%  freed (\S+)", out)
    pcts = [float(p) for p, _ in shown]
    assert len(pcts) > 3, out  # several lines: the case the old figures got wrong
    assert all(0.0 <= p <= 100.0 for p in pcts) and pcts == sorted(pcts) and pcts[-1] == 100.0
    assert 0 < before - after < before
    assert shown[-1][1] == format_size(before - after), out
    with DedupPool.open(path) as pool:
        assert {d: read_disk(pool, d, 256) for d in ("a", "b")} == want


# ----------------------------------------------------------------------------------------------
# D8: create-pool on an existing pool changes only what it is told


def test_create_pool_on_an_existing_pool_keeps_what_is_not_given(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: compression fell back to none, the soft threshold to 80 and the chunk size to
    4K (an 8K pool refused the command) whenever the option was left out."""
    path = str(tmp_path / "p")
    assert dedup_config.main(["create-pool", path, "--name", "p", "--capacity", "1M",
                              "--soft-threshold", "60", "--compression", "zstd",
                              "--chunk-size", "8K"]) == 0
    assert dedup_config.main(["create-pool", path, "--name", "p", "--capacity", "2M"]) == 0
    doc = json.loads(Path(path, POOL_FILE).read_text())
    assert (doc["capacity"], doc["soft_threshold"], doc["compression"], doc["chunk_size"]) == (
        2 << 20, 60, "zstd", 8192)
    assert dedup_config.main(["create-pool", path, "--name", "p",
                              "--soft-threshold", "70"]) == 0  # capacity kept too
    doc = json.loads(Path(path, POOL_FILE).read_text())
    assert (doc["capacity"], doc["soft_threshold"], doc["compression"]) == (2 << 20, 70, "zstd")
    assert dedup_config.main(["create-pool", path, "--name", "p", "--compression", "none"]) == 0
    assert json.loads(Path(path, POOL_FILE).read_text()).get("compression", "none") == "none"
    rc, out, err = run_cli(["create-pool", path, "--name", "p", "--chunk-size", "4K"], capsys)
    assert rc == 2 and "chunk_size 4096: the pool was created with 8192" in err
    # A new pool: the defaults, and --capacity is required.
    rc, out, err = run_cli(["create-pool", str(tmp_path / "q"), "--name", "q"], capsys)
    assert rc == 2 and err.startswith("tcmu-py: configuration error: --capacity: missing")
    assert not os.path.exists(tmp_path / "q" / POOL_FILE)
    assert dedup_config.main(["create-pool", str(tmp_path / "q"), "--name", "q",
                              "--capacity", "1M"]) == 0
    doc = json.loads(Path(tmp_path, "q", POOL_FILE).read_text())
    assert (doc["soft_threshold"], doc.get("compression", "none"), doc["chunk_size"]) == (
        80, "none", 4096)


# ----------------------------------------------------------------------------------------------
# D10: check --repair says what it repaired and what it could not; exit 0 only when clean


def _damage_container(path: str, how: str) -> None:
    file = container_file(path, 1)
    if how == "flipped byte":
        with open(file, "r+b") as f:
            f.seek(5000)
            f.write(b"XXXX")
    elif how == "deleted":
        os.unlink(file)
    else:
        os.truncate(file, 10000)


@pytest.mark.parametrize("how", ["flipped byte", "deleted", "truncated"])
def test_check_repair_exits_0_once_everything_found_is_repaired(
        tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: exit 1 after a repair that fixed everything (a recount had been reported), and a
    missing or short container file was reported again by every later check, repaired never."""
    path = filled_pool(tmp_path)
    _damage_container(path, how)
    rc, out, err = run_cli(["check", path], capsys)
    assert rc == 1 and ": problem: " in out
    rc, out, err = run_cli(["check", "--repair", path], capsys)
    assert rc == 0, out
    assert ": repaired: " in out and out.rstrip().endswith(": OK after repair")
    assert "not repaired" not in out
    if how != "flipped byte":
        assert f"container 1: {'forgot it' if how == 'deleted' else 'committed size cut'}" in out
    for argv in (["check", path], ["check", "--repair", path]):
        rc, out, err = run_cli(argv, capsys)
        assert rc == 0 and out.strip() == f"{path}: OK", out
    with DedupPool.open(path) as pool:  # the chunks left read back as written
        data = read_disk(pool, "b", 100)
    good = [i for i in range(100) if data[i * CS:(i + 1) * CS] == chunk(i)]
    zeros = [i for i in range(100) if data[i * CS:(i + 1) * CS] == bytes(CS)]
    assert len(good) + len(zeros) == 100 and good


def test_check_repair_names_what_it_could_not_repair_and_exits_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A map row past its disk's recorded size is reported, not repaired: exit 1, named."""
    path = filled_pool(tmp_path)
    db = sqlite3.connect(os.path.join(path, DB_FILE))
    db.execute("UPDATE disks SET size=? WHERE name='b'", (50 * CS,))
    db.commit()
    db.close()
    rc, out, err = run_cli(["check", "--repair", path], capsys)
    assert rc == 1, out
    assert ": not repaired: disk " in out and "outside its disk" in out
    assert "OK" not in out


# ----------------------------------------------------------------------------------------------
# D9: the chunk size is recorded in the index


def _edit_chunk_size(path: str, chunk_size: int) -> None:
    file = Path(path, POOL_FILE)
    doc = json.loads(file.read_text())
    doc["chunk_size"] = chunk_size
    file.write_text(json.dumps(doc))


def test_a_hand_edited_chunk_size_is_refused(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Before: pool.json's chunk_size edited from 4096 to 8192 (a valid value) opened, `check`
    said OK and the disks read back wrong. Now the index records it: open, gc, check and
    status refuse naming pool.json and the recorded value; put back, everything reads as written."""
    path = filled_pool(tmp_path)
    with DedupPool.open(path) as pool:
        want = read_disk(pool, "b", 100)
    _edit_chunk_size(path, 8192)
    file = os.path.join(path, POOL_FILE)
    with pytest.raises(ConfigError, match=f"{file}: chunk_size: got 8192, expected 4096"):
        DedupPool.open(path)
    for argv in (["check", path], ["check", "--repair", path], ["gc", path], ["status", path]):
        rc, out, err = run_cli(argv, capsys)
        assert rc == 2 and f"{file}: chunk_size: got 8192, expected 4096" in err, argv
    _edit_chunk_size(path, 4096)
    assert check_pool(path).clean
    with DedupPool.open(path) as pool:
        assert read_disk(pool, "b", 100) == want


def test_a_pool_made_before_records_its_chunk_size_at_its_first_open(tmp_path: Path) -> None:
    path = filled_pool(tmp_path)
    db = sqlite3.connect(os.path.join(path, DB_FILE))
    db.execute("DELETE FROM meta WHERE key='chunk_size'")  # as an older version made it
    db.commit()
    db.close()
    assert check_pool(path).clean  # check records nothing
    with DedupPool.open(path):
        pass
    _edit_chunk_size(path, 8192)
    with pytest.raises(ConfigError, match="chunk_size: got 8192, expected 4096"):
        DedupPool.open(path)
