"""tcmu-py next to tcmu-runner (Debian's tcmu-runner 1.5.4), both orders of start (issue 13).

What the two daemons share: the D-Bus name org.kernel.TCMUService1 (one owner; the other
queues) and the kernel's TCM-USER netlink group, whose "wait for replies" switch is one for the
whole module (SET_FEATURES), while tcmu-runner answers ADDED_DEVICE of every subtype it lacks
with -ENOENT (libtcmu.c, device_add).

- ``runner_first``: tcmu-runner owns the name; `serve` registers its subtypes with tcmu-runner's
  HandlerManager1 and turns kernel replies off. targetcli lists both daemons' subtypes, a bad
  raw cfgstring is refused through tcmu-runner (it forwards CheckConfig to tcmu-py), a
  user:raw disk (default attributes) works through a loopback LUN and a user:fbo (tcmu-runner's
  optical drive) through an iSCSI LUN on 127.0.0.1.
- ``tcmu_py_first``: tcmu-py owns the name, tcmu-runner queues for it (and turns replies on):
  targetcli lists tcmu-py's subtypes only; a user:fbo created with rtslib-fb is served by
  tcmu-runner; a user:raw disk works when created with ``control=nl_reply_supported=-1`` (no
  reply awaited: tcmu-runner's -ENOENT cannot fail it); one with default attributes ends
  bounded either way (tcmu-runner's -ENOENT or tcmu-py's 0 decides `enable`).

Both: no configfs write waits for good (every command ran under a timeout), and dmesg has no
hung-task report. The fbo LUN is exported over iSCSI and checked with libiscsi's iscsi-inq, not
through tcm_loop: Linux's sr driver probing it locally waited out a 30 s command timeout at
attach and another at removal (a command tcmu-runner's fbo leaves unanswered), 80 s of CI.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from guestlib import (
    CORE,
    Context,
    Daemon,
    have,
    log,
    loopback_disk_of_size,
    run,
    scenario,
    tcmu_py,
    wait_for,
)

from scenarios.targetcli_dbus import MIB, install_system, system_bus

BUS_NAME = "org.kernel.TCMUService1"
RAW_BAD = ("cfgstring invalid: raw: config string 'relative.img': expected the absolute path"
           " of the image")


def _bus_call(member: str, sig: str, body: tuple[Any, ...]) -> tuple[Any, ...]:
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    bus = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                      interface="org.freedesktop.DBus")
    with open_dbus_connection("SYSTEM") as conn:
        return tuple(conn.send_and_get_reply(new_method_call(bus, member, sig, body),
                                             timeout=10).body)


def _queued_owners() -> list[str]:
    try:
        (owners,) = _bus_call("ListQueuedOwners", "s", (BUS_NAME,))
    except Exception:  # noqa: BLE001 - NameHasNoOwner is an error reply
        return []
    return list(owners) if isinstance(owners, list) else []


def _tcmu_runner(ctx: Context) -> Daemon:
    logdir = ctx.artifacts / "tcmu-runner"
    logdir.mkdir(exist_ok=True)
    runner = Daemon(["tcmu-runner", "-l", str(logdir)], ctx.artifacts / "tcmu-runner.out")
    ctx.cleanup.callback(runner.stop)
    return runner


def _serve(ctx: Context) -> Daemon:
    ready = ctx.workdir / "ready"
    serve = Daemon(tcmu_py("-v", "serve", "--run-dir", str(ctx.workdir / "run"),
                           "--ready-file", str(ready)), ctx.artifacts / "daemon.log")
    ctx.cleanup.callback(serve.stop)
    serve.start(ready=ready.exists, timeout=ctx.remaining(120))
    return serve


def _targetcli(ctx: Context, *lines: str, check: bool = True) -> str:
    script = "\n".join(["set global auto_save_on_exit=false", *lines, "exit"]) + "\n"
    out = run(["targetcli"], input=script.encode(), timeout=ctx.remaining(180), check=check)
    return out.stdout + out.stderr


def _nodes(ctx: Context) -> set[str]:
    out = run(["targetcli", "ls", "/backstores"], timeout=ctx.remaining(60))
    return set(re.findall(r"o- user:([a-z0-9_]+) ", out.stdout))


#: The iSCSI target of tcmu-runner's fbo LUN (on 127.0.0.1 only).
FBO_IQN = "iqn.2003-01.org.linux-iscsi.tcmu-py:fbo"
FBO_TPG = f"/iscsi/{FBO_IQN}/tpg1"


def _fbo_target(so_path: str) -> tuple[str, ...]:
    """targetcli lines exporting backstore `so_path` as LUN 0 of `FBO_IQN` on 127.0.0.1:3260
    (no default 0.0.0.0 portal), open to any initiator."""
    return ("set global auto_add_default_portal=false",
            f"/iscsi create {FBO_IQN}",
            f"{FBO_TPG}/portals create 127.0.0.1 3260",
            f"{FBO_TPG}/luns create {so_path}",
            f"{FBO_TPG} set attribute authentication=0 demo_mode_write_protect=0 "
            "generate_node_acls=1 cache_dynamic_acls=1")


def _fbo_inquiry(ctx: Context) -> str:
    """tcmu-runner's fbo LUN answers INQUIRY over iSCSI as a CD/DVD (MMC) device."""
    run(["ip", "link", "set", "lo", "up"], timeout=30, check=False)
    out = run(["iscsi-inq", f"iscsi://127.0.0.1/{FBO_IQN}/0"], timeout=ctx.remaining(60)).stdout
    assert re.search(r"Peripheral Device Type:\s*MMC", out), out
    return " ".join(out.split())[:200]



