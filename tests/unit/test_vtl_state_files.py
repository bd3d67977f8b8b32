"""Hostile input for every VTL state file (issue 11, D13): library.json, meta.json, mam.json, the
data file header and the index.

Each malformed library.json, meta.json, mam.json or data header must give one `StateFileError`
whose one-line message names the file (and the key, when one is at fault), within bounded time
and memory; through `tcmu-py vtl` it is exit status 2 and that one line, no traceback. The index
is a cache: whatever it holds, the cartridge opens with exactly the records of its data file.
A malformed library.json written by another process while the library is open is refused until
it is repaired, and never recorded as seen.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.errors import ConfigError, StateFileError
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl import VtlHandler, admin
from tcmu_py.handlers.vtl.cartridge import (
    DATA_FILE,
    FILEMARKS_FILE,
    INDEX_FILE,
    Cartridge,
    RecordType,
)
from tcmu_py.handlers.vtl.changer import Changer
from tcmu_py.handlers.vtl.library import Library, LibraryError
from tcmu_py.testing.harness import run_command

#: What one case may cost at most (the parser stops early; these are generous CI bounds).
MAX_SECONDS = 5.0
MAX_EXTRA_BYTES = 48 << 20


def _bounded(fn: Callable[[], object]) -> BaseException | None:
    """Run `fn`, return what it raised; fail if it took too long or allocated too much."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - returned to the test to check
        return exc
    finally:
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < MAX_SECONDS, f"took {elapsed:.1f} s"
        assert peak < MAX_EXTRA_BYTES, f"peak {peak >> 20} MiB"
    return None


def _one_line(exc: BaseException | None, path: Path, key: str | None) -> str:
    assert isinstance(exc, StateFileError), repr(exc)
    msg = str(exc)
    assert "\n" not in msg and len(msg) < 400, msg
    assert str(path) in msg, msg
    if key is not None:
        assert f"{path}: {key}: got " in msg, msg  # tcmu_py.statefile.invalid's form
    return msg


# ---------------------------------------------------------------------------------------------
# library.json


def _make_library(root: Path) -> Path:
    lib = Library.create(root, name="L", drives=[("DRV1", "IBM-LTO8"), ("DRV2", "IBM-LTO8")],
                         slots=4, import_export=1)
    admin.create_cartridges(lib, "AAA000L8..AAA001L8")
    lib.move(lib.addresses(lib.element_type(0x0400))[0], lib.drive_address(0))
    lib.close()
    return root / "library.json"


def _edit(change: Callable[[dict[str, Any]], object]) -> Callable[[bytes], bytes]:
    def make(good: bytes) -> bytes:
        doc = json.loads(good)
        change(doc)
        return json.dumps(doc).encode()
    return make


def _set(path: str, value: object) -> Callable[[bytes], bytes]:
    """Set (or with ... delete) the value at dotted `path` of the good document."""
    *parents, last = path.split(".")

    def change(doc: dict[str, Any]) -> None:
        node: Any = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is ...:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return _edit(change)


def _raw(content: bytes) -> Callable[[bytes], bytes]:
    return lambda good: content


