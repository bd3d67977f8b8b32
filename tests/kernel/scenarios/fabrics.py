"""SRP, iSER and Fibre Channel (FCoE), in one boot, serving tcmu-py handlers (issue 18).

One daemon and one YAML: a `raw` disk (16 MiB) and a `vtl` library (changer + one drive) are
exported over every fabric whose transport came up (`tcmu_py.lab_fabrics.bring_up`: soft-RoCE
on a veth pair for SRP and iSER, two FCoE controllers in VN2VN mode on the same pair for FC).
For each fabric the initiator side of the same guest logs in (ib_srp over RDMA/CM, open-iscsi's
``iser`` interface, the FCoE initiator's VN2VN login), and on the LUNs it sees: sg_inq, fio with
verification on the disk, ``mtx status`` and a tar round trip on the tape. Then the initiators
log out, the daemon stops and ``tcmu-py down`` must leave nothing in configfs.

A fabric that cannot run is not skipped: its exact error goes into the details and fails the
scenario (after the other fabrics ran).
"""

from __future__ import annotations

import time
from pathlib import Path

from guestlib import CONFIGFS, CORE, Context, Daemon, log, run, scenario, tcmu_py, wait_for

from scenarios.vtl import mt, random_tree, settle, sh, tree_digest, wait_tape_free

MIB = 1 << 20
IQN = "iqn.2025-01.org.tcmu-py:fabrics-iser"
DISK, CHANGER, DRIVE = "fab-disk", "fab-ch", "fab-d0"
LUNS = {DISK: 0, CHANGER: 1, DRIVE: 2}
BARCODE = "FAB000L8"
#: The fabrics of this boot (USB has a boot of its own: scenarios/fabrics_usb.py).
FABRICS = ("srp", "iser", "fc")


def _luns() -> str:
    return ", ".join(f"{{device: {d}, lun: {n}}}" for d, n in LUNS.items())


def _yaml(state: Path, library: Path, lab: object, fabrics: list[str]) -> str:
    from tcmu_py.lab_fabrics import FabricLab

    assert isinstance(lab, FabricLab)
    exports = []
    if "srp" in fabrics:
        # ib_srpt names an RDMA/CM session by the initiator's source address; with one rxe
        # device for both ends either address may be the source, so both get an ACL.
        exports.append(f"""\
  srp:
    - port: "{lab.srp_port}"
      rdma_cm_port: {lab.srp_cm_port}
      luns: [{_luns()}]
      acls: [{{initiator: {lab.target_ip}}}, {{initiator: {lab.initiator_ip}}}]""")
    if "iser" in fabrics:
        exports.append(f"""\
  iser:
    - iqn: {IQN}
      portals: ["{lab.target_ip}:3260"]
      generate_node_acls: true
      luns: [{_luns()}]""")
    if "fc" in fabrics:
        exports.append(f"""\
  fc:
    - wwpn: {lab.fc_target_wwpn}
      luns: [{_luns()}]
      acls: [{{initiator: {lab.fc_initiator_wwpn}}}]""")
    return f"""\
state_dir: {state}
devices:
  - {{name: {DISK}, handler: raw, size: 16M}}
libraries:
  - name: fab
    changer: {CHANGER}
    drives: [{{name: {DRIVE}, model: IBM-LTO8}}]
    slots: 4
    import_export: 1
    cartridges: ["{BARCODE}"]
    media_dir: {library}
exports:
""" + "\n".join(exports) + "\n"


def _leftovers() -> list[str]:
    """Every target and user backstore still in configfs (fabric-wide groups aside)."""
    left = []
    for fabric in ("srpt", "iscsi", "fc", "loopback"):
        d = CONFIGFS / fabric
        if d.is_dir():
            left += [str(p) for p in d.iterdir() if p.is_dir() and p.name != "discovery_auth"]
    if CORE.is_dir():
        left += [str(p) for hba in CORE.glob("user_*") for p in hba.iterdir() if p.is_dir()]
    return left


