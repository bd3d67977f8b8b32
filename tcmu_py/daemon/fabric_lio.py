"""LIO objects of the fabrics beyond tcm_loop and iSCSI: iSER portals, SRP (ib_srpt), FC
(tcm_fc) and USB (usb_f_tcm). `tcmu_py.daemon.lio` plans and applies them with the others
(`plan_fabric_exports`), records them in the same state file, and `down` removes them exactly
as the others.

- **iSER** is iSCSI with the network portal's ``iser`` attribute set to 1 (LIO then listens on
  that address through RDMA/CM as well as TCP; ib_isert carries the sessions). Planned as
  iSCSI objects whose PORTAL has ``iser: true``.
- **FC** (tcm_fc: FCoE, or any libfc port) goes through rtslib-fb like iSCSI: target named by
  the local port's WWPN, TPG 1, LUNs, ACLs named by initiator WWPNs (tcm_fc has no demo mode).
- **SRP** is written to configfs directly (`SrptConfigfs`): rtslib-fb's srpt module accepts
  only GID port names (``ib.<32 hex>``) and 128-bit port-ID initiator names, while an RDMA/CM
  login (the only login RoCE supports: it has no subnet administrator) is matched against an
  ACL named by the initiator's IP address on a GUID-named port. Measured on Debian's 6.1 with
  soft-RoCE (kernel scenario fabrics.srp_iser_fc); IB CM logins (GID-named ports, port-ID ACLs)
  are accepted by the YAML but untested here.
- **USB** is written to configfs directly too (`UsbConfigfs`): rtslib-fb lists no usb_gadget
  fabric (and would modprobe ``tcm_usb_gadget``, a name no current kernel has), and the fabric
  needs a libcomposite gadget beside the LIO objects. Five objects, in this order (the one
  that works, measured on Debian's 6.1 with dummy_hcd):

  1. GADGET ``("gadget", name)``: ``usb_gadget/<name>`` with its USB IDs, strings, one
     configuration ``c.1`` and the function ``functions/tcm.0`` (usb_f_tcm must be loaded);
  2. TARGET ``("usb_gadget", wwn)``; 3. TPG 1 with its ``nexus`` and ``enable`` (the TPG takes
     the tcm function: f_tcm.c has one TPG instance in the whole system; enabling it is what
     allows the function to bind); 4. the LUNs;
  5. UDC ``("gadget", name, udc)``: the function linked into ``c.1``, then the UDC written —
     the host enumerates the device and scans the LUNs now. That write may block in the kernel,
     so it runs in a thread with a deadline (`write_bounded`).

  What the host gets is a mass-storage interface with a Bulk-Only alternate setting (0) and a
  UAS one (1). **Bulk-Only** carries tcmu-py's devices only with tcmu-py's patch to usb_f_tcm
  (scripts/usb_f_tcm/bot-ack-kref.patch; Debian does not build the module at all, the lab
  builds it out of tree): commands submitted with TARGET_SCF_ACK_KREF, and the data direction
  taken from the CBW (bmCBWFlags bit 7, dCBWDataTransferLength) instead of usb_f_tcm's fixed
  opcode list (get_cmd_dir), which refuses a medium changer's READ ELEMENT STATUS and MOVE
  MEDIUM ("Unknown data direction"). **UAS** cannot carry user backstores: its command IU has no
  expected data length, which the core then takes from the CDB only for emulated backstores, so
  INQUIRY and READ CAPACITY of a tcmu-py LUN move no data. A Linux host prefers UAS; the
  usb-storage quirk ``<vendor>:<product>:u`` makes it use Bulk-Only (kernel scenario
  fabrics_usb.usb_bot_and_uas).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tcmu_py.daemon.config import Config, FabricAcl, LunMap, UsbTarget

if TYPE_CHECKING:
    from tcmu_py.daemon.lio import LioObject

__all__ = ["GADGET", "SRPT", "TCM_FC", "USB_GADGET", "SrptConfigfs", "UsbConfigfs",
           "plan_fabric_exports", "write_bounded"]

#: Fabric names as LIO's configfs (and rtslib-fb's FabricModule) spell them.
SRPT = "srpt"
TCM_FC = "tcm_fc"
USB_GADGET = "usb_gadget"
#: First key element of the libcomposite gadget objects (GADGET and UDC kinds).
GADGET = "gadget"
#: tcm_fc, ib_srpt and usb_f_tcm serve one TPG per port name; rtslib-fb creates tag 1.
TPG_TAG = "1"
#: The gadget's one configuration and its tcm function instance.
GADGET_CONFIG = "c.1"
TCM_FUNCTION = "tcm.0"
#: Seconds a UDC bind or unbind may block in the kernel before we give up on it.
UDC_TIMEOUT = 30.0


def write_bounded(path: str | os.PathLike[str], value: str, timeout: float) -> None:
    """Write ``value`` to the sysfs/configfs file ``path`` in a thread and wait at most
    ``timeout`` seconds. Raises the write's OSError, or OSError(ETIMEDOUT) if it is still
    blocked in the kernel then (``timeout`` cannot end such a write; its daemon thread is
    left behind, the caller is not)."""
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            with open(path, "w") as f:
                f.write(value)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome.append(exc)

    t = threading.Thread(target=write, name=f"write {path}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise OSError(errno.ETIMEDOUT, f"writing {value!r} to {path}: still blocked in the"
                      f" kernel after {timeout:g}s")
    exc = outcome[0] if outcome else None
    if exc is not None:
        raise exc


def _fabric_target(fabric: str, name: str, luns: tuple[LunMap, ...],
                   acls: tuple[FabricAcl, ...], target_params: dict[str, Any]) -> list[LioObject]:
    from tcmu_py.daemon.lio import Kind, LioObject

    t = (fabric, name)
    tpg = (*t, TPG_TAG)
    out = [LioObject(Kind.TARGET, t, target_params),
           LioObject(Kind.TPG, tpg, {"attributes": {}})]
    lun_of = {lm.device: lm.lun for lm in luns}
    out += [LioObject(Kind.LUN, (*tpg, str(lm.lun)), {"backstore": lm.device}) for lm in luns]
    for acl in acls:
        akey = (*tpg, acl.initiator)
        out.append(LioObject(Kind.ACL, akey, {"chap": None}))
        for dev_name in acl.luns if acl.luns is not None else tuple(lun_of):
            n = lun_of[dev_name]
            out.append(LioObject(Kind.MAPPED_LUN, (*akey, str(n)),
                                 {"tpg_lun": n, "write_protect": False}))
    return out


def _usb_target(usb: UsbTarget) -> list[LioObject]:
    """The five steps of the module docstring, in order."""
    from tcmu_py.daemon.lio import Kind, LioObject

    gadget = (GADGET, usb.gadget)
    tpg = (USB_GADGET, usb.wwn, TPG_TAG)
    out = [LioObject(Kind.GADGET, gadget, {"vendor_id": usb.vendor_id,
                                           "product_id": usb.product_id}),
           LioObject(Kind.TARGET, tpg[:2]),
           LioObject(Kind.TPG, tpg, {"nexus": usb.nexus})]
    out += [LioObject(Kind.LUN, (*tpg, str(lm.lun)), {"backstore": lm.device})
            for lm in usb.luns]
    out.append(LioObject(Kind.UDC, (*gadget, usb.udc)))
    return out


def plan_fabric_exports(config: Config) -> list[LioObject]:
    """SRP targets, then FC targets (each: target, TPG 1, LUNs, ACLs and their mapped LUNs),
    then the USB target (gadget, target, TPG, LUNs, UDC binding). The SRP target carries
    ``rdma_cm_port`` (written to srpt's ``discovery_auth`` before the port is created). iSER
    targets are planned by `lio.plan_exports` as iSCSI ones."""
    out: list[LioObject] = []
    for srp in config.exports.srp:
        out += _fabric_target(SRPT, srp.port, srp.luns, srp.acls,
                              {"rdma_cm_port": srp.rdma_cm_port})
    for fc in config.exports.fc:
        out += _fabric_target(TCM_FC, fc.wwpn, fc.luns, fc.acls, {})
    for usb in config.exports.usb:
        out += _usb_target(usb)
    return out


class SrptConfigfs:
    """ib_srpt's objects made by hand in configfs (see the module docstring for why not through
    rtslib-fb). Paths: ``srpt/<port>/tpgt_1/{enable, lun/lun_N -> backstore,
    acls/<initiator>/lun_N -> ../../../lun/lun_N}``. Errors are OSError (the caller wraps them)."""

    def __init__(self, configfs: str | os.PathLike[str], user_backstore: Any) -> None:
        self.root = Path(configfs) / SRPT
        self.user_backstore = user_backstore  # name -> configfs Path of the user backstore

    def path(self, obj: LioObject) -> Path:
        from tcmu_py.daemon.lio import Kind

        k = obj.key
        p = self.root / k[1]
        if obj.kind is Kind.TARGET:
            return p
        p = p / f"tpgt_{k[2]}"
        if obj.kind is Kind.TPG:
            return p
        if obj.kind is Kind.LUN:
            return p / "lun" / f"lun_{k[3]}"
        p = p / "acls" / k[3]
        return p if obj.kind is Kind.ACL else p / f"lun_{k[4]}"

    def exists(self, obj: LioObject) -> bool:
        return self.path(obj).is_dir()

    def _fabric(self) -> None:
        """srpt's configfs group (registered once ib_srpt is loaded; load it if needed)."""
        if self.root.is_dir():
            return
        try:
            self.root.mkdir()
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return
            res = subprocess.run(["modprobe", "ib_srpt"], capture_output=True, text=True,
                                 check=False)
            if res.returncode != 0:
                raise OSError(exc.errno, f"{self.root}: {exc.strerror}; modprobe ib_srpt:"
                              f" {res.stderr.strip()}") from exc
            with contextlib.suppress(FileExistsError):
                self.root.mkdir()

    def create(self, obj: LioObject) -> None:
        from tcmu_py.daemon.lio import Kind

        path, p = self.path(obj), obj.params
        if obj.kind is Kind.TARGET:
            self._fabric()
            if p.get("rdma_cm_port") is not None:
                (self.root / "discovery_auth" / "rdma_cm_port").write_text(
                    str(p["rdma_cm_port"]))
            path.mkdir()  # EINVAL: no RDMA port of that name (ib_srpt's srpt_lookup_wwn)
        elif obj.kind is Kind.TPG:
            path.mkdir()
            try:
                (path / "enable").write_text("1")
            except BaseException:
                path.rmdir()
                raise
        elif obj.kind is Kind.LUN:
            path.mkdir()
            try:
                (path / p["backstore"]).symlink_to(self.user_backstore(p["backstore"]))
            except BaseException:
                path.rmdir()
                raise
        elif obj.kind is Kind.ACL:
            path.mkdir()
        elif obj.kind is Kind.MAPPED_LUN:
            path.mkdir()
            tpg = path.parents[2]
            try:
                (path / "lun").symlink_to(tpg / "lun" / f"lun_{p['tpg_lun']}")
            except BaseException:
                path.rmdir()
                raise
        else:
            raise OSError(errno.EINVAL, f"ib_srpt has no {obj.kind.value} objects")

    def delete(self, obj: LioObject) -> None:
        """Remove ``obj`` and what configfs holds under it, innermost first (configfs removes
        a directory only once what users made in it is gone)."""
        _rm_srpt(self.path(obj))


