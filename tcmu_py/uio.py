"""UioDevice: the only code that opens ``/dev/uioN``, maps it, waits on it and kicks it.

Facts this module relies on (drivers/uio/uio.c, drivers/target/target_core_user.c):

- TCMU names its uio device ``tcm-user/<hba>/<device>/<dev_config>``, where
  ``dev_config`` is the ``<subtype>/<cfgstring>`` written to configfs; the cfgstring may
  itself contain ``/`` (``tcm-user/3/n0/raw//tmp/n.img`` is subtype ``raw``, cfgstring
  ``/tmp/n.img``). It appears as ``/sys/class/uio/uioN/name``.
- The shared area is map 0; its size is ``/sys/class/uio/uioN/maps/map0/size`` (hex). It
  must be mapped at offset 0 with exactly that length.
- A uio device can be open in one process at a time: a second ``open`` gets EBUSY.
- ``read`` of 4 bytes returns the event counter and acknowledges the event; with
  O_NONBLOCK it fails with EAGAIN when there is no new event. ``poll`` reports POLLIN
  while an event is unacknowledged.
- ``write`` of 4 bytes calls TCMU's irqcontrol, which reaps completions up to
  ``cmd_tail`` and restarts commands waiting for ring space (the "kick").
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from dataclasses import dataclass
from types import TracebackType

from tcmu_py.errors import TcmuError

__all__ = [
    "SYSFS_UIO",
    "TCMU_UIO_PREFIX",
    "UioDevice",
    "UioError",
    "UioInfo",
    "UioName",
    "find_tcmu_device",
    "list_tcmu_devices",
]

SYSFS_UIO = "/sys/class/uio"
TCMU_UIO_PREFIX = "tcm-user/"
_KICK = (1).to_bytes(4, "little")  # the s32 "irq_on" value; TCMU ignores it
_UIO_DIR = re.compile(r"uio(\d+)$")


class UioError(TcmuError, OSError):
    """Opening, mapping or talking to a uio device failed; the message names the device."""


@dataclass(frozen=True, slots=True)
class UioName:
    """The parts of a TCMU uio name ``tcm-user/<hba>/<device>/<subtype>/<cfgstring>``.

    The kernel names the uio device ``"tcm-user/%u/%s/%s"`` (HBA host id, device name,
    dev_config) or ``"tcm-user/%u/%s"`` when the device was enabled without a dev_config
    (target_core_user.c, tcmu_update_uio_info); ``subtype`` is dev_config's first path element
    and ``cfgstring`` the rest, which may contain '/' (``raw//var/x.img``: ``raw``,
    ``/var/x.img``). Both are "" without a dev_config. This is the one parser of these names
    (the daemon's netlink events use it too).
    """

    hba: int
    device: str
    subtype: str
    cfgstring: str

    @classmethod
    def parse(cls, name: str) -> UioName:
        """Split a uio name; ValueError if it is not a TCMU one."""
        if not name.startswith(TCMU_UIO_PREFIX):
            raise ValueError(f"uio name {name!r} does not start with {TCMU_UIO_PREFIX!r}")
        parts = name[len(TCMU_UIO_PREFIX) :].split("/", 2)
        if len(parts) < 2 or not parts[0].isdigit() or not parts[1]:
            raise ValueError(f"uio name {name!r} is not tcm-user/<hba>/<device>[/<dev_config>]")
        subtype, _, cfgstring = (parts[2] if len(parts) == 3 else "").partition("/")
        return cls(int(parts[0]), parts[1], subtype, cfgstring)

    def build(self) -> str:
        """The uio name the kernel gives this device."""
        return f"{TCMU_UIO_PREFIX}{self.hba}/{self.device}/{self.subtype}/{self.cfgstring}"


@dataclass(frozen=True, slots=True)
class UioInfo:
    """A TCMU uio device found in sysfs (not opened)."""

    uio: str  # "uio0"
    dev_path: str  # "/dev/uio0"
    sysfs_dir: str  # "/sys/class/uio/uio0"
    name: str  # the full uio name
    map_size: int  # bytes of map 0
    parsed: UioName


def _read_sysfs(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\n")


def _map_size(sysfs_dir: str) -> int:
    text = _read_sysfs(os.path.join(sysfs_dir, "maps", "map0", "size"))
    try:
        return int(text, 16)
    except ValueError:
        raise UioError(f"{sysfs_dir}/maps/map0/size holds {text!r}, not a hex size") from None


def list_tcmu_devices(sysfs_root: str = SYSFS_UIO, dev_root: str = "/dev") -> list[UioInfo]:
    """All uio devices whose name starts with ``tcm-user/``, ordered by uio number.

    Devices that disappear while being listed are skipped; other uio devices are ignored.
    """
    try:
        entries = os.listdir(sysfs_root)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        m = _UIO_DIR.match(entry)
        if not m:
            continue
        sysfs_dir = os.path.join(sysfs_root, entry)
        try:
            name = _read_sysfs(os.path.join(sysfs_dir, "name"))
            if not name.startswith(TCMU_UIO_PREFIX):
                continue
            size = _map_size(sysfs_dir)
        except FileNotFoundError:
            continue  # removed meanwhile
        try:
            parsed = UioName.parse(name)
        except ValueError:
            continue
        info = UioInfo(entry, os.path.join(dev_root, entry), sysfs_dir, name, size, parsed)
        found.append((int(m.group(1)), info))
    return [info for _, info in sorted(found, key=lambda t: t[0])]


def find_tcmu_device(
    name: str, sysfs_root: str = SYSFS_UIO, dev_root: str = "/dev"
) -> UioInfo:
    """The TCMU uio device with this full uio name; UioError if there is none."""
    for info in list_tcmu_devices(sysfs_root, dev_root):
        if info.name == name:
            return info
    raise UioError(errno.ENOENT, f"no uio device named {name!r} under {sysfs_root}")


class UioDevice:
    """An open ``/dev/uioN`` of a TCMU device, mapped.

    ``buffer`` is the ``mmap`` of the whole shared area (mailbox, ring, data area); hand it
    to :class:`tcmu_py.ring.Ring`. The fd is non-blocking. Not thread-safe beyond what the
    system calls give: one thread polls, clears and kicks.
    """

    def __init__(self, uio_path: str, sysfs_dir: str | None = None) -> None:
        if sysfs_dir is None:
            sysfs_dir = os.path.join(SYSFS_UIO, os.path.basename(uio_path))
        self.path = uio_path
        self.sysfs_dir = sysfs_dir
        try:
            self.name = _read_sysfs(os.path.join(sysfs_dir, "name"))
            self.size = _map_size(sysfs_dir)
        except UioError:
            raise
        except OSError as e:
            raise UioError(e.errno, f"{uio_path}: cannot read {sysfs_dir}: {e.strerror}") from e
        try:
            self._fd: int | None = os.open(uio_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise UioError(e.errno, self._open_error(e)) from e
        try:
            self.buffer: mmap.mmap | None = mmap.mmap(
                self._fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
            )
        except (OSError, ValueError) as e:
            os.close(self._fd)
            self._fd = None
            raise UioError(
                errno.EINVAL, f"{uio_path} ({self.name}): cannot map {self.size:#x} bytes: {e}"
            ) from e

    @classmethod
    def open(cls, info: UioInfo) -> UioDevice:
        """Open a device found by :func:`list_tcmu_devices`."""
        return cls(info.dev_path, info.sysfs_dir)

    def _open_error(self, e: OSError) -> str:
        if e.errno == errno.EBUSY:
            return (
                f"{self.path} ({self.name}) is busy: another process already has it open "
                "(a running tcmu-runner or another tcmu-py daemon?)"
            )
        if e.errno in (errno.EACCES, errno.EPERM):
            return f"{self.path} ({self.name}): permission denied (run as root?)"
        return f"{self.path} ({self.name}): cannot open: {e.strerror}"

    def fileno(self) -> int:
        """The uio fd, for poll/select: readable while an event is unacknowledged."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def clear_event(self) -> None:
        """Acknowledge the pending event (non-blocking 4-byte read; EAGAIN = none pending)."""
        try:
            os.read(self.fileno(), 4)
        except BlockingIOError:
            pass
        except OSError as e:
            raise UioError(e.errno, f"{self.path}: reading the event counter: {e.strerror}") from e

    def kick(self) -> None:
        """Make the kernel reap completions up to cmd_tail (4-byte write)."""
        try:
            os.write(self.fileno(), _KICK)
        except OSError as e:
            raise UioError(e.errno, f"{self.path}: kick failed: {e.strerror}") from e

    #: Bytes one read of the event counter takes and one kick writes: the native loop
    #: (`tcmu_py.ring.NativeLoop`) clears and kicks on `fileno()` from C.
    event_size = 4
    kick_size = 4

    def kick_fd(self) -> int:
        """The fd a kick is written to (the uio fd itself)."""
        return self.fileno()

    def close(self) -> None:
        """Unmap and close (idempotent).

        Raises UioError (and keeps the device open) while memoryviews of the mapping are
        alive: close the Ring and drop every command first.
        """
        if self.buffer is not None:
            try:
                self.buffer.close()
            except BufferError as e:
                raise UioError(
                    errno.EBUSY,
                    f"{self.path}: views of the mapping are still alive "
                    "(close the Ring and drop in-flight commands first)",
                ) from e
            self.buffer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> UioDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"fd={self._fd}"
        return f"<UioDevice {self.path} {self.name!r} size={self.size:#x} {state}>"