#: id -> (make the file from the good one, the key the error must name or None)
LIBRARY_CASES: dict[str, tuple[Callable[[bytes], bytes], str | None]] = {
    "empty": (_raw(b""), None),
    "truncated": (lambda g: g[: len(g) // 2], None),
    "not-utf8": (lambda g: b"\xff\xfe" + g, None),
    "nul-bytes": (_raw(b"\x00" * 100), None),
    "list": (_raw(b"[]"), "(top level)"),
    "string": (_raw(b'"library"'), "(top level)"),
    "deep-list": (_raw(b"[" * 1_000_000), None),
    "deep-value": (lambda g: g.replace(b'"name": "L"', b'"name": ' + b"[" * 200_000), None),
    "huge-number": (lambda g: g.replace(b'"version": 1', b'"version": ' + b"9" * 1_000_000), None),
    "nan": (lambda g: g.replace(b'"version": 1', b'"version": NaN'), None),
    "duplicate-key": (lambda g: g.replace(b'"version": 1', b'"version": 1, "version": 1'), None),
    "format": (_set("format", "tar"), "format"),
    "version": (_set("version", 2), "version"),
    "no-name": (_set("name", ...), "name"),
    "name-int": (_set("name", 5), "name"),
    "elements-list": (_set("elements", []), "elements"),
    "elements-short": (_set("elements.storage", [1024]), "elements.storage"),
    "elements-bool": (_set("elements.storage", [True, 4]), "elements.storage"),
    "elements-huge": (_set("elements.storage", [1024, 10**30]), "elements.storage"),
    "elements-zero": (_set("elements.storage", [0, 4]), "elements.storage"),
    "no-transport": (_set("elements.medium_transport", [1, 0]), "elements.medium_transport"),
    "elements-overlap": (_set("elements.storage", [0x100, 4]), "elements"),
    "drives-missing": (_set("drives", ...), "drives"),
    "drives-count": (_set("drives", [{"serial": "A", "model": "IBM-LTO8"}]), "drives"),
    "drive-not-object": (_set("drives.0", "DRV1"), "drives[0]"),
    "serial-int": (_set("drives.0.serial", 7), "drives[0].serial"),
    "serial-non-ascii": (_set("drives.1.serial", "DRV\u00e9"), "drives[1].serial"),
    "serial-duplicate": (_set("drives.1.serial", "DRV1"), "drives"),
    "model-list": (_set("drives.0.model", ["IBM"]), "drives[0].model"),
    "dvcid": (_set("dvcid", "wwn"), "dvcid"),
    "changer-list": (_set("changer", []), "changer"),
    "changer-extra": (_set("changer.color", "red"), "changer.color"),
    "changer-vendor": (_set("changer.vendor", "X" * 9), "changer"),
    "contents-list": (_set("contents", []), "contents"),
    "contents-key": (_set("contents.abc", {"barcode": "AAA009L8"}), "contents.abc"),
    "contents-transport": (_set("contents.1", {"barcode": "AAA009L8"}), "contents.1"),
    "contents-outside": (_set("contents.9999", {"barcode": "AAA009L8"}), "contents.9999"),
    "contents-entry-list": (_set("contents.256", []), "contents.256"),
    "barcode-path": (_set("contents.256.barcode", "../../etc"), "contents.256.barcode"),
    "barcode-int": (_set("contents.256.barcode", 5), "contents.256.barcode"),
    "barcode-twice": (_set("contents.1024", {"barcode": "AAA000L8"}), "contents.1024.barcode"),
    "source-string": (_set("contents.256.source", "slot"), "contents.256.source"),
    "source-transport": (_set("contents.256.source", 1), "contents.256.source"),
    "imported": (_set("contents.256.imported", "yes"), "contents.256.imported"),
    "ie-open-string": (_set("ie_open", "768"), "ie_open"),
    "ie-open-slot": (_set("ie_open", [1024]), "ie_open[0]"),
    "ie-prevent": (_set("ie_prevent", 1), "ie_prevent"),
    "generation": (_set("generation", -1), "generation"),
}


@pytest.fixture(scope="module")
def good_library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    state = _make_library(tmp_path_factory.mktemp("good") / "lib")
    return state.parent, state.read_bytes()


def _library_copy(tmp_path: Path, good: tuple[Path, bytes], content: bytes) -> Path:
    root = tmp_path / "lib"
    (root / "media").mkdir(parents=True)
    (root / "library.json").write_bytes(content)
    return root


@pytest.mark.parametrize("case", sorted(LIBRARY_CASES))
def test_malformed_library_json(
    tmp_path: Path, good_library: tuple[Path, bytes], case: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make, key = LIBRARY_CASES[case]
    root = _library_copy(tmp_path, good_library, make(good_library[1]))
    state = root / "library.json"
    exc = _bounded(lambda: Library.open(root))
    _one_line(exc, state, key)
    assert isinstance(exc, LibraryError)  # the operator tools' error type too
    # The operator tool: exit 2 and that one line.
    capsys.readouterr()
    assert admin.main(["list", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(state) in err and "Traceback" not in err
    # The handler's config check (what the daemon and `tcmu-py apply` call).
    with pytest.raises(ConfigError) as info:
        VtlHandler.check_config(f"library={root};unit=changer")
    assert str(state) in str(info.value) and "\n" not in str(info.value)


def test_oversized_library_json(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    with open(root / "library.json", "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros
    _one_line(_bounded(lambda: Library.open(root)), root / "library.json", None)


def test_good_library_json_still_opens(good_library: tuple[Path, bytes], tmp_path: Path) -> None:
    root = _library_copy(tmp_path, good_library, good_library[1])
    lib = Library.open(root)
    assert lib.drive_barcode(0) == "AAA000L8"
    lib.close()


@pytest.mark.parametrize("case", ["deep-list", "not-utf8", "serial-non-ascii"])
def test_cli_process_exits_2_with_one_line(
    tmp_path: Path, good_library: tuple[Path, bytes], case: str
) -> None:
    make, _ = LIBRARY_CASES[case]
    root = _library_copy(tmp_path, good_library, make(good_library[1]))
    proc = subprocess.run(
        [sys.executable, "-m", "tcmu_py.cli", "vtl", "list", str(root)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2, proc
    assert proc.stderr.count("\n") == 1 and str(root / "library.json") in proc.stderr, proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------
# A malformed replacement while the library is open


def _replace(state: Path, content: bytes) -> None:
    """What another process does: a new file renamed over library.json (a new inode)."""
    tmp = state.with_name(".other.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, state)


def test_malformed_replacement_is_refused_until_repaired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = _make_library(tmp_path / "lib")
    lib = Library.open(state.parent)
    changer = Changer(DeviceConfig(name="c", subtype="vtl", cfgstring="", size=0), lib)
    run_command(changer, bytes(6))  # power-on unit attention
    before = lib.contents()
    good = json.loads(state.read_text())
    bad = dict(good, contents={"256": ["AAA000L8"]})  # passes the format check, not the rest
    _replace(state, json.dumps(bad).encode())
    with caplog.at_level(logging.ERROR):
        for _ in range(3):  # refused every time, not only the first (it is not "seen")
            with pytest.raises(StateFileError, match=r"library\.json: contents\.256"):
                lib.contents()
    assert len([r for r in caplog.records if "library.json" in r.getMessage()]) == 1
    # The changer answers NOT READY, MANUAL INTERVENTION REQUIRED, and writes nothing.
    assert run_command(changer, bytes(6)).sense_codes == (2, 0x04, 0x03)
    move = bytes([0xA5, 0, 0, 0, 0x04, 0x01, 0x04, 0x02, 0, 0, 0, 0])
    assert run_command(changer, move).sense_codes == (2, 0x04, 0x03)
    assert json.loads(state.read_text()) == bad
    # Repaired (here: another valid state): adopted at once.
    moved = dict(good, generation=good["generation"] + 1,
                 contents={"1025": good["contents"]["256"]})
    _replace(state, json.dumps(moved).encode())
    assert lib.contents() != before and lib.occupant(0x0401) is not None
    # SMC-3: the operator changed the library: IMPORT OR EXPORT ELEMENT ACCESSED, then ready.
    assert run_command(changer, bytes(6)).sense_codes == (6, 0x28, 0x01)
    assert run_command(changer, bytes(6)).good
    lib.close()


# ---------------------------------------------------------------------------------------------
# meta.json, mam.json, the data header


def _meta(good: bytes, **changes: object) -> bytes:
    doc = json.loads(good)
    for k, v in changes.items():
        if v is ...:
            del doc[k]
        else:
            doc[k] = v
    return json.dumps(doc).encode()


def _header(magic: bytes = b"TCMUVTL\x00", version: int = 1, epoch: int = 1) -> bytes:
    """A data file header with a valid CRC (a torn one, CRC failing, is recovered from: see
    test_crash_points.py)."""
    body = struct.pack(">8sH6xQ36x", magic, version, epoch)
    return body + struct.pack(">I", zlib.crc32(body))


SIDECAR_CASES: dict[str, tuple[str, Callable[[bytes], bytes], str | None]] = {
    "meta-empty": ("meta.json", _raw(b""), None),
    "meta-truncated": ("meta.json", lambda g: g[:10], None),
    "meta-not-utf8": ("meta.json", lambda g: g.replace(b"L8", b"\xe9\xff"), None),
    "meta-list": ("meta.json", _raw(b"[]"), "(top level)"),
    "meta-deep": ("meta.json", _raw(b'{"a":' * 500_000), None),
    "meta-huge-number": ("meta.json", _raw(b'{"capacity": ' + b"1" * 1_000_000 + b"}"), None),
    "meta-too-large": ("meta.json", _raw(b" " * (2 << 20)), None),
    "meta-no-generation": ("meta.json", lambda g: _meta(g, generation=...), "generation"),
    "meta-generation-str": ("meta.json", lambda g: _meta(g, generation="8"), "generation"),
    "meta-generation-float": ("meta.json", lambda g: _meta(g, generation=8.0), "generation"),
    "meta-generation-2": ("meta.json", lambda g: _meta(g, generation=2), "generation"),
    "meta-format": ("meta.json", lambda g: _meta(g, format=3), "format"),
    "meta-format2-no-partitions": ("meta.json", lambda g: _meta(g, format=2), "partitions"),
    "meta-partitions-in-format1": ("meta.json", lambda g: _meta(g, partitions=[1, 1]),
                                   "partitions"),
    "meta-partitions-too-large": ("meta.json",
                                  lambda g: _meta(g, format=2, partitions=[1 << 60, 1]),
                                  "partitions"),
    "meta-partitions-one": ("meta.json", lambda g: _meta(g, format=2, partitions=[5]),
                            "partitions"),
    "meta-kind": ("meta.json", lambda g: _meta(g, kind=["data"]), "kind"),
    "meta-barcode": ("meta.json", lambda g: _meta(g, barcode="A" * 40), "barcode"),
    "meta-capacity-0": ("meta.json", lambda g: _meta(g, capacity=0), "capacity"),
    "meta-capacity-huge": ("meta.json", lambda g: _meta(g, capacity=1 << 80), "capacity"),
    "meta-early-warning": ("meta.json", lambda g: _meta(g, early_warning=1 << 62),
                           "early_warning"),
    "meta-write-protected": ("meta.json", lambda g: _meta(g, write_protected=0),
                             "write_protected"),
    "mam-list": ("mam.json", _raw(b"[]"), "(top level)"),
    "mam-empty": ("mam.json", _raw(b""), None),
    "mam-not-utf8": ("mam.json", _raw(b'{"load_count": "\xff"}'), None),
    "mam-deep": ("mam.json", _raw(b"[" * 1_000_000), None),
    "mam-count-str": ("mam.json", _raw(b'{"load_count": "3"}'), "load_count"),
    "mam-count-negative": ("mam.json", _raw(b'{"mb_written": -1}'), "mb_written"),
    "mam-count-huge": ("mam.json", _raw(b'{"mb_read": 1e400}'), "mb_read"),
    "mam-attributes-list": ("mam.json", _raw(b'{"attributes": [1]}'), "attributes"),
    "mam-attribute-id": ("mam.json", _raw(b'{"attributes": {"8000x": {}}}'),
                         "attributes.8000x"),
    "mam-attribute-list": ("mam.json", _raw(b'{"attributes": {"0800": []}}'),
                           "attributes.0800"),
    "mam-attribute-format": ("mam.json",
                             _raw(b'{"attributes": {"0800": {"format": "1", "value": ""}}}'),
                             "attributes.0800.format"),
    "mam-attribute-value": ("mam.json",
                            _raw(b'{"attributes": {"0800": {"format": 1, "value": "abc"}}}'),
                            "attributes.0800.value"),
    "data-empty": (DATA_FILE, _raw(b""), "header"),
    "data-short": (DATA_FILE, lambda g: g[:20], "header"),
    "data-magic": (DATA_FILE, lambda g: b"X" + g[1:], "header magic"),
    "data-version": (DATA_FILE, lambda g: _header(version=3) + g[64:], "header version"),
    "data-magic-crc-ok": (DATA_FILE, lambda g: _header(magic=b"TCMUVTL2") + g[64:],
                          "header magic"),
}


@pytest.fixture(scope="module")
def good_cartridge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cart") / "ABC001L8"
    Cartridge.create(path, "ABC001L8", capacity=1 << 30)
    with Cartridge.open(path) as cart:
        cart.append(RecordType.DATA, [[b"x" * 100]] * 10)
        cart.set_mam_attributes({0x0800: (1, b"TCMU")})
    return path


@pytest.mark.parametrize("case", sorted(SIDECAR_CASES))
def test_malformed_cartridge_file(
    tmp_path: Path, good_cartridge: Path, case: str, capsys: pytest.CaptureFixture[str],
) -> None:
    name, make, key = SIDECAR_CASES[case]
    # A library holding a copy of the good cartridge, then the damage.
    lib = Library.create(tmp_path / "lib", name="L", drives=[], slots=1, import_export=0)
    lib.close()
    cart = tmp_path / "lib" / "media" / "ABC001L8"
    cart.mkdir()
    for f in good_cartridge.iterdir():
        (cart / f.name).write_bytes(f.read_bytes())
    (cart / name).write_bytes(make((good_cartridge / name).read_bytes()))
    _one_line(_bounded(lambda: Cartridge.open(cart, read_only=True)), cart / name, key)
    _one_line(_bounded(lambda: Cartridge.open(cart)), cart / name, key)
    capsys.readouterr()
    assert admin.main(["dump", str(tmp_path / "lib"), "ABC001L8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(cart / name) in err and "Traceback" not in err


def test_missing_mam_is_an_empty_cartridge_memory(tmp_path: Path) -> None:
    path = tmp_path / "ABC001L8"
    Cartridge.create(path, "ABC001L8")
    (path / "mam.json").unlink()
    with Cartridge.open(path) as cart:
        assert cart.mam_attributes == {} and cart.mam_counter("load_count") == 0


# ---------------------------------------------------------------------------------------------
# The index: a cache; hostile contents are never adopted


def _index_header(**fields: int) -> bytes:
    import struct

    from tcmu_py.handlers.vtl import cartridge as c

    v = {"version": 1, "stride": c.INDEX_STRIDE, "epoch": 1, "count": 0, "end": 64, "crc": 0,
         "fm_count": 0, "fm_crc": 0, **fields}
    return struct.pack(">4sHHQQQIQI12x", c.INDEX_MAGIC, v["version"], v["stride"], v["epoch"],
                       v["count"], v["end"], v["crc"], v["fm_count"], v["fm_crc"])


INDEX_CASES: dict[str, tuple[bytes, bytes | None]] = {
    "empty": (b"", None),
    "short": (b"VTLI\x00", None),
    "zeros": (bytes(4096), None),
    "random": (bytes(range(256)) * 16, None),
    "stride-0": (_index_header(stride=0, count=1 << 40), None),
    "count-huge": (_index_header(count=1 << 62, end=1 << 62), None),
    "fm-count-huge": (_index_header(fm_count=1 << 61), b""),
    "end-past-file": (_index_header(count=0, end=1 << 40), None),
    "old-epoch": (_index_header(epoch=0), None),
    # CRC-valid (empty arrays) but claiming objects it has no entries for:
    "count-without-entries": (_index_header(count=5, end=64 + 5 * 132), None),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_hostile_index_is_ignored(tmp_path: Path, case: str) -> None:
    path = tmp_path / "ABC001L8"
    Cartridge.create(path, "ABC001L8", capacity=1 << 30)
    payloads = [bytes([i]) * (100 + i) for i in range(150)]
    with Cartridge.open(path) as cart:
        for i, p in enumerate(payloads):
            cart.append(RecordType.FILEMARK if i % 50 == 49 else RecordType.DATA,
                        [()] if i % 50 == 49 else [[p]])
    index, filemarks = INDEX_CASES[case]
    (path / INDEX_FILE).write_bytes(index)
    if filemarks is not None:
        (path / FILEMARKS_FILE).write_bytes(filemarks)
    for read_only in (True, False):
        opened: list[Cartridge] = []

        def open_it(ro: bool = read_only, out: list[Cartridge] = opened) -> None:
            out.append(Cartridge.open(path, read_only=ro))

        assert _bounded(open_it) is None
        cart = opened[0]
        assert cart.object_count == 150
        assert list(cart.filemarks) == [49, 99, 149]
        for i in (0, 63, 64, 100, 148):
            buf = bytearray(1024)
            kind, n = cart.read(i, [memoryview(buf)])
            assert kind == RecordType.DATA and bytes(buf[:n]) == payloads[i]
        cart.close()


# ---------------------------------------------------------------------------------------------
# The handler's config string


def test_relative_library_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """library= must be absolute, like raw's image path: the daemon's working directory is no
    base the operator can see."""
    _make_library(tmp_path / "lib")
    monkeypatch.chdir(tmp_path)
    for cfg in ("library=lib;unit=changer", "library=./lib;unit=drive0"):
        with pytest.raises(ConfigError, match="absolute"):
            VtlHandler.check_config(cfg)
    VtlHandler.check_config(f"library={tmp_path / 'lib'};unit=changer")