def _pattern_round_trip(ctx: Context, dev: Path, image: Path) -> None:
    pattern = os.urandom(MIB)
    src = ctx.workdir / "pattern"
    src.write_bytes(pattern)
    run(["dd", f"if={src}", f"of={dev}", "bs=64k", "seek=16", "oflag=direct", "conv=fsync",
         "status=none"], timeout=ctx.remaining(60))
    back = ctx.workdir / "back"
    run(["dd", f"if={dev}", f"of={back}", "bs=64k", "skip=16", "count=16", "iflag=direct",
         "status=none"], timeout=ctx.remaining(60))
    assert back.read_bytes() == pattern, f"{dev}: read back differs"
    with open(image, "rb") as f:
        f.seek(16 * 64 * 1024)
        assert f.read(MIB) == pattern, f"{image} does not hold the pattern"


def _no_hung_tasks(ctx: Context) -> None:
    dmesg = run(["dmesg"], timeout=30).stdout
    hung = [line for line in dmesg.splitlines()
            if "blocked for more than" in line or "hung_task" in line]
    assert not hung, "\n".join(hung)
    ctx.details["dmesg_tcmu"] = [line for line in dmesg.splitlines() if "tcmu" in line][-20:]


def _need_tools() -> None:
    missing = [t for t in ("targetcli", "dbus-daemon", "tcmu-runner", "lsscsi") if not have(t)]
    if missing:
        raise RuntimeError(f"missing {missing} (scripts/bootstrap.sh installs them)")


def _teardown(ctx: Context, *lines: str) -> float:
    """Delete in targetcli as the scenario's last step; returns its seconds. Every rmdir of a
    user backstore sends REMOVED_DEVICE: this returning at all says no reply was awaited for
    good."""
    t0 = time.monotonic()
    try:
        _targetcli(ctx, *lines)
    except TimeoutError:
        # Where it waits: the kernel stacks of blocked tasks (sysrq w) into the details.
        Path("/proc/sysrq-trigger").write_text("w")
        ctx.details["blocked_tasks"] = run(["dmesg"], timeout=30).stdout.splitlines()[-120:]
        raise
    return round(time.monotonic() - t0, 1)


@scenario(timeout=480)
def runner_first(ctx: Context) -> None:
    _need_tools()
    started = time.monotonic()
    install_system(ctx)
    system_bus(ctx)
    runner = _tcmu_runner(ctx)
    runner.start(ready=lambda: bool(_queued_owners()), timeout=ctx.remaining(60))
    serve = _serve(ctx)
    out = serve.output()
    assert "with its HandlerManager1" in out, out[-3000:]
    assert "kernel command replies turned off" in out, out[-3000:]

    nodes = _nodes(ctx)
    ctx.details["nodes"] = sorted(nodes)
    assert {"fbo", "raw", "thin", "vtl"} <= nodes, nodes

    image, disc = ctx.workdir / "r0.img", ctx.workdir / "cd0.img"
    wwn = "naa.5001405" + os.urandom(5).hex()[:9]
    teardown = (f"/loopback delete {wwn}", f"/iscsi delete {FBO_IQN}",
                "/backstores/user:raw delete r0", "/backstores/user:fbo delete cd0")
    done = False
    ctx.cleanup.callback(lambda: done or _targetcli(ctx, *teardown, check=False))
    session = _targetcli(
        ctx,
        "/backstores/user:raw create name=bad size=1M cfgstring=relative.img",
        f"/backstores/user:raw create name=r0 size=32M cfgstring={image}",
        f"/backstores/user:fbo create name=cd0 size=16M cfgstring={disc}",
        f"/loopback create {wwn}",
        f"/loopback/{wwn}/luns create /backstores/user:raw/r0",
        *_fbo_target("/backstores/user:fbo/cd0"),
    )
    ctx.details["session"] = session
    # CheckConfig as tcmu-runner forwards it to tcmu-py: the raw handler's own message.
    assert RAW_BAD in session, session
    assert list(CORE.glob("user_*/r0")) and list(CORE.glob("user_*/cd0")), session
    dev = wait_for(lambda: loopback_disk_of_size(32 * MIB), ctx.remaining(60),
                   "the sd disk of r0")
    _pattern_round_trip(ctx, dev, image)
    ctx.details["fbo"] = _fbo_inquiry(ctx)
    ctx.details["teardown_seconds"] = _teardown(ctx, *teardown)
    done = True
    assert not list(CORE.glob("user_*/r0")) and not list(CORE.glob("user_*/cd0"))
    _no_hung_tasks(ctx)
    ctx.details["seconds"] = round(time.monotonic() - started, 1)
    log(f"runner_first: {ctx.details['seconds']} s")


