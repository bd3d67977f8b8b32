"""LIO plans and apply/down against the in-memory configfs model (no kernel); the rtslib-fb
mapping checked against a recording stand-in for the rtslib_fb module."""

from __future__ import annotations

import json
import os
import stat
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.daemon import lio
from tcmu_py.daemon.config import Config, load_config_text
from tcmu_py.daemon.lio import (
    Kind,
    LioConflict,
    LioError,
    LioObject,
    MemoryBackend,
    RtslibBackend,
    apply,
    apply_backstores,
    apply_exports,
    down,
    loopback_wwn,
    no_reply_devices,
    plan_backstores,
    plan_exports,
    prepare_storage,
    read_state,
    status_rows,
)
from tcmu_py.errors import StateFileError

TEXT = """
state_dir: {state}
devices:
  - {{name: disk0, handler: raw, size: 1M}}
  - {{name: thin0, handler: thin, size: 4M, block_size: 4096, hw_max_sectors: 256,
     max_data_area_mb: 32, cmd_time_out: 0, write_cache: true, serial: SER1,
     options: {{unit: 64K}}}}
exports:
  loopback:
    - {{device: disk0}}
    - {{device: thin0, lun: 3}}
  iscsi:
    - iqn: iqn.2003-01.org.tcmu-py:t1
      portals: ["127.0.0.1:3260", "[::1]:3261"]
      luns: [{{device: disk0, lun: 0}}, {{device: thin0, lun: 1}}]
      acls:
        - initiator: iqn.1994-05.com.redhat:c1
          chap: {{userid: u1, password: secret1secret}}
          luns: [thin0]
        - initiator: iqn.1994-05.com.redhat:c2
          chap: {{userid: u2, password: secret2secret, mutual_userid: t, mutual_password: m2}}
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return load_config_text(textwrap.dedent(TEXT.format(state=tmp_path / "state")), "t.yaml")


def keys(objs: list[LioObject]) -> list[str]:
    return [str(o) for o in objs]


def test_backstore_plan(cfg: Config) -> None:
    disk, thin = plan_backstores(cfg)
    assert disk.key == ("user", "disk0")
    assert disk.params == {
        "config": f"raw/{cfg.state_dir}/disk0.img",
        "size": 1 << 20,
        "wwn": None,
        "control": "nl_reply_supported=-1,max_data_area_mb=128,hw_max_sectors=1024,"
                   "hw_block_size=512",
        "attributes": {"cmd_time_out": 30, "emulate_write_cache": 0},
    }
    assert thin.params["config"] == "thin/unit=64K"
    assert thin.params["wwn"] == "SER1"
    assert thin.params["control"] == ("nl_reply_supported=-1,max_data_area_mb=32,"
                                      "hw_max_sectors=256,hw_block_size=4096")
    assert thin.params["attributes"] == {"cmd_time_out": 0, "emulate_write_cache": 1}


def test_export_plan_order_and_masking(cfg: Config) -> None:
    wwn = loopback_wwn(cfg.state_dir)
    t = "iscsi/iqn.2003-01.org.tcmu-py:t1/1"
    assert keys(plan_exports(cfg)) == [
        f"target loopback/{wwn}",
        f"tpg loopback/{wwn}/1",
        f"lun loopback/{wwn}/1/0",
        f"lun loopback/{wwn}/1/3",
        "target iscsi/iqn.2003-01.org.tcmu-py:t1",
        f"tpg {t}",
        f"portal {t}/127.0.0.1:3260",
        f"portal {t}/[::1]:3261",
        f"lun {t}/0",
        f"lun {t}/1",
        f"acl {t}/iqn.1994-05.com.redhat:c1",
        f"mapped_lun {t}/iqn.1994-05.com.redhat:c1/1",   # c1 sees only thin0 (LUN 1)
        f"acl {t}/iqn.1994-05.com.redhat:c2",
        f"mapped_lun {t}/iqn.1994-05.com.redhat:c2/0",   # c2: every TPG LUN
        f"mapped_lun {t}/iqn.1994-05.com.redhat:c2/1",
    ]
    plan = {str(o): o for o in plan_exports(cfg)}
    assert plan[f"tpg {t}"].params["attributes"] == {"authentication": 1,
                                                     "generate_node_acls": 0}
    assert plan[f"acl {t}/iqn.1994-05.com.redhat:c2"].params["chap"] == {
        "userid": "u2", "password": "secret2secret", "mutual_userid": "t",
        "mutual_password": "m2"}
    assert plan[f"lun loopback/{wwn}/1/3"].params == {"backstore": "thin0"}


def test_demo_mode_attributes_and_overrides(tmp_path: Path) -> None:
    c = load_config_text(textwrap.dedent(f"""
        state_dir: {tmp_path}
        devices: [{{name: d, handler: raw, size: 1M}}]
        exports:
          iscsi:
            - iqn: iqn.2003-01.org.x:t
              generate_node_acls: true
              attributes: {{cache_dynamic_acls: 0, default_cmdsn_depth: 128}}
              luns: [{{device: d}}]
    """), "x")
    tpg = [o for o in plan_exports(c) if o.kind is Kind.TPG][0]
    assert tpg.params == {"attributes": {"authentication": 0, "generate_node_acls": 1,
                                         "demo_mode_write_protect": 0, "cache_dynamic_acls": 0,
                                         "default_cmdsn_depth": 128},
                          "chap": None}


def test_loopback_wwn_stable_and_valid() -> None:
    a = loopback_wwn("/var/lib/tcmu-py")
    assert a == loopback_wwn("/var/lib/tcmu-py") != loopback_wwn("/srv/other")
    assert a.startswith("naa.5001405") and len(a) == 4 + 16
    int(a[4:], 16)


def test_apply_in_two_steps_records_everything(cfg: Config) -> None:
    be = MemoryBackend()
    r1 = apply_backstores(cfg, be)
    assert keys(r1.created) == ["backstore user/disk0", "backstore user/thin0"]
    # Backing image of the raw device exists, sparse, of the device size.
    img = Path(cfg.state_dir) / "disk0.img"
    assert img.stat().st_size == 1 << 20 and img.stat().st_blocks == 0
    r2 = apply_exports(cfg, be)
    assert len(r2.created) == 15
    assert [op for op, _ in be.log] == ["create"] * 17
    state = read_state(cfg.state_dir)
    assert keys(state) == keys(r1.created) + keys(r2.created)
    assert state[0].params == r1.created[0].params
    path = Path(cfg.state_dir) / lio.STATE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["version"] == 1
    assert no_reply_devices(cfg.state_dir) == {"disk0", "thin0"}


def test_exports_before_backstores_fails_and_rolls_back(cfg: Config) -> None:
    be = MemoryBackend()
    with pytest.raises(LioError, match="backstore disk0 missing"):
        apply_exports(cfg, be)
    assert be.objects == {}
    assert [op for op, _ in be.log] == ["create", "create", "delete", "delete"]
    assert read_state(cfg.state_dir) == []


def test_failure_midway_removes_what_this_call_created(cfg: Config) -> None:
    be = MemoryBackend()
    apply_backstores(cfg, be)
    victim = [o for o in plan_exports(cfg) if o.kind is Kind.ACL][0]
    be.fail_on.add((victim.kind, victim.key))
    with pytest.raises(LioError, match="injected failure"):
        apply_exports(cfg, be)
    assert {o.kind for o in be.objects.values()} == {Kind.BACKSTORE}
    assert keys(read_state(cfg.state_dir)) == ["backstore user/disk0", "backstore user/thin0"]


def test_reapply_adopts_and_creates_nothing(cfg: Config) -> None:
    be = MemoryBackend()
    apply(cfg, be)
    n = len(be.log)
    again = apply(cfg, be)
    assert again.created == [] and len(again.adopted) == 17 and len(be.log) == n


def test_reapply_recreates_our_objects_that_vanished(cfg: Config) -> None:
    be = MemoryBackend()
    apply(cfg, be)
    be.objects.clear()  # e.g. reboot: configfs is empty, the state file is not
    again = apply(cfg, be)
    assert len(again.created) == 17 and again.adopted == []
    assert len(read_state(cfg.state_dir)) == 17


def test_foreign_objects_are_conflicts_and_nothing_is_created(cfg: Config) -> None:
    foreign_t = LioObject(Kind.TARGET, ("iscsi", "iqn.2003-01.org.tcmu-py:t1"))
    foreign_b = LioObject(Kind.BACKSTORE, ("user", "thin0"), {"config": "other/"})
    be = MemoryBackend([foreign_b, foreign_t])
    with pytest.raises(LioConflict) as ei:
        apply_backstores(cfg, be)
    assert ei.value.objects == [foreign_b]
    assert "not created by tcmu-py" in str(ei.value)
    apply_backstores_ok = MemoryBackend([foreign_t])
    apply_backstores(cfg, apply_backstores_ok)
    with pytest.raises(LioConflict, match="target iscsi/iqn.2003-01.org.tcmu-py:t1: exists"):
        apply_exports(cfg, apply_backstores_ok)
    assert be.log == []


def test_changed_settings_of_our_object_is_a_conflict(cfg: Config, tmp_path: Path) -> None:
    be = MemoryBackend()
    apply_backstores(cfg, be)
    bigger = load_config_text(
        textwrap.dedent(TEXT.format(state=tmp_path / "state")).replace("size: 1M", "size: 2M"),
        "t.yaml")
    with pytest.raises(LioConflict, match="backstore user/disk0: exists with other settings"):
        apply_backstores(bigger, be)


def test_down_removes_only_ours_newest_first(cfg: Config) -> None:
    foreign = LioObject(Kind.BACKSTORE, ("user", "theirs"), {})
    be = MemoryBackend([foreign])
    res = apply(cfg, be)
    be.log.clear()
    removed = down(cfg.state_dir, be)
    assert [op for op, _ in be.log] == ["delete"] * 17
    # Reverse creation order, backstores last.
    assert keys(removed) == keys(list(reversed(res.created[2:])) + [res.created[1],
                                                                    res.created[0]])
    assert list(be.objects) == [(Kind.BACKSTORE, ("user", "theirs"))]
    assert read_state(cfg.state_dir) == []
    assert down(cfg.state_dir, be) == []


def test_down_skips_objects_already_gone(cfg: Config) -> None:
    be = MemoryBackend()
    apply(cfg, be)
    tgt = [o for o in plan_exports(cfg) if o.kind is Kind.TARGET][1]
    be.delete(tgt)  # someone removed the iSCSI target (and everything under it) by hand
    removed = down(cfg.state_dir, be)
    assert all(o.key[:2] != tgt.key for o in removed)
    assert be.objects == {}


def test_down_keeps_failures_recorded(cfg: Config) -> None:
    be = MemoryBackend()
    apply_backstores(cfg, be)

    def refuse(obj: LioObject) -> None:
        raise LioError(f"removing {obj}: busy")

    be.delete = refuse  # type: ignore[method-assign]
    with pytest.raises(LioError, match="busy"):
        down(cfg.state_dir, be)
    assert len(read_state(cfg.state_dir)) == 2


def test_dry_run_touches_nothing(cfg: Config) -> None:
    res = apply(cfg, dry_run=True)
    assert len(res.created) == 17 and res.adopted == []
    assert not Path(cfg.state_dir).exists()


def test_stale_objects_reported(cfg: Config, tmp_path: Path) -> None:
    be = MemoryBackend()
    apply(cfg, be)
    smaller = load_config_text(f"state_dir: {cfg.state_dir}\n"
                               "devices: [{name: disk0, handler: raw, size: 1M}]\n", "s")
    res = apply(smaller, be)
    assert keys(res.adopted) == ["backstore user/disk0"]
    assert "backstore user/thin0" in keys(res.stale) and len(res.stale) == 16


def test_status_rows(cfg: Config) -> None:
    be = MemoryBackend()
    apply(cfg, be)
    rows = status_rows(cfg.state_dir, be)
    assert len(rows) == 17 and all(r.present for r in rows)
    assert rows[0].detail == f"raw/{cfg.state_dir}/disk0.img size=1048576"
    assert not any("secret" in r.detail for r in rows)
    be.objects.pop((Kind.BACKSTORE, ("user", "thin0")))
    assert [r.name for r in status_rows(cfg.state_dir, be) if not r.present] == ["user/thin0"]


def test_prepare_storage_extends_never_shrinks(cfg: Config) -> None:
    img = Path(cfg.state_dir) / "disk0.img"
    img.parent.mkdir(parents=True)
    img.write_bytes(b"x" * 4096)
    assert prepare_storage(cfg) == []
    assert img.stat().st_size == 1 << 20 and img.read_bytes()[:4096] == b"x" * 4096
    os.truncate(img, 2 << 20)
    prepare_storage(cfg)
    assert img.stat().st_size == 2 << 20


def test_state_file_rejects_unknown_version(tmp_path: Path) -> None:
    (tmp_path / lio.STATE_FILE).write_text('{"version": 9, "objects": []}')
    with pytest.raises(StateFileError, match=r"lio-state.json: version: got 9, expected 1"):
        read_state(tmp_path)


@pytest.mark.parametrize(("text", "message"), [
    (b"\xff\xfe", "not UTF-8 at offset 0"),
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    (b'{"version": 1, "objects": [{"kind": "backstore", "key": ["user"]}]}',
     r"objects\[0\].key: got \['user'\], expected a list of 2 strings"),
    (b'{"version": 1, "objects": [{"kind": "portal", "key": ["iscsi", "i", "1", "p"],'
     b' "params": {"ip": "::1", "port": "3260"}}]}',
     r"objects\[0\].params.port: got '3260', expected an integer"),
    (b'{"version": 1, "objects": [{"kind": ["lun"], "key": []}]}',
     r"objects\[0\].kind: got \['lun'\], expected one of backstore"),
])
def test_malformed_state_file_names_file_key_value(tmp_path: Path, text: bytes,
                                                    message: str) -> None:
    """D13: a state file that is not what tcmu-py writes is one StateFileError (a ConfigError:
    exit 2), never a raw KeyError / TypeError / UnicodeDecodeError / RecursionError."""
    (tmp_path / lio.STATE_FILE).write_bytes(text)
    with pytest.raises(StateFileError, match=message) as ei:
        read_state(tmp_path)
    assert str(ei.value).startswith(f"{tmp_path / lio.STATE_FILE}: ")
    assert "\n" not in str(ei.value)


def test_state_file_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        lio._write_state(tmp_path / "state", [])
    finally:
        os.umask(old)
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state" / lio.STATE_FILE).stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path / "state") == [lio.STATE_FILE]


# ----------------------------------------------------------------- rtslib-fb mapping


class _Node:
    calls: list[tuple[Any, ...]] = []

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.args, self.kw = args, kw
        self.attrs: dict[str, str] = {}
        _Node.calls.append((type(self).__name__, args, kw))

    def set_attribute(self, name: str, value: str) -> None:
        _Node.calls.append(("set_attribute", type(self).__name__, name, value))

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("chap_") or name == "enable":
            _Node.calls.append(("set", type(self).__name__, name, value))
        object.__setattr__(self, name, value)

    def delete(self) -> None:
        _Node.calls.append(("delete", type(self).__name__, self.args))


def fake_rtslib() -> types.SimpleNamespace:
    names = ["UserBackedStorageObject", "Target", "FabricModule", "TPG", "NetworkPortal", "LUN",
             "NodeACL", "MappedLUN"]
    ns = types.SimpleNamespace(**{n: type(n, (_Node,), {}) for n in names})
    ns.utils = types.SimpleNamespace(RTSLibError=RuntimeError)
    ns.tcm = types.SimpleNamespace(bs_cache={"stale": 1})
    return ns


def test_backstore_configfs_writes_order(cfg: Config) -> None:
    disk, thin = plan_backstores(cfg)
    writes = lio.backstore_writes(thin.params)
    assert writes == [
        ("control", "dev_config=thin/unit=64K"),
        ("control", f"dev_size={4 << 20}"),
        ("control", "nl_reply_supported=-1,max_data_area_mb=32,hw_max_sectors=256,"
                    "hw_block_size=4096"),
        ("attrib/cmd_time_out", "0"),
        ("attrib/emulate_write_cache", "1"),
        ("enable", "1"),
        ("wwn/vpd_unit_serial", "SER1\n"),
    ]
    generated = lio.backstore_writes(disk.params)[-1]
    assert generated[0] == "wwn/vpd_unit_serial" and len(generated[1].strip()) == 36


def test_rtslib_backend_calls(cfg: Config) -> None:
    _Node.calls = []
    be = RtslibBackend.__new__(RtslibBackend)
    be.rtslib = fake_rtslib()
    plan = plan_exports(cfg)
    for obj in plan:
        be.create(obj)
    calls = _Node.calls
    # LUNs look their backstore up by name (with rtslib-fb's stale index cache cleared).
    luns = [c for c in calls if c[0] == "LUN"]
    assert len(luns) == 4 and all("storage_object" in c[2] for c in luns)
    assert be.rtslib.tcm.bs_cache == {}
    # IPv6 portals go to rtslib-fb in brackets.
    portals = [c for c in calls if c[0] == "NetworkPortal"]
    assert [p[1][1:] for p in portals] == [("127.0.0.1", 3260), ("[::1]", 3261)]
    assert all(p[2] == {"mode": "create"} for p in portals)
    assert ("set", "NodeACL", "chap_mutual_password", "m2") in calls
    assert ("set_attribute", "TPG", "authentication", "1") in calls
    enables = [c for c in calls if c[:3] == ("set", "TPG", "enable")]
    assert len(enables) == 2
    mapped = [c for c in calls if c[0] == "MappedLUN" and c[2]]
    assert [m[2] for m in mapped] == [{"tpg_lun": 1, "write_protect": False},
                                      {"tpg_lun": 0, "write_protect": False},
                                      {"tpg_lun": 1, "write_protect": False}]


def test_rtslib_backend_errors_name_the_object(cfg: Config) -> None:
    be = RtslibBackend.__new__(RtslibBackend)
    be.rtslib = fake_rtslib()

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("File exists")

    be.rtslib.Target = boom
    obj = [o for o in plan_exports(cfg) if o.kind is Kind.TARGET][0]
    with pytest.raises(LioError, match=f"creating {obj}: File exists"):
        be.create(obj)
    assert be.exists(obj) is False


LIBRARY_TEXT = """
state_dir: {state}
libraries:
  - name: lab
    changer: lab-ch
    drives: [{{name: lab-d0, model: IBM-LTO8}}, {{name: lab-d1, model: IBM-LTO8}}]
    slots: 6
    import_export: 1
    cartridges: ["ABC000L8..ABC002L8"]
    media_dir: {lib}
