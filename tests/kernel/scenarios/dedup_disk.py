"""The ``dedup`` handler against the real kernel (issue 14): two disks of one dedup pool through
tcm_loop, each holding ext4 with the same tree of files: the pool's unique data is about one
copy of the tree while the disks hold two; fsck is clean on both and the files read back. fio
with ``dedupe_percentage`` and ``verify=crc32c`` writes and verifies one disk; ``tcmu-py status``
shows the pool's logical and unique data and the ratio.

Then, on a fresh disk of a second pool (``dd2`` of ``dq``), fio with
``dedupe_percentage=75`` and no verify (its verify headers would make every block unique)
writes data whose duplicates the pool must count: its ratio is compared with one computed in
the guest by reading the disk back and counting distinct non-zero 4 KiB blocks. Then ext4 on
that disk gets a file, the file is deleted and ``fstrim`` run: the pool's container files on the
file system holding it shrink, with no ``tcmu-py dedup gc`` (the collector runs inside the
daemon)."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import re
import time
from functools import partial
from pathlib import Path

from guestlib import CORE, Context, disk_by_wwn, log, run, scenario, serve_config, tcmu_py, wait_for

MIB = 1 << 20
WWNS = {"dd0": "naa.5001405000dd0000", "dd1": "naa.5001405000dd0001"}
DD2_WWN = "naa.5001405000dd0002"
CHUNK = 4096
FILE_BYTES = 8 * MIB  # written, deleted and trimmed on the dedup disk of pool dq
TREE_FILES = 48
TREE_BYTES = 12 * MIB


def make_tree(root: Path, seed: int = 14) -> dict[str, str]:
    """``TREE_FILES`` files of incompressible data, ``TREE_BYTES`` in all, sizes varied (not
    chunk-aligned); their SHA-256 by relative path."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 100) for _ in range(TREE_FILES)]
    scale = TREE_BYTES / sum(sizes)
    out = {}
    for i, s in enumerate(sizes):
        data = rng.randbytes(max(1, int(s * scale)))
        path = root / f"d{i % 6}" / f"f{i:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def status(ctx: Context, run_dir: Path) -> dict:  # type: ignore[type-arg]
    out = run(tcmu_py("status", "-i", "0", "--json", "--run-dir", str(run_dir)),
              timeout=ctx.remaining(60)).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def pool_status(ctx: Context, run_dir: Path, name: str = "dp") -> dict:  # type: ignore[type-arg]
    (pool,) = [p for p in status(ctx, run_dir)["dedup_pools"] if p["name"] == name]
    return pool  # type: ignore[no-any-return]


def c_commands(ctx: Context, run_dir: Path, name: str) -> int:
    """Commands of device `name` the native loop executed itself (a dedup disk's: READs)."""
    (dev,) = [d for d in status(ctx, run_dir)["devices"] if d["name"] == name]
    return int(dev["data_plane"]["commands"])


def distinct_blocks(dev: Path) -> tuple[int, int]:
    """(non-zero 4 KiB blocks, distinct non-zero 4 KiB blocks) of the whole disk, read back
    (O_DIRECT, 1 MiB at a time: what the disk holds, not the page cache)."""
    zero = bytes(CHUNK)
    nonzero = 0
    seen: set[bytes] = set()
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT needs
    try:
        while n := os.readv(fd, [buf]):
            for i in range(0, n, CHUNK):
                block = buf[i : i + CHUNK]
                if block != zero:
                    nonzero += 1
                    seen.add(hashlib.sha256(block).digest())
    finally:
        os.close(fd)
        buf.close()
    return nonzero, len(seen)


def committed_status(pool: Path) -> dict:  # type: ignore[type-arg]
    """The pool's figures as its index holds them, read in this process (read-only; what the
    daemon committed: all of it, its disks have no write cache)."""
    from tcmu_py.handlers.dedup import read_pool_status

    return read_pool_status(str(pool)).as_dict()


def container_bytes(pool: Path) -> tuple[int, int]:
    """(apparent size, bytes allocated on the file system) of the pool's container files."""
    size = allocated = 0
    for f in (pool / "containers").iterdir():
        st = f.stat()
        size += st.st_size
        allocated += st.st_blocks * 512
    return size, allocated


