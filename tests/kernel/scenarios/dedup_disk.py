"""The ``dedup`` handler against the real kernel (issue 14): two disks of one dedup pool through
tcm_loop, each holding ext4 with the same tree of files: the pool's unique data is about one
copy of the tree while the disks hold two; fsck is clean on both and the files read back. fio
with ``dedupe_percentage`` and ``verify=crc32c`` writes and verifies one disk; ``tcmu-py status``
shows the pool's logical and unique data and the ratio."""

from __future__ import annotations

import hashlib
import json
import random
from functools import partial
from pathlib import Path

from guestlib import CORE, Context, disk_by_wwn, log, run, scenario, serve_config, tcmu_py, wait_for

MIB = 1 << 20
WWNS = {"dd0": "naa.5001405000dd0000", "dd1": "naa.5001405000dd0001"}
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


def pool_status(ctx: Context, run_dir: Path) -> dict:  # type: ignore[type-arg]
    st = json.loads(run(tcmu_py("status", "-i", "0", "--json", "--run-dir", str(run_dir)),
                        timeout=ctx.remaining(60)).stdout)
    (pool,) = st["dedup_pools"]
    return pool  # type: ignore[no-any-return]


@scenario(timeout=720)
def two_disks_one_copy(ctx: Context) -> None:
    cfg = ctx.workdir / "dedup.yaml"
    cfg.write_text(
        f"state_dir: {ctx.workdir / 'state'}\n"
        "defaults: {hw_max_sectors: 1024, max_data_area_mb: 16, write_cache: false}\n"
        "dedup_pools:\n"
        f"  - {{name: dp, path: {ctx.workdir / 'pool'}, capacity: 192M}}\n"
        "devices:\n"
        f"  - {{name: dd0, handler: dedup, size: 64M, pool: dp, wwn: {WWNS['dd0']}}}\n"
        f"  - {{name: dd1, handler: dedup, size: 64M, pool: dp, wwn: {WWNS['dd1']}}}\n"
        "exports:\n"
        "  loopback:\n"
        "    - {device: dd0, lun: 0}\n"
        "    - {device: dd1, lun: 1}\n"
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

    # The files read back from the second disk.
    mnt = ctx.workdir / "mnt-dd1"
    run(["mount", "-o", "ro", str(devs["dd1"]), str(mnt)], timeout=ctx.remaining(60))
    try:
        for rel, digest in sums.items():
            assert hashlib.sha256((mnt / rel).read_bytes()).hexdigest() == digest, rel
    finally:
        run(["umount", str(mnt)], timeout=ctx.remaining(120))

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

    gone = run(tcmu_py("down", "-c", str(cfg)), timeout=ctx.remaining(120))
    log(gone.stdout + gone.stderr)
    assert not list(CORE.glob("user_*/dd*")), "down left backstores"
    assert d.stop(timeout=60) == 0, "serve did not exit cleanly on SIGTERM"
    chk = run(tcmu_py("dedup", "check", str(ctx.workdir / "pool")), timeout=ctx.remaining(120),
              check=False)
    ctx.details["check"] = chk.stdout + chk.stderr
    assert chk.returncode == 0, f"dedup check: exit {chk.returncode}\n{chk.stdout}{chk.stderr}"
