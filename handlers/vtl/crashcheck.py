"""Crash points of the VTL's on-disk formats: a random library workload, cut after every write.

`CrashRun` drives a library (create, cartridges created and placed, moves, import/export lock)
and one loaded cartridge at a time (appends of blocks and filemarks, sync, overwrite by
truncation, cartridge memory attributes, write protect, load counts, close) under
`tcmu_py.testing.crashfs.CrashFS`. Before each operation it states, from its own model, what the
library and every cartridge hold before and after it; at every crash point it opens each state a
crash may leave with the real code and checks:

* library.json opens, and its inventory (element contents, import/export lock) is the one before
  or the one after the operation in progress: never a mix, never unreadable (once created);
* every cartridge opens as a drive opens it (writable, recovering); its records are a prefix of
  the records before or after the operation, holding at least every record made durable (sync,
  close, overwrite) before it — nothing acknowledged is lost and no discarded record comes back;
  its write-protect tab and cartridge memory are the old or the new ones;
* the end of data is well formed: the recovered cartridge takes one more record and reopens with
  exactly the recovered records and that one.

Used by tests/unit/test_crash_points.py (one fixed seed, CI) and benchmarks/crash_points.py (many
seeds and operations). Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from tcmu_py.handlers.vtl.cartridge import Cartridge, RecordType
from tcmu_py.handlers.vtl.library import Library
from tcmu_py.scsi.smc import ElementType
from tcmu_py.testing.crashfs import CrashFS, Tree, materialize, tree_digest

_PROBE = b"crash-point probe record"
_HOLDERS = (ElementType.STORAGE, ElementType.IMPORT_EXPORT, ElementType.DATA_TRANSFER)

Record = tuple[int, bytes]


Plan = tuple["World", Callable[[], object]]


@dataclass(frozen=True)
class CartModel:
    """What a cartridge holds: its records, how many are durable, its tab and its MAM."""

    records: tuple[Record, ...] = ()
    floor: int = 0
    write_protected: bool = False
    mam: str = json.dumps(
        {"attributes": {}, "load_count": 0, "mb_read": 0, "mb_written": 0}, sort_keys=True
    )


@dataclass(frozen=True)
class World:
    library: tuple[tuple[tuple[int, str], ...], bool] | None = None  # (contents, ie_prevent)
    carts: tuple[tuple[str, CartModel], ...] = ()

    def cart(self, barcode: str) -> CartModel | None:
        return dict(self.carts).get(barcode)

    def with_cart(self, barcode: str, model: CartModel) -> World:
        carts = dict(self.carts)
        carts[barcode] = model
        return replace(self, carts=tuple(sorted(carts.items())))


@dataclass
class Report:
    seed: int
    operations: int = 0
    crash_points: int = 0
    states_checked: int = 0
    failure_count: int = 0
    failures: list[str] = field(default_factory=list)  # the first `max_failures`, described


class CrashRun:
    """One workload of `operations` random operations from `seed`, in `workdir` (see the module
    doc). `run()` returns the Report."""

    def __init__(
        self, workdir: Path, seed: int, operations: int, *, cartridges: int = 3,
        max_payload: int = 3000, max_failures: int = 20,
    ) -> None:
        self.live = workdir / "live"
        self.scratch = workdir / "check"
        self.live.mkdir(parents=True)
        self.rng = random.Random(seed)
        self.operations = operations
        self.barcodes = [f"CRS{i:03d}L8" for i in range(cartridges)]
        self.max_payload = max_payload
        self.max_failures = max_failures
        self.report = Report(seed)
        self.world = World()
        self.pre = self.post = self.world
        self.step = ""
        self.lib: Library | None = None
        self.cart: Cartridge | None = None
        self.loaded: str | None = None
        self._checked: set[tuple[bytes, int]] = set()
        self._verdicts: dict[tuple[object, ...], str | None] = {}
        self._step_no = 0

    # ------------------------------------------------------------------------------------------
    # Driving

    def run(self) -> Report:
        with CrashFS(self.live, self._on_point) as fs:
            self._do("create library", self._create_library)
            for barcode in self.barcodes:
                self._do(f"create {barcode}", partial(self._create_cartridge, barcode))
                self._do(f"place {barcode}", partial(self._place, barcode))
            while self.report.operations < self.operations:
                self._random_operation()
            if self.cart is not None:
                self._do("close", self._close)
            self._check_now(fs)  # the final state, with nothing in progress
            self.report.crash_points = fs.points
        if self.lib is not None:
            self.lib.close()
        return self.report

    def _do(self, name: str, plan: Callable[[], Plan]) -> None:
        """`plan()` gives the world after the operation (from the model, before any I/O: the
        checks during the operation need it) and the I/O; run it, then move on to that world."""
        self._step_no += 1
        self.report.operations += 1
        self.step = name
        self.pre = self.world
        self.post, io = plan()
        io()
        self.world = self.pre = self.post

    def _random_operation(self) -> None:
        rng = self.rng
        if self.cart is None:
            choice = rng.choice(["load", "load", "move", "move", "prevent"])
        else:
            choice = rng.choice(["append", "append", "append", "append", "sync", "truncate",
                                 "mam", "protect", "move", "close"])
        if choice == "load":
            barcode = rng.choice(self.barcodes)
            self._do(f"load {barcode}", lambda: self._load(barcode))
        elif choice == "move":
            self._maybe_move()
        elif choice == "prevent":
            self._do("prevent", self._prevent)
        elif choice == "append":
            n = rng.randint(1, 4)
            kinds = [RecordType.FILEMARK if rng.random() < 0.25 else RecordType.DATA
                     for _ in range(n)]
            self._do(f"append {n}", lambda: self._append(kinds))
        elif choice == "sync":
            self._do("sync", self._sync)
        elif choice == "truncate":
            model = self._model()
            obj = rng.randint(0, len(model.records))
            self._do(f"truncate {obj}", lambda: self._truncate(obj))
        elif choice == "mam":
            ident = rng.choice([0x0800, 0x0801, 0x0803, 0x0806])
            value = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 24)))
            self._do(f"mam {ident:04X}", lambda: self._mam(ident, value))
        elif choice == "protect":
            self._do("write protect", self._protect)
        else:
            self._do("close", self._close)

    # ------------------------------------------------------------------------------------------
    # Operations: each computes the next world, then does the I/O

    def _create_library(self) -> Plan:
        def io() -> None:
            self.lib = Library.create(self.live / "lib", name="CRASH",
                                      drives=[("CRASHDRV1", "IBM-LTO8")], slots=4,
                                      import_export=1)
        return replace(self.world, library=((), False)), io

    def _create_cartridge(self, barcode: str) -> Plan:
        assert self.lib is not None
        path = self.lib.media_path(barcode)
        return self.world.with_cart(barcode, CartModel()), lambda: Cartridge.create(
            path, barcode, capacity=64 << 20
        )

    def _place(self, barcode: str) -> Plan:
        assert self.lib is not None and self.world.library is not None
        free = [a for a in self.lib.addresses(ElementType.STORAGE)
                if a not in dict(self.world.library[0])]
        contents = dict(self.world.library[0])
        contents[free[0]] = barcode
        post = replace(self.world, library=(tuple(sorted(contents.items())),
                                            self.world.library[1]))
        lib = self.lib
        return post, lambda: lib.place(barcode, free[0])

    def _maybe_move(self) -> None:
        assert self.lib is not None and self.world.library is not None
        contents = dict(self.world.library[0])
        holders = [a for t in _HOLDERS for a in self.lib.addresses(t)]
        full = [a for a in holders if a in contents]
        empty = [a for a in holders if a not in contents]
        if not full or not empty:
            return
        src, dst = self.rng.choice(full), self.rng.choice(empty)
        contents[dst] = contents.pop(src)
        post = replace(self.world, library=(tuple(sorted(contents.items())),
                                            self.world.library[1]))

        lib = self.lib
        self._do(f"move {src:#x}->{dst:#x}", lambda: (post, lambda: lib.move(src, dst)))

    def _prevent(self) -> Plan:
        assert self.lib is not None and self.world.library is not None
        flag = not self.world.library[1]
        lib = self.lib
        return replace(self.world, library=(self.world.library[0], flag)), lambda: (
            lib.set_ie_prevent(flag)
        )

    def _model(self) -> CartModel:
        assert self.loaded is not None
        model = self.world.cart(self.loaded)
        assert model is not None
        return model

    def _load(self, barcode: str) -> Plan:
        model = self.world.cart(barcode)
        assert model is not None and self.lib is not None
        mam = json.loads(model.mam)
        mam["load_count"] += 1
        path = self.lib.media_path(barcode)

        def io() -> None:
            self.cart = Cartridge.open(path)
            self.loaded = barcode
            self.cart.record_load()
        post = replace(model, mam=json.dumps(mam, sort_keys=True))
        return self.world.with_cart(barcode, post), io

    def _payload(self) -> bytes:
        n = self.rng.randint(0, self.max_payload)
        if self.rng.random() < 0.5:  # compressible
            return bytes([self.rng.getrandbits(8)]) * n
        return self.rng.randbytes(n)

    def _append(self, kinds: list[RecordType]) -> Plan:
        assert self.cart is not None and self.loaded is not None
        model = self._model()
        records = list(model.records)
        compress = self.rng.random() < 0.3
        batches: list[tuple[RecordType, list[list[bytes]]]] = []
        for kind in kinds:
            payload = b"" if kind == RecordType.FILEMARK else self._payload()
            records.append((int(kind), payload))
            parts: list[bytes] = [] if kind == RecordType.FILEMARK else [payload]
            if batches and batches[-1][0] == kind:
                batches[-1][1].append(parts)
            else:
                batches.append((kind, [parts]))
        cart = self.cart

        def io() -> None:
            for kind, payloads in batches:
                cart.append(kind, payloads, compress=compress)
        return self.world.with_cart(self.loaded, replace(model, records=tuple(records))), io

    def _sync(self) -> Plan:
        assert self.cart is not None and self.loaded is not None
        model = self._model()
        return (self.world.with_cart(self.loaded, replace(model, floor=len(model.records))),
                self.cart.sync)

    def _truncate(self, obj: int) -> Plan:
        assert self.cart is not None and self.loaded is not None
        model = self._model()
        if obj == len(model.records):  # a no-op for the format: nothing becomes durable
            return self.world, lambda: None
        cart = self.cart
        return (self.world.with_cart(self.loaded,
                                     replace(model, records=model.records[:obj], floor=obj)),
                lambda: cart.truncate(obj))

    def _mam(self, ident: int, value: bytes) -> Plan:
        assert self.cart is not None and self.loaded is not None
        model = self._model()
        mam = json.loads(model.mam)
        mam["attributes"][f"{ident:04X}"] = {"format": 1, "value": value.hex()}
        cart = self.cart
        post = replace(model, mam=json.dumps(mam, sort_keys=True))
        return (self.world.with_cart(self.loaded, post),
                lambda: cart.set_mam_attributes({ident: (1, value)}))

    def _protect(self) -> Plan:
        assert self.cart is not None and self.loaded is not None
        model = self._model()
        cart = self.cart
        return (self.world.with_cart(self.loaded,
                                     replace(model, write_protected=not model.write_protected)),
                lambda: cart.set_write_protected(not model.write_protected))

    def _close(self) -> Plan:
        assert self.cart is not None and self.loaded is not None
        model = self._model()
        cart = self.cart

        def io() -> None:
            cart.close()
            self.cart = None
            self.loaded = None
        return self.world.with_cart(self.loaded, replace(model, floor=len(model.records))), io

    # ------------------------------------------------------------------------------------------
    # Checking

    def _on_point(self, fs: CrashFS) -> None:
        self._check_now(fs)

    def _check_now(self, fs: CrashFS) -> None:
        for kind, tree in fs.states():
            key = (tree_digest(tree), self._step_no)
            if key in self._checked:
                continue
            self._checked.add(key)
            self.report.states_checked += 1
            problem = self._check_state(tree)
            if problem:
                self.report.failure_count += 1
                if len(self.report.failures) < self.max_failures:
                    self.report.failures.append(
                        f"seed {self.report.seed} op {self.report.operations} ({self.step}), "
                        f"crash point {fs.points} after {fs.last_op}, {kind} state: {problem}"
                    )

    def _check_state(self, tree: Tree) -> str | None:
        """Every invariant on one crash state. The library and each cartridge are checked apart,
        each on its own files only, and a verdict is reused for the same files and the same
        before/after models (most operations touch one of them)."""
        problem = self._cached(
            ("library", self.pre.library, self.post.library, self.pre.carts,
             tree_digest({k: v for k, v in tree.items() if k == "lib/library.json"})),
            lambda: self._check_library(self._only(tree, "lib/library.json") / "lib"),
        )
        if problem:
            return problem
        for barcode in sorted({b for b, _ in self.pre.carts} | {b for b, _ in self.post.carts}):
            prefix = f"lib/media/{barcode}"
            pre, post = self.pre.cart(barcode), self.post.cart(barcode)
            sub = {k: v for k, v in tree.items() if k == prefix or k.startswith(prefix + "/")}
            problem = self._cached(
                ("cartridge", barcode, pre, post, tree_digest(sub)),
                partial(self._check_cartridge_at, tree, prefix, pre, post),
            )
            if problem:
                return f"{barcode}: {problem}"
        return None

    def _cached(self, key: tuple[object, ...], check: Callable[[], str | None]) -> str | None:
        if key not in self._verdicts:
            try:
                self._verdicts[key] = check()
            except Exception as exc:  # noqa: BLE001 - every escape is a finding
                self._verdicts[key] = "".join(traceback.format_exception_only(exc)).strip()
        return self._verdicts[key]

    def _only(self, tree: Tree, prefix: str) -> Path:
        """Materialize the part of `tree` at `prefix` (and the directories above it)."""
        part: Tree = {k: v for k, v in tree.items()
                      if k == prefix or k.startswith(prefix + "/") or prefix.startswith(k + "/")}
        return materialize(part, self.scratch)

    def _check_cartridge_at(
        self, tree: Tree, prefix: str, pre: CartModel | None, post: CartModel | None
    ) -> str | None:
        return self._check_cartridge(self._only(tree, prefix) / prefix, pre, post)

    def _check_library(self, root: Path) -> str | None:
        pre, post = self.pre.library, self.post.library
        if pre is None and post is None:
            return None
        if not (root / "library.json").exists():
            return None if pre is None else "library.json is missing"
        lib = Library.open(root)
        try:
            got = (tuple(sorted((a, o.barcode) for a, o in lib.contents().items())),
                   lib.ie_prevented)
        finally:
            lib.close()
        if got not in (pre, post):
            return f"library inventory {got} is neither {pre} nor {post}"
        for _, barcode in got[0]:
            if self.pre.cart(barcode) is None:
                return f"the inventory names {barcode}, which was not created durably"
        return None

    def _check_cartridge(
        self, path: Path, pre: CartModel | None, post: CartModel | None
    ) -> str | None:
        try:
            cart = Cartridge.open(path)
        except FileNotFoundError:
            return None if pre is None else "missing"
        try:
            records: list[Record] = []
            for i in range(cart.object_count):
                buf = bytearray(self.max_payload + 1)
                kind, n = cart.read(i, [memoryview(buf)])
                records.append((int(kind), bytes(buf[:n])))
            got = tuple(records)
            ok = False
            for model, floor in ((pre, pre.floor if pre else 0),
                                 (post, min(pre.floor if pre else 0,
                                            len(post.records) if post else 0))):
                if model is not None and got == model.records[: len(got)] and len(got) >= floor:
                    ok = True
            if not ok:
                before = f"{len(pre.records)} before (>= {pre.floor} durable)" if pre else "none"
                after = f"{len(post.records)} after" if post else "none"
                return f"{len(got)} records recovered, not a prefix of the {before} or the {after}"
            tabs = {m.write_protected for m in (pre, post) if m is not None}
            if cart.write_protected not in tabs:
                return f"write protect {cart.write_protected}, expected one of {tabs}"
            mams = {m.mam for m in (pre, post) if m is not None}
            mam = json.dumps(cart._mam, sort_keys=True)
            if mam not in mams:
                return f"cartridge memory {mam} is neither {sorted(mams)}"
            cart.append(RecordType.DATA, [[_PROBE]])
        finally:
            cart.close()
        with Cartridge.open(path, read_only=True) as again:
            if again.object_count != len(got) + 1:
                return f"after one append at the recovered end: {again.object_count} records"
            buf = bytearray(len(_PROBE) + 1)
            kind, n = again.read(len(got), [memoryview(buf)])
            if (kind, bytes(buf[:n])) != (RecordType.DATA, _PROBE):
                return "the record appended at the recovered end does not read back"
        return None


def run(workdir: Path, seed: int, operations: int, **kw: Any) -> Report:
    """One `CrashRun`; see the module doc."""
    return CrashRun(workdir, seed, operations, **kw).run()
