"""tcmu_py.daemon.lio and .netlink against the real kernel: apply/adopt/down of user backstores
and an iSCSI target (TPG attributes, CHAP, ACL with LUN masking), and TCM-USER netlink replies."""

from __future__ import annotations

import select
import threading
import time
from pathlib import Path
from typing import Any

from guestlib import CORE, ISCSI, Context, read_attr, scenario

IQN = "iqn.2025-01.org.tcmu-py:lio-scenario"
INI = "iqn.1994-05.com.redhat:c1"


def _config(state: Path) -> str:
    return f"""
state_dir: {state}
devices:
  - {{name: lio0, handler: raw, size: 64M, cmd_time_out: 5}}
  - {{name: lio1, handler: raw, size: 32M, block_size: 4096, write_cache: true, serial: SER-1}}
exports:
  iscsi:
    - iqn: {IQN}
      portals: ["127.0.0.1:3260"]
      generate_node_acls: true
      chap: {{userid: tu, password: tpassword12}}
      luns: [{{device: lio0, lun: 0}}, {{device: lio1, lun: 1}}]
      acls:
        - initiator: {INI}
          chap: {{userid: u1, password: secret1secret, mutual_userid: t1,
                 mutual_password: m1m1m1m1m1m1}}
          luns: [lio1]
"""


@scenario(timeout=120)
def lio_apply_adopt_down(ctx: Context) -> None:
    """apply creates exactly the configured objects with their attributes, a second apply adopts
    them all, down removes exactly them (newest first) and empties the state file."""
    from tcmu_py.daemon import lio
    from tcmu_py.daemon.config import load_config_text

    state = ctx.workdir / "state"
    cfg = load_config_text(_config(state), "scenario.yaml")
    ctx.cleanup.callback(lio.down, str(state))
    made = lio.apply_backstores(cfg).created + lio.apply_exports(cfg).created
    assert len(made) == 9, [str(o) for o in made]
    so0, so1 = (next(CORE.glob(f"user_*/{n}")) for n in ("lio0", "lio1"))
    got = {
        "lio0.cmd_time_out": read_attr(so0 / "attrib/cmd_time_out"),
        "lio1.block_size": read_attr(so1 / "attrib/hw_block_size"),
        "lio1.max_sectors": read_attr(so1 / "attrib/hw_max_sectors"),
        "lio1.write_cache": read_attr(so1 / "attrib/emulate_write_cache"),
        "lio1.serial": read_attr(so1 / "wwn/vpd_unit_serial"),
    }
    ctx.details["backstores"] = got
    assert got == {
        "lio0.cmd_time_out": "5",
        "lio1.block_size": "4096",
        "lio1.max_sectors": "1024",
        "lio1.write_cache": "1",
        "lio1.serial": "T10 VPD Unit Serial Number: SER-1",
    }, got
    assert "MaxDataAreaMB: 128" in read_attr(so0 / "info")
    tpg = ISCSI / IQN / "tpgt_1"
    acl = tpg / "acls" / INI
    seen = {
        "enable": read_attr(tpg / "enable"),
        "authentication": read_attr(tpg / "attrib/authentication"),
        "generate_node_acls": read_attr(tpg / "attrib/generate_node_acls"),
        "demo_mode_write_protect": read_attr(tpg / "attrib/demo_mode_write_protect"),
        "tpg_userid": read_attr(tpg / "auth/userid"),
        "portals": sorted(p.name for p in (tpg / "np").iterdir()),
        "luns": sorted(p.name for p in (tpg / "lun").iterdir()),
        "acl_luns": sorted(p.name for p in acl.iterdir() if p.name.startswith("lun_")),
        "acl_mutual": read_attr(acl / "auth/userid_mutual"),
    }
    ctx.details["iscsi"] = seen
    assert seen == {
        "enable": "1",
        "authentication": "1",
        "generate_node_acls": "1",
        "demo_mode_write_protect": "0",
        "tpg_userid": "tu",
        "portals": ["127.0.0.1:3260"],
        "luns": ["lun_0", "lun_1"],
        "acl_luns": ["lun_1"],
        "acl_mutual": "t1",
    }, seen
    again = lio.apply(cfg)
    assert (len(again.created), len(again.adopted)) == (0, 9)
    assert all(r.present for r in lio.status_rows(str(state)))
    removed = lio.down(str(state))
    assert [str(o) for o in removed] == [str(o) for o in reversed(made[2:])] + [
        str(made[1]),
        str(made[0]),
    ]
    assert not list(CORE.glob("user_*/lio*")) and not (ISCSI / IQN).exists()
    assert lio.read_state(str(state)) == []


