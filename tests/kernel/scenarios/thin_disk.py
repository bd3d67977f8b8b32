"""`tcmu-py serve` with the `thin` handler against the real kernel: Linux's choice of UNMAP, ext4 +
fstrim / blkdiscard giving space back to the pool, the sg3_utils view of logical block
provisioning (GET LBA STATUS, UNMAP, WRITE SAME with UNMAP, VPD B0h/B2h, LOG SENSE 0Ch), an
overcommitted pool running out of space (soft threshold first, then ENOSPC, never corruption) and
pool accounting across daemon restarts (SIGTERM and kill -9).

What Debian's 6.1 kernel does with our sense data (checked in drivers/scsi of that kernel):

- UNIT ATTENTION 38h/07h: ``scsi_report_sense`` logs "Warning! Received an indication that the
  LUN reached a thin provisioning soft threshold." and sends a uevent with
  ``SDEV_UA=THIN_PROVISIONING_SOFT_THRESHOLD_REACHED``; the command is retried.
- DATA PROTECT 27h/07h: the sense is logged ("Sense Key : Data Protect", "Add. Sense: Space
  allocation failed write protect"), ``scsi_check_sense`` turns it into an allocation failure
  that the block layer completes with BLK_STS_NOSPC, logged as "critical space allocation error,
  dev sdX, sector ..." and returned to the submitter as ENOSPC: an O_DIRECT write() fails with
  ENOSPC. Buffered writes fail later, in ext4's write-back: it logs "EXT4-fs warning ...
  ext4_end_bio: I/O error 3 writing to inode ..." (3 = BLK_STS_NOSPC) and "Buffer I/O error on
  device sdX, logical block ..." per block, and fsync returned EIO in our runs — Linux's choice,
  recorded by the overcommit scenario rather than asserted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

from guestlib import (
    CORE,
    DEFAULT_CONTROL,
    Context,
    LoopbackLun,
    UserBackstore,
    create_loopback_lun,
    log,
    read_attr,
    run,
    scenario,
    wait_for,
    write_attr,
)

from scenarios.daemon_disk import served, start_daemon

MIB = 1 << 20
BLOCK = 512
UNIT = 64 * 1024  # the pool's allocation unit (handlers/thin DEFAULT_UNIT)
UNIT_BLOCKS = UNIT // BLOCK
CONTROL: dict[str, str | int] = {"hw_max_sectors": 1024, "max_data_area_mb": 64}

# ext4 whose metadata (inode tables, journal) is written — hence allocated in the pool — by mkfs,
# not deallocated by a discard or left for ext4lazyinit (which zeroes with WRITE SAME + UNMAP):
# when the pool runs out, only file data needs new allocations, so only file writes fail.
MKFS_PREALLOCATED = [
    "mkfs.ext4", "-q", "-F", "-b", "4096", "-N", "1024", "-J", "size=4",
    "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
]

SOFT_THRESHOLD_MSG = "reached a thin provisioning soft threshold"
ENOSPC_MSG = "critical space allocation error"


# ------------------------------------------------------------------------------------------------
# Set-up helpers


def make_pool(ctx: Context, name: str, capacity: int, soft_threshold: int | None) -> Path:
    """Create a pool directory on the guest's scratch tmpfs (the daemon opens it)."""
    from tcmu_py.handlers.thin import create_pool

    path = ctx.workdir / name
    create_pool(str(path), name, capacity, soft_threshold)
    log(f"pool {name}: {path}, capacity {capacity}, soft threshold {soft_threshold}%")
    return path


