"""Checked access to the VTL's JSON state files: library.json, a cartridge's meta.json and mam.json.

Reading, writing and creating directories are `tcmu_py.statefile`'s: bounded strict reads
(size, UTF-8, JSON syntax, nesting, duplicate keys, over-long numbers), atomic and durable
writes of 0600 files, durable 0700 directories. On top of that the VTL checks every key it uses
before it acts on any of it (`Fields`); whatever is wrong is one `StateFileError` (a ConfigError:
the command line exits 2) whose one-line message names the file, the key, the value and what was
expected, in the form of `tcmu_py.statefile.invalid`:
``<file>: <key>: got <value>, expected <what>``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from tcmu_py.errors import StateFileError
from tcmu_py.statefile import invalid

__all__ = ["FILE_MODE", "SERIAL_MAX", "Fields", "StateFileError", "check_serial"]

#: Mode of every file the VTL creates (tcmu_py.statefile writes its state files 0600 too).
FILE_MODE = 0o600

#: Drive serials: printable ASCII without space (SPC-5 4.3.1 allows 20h..7Eh in ASCII fields; a
#: serial with a space is legal but splits badly in every tool that prints it), 1..64 characters,
#: as the daemon's YAML requires of unit serials.
SERIAL_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))
SERIAL_MAX = 64

_MISSING: Any = type("Missing", (), {"__repr__": lambda self: "(missing)"})()


def check_serial(value: object) -> str | None:
    """Why `value` is not a unit serial a drive can report (None if it is one)."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= SERIAL_MAX
        or not SERIAL_CHARS.issuperset(value)
    ):
        # SPC-5 4.3.1: ASCII fields (VPD 80h, the T10 vendor ID designator, DVCID) hold
        # 20h..7Eh only.
        return f"1..{SERIAL_MAX} printable ASCII characters (21h..7Eh, no spaces)"
    return None


class Fields:
    """Checked access to one JSON object of a state file; every failure is a StateFileError.

    `where` is the dotted path of the object inside the file ("" for the top level).
    """

    def __init__(self, path: Path, value: Any, where: str = "") -> None:
        if not isinstance(value, dict):
            raise invalid(path, where or "(top level)", value, "a JSON object")
        self.path = path
        self.doc: dict[str, Any] = value
        self.where = where

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, value: Any, expected: str) -> NoReturn:
        raise invalid(self.path, self.key(name), value, expected)

    def get(self, name: str, default: Any = _MISSING) -> Any:
        value = self.doc.get(name, default)
        if value is _MISSING:
            self.fail(name, value, "a value (the key is required)")
        return value

    def integer(self, name: str, lo: int, hi: int, default: Any = _MISSING) -> int:
        value = self.get(name, default)
        # bool is an int in Python, not in JSON.
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            self.fail(name, value, f"an integer {lo}..{hi}")
        return value

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            self.fail(name, value, "true or false")
        return value

    def string(
        self,
        name: str,
        check: Callable[[str], bool] = lambda s: True,
        expected: str = "a string",
        default: Any = _MISSING,
    ) -> str:
        value = self.get(name, default)
        if not isinstance(value, str) or not check(value):
            self.fail(name, value, expected)
        return value

    def array(self, name: str, default: Any = _MISSING) -> list[Any]:
        value = self.get(name, default)
        if not isinstance(value, list):
            self.fail(name, value, "a list")
        return value

    def mapping(self, name: str, default: Any = _MISSING) -> Fields:
        return Fields(self.path, self.get(name, default), self.key(name))