def _devices(ctx: Context, host: str, cap: float) -> dict[int, dict[str, str]]:
    """Wait until ``host`` shows the disk (block, sg), the changer (sch, sg) and the drive
    (nst, sg) at their LUNs."""
    from tcmu_py.lab_fabrics import scan_host, scsi_host_devices

    want = {0: {"block", "scsi_generic"}, 1: {"scsi_changer", "scsi_generic"},
            2: {"scsi_tape", "scsi_generic"}}
    rescanned = [False]

    def complete() -> dict[int, dict[str, str]] | None:
        devs = scsi_host_devices(host)
        if all(kinds <= set(devs.get(lun, {})) for lun, kinds in want.items()):
            return devs
        if not rescanned[0] and time.monotonic() - start > 10:
            rescanned[0] = True  # LUNs made after the login appear on a rescan
            scan_host(host, ctx.remaining(30))
        return None

    start = time.monotonic()
    return wait_for(complete, ctx.remaining(cap), f"disk, changer and tape on {host}")


def _exercise(ctx: Context, fabric: str, host: str, first_tape: list[bool],
              fio_cap: float = 120) -> dict[str, object]:
    """sg_inq, fio verify (at most ``fio_cap`` seconds), mtx status, tar round trip over the
    LUNs of ``host``."""
    facts: dict[str, object] = {"host": host}
    devs = _devices(ctx, host, 90)
    facts["devices"] = devs
    disk = Path("/dev") / devs[0]["block"]
    inq = sh(ctx, "sg_inq", f"/dev/{devs[0]['scsi_generic']}", cap=30)
    assert "Product identification" in inq, inq
    facts["sg_inq_product"] = next((ln.split(":", 1)[1].strip() for ln in inq.splitlines()
                                    if "Product identification" in ln), "")
    start = time.monotonic()
    out = run(["fio", f"--name=fab-{fabric}", f"--filename={disk}", "--direct=1",
               "--ioengine=libaio", "--rw=write", "--bs=256k", "--iodepth=4", "--size=16M",
               "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
               "--verify_state_save=0"],  # the guest's working directory is read-only
              timeout=ctx.remaining(fio_cap), check=False)
    assert out.returncode == 0, f"fio verify on {disk}: exit {out.returncode}: {out.stderr[-2000:]}"
    facts["fio_s"] = round(time.monotonic() - start, 1)

    changer_sg = Path("/dev") / devs[1]["scsi_generic"]
    tape = Path("/dev") / devs[2]["scsi_tape"]
    tape_sg = Path("/dev") / devs[2]["scsi_generic"]
    settle(ctx, changer_sg)
    status = sh(ctx, "mtx", "-f", str(changer_sg), "status", cap=60)
    if first_tape[0]:
        first_tape[0] = False
        if "Data Transfer Element 0:Empty" in status:
            sh(ctx, "mtx", "-f", str(changer_sg), "load", "1", "0", cap=120)
            status = sh(ctx, "mtx", "-f", str(changer_sg), "status", cap=60)
    assert f"Data Transfer Element 0:Full (Storage Element 1 Loaded):VolumeTag = {BARCODE}" in (
        status), status
    facts["mtx_status"] = "drive 0 full: " + BARCODE
    settle(ctx, tape_sg)
    wait_tape_free(tape, ctx.remaining(60))
    tree = random_tree(ctx.workdir / f"tree-{fabric}", 6, len(fabric))
    mt(ctx, tape, "rewind")
    sh(ctx, "tar", "-c", "-b", "128", "-f", str(tape), "-C", str(tree), ".", cap=120)
    mt(ctx, tape, "rewind")
    back = ctx.workdir / f"back-{fabric}"
    back.mkdir()
    sh(ctx, "tar", "-x", "-b", "128", "-f", str(tape), "-C", str(back), cap=120)
    mt(ctx, tape, "rewind")
    assert tree_digest(back) == tree_digest(tree), f"tar over {fabric}: the tree differs"
    facts["tar_files"] = len(tree_digest(tree))
    return facts


def _logout_all(lab: object) -> None:
    """Best effort: end every initiator session of the three fabrics."""
    import contextlib

    from tcmu_py import lab_fabrics as lf

    assert isinstance(lab, lf.FabricLab)
    with contextlib.suppress(Exception):
        lf.srp_logout(30)
    with contextlib.suppress(Exception):
        lf.iser_logout(IQN, 30)
    if lf.VETH_INITIATOR in lab.fcoe_ctlrs:
        with contextlib.suppress(Exception):
            lf.disable_fc_initiator(lab, 30)