def user_backstore(
    ctx: Context, name: str, config: str, size: int, *, write_cache: bool = False,
    attrib: dict[str, int] | None = None,
) -> UserBackstore:
    """Like guestlib.create_user_backstore, plus ``emulate_write_cache`` and `attrib` written
    before enable (afterwards emulate_write_cache would make the kernel send a netlink RECONFIG)."""
    used = {int(p.name[5:]) for p in CORE.glob("user_*") if p.name[5:].isdigit()}
    bs = UserBackstore(next(n for n in range(1 << 16) if n not in used), name, config, size)
    bs.path.mkdir(parents=True)
    ctx.cleanup.callback(bs.remove)
    write_attr(bs.path / "control", f"dev_config={config}")
    write_attr(bs.path / "control", f"dev_size={size}")
    for key, value in {**DEFAULT_CONTROL, **CONTROL}.items():
        write_attr(bs.path / "control", f"{key}={value}")
    for key, value in {"emulate_write_cache": int(write_cache), **(attrib or {})}.items():
        write_attr(bs.path / "attrib" / key, value)
    write_attr(bs.path / "enable", 1)
    bs.wait_uio(ctx.remaining(30))
    return bs


def export(ctx: Context, bs: UserBackstore, run_dir: Path) -> tuple[LoopbackLun, Path]:
    """Wait until the daemon serves `bs`, export it through tcm_loop; (LUN, /dev/sdX)."""
    wait_for(lambda: served(run_dir, bs.name), ctx.remaining(60), f"daemon serving {bs.name}")
    lun = create_loopback_lun(bs, cleanup=ctx.cleanup)
    dev = lun.wait_device("block", ctx.remaining(90))
    log(f"{bs.name}: {dev}")
    return lun, dev


def thin_disk(
    ctx: Context, pool: Path, name: str, size: int, run_dir: Path, *, write_cache: bool = False,
    survive_restarts: bool = False,
) -> tuple[UserBackstore, LoopbackLun, Path]:
    """A thin disk of `pool`, served and exported. With `survive_restarts`, commands wait for a
    daemon however long it takes to come back (TCMU cmd_time_out 0, sd timeout 900 s): a
    restart under software emulation takes minutes, longer than both defaults (30 s)."""
    attrib = {"cmd_time_out": 0} if survive_restarts else None
    bs = user_backstore(ctx, name, f"thin/pool={pool};disk={name}", size, write_cache=write_cache,
                        attrib=attrib)
    lun, dev = export(ctx, bs, run_dir)
    if survive_restarts:
        write_attr(Path("/sys/block") / dev.name / "device" / "timeout", 900)
    return bs, lun, dev


def pool_used(pool: Path) -> tuple[int, dict[str, int]]:
    """(pool bytes used, {disk: bytes used}) by scanning the disk files (no lock needed)."""
    from tcmu_py.handlers.thin import read_pool_status

    st = read_pool_status(str(pool))
    return st.used, {d.name: d.used for d in st.disks}


def sg(ctx: Context, *argv: str) -> str:
    return run(list(argv), timeout=ctx.remaining(120)).stdout


def field(text: str, label: str) -> str:
    """The value after ``label:`` on its line in sg3_utils output (fails naming the label)."""
    m = re.search(re.escape(label) + r":\s*(\S+)", text)
    assert m, f"{label!r} not in:\n{text}"
    return m.group(1)


def lba_status(ctx: Context, dev: Path, num_blocks: int) -> list[tuple[int, int, int]]:
    """The whole device's GET LBA STATUS runs (lba, blocks, p_status), merged, from
    ``sg_get_lba_status --brief``, asking again from where the last answer ended."""
    runs: list[tuple[int, int, int]] = []
    lba = 0
    while lba < num_blocks:
        out = sg(ctx, "sg_get_lba_status", "-b", "--maxlen=4096", f"--lba={lba}", str(dev))
        got = [
            (int(a, 16), int(n, 16), int(p))
            for a, n, p in re.findall(r"^0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+(\d+)\s+\d+", out, re.M)
        ]
        assert got and got[0][0] == lba, f"GET LBA STATUS from {lba}: first descriptor:\n{out}"
        for a, n, p in got:
            assert n > 0, f"empty descriptor at {a}:\n{out}"
            if runs and runs[-1][2] == p and runs[-1][0] + runs[-1][1] == a:
                runs[-1] = (runs[-1][0], runs[-1][1] + n, p)
            else:
                runs.append((a, n, p))
        lba = got[-1][0] + got[-1][1]
    assert lba == num_blocks, f"descriptors end at {lba}, device has {num_blocks} blocks"
    return runs


