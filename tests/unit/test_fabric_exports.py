"""YAML exports over SRP, iSER and FC (issue 18): validation (one line per problem naming file,
key, value and what was expected), the LIO object plan, apply/down against the in-memory
configfs model, and the kernel-facing parts (rtslib-fb calls, ib_srpt's configfs paths) without
a kernel."""

from __future__ import annotations

import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.daemon import lio
from tcmu_py.daemon.config import Config, FabricAcl, load_config_text
from tcmu_py.daemon.fabric_lio import SrptConfigfs
from tcmu_py.daemon.lio import Kind, LioError, LioObject, MemoryBackend, RtslibBackend
from tcmu_py.errors import ConfigError

GUID = "0000:00ff:fe00:7701"
GID = "0xfe8000000000000000000000fe007701"
IQN = "iqn.2025-01.org.tcmu-py:fabrics"

TEXT = """
state_dir: {state}
devices:
  - {{name: disk0, handler: raw, size: 1M}}
  - {{name: disk1, handler: raw, size: 1M}}
exports:
  iscsi:
    - iqn: iqn.2025-01.org.tcmu-py:tcp
      portals: ["127.0.0.1:3260"]
      generate_node_acls: true
      luns: [{{device: disk0}}]
  iser:
    - iqn: {iqn}
      portals: ["192.168.77.1:3260"]
      generate_node_acls: true
      luns: [{{device: disk0}}, {{device: disk1}}]
  srp:
    - port: "{guid}"
      rdma_cm_port: 5555
      luns: [{{device: disk0}}, {{device: disk1, lun: 4}}]
      acls: [{{initiator: 192.168.77.1}}, {{initiator: "192.168.77.2", luns: [disk1]}}]
    - port: IB.FE8000000000000000000000FE007701
      luns: [{{device: disk1}}]
      acls: [{{initiator: "0x00000000000000000000000000abcdef"}}]
  fc:
    - wwpn: "20:00:02:00:00:00:77:01"
      luns: [{{device: disk1}}]
      acls: [{{initiator: "0x2000020000007702"}}]
"""


