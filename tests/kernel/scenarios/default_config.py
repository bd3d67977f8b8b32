"""The main job: `tcmu-py serve --default` creates the embedded configuration's LIO objects, the
disk appears through tcm_loop and on the iSCSI portal, `status` shows it, `down` removes it all."""

from __future__ import annotations

import os
from pathlib import Path

from guestlib import CORE, ISCSI, Context, Daemon, log, run, scenario, scsi_disk, tcmu_py, wait_for

IQN = "iqn.2025-01.org.tcmu-py:default"


def our_disk() -> Path | None:
    """/dev/sdX whose INQUIRY says TCMU-PY RAW DISK, if the sd driver bound it."""
    return scsi_disk("TCMU-PY", "RAW DISK")


@scenario(timeout=600)
def serve_default(ctx: Context) -> None:
    run_dir = ctx.workdir / "run"
    ready = ctx.workdir / "ready"
    Path("/var/lib/tcmu-py").mkdir(parents=True, exist_ok=True)
    run(["ip", "link", "set", "lo", "up"], timeout=30, check=False)
    d = Daemon(
        tcmu_py("serve", "--default", "--run-dir", str(run_dir), "--ready-file", str(ready)),
        ctx.artifacts / "daemon.log",
    )
    ctx.cleanup.callback(lambda: run(tcmu_py("down"), timeout=120, check=False))
    ctx.cleanup.callback(d.stop)
    d.start(ready=ready.exists, timeout=ctx.remaining(300))
    dev = wait_for(our_disk, ctx.remaining(120), "the default disk through tcm_loop")
    log(f"default disk: {dev}")
    size = int((Path("/sys/block") / dev.name / "size").read_text()) * 512
    assert size == 256 << 20, f"{dev}: {size} bytes, expected the default 256 MiB"
    data = os.urandom(1 << 20)
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, len(data))
        buf[:] = data
        assert os.pwritev(fd, [buf], 4 << 20) == len(data)
        back = mmap.mmap(-1, len(data))
        assert os.preadv(fd, [back], 4 << 20) == len(data)
        assert back[:] == data, "read-back differs"
    finally:
        os.close(fd)
    inq = run(["iscsi-inq", f"iscsi://127.0.0.1/{IQN}/0"], timeout=ctx.remaining(60)).stdout
    assert "TCMU-PY" in inq, inq
    status = run(tcmu_py("status", "--run-dir", str(run_dir)), timeout=ctx.remaining(60)).stdout
    assert "disk0" in status and "raw" in status, status
    ctx.details["status"] = status
    # down while the daemon still serves: removing a LUN makes sd send SYNCHRONIZE CACHE, which
    # only a serving daemon answers (otherwise it waits for cmd_time_out).
    out = run(tcmu_py("down"), timeout=ctx.remaining(180))
    log(out.stdout + out.stderr)
    assert not list(CORE.glob("user_*/disk0")), "down left the backstore"
    assert not (ISCSI / IQN).exists(), "down left the iSCSI target"
    assert d.stop(timeout=60) == 0, "serve did not exit cleanly on SIGTERM"


def lio_objects() -> set[str]:
    """Every backstore and target in configfs, as relative paths."""
    found = set()
    for root in (CORE, ISCSI, ISCSI.parent / "loopback"):
        if root.is_dir():
            found |= {str(p.relative_to(root.parent)) for p in root.iterdir() if p.is_dir()}
    for hba in CORE.glob("user_*"):
        found |= {str(p.relative_to(CORE)) for p in hba.iterdir() if p.is_dir()}
    return found


@scenario(timeout=180)
def bad_config_rejected(ctx: Context) -> None:
    """A configuration with errors fails before anything is created, naming file, key, value
    and what was expected for every problem."""
    bad = ctx.workdir / "bad.yaml"
    bad.write_text(
        f"state_dir: {ctx.workdir}/state\n"
        "devices:\n"
        "  - {name: ok0, handler: raw, size: 16M}\n"
        "  - {name: bad0, handler: raw, size: 12345}\n"  # not a multiple of the block size
        "  - {name: bad1, handler: nosuch, size: 16M}\n"
        "exports:\n"
        "  loopback:\n"
        "    - {device: missing0, lun: 0}\n"
    )
    before = lio_objects()
    res = run(tcmu_py("apply", "-c", str(bad)), timeout=ctx.remaining(120), check=False)
    text = res.stdout + res.stderr
    ctx.details["message"] = text
    assert res.returncode == 2, f"exit {res.returncode}: {text}"
    for needle in (
        str(bad),
        "devices[1].size",
        "12345",
        "devices[2].handler",
        "nosuch",
        "exports.loopback[0].device",
        "missing0",
    ):
        assert needle in text, f"{needle!r} not in the error:\n{text}"
    assert lio_objects() == before, "a rejected configuration created LIO objects"
    assert not (ctx.workdir / "state").exists(), "a rejected configuration created its state dir"