def mapped_blocks(runs: list[tuple[int, int, int]]) -> int:
    return sum(n for _, n, p in runs if p == 0)


def status_at(runs: list[tuple[int, int, int]], lba: int) -> int:
    return next(p for a, n, p in runs if a <= lba < a + n)


def lbp_log(ctx: Context, dev: Path) -> tuple[int, int]:
    """(available, used) LBA mapping resource counts from LOG SENSE page 0Ch."""
    out = sg(ctx, "sg_logs", "-p", "0xc", str(dev))
    # SBC-4 6.4.5: the pool may be shared by several logical units.
    assert out.count("Scope: not dedicated to lu") == 2, out
    avail = int(field(out, "Available LBA mapping threshold resource count"))
    used = int(field(out, "Used LBA mapping threshold resource count"))
    return avail, used


def dd(ctx: Context, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["dd", *args], timeout=ctx.remaining(300), check=check)


def read_direct(ctx: Context, dev: Path, offset: int, length: int) -> bytes:
    """Read from the device itself, bypassing the page cache (SG_IO changes do not invalidate
    it). `offset` and `length` are multiples of 64 KiB."""
    argv = ["dd", f"if={dev}", "bs=64k", f"skip={offset // UNIT}", f"count={length // UNIT}",
            "iflag=direct", "status=none"]
    res = subprocess.run(argv, capture_output=True, timeout=ctx.remaining(60), check=True)
    assert len(res.stdout) == length, f"{argv}: read {len(res.stdout)} bytes"
    return res.stdout


def kmsg_mark(text: str) -> None:
    with open("/dev/kmsg", "w") as f:
        f.write(f"tcmu-py: {text}\n")


def dmesg_since(mark: str) -> list[str]:
    lines = run(["dmesg"], timeout=60).stdout.splitlines()
    idx = max((i for i, ln in enumerate(lines) if f"tcmu-py: {mark}" in ln), default=-1)
    assert idx >= 0, f"kernel log mark {mark!r} not found"
    return lines[idx + 1 :]


def mount(ctx: Context, dev: Path, mnt: Path) -> None:
    mnt.mkdir(exist_ok=True)
    run(["mount", str(dev), str(mnt)], timeout=ctx.remaining(60))
    ctx.cleanup.callback(lambda: run(["umount", "-l", str(mnt)], check=False, timeout=60))


def umount_fsck(ctx: Context, dev: Path, mnt: Path) -> str:
    run(["umount", str(mnt)], timeout=ctx.remaining(120))
    out = run(["fsck.ext4", "-f", "-n", str(dev)], timeout=ctx.remaining(180), check=False)
    assert out.returncode == 0, f"fsck exit {out.returncode}:\n{out.stdout}{out.stderr}"
    return out.stdout


def sd_sysfs(dev: Path) -> dict[str, str]:
    """Linux's logical block provisioning view of the disk."""
    blk = Path("/sys/block") / dev.name
    disk = next((blk / "device" / "scsi_disk").iterdir())
    return {
        "provisioning_mode": read_attr(disk / "provisioning_mode"),
        "thin_provisioning": read_attr(disk / "thin_provisioning"),
        "discard_max_bytes": read_attr(blk / "queue" / "discard_max_bytes"),
        "discard_granularity": read_attr(blk / "queue" / "discard_granularity"),
        "write_zeroes_max_bytes": read_attr(blk / "queue" / "write_zeroes_max_bytes"),
    }


# ------------------------------------------------------------------------------------------------
# Scenarios