def load(text: str, state: str = "/tmp/fabric-state") -> Config:
    return load_config_text(textwrap.dedent(text.format(state=state, iqn=IQN, guid=GUID)),
                            "cfg.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load_config_text(textwrap.dedent(text), "cfg.yaml")
    lines = str(ei.value).splitlines()
    return lines[1:] if len(lines) > 1 else lines


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return load(TEXT, str(tmp_path / "state"))


# ----------------------------------------------------------------- validation


def test_fabric_exports_are_read_and_names_normalised(cfg: Config) -> None:
    ex = cfg.exports
    assert [t.iqn for t in ex.iscsi] == ["iqn.2025-01.org.tcmu-py:tcp"]
    assert [t.iqn for t in ex.iser] == [IQN]
    srp, srp_gid = ex.srp
    assert srp.port == GUID and srp.rdma_cm_port == 5555
    assert [(lm.device, lm.lun) for lm in srp.luns] == [("disk0", 0), ("disk1", 4)]
    assert srp.acls == (FabricAcl("192.168.77.1"), FabricAcl("192.168.77.2", ("disk1",)))
    # rtslib-fb's spelling ib.<gid> is ib_srpt's 0x<gid>; case does not matter.
    assert srp_gid.port == GID and srp_gid.rdma_cm_port is None
    (fc,) = ex.fc
    assert fc.wwpn == "naa.2000020000007701"
    assert fc.acls == (FabricAcl("naa.2000020000007702"),)


BASE = """
devices: [{name: d0, handler: raw, size: 1M}]
exports:
"""


@pytest.mark.parametrize("exports, line", [
    ("srp: [{port: 'fe80:1', luns: [{device: d0}], acls: [{initiator: 10.0.0.1}]}]",
     "cfg.yaml: exports.srp[0].port: got 'fe80:1', expected an ib_srpt port name: the port GUID"
     " xxxx:xxxx:xxxx:xxxx or its GID 0x<32 hex digits> (ib.<32 hex digits> as rtslib-fb"
     " writes it)"),
    (f"srp: [{{port: '{GUID}', luns: [{{device: d0}}]}}]",
     "cfg.yaml: exports.srp[0].acls: got nothing, expected at least one ACL (ib_srpt has no demo"
     " mode: an initiator without an ACL cannot log in)"),
    (f"srp: [{{port: '{GUID}', acls: [{{initiator: host.example}}]}}]",
     "cfg.yaml: exports.srp[0].acls[0].initiator: got 'host.example', expected an SRP initiator"
     " as ib_srpt names its sessions: the initiator's IP address (RDMA/CM login), its port GUID"
     " xxxx:xxxx:xxxx:xxxx or its port ID 0x<32 hex digits> (IB CM login)"),
    (f"srp: [{{port: '{GUID}', rdma_cm_port: 0, acls: [{{initiator: 10.0.0.1}}]}}]",
     "cfg.yaml: exports.srp[0].rdma_cm_port: got 0, expected a TCP port 1..65535 for RDMA/CM"
     " logins"),
    (f"srp: [{{port: '{GUID}', acls: [{{initiator: 10.0.0.1}}], luns: [{{device: nope}}]}}]",
     "cfg.yaml: exports.srp[0].luns[0].device: got 'nope', expected the name of a device in"
     " devices (d0)"),
    ("fc: [{wwpn: naa.3000020000007701, acls: [{initiator: '20:00:02:00:00:00:77:02'}]}]",
     "cfg.yaml: exports.fc[0].wwpn: got 'naa.3000020000007701', expected an FC port name:"
     " naa.<16 hex digits> starting 1, 2, 5 or c-f, or the same 8 bytes as"
     " 20:00:xx:xx:xx:xx:xx:xx (an FCoE WWPN is 20:00 and the MAC address)"),
    ("fc: [{wwpn: naa.2000020000007701, luns: [{device: d0}]}]",
     "cfg.yaml: exports.fc[0].acls: got nothing, expected at least one ACL (tcm_fc has no demo"
     " mode: an initiator without an ACL cannot log in)"),
    ("fc: [{wwpn: naa.2000020000007701, acls: []}]",
     "cfg.yaml: exports.fc[0].acls: got [], expected at least one ACL (tcm_fc has no demo"
     " mode: an initiator without an ACL cannot log in)"),
    ("fc: [{wwpn: naa.2000020000007701, luns: [{device: d0}],"
     " acls: [{initiator: naa.2000020000007702, luns: [d1]}]}]",
     "cfg.yaml: exports.fc[0].acls[0].luns[0]: got 'd1', expected a device exported in this"
     " target's luns (d0)"),
    ("fc: [{wwpn: naa.2000020000007701, speed: 10, acls: [{initiator: naa.2000020000007702}]}]",
     "cfg.yaml: exports.fc[0].speed: got 10, expected one of the keys acls, luns, wwpn (unknown"
     " key)"),
    ("sas: []",
     "cfg.yaml: exports.sas: got [], expected one of the keys fc, iscsi, iser, loopback, srp,"
     " usb (unknown key)"),
    ("usb: [{wwn: naa.6001405c0ffee0b1}]",
     "cfg.yaml: exports.usb[0].udc: got nothing, expected this required key"),
    ("usb: [{wwn: 'naa.6001405c0ffee0b', udc: dummy_udc.0}]",
     "cfg.yaml: exports.usb[0].wwn: got 'naa.6001405c0ffee0b', expected a USB target or nexus"
     " name naa.<16 hex digits>"),
    ("usb: [{wwn: naa.6001405c0ffee0b1, nexus: iqn.2025-01.org:x, udc: dummy_udc.0}]",
     "cfg.yaml: exports.usb[0].nexus: got 'iqn.2025-01.org:x', expected a USB target or nexus"
     " name naa.<16 hex digits>"),
    ("usb: [{wwn: naa.6001405c0ffee0b1, udc: 'dummy udc'}]",
     "cfg.yaml: exports.usb[0].udc: got 'dummy udc', expected a USB device controller as"
     " /sys/class/udc names it (dummy_udc.0 in the lab)"),
    ("usb: [{wwn: naa.6001405c0ffee0b1, udc: dummy_udc.0, gadget: ../g}]",
     "cfg.yaml: exports.usb[0].gadget: got '../g', expected a gadget name of 1..64 characters"
     " A-Z a-z 0-9 _ . - (a directory of /sys/kernel/config/usb_gadget)"),
    ("usb: [{wwn: naa.6001405c0ffee0b1, udc: dummy_udc.0, vendor_id: 0x10000}]",
     "cfg.yaml: exports.usb[0].vendor_id: got 65536, expected a USB vendor ID 0..0xffff"),
    ("usb: [{wwn: naa.6001405c0ffee0b1, udc: dummy_udc.0, product_id: -1}]",
     "cfg.yaml: exports.usb[0].product_id: got -1, expected a USB product ID 0..0xffff"),
    ("usb: [{wwn: naa.6001405c0ffee0b1, udc: dummy_udc.0, luns: [{device: d0, lun: 1}]}]",
     "cfg.yaml: exports.usb[0].luns: got [1], expected at most 16 LUNs numbered 0, 1, ..."
     " without gaps (a Bulk-Only host scans LUNs 0..GET MAX LUN, which usb_f_tcm answers with"
     " the LUN count - 1)"),
    ("usb: [{wwn: naa.6001405c0ffee0b1, udc: dummy_udc.0, luns: [{device: nope}]}]",
     "cfg.yaml: exports.usb[0].luns[0].device: got 'nope', expected the name of a device in"
     " devices (d0)"),
    ("usb: [{wwn: naa.6001405c0ffee0b1, udc: dummy_udc.0, acls: []}]",
     "cfg.yaml: exports.usb[0].acls: got [], expected one of the keys gadget, luns, nexus,"
     " product_id, udc, vendor_id, wwn (unknown key)"),
    ("usb: [{wwn: naa.6001405c0ffee0b1, udc: dummy_udc.0}, {wwn: naa.6001405c0ffee0b3,"
     " udc: dummy_udc.1}]",
     "cfg.yaml: exports.usb[1]: got {'udc': 'dummy_udc.1', 'wwn': 'naa.6001405c0ffee0b3'},"
     " expected at most one USB target (usb_f_tcm serves one in the whole system)"),
])
def test_one_problem_one_line(exports: str, line: str) -> None:
    assert problems(BASE + "  " + exports + "\n") == [line]


def test_duplicates_across_targets_and_initiators() -> None:
    got = problems(BASE + f"""\
  iscsi: [{{iqn: {IQN}, generate_node_acls: true}}]
  iser: [{{iqn: {IQN}, generate_node_acls: true}}]
  srp:
    - {{port: "{GUID}", rdma_cm_port: 5555, acls: [{{initiator: 10.0.0.1}}]}}
    - {{port: "{GUID.upper()}", rdma_cm_port: 5556,
       acls: [{{initiator: 10.0.0.1}}, {{initiator: 10.0.0.01}}]}}
  fc:
    - {{wwpn: naa.2000020000007701, acls: [{{initiator: naa.2000020000007702}},
                                           {{initiator: "20:00:02:00:00:00:77:02"}}]}}
""")
    assert got == [
        f"cfg.yaml: exports.iser[0].iqn: got '{IQN}', expected a target name not used before"
        " (duplicate)",
        f"cfg.yaml: exports.srp[1].port: got '{GUID.upper()}', expected a target port not used"
        " before (duplicate)",
        "cfg.yaml: exports.srp[1].rdma_cm_port: got 5556, expected the same port as the other"
        " SRP targets (5555: ib_srpt has one RDMA/CM port)",
        "cfg.yaml: exports.srp[1].acls[1].initiator: got '10.0.0.01', expected an SRP initiator"
        " as ib_srpt names its sessions: the initiator's IP address (RDMA/CM login), its port"
        " GUID xxxx:xxxx:xxxx:xxxx or its port ID 0x<32 hex digits> (IB CM login)",
        "cfg.yaml: exports.fc[0].acls[1].initiator: got '20:00:02:00:00:00:77:02', expected an"
        " initiator listed once per target (duplicate)",
    ]


# ----------------------------------------------------------------- plan


def test_plan_of_the_new_fabrics(cfg: Config) -> None:
    plan = lio.plan_exports(cfg)
    iser_portal = next(o for o in plan if o.kind is Kind.PORTAL and o.key[1] == IQN)
    assert iser_portal.params == {"ip": "192.168.77.1", "port": 3260, "iser": True}
    tcp_portal = next(o for o in plan if o.kind is Kind.PORTAL and o.key[1] != IQN)
    assert tcp_portal.params == {"ip": "127.0.0.1", "port": 3260}  # no iser key: unchanged
    srp = [str(o) for o in plan if o.key[0] == "srpt"]
    assert srp == [
        f"target srpt/{GUID}",
        f"tpg srpt/{GUID}/1",
        f"lun srpt/{GUID}/1/0",
        f"lun srpt/{GUID}/1/4",
        f"acl srpt/{GUID}/1/192.168.77.1",
        f"mapped_lun srpt/{GUID}/1/192.168.77.1/0",
        f"mapped_lun srpt/{GUID}/1/192.168.77.1/4",
        f"acl srpt/{GUID}/1/192.168.77.2",
        f"mapped_lun srpt/{GUID}/1/192.168.77.2/4",  # masked: disk1 only, at its TPG LUN
        f"target srpt/{GID}",
        f"tpg srpt/{GID}/1",
        f"lun srpt/{GID}/1/0",
        f"acl srpt/{GID}/1/0x00000000000000000000000000abcdef",
        f"mapped_lun srpt/{GID}/1/0x00000000000000000000000000abcdef/0",
    ]
    target = next(o for o in plan if o.kind is Kind.TARGET and o.key == ("srpt", GUID))
    assert target.params == {"rdma_cm_port": 5555}
    fc = [str(o) for o in plan if o.key[0] == "tcm_fc"]
    assert fc == [
        "target tcm_fc/naa.2000020000007701",
        "tpg tcm_fc/naa.2000020000007701/1",
        "lun tcm_fc/naa.2000020000007701/1/0",
        "acl tcm_fc/naa.2000020000007701/1/naa.2000020000007702",
        "mapped_lun tcm_fc/naa.2000020000007701/1/naa.2000020000007702/0",
    ]
    mapped = next(o for o in plan if str(o).startswith(f"mapped_lun srpt/{GUID}/1/192.168.77.2"))
    assert mapped.params == {"tpg_lun": 4, "write_protect": False}


def test_apply_and_down_remove_exactly_the_fabric_objects(cfg: Config) -> None:
    foreign = LioObject(Kind.TARGET, ("tcm_fc", "naa.2000020000009999"))
    be = MemoryBackend([foreign])
    made = lio.apply(cfg, be).created
    assert len(made) == len(lio.plan_backstores(cfg)) + len(lio.plan_exports(cfg))
    assert [str(o) for o in lio.read_state(cfg.state_dir)] == [str(o) for o in made]
    # A second apply adopts everything (the iser flag and rdma_cm_port compare equal).
    again = lio.apply(cfg, be)
    assert again.created == [] and len(again.adopted) == len(made)
    removed = lio.down(cfg.state_dir, be)
    assert sorted(map(str, removed)) == sorted(map(str, made))
    assert list(be.objects) == [(Kind.TARGET, foreign.key)]  # not ours: left alone
    assert lio.read_state(cfg.state_dir) == []


def test_state_file_round_trips_the_new_params(cfg: Config) -> None:
    lio.apply(cfg, MemoryBackend())
    recorded = {str(o): o.params for o in lio.read_state(cfg.state_dir)}
    assert recorded[f"target srpt/{GUID}"] == {"rdma_cm_port": 5555}
    assert recorded[f"portal iscsi/{IQN}/1/192.168.77.1:3260"]["iser"] is True


# ----------------------------------------------------------------- rtslib-fb and configfs


class _Portal:
    """rtslib-fb's NetworkPortal, as far as `_enable_iser` uses it: setting ``iser`` writes the
    configfs file (or, ``takes=False``, does nothing, as rtslib-fb does when it is missing)."""

    takes = True
    deleted: list[str] = []

    def __init__(self, tpg: Any, ip: str, port: int, mode: str, root: Path) -> None:
        self.path = str(root / f"{ip}:{port}")
        Path(self.path).mkdir()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "iser" and type(self).takes:
            (Path(self.path) / "iser").write_text(f"{int(value)}\n")
        object.__setattr__(self, name, value)

    def delete(self) -> None:
        _Portal.deleted.append(self.path)


def _backend(tmp_path: Path) -> RtslibBackend:
    be = RtslibBackend.__new__(RtslibBackend)
    ns = types.SimpleNamespace(
        Target=lambda *a, **k: None, FabricModule=lambda name: name,
        TPG=lambda *a, **k: None,
        NetworkPortal=lambda tpg, ip, port, mode: _Portal(tpg, ip, port, mode, tmp_path))
    ns.utils = types.SimpleNamespace(RTSLibError=RuntimeError)
    be.rtslib = ns
    be.configfs = str(tmp_path / "configfs")
    return be


def test_iser_portal_is_checked_after_rtslib_sets_it(cfg: Config, tmp_path: Path) -> None:
    be = _backend(tmp_path)
    portal = next(o for o in lio.plan_exports(cfg) if o.kind is Kind.PORTAL and o.key[1] == IQN)
    be.create(portal)
    assert (tmp_path / "192.168.77.1:3260" / "iser").read_text() == "1\n"
    _Portal.takes, _Portal.deleted = False, []
    try:
        (tmp_path / "192.168.77.1:3260" / "iser").unlink()
        (tmp_path / "192.168.77.1:3260").rmdir()
        with pytest.raises(LioError, match="iser attribute is missing or did not take"):
            be.create(portal)
    finally:
        _Portal.takes = True
    assert _Portal.deleted == [str(tmp_path / "192.168.77.1:3260")]  # not left half-made


def test_srpt_objects_go_to_configfs_by_hand(cfg: Config, tmp_path: Path) -> None:
    """Paths and writes of ib_srpt's objects (a plain directory stands in for configfs, so only
    what it can model is checked: directories, files, links; configfs's own default groups and
    the kernel's refusals are the kernel scenario's)."""
    root = tmp_path / "configfs"
    (root / "srpt" / "discovery_auth").mkdir(parents=True)
    so = root / "core" / "user_0" / "disk0"
    so.mkdir(parents=True)
    srpt = SrptConfigfs(root, lambda name: root / "core" / "user_0" / name)
    plan = {str(o): o for o in lio.plan_exports(cfg) if o.key[0] == "srpt"}
    for name in (f"target srpt/{GUID}", f"tpg srpt/{GUID}/1", f"lun srpt/{GUID}/1/0",
                 f"acl srpt/{GUID}/1/192.168.77.1", f"mapped_lun srpt/{GUID}/1/192.168.77.1/0"):
        obj = plan[name]
        assert not srpt.exists(obj)
        if obj.kind is Kind.TPG:  # configfs makes these default groups with the TPG
            srpt.create(obj)
            (root / "srpt" / GUID / "tpgt_1" / "lun").mkdir()
            (root / "srpt" / GUID / "tpgt_1" / "acls").mkdir()
        else:
            srpt.create(obj)
        assert srpt.exists(obj), name
    tpg = root / "srpt" / GUID / "tpgt_1"
    assert (root / "srpt" / "discovery_auth" / "rdma_cm_port").read_text() == "5555"
    assert (tpg / "enable").read_text() == "1"
    assert (tpg / "lun" / "lun_0" / "disk0").resolve() == so
    mapped = tpg / "acls" / "192.168.77.1" / "lun_0" / "lun"
    assert mapped.resolve() == tpg / "lun" / "lun_0"
    # Removing an ACL removes its mapped LUNs (links first, as configfs requires).
    srpt.delete(plan[f"acl srpt/{GUID}/1/192.168.77.1"])
    assert not (tpg / "acls" / "192.168.77.1").exists()
    srpt.delete(plan[f"lun srpt/{GUID}/1/0"])
    assert not (tpg / "lun" / "lun_0").exists() and so.is_dir()  # the backstore stays


def test_rtslib_backend_sends_srpt_objects_to_configfs(cfg: Config, tmp_path: Path) -> None:
    be = _backend(tmp_path)
    target = next(o for o in lio.plan_exports(cfg) if o.key == ("srpt", GUID))
    (tmp_path / "configfs" / "srpt" / "discovery_auth").mkdir(parents=True)
    assert be.exists(target) is False
    be.create(target)
    assert (tmp_path / "configfs" / "srpt" / GUID).is_dir()
    assert be.exists(target) is True
    missing = LioObject(Kind.TARGET, ("srpt", "ffff:ffff:ffff:ffff"), {"rdma_cm_port": None})
    (tmp_path / "configfs" / "srpt" / "ffff:ffff:ffff:ffff").mkdir()
    with pytest.raises(LioError, match="creating target srpt/ffff:ffff:ffff:ffff"):
        be.create(missing)  # mkdir fails (here: exists; in the kernel: EINVAL, no such port)
