"""YAML ``exports.usb`` (LIO's USB gadget fabric, usb_f_tcm; issue 18): what is read, the plan
(gadget, target, TPG with its nexus, LUNs, UDC binding, in the order the kernel needs), apply and
`down` against the in-memory configfs model, and `UsbConfigfs`'s paths and writes on a plain
directory standing in for configfs. The one-line validation errors are in
test_fabric_exports.py with the other fabrics'."""

from __future__ import annotations

import errno
import os
import re
import textwrap
import types
from pathlib import Path

import pytest

from tcmu_py.daemon import lio
from tcmu_py.daemon.config import Config, LunMap, UsbTarget, load_config_text
from tcmu_py.daemon.fabric_lio import UsbConfigfs
from tcmu_py.daemon.lio import Kind, LioError, LioObject, MemoryBackend, RtslibBackend

WWN = "naa.6001405c0ffee0b1"
REPO = Path(__file__).resolve().parents[2]

TEXT = """
state_dir: {state}
devices:
  - {{name: disk0, handler: raw, size: 1M}}
  - {{name: disk1, handler: raw, size: 1M}}
exports:
  usb:
    - wwn: {wwn}
      udc: dummy_udc.0
      luns: [{{device: disk1, lun: 1}}, {{device: disk0, lun: 0}}]
"""


def load(state: Path, **extra: object) -> Config:
    text = textwrap.dedent(TEXT.format(state=state, wwn=WWN.upper()))
    for key, value in extra.items():
        text += f"      {key}: {value}\n"
    return load_config_text(text, "cfg.yaml")


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return load(tmp_path / "state")


def test_usb_export_is_read_with_its_defaults(cfg: Config) -> None:
    (usb,) = cfg.exports.usb
    assert usb == UsbTarget(
        wwn=WWN, udc="dummy_udc.0",
        nexus="naa.6001405c0ffee0b0",  # derived: the target's NAA, last bit flipped
        gadget="tcmu-py", vendor_id=0x1D6B, product_id=0x0104,
        luns=(LunMap("disk1", 1), LunMap("disk0", 0)))


def test_usb_export_settings(tmp_path: Path) -> None:
    cfg = load(tmp_path, nexus="naa.6001405C0FFEE0C0", gadget="lab-g", vendor_id="0x1234",
               product_id=42)
    (usb,) = cfg.exports.usb
    assert (usb.nexus, usb.gadget, usb.vendor_id, usb.product_id) == (
        "naa.6001405c0ffee0c0", "lab-g", 0x1234, 42)


def test_plan_binds_the_gadget_last(cfg: Config) -> None:
    plan = [o for o in lio.plan_exports(cfg)]
    tpg = f"usb_gadget/{WWN}/1"
    assert [str(o) for o in plan] == [
        "gadget gadget/tcmu-py",  # its tcm function must exist before the TPG (f_tcm.c)
        f"target usb_gadget/{WWN}",
        f"tpg {tpg}",
        f"lun {tpg}/1",
        f"lun {tpg}/0",
        "udc gadget/tcmu-py/dummy_udc.0",  # the host enumerates and scans now: LUNs exist
    ]
    assert plan[0].params == {"vendor_id": 0x1D6B, "product_id": 0x0104}
    assert plan[2].params == {"nexus": "naa.6001405c0ffee0b0"}
    assert plan[3].params == {"backstore": "disk1"}


def test_apply_and_down_remove_exactly_the_usb_objects(cfg: Config) -> None:
    foreign = LioObject(Kind.GADGET, ("gadget", "someone-elses"))
    be = MemoryBackend([foreign])
    made = lio.apply(cfg, be).created
    assert len(made) == len(lio.plan_backstores(cfg)) + len(lio.plan_exports(cfg))
    again = lio.apply(cfg, be)
    assert again.created == [] and len(again.adopted) == len(made)
    # The state file round-trips the new kinds and their parameters.
    recorded = {str(o): o.params for o in lio.read_state(cfg.state_dir)}
    assert recorded["gadget gadget/tcmu-py"] == {"vendor_id": 0x1D6B, "product_id": 0x0104}
    assert "udc gadget/tcmu-py/dummy_udc.0" in recorded
    rows = {r.name: r.detail for r in lio.status_rows(cfg.state_dir, be)}
    assert rows["gadget/tcmu-py"] == "usb 1d6b:0104"
    assert rows[f"usb_gadget/{WWN}/1"] == "nexus=naa.6001405c0ffee0b0"
    removed = lio.down(cfg.state_dir, be)
    # Newest first: the UDC binding before the LUNs, the gadget after its target.
    names = [str(o) for o in removed]
    assert names[0] == "udc gadget/tcmu-py/dummy_udc.0"
    assert names.index(f"target usb_gadget/{WWN}") < names.index("gadget gadget/tcmu-py")
    assert sorted(names) == sorted(map(str, made))
    assert list(be.objects) == [(Kind.GADGET, foreign.key)]
    assert lio.read_state(cfg.state_dir) == []