exports:
  loopback: [{{device: lab-ch, lun: 0}}, {{device: lab-d0, lun: 1}}, {{device: lab-d1, lun: 2}}]
"""


@pytest.fixture
def lib_cfg(tmp_path: Path) -> Config:
    text = LIBRARY_TEXT.format(state=tmp_path / "state", lib=tmp_path / "lib")
    return load_config_text(textwrap.dedent(text), "t.yaml")


def test_library_backstores_and_luns(lib_cfg: Config, tmp_path: Path) -> None:
    """One vtl backstore per unit (changer, then drives) with tape settings, then their LUNs."""
    be = MemoryBackend()
    r1 = apply_backstores(lib_cfg, be)
    ch, d0, d1 = r1.created
    assert keys(r1.created) == ["backstore user/lab-ch", "backstore user/lab-d0",
                                "backstore user/lab-d1"]
    assert ch.params["config"] == f"vtl/library={tmp_path / 'lib'};unit=changer"
    assert d1.params["config"] == f"vtl/library={tmp_path / 'lib'};unit=drive1"
    assert ch.params["size"] == 1 << 20
    assert "hw_max_sectors=2048" in d0.params["control"]  # 1 MiB: 256 KiB blocks pass
    assert d0.params["attributes"]["cmd_time_out"] == 300
    assert d0.params["wwn"] == lib_cfg.section("libraries")[0].drives[0].unit_serial()
    writes = dict(lio.backstore_writes(d0.params))
    assert writes["attrib/cmd_time_out"] == "300"
    r2 = apply_exports(lib_cfg, be)
    wwn = loopback_wwn(lib_cfg.state_dir)
    luns = {o.key: o.params["backstore"] for o in r2.created if o.kind is Kind.LUN}
    assert luns == {("loopback", wwn, "1", "0"): "lab-ch", ("loopback", wwn, "1", "1"): "lab-d0",
                    ("loopback", wwn, "1", "2"): "lab-d1"}
    again = apply(lib_cfg, be)
    assert again.created == [] and len(again.adopted) == 3 + 2 + 3


def test_prepare_libraries_creates_then_keeps_the_library(lib_cfg: Config, tmp_path: Path
                                                          ) -> None:
    """`tcmu-py apply` / `serve -c`: the library and its cartridges are made once; a second run
    keeps moved cartridges where they are and adds only newly declared ones."""
    from tcmu_py.cli import prepare_handlers
    from tcmu_py.handlers.vtl import VtlHandler
    from tcmu_py.handlers.vtl.library import Library, LibraryError
    from tcmu_py.scsi.smc import ElementType

    prepare_handlers(lib_cfg)
    root = tmp_path / "lib"
    lib = Library.open(root)
    try:
        assert lib.drive_count == 2 and lib.name == "lab"
        assert [lib.drive_serial(i) for i in range(2)] == [
            d.unit_serial() for d in lib_cfg.section("libraries")[0].drives]
        assert len(lib.addresses(ElementType.STORAGE)) == 6
        assert len(lib.addresses(ElementType.IMPORT_EXPORT)) == 1
        assert sorted(lib.cartridges()) == ["ABC000L8", "ABC001L8", "ABC002L8"]
        first = lib.locate("ABC000L8")
        assert first is not None
        lib.move(first, lib.drive_address(1))
    finally:
        lib.close()
    for dev in lib_cfg.devices:  # what the daemon checks when the backstores appear
        VtlHandler.check_config(lio.dev_config_string(dev).partition("/")[2])

    more = textwrap.dedent(LIBRARY_TEXT.replace("ABC002L8", "ABC003L8")).format(
        state=tmp_path / "state", lib=root)
    prepare_handlers(load_config_text(more, "t.yaml"))
    lib = Library.open(root)
    try:
        assert lib.drive_barcode(1) == "ABC000L8"  # not put back
        assert sorted(lib.cartridges()) == ["ABC000L8", "ABC001L8", "ABC002L8", "ABC003L8"]
    finally:
        lib.close()

    fewer = textwrap.dedent(LIBRARY_TEXT.replace("slots: 6", "slots: 5")).format(
        state=tmp_path / "state", lib=root)
    with pytest.raises(LibraryError, match="slots: library has 6, declared 5"):
        prepare_handlers(load_config_text(fewer, "t.yaml"))


_ONE_DISK = """
state_dir: {state}
devices:
  - {{name: disk0, handler: raw, size: 1M}}
