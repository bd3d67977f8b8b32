"""Library state: element model, move/exchange rules, listeners, and crash-safe persistence."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.handlers.vtl.library import (
    STATE_FILE,
    Library,
    LibraryError,
    Occupant,
    medium_type_for,
)
from tcmu_py.scsi.sense import (
    ImportExportElementOpen,
    InvalidElementAddress,
    MediumRemovalPrevented,
)
from tcmu_py.scsi.sense import MediumDestinationElementFull as DestinationFull
from tcmu_py.scsi.sense import MediumSourceElementEmpty as SourceEmpty
from tcmu_py.scsi.smc import ElementType, MediumType

MT, DT, IE, ST = 0x0001, 0x0100, 0x0300, 0x0400


def make_library(tmp_path: Path, *, cartridges: int = 3, slots: int = 6) -> Library:
    lib = Library.create(
        tmp_path / "lib",
        name="test",
        drives=[("SER0001", "IBM-LTO8"), ("SER0002", "IBM-LTO8")],
        slots=slots,
        import_export=2,
    )
    for i in range(cartridges):
        barcode = f"ABC{i:03d}L8"
        lib.media_path(barcode).write_bytes(b"")
        lib.place(barcode, ST + i)
    return lib


def test_layout_and_defaults(tmp_path: Path) -> None:
    lib = make_library(tmp_path, cartridges=0)
    assert lib.ranges() == {
        ElementType.MEDIUM_TRANSPORT: (MT, 1),
        ElementType.STORAGE: (ST, 6),
        ElementType.IMPORT_EXPORT: (IE, 2),
        ElementType.DATA_TRANSFER: (DT, 2),
    }
    assert lib.addresses() == [MT, DT, DT + 1, IE, IE + 1, *range(ST, ST + 6)]
    assert lib.element_type(DT + 1) == ElementType.DATA_TRANSFER
    with pytest.raises(InvalidElementAddress):
        lib.element_type(0x0002)
    assert lib.drive_serial(1) == "SER0002" and lib.drive_model(0) == "IBM-LTO8"
    assert lib.media_path("ABC000L8") == tmp_path / "lib" / "media" / "ABC000L8"
    with pytest.raises(FileExistsError):
        Library.create(tmp_path / "lib", name="x", drives=[], slots=1, import_export=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"transports": 0},
        {"slots": -1},
        {"dvcid": "wwn"},
        {"drives": [("A", "m"), ("A", "m")]},
        {"first_address": {ElementType.STORAGE: 0x0101}},  # overlaps the drives
        {"first_address": {ElementType.STORAGE: 0xFFFE}},  # runs past 16 bits
        {"first_address": {ElementType.STORAGE: 0}},  # 0: only a transport may have it
    ],
)
def test_create_rejects_bad_layouts(tmp_path: Path, kwargs: dict) -> None:
    args = {"name": "x", "drives": [("A", "m"), ("B", "m")], "slots": 4, "import_export": 1}
    args.update(kwargs)
    with pytest.raises(LibraryError):
        Library.create(tmp_path / "lib", **args)


def test_move_tracks_source_and_notifies_drives(tmp_path: Path) -> None:
    lib = make_library(tmp_path)
    seen: list[str | None] = []
    lib.add_drive_listener(0, seen.append)
    lib.move(ST, DT)
    assert lib.drive_barcode(0) == "ABC000L8"
    assert lib.occupant(DT) == Occupant("ABC000L8", source=ST)
    lib.move(DT, DT + 1)  # drive to drive keeps the storage source
    assert lib.occupant(DT + 1) == Occupant("ABC000L8", source=ST)
    lib.move(DT + 1, ST + 5)
    assert lib.occupant(ST + 5) == Occupant("ABC000L8", source=ST)
    assert seen == ["ABC000L8", None]
    assert lib.locate("ABC000L8") == ST + 5


@pytest.mark.parametrize(
    ("src", "dst", "error"),
    [
        (ST + 4, DT, SourceEmpty),
        (ST, ST + 1, DestinationFull),
        (ST, ST, DestinationFull),
        (MT, ST + 4, InvalidElementAddress),
        (ST, MT, InvalidElementAddress),
        (ST, 0x0999, InvalidElementAddress),
    ],
)
def test_move_errors_change_nothing(tmp_path: Path, src: int, dst: int, error: type) -> None:
    lib = make_library(tmp_path)
    before = lib.contents()
    with pytest.raises(error):
        lib.move(src, dst)
    assert lib.contents() == before
    assert Library.open(lib.path).contents() == before


def test_drive_prevent_blocks_removal_only(tmp_path: Path) -> None:
    lib = make_library(tmp_path)
    lib.move(ST, DT)
    lib.set_drive_prevent(0, True)
    with pytest.raises(MediumRemovalPrevented) as exc:
        lib.move(DT, ST)
    assert (exc.value.sense_key, exc.value.asc, exc.value.ascq) == (5, 0x53, 0x02)
    with pytest.raises(MediumRemovalPrevented):
        lib.exchange(ST + 1, DT, ST)  # the drive's medium would leave it
    lib.move(ST + 1, DT + 1)  # other drives are not affected
    lib.set_drive_prevent(0, False)
    lib.move(DT, ST)
    assert lib.occupant(ST) is not None


def test_exchange(tmp_path: Path) -> None:
    lib = make_library(tmp_path)
    lib.move(ST, DT)
    lib.exchange(ST + 1, DT, ST)  # ABC001 into the drive, ABC000 to its old slot
    assert lib.drive_barcode(0) == "ABC001L8"
    assert lib.occupant(ST) == Occupant("ABC000L8", source=ST)  # a drive keeps the source
    lib.exchange(ST, ST + 2, ST)  # plain swap of two slots
    assert lib.occupant(ST).barcode == "ABC002L8" and lib.occupant(ST + 2).barcode == "ABC000L8"
    lib.exchange(ST, ST + 2, ST + 4)  # three-element rotation
    assert lib.occupant(ST) is None
    assert lib.occupant(ST + 2).barcode == "ABC002L8"
    assert lib.occupant(ST + 4).barcode == "ABC000L8"
    for args, error in [
        ((ST, ST + 2, ST + 1), SourceEmpty),  # source empty
        ((ST + 2, ST + 3, ST + 2), SourceEmpty),  # first destination empty
        ((ST + 2, ST + 4, DT), DestinationFull),  # second destination full
        ((ST + 2, ST + 4, ST + 4), DestinationFull),  # second == first destination
        ((ST + 2, ST + 2, ST + 4), InvalidElementAddress),
    ]:
        before = lib.contents()
        with pytest.raises(error):
            lib.exchange(*args)
        assert lib.contents() == before


def test_import_export_operator_and_prevent(tmp_path: Path) -> None:
    lib = make_library(tmp_path, cartridges=1)
    lib.media_path("NEW001L8").write_bytes(b"")
    changes: list[int] = []
    lib.add_change_listener(lambda: changes.append(1))
    assert lib.shelf() == ["NEW001L8"]
    assert lib.import_cartridge("NEW001L8") == IE
    assert lib.occupant(IE) == Occupant("NEW001L8", imported=True)
    assert changes == [1]
    lib.move(IE, ST + 3)  # the robot takes it in
    assert lib.occupant(ST + 3) == Occupant("NEW001L8", source=IE, imported=False)
    lib.move(ST + 3, IE + 1)
    lib.set_ie_prevent(True)
    with pytest.raises(LibraryError, match="locked"):
        lib.export_cartridge("NEW001L8")
    with pytest.raises(MediumRemovalPrevented):
        lib.open_ie(IE + 1)
    lib.move(IE + 1, ST + 3)  # the transport still reaches locked elements
    lib.move(ST + 3, IE + 1)
    lib.set_ie_prevent(False)
    assert Library.open(lib.path).ie_prevented is False
    assert lib.export_cartridge("NEW001L8") == IE + 1
    assert lib.shelf() == ["NEW001L8"]
    with pytest.raises(LibraryError, match="not in the library"):
        lib.export_cartridge("NEW001L8")
    with pytest.raises(LibraryError, match="only cartridges in import/export"):
        lib.export_cartridge("ABC000L8")
    with pytest.raises(LibraryError, match="does not exist"):
        lib.import_cartridge("NOPE00L8")
    with pytest.raises(LibraryError, match="already in the library"):
        lib.import_cartridge("ABC000L8")


def test_open_import_export_element_blocks_the_transport(tmp_path: Path) -> None:
    lib = make_library(tmp_path, cartridges=1)
    lib.open_ie(IE)
    assert Library.open(lib.path).ie_is_open(IE)
    with pytest.raises(ImportExportElementOpen):
        lib.move(ST, IE)
    lib.move(ST, IE + 1)
    lib.close_ie(IE)
    lib.move(IE + 1, IE)
    with pytest.raises(InvalidElementAddress):
        lib.open_ie(ST)


def test_medium_types() -> None:
    assert medium_type_for("ABC000L8") == MediumType.DATA
    assert medium_type_for("ABC000LW") == MediumType.WORM
    assert medium_type_for("CLN001L1") == MediumType.CLEANING


def test_bad_barcodes_are_rejected(tmp_path: Path) -> None:
    lib = make_library(tmp_path, cartridges=0)
    for bad in ["", "../x", "abc", "A" * 33, "-A", "A B"]:
        with pytest.raises(LibraryError):
            lib.media_path(bad)


# ---------------------------------------------------------------------------------------------
# Persistence and crashes


def test_every_change_is_on_disk_before_the_call_returns(tmp_path: Path) -> None:
    lib = make_library(tmp_path)
    lib.move(ST, DT + 1)
    lib.set_ie_prevent(True)
    other = Library.open(lib.path)
    assert other.contents() == lib.contents()
    assert other.ie_prevented
    doc = json.loads((lib.path / STATE_FILE).read_text())
    assert doc["contents"][str(DT + 1)]["barcode"] == "ABC000L8"


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", ["write", "fsync-file", "replace", "fsync-dir"])
def test_crash_at_any_step_leaves_old_or_new_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    lib = make_library(tmp_path)
    old = lib.contents()
    real_fsync, real_replace, real_write = os.fsync, os.replace, os.write
    fsyncs = []

    def fsync(fd: int) -> None:
        fsyncs.append(fd)
        if (step == "fsync-file" and len(fsyncs) == 1) or (
            step == "fsync-dir" and len(fsyncs) == 2
        ):
            raise Crash(step)
        real_fsync(fd)

    def replace(a: object, b: object) -> None:
        if step == "replace":
            raise Crash(step)
        real_replace(a, b)  # type: ignore[arg-type]

    def write(fd: int, data: Any) -> int:
        # The temporary file gets the first bytes of the document, then the process dies.
        if step == "write":
            real_write(fd, bytes(data[:10]))
            raise Crash(step)
        return real_write(fd, data)  # type: ignore[no-any-return]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    # tcmu_py.statefile.write_atomically writes the temporary file with os.write
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(Crash):
        lib.move(ST, DT)
    monkeypatch.undo()
    reopened = Library.open(lib.path).contents()
    new = {k: v for k, v in old.items() if k != ST} | {DT: Occupant("ABC000L8", source=ST)}
    if step == "fsync-dir":
        assert reopened == new  # renamed already: the new state is what is on disk
    else:
        assert reopened == old
    assert not [p for p in lib.path.iterdir() if p.name.endswith(".tmp")]
    # The surviving object agrees with the disk after its next operation.
    lib.refresh()
    assert lib.contents() == reopened


def test_change_by_another_process_is_seen_and_reported(tmp_path: Path) -> None:
    lib = make_library(tmp_path)
    lib.media_path("EXT001L8").write_bytes(b"")
    changes: list[int] = []
    drive_events: list[str | None] = []
    lib.add_change_listener(lambda: changes.append(1))
    lib.add_drive_listener(1, drive_events.append)
    script = textwrap.dedent(
        f"""
        from tcmu_py.handlers.vtl.library import Library
        lib = Library.open({str(lib.path)!r})
        lib.import_cartridge("EXT001L8")
        lib.move({ST + 1}, {DT + 1})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert lib.occupant(IE) == Occupant("EXT001L8", imported=True)
    assert changes == [1]
    assert drive_events == ["ABC001L8"]
    lib.move(IE, ST + 4)  # and we keep working on top of the other process's state
    assert Library.open(lib.path).occupant(ST + 4).barcode == "EXT001L8"


