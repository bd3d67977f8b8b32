"""The virtual LTO tape drive: an SSC device over a `Cartridge`, loaded by a library.

Theory of operation
-------------------
A drive sits in one data-transfer element of a `Library`. The library tells it (listener callback,
from the changer's thread) when a cartridge is moved in or out. The drive's state is a small table:

=================  ==========================================  =========================
state              meaning                                     TEST UNIT READY
=================  ==========================================  =========================
EMPTY              no cartridge in the element                 02/3A/00 MEDIUM NOT PRESENT
LOADED             cartridge open, position valid              GOOD
UNLOADED           LOAD UNLOAD(load=0) ejected it; still there 02/04/02 INITIALIZING CMD REQ.
CLEANING           a cleaning cartridge is in                  02/30/03 CLEANING CART.
FAILED             cartridge could not be opened:
                   - its meta.json, mam.json or data header    02/30/01 UNKNOWN FORMAT
                     is malformed
                   - anything else (missing, busy, I/O error)  02/04/03 MANUAL INTERVENTION
=================  ==========================================  =========================

A load that fails is logged with the reason (for a malformed file: the file, the key, the value
and what was expected) and leaves the drive in FAILED: it keeps answering, LOAD UNLOAD unloads it
and the changer can move the cartridge out; LOAD retries the load. Nothing a cartridge's files
contain can raise out of the drive: `Cartridge.open` validates them before the drive uses them.

In LOADED the position is a logical object identifier ``pos`` (0 = BOP, ``cartridge.object_count``
= EOD). Every command either moves ``pos`` within ``0..EOD`` or leaves it, and fails with the sense
SSC-5 names for the condition. Reading a generation the drive cannot read gives 03/30/02; writing
one it cannot write 07/30/05 (never HARDWARE ERROR).

Partitions (LTO-5 and later, SSC-5 4.2.x): ``pos`` is an object of the cartridge's active
partition, each partition with its own end of data. A MODE SELECT of the medium partition page
(11h, POFM 1) only records the layout asked for; FORMAT MEDIUM, at BOP of partition 0, makes it
(the cartridge records it durably, erasing every partition). LOCATE with CP changes the active
partition; READ POSITION and the device configuration page report it; REWIND stays in the active
partition (as the Linux st driver assumes), a load starts in partition 0. Page 11h offers
1 additional partition on LTO-5/6 media and 3 on LTO-7 and later, none on older media.

Writes are buffered in the page cache and made durable at WRITE FILEMARKS (any count, including
0), REWIND, LOAD UNLOAD and close, which is what buffered mode 1 in the device-specific parameter
promises the initiator.

Threads: `serial_commands = True`, so the runner calls one command at a time; the library's
listener may run concurrently and takes `self.lock` like every command handler does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import pathlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import ClassVar, Protocol

from tcmu_py.buffers import slice_views
from tcmu_py.device.command import Command, Response
from tcmu_py.device.core import ScsiDevice, check_data_out, command
from tcmu_py.errors import StateFileError
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl import personality as pers
from tcmu_py.handlers.vtl.cartridge import (
    NO_ROOM_ERRNOS,
    Cartridge,
    CartridgeError,
    CartridgeFull,
    CorruptRecord,
    DecryptionFailed,
    RecordType,
)
from tcmu_py.handlers.vtl.encryption import (
    DriveEncryption,
    IntegrityValidationFailed,
    NextBlock,
)
from tcmu_py.scsi import cdb as cdbs
from tcmu_py.scsi import spc, ssc
from tcmu_py.scsi.constants import Opcode, PeripheralType, SenseKey
from tcmu_py.scsi.sense import (
    AuxiliaryMemoryOutOfSpace,
    BeginningOfPartition,
    CannotReadIncompatibleFormat,
    CannotReadUnknownFormat,
    CannotWriteIncompatibleFormat,
    CleaningCartridgeInstalled,
    EarlyWarning,
    EndOfData,
    FilemarkDetected,
    IncorrectLength,
    InvalidFieldInCdb,
    InvalidFieldInParameterList,
    MediumError,
    MediumMayHaveChanged,
    MediumNotPresent,
    MediumRemovalPrevented,
    NotReadyInitializingCommandRequired,
    NotReadyManualIntervention,
    ParameterListLengthError,
    PositionPastBeginningOfMedium,
    ScsiError,
    SequentialPositioningError,
    VolumeOverflow,
    WormOverwriteAttempted,
    WriteError,
    WriteProtected,
)

log = logging.getLogger(__name__)

MIB = 1 << 20
#: Bytes of host attributes a cartridge memory holds (MAM SPACE REMAINING starts here).
MAM_HOST_SPACE = 8192


class LibraryLink(Protocol):
    """What a drive needs from its library (implemented by handlers/vtl/library.py)."""

    def media_path(self, barcode: str) -> pathlib.Path: ...
    def drive_barcode(self, drive_index: int) -> str | None: ...
    def set_drive_prevent(self, drive_index: int, prevented: bool) -> None: ...
    def add_drive_listener(self, drive_index: int, cb: Callable[[str | None], None]) -> None: ...
    def drive_serial(self, drive_index: int) -> str: ...
    def drive_model(self, drive_index: int) -> str: ...


class DriveState(enum.Enum):
    EMPTY = "empty"
    LOADED = "loaded"
    UNLOADED = "unloaded"
    CLEANING = "cleaning"
    FAILED = "failed"


class TapeDrive(ScsiDevice):
    """An LTO drive (peripheral type 01h) in drive element `drive_index` of `library`."""

    peripheral_type: ClassVar[int] = PeripheralType.TAPE
    removable: ClassVar[bool] = True
    serial_commands: ClassVar[bool] = True

    def __init__(
        self,
        config: DeviceConfig,
        library: LibraryLink,
        drive_index: int,
        *,
        personality: pers.DrivePersonality | None = None,
    ) -> None:
        super().__init__(config)
        self.library = library
        self.drive_index = drive_index
        self.personality = personality or pers.personality(library.drive_model(drive_index))
        self.vendor = self.personality.vendor
        self.product = self.personality.product
        self.revision = self.personality.revision
        # SPC-5 4.3.1: VPD 80h/83h/B1h carry the serial as ASCII 20h..7Eh. The library refuses
        # any other serial; this keeps INQUIRY answering even if one got through.
        self.serial = spc.ascii_text(library.drive_serial(drive_index))
        self.state = DriveState.EMPTY
        # FAILED: what check_ready raises (a class and message: a new exception each time).
        self._failure: tuple[type[ScsiError], str] = (NotReadyManualIntervention, "")
        self.barcode: str | None = None
        self.cartridge: Cartridge | None = None
        self.pos = 0
        self.block_length = 0  # 0 = variable-block mode
        self.compression = False
        self.prevented = False
        self.tape_alerts: set[int] = set()
        self._alerts_shown: set[int] = set()  # by the last TapeAlert page built
        # LOG SENSE 02h/03h/0Ch counters (since power on)
        self.bytes_from_initiator = 0
        self.bytes_to_medium = 0
        self.bytes_from_medium = 0
        self.bytes_to_initiator = 0
        self.write_errors = 0
        self.read_errors = 0
        self._media_path: pathlib.Path | None = None
        self._pending_load = False
        # SSC-5 8.5 data encryption parameters: power on = defaults, no key (never persisted).
        self.encryption = DriveEncryption()
        # Partition sizes (bytes) a MODE SELECT of page 11h asked for, made by FORMAT MEDIUM.
        self._pending_partitions: list[int] | None = None
        barcode = library.drive_barcode(drive_index)
        if barcode is not None:
            self.barcode = barcode
            self._media_path = library.media_path(barcode)
            self._load(attention=False)
        library.add_drive_listener(drive_index, self.on_medium_changed)

    # ------------------------------------------------------------------------------------------
    # Library events and state changes

    def on_medium_changed(self, barcode: str | None) -> None:
        """Library listener: a cartridge was moved into (`barcode`) or out of (None) the drive.

        Runs on the changer's thread, possibly with the library's lock held, so it never calls
        back into the library: it closes (syncs and unlocks) the cartridge that was in the drive
        at once, so another drive can open it right away, and leaves opening the new one to the
        next command this drive executes (`execute` -> `_apply_pending_load`).
        """
        with self.lock:
            self._close_cartridge()
            self._pending_partitions = None
            self.barcode = barcode
            self.state = DriveState.EMPTY
            self.pos = 0
            self._media_path = None
            self._pending_load = barcode is not None

    def execute(self, cmd: Command) -> Response | Future[Response]:
        """As `ScsiDevice.execute` (never raises), after opening a cartridge moved in."""
        try:
            self._apply_pending_load()
        except BaseException as exc:  # noqa: BLE001 - execute never raises; this becomes sense
            return self.respond_error(cmd, exc)
        return super().execute(cmd)

    def _apply_pending_load(self) -> None:
        """Open a cartridge the library moved in; library calls happen outside `self.lock`."""
        with self.lock:
            if not self._pending_load or self.barcode is None:
                return
            barcode = self.barcode
        try:
            path = self.library.media_path(barcode)
        except Exception:  # noqa: BLE001 - reported as a failed load, not a failed command
            log.exception("drive %d: no media path for %s", self.drive_index, barcode)
            path = None
        with self.lock:
            if not self._pending_load or self.barcode != barcode:
                return  # moved again meanwhile; the next command retries
            self._pending_load = False
            self._media_path = path
            self._load(attention=True)

    def _load(self, *, attention: bool) -> None:
        """Thread the cartridge at `self._media_path`: open it, rewind, raise UA 28/00.

        On failure the drive is FAILED (see the module doc) and the reason is logged.
        """
        assert self.barcode is not None
        self.state = DriveState.FAILED  # until the cartridge is threaded
        self._failure = (NotReadyManualIntervention, f"{self.barcode} could not be loaded")
        try:
            if self._media_path is None:
                raise CartridgeError(f"{self.barcode}: no media path")
            cart = Cartridge.open(self._media_path)
        except StateFileError as exc:
            # SPC-5 4.4.9 table 63: 30h/01h CANNOT READ MEDIUM - UNKNOWN FORMAT; NOT READY as for
            # 30h/03h: the cartridge's own description (generation, capacity, cartridge memory)
            # is unreadable, so its format cannot be told; it must be taken out and repaired.
            log.error("drive %d: cannot load %s: %s", self.drive_index, self.barcode, exc)
            self._failure = (CannotReadUnknownFormat, f"{self.barcode}: {exc}")
            return
        except (OSError, ValueError, CartridgeError) as exc:
            log.error("drive %d: cannot load %s: %s", self.drive_index, self.barcode, exc)
            return
        self.cartridge = cart
        self.pos = 0
        gen = cart.generation
        if cart.cleaning:
            self.state = DriveState.CLEANING
            self.tape_alerts.add(ssc.TapeAlert.CLEANING_MEDIA)
        else:
            self.state = DriveState.LOADED
            if gen not in self.personality.reads:
                self.tape_alerts.add(ssc.TapeAlert.UNSUPPORTED_FORMAT)
            elif gen not in self.personality.writes:
                self.tape_alerts.add(ssc.TapeAlert.READ_ONLY_FORMAT)
        try:
            cart.record_load()
        except OSError as exc:
            log.warning("drive %d: %s: MAM load count not updated: %s", self.drive_index,
                        self.barcode, exc)
        if attention:
            # SSC-5 / SPC-5 5.14: a newly loaded medium is reported as NOT READY TO READY CHANGE.
            self.queue_unit_attention(MediumMayHaveChanged())

    def _close_cartridge(self) -> None:
        cart, self.cartridge = self.cartridge, None
        if cart is not None:
            self.encryption.demounted()  # SSC-5 8.5.3.2 CKOD: clear the key on demount
            try:
                cart.close()
            except OSError as exc:
                log.error("drive %d: closing %s: %s", self.drive_index, cart.barcode, exc)

    def close(self) -> None:
        """Stop listening to the library and close (sync, unlock) the cartridge."""
        remove = getattr(self.library, "remove_drive_listener", None)
        if remove is not None:
            with contextlib.suppress(ValueError):  # never added, or removed twice
                remove(self.drive_index, self.on_medium_changed)
        with self.lock:
            self._close_cartridge()
            self.state = DriveState.EMPTY
            self.encryption.clear()  # power off: the key leaves memory

    # ------------------------------------------------------------------------------------------
    # Readiness and access checks

    def check_ready(self) -> None:
        if self.state is DriveState.LOADED:
            return
        if self.state is DriveState.EMPTY:
            raise MediumNotPresent("no cartridge in the drive")
        if self.state is DriveState.UNLOADED:
            raise NotReadyInitializingCommandRequired("cartridge unloaded; LOAD required")
        if self.state is DriveState.CLEANING:
            raise CleaningCartridgeInstalled()
        cls, msg = self._failure
        raise cls(msg)

    def _medium(self) -> Cartridge:
        self.check_ready()
        assert self.cartridge is not None
        return self.cartridge

    def _readable(self) -> Cartridge:
        cart = self._medium()
        if cart.generation not in self.personality.reads:
            # LTO rules: an LTO-N drive reads N, N-1 (and N-2 up to LTO-7) only.
            raise CannotReadIncompatibleFormat(f"LTO-{cart.generation} medium")
        return cart

    def _writable(self, cart: Cartridge | None = None) -> Cartridge:
        """The cartridge, if writing at the current position is allowed."""
        cart = cart or self._medium()
        if cart.generation not in self.personality.writes:
            # LTO rules: writes only to generations N and N-1.
            raise CannotWriteIncompatibleFormat(f"LTO-{cart.generation} medium")
        if cart.write_protected:
            self.tape_alerts.add(ssc.TapeAlert.WRITE_PROTECT)
            raise WriteProtected("cartridge is write protected")
        if cart.worm and not self._worm_may_write(cart):
            # SSC-5 4.2.20: WORM medium accepts writes only at EOD or over trailing filemarks.
            raise WormOverwriteAttempted(f"object {self.pos} of {cart.object_count}")
        return cart

    def _worm_may_write(self, cart: Cartridge) -> bool:
        """Only filemarks lie between the position and EOD (WORM filemark restriction 02h)."""
        trailing_filemarks = len(cart.filemarks) - cart.filemarks_before(self.pos)
        return cart.object_count - self.pos == trailing_filemarks

    def _prepare_write(self, cart: Cartridge) -> None:
        """Tape semantics: writing at `pos` discards everything from `pos` to EOD."""
        try:
            cart.truncate(self.pos)
        except OSError as exc:
            self.write_errors += 1
            raise WriteError(str(exc)) from exc

    def _early_warning_check(self, cart: Cartridge) -> None:
        if cart.in_early_warning():
            # SSC-5 4.2.5: in the early-warning zone a write succeeds with EOM, 00h/02h, and
            # INFORMATION = residue (0: everything was written).
            raise EarlyWarning(info=0)

    # ------------------------------------------------------------------------------------------
    # READ BLOCK LIMITS, READ(6), WRITE(6), WRITE FILEMARKS

    @property
    def max_block_length(self) -> int:
        """Largest block we accept: the personality's limit and what one command can carry."""
        per_cmd = self.config.hw_max_sectors * max(self.config.block_size, 512)
        return min(self.personality.max_block_length, per_cmd)

    @command(Opcode.READ_BLOCK_LIMITS, inline=True)
    def read_block_limits(self, cmd: Command) -> int:
        if len(cmd.cdb) >= 2 and cmd.cdb[1] & 0x01:
            # SSC-5: MLOI=1 asks for the maximum logical object identifier.
            return cmd.write_data_in(ssc.build_read_block_limits_mloi((1 << 63) - 1))
        return cmd.write_data_in(
            ssc.build_read_block_limits(self.max_block_length, self.personality.min_block_length)
        )

    @command(Opcode.READ_6)
    def read6(self, cmd: Command) -> int:
        req = ssc.ReadWrite6.parse(cmd.cdb)
        with self.lock:
            cart = self._readable()
            if req.fixed and req.sili:
                # SSC-5 READ(6): SILI and FIXED both one is an illegal request.
                raise InvalidFieldInCdb("SILI with FIXED", field_pointer=1, bit_pointer=1)
            if req.fixed and self.block_length == 0:
                raise InvalidFieldInCdb("fixed-block read in variable mode", field_pointer=1,
                                        bit_pointer=0)
            if req.transfer_length == 0:
                return 0  # SSC-5: a transfer length of zero is not an error; no motion
            if req.fixed:
                return self._read_fixed(cmd, cart, req.transfer_length)
            return self._read_variable(cmd, cart, req.transfer_length, req.sili)

    def _read_object(self, cart: Cartridge, into: Sequence[memoryview]) -> tuple[RecordType, int]:
        try:
            # SSC-5 8.5.3.2 decryption modes; a DATA PROTECT 74h error leaves the position at
            # the block, so it can be read again once the right key is set.
            kind, length = cart.read(self.pos, into, policy=self.encryption.read_key)
        except DecryptionFailed as exc:
            self.read_errors += 1
            raise IntegrityValidationFailed(str(exc)) from exc
        except CorruptRecord as exc:
            self.read_errors += 1
            self.tape_alerts.add(ssc.TapeAlert.READ_FAILURE)
            raise MediumError(str(exc)) from exc
        self.pos += 1
        self.bytes_from_medium += length
        return kind, length

    def _read_variable(self, cmd: Command, cart: Cartridge, length: int, sili: bool) -> int:
        if self.pos >= cart.object_count:
            # SSC-5 4.2.x: reading at EOD: BLANK CHECK, END-OF-DATA DETECTED, residue = request.
            raise EndOfData(info=length)
        try:
            kind, actual = self._read_object(cart, slice_views(cmd.data_in, 0, length))
        except ScsiError as exc:
            # SSC-5 READ(6): a block that cannot be read (or decrypted) ends the command with
            # VALID=1 and INFORMATION = the requested transfer length (FIXED=0).
            exc.info = length
            raise
        if kind == RecordType.FILEMARK:
            # SSC-5 4.2.8: position after the filemark, FILEMARK bit, residue = request.
            raise FilemarkDetected(info=length)
        got = min(actual, length)
        self.bytes_to_initiator += got
        if actual == length:
            return got
        if sili and (actual < length or self.block_length == 0):
            # SSC-5 READ(6): with SILI and FIXED=0 no incorrect-length condition is reported
            # unless the block is longer than requested and the mode block length is non-zero.
            return got
        # SSC-5 4.2.22: ILI, INFORMATION = requested - actual (negative when the block was
        # longer); the block's first bytes are returned and the position is after it.
        raise IncorrectLength(info=length - actual, transferred=got)

    def _read_fixed(self, cmd: Command, cart: Cartridge, count: int) -> int:
        size = self.block_length
        try:
            for i in range(count):
                if self.pos >= cart.object_count:
                    raise EndOfData(info=count - i, transferred=i * size)
                try:
                    kind, actual = self._read_object(cart,
                                                     slice_views(cmd.data_in, i * size, size))
                except ScsiError as exc:
                    # SSC-5 READ(6): a block that cannot be read (or decrypted) ends the
                    # command with VALID=1, INFORMATION = requested blocks minus those read
                    # (not counting that block), and the blocks read before it transferred:
                    # the position is past them, and st counts the residue to know where it is.
                    exc.info, exc.transferred = count - i, i * size
                    raise
                if kind == RecordType.FILEMARK:
                    raise FilemarkDetected(info=count - i, transferred=i * size)
                if actual != size:
                    # SSC-5 4.2.22: INFORMATION = requested blocks minus blocks read, not
                    # counting the incorrect-length block; position is after that block.
                    raise IncorrectLength(info=count - i, transferred=i * size)
        except ScsiError as exc:  # the blocks before the one that ended the read went out
            self.bytes_to_initiator += exc.transferred or 0
            raise
        self.bytes_to_initiator += count * size
        return count * size

    @command(Opcode.WRITE_6)
    def write6(self, cmd: Command) -> None:
        req = ssc.ReadWrite6.parse(cmd.cdb)
        with self.lock:
            cart = self._medium()
            if req.sili:
                raise InvalidFieldInCdb("reserved bit", field_pointer=1, bit_pointer=1)
            if req.fixed and self.block_length == 0:
                raise InvalidFieldInCdb("fixed-block write in variable mode", field_pointer=1,
                                        bit_pointer=0)
            if req.fixed:
                size, count = self.block_length, req.transfer_length
            else:
                size, count = req.transfer_length, 1
                if size > self.max_block_length:
                    raise InvalidFieldInCdb(f"block of {size} bytes", field_pointer=2)
            # A data CDB: a Data-Out of any other size than the transfer length (fixed: count x
            # block length; variable: the length; zero: none) is refused before anything moves,
            # as LIO's target_cmd_size_check does for WRITE (ILLEGAL REQUEST 0Eh/03h).
            check_data_out(cmd, size * count, data=True)
            if req.transfer_length == 0:
                return  # SSC-5 WRITE(6): a transfer length of zero is not an error; no motion
            self._writable(cart)
            self._prepare_write(cart)
            blocks = [slice_views(cmd.data_out, i * size, size) for i in range(count)]
            try:
                cart.append(RecordType.DATA, blocks, compress=self.compression,
                            seal=self._sealer())
            except CartridgeFull as full:
                self.pos = cart.object_count
                self.bytes_from_initiator += full.written * size
                # SSC-5 4.2.5: physical end: VOLUME OVERFLOW, EOM, INFORMATION = residue
                # (blocks not written in fixed mode, the byte count in variable mode).
                raise VolumeOverflow(info=(count - full.written) if req.fixed else size) \
                    from None
            except OSError as exc:
                self.write_errors += 1
                self.tape_alerts.add(ssc.TapeAlert.WRITE_FAILURE)
                self.pos = cart.object_count
                # The initiator sees WRITE ERROR; the operator needs the cause and the file.
                log.error("%s: writing cartridge %s failed: %s", self.config.name,
                          cart.path, exc)
                raise WriteError(str(exc)) from exc
            self.pos = cart.object_count
            self.bytes_from_initiator += size * count
            self.bytes_to_medium += size * count
            self._early_warning_check(cart)

    def _sealer(self) -> Callable[[int, bytes, bool], bytes] | None:
        """How records are sealed now: SSC-5 8.5.3.2 ENCRYPTION MODE ENCRYPT, else clear."""
        key = self.encryption.encrypting
        if key is None:
            return None
        rdmd = self.encryption.raw_protect

        def seal(obj: int, plain: bytes, compressed: bool) -> bytes:
            return key.seal(obj, plain, compressed=compressed, rdmd=rdmd)

        return seal

    # ------------------------------------------------------------------------------------------
    # SECURITY PROTOCOL IN / OUT (SPC-5 6.40 / 6.41, tape data encryption SSC-5 8.5)

    @command(Opcode.SECURITY_PROTOCOL_IN)
    def security_protocol_in(self, cmd: Command) -> int:
        cdb = cmd.cdb
        if cdb[4] & 0x80:
            # SPC-5 6.40: INC_512 asks for 512-byte units; the pages are counted in bytes.
            raise InvalidFieldInCdb("INC_512", field_pointer=4, bit_pointer=7)
        protocol, page = cdb[1], int.from_bytes(cdb[2:4], "big")
        with self.lock:
            nb = None
            gen = None
            if self.state is DriveState.LOADED and self.cartridge is not None:
                gen = self.cartridge.generation
                kind, env = self.cartridge.next_object(self.pos)
                nb = NextBlock(self.pos, kind, env)
            data = self.encryption.spin(protocol, page, loaded_generation=gen, next_block=nb)
        # SPC-5 6.40 / 4.2.5.6: at most ALLOCATION LENGTH bytes (bytes 6-9), not an error.
        return cmd.write_data_in(data[: int.from_bytes(cdb[6:10], "big")])

    @command(Opcode.SECURITY_PROTOCOL_OUT, inline=True)
    def security_protocol_out(self, cmd: Command) -> None:
        cdb = cmd.cdb
        if cdb[4] & 0x80:
            raise InvalidFieldInCdb("INC_512", field_pointer=4, bit_pointer=7)
        length = int.from_bytes(cdb[6:10], "big")
        # SPC-5 6.41: TRANSFER LENGTH bytes of parameter data (bytes 6-9).
        check_data_out(cmd, length, field_pointer=6)
        data = cmd.read_data_out(length) if length else b""
        with self.lock:
            self.encryption.spout(cdb[1], int.from_bytes(cdb[2:4], "big"), bytes(data))

    @command(Opcode.WRITE_FILEMARKS_6)
    def write_filemarks(self, cmd: Command) -> None:
        req = ssc.WriteFilemarks6.parse(cmd.cdb)
        with self.lock:
            cart = self._medium()
            if req.wsmk:
                raise InvalidFieldInCdb("setmarks unsupported", field_pointer=1, bit_pointer=1)
            if req.count:
                self._writable(cart)
                self._prepare_write(cart)
                try:
                    cart.append_filemarks(req.count)  # bounded by what fits, not by COUNT
                except CartridgeFull as full:
                    self.pos = cart.object_count
                    # SSC-5 4.2.5: physical end: VOLUME OVERFLOW, EOM, INFORMATION = the
                    # filemarks not written.
                    raise VolumeOverflow(info=req.count - full.written) from None
                self.pos = cart.object_count
            # SSC-5 WRITE FILEMARKS: buffered data is written to the medium, even with count 0.
            self._sync(cart)
            if req.count:
                self._early_warning_check(cart)

    def _sync(self, cart: Cartridge) -> None:
        try:
            cart.sync()
        except OSError as exc:
            self.write_errors += 1
            raise WriteError(f"flush failed: {exc}") from exc

    # ------------------------------------------------------------------------------------------
    # Positioning: SPACE, LOCATE, REWIND, READ POSITION

    @command(Opcode.SPACE_6)
    @command(Opcode.SPACE_16)
    def space(self, cmd: Command) -> None:
        req = ssc.Space.parse(cmd.cdb)
        with self.lock:
            cart = self._readable()
            if req.parameter_length:
                raise InvalidFieldInCdb("SPACE(16) parameter length", field_pointer=12)
            if req.code == ssc.SpaceCode.END_OF_DATA:
                self.pos = cart.object_count
            elif req.count == 0:
                return  # SSC-5 SPACE: a count of zero causes no motion
            elif req.code == ssc.SpaceCode.BLOCKS:
                self._space_blocks(cart, req.count)
            elif req.code == ssc.SpaceCode.FILEMARKS:
                self._space_filemarks(cart, req.count)
            elif req.code == ssc.SpaceCode.SEQUENTIAL_FILEMARKS:
                self._space_sequential(cart, req.count)
            else:
                raise InvalidFieldInCdb(f"space code {req.code}", field_pointer=1, bit_pointer=3)

    def _space_blocks(self, cart: Cartridge, count: int) -> None:
        fms, n, p = cart.filemarks, cart.object_count, self.pos
        if count > 0:
            k = cart.filemarks_before(p)
            nxt = fms[k] if k < len(fms) else None
            if nxt is not None and nxt < p + count:
                # SSC-5 SPACE: a filemark stops forward motion after it; residue in INFORMATION.
                self.pos = nxt + 1
                raise FilemarkDetected(info=count - (nxt - p))
            if p + count > n:
                self.pos = n
                raise EndOfData(info=count - (n - p))
            self.pos = p + count
        else:
            want = -count
            k = cart.filemarks_before(p)
            prev = fms[k - 1] if k > 0 else None
            if prev is not None and prev >= p - want:
                # Backward motion stops on the BOP side of the filemark.
                self.pos = prev
                raise FilemarkDetected(info=want - (p - 1 - prev))
            if p - want < 0:
                self.pos = 0
                raise BeginningOfPartition(info=want - p)
            self.pos = p - want

    def _space_filemarks(self, cart: Cartridge, count: int) -> None:
        fms, p = cart.filemarks, self.pos
        k = cart.filemarks_before(p)
        if count > 0:
            if k + count <= len(fms):
                self.pos = fms[k + count - 1] + 1
                return
            self.pos = cart.object_count
            raise EndOfData(info=count - (len(fms) - k))
        want = -count
        if k - want >= 0:
            self.pos = fms[k - want]  # SSC-5: on the BOP side of the last filemark passed
            return
        self.pos = 0
        raise BeginningOfPartition(info=want - k)

    def _space_sequential(self, cart: Cartridge, count: int) -> None:
        fms, p = cart.filemarks, self.pos
        want = abs(count)
        if count > 0:
            k = cart.filemarks_before(p)
            run_start, run = -1, 0
            for f in fms[k:]:
                if run and f == run_start + run:
                    run += 1
                else:
                    run_start, run = f, 1
                if run == want:
                    self.pos = run_start + want
                    return
            self.pos = cart.object_count
            raise EndOfData()
        k = cart.filemarks_before(p)
        run_end, run = -1, 0
        for f in reversed(fms[:k]):
            if run and f == run_end - run:
                run += 1
            else:
                run_end, run = f, 1
            if run == want:
                self.pos = f  # BOP side of the first filemark of the set
                return
        self.pos = 0
        raise BeginningOfPartition()

    @command(Opcode.LOCATE_10)
    @command(Opcode.LOCATE_16)
    def locate(self, cmd: Command) -> None:
        req = ssc.Locate.parse(cmd.cdb)
        with self.lock:
            cart = self._readable()
            if req.change_partition:
                # SSC-5 LOCATE: CP = 1 changes to PARTITION before locating in it.
                if req.partition >= cart.partition_count:
                    raise InvalidFieldInCdb(
                        f"partition {req.partition} of {cart.partition_count}",
                        field_pointer=8 if cmd.opcode == Opcode.LOCATE_10 else 3,
                    )
                if req.partition != cart.partition:
                    self._sync(cart)
                    cart.select_partition(req.partition)
                    self.pos = 0
            n = cart.object_count
            if req.dest_type == ssc.DestType.END_OF_DATA:
                self.pos = n
                return
            if req.dest_type == ssc.DestType.LOGICAL_OBJECT:
                target = req.identifier
            elif req.dest_type == ssc.DestType.LOGICAL_FILE:
                fms = cart.filemarks
                if req.identifier == 0:
                    target = 0
                elif req.identifier <= len(fms):
                    target = fms[req.identifier - 1] + 1
                else:
                    target = n + 1
            else:
                raise InvalidFieldInCdb(f"dest type {req.dest_type}", field_pointer=1,
                                        bit_pointer=5)
            if target > n:
                # SSC-5 LOCATE: EOD before the destination: BLANK CHECK, positioned at EOD.
                self.pos = n
                raise EndOfData()
            self.pos = target

    @command(Opcode.REWIND)
    def rewind(self, cmd: Command) -> None:
        with self.lock:
            cart = self._medium()
            self._sync(cart)
            self.pos = 0

    def position(self) -> ssc.Position:
        """Current position as READ POSITION reports it (requires a loaded cartridge)."""
        cart = self._medium()
        return ssc.Position(
            partition=cart.partition,
            object_id=self.pos,
            file_id=cart.filemarks_before(self.pos),
            bop=self.pos == 0,
            eop=cart.in_early_warning(self.pos),
            bpew=False,
        )

    @command(Opcode.READ_POSITION)
    def read_position(self, cmd: Command) -> int:
        req = ssc.ReadPosition.parse(cmd.cdb)
        with self.lock:
            form = req.service_action
            if form in (ssc.ReadPositionForm.SHORT, ssc.ReadPositionForm.SHORT_VENDOR):
                data = ssc.build_read_position_short(self.position())
            elif req.service_action == ssc.ReadPositionForm.LONG:
                data = ssc.build_read_position_long(self.position())
            elif req.service_action == ssc.ReadPositionForm.EXTENDED:
                data = ssc.build_read_position_extended(self.position())[: req.allocation_length]
            else:
                raise InvalidFieldInCdb(f"service action {req.service_action:#x}",
                                        field_pointer=1, bit_pointer=4)
        return cmd.write_data_in(data)

    # ------------------------------------------------------------------------------------------
    # LOAD UNLOAD, ERASE, PREVENT ALLOW MEDIUM REMOVAL

    @command(Opcode.LOAD_UNLOAD)
    def load_unload(self, cmd: Command) -> None:
        req = ssc.LoadUnload.parse(cmd.cdb)
        with self.lock:
            if req.load and req.eot:
                raise InvalidFieldInCdb("EOT with LOAD", field_pointer=4, bit_pointer=2)
            if self.state is DriveState.EMPTY:
                raise MediumNotPresent("no cartridge in the drive")
            if req.load:
                if self.state in (DriveState.UNLOADED, DriveState.FAILED):
                    self._load(attention=False)
                    self.check_ready()
                elif self.cartridge is not None:
                    self._sync(self.cartridge)
                    self.cartridge.select_partition(0)  # SSC-5 LOAD UNLOAD: BOP of partition 0
                    self.pos = 0
                return
            if self.prevented:
                # SSC-5 LOAD UNLOAD: unloading while removal is prevented is refused.
                self.tape_alerts.add(ssc.TapeAlert.NO_REMOVAL)
                raise MediumRemovalPrevented("PREVENT MEDIUM REMOVAL is in effect")
            self._close_cartridge()
            self.pos = 0
            self.state = DriveState.UNLOADED

    @command(Opcode.ERASE_6)
    def erase(self, cmd: Command) -> None:
        ssc.Erase6.parse(cmd.cdb)
        with self.lock:
            cart = self._writable()
            # SSC-5 ERASE(6): erases from the current position to the end; EOD is written here.
            self._prepare_write(cart)
            self._sync(cart)

    @command(Opcode.ALLOW_OVERWRITE)
    def allow_overwrite(self, cmd: Command) -> None:
        """Accepted as a no-op: this drive never runs in append-only mode, so overwriting is
        always allowed (SSC-5 4.2.x); the fields are still checked."""
        req = ssc.AllowOverwrite.parse(cmd.cdb)
        with self.lock:
            self._medium()
            if req.allow_overwrite > 2:
                raise InvalidFieldInCdb(f"ALLOW OVERWRITE {req.allow_overwrite}", field_pointer=2)
            if req.partition != self._medium().partition:
                raise InvalidFieldInCdb(f"partition {req.partition}", field_pointer=3)
            if req.allow_overwrite == 1 and req.identifier != self.pos:
                # SSC-5 ALLOW OVERWRITE: the identifier must name the current position.
                raise SequentialPositioningError(
                    f"object {req.identifier} is not the current position {self.pos}",
                    sense_key=SenseKey.ILLEGAL_REQUEST,
                )

    @command(Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL)
    def prevent_allow(self, cmd: Command) -> None:
        req = cdbs.PreventAllow.parse(cmd.cdb)
        if req.prevent > 1:
            raise InvalidFieldInCdb(f"PREVENT {req.prevent}", field_pointer=4, bit_pointer=1)
        with self.lock:
            self.prevented = bool(req.prevent)
        # Outside self.lock: the library may hold its own lock while calling our listener.
        self.library.set_drive_prevent(self.drive_index, bool(req.prevent))

    # ------------------------------------------------------------------------------------------
    # REPORT DENSITY SUPPORT

    def _density_descriptor(self, gen: pers.Generation) -> ssc.DensityDescriptor:
        return ssc.DensityDescriptor(
            primary_code=gen.density_code,
            secondary_code=gen.density_code,
            writable=gen.number in self.personality.writes,
            default=gen.number == self.personality.generation,
            bits_per_mm=gen.bits_per_mm,
            media_width=127,
            tracks=gen.tracks,
            capacity_mb=gen.capacity // 10**6,
            organization="LTO-CVE",
            name=gen.density_name,
            description=gen.description,
        )

    @command(Opcode.REPORT_DENSITY_SUPPORT)
    def report_density_support(self, cmd: Command) -> int:
        req = ssc.ReportDensitySupport.parse(cmd.cdb)
        with self.lock:
            if req.media:
                cart = self._medium()
                gens = [pers.GENERATIONS[cart.generation]]
            else:
                gens = self.personality.densities
            if req.medium_type:
                descs = []
                for g in gens:
                    types = [(False, "")] if req.media else [(False, ""), (True, " WORM")]
                    if req.media:
                        assert self.cartridge is not None
                        types = [(self.cartridge.worm, " WORM" if self.cartridge.worm else "")]
                    for worm, suffix in types:
                        media = pers.MediaType(
                            pers.MediumKind.WORM if worm else pers.MediumKind.DATA, g.number
                        )
                        descs.append(
                            ssc.MediumTypeDescriptor(
                                medium_type=media.ibm_medium_type,
                                density_codes=(g.density_code,),
                                media_width=127,
                                medium_length=g.medium_length_m,
                                organization="LTO-CVE",
                                name=f"U-{g.number}{'W' if worm else ''}",
                                description=f"Ultrium {g.number}{suffix}",
                            )
                        )
                data = ssc.build_medium_type_support(descs)
            else:
                descs_d = [self._density_descriptor(g) for g in gens]
                if req.media and self.cartridge is not None and self.cartridge.write_protected:
                    descs_d = [dataclasses.replace(d, writable=False) for d in descs_d]
                data = ssc.build_density_support(descs_d)
        return cmd.write_data_in(data[: req.allocation_length])

    # ------------------------------------------------------------------------------------------
    # MODE SENSE / SELECT hooks

    def block_descriptors(self) -> list[tuple[int, int, int]]:
        with self.lock:
            density = self.cartridge.media.generation if self.cartridge is not None else None
            code = pers.GENERATIONS[density].density_code if density else 0
            return [(code, 0, self.block_length)]

    def device_specific_parameter(self) -> int:
        with self.lock:
            wp = False
            cart = self.cartridge
            if cart is not None:
                wp = cart.write_protected or cart.generation not in self.personality.writes
            # SSC-5 8.3.1: WP bit 7, BUFFERED MODE 001b (bits 6..4), SPEED 0.
            return (0x80 if wp else 0) | 0x10

    def apply_block_descriptor(self, density: int, blocks: int, block_length: int) -> None:
        with self.lock:
            allowed = {0x00, 0x7F}
            if self.cartridge is not None:
                allowed.add(pers.GENERATIONS[self.cartridge.generation].density_code)
            else:
                allowed.update(pers.GENERATIONS[g].density_code for g in self.personality.writes)
            if density not in allowed:
                raise InvalidFieldInParameterList(f"density {density:#x}", field_pointer=0)
            if block_length and not (
                self.personality.min_block_length <= block_length <= self.max_block_length
            ):
                raise InvalidFieldInParameterList(f"block length {block_length}", field_pointer=5)
            self.block_length = block_length

    def mode_pages(self) -> list[spc.ModePage]:
        with self.lock:
            cart = self.cartridge
            sizes_mb = [n // 10**6 for n in cart.partition_sizes] if cart is not None else [0]
            pages = [
                ssc.data_compression_page(self.compression),
                ssc.device_configuration_page(
                    self.compression, active_partition=cart.partition if cart is not None else 0
                ),
                ssc.device_configuration_extension_page(),
                ssc.medium_partition_page(sizes_mb, self._max_additional_partitions()),
                ssc.medium_configuration_page(bool(cart is not None and cart.worm)),
            ]
        out = super().mode_pages()
        for cur, chg in pages:
            subpage = cur[1] if cur[0] & 0x40 else 0  # SPC-5 7.5.7: SPF selects sub_page format
            hl = 4 if subpage else 2
            code = cur[0] & 0x3F
            out.append(spc.ModePage.make(code, subpage, cur[hl:], chg[hl:],
                                         fields=ssc.MODE_PAGE_FIELDS.get((code, subpage), ())))
        return out

    @command(Opcode.MODE_SENSE_6)
    @command(Opcode.MODE_SENSE_10)
    def mode_sense(self, cmd: Command) -> int:
        """SPC MODE SENSE with two tape additions the Linux st driver depends on.

        * Page code 00h (no page format) returns the header and block descriptor only: st reads
          the density, block length and write-protect bit that way when it opens the device.
        * The header's MEDIUM TYPE is the loaded cartridge's (IBM LTO values, WORM included).
        """
        req = cdbs.ModeSense.parse(cmd.cdb)
        with self.lock:
            pages = self._current_mode_pages()
            cart = self.cartridge
            medium_type = cart.media.ibm_medium_type if cart is not None else 0
        page_code, subpage = req.page_code, req.subpage_code
        if page_code == 0 and subpage == 0:
            pages, page_code = [], 0x3F  # SPC-5 7.5.1: page 00h has no page format
        data = spc.build_mode_sense(
            pages,
            ten=cmd.opcode == Opcode.MODE_SENSE_10,
            pc=req.pc,
            page_code=page_code,
            subpage=subpage,
            dbd=req.dbd,
            block_descriptors=self.block_descriptors(),
            device_specific=self.device_specific_parameter(),
            llbaa=req.llbaa,
            medium_type=medium_type,
            peripheral_type=self.peripheral_type,
        )
        return cmd.write_data_in(spc.truncate(data, req.allocation_length))

    def _max_additional_partitions(self) -> int:
        """MAXIMUM ADDITIONAL PARTITIONS of page 11h: by the loaded medium's generation (the
        drive's when empty): 3 from LTO-7, 1 on LTO-5/6, 0 before (and on media this drive
        cannot write)."""
        cart = self.cartridge
        gen = self.personality.generation if cart is None else cart.generation
        if cart is not None and (cart.cleaning or gen not in self.personality.writes):
            return 0
        return 3 if gen >= 7 else 1 if gen >= 5 else 0

    def check_mode_page(self, page: spc.ModePage, body: bytes, offset: int) -> bytes:
        if page.page_code == 0x0F and page.subpage == 0:
            # SSC-5 8.3.3: an algorithm the drive does not have, named by its field; 00h (no
            # compression) with DCE zero, as Linux st sends it, is the drive's own.
            body = ssc.accept_compression_algorithms(body, offset)
        if page.page_code != 0x11 or page.subpage != 0:
            return super().check_mode_page(page, body, offset)
        # SSC-5 8.3.6: the page length follows the number of size descriptors sent.
        cart = self._medium()
        ssc.parse_medium_partition_select(body, offset, page.current, cart.medium_capacity)
        return bytes(body)

    def mode_page_changed(self, page_code: int, subpage: int, new_current: bytes) -> None:
        if page_code == 0x11 and subpage == 0:
            cart = self._medium()
            sizes = ssc.parse_medium_partition_select(
                new_current, 0, self._current_page(0x11), cart.medium_capacity
            )
            if sizes is not None:  # POFM 1: FORMAT MEDIUM makes them (SSC-5 8.3.6)
                self._pending_partitions = sizes
            self.forget_mode_page(0x11)  # MODE SENSE shows the medium's partitions
            return
        if page_code == 0x0F and subpage == 0:
            self.compression = bool(new_current[2] & 0x80)  # SSC-5 8.3.3 DCE
        elif page_code == 0x10 and subpage == 0:
            self.compression = new_current[14] != 0  # SSC-5 8.3.4 SELECT DATA COMPRESSION ALG.
        else:
            super().mode_page_changed(page_code, subpage, new_current)
            return
        # Both pages are views of one setting: rebuild them from it rather than keeping a copy.
        self.forget_mode_page(0x0F)
        self.forget_mode_page(0x10)

    def _current_page(self, page_code: int) -> bytes:
        for page in self.mode_pages():
            if page.page_code == page_code and page.subpage == 0:
                return page.current
        raise KeyError(page_code)

    # ------------------------------------------------------------------------------------------
    # FORMAT MEDIUM

    @command(Opcode.FORMAT_UNIT)
    def format_medium(self, cmd: Command) -> None:
        """SSC-5 FORMAT MEDIUM: FORMAT 0 makes one partition, 1 the partitions the last MODE
        SELECT of page 11h asked for (the current ones if none), 2 both in turn (the same as 1
        here). Erases everything; the medium must be at BOP of partition 0."""
        req = ssc.FormatMedium.parse(cmd.cdb)
        if req.format > 2:
            raise InvalidFieldInCdb(f"FORMAT {req.format}", field_pointer=2, bit_pointer=3)
        if req.transfer_length:
            raise InvalidFieldInCdb(
                f"TRANSFER LENGTH {req.transfer_length}: no format parameters", field_pointer=3
            )
        with self.lock:
            cart = self._writable()
            if cart.worm:
                raise WormOverwriteAttempted("FORMAT MEDIUM of a WORM cartridge")
            if cart.partition != 0 or self.pos != 0:
                # SSC-5 FORMAT MEDIUM: only at the beginning of partition 0.
                raise PositionPastBeginningOfMedium(
                    f"partition {cart.partition} object {self.pos}")
            if req.format == 0:
                sizes = [cart.medium_capacity]
            elif self._pending_partitions is not None:
                sizes = self._pending_partitions
            else:
                sizes = cart.partition_sizes
            try:
                cart.format(sizes)
            except OSError as exc:
                self.write_errors += 1
                log.error("drive %d: FORMAT MEDIUM of %s: %s", self.drive_index, cart.barcode,
                          exc)
                raise WriteError(f"{cart.barcode}: format: {exc}") from exc
            self._pending_partitions = None
            self.pos = 0

    # ------------------------------------------------------------------------------------------
    # VPD and LOG SENSE

    def vpd_pages(self) -> dict[int, Callable[[], bytes]]:
        pages = super().vpd_pages()
        pt = self.peripheral_type
        # SSC-5 8.6.2 Sequential-access device capabilities: WORM supported (byte 4 bit 0).
        pages[0xB0] = lambda: bytes([pt, 0xB0, 0x00, 0x02, 0x01, 0x00])
        # SSC-5 8.6.3 Manufacturer-assigned serial number.
        pages[0xB1] = lambda: ssc.build_vpd_manufacturer_serial(pt, self.serial)
        # SSC-5 8.6.4 TapeAlert supported flags: bitmap, flag 01h = byte 4 bit 7.
        def b2() -> bytes:
            bitmap = 0
            for flag in ssc.TapeAlert:
                bitmap |= 1 << (64 - flag)
            return bytes([pt, 0xB2, 0x00, 0x0C]) + bitmap.to_bytes(8, "big") + bytes(4)
        pages[0xB2] = b2
        return pages

    def log_pages(self) -> dict[tuple[int, int], Callable[[], bytes]]:
        pages = super().log_pages()
        pages[(0x02, 0)] = lambda: ssc.error_counter_page(
            0x02, bytes_processed=self.bytes_to_medium, uncorrected=self.write_errors
        )
        pages[(0x03, 0)] = lambda: ssc.error_counter_page(
            0x03, bytes_processed=self.bytes_from_medium, uncorrected=self.read_errors
        )
        pages[(0x0C, 0)] = lambda: ssc.sequential_access_page(
            written_in=self.bytes_from_initiator,
            written_media=self.bytes_to_medium,
            read_media=self.bytes_from_medium,
            read_out=self.bytes_to_initiator,
            cleaning=False,
        )
        pages[(0x2E, 0)] = self._tape_alert_log
        pages[(0x31, 0)] = self._capacity_log
        return pages

    def _tape_alert_log(self) -> bytes:
        with self.lock:
            flags = self._alerts_shown = set(self.tape_alerts)
        return ssc.tape_alert_page(flags)

    def log_page_sent(self, key: tuple[int, int], pc: int, *, whole: bool) -> None:
        """SSC-5 8.2.4: TapeAlert flags are cleared once read: those a LOG SENSE of the current
        values delivered whole (not one refused, nor a header read to size the page, as
        sg_logs does first); a flag raised since stays."""
        if key == (0x2E, 0) and pc == 1 and whole:
            with self.lock:
                self.tape_alerts -= self._alerts_shown

    def _capacity_log(self) -> bytes:
        with self.lock:
            cart = self.cartridge
            if cart is None:
                return ssc.tape_capacity_page(0, 0)
            # Partition 0 under the main codes, partition 1 under the alternate ones, whichever
            # is active (before: the active one's under the main codes, the alternate ones 0).
            figures = [(rem // MIB, cap // MIB) for rem, cap in cart.partition_figures()]
            (main_rem, main_cap), (alt_rem, alt_cap) = (figures + [(0, 0)])[:2]
            return ssc.tape_capacity_page(main_rem, main_cap, alt_rem, alt_cap)

    # ------------------------------------------------------------------------------------------
    # READ ATTRIBUTE / WRITE ATTRIBUTE (cartridge memory)

    def _device_attributes(self, cart: Cartridge) -> list[ssc.Attribute]:
        gen = pers.GENERATIONS[cart.generation]
        host = cart.mam_attributes
        used = sum(5 + len(v) for _, v in host.values())
        media_type = 0x01 if cart.cleaning else 0x80 if cart.worm else 0x00
        alerts = 0
        for flag in self.tape_alerts:
            alerts |= 1 << (64 - flag)
        a, B, ASC = ssc.Attribute, ssc.AttributeFormat.BINARY, ssc.AttributeFormat.ASCII
        ident = ssc.MamId

        def asc(text: str, n: int) -> bytes:
            return spc.ascii_text(text).encode("ascii")[:n].ljust(n)

        def u(value: int, n: int) -> bytes:
            return max(0, min(value, (1 << (8 * n)) - 1)).to_bytes(n, "big")

        return [
            a(ident.REMAINING_CAPACITY, B, u(cart.remaining // MIB, 8), True),
            a(ident.MAXIMUM_CAPACITY, B, u(cart.capacity // MIB, 8), True),
            a(ident.TAPEALERT_FLAGS, B, u(alerts, 8), True),
            a(ident.LOAD_COUNT, B, u(cart.mam_counter("load_count"), 8), True),
            a(ident.MAM_SPACE_REMAINING, B, u(MAM_HOST_SPACE - used, 8), True),
            a(ident.ASSIGNING_ORGANIZATION_DEVICE, ASC, asc("LTO-CVE", 8), True),
            a(ident.FORMATTED_DENSITY_CODE, B, u(gen.density_code, 1), True),
            a(ident.INITIALIZATION_COUNT, B, u(0, 2), True),
            a(ident.DEVICE_AT_LAST_LOAD, ASC, asc(self.vendor, 8) + asc(self.serial, 32), True),
            a(ident.TOTAL_MB_WRITTEN, B, u(cart.mam_counter("mb_written")
                                            + cart.bytes_written // 10**6, 8), True),
            a(ident.TOTAL_MB_READ, B, u(cart.mam_counter("mb_read")
                                         + cart.bytes_read // 10**6, 8), True),
            a(ident.MEDIUM_MANUFACTURER, ASC, asc("TCMU-PY", 8), True),
            a(ident.MEDIUM_SERIAL_NUMBER, ASC, asc(cart.barcode, 32), True),
            a(ident.MEDIUM_LENGTH, B, u(gen.medium_length_m, 4), True),
            a(ident.MEDIUM_WIDTH, B, u(127, 4), True),
            a(ident.ASSIGNING_ORGANIZATION_MEDIUM, ASC, asc("LTO-CVE", 8), True),
            a(ident.MEDIUM_DENSITY_CODE, B, u(gen.density_code, 1), True),
            a(ident.MAM_CAPACITY, B, u(MAM_HOST_SPACE, 8), True),
            a(ident.MEDIUM_TYPE, B, u(media_type, 1), True),
            a(ident.MEDIUM_TYPE_INFORMATION, B, u(0, 2), True),
        ]

    def _all_attributes(self, cart: Cartridge) -> list[ssc.Attribute]:
        attrs = {a.identifier: a for a in self._device_attributes(cart)}
        for ident, (fmt, value) in cart.mam_attributes.items():
            attrs[ident] = ssc.Attribute(ident, fmt, value)
        return [attrs[k] for k in sorted(attrs)]

    def _attribute_target(self, cmd: Command, volume: int, partition: int) -> Cartridge:
        cart = self._medium()
        if volume != 0:
            raise InvalidFieldInCdb(f"logical volume {volume}", field_pointer=5)
        if partition >= cart.partition_count:  # one cartridge memory serves every partition
            raise InvalidFieldInCdb(f"partition {partition}", field_pointer=7)
        return cart

    @command(Opcode.READ_ATTRIBUTE)
    def read_attribute(self, cmd: Command) -> int:
        req = ssc.ReadAttribute.parse(cmd.cdb)
        with self.lock:
            sa = req.service_action
            if sa in (ssc.AttributeAction.LOGICAL_VOLUME_LIST, ssc.AttributeAction.PARTITION_LIST):
                self._medium()
                data = ssc.build_volume_list(0, 1)
            else:
                cart = self._attribute_target(cmd, req.logical_volume, req.partition)
                attrs = self._all_attributes(cart)
                if sa == ssc.AttributeAction.VALUES:
                    ids = [a.identifier for a in attrs]
                    if req.first_attribute not in ids:
                        # Like IBM LTO drives: asking from an attribute that does not exist is
                        # an invalid field (LTFS relies on it to detect absent attributes).
                        raise InvalidFieldInCdb(
                            f"attribute {req.first_attribute:#06x} not present", field_pointer=8
                        )
                    data = ssc.build_attribute_values(
                        [a for a in attrs if a.identifier >= req.first_attribute]
                    )
                elif sa == ssc.AttributeAction.LIST:
                    data = ssc.build_attribute_list([a.identifier for a in attrs])
                elif sa == ssc.AttributeAction.SUPPORTED_ATTRIBUTES:
                    ids = [a.identifier for a in self._device_attributes(cart)]
                    ids += list(ssc.HOST_ATTRIBUTE_RULES)
                    ids.append(ssc.MamId.VOLUME_COHERENCY_INFORMATION)
                    data = ssc.build_attribute_list(sorted(set(ids)))
                else:
                    raise InvalidFieldInCdb(f"service action {sa:#x}", field_pointer=1)
        return cmd.write_data_in(data[: req.allocation_length])

    @command(Opcode.WRITE_ATTRIBUTE)
    def write_attribute(self, cmd: Command) -> None:
        req = ssc.WriteAttribute.parse(cmd.cdb)
        # SPC-5 6.48: a Data-Out shorter than PARAMETER LIST LENGTH (bytes 10-13) is refused
        # before any attribute changes (INVALID FIELD IN CDB, as LIO for a control CDB).
        check_data_out(cmd, req.parameter_list_length, field_pointer=10)
        with self.lock:
            cart = self._attribute_target(cmd, req.logical_volume, req.partition)
            if req.parameter_list_length == 0:
                return
            if req.parameter_list_length < 4:
                raise ParameterListLengthError("WRITE ATTRIBUTE list shorter than its header")
            attrs = ssc.parse_attribute_list(cmd.read_data_out(req.parameter_list_length))
            changes: dict[int, tuple[int, bytes] | None] = {}
            offset = 4
            for attr in attrs:
                # SPC-5 6.48: the whole list is rejected if any attribute is not writable.
                if not ssc.host_attribute_writable(attr.identifier):
                    raise InvalidFieldInParameterList(
                        f"attribute {attr.identifier:#06x} is read-only", field_pointer=offset
                    )
                rule = ssc.HOST_ATTRIBUTE_RULES.get(attr.identifier)
                if rule is not None and attr.value and (
                    attr.format != rule[0] or len(attr.value) > rule[1]
                ):
                    raise InvalidFieldInParameterList(
                        f"attribute {attr.identifier:#06x} format/length", field_pointer=offset + 2
                    )
                changes[attr.identifier] = (attr.format, attr.value) if attr.value else None
                offset += 5 + len(attr.value)
            merged = dict(cart.mam_attributes)
            for ident, val in changes.items():
                if val is None:
                    merged.pop(ident, None)
                else:
                    merged[ident] = val
            if sum(5 + len(v) for _, v in merged.values()) > MAM_HOST_SPACE:
                raise AuxiliaryMemoryOutOfSpace("cartridge memory full")
            try:
                cart.set_mam_attributes(changes)
            except OSError as exc:
                if exc.errno in NO_ROOM_ERRNOS:
                    # SPC-5 6.48: no room to store the attributes (the backing filesystem is
                    # full): AUXILIARY MEMORY OUT OF SPACE, nothing changed; not a damaged medium.
                    raise AuxiliaryMemoryOutOfSpace(f"cartridge memory: {exc}") from exc
                raise WriteError(f"cartridge memory: {exc}") from exc


def open_drive(
    config: DeviceConfig, library: LibraryLink, drive_index: int, model: str | None = None
) -> TapeDrive:
    """Create the drive for element `drive_index`; `model` overrides `library.drive_model`."""
    personality = pers.personality(model) if model else None
    return TapeDrive(config, library, drive_index, personality=personality)


__all__ = [
    "DriveState",
    "LibraryLink",
    "NotReadyInitializingCommandRequired",
    "TapeDrive",
    "open_drive",
    "slice_views",
]
