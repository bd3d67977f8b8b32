"""JSON state files tcmu-py writes and reads back (a thin pool's pool.json, the LIO state file).

Rules this module obeys:

- Writing is atomic and durable: a temporary file in the same directory (created 0600, never
  following a link, named ``.<file>.<random>.tmp``), written, fsync'd, renamed over the file,
  then the directory fsync'd. A crash leaves the old file or the new one, never a mix, and
  perhaps a temporary file, which `remove_stale_temporaries` deletes.
- Reading trusts nothing: at most `MAX_STATE_BYTES` are read; bytes that are not UTF-8, text
  that is not JSON, a key given twice in one object, NaN/Infinity, nesting deep enough to
  exhaust the parser and integers too long to convert are each one `StateFileError` naming the
  file and what was expected, never a raw UnicodeDecodeError / RecursionError / ValueError.
- Directories tcmu-py creates for its state are 0700 whatever the umask, parents included
  (`make_private_dirs`); existing directories are left as they are. Creating one is durable:
  its parent is fsync'd, so what is created inside it and named elsewhere (a cartridge in
  library.json) cannot vanish in a power cut.
- `invalid` builds the message for a value of the right syntax but the wrong meaning, in the
  configuration's form: ``<file>: <key>: got <value>, expected <what>``; values are quoted cut
  short so the message stays one line.
"""

from __future__ import annotations

import json
import os
import reprlib
import tempfile
from pathlib import Path
from typing import Any

from tcmu_py.errors import StateFileError

__all__ = ["MAX_STATE_BYTES", "invalid", "make_private_dirs", "read_json",
           "remove_stale_temporaries", "short_repr", "write_atomically", "write_json"]

#: Largest state file read, in bytes (a pool of thousands of disks is well under 1 MiB).
MAX_STATE_BYTES = 1 << 20

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = 6
_REPR.maxlevel = 2


def short_repr(value: object) -> str:
    """repr() of `value`, cut short (nested and long values are elided with ``...``)."""
    text = _REPR.repr(value)
    return text if len(text) <= 160 else text[:160] + "..."


def invalid(file: str | os.PathLike[str], key: str, value: object,
            expected: str) -> StateFileError:
    """The error for `key` holding `value` where `expected` was."""
    return StateFileError(f"{file}: {key}: got {short_repr(value)}, expected {expected}")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {short_repr(key)}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} (not a JSON number)")


def read_json(path: str | os.PathLike[str], expected: str, *,
              limit: int = MAX_STATE_BYTES) -> Any:
    """The JSON document in `path` (at most `limit` bytes). `expected` describes the file for
    messages ("a thin pool file"). FileNotFoundError passes through (callers decide what a
    missing file means); any other problem is a StateFileError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read ({exc.strerror}); expected {expected}"
                             " readable by this user") from None
    if len(data) > limit:
        raise StateFileError(f"{path}: got a file larger than {limit} bytes, expected"
                             f" {expected} of at most that size")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateFileError(f"{path}: got bytes that are not UTF-8 at offset {exc.start}"
                             f" ({data[exc.start:exc.start + 4]!r}), expected {expected} in"
                             " UTF-8 JSON") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_object, parse_constant=_no_constant)
    except RecursionError:
        raise StateFileError(f"{path}: got JSON nested too deeply to read, expected {expected}"
                             " (a few levels of objects and lists)") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, NaN, over-long integers
        raise StateFileError(f"{path}: got invalid JSON ({exc}), expected {expected}") from None


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data`, atomically and durably (see the module rules): a temporary
    file with a unique name next to it (mode 0600, never following a link), every byte written
    (os.write may write less than asked), fsync'd, renamed over `path`, the directory fsync'd.
    The one durable file write of the project (thin pools, the LIO state, the tape library and
    cartridges). Raises OSError; then `path` is untouched and no temporary file is left."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)  # the new contents are on disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(
    path: str | os.PathLike[str], doc: Any, *, indent: int | None = 1, sort_keys: bool = False
) -> None:
    """Replace `path` with `doc` as JSON (and a final newline) with `write_atomically`; the file
    is mode 0600. Raises OSError (then `path` is untouched and no temporary file is left) or
    TypeError/ValueError for a `doc` JSON cannot hold (before anything is written)."""
    text = json.dumps(doc, indent=indent, sort_keys=sort_keys) + "\n"
    write_atomically(path, text.encode("utf-8"))


def make_private_dirs(path: str | os.PathLike[str]) -> None:
    """Create directory `path` and any missing parent, each mode 0700 (`os.makedirs` would
    give the parents the umask's mode, 0755 under umask 022)."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory `path` durable (a file created, renamed or removed)."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[str]:
    """Delete the temporary files a crashed `write_json` of `path` left; returns their names.
    Call it only while no other writer of `path` can be writing (under the file's lock)."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed
