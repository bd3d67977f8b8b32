"""The VTL's small state files: read safely, replaced atomically, kept private.

Rules this file obeys
---------------------
* Everything the VTL creates is private to the user the daemon runs as: files 0600, directories
  0700, whatever the umask (a cartridge holds backed-up data; raw images are 0600 too). Files are
  created with `os.open(..., FILE_MODE)` (a umask can only narrow that), a reused temporary file is
  `fchmod`-ed, and directories are `chmod`-ed after `mkdir`, so that a umask that strips owner bits
  cannot leave them unusable. Files and directories that already exist keep their mode.
* A state file (``library.json``, ``meta.json``, ``mam.json``) is read whole up to a size limit,
  decoded as strict UTF-8 and parsed as JSON; then the caller checks every key it uses before it
  acts on any of it (`Fields`). Whatever is wrong — too large, not UTF-8, not JSON, nested too
  deep, a number too long, a list where an object belongs, a missing key, a value of the wrong
  type or range — is one `StateFileError` whose one-line message names the file, the key, the
  value and what was expected. Time and memory are bounded by the size limit: the JSON parser
  stops at Python's recursion limit and at `sys.get_int_max_str_digits()` digits.
* Creating a directory is durable: its parent is fsynced after `mkdir`, so a library or a
  cartridge that was created, and then named in library.json, is still there after a power cut.
* Replacing a state file is atomic: the new contents go to a temporary file in the same directory
  (``.<name>.<pid>.<thread>.tmp``), are fsynced, renamed over the file, and the directory is
  fsynced. A crash leaves the old or the new file, never a mix; a leftover temporary file is
  ignored by readers.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from tcmu_py.errors import TcmuError

FILE_MODE = 0o600
DIR_MODE = 0o700

#: Printable ASCII without space (SPC-5 4.3.1 allows 20h..7Eh in ASCII fields; a serial with a
#: space is legal but splits badly in every tool that prints it), as the daemon's YAML requires.
SERIAL_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))
SERIAL_MAX = 64

_MISSING: Any = object()


class StateFileError(TcmuError, ValueError):
    """A VTL state file is malformed. ``str()`` is one line: file, key, value, expectation.

    `key` is the dotted path of the offending value (``drives[0].serial``), or None when the file
    as a whole is wrong (size, encoding, syntax); `value` then describes what was found.
    """

    def __init__(self, path: str | os.PathLike[str], key: str | None, value: Any, expected: str):
        self.path = Path(path)
        self.key = key
        self.value = value
        self.expected = expected
        where = f"{self.path}: {key} = {describe(value)}" if key else f"{self.path}: {value}"
        super().__init__(f"{where}: expected {expected}")


def describe(value: Any, limit: int = 48) -> str:
    """A short, bounded description of a JSON value for an error message (never a full dump)."""
    if value is _MISSING:
        return "(missing)"
    if isinstance(value, dict):
        return f"an object of {len(value)} key(s)"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path: str | os.PathLike[str], *, limit: int) -> Any:
    """The JSON value in `path` (at most `limit` bytes). OSError as raised; StateFileError for
    anything wrong with the contents."""
    p = Path(path)
    with open(p, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise StateFileError(p, None, f"larger than {limit} bytes", f"at most {limit} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 4]
        raise StateFileError(
            p, None, f"byte(s) {bad!r} at offset {exc.start} are not UTF-8", "UTF-8 JSON text"
        ) from None
    try:
        return json.loads(text)
    except RecursionError:
        raise StateFileError(p, None, "JSON nested too deeply", "a shallow JSON document") from None
    except ValueError as exc:  # JSONDecodeError, or an integer longer than the digit limit
        msg = " ".join(str(exc).split())[:120]
        raise StateFileError(p, None, f"not JSON ({msg})", "a JSON document") from None


def write_json_atomically(path: str | os.PathLike[str], doc: Any) -> None:
    """Replace `path` with `doc` as JSON (see the module rules: atomic, durable, mode 0600)."""
    p = Path(path)
    data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE
        )
        try:
            os.fchmod(fd, FILE_MODE)  # a leftover temporary file may have had another mode
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)  # the new contents are on disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(p.parent)  # the rename itself is durable


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(
    path: str | os.PathLike[str], *, parents: bool = False, exist_ok: bool = False
) -> None:
    """`mkdir` with mode 0700 for `path` and (with `parents`) each missing parent it creates;
    each new directory's entry is made durable (its parent fsynced) before this returns."""
    p = Path(path)
    if parents and not p.parent.exists():
        make_dir(p.parent, parents=True, exist_ok=True)
    try:
        os.mkdir(p, DIR_MODE)
    except FileExistsError:
        if not exist_ok or not p.is_dir():
            raise
        return
    os.chmod(p, DIR_MODE)
    fsync_dir(p.parent)


def check_serial(value: Any) -> str | None:
    """Why `value` is not a unit serial the drive can report (None if it is one)."""
    if not isinstance(value, str) or not 1 <= len(value) <= SERIAL_MAX:
        return f"a string of 1..{SERIAL_MAX} characters"
    if not SERIAL_CHARS.issuperset(value):
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
            self.fail_at(path, where or "(top level)", value, "a JSON object")
        self.path = path
        self.doc: dict[str, Any] = value
        self.where = where

    @staticmethod
    def fail_at(path: Path, key: str, value: Any, expected: str) -> NoReturn:
        raise StateFileError(path, key, value, expected)

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, value: Any, expected: str) -> NoReturn:
        raise StateFileError(self.path, self.key(name), value, expected)

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