def test_a_gadget_name_in_use_is_a_conflict(cfg: Config) -> None:
    be = MemoryBackend([LioObject(Kind.GADGET, ("gadget", "tcmu-py"))])
    with pytest.raises(lio.LioConflict, match="gadget gadget/tcmu-py: exists and was not"
                                              " created by tcmu-py"):
        lio.apply_exports(cfg, be)


# ----------------------------------------------------------------- configfs by hand


#: Groups configfs makes (and removes) with their parent: usb_gadget's and LIO's TPG's.
DEFAULT_GROUPS = {"configs", "functions", "strings", "os_desc", "lun"}


class FakeConfigfs:
    """A plain directory for /sys/kernel/config that behaves like configfs where tcmu-py relies
    on it: a gadget or TPG comes with its default groups, and rmdir takes attribute files and
    default groups along but refuses while a link or a group made by mkdir is inside."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.target = root / "target"
        self.gadgets = root / "usb_gadget"
        self.target.mkdir()
        self.gadgets.mkdir()
        self.so = self.target / "core" / "user_0"
        for name in ("disk0", "disk1"):
            (self.so / name).mkdir(parents=True)
        self.fail_mkdir: set[str] = set()
        real_mkdir, real_rmdir = Path.mkdir, Path.rmdir
        fs = self

        def mkdir(self: Path, mode: int = 0o777, parents: bool = False,
                  exist_ok: bool = False) -> None:
            if self.name in fs.fail_mkdir:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory")
            real_mkdir(self, mode, parents, exist_ok)
            if self.parent == fs.gadgets:
                for d in ("configs", "functions", "strings"):
                    real_mkdir(self / d)
                (self / "UDC").write_text("\n")
            elif self.name == "tpgt_1":
                real_mkdir(self / "lun")

        def rmdir(self: Path) -> None:
            for p in self.iterdir():
                if p.is_symlink() or (p.is_dir() and p.name not in DEFAULT_GROUPS):
                    raise OSError(errno.ENOTEMPTY, f"{p} is in the way")
                if p.is_dir():
                    rmdir(p)
                else:
                    p.unlink()
            real_rmdir(self)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        monkeypatch.setattr(Path, "rmdir", rmdir)

    def backend(self) -> UsbConfigfs:
        return UsbConfigfs(self.target, lambda name: self.so / name, udc_timeout=5)


@pytest.fixture
def fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeConfigfs:
    return FakeConfigfs(tmp_path, monkeypatch)


def test_usb_objects_go_to_configfs_by_hand(cfg: Config, fs: FakeConfigfs) -> None:
    usb = fs.backend()
    plan = lio.plan_exports(cfg)
    for obj in plan:
        assert not usb.exists(obj), obj
        usb.create(obj)
        assert usb.exists(obj), obj
    g = fs.gadgets / "tcmu-py"
    assert (g / "idVendor").read_text() == "0x1d6b" and (g / "idProduct").read_text() == "0x0104"
    assert (g / "strings" / "0x409" / "manufacturer").read_text() == "tcmu-py"
    assert (g / "configs" / "c.1" / "strings" / "0x409" / "configuration").read_text() == "tcm"
    assert (g / "functions" / "tcm.0").is_dir()
    tpg = fs.target / "usb_gadget" / WWN / "tpgt_1"
    assert (tpg / "nexus").read_text() == "naa.6001405c0ffee0b0"
    assert (tpg / "enable").read_text() == "1"
    assert (tpg / "lun" / "lun_1" / "disk1").resolve() == fs.so / "disk1"
    assert (g / "configs" / "c.1" / "tcm.0").resolve() == g / "functions" / "tcm.0"
    assert (g / "UDC").read_text() == "dummy_udc.0"

    # down's order: unbind (a newline written to UDC), LUNs, TPG (disabled first), target,
    # then the gadget's own groups; the backstores stay.
    for obj in reversed(plan):
        usb.delete(obj)
        assert not usb.exists(obj), obj
    assert not any(fs.gadgets.iterdir()) and not any((fs.target / "usb_gadget").iterdir())
    assert (fs.so / "disk0").is_dir()


def test_deleting_the_gadget_unbinds_and_removes_it_all(cfg: Config, fs: FakeConfigfs) -> None:
    """What `down` does when the UDC binding was already removed by hand, or an earlier step
    failed: the gadget alone is enough to clear everything under it."""
    usb = fs.backend()
    plan = lio.plan_exports(cfg)
    for obj in plan:
        usb.create(obj)
    for obj in plan[1:-1][::-1]:  # the LIO objects (the TPG holds the function)
        usb.delete(obj)
    usb.delete(plan[0])
    assert not any(fs.gadgets.iterdir())


def test_unbind_writes_a_newline_to_udc(cfg: Config, fs: FakeConfigfs) -> None:
    """libcomposite unbinds on a write of an empty name; an empty write() never reaches the
    kernel's store method, so the newline is what does it."""
    udc = next(o for o in lio.plan_exports(cfg) if o.kind is Kind.UDC)
    g = fs.gadgets / "tcmu-py"
    g.mkdir()
    (g / "functions" / "tcm.0").mkdir()
    (g / "configs" / "c.1").mkdir()
    (g / "configs" / "c.1" / "tcm.0").symlink_to(g / "functions" / "tcm.0")
    (g / "UDC").write_text("dummy_udc.0")
    fs.backend().delete(udc)
    assert (g / "UDC").read_text() == "\n"
    assert not (g / "configs" / "c.1" / "tcm.0").is_symlink()


