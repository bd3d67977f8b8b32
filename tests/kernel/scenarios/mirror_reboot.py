"""A mirror across a power cut (issue 16, "How we will know"): the VM is reset with ``sysrq b``
while fio writes to ext4 on a 3-leg mirror with periodic fsync, and a later boot serves the same
legs again.

The legs are three image files on ext4 on /dev/vdd, a virtio-blk disk backed by a host image
file (``tests/kernel/conftest.py``'s power-loss chain attaches it to every boot of the chain):
leg 0 is opened by the daemon as a local file, legs 1 and 2 are ``nbdkit file`` servers, each in
a network namespace of its own made here (`scenarios.mirror_disk.NbdLeg`). What the guest had not
flushed to /dev/vdd is gone after the reset, as after a power cut. The mirror has a write cache
(WCE=1): a write is acknowledged once every leg took it, and made durable on every leg by
SYNCHRONIZE CACHE, which ext4 sends on fsync; so only what was fsynced is owed after the cut.

- ``before_power_loss``: fresh ext4 on /dev/vdd holding the three leg images; `tcmu-py serve`
  a 32 MiB mirror over tcm_loop, ext4 on it; files written and fsynced, their SHA-256 sent to the
  host (9p, synchronous); then fio writes a file with an fsync every 16 blocks, rate-limited so
  that the reset comes mid-write: ``sysrq b`` once fio has written a few MiB.
- ``after_power_loss``: /dev/vdd's journal replays and ``e2fsck -fn`` finds nothing. Offline,
  before anything opens the mirror: every leg's superblock says "not clean" (the cut came while
  it was served), and every region in which the legs' data differ is named by the write-intent
  bitmap of at least one leg (the rule the unclean open relies on; the count of each is
  recorded). Served again (the NBD servers restarted): the open reconciles those regions before
  the disk serves; the mirror's ext4 replays its journal, ``fsck -fn`` is clean and every
  fsynced file reads back with its SHA-256. After a clean stop, ``tcmu-py mirror verify`` finds
  the three legs identical and ``mirror show`` finds each clean.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from guestlib import (
    Context,
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
    serve_config,
    tcmu_py,
    wait_for,
)

from scenarios.mirror_disk import NbdLeg

DISK = Path("/dev/vdd")  # conftest.POWER_LOSS_DISKS
MOUNT = Path("/tmp/mirror-legs")
EXPECTED = "expected.json"
WWN = "naa.5001405000ee00f0"
KIB = 1 << 10
MIB = 1 << 20
SIZE = 32 * MIB
REGION = 128 * KIB
#: Bytes of every leg image: the data area, then room for the mirror's metadata at its end.
LEG_BYTES = SIZE + MIB
FILES = 6  # fsynced before the cut
FIO_BYTES = 16 * MIB  # fio's file; the cut comes after CUT_AFTER of it
CUT_AFTER = 3 * MIB
FIO_RATE = "1m"  # bytes/s: the cut comes after about 3 s of fio


def _images(root: Path) -> list[Path]:
    return [root / f"leg{i}.img" for i in range(3)]


def _nbd_legs(ctx: Context, images: list[Path]) -> list[NbdLeg]:
    """Legs 1 and 2: ``nbdkit file`` in namespaces tmrb1/tmrb2, started."""
    run(["modprobe", "veth"], timeout=ctx.remaining(30), check=False)
    legs = [NbdLeg(ctx, f"tmrb{i}", f"tmrb{i}", f"10.98.{i}.1", f"10.98.{i}.2", images[i])
            for i in (1, 2)]
    for leg in legs:
        leg.setup()
        leg.start()
    return legs


def _config(ctx: Context, specs: list[str], fresh: bool) -> Path:
    cfg = ctx.workdir / "mirror.yaml"
    cfg.write_text(
        f"state_dir: {ctx.workdir / 'state'}\n"
        "defaults: {hw_max_sectors: 1024, max_data_area_mb: 16}\n"
        "devices:\n"
        f"  - name: mr\n    handler: mirror\n    size: {SIZE // MIB}M\n    wwn: {WWN}\n"
        "    write_cache: true\n"
        f"    options: {{legs: {json.dumps(specs)}, region: {REGION // KIB}K, retry: 1, "
        # new sparse files are zero, hence equal; at the second open the legs carry metadata
        f"assume_clean: {'true' if fresh else 'false'}, leg_timeout: 10}}\n"
        "exports:\n  loopback:\n    - {device: mr, lun: 0}\n")
    return cfg


@scenario(timeout=300, own_boot=True)
def before_power_loss(ctx: Context) -> None:
    """A 3-leg mirror with fsynced files and fio writing; the VM is reset mid-write."""
    run(["mkfs.ext4", "-q", "-F", str(DISK)], timeout=ctx.remaining(120))
    root = mount_power_loss_disk(ctx, DISK, MOUNT)
    images = _images(root)
    for img in images:
        with open(img, "wb") as f:
            f.truncate(LEG_BYTES)
            os.fsync(f.fileno())
    fsync_dir(root)
    from tcmu_py.daemon.control import query_status

    legs = _nbd_legs(ctx, images)
    specs = [str(images[0]), legs[0].uri, legs[1].uri]
    _, run_dir = serve_config(ctx, _config(ctx, specs, fresh=True), timeout=600)
    dev = wait_for(lambda: disk_by_wwn(WWN), ctx.remaining(120), f"mr ({WWN})")
    mnt = ctx.workdir / "mnt"
    mnt.mkdir()
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E",
         "nodiscard,lazy_itable_init=0,lazy_journal_init=0", str(dev)], timeout=ctx.remaining(120))
    run(["mount", str(dev), str(mnt)], timeout=ctx.remaining(60))

    rng = random.Random(16)
    sums: dict[str, str] = {}
    (mnt / "kept").mkdir()
    for i in range(FILES):
        data = rng.randbytes(rng.randint(64 * KIB, 512 * KIB) + rng.randint(0, 4095))
        fsync_write(mnt / "kept" / f"f{i}.bin", data)
        sums[f"kept/f{i}.bin"] = hashlib.sha256(data).hexdigest()
    fsync_dir(mnt / "kept")  # the names are durable too
    # Every leg in sync, quorum all: the daemon writes the legs in C (a FanOutExtent), and the
    # cut below lands among C's writes too
    (m,) = query_status(run_dir, timeout=ctx.remaining(60))["mirrors"]
    ctx.details["c_writes_before_fio"] = m["c_writes"]
    log(f"writes made in C so far: {m['c_writes']}")
    assert m["c_writes"] > 0, m
    save_expected(ctx, EXPECTED, {"files": sums, "specs": specs})
    power_cut_during_fio(ctx, mnt / "fio.dat", FIO_BYTES, CUT_AFTER, "--fsync=16",
                         f"--rate={FIO_RATE}", "--randseed=16")


def _offline_state(images: list[Path]) -> dict[str, Any]:
    """What the cut left on the legs, read from the image files (nothing serves them): each
    leg's superblock, the regions its bitmap names, and the regions whose data differ."""
    from tcmu_py.handlers.mirror.legs import open_leg
    from tcmu_py.handlers.mirror.mirror import (
        bitmap_bytes,
        checksum_regions,
        meta_length,
        read_superblock,
    )

    nbits = SIZE // REGION
    sbs, named, sums = [], [], []
    for img in images:
        leg = open_leg(str(img), LEG_BYTES)
        try:
            sb = read_superblock(leg)
            assert sb is not None, f"{img}: no mirror metadata after the cut"
            sbs.append(sb)
            # on-leg format (handlers/mirror/mirror.py): the bitmap opens the metadata area
            raw = bytearray(bitmap_bytes(SIZE, REGION))
            leg.read(leg.size - meta_length(SIZE, REGION), memoryview(raw))
            named.append({r for r in range(nbits) if raw[r // 8] >> (r % 8) & 1})
            sums.append(checksum_regions(leg, SIZE, REGION))
        finally:
            leg.close()
    differ = {r for r in range(nbits) if len({s[r] for s in sums}) > 1}
    union = set().union(*named)
    return {"clean": [sb.clean for sb in sbs], "generation": [sb.generation for sb in sbs],
            "bitmap_regions": [len(n) for n in named], "bitmap_union": len(union),
            "differing_regions": sorted(differ), "unnamed_differing": sorted(differ - union)}


@scenario(timeout=420, own_boot=True)
def after_power_loss(ctx: Context) -> None:
    """The legs after the reset: differences only where a bitmap names them; the mirror opens,
    reconciles them, its ext4 is clean, fsynced files intact, the legs identical after."""
    from tcmu_py.daemon.control import query_status

    expected = json.loads(
        (ctx.artifacts.parent / "mirror_reboot.before_power_loss" / EXPECTED).read_text())
    fsck_ext4(ctx, DISK)
    root = mount_power_loss_disk(ctx, DISK, MOUNT)
    images = _images(root)

    state = _offline_state(images)
    ctx.details["after_cut"] = state
    log(f"legs after the cut: {state}")
    assert state["clean"] == [False] * 3, f"a leg says clean after a cut while served: {state}"
    assert not state["unnamed_differing"], (
        f"regions differ between legs with no bitmap naming them: {state}")

    legs = _nbd_legs(ctx, images)
    specs = [str(images[0]), legs[0].uri, legs[1].uri]
    assert specs == expected["specs"], (specs, expected["specs"])
    cfg = _config(ctx, specs, fresh=False)
    t0 = time.monotonic()
    d, run_dir = serve_config(ctx, cfg, timeout=600)
    ctx.details["open_seconds"] = round(time.monotonic() - t0, 1)
    st = query_status(run_dir, timeout=ctx.remaining(60))
    (m,) = [x for x in st["mirrors"] if x["device"] == "mr"]
    ctx.details["status_after_open"] = {k: m.get(k) for k in (
        "state", "generation", "dirty_regions", "regions_copied")}
    assert m["state"] == "optimal", m
    # the open copied a region to every leg whose content lost the vote (at least one each)
    assert m["regions_copied"] >= len(state["differing_regions"]), m

    dev = wait_for(lambda: disk_by_wwn(WWN), ctx.remaining(120), f"mr ({WWN})")
    fsck_ext4(ctx, dev)
    mnt = ctx.workdir / "mnt"
    mnt.mkdir()
    run(["mount", "-o", "ro", str(dev), str(mnt)], timeout=ctx.remaining(60))
    try:
        for rel, digest in expected["files"].items():
            got = hashlib.sha256((mnt / rel).read_bytes()).hexdigest()
            assert got == digest, f"{rel}: fsynced before the cut, differs after it"
        fio_bytes = (mnt / "fio.dat").stat().st_size if (mnt / "fio.dat").exists() else None
    finally:
        run(["umount", str(mnt)], timeout=ctx.remaining(60))
    ctx.details["fsynced_files_intact"] = len(expected["files"])
    ctx.details["fio_file_bytes_after"] = fio_bytes

    run(tcmu_py("down", "-c", str(cfg)), timeout=ctx.remaining(120))
    assert d.stop(timeout=60) == 0, "serve did not exit cleanly on SIGTERM"
    files = [str(p) for p in images]
    ver = run(tcmu_py("mirror", "verify", *files), timeout=ctx.remaining(120), check=False)
    ctx.details["verify"] = ver.stdout.strip().splitlines()[-1:]
    assert ver.returncode == 0 and " 0 differ" in ver.stdout, ver.stdout + ver.stderr
    show = run(tcmu_py("mirror", "show", *files), timeout=ctx.remaining(60)).stdout
    assert show.count(", clean,") == 3, show