@scenario(timeout=720)
def two_disks_one_copy(ctx: Context) -> None:
    cfg = ctx.workdir / "dedup.yaml"
    cfg.write_text(
        f"state_dir: {ctx.workdir / 'state'}\n"
        "defaults: {hw_max_sectors: 1024, max_data_area_mb: 16, write_cache: false}\n"
        "dedup_pools:\n"
        f"  - {{name: dp, path: {ctx.workdir / 'pool'}, capacity: 192M}}\n"
        f"  - {{name: dq, path: {ctx.workdir / 'pool2'}, capacity: 96M}}\n"
        "devices:\n"
        f"  - {{name: dd0, handler: dedup, size: 64M, pool: dp, wwn: {WWNS['dd0']}}}\n"
        f"  - {{name: dd1, handler: dedup, size: 64M, pool: dp, wwn: {WWNS['dd1']}}}\n"
        f"  - {{name: dd2, handler: dedup, size: 16M, pool: dq, wwn: {DD2_WWN}}}\n"
        "exports:\n"
        "  loopback:\n"
        "    - {device: dd0, lun: 0}\n"
        "    - {device: dd1, lun: 1}\n"
        "    - {device: dd2, lun: 2}\n"
    )
    d, run_dir = serve_config(ctx, cfg)
    devs: dict[str, Path] = {}
    for name, wwn in WWNS.items():
        devs[name] = wait_for(partial(disk_by_wwn, wwn), ctx.remaining(120), f"{name} ({wwn})")
    log(f"disks: {devs}")
    empty = pool_status(ctx, run_dir)
    ctx.details["empty"] = empty

    src = ctx.workdir / "tree"
    sums = make_tree(src)
    for name, dev in devs.items():
        mnt = ctx.workdir / f"mnt-{name}"
        mnt.mkdir()
        # No discard at mkfs (nothing to discard yet) and metadata written now, not lazily.
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E",
             "nodiscard,lazy_itable_init=0,lazy_journal_init=0", str(dev)],
            timeout=ctx.remaining(180))
        run(["mount", str(dev), str(mnt)], timeout=ctx.remaining(60))
        run(["cp", "-a", f"{src}/.", str(mnt)], timeout=ctx.remaining(180))
        run(["umount", str(mnt)], timeout=ctx.remaining(120))
        fsck = run(["fsck.ext4", "-f", "-n", str(dev)], timeout=ctx.remaining(120), check=False)
        assert fsck.returncode == 0, f"fsck {name}: exit {fsck.returncode}\n{fsck.stdout}"
    full = pool_status(ctx, run_dir)
    ctx.details["two_trees"] = full
    log(f"pool with the tree on both disks: {full}")
    # Both disks hold the tree; the pool holds it about once (plus each file system's own
    # metadata, which differs between the two: UUIDs, timestamps, checksums).
    assert full["logical"] >= 2 * TREE_BYTES, full
    assert full["unique"] - empty["unique"] < 1.5 * TREE_BYTES, full
    assert full["ratio"] > 1.5, full
    # SBC-4 6.4.5.5: what deduplication saves, as sg_logs reads it from LOG SENSE 0Ch, in
    # threshold sets (one 4 KiB chunk: VPD B2h's exponent for 512-byte blocks).
    lbp = run(["sg_logs", "-p", "0xc", str(devs["dd1"])], timeout=ctx.remaining(60)).stdout
    ctx.details["sg_logs_0c"] = lbp
    m = re.search(r"De-duplicated LBA resource count:\s*(\d+)", lbp)
    assert m, lbp
    assert int(m.group(1)) == (full["logical"] - full["unique"]) // CHUNK, (lbp, full)

    # The files read back from the second disk: by the native loop, from the chunk table the
    # writes filled (a dedup disk's READs in C).
    mnt = ctx.workdir / "mnt-dd1"
    c0 = c_commands(ctx, run_dir, "dd1")
    run(["mount", "-o", "ro", str(devs["dd1"]), str(mnt)], timeout=ctx.remaining(60))
    try:
        for rel, digest in sums.items():
            assert hashlib.sha256((mnt / rel).read_bytes()).hexdigest() == digest, rel
    finally:
        run(["umount", str(mnt)], timeout=ctx.remaining(120))
    ctx.details["dd1_c_reads"] = c_reads = c_commands(ctx, run_dir, "dd1") - c0
    log(f"dd1: {c_reads} READs served by the native loop while the tree was read back")
    assert c_reads > 0

    # fio with duplicate data and verification on the first disk (its file system goes).
    out = run(["fio", "--name=dedupe", f"--filename={devs['dd0']}", "--rw=write", "--bs=64k",
               "--size=24M", "--direct=1", "--ioengine=psync", "--dedupe_percentage=75",
               "--verify=crc32c", "--verify_fatal=1", "--randseed=14"],
              timeout=ctx.remaining(240), check=False)
    ctx.details["fio"] = out.stdout[-2000:]
    assert out.returncode == 0, f"fio: exit {out.returncode}\n{out.stdout}{out.stderr}"
    after = pool_status(ctx, run_dir)
    ctx.details["after_fio"] = after
    log(f"pool after fio: {after}")

    started = time.monotonic()
    dd2 = wait_for(partial(disk_by_wwn, DD2_WWN), ctx.remaining(120), f"dd2 ({DD2_WWN})")
    dedupe_ratio(ctx, dd2)
    space_back(ctx, run_dir, dd2)
    dd2_seconds = time.monotonic() - started

    gone = run(tcmu_py("down", "-c", str(cfg)), timeout=ctx.remaining(120))
    log(gone.stdout + gone.stderr)
    assert not list(CORE.glob("user_*/dd*")), "down left backstores"
    assert d.stop(timeout=60) == 0, "serve did not exit cleanly on SIGTERM"
    check_pool_offline(ctx, ctx.workdir / "pool")
    started = time.monotonic()
    from tcmu_py.handlers.dedup import check_pool  # in this process: no CLI start-up to pay

    report = check_pool(str(ctx.workdir / "pool2"))
    assert report.clean, report
    dd2_seconds += time.monotonic() - started
    ctx.details["dd2_seconds"] = round(dd2_seconds, 1)
    log(f"fio ratio, fstrim and check on dd2 took {dd2_seconds:.1f} s")