def test_missing_usb_f_tcm_is_named(cfg: Config, fs: FakeConfigfs) -> None:
    fs.fail_mkdir.add("usb_gadget")  # configfs makes it on mkdir if the fabric is registered
    target = next(o for o in lio.plan_exports(cfg) if o.kind is Kind.TARGET)
    with pytest.raises(OSError, match="load usb_f_tcm .*scripts/usb_f_tcm/build.sh"):
        fs.backend().create(target)


def test_a_half_made_gadget_is_removed(cfg: Config, fs: FakeConfigfs) -> None:
    """mkdir functions/tcm.0 fails when usb_f_tcm is not loaded: the gadget goes again."""
    fs.fail_mkdir.add("tcm.0")
    with pytest.raises(OSError, match="is usb_f_tcm loaded"):
        fs.backend().create(lio.plan_exports(cfg)[0])
    assert not any(fs.gadgets.iterdir())


def test_rtslib_backend_sends_usb_objects_to_configfs(cfg: Config, fs: FakeConfigfs) -> None:
    be = RtslibBackend.__new__(RtslibBackend)
    be.rtslib = types.SimpleNamespace(utils=types.SimpleNamespace(RTSLibError=RuntimeError))
    be.configfs = str(fs.target)
    target = next(o for o in lio.plan_exports(cfg) if o.kind is Kind.TARGET)
    assert be.exists(target) is False
    be.create(target)
    assert (fs.target / "usb_gadget" / WWN).is_dir() and be.exists(target)
    with pytest.raises(LioError, match=f"creating target usb_gadget/{WWN}"):
        be.create(target)  # mkdir fails (exists)
    be.delete(target)
    assert not (fs.target / "usb_gadget" / WWN).exists()


# ----------------------------------------------------------------- the module's build


def test_lab_looks_for_the_module_where_the_build_leaves_it() -> None:
    from tcmu_py import lab_fabrics as lf

    build = (REPO / "scripts" / "usb_f_tcm" / "build.sh").read_text()
    m = re.search(r"CACHE=\$\{TCMU_PY_USB_F_TCM_DIR:-([^}]+)\}", build)
    assert m, "build.sh names its output directory"
    assert str(lf.USB_F_TCM_DIR) == m.group(1) or "TCMU_PY_USB_F_TCM_DIR" in os.environ


def test_build_info_is_read(tmp_path: Path) -> None:
    from tcmu_py import lab_fabrics as lf

    (tmp_path / "BUILD-INFO").write_text("kernel=6.1.0-57-amd64\nsource=linux-source-6.1 x=y\n")
    assert lf.usb_f_tcm_info(tmp_path / "usb_f_tcm.ko") == {
        "kernel": "6.1.0-57-amd64", "source": "linux-source-6.1 x=y"}
    assert lf.usb_f_tcm_info(tmp_path / "none" / "usb_f_tcm.ko") == {}


def test_the_patch_changes_only_the_bulk_only_submission() -> None:
    """Our patch touches bot_cmd_work only: ACK_KREF and the direction from the CBW."""
    patch = (REPO / "scripts" / "usb_f_tcm" / "bot-ack-kref.patch").read_text()
    changed = [ln for ln in patch.splitlines()
               if ln.startswith(("+", "-")) and not ln.startswith(("+++", "---"))]
    assert changed == [
        "-\tdir = get_cmd_dir(cmd->cmd_buf);",
        "+\t/* tcmu-py: the direction is the CBW's (bmCBWFlags, dCBWDataTransferLength),"
        " not an opcode table's */",
        "+\tif (!cmd->data_len)",
        "+\t\tdir = DMA_NONE;",
        "+\telse",
        "+\t\tdir = cmd->is_read ? DMA_FROM_DEVICE : DMA_TO_DEVICE;",
        "-\t\t\t  cmd->data_len, cmd->prio_attr, dir, 0);",
        "+\t\t\t  cmd->data_len, cmd->prio_attr, dir, TARGET_SCF_ACK_KREF);",
        '+MODULE_INFO(tcmu_py, "out of tree; Bulk-Only: TARGET_SCF_ACK_KREF,'
        ' data direction from the CBW");',
    ]