@scenario(timeout=420)
def srp_iser_fc(ctx: Context) -> None:
    """A raw disk and a VTL changer + drive over SRP, iSER and FCoE from one daemon and one
    YAML; sg_inq, fio verify (16 MiB), mtx status, tar round trip per fabric; then `tcmu-py
    down` leaves nothing in configfs. A fabric that cannot run fails with its exact error."""
    from tcmu_py import lab_fabrics as lf

    t0 = time.monotonic()
    lab = lf.bring_up(FABRICS, timeout=ctx.remaining(60))
    errors: dict[str, str] = dict(lab.errors)
    timings: dict[str, object] = {"bring_up": lab.timings}
    ctx.details["timings"] = timings
    ctx.details["ports"] = {"srp": lab.srp_port, "fc_target": lab.fc_target_wwpn,
                            "fc_initiator": lab.fc_initiator_wwpn}
    fabrics = [f for f in FABRICS if lab.ready(f)]
    for f, e in errors.items():
        log(f"fabric {f} cannot run: {e}")
    cfg = ctx.workdir / "fabrics.yaml"
    cfg.write_text(_yaml(ctx.workdir / "state", ctx.workdir / "library", lab, fabrics))
    (ctx.artifacts / "fabrics.yaml").write_text(cfg.read_text())

    start = time.monotonic()
    downed = [False]  # `tcmu-py down` costs a Python start (tens of seconds here): once
    ctx.cleanup.callback(lambda: downed[0] or run(tcmu_py("down", "-c", str(cfg)),
                                                  timeout=120, check=False))
    ready = ctx.workdir / "ready"
    daemon = Daemon(tcmu_py("serve", "-c", str(cfg), "--run-dir", str(ctx.workdir / "run"),
                            "--ready-file", str(ready)), ctx.artifacts / "daemon.log")
    ctx.cleanup.callback(daemon.stop)
    daemon.start(ready=ready.exists, timeout=ctx.remaining(240))
    timings["daemon_ready_s"] = round(time.monotonic() - start, 1)
    # Runs before the daemon stops (LIFO): no session is left to a LUN nobody serves, whose
    # SYNCHRONIZE CACHE would hang the guest's power-off.
    ctx.cleanup.callback(_logout_all, lab)

    logouts = {
        "srp": lambda: lf.srp_logout(30),
        "iser": lambda: lf.iser_logout(IQN, 30),
        "fc": lambda: lf.disable_fc_initiator(lab, 30),
    }
    logins = {
        "srp": lambda: lf.srp_login(lab, ctx.remaining(60)),
        "iser": lambda: lf.iser_login(lab, IQN, ctx.remaining(60)),
        "fc": lambda: lf.enable_fc_initiator(lab, ctx.remaining(60)),
    }
    results: dict[str, object] = {}
    first_tape = [True]
    logged_in: list[str] = []
    for fabric in fabrics:
        start = time.monotonic()
        try:
            host = logins[fabric]()
            logged_in.append(fabric)
            timings[f"{fabric}_login_s"] = round(time.monotonic() - start, 1)
            results[fabric] = _exercise(ctx, fabric, host, first_tape)
        except Exception as exc:  # noqa: BLE001 - recorded, reported, fails the scenario below
            errors[fabric] = f"{type(exc).__name__}: {exc}"
            log(f"fabric {fabric} failed: {errors[fabric]}")
            dmesg = run(["dmesg"], timeout=30, check=False).stdout.splitlines()
            (ctx.artifacts / f"dmesg-{fabric}.txt").write_text("\n".join(dmesg[-200:]) + "\n")
        timings[f"{fabric}_s"] = round(time.monotonic() - start, 1)
    ctx.details["fabrics"] = results

    for fabric in logged_in:
        try:
            logouts[fabric]()
        except Exception as exc:  # noqa: BLE001 - a logout that fails is a failure too
            errors.setdefault(fabric, f"logout: {type(exc).__name__}: {exc}")
    start = time.monotonic()
    daemon.stop(timeout=30)
    down = run(tcmu_py("down", "-c", str(cfg)), timeout=ctx.remaining(120), check=False)
    downed[0] = True
    timings["down_s"] = round(time.monotonic() - start, 1)
    left = _leftovers()
    ctx.details["left_in_configfs"] = left
    timings["total_s"] = round(time.monotonic() - t0, 1)
    ctx.details["errors"] = errors
    assert down.returncode == 0, f"tcmu-py down: exit {down.returncode}: {down.stderr[-2000:]}"
    assert not left, f"left in configfs after tcmu-py down: {left}"
    assert not errors, "fabrics that did not work: " + "; ".join(
        f"{f}: {e}" for f, e in errors.items())
