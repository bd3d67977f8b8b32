"""targetcli drives tcmu-py over D-Bus (issue 13): scripts/install-system.sh (policy file and
activation file), a system dbus-daemon, and no daemon started by hand: LIO's own shell's first
call, ``targetcli ls /backstores``, makes the bus start `tcmu-py serve` (D-Bus activation
through dbus-daemon's launch helper; under systemd, the unit); it lists a ``user:<subtype>``
node per served subtype,
``help create`` prints the handler's ConfigDesc, a bad cfgstring is refused with the handler's
own message (CheckConfig), and a raw disk created in targetcli works through a loopback LUN
created in targetcli (a pattern written and read back with O_DIRECT, and found in the image)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

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
SYSTEM_BUS = Path("/run/dbus/system_bus_socket")
MIB = 1 << 20
#: The tcmu-py the activation file runs: this venv's (the guest's /usr is a throw-away overlay).
TCMU_PY = Path(sys.executable).parent / "tcmu-py"
ACTIVATION = Path("/usr/local/share/dbus-1/system-services/org.kernel.TCMUService1.service")


def install_system(ctx: Context) -> None:
    """README's install step, as root in the guest (/etc and /usr are throw-away overlays)."""
    run(["sh", str(ROOT / "scripts/install-system.sh")], timeout=ctx.remaining(60),
        env={**os.environ, "TCMU_PY": str(TCMU_PY)})
    assert f"exec {TCMU_PY} serve" in ACTIVATION.read_text()


#: The bus gives an activated service 25 s to take its name, then kills it. Python under
#: emulation (no KVM, a busy host) can take longer just to import: the lab's bus waits longer.
LAB_LIMITS = Path("/etc/dbus-1/system.d/zz-tcmu-py-lab.conf")


def system_bus(ctx: Context) -> Daemon:
    """The distribution's system bus (its system.conf, with /etc/dbus-1/system.d/*.conf)."""
    LAB_LIMITS.write_text('<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus '
                          'Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/'
                          '1.0/busconfig.dtd">\n<busconfig><limit name="service_start_timeout">'
                          '300000</limit></busconfig>\n')
    SYSTEM_BUS.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        SYSTEM_BUS.unlink()
    bus = Daemon(["dbus-daemon", "--system", "--nofork", "--nopidfile"],
                 ctx.artifacts / "dbus-daemon.log")
    ctx.cleanup.callback(bus.stop)
    bus.start(ready=SYSTEM_BUS.exists, timeout=ctx.remaining(30))
    return bus


def serve_status(ctx: Context, run_dir: str = "/run/tcmu-py") -> dict[str, Any] | None:
    """`tcmu-py status --json` of the daemon whose control socket is in ``run_dir``."""
    out = run(tcmu_py("status", "--json", "-i", "0", "--run-dir", run_dir),
              timeout=ctx.remaining(90),
              check=False)
    if out.returncode != 0:
        return None
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def activate(ctx: Context) -> tuple[str, dict[str, Any]]:
    """targetcli's first call with no daemon running starts tcmu-py (D-Bus activation: the
    launch helper runs the activation file's Exec= as root). targetcli's own call gives up
    after 25 s (GDBus's default); under emulation the daemon may take longer to start, so this
    waits for the daemon's answer and returns a listing made once it runs."""
    assert serve_status(ctx) is None, "a tcmu-py daemon already runs"
    first = run(["targetcli", "ls", "/backstores"], timeout=ctx.remaining(120)).stdout
    status = wait_for(lambda: serve_status(ctx), ctx.remaining(180), "the activated tcmu-py")
    pid = int(str(status["pid"]))
    ctx.cleanup.callback(lambda: stop_pid(ctx, pid))
    ctx.details["activated_pid"] = pid
    ctx.details["first_listing_had_user_nodes"] = "o- user:raw" in first
    if "o- user:raw" not in first:
        first = run(["targetcli", "ls", "/backstores"], timeout=ctx.remaining(120)).stdout
    return first, status


def stop_pid(ctx: Context, pid: int) -> None:
    """SIGTERM a daemon this scenario did not start itself (activated), wait for it to go."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)

    def gone() -> bool:
        return not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text(errors="replace").lower()

    wait_for(gone, ctx.remaining(60), f"pid {pid} to exit")


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

    # README's install, the system bus, and no tcmu-py running.
    install_system(ctx)
    system_bus(ctx)
    listing, _ = activate(ctx)
    ctx.details["activated_seconds"] = round(time.monotonic() - started, 1)
    # Every served subtype is a user:<subtype> backstore node.
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
