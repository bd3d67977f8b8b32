"""Software transports for LIO's SRP, iSER, FC and USB fabrics inside the lab guest (issue 18).

Everything here configures the network and RDMA stack of the machine it runs on, so it refuses
to run anywhere but a lab guest (`in_guest`: the kernel command line virtme-ng boots with).
The guest is its own network namespace: the host's network is never touched.

What `bring_up` builds (measured recipes: docs in README "Fabrics"):

- a veth pair ``tfab0`` (target end, 192.168.77.1) / ``tfab1`` (initiator end, 192.168.77.2)
  with fixed MAC addresses and a jumbo MTU (FCoE frames are ~2.2 KB);
- **soft-RoCE** (``rdma_rxe``): ``rdma link add rxe0 type rxe netdev tfab0``; one rxe device
  serves both ends (SRP and iSER) and its port is ACTIVE within seconds;
- **SRP**: ``ib_srpt`` and ``ib_srp`` loaded; the target port is named by the GUID of the rxe
  port's GID 0 and logins use RDMA/CM (`srp_login`);
- **iSER**: ``ib_isert`` and ``ib_iser`` loaded, ``iscsid`` running (`iser_login`);
- **FC**: an FCoE controller on each veth end in VN2VN mode (no switch, no fcoemon or lldpad);
  the target end is enabled at once, the initiator end only when `enable_fc_initiator` is
  called, after the tcm_fc target and its ACL exist;
- **USB**: ``dummy_hcd`` (a UDC, ``dummy_udc.0``, wired to a host controller in the same
  kernel), ``libcomposite``, ``usb-storage`` with the quirk ``1d6b:0104:u`` (the host ignores
  the gadget's UAS interface and drives it over Bulk-Only; `usb_quirk` changes it), and
  usb_f_tcm **built out of tree with tcmu-py's Bulk-Only fix** (scripts/usb_f_tcm/build.sh
  leaves it in `USB_F_TCM_DIR`; Debian's kernel does not build it) loaded with ``insmod``.
  The gadget itself is tcmu-py's (YAML ``exports.usb``); `usb_host` waits for the host side.

A fabric whose transport cannot come up is recorded in ``FabricLab.errors`` with the exact
error (its peers still come up), never dropped silently. Writes to sysfs/configfs that the
kernel may block in (``add_target``, ``ctlr_create``, a UDC) run in a thread with a deadline
(`write_bounded`): ``timeout`` cannot end a write stuck in the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from tcmu_py.errors import TcmuError

__all__ = [
    "FABRICS",
    "USB_F_TCM_DIR",
    "FabricLab",
    "FabricLabError",
    "bring_up",
    "enable_fc_initiator",
    "fc_wwpn",
    "in_guest",
    "iser_login",
    "iser_logout",
    "scsi_host_devices",
    "scsi_hosts",
    "srp_login",
    "srp_logout",
    "usb_f_tcm_info",
    "usb_f_tcm_module",
    "usb_host",
    "usb_quirk",
    "write_bounded",
]

FABRICS = ("srp", "iser", "fc", "usb")
VETH_TARGET, VETH_INITIATOR = "tfab0", "tfab1"
MAC_TARGET, MAC_INITIATOR = "02:00:00:00:77:01", "02:00:00:00:77:02"
IP_TARGET, IP_INITIATOR = "192.168.77.1", "192.168.77.2"
PREFIX = 24
MTU = 9000
RXE = "rxe0"
#: TCP port ib_srpt listens on for RDMA/CM logins (srpt's discovery_auth/rdma_cm_port).
SRP_CM_PORT = 5555
FCOE_BUS = Path("/sys/bus/fcoe")
INFINIBAND = Path("/sys/class/infiniband")
SCSI_HOSTS = Path("/sys/class/scsi_host")
#: Where scripts/usb_f_tcm/build.sh leaves the module: <dir>/<kernel release>/usb_f_tcm.ko
#: and BUILD-INFO (TCMU_PY_USB_F_TCM_DIR overrides it there and here; not /var/cache, which
#: virtme-ng hides from the guest).
USB_F_TCM_DIR = Path(os.environ.get("TCMU_PY_USB_F_TCM_DIR", "/var/lib/tcmu-py/usb_f_tcm"))
UDC = "dummy_udc.0"
#: The USB IDs tcmu-py's gadget has unless the YAML says otherwise (Linux Foundation,
#: Multifunction Composite Gadget), as usb-storage's quirks name them.
USB_IDS = "1d6b:0104"
USB_QUIRKS = Path("/sys/module/usb_storage/parameters/quirks")

T = TypeVar("T")


class FabricLabError(TcmuError):
    """A transport could not be brought up (the message is the exact error)."""


def in_guest() -> bool:
    """Whether this is a lab guest booted by virtme-ng (its kernel command line names it)."""
    try:
        return "virtme" in Path("/proc/cmdline").read_text()
    except OSError:
        return False


def _require_guest() -> None:
    if not in_guest():
        raise FabricLabError("tcmu_py.lab_fabrics configures network and RDMA devices and runs"
                             " only inside the lab guest (tcmu-py lab --fabrics), never on a"
                             " host")


def fc_wwpn(mac: str) -> str:
    """The WWPN fcoe gives a local port on the interface with MAC address ``mac``
    (fcoe_wwn_from_mac(mac, 2, 0): 0x2000 and the MAC), as rtslib-fb spells it."""
    return "naa.2000" + mac.replace(":", "").lower()


@dataclass
class FabricLab:
    """What `bring_up` made, and what scenarios and YAML need to name it."""

    target_ip: str = IP_TARGET
    initiator_ip: str = IP_INITIATOR
    rxe: str = RXE
    #: ib_srpt's name of the rxe port (the GUID of GID 0, xxxx:xxxx:xxxx:xxxx) and its GID.
    srp_port: str | None = None
    srp_gid: str | None = None
    #: The rxe node GUID as 16 hex digits: the SRP ioc_guid and id_ext of a login.
    node_guid: str | None = None
    srp_cm_port: int = SRP_CM_PORT
    fc_target_wwpn: str = fc_wwpn(MAC_TARGET)
    fc_initiator_wwpn: str = fc_wwpn(MAC_INITIATOR)
    #: FCoE controller sysfs directories, by veth name.
    fcoe_ctlrs: dict[str, str] = field(default_factory=dict)
    #: The UDC a USB gadget binds to, and what the loaded usb_f_tcm was built from
    #: (its BUILD-INFO: kernel, source package, patch).
    udc: str = UDC
    usb_f_tcm: dict[str, str] = field(default_factory=dict)
    #: fabric -> the exact error that kept it from coming up.
    errors: dict[str, str] = field(default_factory=dict)
    #: step -> seconds it took.
    timings: dict[str, float] = field(default_factory=dict)

    def ready(self, fabric: str) -> bool:
        return fabric not in self.errors


def _run(argv: Sequence[str], timeout: float = 30.0) -> str:
    """Run a command; FabricLabError with its output if it fails or outlives ``timeout``."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                             check=False)
    except subprocess.TimeoutExpired:
        raise FabricLabError(f"{' '.join(argv)}: no answer after {timeout:g}s") from None
    except OSError as exc:
        raise FabricLabError(f"{' '.join(argv)}: {exc}") from None
    if res.returncode != 0:
        raise FabricLabError(f"{' '.join(argv)}: exit {res.returncode}:"
                             f" {(res.stderr or res.stdout).strip()}")
    return res.stdout


