"""A chunk damaged on disk and written again: the write's bytes are never merged with the
damaged copy. A SHA-256 pool rewrites the damaged copy from them (every disk naming the chunk
reads its content again); a pool of fast fingerprints stores them apart, as for a collision,
also when the damaged copy no longer decompresses (such a write failed with an I/O error)."""

from __future__ import annotations

import errno
import os
import random
import sqlite3
from pathlib import Path

import pytest

from tcmu_py.handlers.dedup import DedupPool, check_pool, create_pool
from tcmu_py.handlers.dedup.store import DB_FILE, container_file

CS = 4096
SIZE = 16 * CS


def chunk(seed: int) -> bytes:
    return random.Random(seed).randbytes(CS)


def damage_chunks(path: str, where: float, fp_len: int | None = None) -> int:
    """Flip a byte of every stored chunk (whose fingerprint is `fp_len` bytes long, if given),
    `where` into it (0: its first byte, a compressed chunk's frame header); how many."""
    db = sqlite3.connect(os.path.join(path, DB_FILE))
    try:
        rows = db.execute("SELECT container, offset, length FROM chunks WHERE ? IS NULL OR "
                          "length(fp) = ?", (fp_len, fp_len)).fetchall()
    finally:
        db.close()
    for cid, off, length in rows:
        with open(container_file(path, cid), "r+b") as f:
            f.seek(off + int(length * where))
            byte = f.read(1)
            f.seek(off + int(length * where))
            f.write(bytes([byte[0] ^ 0xFF]))
    return len(rows)


def read(pool: DedupPool, disk: str, idx: int) -> bytes:
    d = pool.open_disk(disk, SIZE)
    try:
        buf = bytearray(CS)
        d.read(idx * CS, [memoryview(buf)])
        return bytes(buf)
    finally:
        d.close()


@pytest.mark.parametrize(("fingerprint", "compression", "where"), [
    ("sha256", "none", 0.5), ("sha256", "zstd", 0.5), ("sha256", "zstd", 0.0),
    ("xxh3-128", "none", 0.5), ("xxh3-128", "zstd", 0.5), ("xxh3-128", "zstd", 0.0)])