exports:
  loopback:
    - {{device: disk0}}
"""


def _applied(tmp_path: Path) -> tuple[Any, MemoryBackend]:
    cfg = load_config_text(_ONE_DISK.format(state=tmp_path / "state"), "t.yaml")
    backend = MemoryBackend()
    lio.apply(cfg, backend)
    return cfg, backend


def test_down_keeps_a_backstore_an_operators_lun_still_exports(tmp_path: Path) -> None:
    """Before: `down` deleted the backstore, and with it (as rtslib-fb's delete does) a LUN an
    operator had made on it, without a word. Now it is kept and recorded, and `down` fails
    naming the LUN; once that LUN is gone, `down` removes the backstore."""
    cfg, backend = _applied(tmp_path)
    t = ("iscsi", "iqn.2003-01.org.example:ops")
    theirs = [LioObject(Kind.TARGET, t), LioObject(Kind.TPG, (*t, "1")),
              LioObject(Kind.LUN, (*t, "1", "0"), {"backstore": "disk0"})]
    for obj in theirs:
        backend.create(obj)
    with pytest.raises(LioError, match="in use by LUN.*iscsi/iqn.2003-01.org.example:ops/1/0"):
        lio.down(cfg.state_dir, backend)
    assert all(backend.exists(o) for o in theirs)
    backend.delete(theirs[0])
    removed = lio.down(cfg.state_dir, backend)
    assert [o.kind for o in removed] == [Kind.BACKSTORE] and not lio.read_state(cfg.state_dir)


def _remade_by_someone_else(backend: MemoryBackend) -> LioObject:
    ours = next(o for o in backend.objects.values() if o.kind is Kind.BACKSTORE)
    for obj in [o for o in backend.objects.values() if o.kind is Kind.LUN]:
        backend.delete(obj)
    backend.delete(ours)
    foreign = LioObject(Kind.BACKSTORE, ("user", "disk0"),
                        {"config": "raw//srv/theirs.img", "size": 1 << 30})
    backend.create(foreign)  # targetcli ... create name=disk0 cfgstring=/srv/theirs.img
    return foreign


def test_down_leaves_a_backstore_someone_else_made_under_the_same_name(tmp_path: Path) -> None:
    cfg, backend = _applied(tmp_path)
    foreign = _remade_by_someone_else(backend)
    lio.down(cfg.state_dir, backend)
    assert backend.exists(foreign) and not lio.read_state(cfg.state_dir)


def test_apply_does_not_adopt_a_backstore_someone_else_made_under_the_same_name(
        tmp_path: Path) -> None:
    cfg, backend = _applied(tmp_path)
    _remade_by_someone_else(backend)
    with pytest.raises(lio.LioConflict, match="raw//srv/theirs.img.*someone else"):
        lio.apply(cfg, backend)
