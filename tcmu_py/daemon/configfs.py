"""Read and act on one TCMU device's configfs directory.

`/sys/kernel/config/target/core/user_<hba>/<dev>/`:
- `attrib/dev_size`, `attrib/hw_block_size`, `attrib/hw_max_sectors`, `attrib/emulate_write_cache`,
  `attrib/dev_config`, `attrib/cmd_time_out`, `attrib/max_data_area_mb` (read by the daemon);
- `wwn/vpd_unit_serial` ("T10 VPD Unit Serial Number: <serial>");
- `action/block_dev` (1 = the kernel stops queueing commands to the ring, 0 = resume) and
  `action/reset_ring` (1 = in-flight commands fail with BUSY so initiators retry, and the ring is
  emptied: head = tail = 0).

Only the daemon layer uses this module.
"""

from __future__ import annotations

from pathlib import Path

from tcmu_py.errors import TcmuError

CONFIGFS_CORE = Path("/sys/kernel/config/target/core")


class TcmuConfigfs:
    """The configfs directory of one TCMU device."""

    def __init__(self, hba: int | str, dev: str, root: Path = CONFIGFS_CORE) -> None:
        self.path = Path(root) / f"user_{hba}" / dev

    def _read(self, rel: str) -> str:
        try:
            return (self.path / rel).read_text().strip()
        except OSError as exc:
            raise TcmuError(f"{self.path / rel}: cannot read: {exc.strerror}") from exc

    def _write(self, rel: str, value: str) -> None:
        try:
            (self.path / rel).write_text(value)
        except OSError as exc:
            raise TcmuError(f"{self.path / rel}: cannot write {value!r}: {exc.strerror}") from exc

    @property
    def enabled(self) -> bool:
        """configfs ``enable``: true once the kernel configured the device (``enable`` written
        and, when replies are on, its ADDED_DEVICE answered). TcmuError if the device is gone."""
        return self._read("enable").strip() == "1"

    def attr_int(self, name: str, default: int | None = None) -> int:
        try:
            return int(self._read(f"attrib/{name}"), 0)
        except (TcmuError, ValueError):
            if default is None:
                raise
            return default

    @property
    def size(self) -> int:
        return self.attr_int("dev_size")

    @property
    def block_size(self) -> int:
        return self.attr_int("hw_block_size", 512)

    @property
    def hw_max_sectors(self) -> int:
        return self.attr_int("hw_max_sectors", 128)

    @property
    def cmd_time_out(self) -> int:
        """Seconds the kernel gives a command before it fails it (0: no limit)."""
        return self.attr_int("cmd_time_out", 30)

    @property
    def write_cache(self) -> bool:
        return bool(self.attr_int("emulate_write_cache", 0))

    @property
    def serial(self) -> str | None:
        try:
            text = self._read("wwn/vpd_unit_serial")
        except TcmuError:
            return None
        _, _, serial = text.partition(":")
        return serial.strip() or None

    def block(self) -> None:
        self._write("action/block_dev", "1")

    def unblock(self) -> None:
        self._write("action/block_dev", "0")

    def reset_ring(self, mode: int = 1) -> None:
        """1: in-flight commands complete with BUSY (initiators retry); 2: CHECK CONDITION."""
        self._write("action/reset_ring", str(mode))