def test_kill_9_during_moves_loses_no_acknowledged_move(tmp_path: Path) -> None:
    """A process moving cartridges is SIGKILLed at a random moment: the state on disk is the
    one after the last acknowledged move, or after the move that was in flight."""
    import random
    import signal
    import time

    lib = make_library(tmp_path, cartridges=2, slots=4)
    ring = [ST, DT, ST + 2, DT + 1, ST + 3, IE]  # ABC000L8 travels around this ring
    script = textwrap.dedent(
        f"""
        import sys
        from tcmu_py.handlers.vtl.library import Library
        lib = Library.open({str(lib.path)!r})
        ring = {ring!r}
        n = 0
        while True:
            lib.move(ring[n % len(ring)], ring[(n + 1) % len(ring)])
            n += 1
            sys.stdout.write(f"{{n}}\\n")
            sys.stdout.flush()
        """
    )
    rng = random.Random(1234)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # running
        assert first.strip()
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        acked = int(([first, *proc.stdout.read().split()])[-1])
        proc.wait()
        where = Library.open(lib.path).locate("ABC000L8")
        assert where in (ring[acked % len(ring)], ring[(acked + 1) % len(ring)])
        assert Library.open(lib.path).occupant(ST + 1) == Occupant("ABC001L8")
        # Put the cartridge back at the start of the ring for the next round.
        reopened = Library.open(lib.path)
        if where != ST:
            reopened.move(where, ST)
        reopened.close()