@scenario(timeout=900)
def ext4_trim_and_sg(ctx: Context) -> None:
    """ext4 + fstrim gives space back; Linux picks UNMAP; blkdiscard frees a whole disk;
    sg_vpd/sg_readcap/sg_get_lba_status/sg_unmap/sg_write_same/sg_logs field by field."""
    _, run_dir = start_daemon(ctx)
    pool = make_pool(ctx, "pool1", 256 * MIB, 90)
    size = 128 * MIB
    _, _, dev = thin_disk(ctx, pool, "tfs0", size, run_dir)

    # --- Linux's view: UNMAP as discard mode, granularity = allocation unit
    sysfs = sd_sysfs(dev)
    log(f"sysfs: {sysfs}")
    assert sysfs["provisioning_mode"] == "unmap", sysfs
    assert sysfs["thin_provisioning"] == "1", sysfs
    assert int(sysfs["discard_max_bytes"]) > 0, sysfs
    assert int(sysfs["discard_granularity"]) == UNIT, sysfs
    ctx.details["sysfs"] = sysfs

    out = sg(ctx, "sg_readcap", "-l", str(dev))
    assert "Logical block provisioning: lbpme=1, lbprz=1" in out, out
    out = sg(ctx, "sg_vpd", "-p", "lbpv", str(dev))
    for label, want in (
        ("Unmap command supported (LBPU)", "1"),
        ("Write same (16) with unmap bit supported (LBPWS)", "1"),
        ("Write same (10) with unmap bit supported (LBPWS10)", "1"),
        ("Logical block provisioning read zeros (LBPRZ)", "1"),
        ("Anchored LBAs supported (ANC_SUP)", "0"),
        ("Threshold exponent", "7"),  # 2**7 blocks of 512 = the 64 KiB unit
        ("Provisioning type", "2"),  # thin
    ):
        assert field(out, label) == want, f"{label}: expected {want}\n{out}"
    out = sg(ctx, "sg_vpd", "-p", "bl", str(dev))
    # sg_vpd prints 0xffffffff (no limit) as -1, and some counts in hex.
    max_unmap = int(field(out, "Maximum unmap LBA count"), 0)
    assert max_unmap == -1 or max_unmap >= UNIT_BLOCKS, out
    assert int(field(out, "Maximum unmap block descriptor count"), 0) > 1, out
    assert int(field(out, "Optimal unmap granularity"), 0) == UNIT_BLOCKS, out
    assert field(out, "Unmap granularity alignment valid") == "true", out
    assert int(field(out, "Unmap granularity alignment"), 0) == 0, out
    assert int(field(out, "Maximum write same length"), 0) > 0, out

    runs = lba_status(ctx, dev, size // BLOCK)
    assert runs == [(0, size // BLOCK, 1)], f"fresh disk not all deallocated: {runs}"
    assert pool_used(pool)[0] == 0

    # --- ext4: write, delete, fstrim
    # mkfs discards the device first (a discard of everything), then writes its metadata.
    run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(dev)],
        timeout=ctx.remaining(300))
    after_mkfs = pool_used(pool)[0]
    mnt = ctx.workdir / "mnt"
    mount(ctx, dev, mnt)
    files = {}
    for i in range(24):
        data = os.urandom(2 * MIB - 4096 * (i % 3))
        (mnt / f"f{i}").write_bytes(data)
        files[i] = data
    run(["sync"], timeout=ctx.remaining(120))
    written = pool_used(pool)[0]
    assert written >= after_mkfs + 44 * MIB, f"pool used {written} after writing ~47 MiB"
    for i in range(0, 24, 2):
        (mnt / f"f{i}").unlink()
    run(["sync"], timeout=ctx.remaining(60))
    deleted = pool_used(pool)[0]
    assert abs(deleted - written) <= MIB, f"deleting without trim: {written} -> {deleted}"
    out = run(["fstrim", "-v", str(mnt)], timeout=ctx.remaining(300)).stdout
    trimmed = int(re.search(r"\((\d+) bytes\) trimmed", out).group(1))  # type: ignore[union-attr]
    trimmed_used = pool_used(pool)[0]
    log(f"pool used: mkfs {after_mkfs}, written {written}, after fstrim {trimmed_used}")
    assert deleted - trimmed_used >= 20 * MIB, f"fstrim freed only {deleted - trimmed_used}"
    for i in range(1, 24, 2):
        assert (mnt / f"f{i}").read_bytes() == files[i], f"f{i} changed by fstrim"
    umount_fsck(ctx, dev, mnt)
    ctx.details["ext4"] = {"after_mkfs": after_mkfs, "written": written, "fstrim_reported": trimmed,
                           "after_fstrim": trimmed_used}

    # --- sg3_utils on a second disk of the same pool
    size2 = 32 * MIB
    nblk = size2 // BLOCK
    _, _, dev2 = thin_disk(ctx, pool, "tsg0", size2, run_dir)
    dd(ctx, "if=/dev/urandom", f"of={dev2}", "bs=1M", "count=4", "oflag=direct")
    assert lba_status(ctx, dev2, nblk) == [(0, 8192, 0), (8192, nblk - 8192, 1)]
    assert pool_used(pool)[1]["tsg0"] == 4 * MIB

    # UNMAP, two descriptors, unit aligned: 1 MiB at 1 MiB and 64 KiB at 3 MiB.
    sg(ctx, "sg_unmap", "--force", "--lba=2048,6144", "--num=2048,128", str(dev2))
    runs = lba_status(ctx, dev2, nblk)
    assert runs == [(0, 2048, 0), (2048, 2048, 1), (4096, 2048, 0), (6144, 128, 1),
                    (6272, 1920, 0), (8192, nblk - 8192, 1)], runs
    assert pool_used(pool)[1]["tsg0"] == 4 * MIB - MIB - UNIT
    assert read_direct(ctx, dev2, MIB, MIB) == bytes(MIB), "unmapped range does not read zeros"

    # WRITE SAME(16) with UNMAP: a unit-aligned range is deallocated ...
    sg(ctx, "sg_write_same", "--16", "--unmap", "--lba=4096", "--num=1024", str(dev2))
    # ... a range inside one unit is zeroed and stays mapped (the rest of the unit holds data).
    sg(ctx, "sg_write_same", "--10", "--unmap", "--lba=7000", "--num=100", str(dev2))
    runs = lba_status(ctx, dev2, nblk)
    assert runs == [(0, 2048, 0), (2048, 3072, 1), (5120, 1024, 0),  # 2048..5119 merged
                    (6144, 128, 1), (6272, 1920, 0), (8192, nblk - 8192, 1)], runs
    around = read_direct(ctx, dev2, 6912 * BLOCK, 2 * UNIT)  # units 54 and 55
    lo, hi = (7000 - 6912) * BLOCK, (7100 - 6912) * BLOCK
    assert around[lo:hi] == bytes(hi - lo), "WRITE SAME + UNMAP edge did not read back as zeros"
    assert around[:lo].count(0) < lo // 2 and around[hi:].count(0) < (len(around) - hi) // 2, \
        "WRITE SAME + UNMAP zeroed beyond its range"
    # WRITE SAME without UNMAP (zeros) maps what it writes (SBC-4: UNMAP=0 -> mapped).
    sg(ctx, "sg_write_same", "--16", "--lba=20000", "--num=256", str(dev2))
    runs = lba_status(ctx, dev2, nblk)
    assert status_at(runs, 20000) == 0 and status_at(runs, 20255) == 0, runs
    mapped = mapped_blocks(runs) * BLOCK
    used_disk = pool_used(pool)[1]["tsg0"]
    assert mapped == used_disk, f"GET LBA STATUS maps {mapped} bytes, pool counts {used_disk}"
    avail, used_count = lbp_log(ctx, dev2)
    assert used_count * UNIT == used_disk, (used_count, used_disk)
    assert avail * UNIT == 256 * MIB - pool_used(pool)[0], (avail, pool_used(pool))

    # blkdiscard: the whole disk goes back to the pool.
    before = pool_used(pool)[0]
    run(["blkdiscard", str(dev2)], timeout=ctx.remaining(120))
    assert lba_status(ctx, dev2, nblk) == [(0, nblk, 1)]
    assert pool_used(pool)[1]["tsg0"] == 0
    assert pool_used(pool)[0] == before - used_disk
    assert lbp_log(ctx, dev2)[1] == 0
    ctx.details["sg_disk_used_before_blkdiscard"] = used_disk


@scenario(timeout=900)
def overcommit_enospc(ctx: Context) -> None:
    """Two 128 MiB thin disks in a 64 MiB pool (soft threshold 50%): ext4 on one is filled until
    ENOSPC; the soft threshold shows first; no file-system error; fstrim makes room again."""
    import pyudev

    _, run_dir = start_daemon(ctx)
    capacity = 64 * MIB
    pool = make_pool(ctx, "pool2", capacity, 50)
    size = 128 * MIB
    _, _, dev = thin_disk(ctx, pool, "tover0", size, run_dir)
    _, _, dev2 = thin_disk(ctx, pool, "tover1", size, run_dir)

    udev = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
    udev.filter_by("scsi")
    udev.start()
    events: list[dict[str, str]] = []

    def drain() -> None:
        while (ev := udev.poll(timeout=0)) is not None:
            if "SDEV_UA" in ev.properties:
                events.append({"device": ev.sys_name, "SDEV_UA": ev.properties["SDEV_UA"]})

    run([*MKFS_PREALLOCATED, str(dev)], timeout=ctx.remaining(300))
    meta = pool_used(pool)[0]
    log(f"pool used after mkfs: {meta}")
    assert meta < capacity // 4, f"mkfs allocated {meta} bytes"
    mnt = ctx.workdir / "mnt"
    mount(ctx, dev, mnt)
    kmsg_mark("fill start")
    ctx.cleanup.callback(
        lambda: (ctx.artifacts / "dmesg.txt").write_text("\n".join(dmesg_since("fill start"))))

    # O_DIRECT: each write() completes with the device's status, so the application sees the
    # ENOSPC of the failed allocation itself (buffered writes: see the probe further down).
    enospc_at = None
    used_series = []
    for i in range(30):  # 120 MiB: more than the pool, less than the file system
        res = dd(ctx, "if=/dev/urandom", f"of={mnt}/f{i}", "bs=1M", "count=4", "oflag=direct",
                 "conv=fsync", check=False)
        used_series.append(pool_used(pool)[0])
        drain()
        if res.returncode != 0:
            enospc_at = i
            break
    assert enospc_at is not None, f"no ENOSPC after 120 MiB into a {capacity} pool"
    klog = dmesg_since("fill start")
    assert "No space left on device" in res.stderr, res.stderr + "\n".join(klog[-40:])
    log(f"ENOSPC at file {enospc_at}; pool used {used_series}")
    assert used_series[-1] <= capacity
    assert capacity - used_series[-1] < 4 * MIB + UNIT, "ENOSPC with room left in the pool"

    # The other disk shares the pool: its new allocations fail too (O_DIRECT write -> ENOSPC).
    res = dd(ctx, "if=/dev/urandom", f"of={dev2}", "bs=1M", "count=4", "seek=64",
             "oflag=direct", check=False)
    assert res.returncode != 0 and "No space left on device" in res.stderr, res.stderr

    klog = dmesg_since("fill start")
    soft = [i for i, ln in enumerate(klog) if SOFT_THRESHOLD_MSG in ln]
    nospc = [i for i, ln in enumerate(klog) if ENOSPC_MSG in ln]
    assert soft, "no soft-threshold message in the kernel log:\n" + "\n".join(klog[-60:])
    assert nospc, "no space-allocation error in the kernel log:\n" + "\n".join(klog[-60:])
    assert soft[0] < nospc[0], "soft threshold logged after ENOSPC:\n" + "\n".join(klog[-60:])
    bad = [ln for ln in klog if re.search(
        r"EXT4-fs error|EXT4-fs warning|Aborting journal|Remounting filesystem read-only|"
        r"Buffer I/O error|I/O error|critical medium error|JBD2", ln)]
    assert not bad, "file-system or I/O errors beyond ENOSPC:\n" + "\n".join(bad)
    def soft_uevent() -> bool:
        drain()
        return any(e["SDEV_UA"] == "THIN_PROVISIONING_SOFT_THRESHOLD_REACHED" for e in events)

    wait_for(soft_uevent, ctx.remaining(30), "the soft-threshold uevent")
    ctx.details.update(
        enospc_at_file=enospc_at,
        pool_used_series=used_series,
        soft_threshold_log=klog[soft[0]],
        first_enospc_log=klog[nospc[0]],
        uevents=events[:4],
    )

    # Buffered writes while the pool is full: the failure surfaces at fsync, with whatever errno
    # the kernel's write-back path chooses (recorded, not asserted: it is Linux's choice).
    probe = dd(ctx, "if=/dev/urandom", f"of={mnt}/buffered", "bs=1M", "count=4", "conv=fsync",
               check=False)
    klog2 = dmesg_since("fill start")[len(klog):]
    ctx.details["buffered_probe"] = {
        "exit": probe.returncode, "stderr": probe.stderr.strip().splitlines()[:1],
        "kernel_log": [ln for ln in klog2 if "sd" in ln or "EXT4" in ln or "Buffer" in ln][:6],
    }

    # fsck while full; then delete, fstrim, write again.
    umount_fsck(ctx, dev, mnt)
    run(["mount", str(dev), str(mnt)], timeout=ctx.remaining(60))
    for p in mnt.iterdir():
        if p.is_file():
            p.unlink()
    # ext4 can trim freed blocks only once the transaction freeing them has committed.
    run(["sync"], timeout=ctx.remaining(60))
    run(["fstrim", "-v", str(mnt)], timeout=ctx.remaining(300))
    freed = pool_used(pool)[0]
    log(f"pool used after delete + fstrim: {freed}")
    assert freed <= meta + 2 * MIB, f"fstrim left {freed} bytes used (mkfs left {meta})"
    for i in range(3):
        dd(ctx, "if=/dev/urandom", f"of={mnt}/g{i}", "bs=1M", "count=4", "oflag=direct",
           "conv=fsync")
    dd(ctx, "if=/dev/urandom", f"of={dev2}", "bs=1M", "count=4", "seek=64", "oflag=direct")
    umount_fsck(ctx, dev, mnt)
    ctx.details["after_fstrim"] = freed


def fio_bg(dev: Path, out: Path, *args: str) -> subprocess.Popen[bytes]:
    argv = ["fio", "--name=bg", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
            "--output-format=json", f"--output={out}", *args]
    log("$ " + " ".join(argv) + " &")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def unit_ready(ctx: Context, dev: Path) -> bool:
    """TEST UNIT READY through SG_IO succeeds (a pending unit attention makes it fail once)."""
    return run(["sg_turs", str(dev)], timeout=ctx.remaining(60), check=False).returncode == 0


def accounting(ctx: Context, pool: Path, cap: int, disks: dict[str, Path],
               sizes: dict[str, int]) -> dict[str, Any]:
    """Check that the daemon's live figures (LOG SENSE 0Ch), a scan of the files and GET LBA
    STATUS all agree; return them."""
    total, per_disk = pool_used(pool)
    for name, dev in disks.items():
        # A restarted daemon reports POWER ON OCCURRED (UA 29h/00h) once per device: the sd
        # driver retries its own commands, SG_IO users like sg_logs get the check condition.
        wait_for(partial(unit_ready, ctx, dev), ctx.remaining(120),
                 f"{dev} ready (unit attentions consumed)")
        avail, used_count = lbp_log(ctx, dev)
        runs = lba_status(ctx, dev, sizes[name] // BLOCK)
        mapped = mapped_blocks(runs) * BLOCK
        assert used_count * UNIT == per_disk[name] == mapped, (
            f"{name}: daemon {used_count * UNIT}, file scan {per_disk[name]}, GET LBA STATUS "
            f"{mapped}")
        assert avail * UNIT == cap - total, f"{name}: available {avail * UNIT}, scan {cap - total}"
    return {"total": total, **per_disk}


@scenario(timeout=900)
def restart_accounting(ctx: Context) -> None:
    """Pool figures survive SIGTERM and kill -9 of the daemon exactly: the live count before
    equals the recount after, the file scan and GET LBA STATUS."""
    daemon, run_dir = start_daemon(ctx, name="first")
    pool = make_pool(ctx, "pool3", 128 * MIB, 80)
    sizes = {"trs0": 64 * MIB, "trs1": 32 * MIB}
    disks = {}
    luns = []
    for name, size in sizes.items():
        _, lun, disks[name] = thin_disk(ctx, pool, name, size, run_dir, survive_restarts=True)
        luns.append(lun)

    def unlink_while_served() -> None:
        # With cmd_time_out 0, removing a LUN nobody serves would wait (SYNCHRONIZE CACHE on
        # detach) for the sd timeout: unlink before the daemon started last is stopped.
        for lun in luns:
            lun.unlink()

    d0, d1 = disks["trs0"], disks["trs1"]
    dd(ctx, "if=/dev/urandom", f"of={d0}", "bs=1M", "count=8", "oflag=direct")
    dd(ctx, "if=/dev/urandom", f"of={d0}", "bs=4k", "count=700", "seek=5123", "oflag=direct")
    dd(ctx, "if=/dev/urandom", f"of={d1}", "bs=1M", "count=5", "seek=3", "oflag=direct")
    sg(ctx, "sg_unmap", "--force", "--lba=4096,30000", "--num=3000,777", str(d0))
    before = accounting(ctx, pool, 128 * MIB, disks, sizes)
    log(f"before SIGTERM: {before}")
    assert before["total"] > 10 * MIB

    rc = daemon.stop(timeout=ctx.remaining(60))
    assert rc == 0, f"daemon exit status {rc} after SIGTERM"
    assert pool_used(pool)[0] == before["total"]
    daemon, _ = start_daemon(ctx, name="second")
    ctx.cleanup.callback(unlink_while_served)
    for name in sizes:
        wait_for(partial(served, run_dir, name), ctx.remaining(60), f"{name} served again")
    after_term = accounting(ctx, pool, 128 * MIB, disks, sizes)
    assert after_term == before, (before, after_term)

    # kill -9 with random writes and discards in flight on both disks.
    kmsg_mark("kill9 start")
    ctx.cleanup.callback(
        lambda: (ctx.artifacts / "dmesg.txt").write_text("\n".join(dmesg_since("kill9 start"))))
    jobs = [
        fio_bg(d0, ctx.artifacts / "k0.json", "--rw=randwrite", "--bs=4k", "--iodepth=16",
               "--size=24M", "--offset=32M", "--time_based", "--runtime=25"),
        fio_bg(d1, ctx.artifacts / "k1.json", "--rw=randtrim", "--bs=64k", "--iodepth=4",
               "--size=16M", "--time_based", "--runtime=25"),
    ]
    for job in jobs:
        ctx.cleanup.callback(job.kill)  # harmless once it has exited
    wait_for(lambda: pool_used(pool)[0] > before["total"] + 2 * MIB, ctx.remaining(180),
             "fio to allocate")
    assert daemon.proc is not None
    os.killpg(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait()
    log("daemon killed with -9 during I/O; restarting")
    start_daemon(ctx, name="third")
    ctx.cleanup.callback(unlink_while_served)
    for job in jobs:
        try:
            _, err = job.communicate(timeout=ctx.remaining(400))
        except subprocess.TimeoutExpired:
            job.kill()
            raise AssertionError("fio did not finish after the restart") from None
        assert job.returncode == 0, (f"fio exit {job.returncode}: {err.decode()[-3000:]}\n"
                                     + "\n".join(dmesg_since("kill9 start")[-30:]))
    after_kill = accounting(ctx, pool, 128 * MIB, disks, sizes)
    log(f"after kill -9 + restart: {after_kill}")
    assert after_kill["total"] > before["total"]
    ctx.details.update(before=before, after_sigterm=after_term, after_kill9=after_kill)