def _serve_events(
    nl,
    until: threading.Thread,
    served: set[str],
    no_reply: set[str],
    log: list[tuple[str, ...]],
    timeout: float,
) -> None:
    from tcmu_py.daemon.netlink import should_reply

    deadline = time.monotonic() + timeout
    while until.is_alive() and time.monotonic() < deadline:
        if select.select([nl], [], [], 0.2)[0]:
            for ev in nl.receive():
                answer = should_reply(ev, served, no_reply)
                log.append(
                    (
                        ev.cmd.name,
                        ev.uio.device,
                        str(ev.dev_size),
                        str(ev.writecache),
                        str(ev.dev_cfg),
                        str(answer),
                    )
                )
                if answer:
                    nl.reply(ev, 0)
    until.join(1)
    assert not until.is_alive(), f"configfs write still blocked; events {log}"


@scenario(timeout=120)
def netlink_replies(ctx: Context) -> None:
    """With SET_FEATURES(1) the kernel waits for our *_DONE replies: ADDED, RECONFIG (size, write
    cache, dev_config) and REMOVED events arrive decoded and the configfs writes complete once we
    answer; a device created with nl_reply_supported=-1 is never waited for (we do not answer)."""
    import rtslib_fb

    from tcmu_py.daemon import lio
    from tcmu_py.daemon.config import load_config_text
    from tcmu_py.daemon.netlink import TcmuNetlink

    state = ctx.workdir / "state"
    cfg = load_config_text(
        f"state_dir: {state}\ndevices: [{{name: own0, handler: raw, size: 8M}}]\n", "s.yaml"
    )
    ctx.cleanup.callback(lio.down, str(state))
    lio.apply_backstores(cfg)
    nl = TcmuNetlink()
    ctx.cleanup.callback(nl.close)
    ctx.cleanup.callback(nl.set_features, False)  # LIFO: runs before close
    nl.set_features(True)
    log: list[tuple[str, ...]] = []
    served, ours = {"nlt"}, lio.no_reply_devices(str(state))
    box: dict[str, Any] = {}

    def create() -> None:
        rtslib_fb.tcm.bs_cache.clear()
        box["so"] = rtslib_fb.UserBackedStorageObject(
            "nl0", config="nlt/x", size=1 << 20, control="max_data_area_mb=4"
        )

    th = threading.Thread(target=create)
    th.start()
    _serve_events(nl, th, served, ours, log, ctx.remaining(20))
    so = box["so"]
    ctx.cleanup.callback(lambda: so.delete() if so.exists else None)
    attrib = Path(so.path) / "attrib"
    for attr, value in (
        ("dev_size", "2097152"),
        ("emulate_write_cache", "1"),
        ("dev_config", "nlt/y"),
    ):
        th = threading.Thread(target=(attrib / attr).write_text, args=(value,))
        th.start()
        _serve_events(nl, th, served, ours, log, ctx.remaining(20))
    own = next(CORE.glob("user_*/own0")) / "attrib" / "emulate_write_cache"
    th = threading.Thread(target=own.write_text, args=("1",))
    th.start()
    _serve_events(nl, th, served, ours, log, ctx.remaining(20))
    th = threading.Thread(target=so.delete)
    th.start()
    _serve_events(nl, th, served, ours, log, ctx.remaining(20))
    ctx.details["events"] = log
    kinds = [(e[0], e[1], e[5]) for e in log]
    assert kinds[0] == ("ADDED_DEVICE", "nl0", "True"), log
    assert ("RECONFIG_DEVICE", "nl0", "2097152", "None", "None", "True") in log, log
    assert ("RECONFIG_DEVICE", "nl0", "None", "True", "None", "True") in log, log
    assert ("RECONFIG_DEVICE", "nl0", "None", "None", "nlt/y", "True") in log, log
    assert ("RECONFIG_DEVICE", "own0", "False") in kinds, log  # ours: not answered, not waited
    assert kinds[-1] == ("REMOVED_DEVICE", "nl0", "True"), log
