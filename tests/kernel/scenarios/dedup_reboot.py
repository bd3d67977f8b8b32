"""A dedup disk across a power cut (issue 14, "How we will know"): the VM is reset with
``sysrq b`` while fio writes to ext4 on a dedup disk with periodic fsync, and the next boot
serves the same pool from the same disk.

The pool lives on ext4 on /dev/vda, a virtio-blk disk backed by a host image file
(``tests/kernel/conftest.py``'s power-loss chain attaches it to both boots): what the guest has not
flushed to it is gone after the reset, as after a power cut. The dedup disk has a write cache
(WCE=1): a write is acknowledged from the pool's open transaction and made durable by
SYNCHRONIZE CACHE, which ext4 sends on fsync; so only what was fsynced is owed after the cut.

- ``before_power_loss``: fresh ext4 on /dev/vda holding the pool; `tcmu-py serve` a 32 MiB
  dedup disk over tcm_loop, ext4 on it; files written and fsynced (half of them duplicates of
  the others), their SHA-256 sent to the host (9p, synchronous); then fio writes a file with
  ``dedupe_percentage=50`` and an fsync every 32 blocks, rate-limited so that the reset comes
  mid-write: ``sysrq b`` once fio has written a few MiB.
- ``after_power_loss``: /dev/vda's journal replays and ``e2fsck -fn`` finds nothing; the pool,
  checked offline before anything opens it, has no damage (every map row names a chunk whose
  bytes match its fingerprint, reference counts exact); only container bytes past the
  committed end (appended for writes that were never committed) may be left, counted as leaks,
  which the daemon's open reclaims. Served again: the dedup disk's ext4 replays its journal,
  ``fsck -fn`` is clean, every fsynced file reads back with its SHA-256; after the daemon stops,
  the check of ``tcmu-py dedup check`` (`check_pool`) finds nothing at all.

A second dedup disk, of a pool with a write journal (handlers/dedup/journal.py), goes through
the same cut: its own fsynced files, and a fio of its own writing (rate-limited, fsync every 32
blocks) when the VM is reset, so the journal holds records not yet drained into the index. After
the reset its pool checks clean offline (the index alone is consistent; the journal is not
looked at), the daemon's open replays the journal, and its fsynced files read back too.

Removing the containers' fdatasync before COMMIT (rule 2 of handlers/dedup/store.py) makes
``after_power_loss`` fail: the offline check finds 534 problems ("container 1: file holds 0
bytes, 2183168 committed" and every chunk in it missing).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from functools import partial
from pathlib import Path

from guestlib import (
    Context,
    Daemon,
    disk_by_wwn,
    fsck_ext4,
    fsync_dir,
    fsync_write,
    log,
    mount_power_loss_disk,
    power_cut_during_fio,
    run,
    save_expected,
    scenario,
    tcmu_py,
    wait_for,
)

DISK = Path("/dev/vda")  # conftest.POWER_LOSS_DISKS
MOUNT = Path("/tmp/dedup-disk")
EXPECTED = "expected.json"
WWN = "naa.5001405000dd00f0"
WWN_J = "naa.5001405000dd00f1"  # the disk of the pool with a write journal
KIB = 1 << 10
MIB = 1 << 20
FILES = 8  # fsynced before the cut; files 4..7 repeat the bytes of 0..3
FIO_BYTES = 16 * MIB  # fio's file; the cut comes after CUT_AFTER of it
CUT_AFTER = 4 * MIB
FIO_RATE = "2m"  # bytes/s: 16 MiB would take 8 s, the cut comes at about 2 s


def _config(ctx: Context, root: Path) -> Path:
    cfg = ctx.workdir / "dedup.yaml"
    cfg.write_text(
        f"state_dir: {ctx.workdir / 'state'}\n"
        "defaults: {hw_max_sectors: 1024, max_data_area_mb: 16, write_cache: true}\n"
        "dedup_pools:\n"
        f"  - {{name: pc, path: {root / 'pool'}, capacity: 64M}}\n"
        f"  - {{name: pj, path: {root / 'pool-j'}, capacity: 64M, journal: 8M}}\n"
        "devices:\n"
        f"  - {{name: ddr, handler: dedup, size: 32M, pool: pc, wwn: {WWN}}}\n"
        f"  - {{name: ddj, handler: dedup, size: 32M, pool: pj, wwn: {WWN_J}}}\n"
        "exports:\n"
        "  loopback:\n"
        "    - {device: ddr, lun: 0}\n"
        "    - {device: ddj, lun: 1}\n"
    )
    return cfg


def _down(cfg: Path) -> None:
    """``tcmu-py down -c cfg``, in this process (`guestlib.serve_config` runs the command, whose
    interpreter start-up took up to two minutes on a loaded host). Run it while the daemon still
    serves: sd's removal of a disk whose daemon is gone waits out command timeouts (~95 s)."""
    from tcmu_py.daemon import lio
    from tcmu_py.daemon.config import load_state_dir

    lio.down(load_state_dir(str(cfg)))


def _serve(ctx: Context, cfg: Path) -> Daemon:
    """`tcmu-py serve -c cfg` until ready; on cleanup it stops and its LIO objects are taken
    down (`_down`)."""
    ready = ctx.workdir / "ready"
    d = Daemon(tcmu_py("serve", "-c", str(cfg), "--run-dir", str(ctx.workdir / "run"),
                       "--ready-file", str(ready)), ctx.artifacts / "daemon.log")
    ctx.cleanup.callback(_down, cfg)
    ctx.cleanup.callback(d.stop)
    d.start(ready=ready.exists, timeout=ctx.remaining(240))
    return d