def _wait(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise FabricLabError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def write_bounded(path: str | os.PathLike[str], value: str, timeout: float) -> None:
    """Write ``value`` to the sysfs/configfs file ``path`` in a thread and wait at most
    ``timeout`` seconds (`tcmu_py.daemon.fabric_lio.write_bounded`): FabricLabError with the
    error (or the hang) otherwise. A write stuck in the kernel leaves its thread behind (a
    daemon thread) but not the caller."""
    from tcmu_py.daemon.fabric_lio import write_bounded as write

    try:
        write(path, value, timeout)
    except OSError as exc:
        if exc.errno == errno.ETIMEDOUT:
            raise FabricLabError(str(exc.strerror)) from None
        raise FabricLabError(f"writing {value!r} to {path}: {exc}") from None


def _timed(lab: FabricLab, step: str, func: Callable[[], T]) -> T:
    start = time.monotonic()
    try:
        return func()
    finally:
        lab.timings[step] = round(time.monotonic() - start, 2)


# --------------------------------------------------------------------------- bring-up


def _veth() -> None:
    if Path(f"/sys/class/net/{VETH_TARGET}").exists():
        return
    _run(["ip", "link", "add", VETH_TARGET, "address", MAC_TARGET, "mtu", str(MTU), "type",
          "veth", "peer", "name", VETH_INITIATOR, "address", MAC_INITIATOR, "mtu", str(MTU)])
    for dev, ip in ((VETH_TARGET, IP_TARGET), (VETH_INITIATOR, IP_INITIATOR)):
        _run(["ip", "addr", "add", f"{ip}/{PREFIX}", "dev", dev])
        _run(["ip", "link", "set", dev, "up"])


def _rxe(lab: FabricLab, timeout: float) -> None:
    _modprobe("rdma_rxe")
    if not (INFINIBAND / RXE).exists():
        _run(["rdma", "link", "add", RXE, "type", "rxe", "netdev", VETH_TARGET])
    port = INFINIBAND / RXE / "ports" / "1"
    _wait(lambda: "ACTIVE" in (port / "state").read_text(), timeout, f"{RXE} port 1 ACTIVE")
    gid = _wait(lambda: _gid0(port), timeout, f"{RXE} GID 0")
    groups = gid.split(":")
    lab.srp_gid = "0x" + "".join(groups)
    lab.srp_port = ":".join(groups[4:])
    lab.node_guid = (INFINIBAND / RXE / "node_guid").read_text().strip().replace(":", "")


def _gid0(port: Path) -> str | None:
    gid = (port / "gids" / "0").read_text().strip()
    return gid if gid.startswith("fe80") else None


def _fcoe_ctlr(netdev: str) -> Path | None:
    for ctlr in (FCOE_BUS / "devices").glob("ctlr_*"):
        if f"/net/{netdev}/" in str(ctlr.resolve()) + "/":
            return ctlr
    return None


def _fcoe(lab: FabricLab, timeout: float) -> None:
    _modprobe("fcoe", "tcm_fc")
    for dev in (VETH_TARGET, VETH_INITIATOR):
        if _fcoe_ctlr(dev) is None:
            write_bounded(FCOE_BUS / "ctlr_create", dev, timeout)
        ctlr = _wait(functools.partial(_fcoe_ctlr, dev), timeout,
                     f"the FCoE controller of {dev}")
        # 6.12 accepts only "VN2VN"; 6.1 takes either case.
        write_bounded(ctlr / "mode", "VN2VN", timeout)
        lab.fcoe_ctlrs[dev] = str(ctlr)
    # The target end now; the initiator end once the tcm_fc target and its ACL exist.
    write_bounded(Path(lab.fcoe_ctlrs[VETH_TARGET]) / "enabled", "1", timeout)


def usb_f_tcm_module(release: str | None = None) -> Path:
    """The usb_f_tcm.ko built for kernel ``release`` (default: the running one)."""
    return USB_F_TCM_DIR / (release or os.uname().release) / "usb_f_tcm.ko"


def usb_f_tcm_info(module: Path) -> dict[str, str]:
    """The BUILD-INFO beside ``module`` (key=value lines), {} if there is none."""
    try:
        text = (module.parent / "BUILD-INFO").read_text()
    except FileNotFoundError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def usb_quirk(bot_only: bool) -> None:
    """Make usb-storage drive tcmu-py's gadget over Bulk-Only (quirk ``u``: uas declines it) or
    let uas take it. Read when a device is probed: set it before the gadget binds."""
    USB_QUIRKS.write_text(f"{USB_IDS}:u\n" if bot_only else "\n")


def _usb(lab: FabricLab, timeout: float) -> None:
    # usb-storage before any gadget enumerates: its quirks decide between it and uas.
    _modprobe("dummy_hcd", "libcomposite", "usb-storage", "uas")
    usb_quirk(bot_only=True)
    module = usb_f_tcm_module()
    if not Path("/sys/module/usb_f_tcm").is_dir():
        if not module.is_file():
            raise FabricLabError(f"{module} missing: usb_f_tcm is not in Debian's kernel and"
                                 " is built out of tree by scripts/usb_f_tcm/build.sh (run by"
                                 " scripts/bootstrap.sh)")
        _run(["insmod", str(module)])
    lab.usb_f_tcm = usb_f_tcm_info(module)
    lab.usb_f_tcm["modinfo_tcmu_py"] = _run(["modinfo", "-F", "tcmu_py", str(module)]).strip()
    _wait(lambda: (Path("/sys/class/udc") / UDC).exists(), timeout, f"the UDC {UDC}")


def _modprobe(*modules: str) -> None:
    _run(["modprobe", "-a", *modules])


def _step(lab: FabricLab, fabrics: Iterable[str], step: str, func: Callable[[], None]) -> None:
    """Run one step of bring-up; its error is recorded for each fabric that needs it."""
    needing = [f for f in fabrics if lab.ready(f)]
    if not needing:
        return
    try:
        _timed(lab, step, func)
    except (FabricLabError, OSError) as exc:
        for f in needing:
            lab.errors[f] = f"{step}: {exc}"


def bring_up(fabrics: Iterable[str] = FABRICS, timeout: float = 60.0) -> FabricLab:
    """Bring up the transports of ``fabrics`` (a subset of FABRICS) in this guest; see the
    module docstring. Errors are recorded per fabric in the result, not raised."""
    _require_guest()
    wanted = [f for f in FABRICS if f in set(fabrics)]
    lab = FabricLab()
    _step(lab, [f for f in wanted if f != "usb"], "veth", _veth)
    rdma = [f for f in wanted if f in ("srp", "iser")]
    _step(lab, rdma, "rxe", lambda: _rxe(lab, timeout))
    if "srp" in wanted:
        _step(lab, ["srp"], "srp modules", lambda: _modprobe("ib_srpt", "ib_srp"))
    if "iser" in wanted:
        _step(lab, ["iser"], "iser", _iser_initiator)
    if "fc" in wanted:
        _step(lab, ["fc"], "fcoe", lambda: _fcoe(lab, timeout))
    if "usb" in wanted:
        _step(lab, ["usb"], "usb", lambda: _usb(lab, timeout))
    return lab


# --------------------------------------------------------------------------- initiators


def _scsi_hosts() -> set[str]:
    return {p.name for p in SCSI_HOSTS.glob("host*")}


def _new_host(before: set[str], proc_name: str) -> str | None:
    for host in sorted(_scsi_hosts() - before):
        with contextlib.suppress(OSError):
            if (SCSI_HOSTS / host / "proc_name").read_text().strip() == proc_name:
                return host
    return None


def srp_login(lab: FabricLab, timeout: float) -> str:
    """Log ib_srp in to ib_srpt over RDMA/CM (``dest=<target ip>:<port>``; ioc_guid and id_ext
    are the rxe node GUID, which ib_srpt expects as the target port ID). Returns the new SCSI
    host (``hostN``); its LUNs are scanned by ib_srp."""
    assert lab.node_guid is not None
    before = _scsi_hosts()
    add = Path("/sys/class/infiniband_srp") / f"srp-{RXE}-1" / "add_target"
    _wait(add.exists, timeout, str(add))
    write_bounded(add, f"id_ext={lab.node_guid},ioc_guid={lab.node_guid},"
                       f"dest={lab.target_ip}:{lab.srp_cm_port}", timeout)
    return _wait(lambda: _new_host(before, "ib_srp"), timeout, "the ib_srp SCSI host")


def srp_logout(timeout: float = 30.0) -> None:
    """Remove every SRP remote port (ends the sessions, removes their SCSI hosts)."""
    for port in Path("/sys/class/srp_remote_ports").glob("port-*"):
        write_bounded(port / "delete", "1", timeout)


def _iser_initiator() -> None:
    _modprobe("ib_isert", "ib_iser")
    name = Path("/etc/iscsi/initiatorname.iscsi")
    if not name.exists():  # the guest's /etc is a throw-away overlay
        name.parent.mkdir(parents=True, exist_ok=True)
        name.write_text("InitiatorName=iqn.2025-01.org.tcmu-py:lab-initiator\n")
    if subprocess.run(["pgrep", "-x", "iscsid"], capture_output=True, check=False).returncode:
        _run(["iscsid"])  # forks; its socket is ready when the parent returns


def iser_login(lab: FabricLab, iqn: str, timeout: float) -> str:
    """Log open-iscsi in to ``iqn`` at the target address through its built-in ``iser``
    interface (no discovery: the node record is made by hand). Returns the new SCSI host."""
    before = _scsi_hosts()
    portal = f"{lab.target_ip}:3260"  # the node record names its iface: no discovery
    _run(["iscsiadm", "-m", "node", "-o", "new", "-T", iqn, "-p", portal, "-I", "iser"],
         timeout)
    _run(["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-I", "iser", "--login"], timeout)
    return _wait(lambda: _iscsi_host(iqn, before), timeout, f"the SCSI host of {iqn}")


def _iscsi_host(iqn: str, before: set[str]) -> str | None:
    """The new SCSI host of the open-iscsi session with target ``iqn`` (its sysfs device sits
    under ``.../hostN/sessionM``; ib_iser's hosts say "iSCSI Initiator over iSER")."""
    for session in Path("/sys/class/iscsi_session").glob("session*"):
        with contextlib.suppress(OSError):
            if (session / "targetname").read_text().strip() != iqn:
                continue
            for part in (session / "device").resolve().parts:
                if part.startswith("host") and part not in before:
                    return part
    return None


def iser_logout(iqn: str, timeout: float = 30.0) -> None:
    _run(["iscsiadm", "-m", "node", "-T", iqn, "--logout"], timeout)


def _fc_host(wwpn: str) -> str | None:
    want = "0x" + wwpn.removeprefix("naa.")
    for host in Path("/sys/class/fc_host").glob("host*"):
        with contextlib.suppress(OSError):
            if (host / "port_name").read_text().strip() == want:
                return host.name
    return None


def enable_fc_initiator(lab: FabricLab, timeout: float) -> str:
    """Enable the initiator end's FCoE controller (VN2VN login to the target end, whose
    tcm_fc target must exist by now). Returns the initiator's SCSI host."""
    write_bounded(Path(lab.fcoe_ctlrs[VETH_INITIATOR]) / "enabled", "1", timeout)
    return _wait(lambda: _fc_host(lab.fc_initiator_wwpn), timeout,
                 f"the FC host of {lab.fc_initiator_wwpn}")


def disable_fc_initiator(lab: FabricLab, timeout: float = 30.0) -> None:
    write_bounded(Path(lab.fcoe_ctlrs[VETH_INITIATOR]) / "enabled", "0", timeout)


def usb_host(driver: str, before: set[str], timeout: float) -> str:
    """The SCSI host the USB gadget gets on the host side once bound: one made after ``before``
    (`scsi_hosts`) by ``driver`` (``usb-storage`` for Bulk-Only, ``uas``)."""
    return _wait(lambda: _new_host(before, driver), timeout, f"a {driver} SCSI host")


def scsi_hosts() -> set[str]:
    """The SCSI hosts there are now (``hostN``), to tell a new one later."""
    return _scsi_hosts()


def scan_host(host: str, timeout: float = 30.0) -> None:
    """Rescan every channel, target and LUN of ``host`` (new LUNs on SRP and FC)."""
    write_bounded(SCSI_HOSTS / host / "scan", "- - -", timeout)


def scsi_host_devices(host: str) -> dict[int, dict[str, str]]:
    """LUN -> upper-level device nodes bound to it on ``host`` (keys among block, scsi_tape,
    scsi_generic, scsi_changer; tape: the no-rewind nstN node)."""
    out: dict[int, dict[str, str]] = {}
    number = host.removeprefix("host")
    for sdev in Path("/sys/bus/scsi/devices").glob(f"{number}:*:*:*"):
        found: dict[str, str] = {}
        for kind in ("block", "scsi_tape", "scsi_generic", "scsi_changer"):
            d = sdev / kind
            names = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
            if kind == "scsi_tape":
                names = [n for n in names if n.startswith("nst") and n[3:].isdigit()]
            if names:
                found[kind] = names[0]
        out[int(sdev.name.rsplit(":", 1)[1])] = found
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tcmu_py.lab_fabrics up [FABRIC ...]``: bring the transports up in the lab
    guest and print what was made as JSON (exit 1 if a fabric could not come up)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "up" or any(a not in FABRICS for a in args[1:]):
        print(f"usage: python -m tcmu_py.lab_fabrics up [{' '.join(FABRICS)}]", file=sys.stderr)
        return 2
    try:
        lab = bring_up(args[1:] or FABRICS)
    except FabricLabError as exc:
        print(f"tcmu_py.lab_fabrics: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(lab), indent=2))
    return 1 if lab.errors else 0


if __name__ == "__main__":
    sys.exit(main())