def check_pool_offline(ctx: Context, pool: Path) -> None:
    chk = run(tcmu_py("dedup", "check", str(pool)), timeout=ctx.remaining(120), check=False)
    ctx.details[f"check_{pool.name}"] = chk.stdout + chk.stderr
    assert chk.returncode == 0, f"dedup check {pool}: exit {chk.returncode}\n{chk.stdout}" \
        f"{chk.stderr}"


def dedupe_ratio(ctx: Context, dev: Path) -> None:
    """fio with 75 % duplicate buffers and no verify on the fresh disk of pool ``dq``: the
    pool's ratio is within 5 % of the one counted by reading the disk back."""
    out = run(["fio", "--name=dedupe75", f"--filename={dev}", "--rw=write", "--bs=64k",
               "--size=8M", "--direct=1", "--ioengine=psync", "--dedupe_percentage=75",
               "--randseed=14"], timeout=ctx.remaining(240), check=False)
    assert out.returncode == 0, f"fio: exit {out.returncode}\n{out.stdout}{out.stderr}"
    nonzero, distinct = distinct_blocks(dev)
    expected = nonzero / distinct
    st = committed_status(ctx.workdir / "pool2")
    ctx.details["fio75"] = {"pool": st, "nonzero_blocks": nonzero, "distinct_blocks": distinct,
                            "expected_ratio": round(expected, 3)}
    log(f"fio dedupe_percentage=75: read back {nonzero} non-zero blocks, {distinct} distinct "
        f"(ratio {expected:.3f}); pool: {st}")
    assert st["logical"] == nonzero * CHUNK, st
    assert abs(st["ratio"] - expected) <= 0.05 * expected, (st["ratio"], expected)
    assert st["ratio"] > 2, st  # fio did write duplicates: 75 % of its buffers


def space_back(ctx: Context, run_dir: Path, dev: Path) -> None:
    """ext4 on the disk of pool ``dq`` (no discard at mkfs: fio's data stays), an 8 MiB file,
    deleted, fstrim: the container files shrink on the file system with no ``dedup gc``."""
    pool = ctx.workdir / "pool2"
    mnt = ctx.workdir / "mnt-dd2"
    mnt.mkdir()
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E",
         "nodiscard,lazy_itable_init=0,lazy_journal_init=0", str(dev)], timeout=ctx.remaining(180))
    run(["mount", str(dev), str(mnt)], timeout=ctx.remaining(60))
    try:
        (mnt / "big.bin").write_bytes(random.Random(15).randbytes(FILE_BYTES))
        run(["sync", "-f", str(mnt)], timeout=ctx.remaining(300))
        written = container_bytes(pool)
        written_st = committed_status(pool)
        (mnt / "big.bin").unlink()
        run(["sync", "-f", str(mnt)], timeout=ctx.remaining(300))
        trimmed = run(["fstrim", "-v", str(mnt)], timeout=ctx.remaining(120)).stdout.strip()
        t0 = time.monotonic()

        def shrunk() -> tuple[int, int] | None:
            now = container_bytes(pool)
            return now if written[1] - now[1] >= FILE_BYTES else None

        after = wait_for(shrunk, ctx.remaining(120), "the collector to give the file's bytes back")
        waited = time.monotonic() - t0
        st = pool_status(ctx, run_dir, "dq")
    finally:
        run(["umount", str(mnt)], timeout=ctx.remaining(120))
    ctx.details["fstrim"] = {"fstrim": trimmed, "before": written, "after": after,
                             "freed_allocated": written[1] - after[1],
                             "pool_before": written_st, "pool_after": st,
                             "collector_seconds": round(waited, 1)}
    log(f"fstrim: {trimmed}; containers {written} -> {after} bytes (size, allocated) in "
        f"{waited:.1f} s; pool {written_st['used']} -> {st['used']} used")
    assert st["used"] <= written_st["used"] - FILE_BYTES, st
    assert st["collected"] >= FILE_BYTES and st["collector"] in ("idle", "compacting"), st
    assert os.path.isdir(pool / "containers")