@scenario(timeout=480)
def tcmu_py_first(ctx: Context) -> None:
    _need_tools()
    started = time.monotonic()
    install_system(ctx)
    system_bus(ctx)
    serve = _serve(ctx)
    assert "D-Bus: org.kernel.TCMUService1 on the system bus" in serve.output()
    runner = _tcmu_runner(ctx)
    # tcmu-runner asks for the name and queues behind tcmu-py (g_bus_own_name, no flags).
    runner.start(ready=lambda: len(_queued_owners()) >= 2, timeout=ctx.remaining(60))

    nodes = _nodes(ctx)
    ctx.details["nodes"] = sorted(nodes)
    assert {"raw", "thin", "vtl"} <= nodes and "fbo" not in nodes, nodes

    image, disc = ctx.workdir / "p0.img", ctx.workdir / "cd1.img"
    wwn = "naa.5001405" + os.urandom(5).hex()[:9]
    teardown: tuple[str, ...] = (f"/loopback delete {wwn}", "/backstores/user:raw delete p0",
                                 "/backstores/user:raw delete p1")
    done = False
    ctx.cleanup.callback(lambda: done or _targetcli(ctx, *teardown, check=False))
    # tcmu-runner's fbo: no targetcli node (it does not own the name); rtslib-fb creates it
    # and its iSCSI LUN (as `_fbo_target` has targetcli do), as targetcli would.
    rtslib = ("from rtslib_fb import FabricModule, LUN, NetworkPortal, TPG, Target, RTSRoot\n"
              "from rtslib_fb import UserBackedStorageObject as U\n")
    ctx.cleanup.callback(lambda: run(["/usr/bin/python3", "-c", rtslib + (
        "for t in RTSRoot().targets:\n"
        f"    t.delete() if t.wwn == '{FBO_IQN}' else None\n"
        "for so in RTSRoot().storage_objects:\n"
        "    so.delete() if so.name == 'cd1' else None\n")], timeout=120, check=False))
    run(["/usr/bin/python3", "-c", rtslib + (
        f"so = U('cd1', config='fbo/{disc}', size={16 * MIB})\n"
        f"tpg = TPG(Target(FabricModule('iscsi'), '{FBO_IQN}'), 1)\n"
        "NetworkPortal(tpg, '127.0.0.1', 3260)\n"
        "LUN(tpg, 0, so)\n"
        "for key, value in (('authentication', '0'), ('demo_mode_write_protect', '0'),\n"
        "                   ('generate_node_acls', '1'), ('cache_dynamic_acls', '1')):\n"
        "    tpg.set_attribute(key, value)\n"
        "tpg.enable = True\n")],
        timeout=ctx.remaining(120))
    ctx.details["fbo"] = _fbo_inquiry(ctx)
    t0 = time.monotonic()
    session = _targetcli(
        ctx,
        f"/backstores/user:raw create name=p0 size=48M cfgstring={image} "
        "control=nl_reply_supported=-1",
        f"/backstores/user:raw create name=p1 size=8M cfgstring={ctx.workdir / 'p1.img'}",
        f"/loopback create {wwn}",
        f"/loopback/{wwn}/luns create /backstores/user:raw/p0",
        check=False,
    )
    ctx.details["session"] = session
    ctx.details["default_attributes_p1"] = (
        "enabled" if list(CORE.glob("user_*/p1")) and any(
            (d / "enable").read_text().strip() == "1" for d in CORE.glob("user_*/p1"))
        else "refused")
    ctx.details["session_seconds"] = round(time.monotonic() - t0, 1)
    assert list(CORE.glob("user_*/p0")), session
    dev = wait_for(lambda: loopback_disk_of_size(48 * MIB), ctx.remaining(60),
                   "the sd disk of p0")
    _pattern_round_trip(ctx, dev, image)
    if not list(CORE.glob("user_*/p1")):  # refused by tcmu-runner's -ENOENT: nothing to delete
        teardown = teardown[:2]
    ctx.details["teardown_seconds"] = _teardown(ctx, *teardown)
    done = True
    assert not list(CORE.glob("user_*/p0"))
    _no_hung_tasks(ctx)
    ctx.details["seconds"] = round(time.monotonic() - started, 1)
    log(f"tcmu_py_first: {ctx.details['seconds']} s")
