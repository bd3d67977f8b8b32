"""The medium changer LUN (SMC-3, peripheral type 08h) of a virtual tape library.

Theory of operation
-------------------
The changer has no state of its own: every element's contents, the import/export lock and the
open import/export elements live in the shared `Library`, which persists each change before the
command completes. This class translates CDBs into `Library` calls and library state into READ
ELEMENT STATUS data and mode pages; errors are the `Library`'s SMC exceptions, given a field
pointer here when a CDB field names a bad element.

Commands run one at a time in arrival order (`serial_commands`), as on a real robot: a MOVE
MEDIUM is finished (and durable) before the next command is looked at.

Facts from the initiators this must satisfy:

* Linux `ch` reads mode page 1Dh with MODE SENSE(6) (DBD=0, then DBD=1 on failure), sends
  INITIALIZE ELEMENT STATUS at probe, then READ ELEMENT STATUS per data transfer element with
  VOLTAG=1, NUMBER OF ELEMENTS 1, allocation length 255, and compares bytes 16..17 with the
  address it asked for; it retries without VOLTAG if that fails. It passes a transport address
  from page 1Dh in MOVE/EXCHANGE/POSITION.
* `mtx` (1.3, mtxl.c) reads page 1Dh with MODE SENSE(6) DBD=1, allocation 136; then READ
  ELEMENT STATUS per element type (VOLTAG=1; retried without VOLTAG on any error) with an
  allocation length it estimates, asking again with BYTE COUNT OF REPORT AVAILABLE + 8 when that
  is larger. Its alternative scan asks for all types from address 0 onward, restarting after the
  last address reported, until INVALID ELEMENT ADDRESS; an element at address 0 ends its scan.
  MOVE/EXCHANGE/POSITION carry the transport address of the report; `mtx unload` returns a
  cartridge to its SOURCE STORAGE ELEMENT ADDRESS; `eepos` puts vendor bits in the CONTROL byte
  (ignored); `mtx inventory` is INITIALIZE ELEMENT STATUS; `lock`/`unlock` are PREVENT ALLOW.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from itertools import groupby

from tcmu_py.device.command import Command, Response
from tcmu_py.device.core import ScsiDevice, command
from tcmu_py.errors import ConfigError
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl.changer_personality import (
    CHANGER_PERSONALITIES,
    ChangerPersonality,
    stk_media_bytes,
    stk_transport_bytes,
)
from tcmu_py.handlers.vtl.library import Library, LibraryStateError, Occupant, medium_type_for
from tcmu_py.handlers.vtl.personality import personality
from tcmu_py.scsi import cdb as cdbs
from tcmu_py.scsi import smc, spc
from tcmu_py.scsi.constants import CodeSet, DesignatorType, Opcode, PeripheralType
from tcmu_py.scsi.sense import ImportExportElementAccessed, InvalidElementAddress, InvalidFieldInCdb
from tcmu_py.scsi.smc import (
    ACCESS,
    EXENAB,
    FULL,
    IMPEXP,
    INENAB,
    ElementDescriptor,
    ElementStatusPage,
    ElementType,
    VolumeTag,
)

#: Element types that can hold a cartridge, and between which the transport moves/exchanges.
_HOLDERS = (ElementType.STORAGE, ElementType.IMPORT_EXPORT, ElementType.DATA_TRANSFER)


class Changer(ScsiDevice):
    """SMC-3 medium changer over a `Library`. `on_close` runs once when the device closes."""

    peripheral_type = PeripheralType.CHANGER
    removable = True  # SPC-5 6.7.2: RMB; medium changers report their media as removable
    serial_commands = True
    vendor = "TCMU-PY"
    product = "VTL LIBRARY"
    revision = "0100"

    def __init__(
        self, config: DeviceConfig, library: Library, on_close: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        self.library = library
        ident = library.changer_identity
        self.vendor, self.product, self.revision = ident.vendor, ident.product, ident.revision
        self._on_close = on_close
        library.add_change_listener(self._operator_access)

    def close(self) -> None:
        self.library.remove_change_listener(self._operator_access)
        on_close, self._on_close = self._on_close, None
        super().close()
        if on_close is not None:
            on_close()

    def execute(self, cmd: Command) -> Response | Future[Response]:
        """Pick up changes made by the operator tool first, so that the IMPORT OR EXPORT ELEMENT
        ACCESSED unit attention is reported with this very command. Never raises: a failing
        re-read is logged here and met again (and reported) by the command itself."""
        try:
            self.library.refresh()
        except LibraryStateError:
            pass  # logged by the library once per bad file; met again as NOT READY below
        except Exception:
            self.log.exception("re-reading library %s failed", self.library.path)
        return super().execute(cmd)

    def check_ready(self) -> None:
        """TEST UNIT READY: NOT READY, MANUAL INTERVENTION REQUIRED while library.json is
        malformed (`LibraryStateError` carries that sense): the changer cannot tell where its
        cartridges are until the operator repairs the file."""
        self.library.refresh()

    def _operator_access(self) -> None:
        # SMC-3 unit attention conditions: after operator access to import/export elements the
        # changer reports UNIT ATTENTION, IMPORT OR EXPORT ELEMENT ACCESSED so initiators re-read
        # element status.
        self.queue_unit_attention(ImportExportElementAccessed())

    # ------------------------------------------------------------------------------------------
    # Mode pages

    def mode_pages(self) -> list[spc.ModePage]:
        pages = super().mode_pages()
        lib = self.library
        holders = list(_HOLDERS)
        pages += [
            _fixed_page(smc.element_address_assignment_page(lib.ranges()),
                        smc.ELEMENT_ADDRESS_ASSIGNMENT_FIELDS),
            _fixed_page(smc.transport_geometry_page(lib.ranges()[ElementType.MEDIUM_TRANSPORT][1])),
            # SMC-3 device capabilities page: cartridges rest in storage, import/export and data
            # transfer elements (not in the transport) and move / exchange between any two of those
            # types.
            _fixed_page(
                smc.device_capabilities_page(
                    holders, {t: holders for t in holders}, {t: holders for t in holders}
                )
            ),
        ]
        return pages

    # ------------------------------------------------------------------------------------------
    # Commands

    @command(Opcode.READ_ELEMENT_STATUS)
    def read_element_status(self, cmd: Command) -> int:
        req = smc.ReadElementStatus.parse(cmd.cdb)
        data = smc.build_element_status(self.element_status_pages(req))
        # SMC-3 READ ELEMENT STATUS / SPC-5 4.2.5.6: cut at the allocation length; the header keeps
        # the full counts so the initiator can ask again with enough room.
        return cmd.write_data_in(data[: req.allocation_length])

    @command(Opcode.MOVE_MEDIUM)
    def move_medium(self, cmd: Command) -> None:
        req = smc.MoveMedium.parse(cmd.cdb)
        self._check_transport(req.transport)
        self._check_invert(req.invert, field=10)
        self._check_holder(req.source, field=4)
        self._check_holder(req.destination, field=6)
        self.library.move(req.source, req.destination)

    @command(Opcode.EXCHANGE_MEDIUM)
    def exchange_medium(self, cmd: Command) -> None:
        req = smc.ExchangeMedium.parse(cmd.cdb)
        self._check_transport(req.transport)
        self._check_invert(req.invert1, field=10, bit=1)
        self._check_invert(req.invert2, field=10, bit=0)
        self._check_holder(req.source, field=4)
        self._check_holder(req.first_destination, field=6)
        self._check_holder(req.second_destination, field=8)
        if req.source == req.first_destination:
            raise InvalidElementAddress("first destination is the source", field_pointer=6)
        self.library.exchange(req.source, req.first_destination, req.second_destination)

    @command(Opcode.POSITION_TO_ELEMENT)
    def position_to_element(self, cmd: Command) -> None:
        req = smc.PositionToElement.parse(cmd.cdb)
        self._check_transport(req.transport)
        self._check_invert(req.invert, field=8)
        # SMC-3 POSITION TO ELEMENT: any element may be a destination, the transport itself
        # included.
        self._check_address(req.destination, field=4)
        # The transport is virtual: there is nothing to move, so positioning completes at once.

    @command(Opcode.INITIALIZE_ELEMENT_STATUS)
    def initialize_element_status(self, cmd: Command) -> None:
        # SMC-3 INITIALIZE ELEMENT STATUS: the device server re-checks every element. Our inventory
        # is the state file, so re-reading it (done by execute) is the whole inventory.
        self.library.refresh()

    @command(Opcode.INITIALIZE_ELEMENT_STATUS_WITH_RANGE)
    def initialize_element_status_with_range(self, cmd: Command) -> None:
        req = smc.InitializeElementStatusWithRange.parse(cmd.cdb)
        if req.range:
            # SMC-3 INITIALIZE ELEMENT STATUS WITH RANGE: STARTING ELEMENT ADDRESS must name an
            # element when RANGE is one.
            self._check_address(req.starting_address, field=2)
        self.library.refresh()

    @command(Opcode.OPEN_CLOSE_IMPORT_EXPORT_ELEMENT)
    def open_close_import_export_element(self, cmd: Command) -> None:
        req = smc.OpenCloseImportExportElement.parse(cmd.cdb)
        if self._check_address(req.element, field=2) != ElementType.IMPORT_EXPORT:
            raise InvalidElementAddress(
                f"{req.element:#06x} is not an import/export element", field_pointer=2
            )
        if req.action == smc.OpenCloseAction.OPEN:
            self.library.open_ie(req.element)
        else:
            self.library.close_ie(req.element)

    @command(Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL)
    def prevent_allow_medium_removal(self, cmd: Command) -> None:
        req = cdbs.PreventAllow.parse(cmd.cdb)
        if req.prevent > 1:
            # SMC-3 PREVENT ALLOW MEDIUM REMOVAL: PREVENT 00b allows, 01b prevents; the other values
            # are obsolete.
            raise InvalidFieldInCdb(f"PREVENT {req.prevent:#04b}", field_pointer=4, bit_pointer=1)
        self.library.set_ie_prevent(bool(req.prevent))

    # ------------------------------------------------------------------------------------------
    # READ ELEMENT STATUS data

    def element_status_pages(self, req: smc.ReadElementStatus) -> list[ElementStatusPage]:
        """The pages answering `req` (before allocation-length truncation).

        SMC-3 READ ELEMENT STATUS: report elements of the requested type(s) with address at or
        above STARTING ELEMENT ADDRESS, at most NUMBER OF ELEMENTS of them, in ascending address
        order; consecutive elements of one type share a page. A starting address above every
        element of the library is INVALID ELEMENT ADDRESS; otherwise an empty selection is an
        empty report.
        """
        lib = self.library
        every = lib.addresses()
        if not every or req.starting_address > every[-1]:
            raise InvalidElementAddress(
                f"no element at or above {req.starting_address:#06x}", field_pointer=2
            )
        chosen = [
            a for a in lib.addresses(ElementType(req.element_type)) if a >= req.starting_address
        ][: req.number_of_elements]
        contents = lib.contents()
        ident_len = self._identifier_length() if req.dvcid else 0
        pers = self._personality()
        vendor_len = 4 if pers and pers.stk_media_bytes else 0
        pages = []
        for etype, run in groupby(chosen, key=lib.element_type):
            descriptors = tuple(self._descriptor(etype, a, contents, req.dvcid, vendor_len)
                                for a in run)
            pages.append(
                ElementStatusPage(
                    etype,
                    descriptors,
                    pvoltag=req.voltag,
                    avoltag=False,  # we keep no alternate volume tags
                    identifier_length=ident_len if etype == ElementType.DATA_TRANSFER else 0,
                    vendor_length=vendor_len,
                )
            )
        return pages

    def _descriptor(
        self,
        etype: ElementType,
        address: int,
        contents: dict[int, Occupant],
        dvcid: bool,
        vendor_len: int = 0,
    ) -> ElementDescriptor:
        occ = contents.get(address)
        flags = FULL if occ else 0
        ident = b""
        if etype == ElementType.STORAGE or etype == ElementType.DATA_TRANSFER:
            flags |= ACCESS
        elif etype == ElementType.IMPORT_EXPORT:
            # SMC-3 READ ELEMENT STATUS: INENAB/EXENAB: both directions supported; IMPEXP: the
            # operator put the medium there; ACCESS: the transport can reach it (not while open).
            flags |= INENAB | EXENAB
            flags |= 0 if self.library.ie_is_open(address) else ACCESS
            flags |= IMPEXP if occ and occ.imported else 0
        if etype == ElementType.DATA_TRANSFER and dvcid:
            ident = self._identifier(self.library.drive_index(address))
        code_set, ident_type = self._identifier_kind() if ident else (0, 0)
        vendor = b""
        if vendor_len:
            # StorageTek's vendor specific bytes (changer_personality: stk_media_bytes).
            vendor = stk_media_bytes(occ.barcode if occ else None)
            if etype == ElementType.DATA_TRANSFER:
                index = self.library.drive_index(address)
                vendor += stk_transport_bytes(self._drive_key(index))
        return ElementDescriptor(
            address=address,
            flags=flags,
            source=occ.source if occ else None,
            medium_type=medium_type_for(occ.barcode) if occ else smc.MediumType.UNSPECIFIED,
            primary_tag=VolumeTag(occ.barcode) if occ else None,
            code_set=code_set,
            identifier_type=ident_type,
            identifier=ident,
            vendor_specific=vendor,
        )

    def _personality(self) -> ChangerPersonality | None:
        """The library's changer personality (None: created before personalities existed)."""
        return CHANGER_PERSONALITIES.get(self.library.personality or "")

    def _drive_key(self, drive_index: int) -> str:
        """The drive personality key of a drive ("" for a model the table does not know)."""
        try:
            return personality(self.library.drive_model(drive_index)).key
        except ConfigError:  # an unknown model has no transport type code
            return ""

    def _identifier_kind(self) -> tuple[int, int]:
        if self.library.dvcid == "t10":
            return CodeSet.ASCII, DesignatorType.T10_VENDOR_ID
        return CodeSet.ASCII, DesignatorType.VENDOR_SPECIFIC

    def _identifier(self, drive_index: int) -> bytes:
        """DVCID identifier of a drive: its serial (what its VPD page 80h reports), or in "t10"
        form the T10 vendor ID designator text: vendor (8), product (16), serial."""
        serial = self.library.drive_serial(drive_index)
        if self.library.dvcid != "t10":
            return smc.ascii_identifier(serial)
        vendor, product = _drive_identity(self.library.drive_model(drive_index))
        return smc.ascii_identifier(vendor.ljust(8)[:8] + product.ljust(16)[:16] + serial)

    def _identifier_length(self) -> int:
        """One identifier length for every drive (descriptors of a page share one length): the
        longest identifier, and at least the personality's identifier field (StorageTek
        libraries pad the drive serial to 32 bytes)."""
        lengths = [len(self._identifier(i)) for i in range(self.library.drive_count)]
        pers = self._personality()
        floor = pers.identifier_length if pers and lengths else 0
        return max(lengths + [floor], default=0)

    # ------------------------------------------------------------------------------------------
    # Address checks with field pointers

    def _check_address(self, address: int, *, field: int) -> ElementType:
        try:
            return self.library.element_type(address)
        except InvalidElementAddress as exc:
            raise InvalidElementAddress(str(exc), field_pointer=field) from None

    def _check_holder(self, address: int, *, field: int) -> None:
        if self._check_address(address, field=field) not in _HOLDERS:
            # SMC-3 device capabilities page (STOR MT = 0): the transport is not a place media can
            # be moved to/from.
            raise InvalidElementAddress(f"{address:#06x} cannot hold media", field_pointer=field)

    def _check_transport(self, address: int) -> None:
        # SMC-3 MOVE MEDIUM: MEDIUM TRANSPORT ADDRESS 0 selects the default transport.
        if address == 0:
            return
        if self._check_address(address, field=2) != ElementType.MEDIUM_TRANSPORT:
            raise InvalidElementAddress(f"{address:#06x} is not a transport", field_pointer=2)

    @staticmethod
    def _check_invert(invert: bool, *, field: int, bit: int = 0) -> None:
        if invert:
            # SMC-3 transport geometry page: page 1Eh reports ROTATE = 0, so media cannot be
            # inverted.
            raise InvalidFieldInCdb(
                "INVERT: the transport cannot rotate media", field_pointer=field, bit_pointer=bit
            )


def _drive_identity(model: str) -> tuple[str, str]:
    """INQUIRY vendor and product of a drive model, as the drive LUN reports them."""
    try:
        p = personality(model)
        return p.vendor, p.product
    except Exception:  # noqa: BLE001 - an unknown model still gets an identifier
        return "TCMU-PY", model


def _fixed_page(raw: bytes, fields: tuple[spc.Field, ...] = ()) -> spc.ModePage:
    """A mode page none of whose fields MODE SELECT may change (SMC-3 pages 1Dh-1Fh);
    `fields` as `spc.ModePage` has them."""
    return spc.ModePage.make(raw[0] & 0x3F, 0, raw[2:], fields=fields)
