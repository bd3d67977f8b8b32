"""LIO objects of the fabrics beyond tcm_loop and iSCSI: iSER portals, SRP (ib_srpt) and FC
(tcm_fc). `tcmu_py.daemon.lio` plans and applies them with the others (`plan_fabric_exports`),
records them in the same state file, and `down` removes them exactly as the others.

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
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tcmu_py.daemon.config import Config, FabricAcl, LunMap

if TYPE_CHECKING:
    from tcmu_py.daemon.lio import LioObject

__all__ = ["SRPT", "TCM_FC", "SrptConfigfs", "plan_fabric_exports"]

#: Fabric names as LIO's configfs (and rtslib-fb's FabricModule) spell them.
SRPT = "srpt"
TCM_FC = "tcm_fc"
#: tcm_fc and ib_srpt serve one TPG per port name; rtslib-fb creates tag 1.
TPG_TAG = "1"


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


def plan_fabric_exports(config: Config) -> list[LioObject]:
    """SRP targets, then FC targets (each: target, TPG 1, LUNs, ACLs and their mapped LUNs).
    The SRP target carries ``rdma_cm_port`` (written to srpt's ``discovery_auth`` before the
    port is created). iSER targets are planned by `lio.plan_exports` as iSCSI ones."""
    out: list[LioObject] = []
    for srp in config.exports.srp:
        out += _fabric_target(SRPT, srp.port, srp.luns, srp.acls,
                              {"rdma_cm_port": srp.rdma_cm_port})
    for fc in config.exports.fc:
        out += _fabric_target(TCM_FC, fc.wwpn, fc.luns, fc.acls, {})
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
