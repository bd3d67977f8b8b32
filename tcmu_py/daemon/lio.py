"""LIO objects from a validated Config: plan, create (recording what we made), remove only ours.

Theory of operation:

1. `plan_backstores` / `plan_exports` turn a Config into an ordered list of `LioObject`s — pure
   data (kind, identity key, creation parameters), parents before children. Unit tests check
   these plans; nothing here needs a kernel.
2. `apply_backstores` / `apply_exports` walk a plan against a `LioBackend`: the real one
   (`RtslibBackend`, rtslib-fb over configfs) or `MemoryBackend` (a model of configfs that
   enforces parent/child rules, for tests and dry runs). Before creating anything, every object
   is checked: present and recorded as ours with the same parameters → adopted (re-apply, daemon
   restart); present but not ours, or ours with other parameters → `LioConflict` listing all of
   them, nothing created. Then missing objects are created in order; each creation is appended
   to the state file at once (atomic rewrite), so a crash never forgets what we made. If a
   creation fails, what this call created is removed again (reverse order) and LioError raised.
3. `down` deletes, in reverse creation order, exactly the objects in the state file.

Ordering constraint from the kernel: a LUN's scan (INQUIRY, READ CAPACITY, ...) reaches the
TCMU ring as soon as the LUN is linked, so the daemon must serve a device *before* its LUN is
created. Hence two steps: `apply_backstores`, then start serving, then `apply_exports`.

Backstores are created with ``nl_reply_supported=-1`` (the kernel never waits for a netlink
reply for them, so creation cannot deadlock on the daemon), a data area and ``hw_max_sectors``
from the config (LIO's 128-sector default costs ~2x in sequential throughput), ``hw_block_size``,
then the ``cmd_time_out`` attribute (settable only while unexported) and ``emulate_write_cache``
(what the kernel reports in the netlink RECONFIG event; the handler's MODE SENSE is what
initiators see).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from tcmu_py.daemon.config import Config, Device, IscsiTarget, dev_config_string
from tcmu_py.errors import LIO_EXTRA_HINT, MissingExtra, TcmuError
from tcmu_py.statefile import invalid, make_private_dirs, read_json, write_json

__all__ = [
    "STATE_FILE",
    "ApplyResult",
    "Kind",
    "LioBackend",
    "LioConflict",
    "LioError",
    "LioObject",
    "MemoryBackend",
    "RtslibBackend",
    "StatusRow",
    "apply",
    "apply_backstores",
    "apply_exports",
    "backstore_writes",
    "down",
    "loopback_wwn",
    "no_reply_devices",
    "plan_backstores",
    "plan_exports",
    "prepare_storage",
    "read_state",
    "status_rows",
]

STATE_FILE = "lio-state.json"
STATE_VERSION = 1

log = logging.getLogger(__name__)


class LioError(TcmuError):
    """Creating or removing a LIO object failed; the message names the object."""


class LioConflict(LioError):
    """Objects the config asks for already exist and are not ours (or are ours with other
    settings). ``objects`` lists them; nothing was created."""

    def __init__(self, problems: Sequence[tuple[LioObject, str]]) -> None:
        self.objects = [obj for obj, _ in problems]
        super().__init__("\n".join(f"{obj}: {why}" for obj, why in problems))


class Kind(StrEnum):
    BACKSTORE = "backstore"
    TARGET = "target"
    TPG = "tpg"
    PORTAL = "portal"
    LUN = "lun"
    ACL = "acl"
    MAPPED_LUN = "mapped_lun"
    #: A libcomposite USB gadget carrying usb_f_tcm's function, and its binding to a UDC
    #: (`tcmu_py.daemon.fabric_lio`).
    GADGET = "gadget"
    UDC = "udc"


@dataclass(frozen=True)
class LioObject:
    """One configfs object. ``key`` identifies it (and its parents):

    - BACKSTORE ``("user", name)``
    - TARGET ``(fabric, wwn)``; TPG ``(fabric, wwn, tag)``; PORTAL ``(fabric, wwn, tag, "ip:port")``
    - LUN ``(fabric, wwn, tag, lun)``; ACL ``(fabric, wwn, tag, initiator)``
    - MAPPED_LUN ``(fabric, wwn, tag, initiator, mapped_lun)``
    - GADGET ``("gadget", name)``; UDC ``("gadget", name, udc)`` (the gadget bound to ``udc``)

    ``params`` are the creation parameters (JSON values); they take no part in identity.
    """

    kind: Kind
    key: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        return f"{self.kind.value} {'/'.join(self.key)}"

    @property
    def parent(self) -> tuple[Kind, tuple[str, ...]] | None:
        """Identity of the object this one lives in (None for backstores and targets)."""
        parents = {Kind.TPG: Kind.TARGET, Kind.PORTAL: Kind.TPG, Kind.LUN: Kind.TPG,
                   Kind.ACL: Kind.TPG, Kind.MAPPED_LUN: Kind.ACL, Kind.UDC: Kind.GADGET}
        if self.kind not in parents:
            return None
        return parents[self.kind], self.key[:-1]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "key": list(self.key), "params": self.params}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LioObject:
        return cls(Kind(d["kind"]), tuple(str(k) for k in d["key"]), dict(d.get("params", {})))


# --------------------------------------------------------------------------- planning


def loopback_wwn(state_dir: str, role: str = "target") -> str:
    """A stable NAA WWN for our tcm_loop target: LIO's OUI prefix (naa.5001405) + 9 hex digits
    derived from ``state_dir`` and ``role``, so re-applying finds the same target."""
    digest = hashlib.sha256(f"tcmu-py {role} {state_dir}".encode()).hexdigest()
    return "naa.5001405" + digest[:9]


def _control(dev: Device) -> str:
    # target_core_user.c tokens: nl_reply_supported=%d, max_data_area_mb=%d,
    # hw_max_sectors=%d, hw_block_size=%d (all must come before `enable`).
    return (f"nl_reply_supported=-1,max_data_area_mb={dev.max_data_area_mb},"
            f"hw_max_sectors={dev.hw_max_sectors},hw_block_size={dev.block_size}")


def plan_backstores(config: Config) -> list[LioObject]:
    """One user backstore per device, in config order."""
    out = []
    for dev in config.devices:
        out.append(LioObject(Kind.BACKSTORE, ("user", dev.name), {
            "config": dev_config_string(dev),
            "size": dev.size,
            "wwn": dev.serial,
            "control": _control(dev),
            "attributes": {"cmd_time_out": dev.cmd_time_out,
                           "emulate_write_cache": int(dev.write_cache)},
        }))
    return out


def _iscsi_tpg_attributes(tgt: IscsiTarget) -> dict[str, int]:
    uses_chap = tgt.chap is not None or any(a.chap is not None for a in tgt.acls)
    attrs = {"authentication": int(uses_chap)}
    if tgt.generate_node_acls:
        # Demo mode: any initiator logs in and sees every TPG LUN, writable, with a dynamic
        # ACL that is kept (cached) while the session lives.
        attrs.update(generate_node_acls=1, demo_mode_write_protect=0, cache_dynamic_acls=1)
    else:
        attrs["generate_node_acls"] = 0
    attrs.update(dict(tgt.attributes))
    return attrs


def _chap(chap: Any) -> dict[str, str] | None:
    if chap is None:
        return None
    d = {"userid": chap.userid, "password": chap.password}
    if chap.mutual_userid is not None:
        d.update(mutual_userid=chap.mutual_userid, mutual_password=chap.mutual_password)
    return d


def plan_exports(config: Config) -> list[LioObject]:
    """tcm_loop target/TPG/LUNs, then for each iSCSI target: target, TPG (attributes, TPG CHAP,
    enabled), portals, LUNs, ACLs (CHAP) and their mapped LUNs (LUN masking); then the iSER
    targets (the same, each portal with ``iser: true``), then SRP and FC targets
    (`tcmu_py.daemon.fabric_lio.plan_fabric_exports`)."""
    from tcmu_py.daemon.fabric_lio import plan_fabric_exports
    out: list[LioObject] = []
    if config.exports.loopback:
        wwn = loopback_wwn(config.state_dir)
        out.append(LioObject(Kind.TARGET, ("loopback", wwn)))
        out.append(LioObject(Kind.TPG, ("loopback", wwn, "1"), {"attributes": {}}))
        for lm in config.exports.loopback:
            out.append(LioObject(Kind.LUN, ("loopback", wwn, "1", str(lm.lun)),
                                 {"backstore": lm.device}))
    iser = set(config.exports.iser)
    for tgt in (*config.exports.iscsi, *config.exports.iser):
        t = ("iscsi", tgt.iqn)
        tpg = (*t, str(tgt.tpg))
        out.append(LioObject(Kind.TARGET, t))
        out.append(LioObject(Kind.TPG, tpg, {"attributes": _iscsi_tpg_attributes(tgt),
                                             "chap": _chap(tgt.chap)}))
        for portal in tgt.portals:
            out.append(LioObject(Kind.PORTAL, (*tpg, str(portal)),
                                 {"ip": portal.ip, "port": portal.port,
                                  **({"iser": True} if tgt in iser else {})}))
        lun_of = {lm.device: lm.lun for lm in tgt.luns}
        for lm in tgt.luns:
            out.append(LioObject(Kind.LUN, (*tpg, str(lm.lun)), {"backstore": lm.device}))
        for acl in tgt.acls:
            akey = (*tpg, acl.initiator)
            out.append(LioObject(Kind.ACL, akey, {"chap": _chap(acl.chap)}))
            visible = acl.luns if acl.luns is not None else tuple(lun_of)
            for dev_name in visible:
                n = lun_of[dev_name]
                out.append(LioObject(Kind.MAPPED_LUN, (*akey, str(n)),
                                     {"tpg_lun": n, "write_protect": False}))
    return out + plan_fabric_exports(config)


# --------------------------------------------------------------------------- backends


class LioBackend(Protocol):
    """What apply/down need from LIO. ``create`` may assume the parent exists and the object
    does not; ``delete`` removes the object (and, as configfs does, anything under it)."""

    def exists(self, obj: LioObject) -> bool: ...
    def create(self, obj: LioObject) -> None: ...
    def delete(self, obj: LioObject) -> None: ...


class MemoryBackend:
    """An in-memory configfs model: enforces that parents exist before children, that a LUN's
    backstore exists, and that deleting an object deletes everything under it. ``log`` records
    every create/delete in order."""

    def __init__(self, existing: Iterable[LioObject] = ()) -> None:
        self.objects: dict[tuple[Kind, tuple[str, ...]], LioObject] = {}
        self.log: list[tuple[str, LioObject]] = []
        self.fail_on: set[tuple[Kind, tuple[str, ...]]] = set()
        for obj in existing:
            self.objects[(obj.kind, obj.key)] = obj

    def exists(self, obj: LioObject) -> bool:
        return (obj.kind, obj.key) in self.objects

    def create(self, obj: LioObject) -> None:
        ident = (obj.kind, obj.key)
        if ident in self.fail_on:
            raise LioError(f"{obj}: injected failure")
        if ident in self.objects:
            raise LioError(f"{obj}: already exists")
        parent = obj.parent
        if parent is not None and parent not in self.objects:
            raise LioError(f"{obj}: parent {parent[0].value} {'/'.join(parent[1])} missing")
        if obj.kind is Kind.LUN and (Kind.BACKSTORE, ("user", obj.params["backstore"])) not in (
                self.objects):
            raise LioError(f"{obj}: backstore {obj.params['backstore']} missing")
        if obj.kind is Kind.MAPPED_LUN and (
                Kind.LUN, (*obj.key[:3], str(obj.params["tpg_lun"]))) not in self.objects:
            raise LioError(f"{obj}: TPG LUN {obj.params['tpg_lun']} missing")
        self.objects[ident] = obj
        self.log.append(("create", obj))

    def backstore_config(self, name: str) -> str | None:
        """The dev_config of user backstore `name` (``<subtype>/<cfgstring>``), None if none."""
        obj = self.objects.get((Kind.BACKSTORE, ("user", name)))
        return None if obj is None else str(obj.params.get("config"))

    def backstore_users(self, name: str) -> list[str]:
        """The TPG LUNs exporting user backstore `name`, as ``fabric/target/tpg/lun``."""
        return ["/".join(o.key) for (kind, _), o in self.objects.items()
                if kind is Kind.LUN and o.params.get("backstore") == name]

    def delete(self, obj: LioObject) -> None:
        ident = (obj.kind, obj.key)
        if ident not in self.objects:
            raise LioError(f"{obj}: does not exist")
        for other in list(self.objects):
            if other != ident and _under(other, ident):
                del self.objects[other]
        if obj.kind is Kind.BACKSTORE:  # configfs unlinks LUNs using a deleted backstore
            for other, o in list(self.objects.items()):
                if other[0] is Kind.LUN and o.params.get("backstore") == obj.key[1]:
                    del self.objects[other]
        del self.objects[ident]
        self.log.append(("delete", obj))


def _under(child: tuple[Kind, tuple[str, ...]], parent: tuple[Kind, tuple[str, ...]]) -> bool:
    if parent[0] is Kind.BACKSTORE or child[0] is Kind.BACKSTORE:
        return False
    return len(child[1]) > len(parent[1]) and child[1][:len(parent[1])] == parent[1]


class RtslibBackend:
    """LIO through rtslib-fb (the library targetcli uses). Needs configfs mounted and
    target_core_mod; creates /etc/target if missing (rtslib-fb refuses to work without it)."""

    def __init__(self) -> None:
        try:
            import rtslib_fb
        except ImportError:
            raise MissingExtra(
                f"LIO objects need rtslib-fb, which is not installed: {LIO_EXTRA_HINT}") from None

        Path("/etc/target").mkdir(parents=True, exist_ok=True)
        self.rtslib = rtslib_fb
        try:
            self.configfs = rtslib_fb.RTSRoot().path
        except Exception as exc:  # rtslib raises bare RTSLibError / OSError
            raise LioError(f"LIO is not available (configfs, target_core_mod): {exc}") from exc

    def _by_hand(self, obj: LioObject) -> Any:
        """The `SrptConfigfs` or `UsbConfigfs` that handles `obj` if it is an object of
        ib_srpt or usb_f_tcm (made by hand in configfs), else None."""
        from tcmu_py.daemon import fabric_lio as fl

        if obj.kind is Kind.BACKSTORE:
            return None
        def user_so(name: str) -> Path:
            return Path(self._user_so(name).path)

        if obj.key[0] == fl.SRPT:
            return fl.SrptConfigfs(self.configfs, user_so)
        if obj.key[0] in (fl.USB_GADGET, fl.GADGET):
            return fl.UsbConfigfs(self.configfs, user_so)
        return None

    # Lookups of existing objects; each raises RTSLibNotInCFSError (an RTSLibError) if absent.
    def _target(self, key: tuple[str, ...]) -> Any:
        r = self.rtslib
        return r.Target(r.FabricModule(key[0]), key[1], mode="lookup")

    def _tpg(self, key: tuple[str, ...]) -> Any:
        return self.rtslib.TPG(self._target(key), int(key[2]), mode="lookup")

    def _acl(self, key: tuple[str, ...]) -> Any:
        return self.rtslib.NodeACL(self._tpg(key), key[3], mode="lookup")

    def _user_so(self, name: str) -> Any:
        # rtslib-fb caches backstore name -> user_N index process-wide and fills the cache only
        # when empty; a long-running daemon must not trust it.
        self.rtslib.tcm.bs_cache.clear()
        return self.rtslib.UserBackedStorageObject(name)

    def _lookup(self, obj: LioObject) -> Any:
        r, k = self.rtslib, obj.key
        if obj.kind is Kind.BACKSTORE:
            return self._user_so(k[1])
        if obj.kind is Kind.TARGET:
            return self._target(k)
        if obj.kind is Kind.TPG:
            return self._tpg(k)
        if obj.kind is Kind.PORTAL:
            return r.NetworkPortal(self._tpg(k), _portal_ip(obj), obj.params["port"],
                                   mode="lookup")
        if obj.kind is Kind.LUN:
            return r.LUN(self._tpg(k), int(k[3]))
        if obj.kind is Kind.ACL:
            return self._acl(k)
        return r.MappedLUN(self._acl(k), int(k[4]))

    def backstore_config(self, name: str) -> str | None:
        """`MemoryBackend.backstore_config`, from the kernel's ``info`` (None if it cannot be
        read: `down` and `apply` then go by the state file alone, as before)."""
        try:
            config = self._user_so(name).config
        except Exception as exc:  # noqa: BLE001 - a check on top, never a new failure
            log.warning("backstore %s: its dev_config cannot be read (%s)", name, exc)
            return None
        return None if config is None else str(config)

    def backstore_users(self, name: str) -> list[str]:
        """`MemoryBackend.backstore_users`, from configfs ([] if they cannot be listed)."""
        out = []
        try:
            for lun in self._user_so(name).attached_luns:
                tpg = lun.parent_tpg
                target = tpg.parent_target
                out.append(f"{target.fabric_module.name}/{target.wwn}/tpgt_{tpg.tag}/"
                           f"lun_{lun.lun}")
        except Exception as exc:  # noqa: BLE001 - a check on top, never a new failure
            log.warning("backstore %s: the LUNs using it cannot be listed (%s)", name, exc)
            return []
        return out

    def exists(self, obj: LioObject) -> bool:
        by_hand = self._by_hand(obj)
        if by_hand is not None:
            return bool(by_hand.exists(obj))
        try:
            self._lookup(obj)
        except self.rtslib.utils.RTSLibError:
            return False
        return True

    def create(self, obj: LioObject) -> None:
        try:
            by_hand = self._by_hand(obj)
            if by_hand is not None:
                by_hand.create(obj)
                return
            self._create(obj)
        except (self.rtslib.utils.RTSLibError, OSError) as exc:
            raise LioError(f"creating {obj}: {exc}") from exc

    def _create(self, obj: LioObject) -> None:
        r, k, p = self.rtslib, obj.key, obj.params
        if obj.kind is Kind.BACKSTORE:
            self._create_backstore(k[1], p)
        elif obj.kind is Kind.TARGET:
            r.Target(r.FabricModule(k[0]), k[1], mode="create")
        elif obj.kind is Kind.TPG:
            # tcm_loop TPGs get a generated nexus here (rtslib sets it when the fabric has one).
            tpg = r.TPG(self._target(k), int(k[2]), mode="create")
            try:
                for name, value in p.get("attributes", {}).items():
                    tpg.set_attribute(name, str(value))
                chap = p.get("chap")
                if chap:
                    _set_chap(tpg, chap)
                tpg.enable = True
            except BaseException:
                tpg.delete()
                raise
        elif obj.kind is Kind.PORTAL:
            np = r.NetworkPortal(self._tpg(k), _portal_ip(obj), p["port"], mode="create")
            if p.get("iser"):
                _enable_iser(np)
        elif obj.kind is Kind.LUN:
            r.LUN(self._tpg(k), int(k[3]),
                  storage_object=self._user_so(p["backstore"]))
        elif obj.kind is Kind.ACL:
            acl = r.NodeACL(self._tpg(k), k[3], mode="create")
            if p.get("chap"):
                try:
                    _set_chap(acl, p["chap"])
                except BaseException:
                    acl.delete()
                    raise
        else:
            r.MappedLUN(self._acl(k), int(k[4]), tpg_lun=p["tpg_lun"],
                        write_protect=p["write_protect"])

    def _create_backstore(self, name: str, p: dict[str, Any]) -> None:
        """mkdir user_<N>/<name>, control, attributes, enable, unit serial — by hand rather than
        with rtslib-fb's constructor, which enables the device before attributes can be set:
        after enable, writing ``emulate_write_cache`` sends a netlink RECONFIG event and fails
        with ESRCH when no daemon listens (checked on Debian's 6.1 kernel)."""
        import fcntl

        core = Path(self.configfs) / "core"
        Path(self.rtslib.tcm.lock_file).parent.mkdir(parents=True, exist_ok=True)
        with open(self.rtslib.tcm.lock_file, "w+") as lock:
            # Same lock and index space as rtslib-fb/targetcli: one HBA index per backstore.
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = {d.name.rsplit("_", 1)[1] for d in core.glob("*_*") if d.is_dir()}
            index = next(n for n in range(1 << 20) if str(n) not in used)
            hba = core / f"user_{index}"
            so = hba / name
            so.mkdir(parents=True)
        try:
            for rel, value in backstore_writes(p):
                (so / rel).write_text(value)
        except BaseException:
            with contextlib.suppress(OSError):  # rmdir also disables an enabled device
                so.rmdir()
                hba.rmdir()
            raise
        self.rtslib.tcm.bs_cache.clear()

    def delete(self, obj: LioObject) -> None:
        try:
            by_hand = self._by_hand(obj)
            if by_hand is not None:
                by_hand.delete(obj)
                return
            self._lookup(obj).delete()
        except (self.rtslib.utils.RTSLibError, OSError) as exc:
            raise LioError(f"removing {obj}: {exc}") from exc


def backstore_writes(params: dict[str, Any]) -> list[tuple[str, str]]:
    """configfs writes (file relative to the backstore directory, value) that configure and
    enable a user backstore, in order. target_core_user.c splits each ``control`` write at ','
    into key=value tokens, so dev_config (cut at its first ',') is written alone; everything in
    ``control`` and ``attrib/`` must precede ``enable`` (max_data_area_mb and friends are refused
    afterwards, and emulate_write_cache would need a netlink listener); the unit serial can only
    be written once the device is configured."""
    writes = [("control", f"dev_config={params['config']}"),
              ("control", f"dev_size={params['size']}"),
              ("control", params["control"])]
    writes += [(f"attrib/{k}", str(v)) for k, v in params["attributes"].items()]
    writes.append(("enable", "1"))
    # rtslib-fb generates a UUID unit serial when none is given; so do we.
    writes.append(("wwn/vpd_unit_serial", f"{params['wwn'] or uuid.uuid4()}\n"))
    return writes


def _enable_iser(np: Any) -> None:
    """Set the portal's ``iser`` attribute, and check that it took: rtslib-fb ignores a missing
    attribute silently, and the kernel refuses 1 when ib_isert cannot listen there (no RDMA
    device with that address). The portal is removed again on failure."""
    try:
        np.iser = True
        iser = Path(np.path) / "iser"
        if not iser.is_file() or iser.read_text().strip() != "1":
            raise LioError(f"{iser}: the iser attribute is missing or did not take (is"
                           " ib_isert loaded, and the address on an RDMA device?)")
    except BaseException:
        np.delete()
        raise


def _portal_ip(obj: LioObject) -> str:
    ip = str(obj.params["ip"])
    return f"[{ip}]" if ":" in ip else ip  # rtslib-fb wants IPv6 in brackets


def _set_chap(node: Any, chap: dict[str, str]) -> None:
    node.chap_userid = chap["userid"]
    node.chap_password = chap["password"]
    if "mutual_userid" in chap:
        node.chap_mutual_userid = chap["mutual_userid"]
        node.chap_mutual_password = chap["mutual_password"]


# --------------------------------------------------------------------------- state file


def _state_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / STATE_FILE


#: Key length of each kind (see `LioObject`) and the parameters tcmu-py reads back.
_KEY_LENGTH = {Kind.BACKSTORE: 2, Kind.TARGET: 2, Kind.TPG: 3, Kind.PORTAL: 4, Kind.LUN: 4,
               Kind.ACL: 4, Kind.MAPPED_LUN: 5, Kind.GADGET: 2, Kind.UDC: 3}
_PARAMS: dict[Kind, dict[str, type]] = {
    Kind.BACKSTORE: {"config": str, "size": int},
    Kind.PORTAL: {"ip": str, "port": int},
    Kind.LUN: {"backstore": str},
    Kind.MAPPED_LUN: {"tpg_lun": int, "write_protect": bool},
}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


def _object_from_doc(path: Path, where: str, d: object) -> LioObject:
    """One recorded object, validated: kind, key (strings, as many as the kind has) and the
    parameters tcmu-py reads back; StateFileError naming `path` and `where` otherwise."""
    if not isinstance(d, dict):
        raise invalid(path, where, d, '{"kind": ..., "key": [...], "params": {...}}')
    raw_kind = d.get("kind", _Missing())
    if not isinstance(raw_kind, str) or raw_kind not in {k.value for k in Kind}:
        raise invalid(path, f"{where}.kind", raw_kind, f"one of {', '.join(k.value for k in Kind)}")
    kind = Kind(raw_kind)
    key = d.get("key")
    if not (isinstance(key, list) and len(key) == _KEY_LENGTH[kind]
            and all(isinstance(k, str) for k in key)):
        raise invalid(path, f"{where}.key", key, f"a list of {_KEY_LENGTH[kind]} strings (the"
                      f" identity of a {kind.value})")
    params = d.get("params", {})
    if not isinstance(params, dict):
        raise invalid(path, f"{where}.params", params, "an object")
    for name, want in _PARAMS.get(kind, {}).items():
        value = params.get(name, _Missing())
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise invalid(path, f"{where}.params.{name}", value,
                          f"{_TYPE_NAMES[want]} (a {kind.value} tcmu-py created has one)")
    return LioObject(kind, tuple(key), dict(params))


class _Missing:
    def __repr__(self) -> str:
        return "nothing"


def read_state(state_dir: str | Path) -> list[LioObject]:
    """Objects tcmu-py created, in creation order ([] if there is no state file). A state file
    that is unreadable or malformed raises StateFileError (a ConfigError: `tcmu-py` exits 2)
    naming the file, the key, the value and what was expected; nothing is created or removed
    on the strength of a file that cannot be trusted."""
    path = _state_path(state_dir)
    try:
        doc = read_json(path, "the LIO state file tcmu-py writes")
    except FileNotFoundError:
        return []
    if not isinstance(doc, dict):
        raise invalid(path, "(top level)", doc, 'a JSON object {"version": 1, "objects": [...]}')
    if doc.get("version", _Missing()) != STATE_VERSION:
        raise invalid(path, "version", doc.get("version", _Missing()),
                      f"{STATE_VERSION} (the state format this version reads)")
    objects = doc.get("objects", [])
    if not isinstance(objects, list):
        raise invalid(path, "objects", objects, "a list of the objects tcmu-py created")
    return [_object_from_doc(path, f"objects[{i}]", o) for i, o in enumerate(objects)]


def _write_state(state_dir: str | Path, objects: Sequence[LioObject]) -> None:
    """Atomic, durable replace (`tcmu_py.statefile.write_json`): mode 0600 (it may hold CHAP
    secrets), in a state directory created 0700."""
    path = _state_path(state_dir)
    make_private_dirs(path.parent)
    write_json(path, {"version": STATE_VERSION, "objects": [o.to_json() for o in objects]})


# --------------------------------------------------------------------------- apply / down


@dataclass
class ApplyResult:
    """``planned``: the whole plan in order; ``created``: what this call created (in order);
    ``adopted``: already present and ours; ``stale``: ours, recorded, but no longer in the
    config (left in place; `down` removes them)."""

    planned: list[LioObject] = field(default_factory=list)
    created: list[LioObject] = field(default_factory=list)
    adopted: list[LioObject] = field(default_factory=list)
    stale: list[LioObject] = field(default_factory=list)


def _comparable(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _apply_plan(plan: list[LioObject], state_dir: str, backend: LioBackend | None,
                dry_run: bool) -> ApplyResult:
    recorded = read_state(state_dir)
    ours = {(o.kind, o.key): o for o in recorded}
    result = ApplyResult(planned=list(plan))
    if dry_run and backend is None:
        backend = MemoryBackend(o for o in recorded)  # assume our recorded objects still exist
    if backend is None:
        backend = RtslibBackend()

    conflicts: list[tuple[LioObject, str]] = []
    to_create: list[LioObject] = []
    for obj in plan:
        mine = ours.get((obj.kind, obj.key))
        if not backend.exists(obj):
            to_create.append(obj)
        elif mine is None:
            conflicts.append((obj, "exists and was not created by tcmu-py"))
        elif _comparable(mine.params) != _comparable(obj.params):
            conflicts.append((obj, "exists with other settings; run `tcmu-py down` first"))
        elif (live := _live_config(backend, obj)) is not None:
            conflicts.append((obj, f"exists with dev_config {live!r}, not the "
                              f"{obj.params['config']!r} tcmu-py made: deleted and made again "
                              "by someone else"))
        else:
            result.adopted.append(obj)
    if conflicts:
        raise LioConflict(conflicts)
    if dry_run:
        result.created = to_create
        return result

    state = [o for o in recorded if (o.kind, o.key) not in {(c.kind, c.key) for c in to_create}]
    try:
        for obj in to_create:
            backend.create(obj)
            result.created.append(obj)
            state.append(obj)
            _write_state(state_dir, state)
    except BaseException as exc:
        for obj in reversed(result.created):
            try:
                if backend.exists(obj):
                    backend.delete(obj)
            except LioError:
                continue  # keep it recorded so `down` retries
            state = [o for o in state if (o.kind, o.key) != (obj.kind, obj.key)]
        _write_state(state_dir, state)
        if isinstance(exc, LioError):
            raise
        raise LioError(f"apply failed: {exc}") from exc
    return result


def _with_stale(result: ApplyResult, config_plan: list[LioObject], state_dir: str,
                kinds: set[Kind]) -> ApplyResult:
    wanted = {(o.kind, o.key) for o in config_plan}
    result.stale = [o for o in read_state(state_dir)
                    if o.kind in kinds and (o.kind, o.key) not in wanted]
    return result


_BACKSTORE_KINDS = {Kind.BACKSTORE}
_EXPORT_KINDS = set(Kind) - _BACKSTORE_KINDS


def prepare_storage(config: Config) -> list[Path]:
    """Create the state directory and missing ``raw`` image files (sparse, of the device size;
    an existing smaller image is extended, never shrunk). Returns the image files created.
    What other handlers need (thin pools, tape libraries) is their `Handler.prepare`'s, run
    before this (`tcmu_py.cli.prepare_handlers`)."""
    make_private_dirs(config.state_dir)
    created = []
    for dev in config.devices:
        if dev.handler != "raw":
            continue
        img = Path(dev.options_dict()["path"])
        make_private_dirs(img.parent)
        try:
            fd = os.open(img, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            created.append(img)
        except FileExistsError:
            fd = os.open(img, os.O_WRONLY)
        try:
            if os.fstat(fd).st_size < dev.size:
                os.ftruncate(fd, dev.size)
        finally:
            os.close(fd)
    return created


def apply_backstores(config: Config, backend: LioBackend | None = None, *,
                     dry_run: bool = False) -> ApplyResult:
    """Create the user backstores (and backing storage, see `prepare_storage`). With
    ``dry_run`` nothing is touched: the result says what would be created; without a backend,
    a dry run assumes exactly the recorded objects exist."""
    plan = plan_backstores(config)
    if not dry_run:
        prepare_storage(config)
    return _with_stale(_apply_plan(plan, config.state_dir, backend, dry_run), plan,
                       config.state_dir, _BACKSTORE_KINDS)


def apply_exports(config: Config, backend: LioBackend | None = None, *,
                  dry_run: bool = False) -> ApplyResult:
    """Create targets, TPGs, portals, LUNs and ACLs. Call only once the daemon serves the
    backstores (LUN creation sends the initiator's scan to the ring)."""
    plan = plan_exports(config)
    return _with_stale(_apply_plan(plan, config.state_dir, backend, dry_run), plan,
                       config.state_dir, _EXPORT_KINDS)


def apply(config: Config, backend: LioBackend | None = None, *,
          dry_run: bool = False) -> ApplyResult:
    """`apply_backstores` then `apply_exports`, for when devices are already served (or the
    caller accepts that the scan waits for the daemon, up to ``cmd_time_out``)."""
    if backend is None and not dry_run:
        backend = RtslibBackend()
    a = apply_backstores(config, backend, dry_run=dry_run)
    b = apply_exports(config, backend, dry_run=dry_run)
    return ApplyResult(a.planned + b.planned, a.created + b.created, a.adopted + b.adopted,
                       a.stale + b.stale)


def down(state_dir: str | Path, backend: LioBackend | None = None) -> list[LioObject]:
    """Remove every object recorded in the state file, newest first, skipping ones already
    gone (removed by hand, or with their parent). Returns what was removed. Objects that fail
    to go stay recorded and LioError is raised after trying all of them."""
    recorded = read_state(state_dir)
    if not recorded:
        return []
    if backend is None:
        backend = RtslibBackend()
    removed: list[LioObject] = []
    failed: list[str] = []
    remaining = list(recorded)
    # Exports before backstores: a backstore in use by a LUN we did not create must not
    # silently take that LUN along (rtslib's delete unlinks every LUN using it).
    order = sorted(reversed(recorded), key=lambda o: o.kind is Kind.BACKSTORE)
    for obj in order:
        try:
            if backend.exists(obj):
                live = _live_config(backend, obj)
                users = _foreign_users(backend, obj) if live is None else []
                if live is not None:  # another's now: left, and forgotten
                    log.warning("not removing %s: its dev_config is %r, not the %r tcmu-py "
                                "made; forgetting it", obj, live, obj.params.get("config"))
                elif users:  # ours, still needed by a LUN we did not make: stays recorded
                    failed.append(f"not removing {obj}: in use by LUN(s) tcmu-py did not make"
                                  f" ({', '.join(users)}); remove them first, then `tcmu-py "
                                  "down` again")
                    continue
                else:
                    backend.delete(obj)
                    removed.append(obj)
        except LioError as exc:
            failed.append(str(exc))
            continue
        remaining.remove(obj)
        _write_state(state_dir, remaining)
    if failed:
        raise LioError("\n".join(failed))
    return removed


def _live_config(backend: LioBackend, obj: LioObject) -> str | None:
    """For a recorded backstore that exists: its live dev_config when that is not the one
    tcmu-py made (someone deleted it and made another of the same name), else None. Backends
    that cannot tell (no ``backstore_config``) say None."""
    read = getattr(backend, "backstore_config", None)
    if obj.kind is not Kind.BACKSTORE or read is None:
        return None
    live, made = read(obj.key[1]), str(obj.params.get("config"))
    if live is None or live == made:
        return None
    # rtslib-fb reads it from the kernel's `info` up to the first space or ':'
    return None if made.startswith(live) and made[len(live)] in " :" else live


def _foreign_users(backend: LioBackend, obj: LioObject) -> list[str]:
    """The LUNs still exporting recorded backstore `obj` once `down` removed its own exports:
    ones tcmu-py did not make (rtslib-fb's delete would take them along, silently). [] for
    other kinds, and for backends that cannot list them (no ``backstore_users``)."""
    listing = getattr(backend, "backstore_users", None)
    if obj.kind is not Kind.BACKSTORE or listing is None:
        return []
    return list(listing(obj.key[1]))


def no_reply_devices(state_dir: str | Path) -> set[str]:
    """Names of the backstores tcmu-py created (with ``nl_reply_supported=-1``): the daemon must
    not send netlink replies for them (see tcmu_py.daemon.netlink.should_reply)."""
    return {o.key[1] for o in read_state(state_dir) if o.kind is Kind.BACKSTORE}


@dataclass(frozen=True)
class StatusRow:
    """One line of ``tcmu-py status``: what we created and whether it is still there."""

    kind: str
    name: str
    detail: str
    present: bool


def _detail(obj: LioObject) -> str:
    p = obj.params
    if obj.kind is Kind.BACKSTORE:
        return f"{p['config']} size={p['size']}"
    if obj.kind is Kind.LUN:
        return f"-> {p['backstore']}"
    if obj.kind is Kind.TPG:
        attrs = p.get("attributes") or {}
        flags = [f"{k}={v}" for k, v in sorted(attrs.items())]
        flags += [f"nexus={p['nexus']}"] if p.get("nexus") else []
        return " ".join(flags + (["chap"] if p.get("chap") else []))
    if obj.kind is Kind.ACL:
        return "chap" if p.get("chap") else ""
    if obj.kind is Kind.MAPPED_LUN:
        return f"-> tpg lun {p['tpg_lun']}"
    if obj.kind is Kind.GADGET:
        return f"usb {p.get('vendor_id', 0):04x}:{p.get('product_id', 0):04x}"
    return ""


def status_rows(state_dir: str | Path, backend: LioBackend | None = None) -> list[StatusRow]:
    """Our recorded objects in creation order, each checked against LIO (``present``). CHAP
    secrets are never shown."""
    recorded = read_state(state_dir)
    if recorded and backend is None:
        backend = RtslibBackend()
    rows = []
    for obj in recorded:
        assert backend is not None
        rows.append(StatusRow(obj.kind.value, "/".join(obj.key), _detail(obj),
                              backend.exists(obj)))
    return rows