def _unlink_links(d: Path) -> None:
    for entry in d.iterdir():
        if entry.is_symlink():
            entry.unlink()


def _rm_srpt(path: Path) -> None:
    name = path.name
    if name.startswith("lun_"):  # a TPG LUN or a mapped LUN: its links, then itself
        _unlink_links(path)
    elif path.parent.name == "acls":
        for lun in sorted(path.glob("lun_*")):
            _rm_srpt(lun)
    elif name.startswith("tpgt_"):
        with contextlib.suppress(OSError):
            (path / "enable").write_text("0")
        for acl in sorted((path / "acls").iterdir()):
            _rm_srpt(acl)
        for lun in sorted((path / "lun").glob("lun_*")):
            _rm_srpt(lun)
    else:  # a target port
        for tpg in sorted(path.glob("tpgt_*")):
            _rm_srpt(tpg)
    path.rmdir()


class UsbConfigfs:
    """usb_f_tcm's LIO objects (``target/usb_gadget/<wwn>/tpgt_1/{nexus, enable, lun/lun_N}``)
    and the libcomposite gadget that carries them (``usb_gadget/<name>``), made by hand in
    configfs (see the module docstring for the order and why not through rtslib-fb). Errors
    are OSError (the caller wraps them); a creation that fails part way removes what it made."""

    def __init__(self, configfs: str | os.PathLike[str], user_backstore: Any,
                 udc_timeout: float = UDC_TIMEOUT) -> None:
        self.root = Path(configfs) / USB_GADGET
        self.gadgets = Path(configfs).parent / "usb_gadget"
        self.user_backstore = user_backstore  # name -> configfs Path of the user backstore
        self.udc_timeout = udc_timeout

    def path(self, obj: LioObject) -> Path:
        """The object's directory; for a UDC binding, the function's link in ``c.1``."""
        from tcmu_py.daemon.lio import Kind

        k = obj.key
        if obj.kind is Kind.GADGET:
            return self.gadgets / k[1]
        if obj.kind is Kind.UDC:
            return self.gadgets / k[1] / "configs" / GADGET_CONFIG / TCM_FUNCTION
        p = self.root / k[1]
        if obj.kind is Kind.TARGET:
            return p
        p = p / f"tpgt_{k[2]}"
        return p if obj.kind is Kind.TPG else p / "lun" / f"lun_{k[3]}"

    def exists(self, obj: LioObject) -> bool:
        from tcmu_py.daemon.lio import Kind

        path = self.path(obj)
        return path.is_symlink() if obj.kind is Kind.UDC else path.is_dir()

    def create(self, obj: LioObject) -> None:
        from tcmu_py.daemon.lio import Kind

        path, p = self.path(obj), obj.params
        if obj.kind is Kind.GADGET:
            self._create_gadget(path, p)
        elif obj.kind is Kind.TARGET:
            self._fabric()
            path.mkdir()
        elif obj.kind is Kind.TPG:
            try:
                path.mkdir()  # ENODEV: no free tcm function instance (f_tcm.c usbg_make_tpg)
            except OSError as exc:
                raise OSError(exc.errno, f"{path}: {exc.strerror} (a USB target needs a tcm"
                              " function made before it, and takes the only one)") from exc
            try:
                (path / "nexus").write_text(p["nexus"])
                (path / "enable").write_text("1")  # lets the function bind (can_attach)
            except BaseException:
                _rm_usb(path)
                raise
        elif obj.kind is Kind.LUN:
            path.mkdir()
            try:
                (path / p["backstore"]).symlink_to(self.user_backstore(p["backstore"]))
            except BaseException:
                path.rmdir()
                raise
        elif obj.kind is Kind.UDC:
            path.symlink_to(path.parents[2] / "functions" / TCM_FUNCTION)
            try:
                write_bounded(path.parents[2] / "UDC", obj.key[2], self.udc_timeout)
            except BaseException:
                _unbind(path.parents[2], self.udc_timeout)
                raise
        else:
            raise OSError(errno.EINVAL, f"usb_f_tcm has no {obj.kind.value} objects")

    def _fabric(self) -> None:
        """LIO's usb_gadget group: configfs makes it on the first mkdir, if usb_f_tcm has
        registered the fabric (tcmu-py does not load it: Debian's kernel does not have it)."""
        try:
            self.root.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            raise OSError(exc.errno, f"{self.root}: {exc.strerror}: LIO's usb_gadget fabric is"
                          " not registered: load usb_f_tcm (Debian's kernel does not build it;"
                          " the lab builds it with scripts/usb_f_tcm/build.sh)") from exc

    def _create_gadget(self, gadget: Path, p: dict[str, Any]) -> None:
        if not self.gadgets.is_dir():
            res = subprocess.run(["modprobe", "libcomposite"], capture_output=True, text=True,
                                 check=False)
            if res.returncode != 0:
                raise OSError(errno.ENOENT, f"{self.gadgets}: missing; modprobe libcomposite:"
                              f" {res.stderr.strip()}")
        gadget.mkdir()
        try:
            (gadget / "idVendor").write_text(f"0x{p['vendor_id']:04x}")
            (gadget / "idProduct").write_text(f"0x{p['product_id']:04x}")
            strings = gadget / "strings" / "0x409"  # US English
            strings.mkdir()
            (strings / "manufacturer").write_text("tcmu-py")
            (strings / "product").write_text("tcmu-py USB target")
            config = gadget / "configs" / GADGET_CONFIG / "strings" / "0x409"
            config.mkdir(parents=True)
            (config / "configuration").write_text("tcm")
            function = gadget / "functions" / TCM_FUNCTION
            try:
                function.mkdir()  # libcomposite asks for module usbfunc:tcm (usb_f_tcm)
            except OSError as exc:
                raise OSError(exc.errno, f"{function}: {exc.strerror} (is usb_f_tcm loaded?"
                              " Debian's kernel does not build it: scripts/usb_f_tcm/build.sh"
                              " builds it)") from exc
        except BaseException:
            _rm_usb(gadget, self.udc_timeout)
            raise

    def delete(self, obj: LioObject) -> None:
        """Remove ``obj`` and what configfs holds under it, innermost first; a gadget is
        unbound from its UDC first (bounded: the write may block in the kernel)."""
        from tcmu_py.daemon.lio import Kind

        path = self.path(obj)
        if obj.kind is Kind.UDC:
            _unbind(path.parents[2], self.udc_timeout)
        else:
            _rm_usb(path, self.udc_timeout)


