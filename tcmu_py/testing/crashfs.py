"""Crash points for on-disk formats: record every write, cut after any of them, see what survives.

`CrashFS` wraps the `os` calls that change files (open with O_CREAT/O_TRUNC, write, pwrite,
pwritev, ftruncate, truncate, fsync, fdatasync, replace/rename, unlink, mkdir) while it is
installed, passes them through to the real files under one directory, and mirrors them in a model
that knows, for every file and directory, what is durable and what is only in the page cache.
After every such call (a *crash point*) it calls back with the point; `states()` then gives the
file trees a crash at that instant may leave, and the caller opens each with the real code and
checks its invariants.

The durability model (what POSIX promises, and no more)
--------------------------------------------------------
* File contents and size become durable at fsync/fdatasync of that file.
* A directory entry (create, rename, unlink, mkdir) becomes durable at fsync of its directory.
* Until then a power cut may keep any of it or none; writeback may reorder and tear writes.

The states of one crash point, deduplicated (`STATE_KINDS`):

=================  =====================  =====================================================
kind               directory entries      file contents
=================  =====================  =====================================================
process            as now                 as now (a crash of the process: the cache survives)
synced             durable                durable
journaled          as now                 durable (metadata committed, data not)
renames-lost       durable                as now
torn-last          as now                 durable + the unsynced writes, the last one torn
hole-first         as now                 durable + the unsynced writes but the first one
=================  =====================  =====================================================

fsync and fdatasync are not passed to the disk (the model holds durability; the tests stay
fast). Writes that do not go through `os` (a file object's buffered writes) are found at the
next fsync, fdatasync, close or rename of the file, by reading it back, and recorded then as one
write. Single-threaded: install it around a workload that does its I/O on one thread. Paths are
compared as given after `os.path.abspath`; everything under `root` is modelled (its contents at
install count as durable), anything else passes through unrecorded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_KINDS = ("process", "synced", "journaled", "renames-lost", "torn-last", "hole-first")

#: A file tree: relative path -> file contents, or None for a directory.
Tree = dict[str, bytes | None]

_Op = tuple[int, bytes] | int  # (offset, data) written, or a new length


@dataclass
class _File:
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""
    pending: list[_Op] = field(default_factory=list)  # since the last sync, in order
    ino: int = -1  # the real file's inode: an fd number reused for another file is not it


@dataclass
class _Dir:
    entries: dict[str, _File | _Dir] = field(default_factory=dict)
    durable: dict[str, _File | _Dir] = field(default_factory=dict)


def _apply(buf: bytearray, op: _Op) -> None:
    if isinstance(op, int):
        del buf[op:]
        buf.extend(bytes(op - len(buf)))
        return
    offset, data = op
    if len(buf) < offset:
        buf.extend(bytes(offset - len(buf)))
    buf[offset : offset + len(data)] = data


class CrashFS:
    """See the module doc. `on_point(self)` runs after every recorded change (point `points`)."""

    def __init__(self, root: str | os.PathLike[str], on_point: Callable[[CrashFS], None]) -> None:
        self.root = os.path.abspath(root)
        self.on_point = on_point
        self.points = 0
        self.last_op = ""
        self._top = _Dir()
        self._fds: dict[int, _File | _Dir] = {}
        self._saved: dict[str, Any] = {}
        self._busy = False  # inside on_point: pass everything through unrecorded
        self._scan(Path(self.root), self._top)

    # ------------------------------------------------------------------------------------------
    # Installing

    def __enter__(self) -> CrashFS:
        for name in ("open", "close", "write", "pwrite", "pwritev", "ftruncate", "truncate",
                     "fsync", "fdatasync", "replace", "rename", "unlink", "remove", "mkdir"):
            self._saved[name] = getattr(os, name)
            setattr(os, name, getattr(self, "_" + name))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(os, name, fn)
        self._saved.clear()

    def _scan(self, path: Path, node: _Dir) -> None:
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                sub = _Dir()
                self._scan(child, sub)
                node.entries[child.name] = node.durable[child.name] = sub
            elif child.is_file():
                data = child.read_bytes()
                node.entries[child.name] = node.durable[child.name] = _File(
                    bytearray(data), data, [], child.stat().st_ino
                )

    # ------------------------------------------------------------------------------------------
    # The model

    def _split(self, path: Any) -> tuple[_Dir, str] | None:
        """(parent directory node, name) of a path under root; None outside it or unknown."""
        if isinstance(path, int) or self._busy:
            return None
        p = os.path.abspath(os.fsdecode(os.fspath(path)))
        if p == self.root or not p.startswith(self.root + os.sep):
            return None
        *parents, name = os.path.relpath(p, self.root).split(os.sep)
        node: _File | _Dir = self._top
        for part in parents:
            if not isinstance(node, _Dir) or part not in node.entries:
                return None
            node = node.entries[part]
        return (node, name) if isinstance(node, _Dir) else None

    def _node(self, path: Any) -> _File | _Dir | None:
        if not self._busy and os.path.abspath(os.fsdecode(os.fspath(path))) == self.root:
            return self._top
        where = self._split(path)
        return where[0].entries.get(where[1]) if where else None

    def _point(self, what: str) -> None:
        self.points += 1
        self.last_op = what
        self._busy = True
        try:
            self.on_point(self)
        finally:
            self._busy = False

    def _record(self, node: _File, op: _Op) -> None:
        _apply(node.data, op)
        node.pending.append(op)

    # ------------------------------------------------------------------------------------------
    # The wrapped calls

    def _open(self, path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        where = None if kw else self._split(path)
        existed = where is not None and where[1] in where[0].entries
        fd = int(self._saved["open"](path, flags, mode, **kw))
        self._fds.pop(fd, None)  # the number may have been another file's, closed without os
        node = self._node(path) if not kw else None
        if where is not None and not existed and flags & os.O_CREAT:
            node = where[0].entries[where[1]] = _File(ino=os.fstat(fd).st_ino)
            self._fds[fd] = node
            self._point(f"create {path}")
            return fd
        if node is not None:
            self._fds[fd] = node
            if isinstance(node, _File):
                node.ino = os.fstat(fd).st_ino
            if isinstance(node, _File) and flags & os.O_TRUNC and node.data:
                self._record(node, 0)
                self._point(f"truncate-open {path}")
        return fd

    def _close(self, fd: int) -> None:
        node = self._file(fd)
        if node is not None:
            self._catch_up(node, fd)
        self._fds.pop(fd, None)
        self._saved["close"](fd)

    def _file(self, fd: int) -> _File | None:
        """The modelled file open as `fd` (None if it is none, or the number was reused)."""
        node = self._fds.get(fd)
        if not isinstance(node, _File) or self._busy:
            return None
        try:
            if os.fstat(fd).st_ino == node.ino:
                return node
        except OSError:
            pass
        self._fds.pop(fd, None)
        return None

    def _catch_up(self, node: _File, fd: int | None = None, path: Any = None) -> None:
        """Record as one write whatever reached the file without passing through `os`."""
        where = f"/proc/self/fd/{fd}" if fd is not None else path
        with open(where, "rb") as f:
            real = f.read()
        if real != node.data:
            self._record(node, (0, real))
            if len(node.data) != len(real):
                self._record(node, len(real))
            self._point(f"buffered write of {len(real)} bytes")

    def _written(self, fd: int, offset: int | None, data: bytes, what: str) -> None:
        node = self._file(fd)
        if node is not None:
            at = offset if offset is not None else self._saved_tell(fd) - len(data)
            self._record(node, (at, data))
            self._point(f"{what} {len(data)} bytes at {at}")

    def _saved_tell(self, fd: int) -> int:
        return int(os.lseek(fd, 0, os.SEEK_CUR))

    def _write(self, fd: int, data: Any) -> int:
        n = int(self._saved["write"](fd, data))
        self._written(fd, None, bytes(memoryview(data)[:n]), "write")
        return n

    def _pwrite(self, fd: int, data: Any, offset: int) -> int:
        n = int(self._saved["pwrite"](fd, data, offset))
        self._written(fd, offset, bytes(memoryview(data)[:n]), "pwrite")
        return n

    def _pwritev(self, fd: int, buffers: Any, offset: int, *flags: int) -> int:
        buffers = list(buffers)
        n = int(self._saved["pwritev"](fd, buffers, offset, *flags))
        self._written(fd, offset, b"".join(bytes(b) for b in buffers)[:n], "pwritev")
        return n

    def _ftruncate(self, fd: int, length: int) -> None:
        self._saved["ftruncate"](fd, length)
        node = self._file(fd)
        if node is not None:
            self._record(node, length)
            self._point(f"ftruncate {length}")

    def _truncate(self, path: Any, length: int) -> None:
        if isinstance(path, int):
            self._ftruncate(path, length)
            return
        self._saved["truncate"](path, length)
        node = self._node(path)
        if isinstance(node, _File):
            self._record(node, length)
            self._point(f"truncate {path} {length}")

    def _sync(self, fd: int, what: str) -> None:
        node: _File | _Dir | None = self._file(fd) or self._fds.get(fd)
        if self._busy or node is None:
            return  # not passed to the disk (see the module doc)
        if isinstance(node, _File):
            self._catch_up(node, fd)
            node.durable = bytes(node.data)
            node.pending.clear()
        else:
            node.durable = dict(node.entries)
        self._point(what)

    def _fsync(self, fd: int) -> None:
        self._sync(fd, "fsync")

    def _fdatasync(self, fd: int) -> None:
        self._sync(fd, "fdatasync")

    def _replace(self, src: Any, dst: Any, **kw: Any) -> None:
        self._saved["replace"](src, dst, **kw)
        a, b = (None, None) if kw else (self._split(src), self._split(dst))
        if a is not None and b is not None and a[1] in a[0].entries:
            node = b[0].entries[b[1]] = a[0].entries.pop(a[1])
            if isinstance(node, _File):
                self._catch_up(node, path=dst)
            self._point(f"rename {os.path.basename(os.fspath(src))} -> {os.fspath(dst)}")

    def _rename(self, src: Any, dst: Any, **kw: Any) -> None:
        self._replace(src, dst, **kw)

    def _unlink(self, path: Any, **kw: Any) -> None:
        self._saved["unlink"](path, **kw)
        where = None if kw else self._split(path)
        if where is not None and where[0].entries.pop(where[1], None) is not None:
            self._point(f"unlink {path}")

    def _remove(self, path: Any, **kw: Any) -> None:
        self._unlink(path, **kw)

    def _mkdir(self, path: Any, mode: int = 0o777, **kw: Any) -> None:
        self._saved["mkdir"](path, mode, **kw)
        where = None if kw else self._split(path)
        if where is not None:
            where[0].entries[where[1]] = _Dir()
            self._point(f"mkdir {path}")

    # ------------------------------------------------------------------------------------------
    # The states a crash now may leave

    def tree(self, kind: str) -> Tree:
        """The tree a crash of `kind` (one of `STATE_KINDS`) would leave now."""
        if kind not in STATE_KINDS:
            raise ValueError(f"crash state kind {kind!r}: expected one of {STATE_KINDS}")
        tree: Tree = {}
        self._walk(self._top, "", kind, tree)
        return tree

    def states(self) -> Iterator[tuple[str, Tree]]:
        """(kind, tree) for each kind of `STATE_KINDS`, skipping trees already given."""
        seen: set[bytes] = set()
        for kind in STATE_KINDS:
            tree = self.tree(kind)
            key = tree_digest(tree)
            if key not in seen:
                seen.add(key)
                yield kind, tree

    def _walk(self, node: _Dir, prefix: str, kind: str, out: Tree) -> None:
        entries = node.durable if kind in ("synced", "renames-lost") else node.entries
        for name, child in entries.items():
            path = prefix + name
            if isinstance(child, _Dir):
                out[path] = None
                self._walk(child, path + "/", kind, out)
            else:
                out[path] = _contents(child, kind)


def _contents(f: _File, kind: str) -> bytes:
    if kind in ("process", "renames-lost"):
        return bytes(f.data)
    if kind in ("synced", "journaled") or not f.pending:
        return f.durable
    buf = bytearray(f.durable)
    ops = f.pending
    if kind == "torn-last":
        for op in ops[:-1]:
            _apply(buf, op)
        last = ops[-1]
        if not isinstance(last, int):  # a truncate is all or nothing; a write may tear
            _apply(buf, (last[0], last[1][: len(last[1]) // 2]))
    else:  # hole-first: writeback reordered, the first unsynced write never reached the disk
        for op in ops[1:]:
            _apply(buf, op)
    return bytes(buf)


def tree_digest(tree: Tree) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(tree):
        data = tree[path]
        h.update(path.encode() + (b"/" if data is None else b":" + hashlib.md5(data).digest()))
    return h.digest()


def materialize(tree: Tree, dest: str | os.PathLike[str]) -> Path:
    """Write `tree` under `dest` (emptied first); returns `dest` as a Path."""
    d = Path(dest)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for path in sorted(tree):
        data = tree[path]
        if data is None:
            (d / path).mkdir(parents=True, exist_ok=True)
        else:
            (d / path).parent.mkdir(parents=True, exist_ok=True)
            (d / path).write_bytes(data)
    return d
