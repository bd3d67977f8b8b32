"""libiscsi's conformance suite over LIO's iSCSI target on 127.0.0.1, against a tcmu-py raw disk.

Counting follows docs/conformance.md: libiscsi reports a skipped test ("not implemented", "fully
provisioned") as passed in CUnit's totals, so a test is counted as a skip when "[SKIPPED]" appears
between its "Test:" line and its result.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from guestlib import (
    ISCSI,
    Context,
    Daemon,
    create_user_backstore,
    log,
    run,
    scenario,
    wait_for,
    write_attr,
)

MIB = 1 << 20
IQN = "iqn.2003-01.org.linux-iscsi.tcmu-py:conformance"
URL = f"iscsi://127.0.0.1/{IQN}/0"

#: The families issue 3 names: nothing in them may fail.
OWN_FAMILIES = (
    "Read6", "Read10", "Read12", "Read16", "Write10", "Write12", "Write16", "Inquiry",
    "ReadCapacity10", "ReadCapacity16", "TestUnitReady", "Verify10", "Verify12", "Verify16",
    "CompareAndWrite", "WriteSame10", "WriteSame16", "Unmap", "ReportSupportedOpcodes",
    "WriteVerify10", "WriteVerify12", "WriteVerify16",
)  # fmt: skip


def parse_cunit(text: str) -> dict[str, str]:
    """{"Suite.Test": "pass" | "skip" | "fail"} from iscsi-test-cu's verbose output."""
    results: dict[str, str] = {}
    suite = ""
    current: str | None = None
    skipped = False
    for line in text.splitlines():
        m = re.match(r"\s*Suite:?\s+(\S+)", line)
        if m:
            suite = m.group(1)
            continue
        m = re.match(r"\s*Test:?\s+(\S+)\s*\.\.\.(.*)$", line)
        if m:
            current, skipped = f"{suite}.{m.group(1)}", False
            line = m.group(2)
        if current is None:
            continue
        if "[SKIPPED]" in line:
            skipped = True
        if re.search(r"\bFAILED\b", line):
            results[current] = "fail"
            current = None
        elif re.search(r"\bpassed\b", line):
            results[current] = "skip" if skipped else "pass"
            current = None
    return results


def iscsi_target(ctx: Context, backstore_path: Path) -> None:
    tpg = ISCSI / IQN / "tpgt_1"
    lun = tpg / "lun" / "lun_0"
    lun.mkdir(parents=True)

    def teardown() -> None:
        if (tpg / "enable").exists():
            write_attr(tpg / "enable", 0)
        for p in (tpg / "np").glob("*"):
            p.rmdir()
        for link in lun.iterdir() if lun.exists() else ():
            if link.is_symlink():
                link.unlink()
        for d in (lun, tpg, ISCSI / IQN):
            if d.exists():
                d.rmdir()

    ctx.cleanup.callback(teardown)
    os.symlink(backstore_path, lun / backstore_path.name)
    (tpg / "np" / "127.0.0.1:3260").mkdir()
    for key, value in (
        ("generate_node_acls", 1),
        ("demo_mode_write_protect", 0),
        ("authentication", 0),
        ("cache_dynamic_acls", 1),
    ):
        write_attr(tpg / "attrib" / key, value)
    write_attr(tpg / "enable", 1)


@scenario(timeout=1800)
def libiscsi_scsi_suite(ctx: Context) -> None:
    """iscsi-inq answers with our identity; iscsi-test-cu's SCSI family runs to the end and
    nothing fails in the families tcmu-py implements (PR/RESERVE are the kernel's)."""
    run(["ip", "link", "set", "lo", "up"], timeout=30, check=False)
    run_dir = ctx.workdir / "run"
    ready = ctx.workdir / "ready"
    d = Daemon(
        [
            sys.executable,
            "-m",
            "tcmu_py.cli",
            "serve",
            "--run-dir",
            str(run_dir),
            "--ready-file",
            str(ready),
        ],
        ctx.artifacts / "daemon.log",
    )
    ctx.cleanup.callback(d.stop)
    d.start(ready=ready.exists, timeout=ctx.remaining(240))
    img = ctx.workdir / "conf0.img"
    bs = create_user_backstore(
        "conf0",
        f"raw/{img}",
        64 * MIB,
        cleanup=ctx.cleanup,
        control={"hw_max_sectors": 1024, "max_data_area_mb": 64},
    )
    from tcmu_py.daemon.serve import query_status
    from tcmu_py.errors import TcmuError

    def served() -> bool:
        try:
            return any(x["name"] == "conf0" for x in query_status(run_dir, 2)["devices"])
        except TcmuError:
            return False

    wait_for(served, ctx.remaining(30), "daemon serving conf0")
    iscsi_target(ctx, bs.path)

    inq = run(["iscsi-inq", URL], timeout=ctx.remaining(60)).stdout
    assert re.search(r"Vendor:\s*TCMU-PY", inq) and re.search(r"Product:\s*RAW DISK", inq), inq

    res = run(["iscsi-test-cu", "-d", "--test=SCSI", URL], timeout=ctx.remaining(), check=False)
    text = res.stdout + res.stderr
    (ctx.artifacts / "iscsi-test-cu.txt").write_text(text)
    results = parse_cunit(text)
    (ctx.artifacts / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    counts = {k: sum(1 for v in results.values() if v == k) for k in ("pass", "skip", "fail")}
    failed = sorted(t for t, v in results.items() if v == "fail")
    own_failed = [t for t in failed if t.rsplit(".", 1)[0].removeprefix("SCSI.") in OWN_FAMILIES]
    ctx.details.update(
        counts=counts,
        total=len(results),
        failed=failed,
        skipped=sorted(t for t, v in results.items() if v == "skip"),
    )
    log(f"libiscsi SCSI family: {counts} of {len(results)}; failed: {failed}")
    assert len(results) >= 150, f"only {len(results)} tests parsed; see iscsi-test-cu.txt"
    assert not own_failed, f"failures in families tcmu-py implements: {own_failed}"