def _unbind(gadget: Path, timeout: float) -> None:
    """Unbind ``gadget`` from its UDC (if bound), then unlink the functions of ``c.1``."""
    udc = gadget / "UDC"
    if udc.is_file() and udc.read_text().strip():
        write_bounded(udc, "\n", timeout)
    config = gadget / "configs" / GADGET_CONFIG
    if config.is_dir():
        _unlink_links(config)


def _rm_usb(path: Path, timeout: float = UDC_TIMEOUT) -> None:
    name = path.name
    if path.parent.name == "usb_gadget":  # a gadget: unbind, then its groups, innermost first
        _unbind(path, timeout)
        for group in (f"configs/{GADGET_CONFIG}/strings/0x409", f"configs/{GADGET_CONFIG}",
                      f"functions/{TCM_FUNCTION}", "strings/0x409"):
            with contextlib.suppress(FileNotFoundError):
                (path / group).rmdir()
    elif name.startswith("lun_"):
        _unlink_links(path)
    elif name.startswith("tpgt_"):
        with contextlib.suppress(OSError):  # disabling also unbinds the gadget (f_tcm.c)
            (path / "enable").write_text("0")
        for lun in sorted((path / "lun").glob("lun_*")):
            _rm_usb(lun)
    else:  # a target port
        for tpg in sorted(path.glob("tpgt_*")):
            _rm_usb(tpg)
    path.rmdir()
