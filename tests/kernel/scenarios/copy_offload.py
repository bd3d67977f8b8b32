"""Copy offload (issue 19) against the real kernel: sg3_utils' ``sg_xcopy`` copies between two
LUNs of one copy domain through tcm_loop and the data compares equal; towards a LUN outside the
domain it is refused and the destination stays untouched; libiscsi's ExtendedCopy and
ReceiveCopyResults suites over LIO's iSCSI target on 127.0.0.1 see no failure."""

from __future__ import annotations

import mmap
import os
import re
from functools import partial
from pathlib import Path

from guestlib import CORE, Context, disk_by_wwn, log, run, scenario, serve_config, tcmu_py, wait_for

from scenarios.iscsi_conformance import parse_cunit

MIB = 1 << 20
IQN = "iqn.2003-01.org.linux-iscsi.tcmu-py:xcopy"
WWNS = {"x0": "naa.5001405000c0b000", "x1": "naa.5001405000c0b001",
        "x2": "naa.5001405000c0b002"}


def pwrite_direct(dev: Path, offset: int, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)


def pread_direct(dev: Path, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == length
    finally:
        os.close(fd)
    return bytes(buf)


@scenario(timeout=600)
def xcopy_within_a_domain_only(ctx: Context) -> None:
    cfg = ctx.workdir / "xcopy.yaml"
    cfg.write_text(
        f"state_dir: {ctx.workdir / 'state'}\n"
        # hw_max_sectors stays the default (1024): libiscsi's ExtendedCopy.Simple writes 2048
        # blocks in one WRITE(16) to set up, which the device takes because its MAXIMUM
        # TRANSFER LENGTH is the ring's data area (16 MiB), not hw_max_sectors.
        "defaults: {max_data_area_mb: 16, write_cache: false}\n"
        "devices:\n"
        f"  - {{name: x0, handler: raw, size: 16M, copy_domain: lab, wwn: {WWNS['x0']}}}\n"
        f"  - {{name: x1, handler: raw, size: 16M, copy_domain: lab, wwn: {WWNS['x1']}}}\n"
        f"  - {{name: x2, handler: raw, size: 16M, wwn: {WWNS['x2']}}}\n"
        "exports:\n"
        "  loopback:\n"
        "    - {device: x0, lun: 0}\n"
        "    - {device: x1, lun: 1}\n"
        "    - {device: x2, lun: 2}\n"
        "  iscsi:\n"
        f"    - iqn: {IQN}\n"
        "      portals: ['127.0.0.1:3260']\n"
        "      generate_node_acls: true\n"
        "      luns: [{device: x0, lun: 0}]\n"
    )
    run(["ip", "link", "set", "lo", "up"], timeout=30, check=False)
    d, run_dir = serve_config(ctx, cfg)
    devs: dict[str, Path] = {}
    for name, wwn in WWNS.items():
        devs[name] = wait_for(partial(disk_by_wwn, wwn), ctx.remaining(120), f"{name} ({wwn})")
    log(f"disks: {devs}")
    # What sd made of VPD B0h: max_hw_sectors_kb from MAXIMUM TRANSFER LENGTH (capped by the
    # host), max_sectors_kb and optimal_io_size from OPTIMAL TRANSFER LENGTH (hw_max_sectors).
    queue = Path("/sys/block") / devs["x0"].name / "queue"
    limits = {k: (queue / k).read_text().strip()
              for k in ("max_sectors_kb", "max_hw_sectors_kb", "optimal_io_size")}
    b0 = run(["sg_vpd", "-p", "bl", str(devs["x0"])], timeout=ctx.remaining(60), check=False)
    ctx.details["sd_queue"] = limits
    ctx.details["vpd_b0"] = b0.stdout
    log(f"sd queue limits of x0: {limits}\n{b0.stdout}")
    assert limits["max_sectors_kb"] == "512", limits  # hw_max_sectors 1024 x 512 bytes

    data = os.urandom(MIB)
    pwrite_direct(devs["x0"], 2 * MIB, data)
    # Within the domain: x0 -> x1, XCOPY sent to the destination (sg_xcopy's default).
    out = run(["sg_xcopy", f"if={devs['x0']}", f"of={devs['x1']}", "bs=512",
               f"skip={2 * MIB // 512}", f"seek={4 * MIB // 512}", f"count={MIB // 512}"],
              timeout=ctx.remaining(120), check=False)
    ctx.details["sg_xcopy_same_domain"] = out.stdout + out.stderr
    assert out.returncode == 0, f"sg_xcopy x0 -> x1: {out.returncode}\n{out.stdout}{out.stderr}"
    assert pread_direct(devs["x1"], 4 * MIB, MIB) == data, "x1 differs from what x0 held"
    # Sent to the source instead: the same copy, the other device doing it.
    out = run(["sg_xcopy", "--on_src", f"if={devs['x0']}", f"of={devs['x1']}", "bs=512",
               f"skip={2 * MIB // 512}", f"seek={8 * MIB // 512}", f"count={MIB // 512}"],
              timeout=ctx.remaining(120), check=False)
    assert out.returncode == 0, f"sg_xcopy --on_src: {out.returncode}\n{out.stdout}{out.stderr}"
    assert pread_direct(devs["x1"], 8 * MIB, MIB) == data

    # Across domains: refused, nothing written.
    for flag in ([], ["--on_src"]):
        out = run(["sg_xcopy", *flag, f"if={devs['x0']}", f"of={devs['x2']}", "bs=512",
                   f"skip={2 * MIB // 512}", f"seek={2 * MIB // 512}", f"count={MIB // 512}"],
                  timeout=ctx.remaining(120), check=False)
        ctx.details[f"sg_xcopy_other_domain{''.join(flag)}"] = out.stdout + out.stderr
        assert out.returncode != 0, f"sg_xcopy x0 -> x2 {flag} succeeded:\n{out.stdout}"
        assert pread_direct(devs["x2"], 2 * MIB, MIB) == bytes(MIB), "x2 was written"

    # libiscsi's own suites for the two commands, on x0 over iSCSI.
    url = f"iscsi://127.0.0.1/{IQN}/0"
    results: dict[str, str] = {}
    # ReceiveCopyResults first: its CopyStatus test starts by asking for list identifier 1 and
    # expects none held. The ExtendedCopy suite's copies (list identifier 1, status held) would
    # be: a device that knows I_T nexuses drops them when that session logs out, but TCMU tells
    # the daemon nothing of nexuses, so tcmu-py holds copy status per LUN until it is read.
    for suite in ("ReceiveCopyResults", "ExtendedCopy"):
        res = run(["iscsi-test-cu", "-d", f"--test=SCSI.{suite}", url],
                  timeout=min(ctx.remaining(), 180), check=False)
        text = res.stdout + res.stderr
        (ctx.artifacts / f"{suite}.txt").write_text(text)
        results.update(parse_cunit(text))
    ctx.details["libiscsi"] = results
    log(f"libiscsi: {results}")
    failed = sorted(t for t, v in results.items() if v == "fail")
    assert results and not failed, f"libiscsi failures: {failed}"
    assert any(re.match(r"(SCSI\.)?ExtendedCopy\.", t) and v == "pass" for t, v in
               results.items()), f"no ExtendedCopy test passed: {results}"

    gone = run(tcmu_py("down", "-c", str(cfg)), timeout=ctx.remaining(120))
    log(gone.stdout + gone.stderr)
    assert not list(CORE.glob("user_*/x*")), "down left backstores"
    assert d.stop(timeout=60) == 0, "serve did not exit cleanly on SIGTERM"