@scenario(timeout=300, own_boot=True)
def before_power_loss(ctx: Context) -> None:
    """A dedup disk with fsynced files and fio writing; the VM is reset mid-write."""
    run(["mkfs.ext4", "-q", "-F", str(DISK)], timeout=ctx.remaining(120))
    root = mount_power_loss_disk(ctx, DISK, MOUNT)
    _serve(ctx, _config(ctx, root))
    mnts = {}
    for wwn, name in ((WWN, "ddr"), (WWN_J, "ddj")):
        dev = wait_for(partial(disk_by_wwn, wwn), ctx.remaining(120), f"{name} ({wwn})")
        mnts[wwn] = mnt = ctx.workdir / f"mnt-{name}"
        mnt.mkdir()
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E",
             "nodiscard,lazy_itable_init=0,lazy_journal_init=0", str(dev)],
            timeout=ctx.remaining(120))
        run(["mount", str(dev), str(mnt)], timeout=ctx.remaining(60))

    rng = random.Random(14)
    originals = [rng.randbytes(rng.randint(64 * KIB, 512 * KIB) + rng.randint(0, 4095))
                 for _ in range(FILES // 2)]
    sums: dict[str, str] = {}
    for i in range(FILES):
        data = originals[i % len(originals)]
        for mnt in mnts.values():
            (mnt / "kept").mkdir(exist_ok=True)
            fsync_write(mnt / "kept" / f"f{i}.bin", data)
        sums[f"kept/f{i}.bin"] = hashlib.sha256(data).hexdigest()
    for mnt in mnts.values():
        fsync_dir(mnt / "kept")  # the names are durable too
    save_expected(ctx, EXPECTED, {"files": sums})
    # The journal's disk writes too when the reset comes (its own fio, alongside).
    fio_j = subprocess.Popen(
        ["fio", "--name=journaled", f"--filename={mnts[WWN_J] / 'fio.dat'}", "--rw=write",
         "--bs=64k", f"--size={FIO_BYTES}", "--ioengine=psync", "--create_on_open=1",
         "--fallocate=none", "--fsync=32", "--dedupe_percentage=50", f"--rate={FIO_RATE}",
         "--randseed=15"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx.cleanup.callback(fio_j.kill)
    power_cut_during_fio(ctx, mnts[WWN] / "fio.dat", FIO_BYTES, CUT_AFTER, "--fsync=32",
                         "--dedupe_percentage=50", f"--rate={FIO_RATE}", "--randseed=14")


@scenario(timeout=300, own_boot=True)
def after_power_loss(ctx: Context) -> None:
    """The pool after the reset: no damage, leaks reclaimed at open, fsynced files intact."""
    from tcmu_py.handlers.dedup import check_pool

    before = ctx.artifacts.parent / "dedup_reboot.before_power_loss" / EXPECTED
    expected = json.loads(before.read_text())
    fsck_ext4(ctx, DISK)
    root = mount_power_loss_disk(ctx, DISK, MOUNT)
    pools = {"": root / "pool", "_journal": root / "pool-j"}

    # Offline, before anything opens the pools for writing: what the power cut left.
    for key, pool in pools.items():
        found = check_pool(str(pool))
        ctx.details[f"check_after_cut{key}"] = {"problems": found.problems,
                                                "leaks": found.leaks}
        log(f"pool {pool.name} after the cut: {len(found.problems)} problem(s), "
            f"{len(found.leaks)} leak(s): {found.leaks}")
        assert not found.problems, f"the power cut damaged {pool}: {found.problems}"

    cfg = _config(ctx, root)
    d = _serve(ctx, cfg)
    for key, wwn in (("", WWN), ("_journal", WWN_J)):
        dev = wait_for(partial(disk_by_wwn, wwn), ctx.remaining(120), wwn)
        fsck_ext4(ctx, dev)
        mnt = ctx.workdir / f"mnt{key}"
        mnt.mkdir()
        run(["mount", "-o", "ro", str(dev), str(mnt)], timeout=ctx.remaining(60))
        try:
            for rel, digest in expected["files"].items():
                got = hashlib.sha256((mnt / rel).read_bytes()).hexdigest()
                assert got == digest, f"{wwn} {rel}: fsynced before the cut, differs after it"
            fio_bytes = (mnt / "fio.dat").stat().st_size if (mnt / "fio.dat").exists() else None
        finally:
            run(["umount", str(mnt)], timeout=ctx.remaining(60))
        ctx.details[f"fsynced_files_intact{key}"] = len(expected["files"])
        ctx.details[f"fio_file_bytes_after{key}"] = fio_bytes

    _down(cfg)
    assert d.stop(timeout=60) == 0, "serve did not exit cleanly on SIGTERM"
    log_text = (ctx.artifacts / "daemon.log").read_text(errors="replace")
    ctx.details["daemon_open"] = [line for line in log_text.splitlines()
                                  if "recount" in line or "repaired" in line or " cut " in line
                                  or "removed container" in line or "replayed" in line]
    # `tcmu-py dedup check`'s own function, in this process (no CLI start-up to pay).
    for key, pool in pools.items():
        report = check_pool(str(pool))
        ctx.details[f"check_after_serve{key}"] = {"problems": report.problems,
                                                  "leaks": report.leaks}
        assert report.clean, f"dedup check of {pool} after serving: {report}"
