"""LIO's own restore brings a tcmu-py disk back after a reboot (issue 13): ``targetcli
saveconfig`` in one boot, ``targetctl restore`` (what target.service runs) in the next, and the
data written in the first boot reads back in the second, with no manual step.

Two boots share one disk (/dev/vdb, ext4, attached by tests/kernel/conftest.py's power-loss chain):
it holds the raw image and, bind-mounted on targetcli's configuration directory (/etc/target, or
/etc/rtslib-fb-target on Debian), its saved configuration.

- ``before_reboot``: README's install; the first targetcli call starts tcmu-py by D-Bus
  activation; a user:raw disk and a loopback LUN made in targetcli; a pattern written through
  the LUN (O_DIRECT, fsync); ``targetcli saveconfig``; ``sync``; ``targetctl clear`` (as
  target.service's ExecStop). It ends normally: the reset (``sysrq b``) comes from the scenario
  after it in the same boot (vtl_reboot's cut, conftest.POWER_LOSS_CHAIN), after its cleanup
  stopped its daemon and D-Bus and unmounted.
- ``after_reboot``: the same mounts and install, then what systemd runs at boot, in the units'
  order and with their own command lines: tcmu-py.service (ExecStart read from the installed
  unit, ``Type=notify``: its READY=1 awaited on a NOTIFY_SOCKET) before
  rtslib-fb-targetctl.service (Debian's target.service: its ExecStart lines, ``targetctl
  restore``). The backstore (user:raw with its cfgstring) and its LUN are back, tcmu-py serves
  them, and the pattern reads back through the LUN.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from guestlib import (
    CORE,
    Context,
    Daemon,
    have,
    log,
    loopback_disk_of_size,
    run,
    scenario,
    wait_for,
)

from scenarios.targetcli_dbus import (
    MIB,
    activate,
    install_system,
    serve_status,
    stop_pid,
    system_bus,
)

DISK = Path("/dev/vdb")  # conftest.POWER_LOSS_DISKS
MOUNT = Path("/tmp/restore-disk")   # the image path in the saved cfgstring: same in both boots
#: Where targetcli saves and targetctl restores: rtslib-fb's default_save_file (Debian's
#: rtslib-fb: /etc/rtslib-fb-target/saveconfig.json; upstream: /etc/target/saveconfig.json).
def _save_file() -> Path:
    out = subprocess.run(
        ["/usr/bin/python3", "-c", "import rtslib_fb.root as r; print(r.default_save_file)"],
        capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    return Path(out or "/etc/target/saveconfig.json")
EXPECTED = "expected.json"
SIZE = 64 * MIB
UNIT = Path("/etc/systemd/system/tcmu-py.service")          # as install-system.sh puts it
TARGET_UNIT = Path("/lib/systemd/system/rtslib-fb-targetctl.service")  # Debian's target.service
SEEK = 80  # 64 KiB blocks


def _mount(ctx: Context, fresh: bool) -> None:
    if not (have("targetcli") and have("targetctl") and have("dbus-daemon")):
        raise RuntimeError("targetcli-fb and dbus are needed (scripts/bootstrap.sh)")
    assert DISK.exists(), f"{DISK} missing: the host test attaches the shared disk"
    if fresh:
        run(["mkfs.ext4", "-q", "-F", str(DISK)], timeout=ctx.remaining(120))
    MOUNT.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "ext4", str(DISK), str(MOUNT)], timeout=ctx.remaining(60))
    ctx.cleanup.callback(lambda: run(["umount", "-l", str(MOUNT)], timeout=60, check=False))
    (MOUNT / "etc-target").mkdir(exist_ok=True)
    conf = _save_file().parent
    conf.mkdir(parents=True, exist_ok=True)
    run(["mount", "--bind", str(MOUNT / "etc-target"), str(conf)], timeout=ctx.remaining(30))
    ctx.cleanup.callback(lambda: run(["umount", "-l", str(conf)], timeout=60, check=False))




@scenario(timeout=400, own_boot=True)
def before_reboot(ctx: Context) -> None:
    started = time.monotonic()
    _mount(ctx, fresh=True)
    install_system(ctx)
    system_bus(ctx)
    activate(ctx)  # no daemon started by hand: targetcli's first call starts it
    image = MOUNT / "d0.img"
    wwn = "naa.5001405" + os.urandom(5).hex()[:9]
    script = "\n".join([
        "set global auto_save_on_exit=false",
        f"/backstores/user:raw create name=d0 size=64M cfgstring={image}",
        f"/loopback create {wwn}",
        f"/loopback/{wwn}/luns create /backstores/user:raw/d0",
        "exit",
    ]) + "\n"
    out = run(["targetcli"], input=script.encode(), timeout=ctx.remaining(180))
    ctx.details["session"] = out.stdout + out.stderr
    status = wait_for(lambda: serve_status(ctx), ctx.remaining(30), "the activated tcmu-py")
    assert [d["name"] for d in status["devices"]] == ["d0"], status
    dev = wait_for(lambda: loopback_disk_of_size(SIZE), ctx.remaining(60),
                   "the sd disk of the loopback LUN")
    pattern = os.urandom(MIB)
    src = ctx.workdir / "pattern"
    src.write_bytes(pattern)
    run(["dd", f"if={src}", f"of={dev}", "bs=64k", f"seek={SEEK}", "oflag=direct",
         "conv=fsync", "status=none"], timeout=ctx.remaining(60))
    run(["targetcli", "saveconfig"], timeout=ctx.remaining(120))
    saved = json.loads(_save_file().read_text())
    users = [so for so in saved["storage_objects"] if so.get("plugin") == "user"]
    assert [(so["name"], so["config"]) for so in users] == [("d0", f"raw/{image}")], users
    expected = {"wwn": wwn, "image": str(image),
                "sha256": hashlib.sha256(pattern).hexdigest(),
                "seconds": round(time.monotonic() - started, 1)}
    path = ctx.artifacts / EXPECTED
    path.write_text(json.dumps(expected))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    run(["sync"], timeout=ctx.remaining(60))
    # What targetcli made is taken down as target.service's ExecStop would at shutdown (the
    # saved file stays as synced): the scenario ends normally and leaves no LIO objects for
    # the next one in this boot; the reset comes later (vtl_reboot's cut).
    run(["targetctl", "clear"], timeout=ctx.remaining(120), check=False)
    log(f"before_reboot: {expected['seconds']} s; saved and synced, the reset comes later")


def _exec_start(unit: Path) -> list[list[str]]:
    # systemd allows repeated ExecStart= (configparser would keep one): read them by hand.
    lines = [line.split("=", 1)[1] for line in unit.read_text().splitlines()
             if line.startswith("ExecStart=")]
    return [shlex.split(v.lstrip("-")) for v in lines]


def _notify_socket(ctx: Context) -> socket.socket:
    path = ctx.workdir / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    ctx.cleanup.callback(sock.close)
    return sock


@scenario(timeout=400, own_boot=True)
def after_reboot(ctx: Context) -> None:
    started = time.monotonic()
    expected = json.loads(
        (ctx.artifacts.parent / "targetcli_restore.before_reboot" / EXPECTED).read_text())
    _mount(ctx, fresh=False)
    install_system(ctx)
    system_bus(ctx)
    assert not list(CORE.glob("user_*/d0")), "d0 exists before the restore"

    # tcmu-py.service: Type=notify, Before=target.service. systemd's PATH, with this venv's
    # bin first standing for wherever pip put tcmu-py.
    (argv,) = _exec_start(UNIT)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                   "/usr/bin:/sbin:/bin",
           "NOTIFY_SOCKET": str(ctx.workdir / "notify")}
    notify = _notify_socket(ctx)
    unit = Daemon(argv, ctx.artifacts / "tcmu-py.service.log", env=env)
    ctx.cleanup.callback(unit.stop)
    unit.start()
    notify.settimeout(ctx.remaining(120))
    got = b""
    while b"READY=1" not in got:
        got += notify.recv(4096)
    ready_at = round(time.monotonic() - started, 1)

    # target.service: its ExecStart lines in order (mkdir -p ...; targetctl restore).
    for cmd in _exec_start(TARGET_UNIT):
        run(cmd, timeout=ctx.remaining(180))
    restored = time.monotonic()

    (so,) = CORE.glob("user_*/d0")
    assert (so / "enable").read_text().strip() == "1"
    assert f"raw/{expected['image']}" in (so / "info").read_text(), (so / "info").read_text()
    assert (CORE.parent / "loopback" / expected["wwn"]).is_dir(), "the loopback target is gone"
    status = wait_for(lambda: serve_status(ctx), ctx.remaining(30), "tcmu-py's status")
    served = {d["name"]: d for d in status["devices"]}
    assert "d0" in served and not served["d0"]["failed"], status
    dev = wait_for(lambda: loopback_disk_of_size(SIZE), ctx.remaining(60),
                   "the sd disk of the restored LUN")
    back = ctx.workdir / "back"
    run(["dd", f"if={dev}", f"of={back}", "bs=64k", f"skip={SEEK}", "count=16", "iflag=direct",
         "status=none"], timeout=ctx.remaining(60))
    assert hashlib.sha256(back.read_bytes()).hexdigest() == expected["sha256"], (
        "the pattern written before the reboot does not read back")
    ctx.details.update(ready_seconds=ready_at,
                       restore_seconds=round(restored - started - ready_at, 1),
                       seconds=round(time.monotonic() - started, 1),
                       before_seconds=expected["seconds"])
    log(f"after_reboot: {ctx.details['seconds']} s")
    # Taken down as target.service's ExecStop would, then the daemon.
    run(["targetctl", "clear"], timeout=ctx.remaining(120), check=False)
    pid = int(str(status["pid"]))
    stop_pid(ctx, pid)
