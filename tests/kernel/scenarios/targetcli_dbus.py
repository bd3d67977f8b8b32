"""targetcli drives tcmu-py over D-Bus (issue 13): a system dbus-daemon with the project's policy
file (dbus/tcmu-py.conf, installed as scripts/install-system.sh does), `tcmu-py serve`, then
LIO's own shell: ``targetcli ls /backstores`` lists a ``user:<subtype>`` node per served subtype,
``help create`` prints the handler's ConfigDesc, a bad cfgstring is refused with the handler's
own message (CheckConfig), and a raw disk created in targetcli works through a loopback LUN
created in targetcli (a pattern written and read back with O_DIRECT, and found in the image)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

from guestlib import (
    CORE,
    Context,
    Daemon,
    have,
    log,
    run,
    scenario,
    tcmu_py,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[3]
POLICY = ROOT / "dbus" / "tcmu-py.conf"
SYSTEM_BUS = Path("/run/dbus/system_bus_socket")
MIB = 1 << 20


def _targetcli(ctx: Context, *args: str, check: bool = True) -> str:
    out = run(["targetcli", *args], timeout=ctx.remaining(60), check=check)
    return out.stdout + out.stderr


def _loopback_disk() -> Path | None:
    """The sd disk behind tcm_loop (the only loopback LUN in the guest at that point)."""
    for dev in Path("/sys/block").glob("sd*"):
        if "tcm_loop_adapter" in os.path.realpath(dev / "device") and (
                Path("/dev") / dev.name).exists():
            return Path("/dev") / dev.name
    return None


@scenario(timeout=420)
def targetcli_lists_creates_and_checks(ctx: Context) -> None:
    if not (have("targetcli") and have("dbus-daemon")):
        raise RuntimeError("targetcli-fb and dbus are needed (scripts/bootstrap.sh installs them)")
    started = time.monotonic()

    # The system bus, with tcmu-py's policy installed where the distribution's bus reads it
    # (/etc is a throw-away overlay in the guest).
    installed = Path("/etc/dbus-1/system.d/tcmu-py.conf")
    installed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(POLICY, installed)
    ctx.cleanup.callback(lambda: installed.unlink(missing_ok=True))
    SYSTEM_BUS.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        SYSTEM_BUS.unlink()
    bus = Daemon(["dbus-daemon", "--system", "--nofork", "--nopidfile"],
                 ctx.artifacts / "dbus-daemon.log")
    ctx.cleanup.callback(bus.stop)
    bus.start(ready=SYSTEM_BUS.exists, timeout=ctx.remaining(30))

    ready = ctx.workdir / "ready"
    serve = Daemon(tcmu_py("-v", "serve", "--run-dir", str(ctx.workdir / "run"), "--ready-file",
                           str(ready)), ctx.artifacts / "daemon.log")
    ctx.cleanup.callback(serve.stop)
    serve.start(ready=ready.exists, timeout=ctx.remaining(150))
    assert "D-Bus: org.kernel.TCMUService1 on the system bus" in serve.output(), serve.output()

    # Every served subtype is a user:<subtype> backstore node.
    listing = _targetcli(ctx, "ls", "/backstores")
    ctx.details["targetcli_ls"] = listing
    nodes = set(re.findall(r"o- user:([a-z0-9_]+) ", listing))
    assert {"raw", "thin", "vtl"} <= nodes, listing

    # The rest in one targetcli session (commands on stdin, as typed at its prompt): under
    # emulation every targetcli start costs tens of seconds (Python, rtslib-fb, GDBus).
    from tcmu_py.handlers.raw import RawHandler

    image = ctx.workdir / "d0.img"
    wwn = "naa.5001405" + os.urandom(5).hex()[:9]

    def leftovers() -> None:  # only if the scenario failed before its own delete
        if list(CORE.glob("user_*/d0")):
            run(["targetcli"], input=(f"/loopback delete {wwn}\n"
                                      "/backstores/user:raw delete d0\nexit\n").encode(),
                timeout=120, check=False)

    ctx.cleanup.callback(leftovers)
    script = "\n".join([
        "set global auto_save_on_exit=false",
        "/backstores/user:raw help create",
        "/backstores/user:raw create name=bad size=1M cfgstring=relative.img",
        f"/backstores/user:raw create name=d0 size=64M cfgstring={image}",
        f"/loopback create {wwn}",
        f"/loopback/{wwn}/luns create /backstores/user:raw/d0",
        "ls /backstores/user:raw",
        "exit",
    ]) + "\n"
    out = run(["targetcli"], input=script.encode(), timeout=ctx.remaining(180))
    session = out.stdout + out.stderr
    ctx.details["targetcli_session"] = session
    # help create: the handler's ConfigDesc.
    assert "CFGSTRING FORMAT" in session and RawHandler.description in session, session
    # A bad cfgstring: refused by CheckConfig with the handler's message, nothing created.
    assert ("cfgstring invalid: raw: config string 'relative.img': expected the absolute path"
            " of the image") in session, session
    assert not list(CORE.glob("user_*/bad")), "the refused backstore exists in configfs"
    # The good one: a user backstore of tcmu-py's raw handler, and a LUN of it.
    assert list(CORE.glob("user_*/d0")), "no d0 backstore in configfs"
    dev = wait_for(_loopback_disk, ctx.remaining(60), "the sd disk of the loopback LUN")
    size = int((Path("/sys/block") / dev.name / "size").read_text()) * 512
    assert size == 64 * MIB, f"{dev}: {size} bytes, expected 64 MiB"

    pattern = ctx.workdir / "pattern"
    pattern.write_bytes(os.urandom(MIB))
    run(["dd", f"if={pattern}", f"of={dev}", "bs=64k", "seek=80", "oflag=direct",
         "conv=fsync", "status=none"], timeout=ctx.remaining(60))
    back = ctx.workdir / "back"
    run(["dd", f"if={dev}", f"of={back}", "bs=64k", "skip=80", "count=16", "iflag=direct",
         "status=none"], timeout=ctx.remaining(60))
    assert back.read_bytes() == pattern.read_bytes(), "read back through sd differs"
    with open(image, "rb") as f:  # through tcmu-py's raw handler into its image
        f.seek(80 * 64 * 1024)
        assert f.read(MIB) == pattern.read_bytes(), "the image does not hold the pattern"

    # Taken down in targetcli too: the backstore's rmdir waits (no time limit) for serve's
    # answer to REMOVED_DEVICE, so this returning at all is the check.
    out = run(["targetcli"], input=(f"/loopback delete {wwn}\n"
                                    "/backstores/user:raw delete d0\nexit\n").encode(),
              timeout=ctx.remaining(120))
    assert not list(CORE.glob("user_*/d0")), out.stdout + out.stderr
    ctx.details["seconds"] = round(time.monotonic() - started, 1)
    log(f"targetcli scenario: {ctx.details['seconds']} s")