def test_threads_and_another_process_moving_at_once_keep_every_cartridge_once(
    tmp_path: Path,
) -> None:
    import random
    import threading

    lib = make_library(tmp_path, cartridges=5, slots=6)
    holders = [DT, DT + 1, IE, IE + 1, *range(ST, ST + 6)]
    script = textwrap.dedent(
        f"""
        import random
        from tcmu_py.handlers.vtl.library import Library
        from tcmu_py.scsi.sense import ScsiError
        lib = Library.open({str(lib.path)!r})
        rng = random.Random(7)
        for _ in range(300):
            try:
                lib.move(rng.choice({holders!r}), rng.choice({holders!r}))
            except ScsiError:
                pass
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                with contextlib.suppress(SourceEmpty, DestinationFull):
                    lib.move(rng.choice(holders), rng.choice(holders))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert proc.wait() == 0
    assert errors == []
    for view in (lib.contents(), Library.open(lib.path).contents()):
        assert sorted(o.barcode for o in view.values()) == [f"ABC{i:03d}L8" for i in range(5)]
    assert lib.contents() == Library.open(lib.path).contents()


def test_a_failing_listener_does_not_fail_the_move(tmp_path: Path) -> None:
    lib = make_library(tmp_path)
    seen: list[str | None] = []

    def broken(barcode: str | None) -> None:
        raise RuntimeError("drive went away")

    lib.add_drive_listener(0, broken)
    lib.add_drive_listener(0, seen.append)
    lib.move(ST, DT)  # durable, so it must not be reported as failed
    assert seen == ["ABC000L8"]
    assert Library.open(lib.path).drive_barcode(0) == "ABC000L8"


def test_external_change_is_reported_even_when_the_operation_fails(tmp_path: Path) -> None:
    lib = make_library(tmp_path)
    changes: list[int] = []
    lib.add_change_listener(lambda: changes.append(1))
    other = Library.open(lib.path)
    other.media_path("EXT001L8").write_bytes(b"")
    other.import_cartridge("EXT001L8")
    with pytest.raises(SourceEmpty):
        lib.move(ST + 5, DT)  # re-reads (sees the import), then refuses
    assert changes == [1]
    assert lib.occupant(IE) == Occupant("EXT001L8", imported=True)
