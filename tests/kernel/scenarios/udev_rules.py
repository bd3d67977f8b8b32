"""udev rules for TCMU uio devices, checked with the real systemd-udevd in the guest."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

from guestlib import Context, create_user_backstore, run, scenario, wait_for

REPO = Path(__file__).resolve().parents[3]
MIB = 1 << 20


@scenario(timeout=90)
def udev_rules(ctx: Context) -> None:
    """60-tcmu-py.rules on a real TCMU device: node root:root 0600, /dev/tcmu/<name> link,
    TCMU_* properties, systemd tag and SYSTEMD_WANTS; `udevadm test` agrees; link gone on remove."""
    rules = Path("/etc/udev/rules.d/60-tcmu-py.rules")
    shutil.copy(REPO / "udev" / rules.name, rules)
    ctx.cleanup.callback(rules.unlink, missing_ok=True)
    run(["udevadm", "control", "--reload"], timeout=ctx.remaining(10))
    bs = create_user_backstore("udev0", "probe/cfg", 16 * MIB, cleanup=ctx.cleanup)
    dev, sysfs = bs.wait_uio(ctx.remaining(10))
    run(["udevadm", "settle"], timeout=ctx.remaining(30))
    link = Path("/dev/tcmu/udev0")
    wait_for(lambda: link.is_symlink() or None, ctx.remaining(10), f"{link}")
    assert link.resolve() == dev, f"{link} -> {link.resolve()}, expected {dev}"
    st = dev.stat()
    mode = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    assert mode == (0, 0, 0o600), f"{dev}: uid/gid/mode {mode}, expected (0, 0, 0o600)"
    out = run(["udevadm", "info", "--query=property", str(dev)], timeout=ctx.remaining(10)).stdout
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    want = {
        "TCMU_HBA": str(bs.hba),
        "TCMU_DEVICE": "udev0",
        "TCMU_SUBTYPE": "probe",
        "SYSTEMD_WANTS": "tcmu-py.service",
    }
    assert {k: props.get(k) for k in want} == want, f"udev properties {props}"
    assert ":systemd:" in props.get("TAGS", ""), f"TAGS {props.get('TAGS')!r}"
    test = run(["udevadm", "test", str(sysfs)], timeout=ctx.remaining(30), check=False)
    assert "LINK 'tcmu/udev0'" in test.stdout + test.stderr, "udevadm test: no tcmu/udev0 link"
    ctx.details["udev_properties"] = {k: props[k] for k in want}
    bs.remove()
    run(["udevadm", "settle"], timeout=ctx.remaining(30))
    wait_for(lambda: (not link.exists()) or None, ctx.remaining(10), f"{link} removed")