def test_a_write_of_a_damaged_chunks_content_is_never_merged_with_the_damage(
        tmp_path: Path, fingerprint: str, compression: str, where: float) -> None:
    path = str(tmp_path / "pool")
    create_pool(path, "p", 64 * CS, compression=compression, fingerprint=fingerprint)
    data = chunk(1) if compression == "none" else b"compressible " * (CS // 13) + bytes(CS % 13)
    with DedupPool.open(path) as pool:
        a = pool.open_disk("a", SIZE)
        a.write(0, [memoryview(data)])
        a.close()
    assert damage_chunks(path, where) == 1
    assert not check_pool(path).clean  # the damage is there
    with DedupPool.open(path) as pool:
        b = pool.open_disk("b", SIZE)
        b.write(3 * CS, [memoryview(data)])  # the same content, on another disk
        b.flush()
        got = bytearray(CS)
        b.read(3 * CS, [memoryview(got)])
        assert bytes(got) == data
        b.close()
        if fingerprint == "sha256":  # rewritten: the first disk reads its data again
            assert read(pool, "a", 0) == data
    report = check_pool(path)
    if fingerprint == "sha256":
        assert report.clean, report
    else:  # stored apart: the first disk's copy stays damaged (check names it)
        assert not report.clean
    with DedupPool.open(path) as pool:  # and so after a reopen
        assert read(pool, "b", 3) == data


def test_an_xxh3_pools_second_copy_under_sha256_is_healed_when_damaged(tmp_path: Path) -> None:
    """XXH3 pool: a damaged copy makes the next write of its content go by its SHA-256 (a
    second chunk); that one damaged too, a third write of the content finds it by SHA-256,
    which is proof of content: the copy is rewritten (it was merged with the damage)."""
    path = str(tmp_path / "pool")
    create_pool(path, "p", 64 * CS, fingerprint="xxh3-128")
    data = chunk(5)
    with DedupPool.open(path) as pool:
        a = pool.open_disk("a", SIZE)
        a.write(0, [memoryview(data)])
        a.close()
    assert damage_chunks(path, 0.5) == 1
    with DedupPool.open(path) as pool:
        b = pool.open_disk("b", SIZE)
        b.write(0, [memoryview(data)])  # stored apart, under its SHA-256
        b.close()
    assert damage_chunks(path, 0.25, fp_len=32) == 1
    with DedupPool.open(path) as pool:
        c = pool.open_disk("c", SIZE)
        c.write(0, [memoryview(data)])
        c.flush()
        c.close()
        assert read(pool, "c", 0) == data
        assert read(pool, "b", 0) == data  # healed
        assert read(pool, "a", 0) != data  # the first copy stays damaged (check names it)


def test_status_shows_a_container_lost_at_the_open_and_a_read_that_fails(
        tmp_path: Path) -> None:
    """Before: a pool opened with a container file gone, or a chunk whose read failed, only
    logged an ERROR: `tcmu-py status` said ``ok`` while some of the pool's data could not be
    read. Now the pool's status names the damage and its state column says DAMAGED."""
    from tcmu_py.handlers.dedup import DedupHandler

    path = str(tmp_path / "pool")
    create_pool(path, "p", 64 * CS)
    with DedupPool.open(path) as pool:
        a = pool.open_disk("a", SIZE)
        a.write(0, [memoryview(chunk(1) + chunk(2))])
        a.flush()
        a.close()
        assert pool.status().damage_count == 0
    os.remove(container_file(path, 1))
    with DedupPool.open(path) as pool:
        st = pool.status().as_dict()
        assert st["damage_count"] == 1
        assert "container 1" in st["damage"][0] and "missing" in st["damage"][0]
        a = pool.open_disk("a", SIZE)
        with pytest.raises(OSError):
            a.read(CS, [memoryview(bytearray(CS))])
        a.close()
        st = pool.status().as_dict()
        assert st["damage_count"] == 2 and "a read failed" in st["damage"][1]
        (table,) = DedupHandler.status_tables({"dedup_pools": [st]})
        assert table.rows[0][-1] == "DAMAGED (2)"
    report = check_pool(path, repair=True)
    assert report.repaired
    with DedupPool.open(path) as pool:  # repaired: nothing more to show
        assert pool.status().damage_count == 0


def test_a_damaged_page_of_the_fingerprint_index_is_found_and_rebuilt(tmp_path: Path) -> None:
    """Before: `check` (and `--repair`) said OK for an index whose fingerprint index had a
    damaged page (its checks scan the tables and use primary keys, which do not meet it),
    and every later WRITE of new data failed with HARDWARE ERROR (the raw sqlite3 error of
    the lookup). Now the check runs SQLite's own, a WRITE meeting the damage fails as an I/O
    error (WRITE ERROR), and the repair rebuilds the index from its tables, data intact."""
    path = str(tmp_path / "pool")
    create_pool(path, "p", 512 * CS)
    data = [chunk(k) for k in range(200)]
    with DedupPool.open(path) as pool:
        a = pool.open_disk("a", 256 * CS)
        for k, d in enumerate(data):
            a.write(k * CS, [memoryview(d)])
        a.flush()
        a.close()
    index = os.path.join(path, DB_FILE)
    db = sqlite3.connect(index)
    try:
        root = dict(db.execute("SELECT name, rootpage FROM sqlite_master"))[
            "sqlite_autoindex_chunks_1"]
        page = db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()
    with open(index, "r+b") as f:  # a bad sector in the fingerprint index's root page
        f.seek((root - 1) * page + page - 96)
        f.write(b"\xff" * 90)
    report = check_pool(path)
    assert not report.clean and any(p.startswith(f"index {index}: ") for p in report.problems)
    with DedupPool.open(path) as pool:
        a = pool.open_disk("a", 256 * CS)
        with pytest.raises(OSError) as exc:
            a.write(250 * CS, [memoryview(chunk(999))])
        assert exc.value.errno == errno.EIO
        a.close()
    report = check_pool(path, repair=True)
    assert any(r.startswith("index: rebuilt from its tables") for r in report.repaired)
    assert check_pool(path).clean
    assert os.path.exists(index + ".damaged")
    with DedupPool.open(path) as pool:
        a = pool.open_disk("a", 256 * CS)
        a.write(250 * CS, [memoryview(chunk(999))])
        a.write(251 * CS, [memoryview(data[7])])  # a duplicate: found through the new index
        a.flush()
        got = bytearray(256 * CS)
        a.read(0, [memoryview(got)])
        a.close()
        assert pool.status().chunks == 201
        assert bytes(got) == b"".join(data) + bytes(50 * CS) + chunk(999) + data[7] + \
            bytes(4 * CS)
    assert check_pool(path).clean
