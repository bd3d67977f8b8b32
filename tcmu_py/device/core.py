"""ScsiDevice: one logical unit's command dispatcher, and the SPC commands every device answers.

Theory of operation
-------------------
A device is a table of opcode handlers. Subclasses add handlers with the `@command` decorator; the
table is collected per class (`__init_subclass__`) and filtered per instance by `supports()`, so
what REPORT SUPPORTED OPERATION CODES lists is exactly what `dispatch` will run.

`execute(cmd)` is the single entry point. It

1. reports a pending unit attention, unless the opcode is one that SAM-5 5.14 exempts;
2. looks the opcode (and service action) up, or fails with INVALID COMMAND OPERATION CODE;
3. refuses a CONTROL byte with NACA set (NORMACA is 0: `tcmu_py.scsi.cdb.check_control_byte`);
4. runs the handler, and
5. turns whatever came back — a return value, a `ScsiError`, or any other exception — into a
   `Response`. This is the ONE place a `ScsiError` becomes CHECK CONDITION, and the one place an
   unexpected exception becomes HARDWARE ERROR 44/00 (with the traceback logged).

A handler may return a `concurrent.futures.Future`; `execute` then returns a Future of the
`Response`, converted by the same function when it resolves.

Threads: `execute` may be called from several worker threads at once unless the class sets
`serial_commands = True`, in which case the runner calls it from one thread, in arrival order.
Per-device state that SPC keeps (unit attentions, mode pages) is guarded by `self.lock`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from tcmu_py.backend import ChunkExtent, FanOutExtent, NativeKit, RbdExtent
from tcmu_py.device.command import Command, Response
from tcmu_py.handler import DeviceConfig
from tcmu_py.scsi import cdb as cdbs
from tcmu_py.scsi import spc
from tcmu_py.scsi.constants import Opcode, ServiceAction, Status
from tcmu_py.scsi.sense import (
    HardwareError,
    InvalidFieldInCdb,
    InvalidFieldInCommandIu,
    InvalidOpcode,
    PowerOnReset,
    RoundedParameter,
    ScsiError,
    build_fixed_sense,
)

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: A bound opcode handler.
CommandFn = Callable[[Command], Any]

#: Opcodes whose service action selects the command (SPC-5 4.2.5.1): where the field lives.
_SA_BYTE1 = {
    Opcode.SERVICE_ACTION_IN_16,
    Opcode.MAINTENANCE_IN,
    Opcode.MAINTENANCE_OUT,
    Opcode.EXTENDED_COPY,
    Opcode.RECEIVE_COPY_RESULTS,
}

_SA_OPCODES = _SA_BYTE1 | {Opcode.VARIABLE_LENGTH}

#: SAM-5 5.14 / SPC-5 5.14: commands that neither report nor clear a pending unit attention.
_UA_EXEMPT = {Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE}

VENDOR = "TCMU-PY"

#: What `respond_error` answers when an error's own sense cannot be built (SPC-5 4.4.3, fixed).
_HARDWARE_ERROR_SENSE = build_fixed_sense(0x04, 0x44, 0x00)


def command(
    opcode: int,
    service_action: int | None = None,
    *,
    inline: bool = False,
    usage: bytes | None = None,
) -> Callable[[F], F]:
    """Register the decorated method as the handler of `opcode` (and `service_action`).

    `inline=True` says the handler never blocks (no backend I/O): the runner may run it on its
    loop thread instead of handing it to the worker pool.

    `usage`: the command's CDB USAGE DATA for REPORT SUPPORTED OPERATION CODES (SPC-5 6.35.4):
    the whole CDB, byte 0 the opcode, then a 1 for every bit the handler evaluates. Without it,
    the tables of `tcmu_py.scsi.spc.cdb_usage_mask` answer for the commands tcmu-py knows, and
    any other command (a vendor opcode, C0h-FFh) is reported with `spc.derived_cdb_usage`: the
    length its group code defines (SPC-5 4.2.5.1), every bit between the opcode and the CONTROL
    byte marked as evaluated — conservative, an initiator assumes nothing is ignored. A
    VARIABLE LENGTH (7Fh) command has no length to derive and must pass `usage`.
    """
    if usage is not None:
        usage = bytes(usage)
        if not usage or usage[0] != opcode:
            raise ValueError(f"usage for opcode {opcode:#04x} must start with the opcode")
        if opcode != Opcode.VARIABLE_LENGTH and len(usage) != cdbs.cdb_length(usage):
            raise ValueError(
                f"usage for opcode {opcode:#04x} has {len(usage)} bytes, its group code "
                f"defines {cdbs.cdb_length(usage)}"
            )
    elif opcode == Opcode.VARIABLE_LENGTH:
        raise ValueError("a VARIABLE LENGTH (7Fh) command must give usage= (its CDB length)")

    def mark(fn: F) -> F:
        keys = getattr(fn, "_scsi_commands", [])
        keys.append((int(opcode), service_action, inline, usage))
        fn._scsi_commands = keys  # type: ignore[attr-defined]
        return fn

    return mark


def short_cdb(cdb: bytes) -> int | None:
    """The length `cdb`'s opcode requires if `cdb` is shorter, else None (SPC-5 4.2.5.1: the
    group code defines the length; VARIABLE LENGTH CDBs carry theirs in byte 7, SPC-5 4.2.4)."""
    if cdb[0] == Opcode.VARIABLE_LENGTH and len(cdb) < 8:
        return 8
    need = cdbs.cdb_length(cdb)
    return need if len(cdb) < need else None


def check_data_out(
    cmd: Command, expected: int, *, data: bool = False, field_pointer: int | None = None
) -> None:
    """Refuse, before anything is written, a command whose Data-Out does not carry the
    `expected` bytes its CDB announces — as LIO's target core does for its own backstores
    (target_core_transport.c, target_cmd_size_check). TCMU itself passes the transport's data
    length through unchecked.

    `data`: a data CDB (WRITE, WRITE AND VERIFY, COMPARE AND WRITE): any difference, shorter or
    longer, is ILLEGAL REQUEST 0Eh/03h INVALID FIELD IN COMMAND INFORMATION UNIT (LIO's answer
    since "scsi: target: core: Change ASCQ for residual write", after FCP-4 9.4.2 b: transfer
    nothing; INVALID FIELD IN CDB before). Otherwise (parameter lists, WRITE SAME's
    block): a Data-Out shorter than announced is INVALID FIELD IN CDB at `field_pointer` (the
    length field), a longer one is used up to `expected` (LIO rejects only the "overflow" of a
    control CDB).
    """
    got = cmd.data_out_length
    if got == expected or (got > expected and not data):
        return
    what = f"data-out of {got} bytes, the CDB transfers {expected}"
    if data:
        raise InvalidFieldInCommandIu(what)
    raise InvalidFieldInCdb(what, field_pointer=field_pointer)


def service_action_of(cdb: bytes) -> int | None:
    """The service action of a CDB whose opcode uses one, else None."""
    op = cdb[0]
    if op in _SA_BYTE1:
        return cdb[1] & 0x1F if len(cdb) > 1 else 0
    if op == Opcode.VARIABLE_LENGTH and len(cdb) >= 10:
        return int.from_bytes(cdb[8:10], "big")
    return None


@dataclass(frozen=True)
class DataExtent:
    """A device's data as a file extent, for the C data plane (`tcmu_py.ring.DataPlane`).

    LBA ``n`` is at byte ``base + n * block_size`` of the open file ``fd``; ``num_blocks`` is the
    capacity and ``max_blocks`` the MAXIMUM TRANSFER LENGTH; ``flush_fua`` asks for an
    ``fdatasync`` after a FUA write (a volatile write cache). ``units`` (thin): one byte per
    allocation unit of ``unit_blocks`` blocks, nonzero when allocated (`tcmu_py.backend.UnitMap`);
    the plane then serves only commands on allocated units and fences whole units.
    ``reads_only``: the plane serves READs only (`tcmu_py.backend.ReadExtent`). ``rbd``: the
    data is an RBD image instead (``fd`` -1, ``base`` 0), for the native loop only
    (`tcmu_py.backend.RbdExtent`). ``fanout``: with ``reads_only``, a mirror's writes the
    native loop makes to every leg (`tcmu_py.backend.FanOutExtent`). ``chunks``: with
    ``reads_only`` and ``fd`` -1, a dedup disk's chunk table the native loop serves READs from
    (`tcmu_py.backend.ChunkExtent`)."""

    fd: int
    base: int
    block_size: int
    num_blocks: int
    max_blocks: int
    flush_fua: bool
    units: bytearray | None = None
    unit_blocks: int = 0
    reads_only: bool = False
    rbd: RbdExtent | None = None
    fanout: FanOutExtent | None = None
    chunks: ChunkExtent | None = None


class ScsiDevice:
    """Base of every device. Subclasses set the class attributes and add `@command` handlers."""

    peripheral_type: ClassVar[int] = 0x00
    removable: ClassVar[bool] = False
    serial_commands: ClassVar[bool] = False
    #: Whether the runner may run a lone command (queue depth 1) on its loop thread. A device
    #: whose commands can wait for seconds (a network leg that stopped answering) sets it
    #: False: the loop then goes on dequeuing, and a command arriving meanwhile is not held
    #: behind the slow one.
    lone_commands_on_loop: bool = True
    vendor: str = VENDOR
    product: str = "VIRTUAL DEVICE"
    revision: str = "0001"

    #: (opcode, service action) -> (method name, inline) — collected per class.
    _table: ClassVar[dict[tuple[int, int | None], tuple[str, bool]]] = {}
    #: (opcode, service action) -> CDB usage data a handler gave with `@command(usage=...)`.
    _usage: ClassVar[dict[tuple[int, int | None], bytes]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: dict[tuple[int, int | None], tuple[str, bool]] = {}
        usages: dict[tuple[int, int | None], bytes] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                for opcode, sa, inline, usage in getattr(value, "_scsi_commands", ()):
                    table[(opcode, sa)] = (name, inline)
                    if usage is None:
                        usages.pop((opcode, sa), None)  # an override without usage: tables
                    else:
                        usages[(opcode, sa)] = usage
        cls._table = table
        cls._usage = usages

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.serial = config.serial or spc.serial_from_name(config.name)
        self.lock = threading.RLock()
        self._unit_attentions: deque[ScsiError] = deque([PowerOnReset()])
        self._mode_state: dict[tuple[int, int], bytes] = {}
        self.d_sense = False
        self._direct: list[tuple[CommandFn, bool] | None] | None = None
        self.log = logging.LoggerAdapter(log, {"device": config.name})

    # ------------------------------------------------------------------------------------------
    # Extension points

    def supports(self, opcode: int, service_action: int | None) -> bool:
        """Whether this instance implements a command its class declares (capability filter)."""
        return True

    #: Called when a unit attention is queued or reported, or `extent_version` moves (from
    #: whichever thread did it, after the change): a runner whose native loop executes commands
    #: in C stops it while an attention waits or the extent it declared is stale, and resumes it
    #: once neither holds (`DeviceRunner`). None: nobody listens.
    plane_listener: Callable[[], None] | None = None
    _extent_version: int = 0

    @property
    def extent_version(self) -> int:
        """Bumped whenever `data_extent()` may answer differently (resize, a new transfer
        limit): the runner then declares the extent again before C executes anything more."""
        return self._extent_version

    @extent_version.setter
    def extent_version(self, value: int) -> None:
        self._extent_version = value
        self._plane_changed()

    def data_extent(self) -> DataExtent | None:
        """The file extent plain READ/WRITE may be served from without calling the device, or
        None (the default: every command comes here). Read on the loop thread."""
        return None

    def offer_native(self, kit: NativeKit) -> None:
        """A native loop serves the device and offers the C objects a backend builds its
        extent from (`tcmu_py.backend.NativeKit`); the default takes nothing."""

    def extent_may_come(self) -> bool:
        """Whether `data_extent` answers an extent now, or may later without the device being
        made again (the runner then starts its native loop even while there is none)."""
        return self.data_extent() is not None

    @property
    def not_ready_reason(self) -> str | None:
        """Why the device answers medium access NOT READY now though it is open (a standby
        gateway of an image another holds), for ``tcmu-py status``; None while it serves (the
        default). A device without a medium by design (a tape drive's empty slot) is not this."""
        return None

    @property
    def unit_attention_pending(self) -> bool:
        """Whether a unit attention waits to be reported (an unlocked peek: the runner then
        sends every command of the wake-up here, so the right one reports it)."""
        return bool(self._unit_attentions)

    def set_max_data_length(self, length: int) -> None:
        """The transport carries at most `length` data bytes per command (the kernel refuses
        larger ones). Called by the runner before the first command; the default ignores it."""

    def check_ready(self) -> None:
        """Raise NotReady / MediumNotPresent when the unit cannot take medium-access commands."""

    def vpd_pages(self) -> dict[int, Callable[[], bytes]]:
        """VPD page code -> builder. Subclasses extend the dict from super()."""
        pt = self.peripheral_type
        return {
            0x80: lambda: spc.build_vpd_unit_serial(pt, self.serial),
            0x83: lambda: spc.build_vpd_device_identification(
                pt,
                naa=self.naa_designator(),
                t10_vendor=self.vendor,
                t10_id=f"{self.product.strip()}:{self.serial}",
            ),
        }

    def naa_designator(self) -> bytes:
        """The NAA designator value VPD 83h reports for this logical unit: the configured WWN
        (after its ``naa.`` prefix) or one derived from the serial. The one name copy domains
        and EXTENDED COPY CSCD descriptors resolve a device by."""
        if self.config.wwn:
            return bytes.fromhex(self.config.wwn[4:])
        return spc.naa_from_serial(self.serial)

    def version_descriptors(self) -> tuple[int, ...]:
        """INQUIRY version descriptors (SPC-5 6.6.2 table 149)."""
        return (0x00A0, 0x0460)  # SAM-5, SPC-4

    def mode_pages(self) -> list[spc.ModePage]:
        """The mode pages this device has. Subclasses extend super()'s list."""
        # The default values (D_SENSE 0): what MODE SELECT set is the page's current value,
        # kept apart (SPC-5 6.14: PC 10b reports the defaults, whatever is current).
        return [spc.control_mode_page()]

    def block_descriptors(self) -> list[tuple[int, int, int]]:
        """(density code, number of blocks, block length) for MODE SENSE block descriptors."""
        return []

    def device_specific_parameter(self) -> int:
        return 0

    def apply_block_descriptor(self, density: int, blocks: int, block_length: int) -> None:
        """MODE SELECT sent a block descriptor. Default: accept only the current values: the
        block length, and the number of blocks as either form gives it (a short descriptor's
        is at most FFFFFFFFh, SBC-4 6.5.2.2) or zero, which keeps the capacity (SBC-4
        6.5.2.2/6.5.2.3: sg_format sends it); the density code is not looked at."""
        for _, current, length in self.block_descriptors():
            if block_length == length and blocks in (0, current, min(current, 0xFFFFFFFF)):
                return
        raise spc.InvalidFieldInParameterList("block descriptor cannot be changed",
                                              field_pointer=0)

    def check_mode_page(self, page: spc.ModePage, body: bytes, offset: int) -> bytes:
        """The new current value MODE SELECT gives `page` with `body` (sent at `offset` of the
        parameter list), or ScsiError; nothing may change here (another page of the same
        command may still fail). Default: `spc.apply_mode_select` (same length, only
        changeable bits). A device overrides it for pages whose length may vary."""
        return spc.apply_mode_select(page, body, offset)

    def mode_page_changed(self, page_code: int, subpage: int, new_current: bytes) -> None:
        """MODE SELECT changed a page (already checked against its changeable mask)."""
        if page_code == 0x0A and subpage == 0:
            # SPC-5 7.5.8: D_SENSE (byte 2 bit 2) selects descriptor-format sense data.
            self.d_sense = bool(new_current[2] & 0x04)

    def forget_mode_page(self, page_code: int, subpage: int = 0) -> None:
        """Drop what MODE SELECT stored for a page, so MODE SENSE rebuilds it from
        `mode_pages()`: for pages that are views of state kept elsewhere (a pool's threshold,
        a drive's compression setting shown in two pages)."""
        with self.lock:
            self._mode_state.pop((page_code, subpage), None)

    def log_pages(self) -> dict[tuple[int, int], Callable[[], bytes]]:
        """(page, subpage) -> builder of the whole log page. Page 00h is generated."""
        return {}

    def queue_unit_attention(self, err: ScsiError) -> None:
        """Report `err` (a UNIT ATTENTION) with the next command that is not exempt."""
        with self.lock:
            if not any(type(ua) is type(err) for ua in self._unit_attentions):
                self._unit_attentions.append(err)
        self._plane_changed()

    def close(self) -> None:
        """Release resources. Called once, after the last command completed."""

    # ------------------------------------------------------------------------------------------
    # Dispatch

    def lookup(self, cdb: bytes) -> tuple[CommandFn, bool]:
        """The handler bound to this CDB and whether it may run inline. Raises InvalidOpcode."""
        direct = self._direct
        if direct is None:
            direct = self._direct = self._build_direct()
        entry = direct[cdb[0]]
        if entry is not None:
            return entry
        return self._lookup_slow(cdb)

    def _build_direct(self) -> list[tuple[CommandFn, bool] | None]:
        """Opcode -> (bound handler, inline) for opcodes without service actions (the fast path).

        Built on first use, after the subclass's __init__ has settled what `supports()` says.
        """
        direct: list[tuple[CommandFn, bool] | None] = [None] * 256
        for (op, sa), (name, inline) in self._table.items():
            if sa is None and op not in _SA_OPCODES and self.supports(op, None):
                direct[op] = (getattr(self, name), inline)
        return direct

    def _lookup_slow(self, cdb: bytes) -> tuple[CommandFn, bool]:
        sa = service_action_of(cdb)
        entry = self._table.get((cdb[0], sa))
        if entry is None or not self.supports(cdb[0], sa):
            if sa is not None and any(op == cdb[0] for op, _ in self._table):
                # SPC-5 4.2.5.1: an unsupported service action is an invalid field in the CDB.
                field = 8 if cdb[0] == Opcode.VARIABLE_LENGTH else 1
                raise InvalidFieldInCdb(f"service action {sa:#x}", field_pointer=field)
            raise InvalidOpcode(f"opcode {cdb[0]:#04x}", field_pointer=0)
        return getattr(self, entry[0]), entry[1]

    def is_inline(self, cdb: bytes) -> bool:
        """Whether the command's handler never blocks (see `command(inline=...)`)."""
        try:
            return self.lookup(cdb)[1]
        except ScsiError:
            return True

    def supported_commands(self) -> list[tuple[int, int | None]]:
        """Every (opcode, service action) this instance executes, sorted."""
        return sorted(
            (k for k in self._table if self.supports(*k)), key=lambda k: (k[0], k[1] or 0)
        )

    def implements_opcode(self, opcode: int) -> bool:
        """Whether any command (any service action) with this operation code is supported."""
        return any(op == opcode and self.supports(op, sa) for op, sa in self._table)

    def cdb_usage(self, opcode: int, service_action: int | None) -> bytes:
        """CDB USAGE DATA of a supported command (SPC-5 6.35.4): what `@command(usage=...)`
        gave, else tcmu-py's table for this peripheral type, else derived from the group code
        (see `command`)."""
        given = self._usage.get((opcode, service_action))
        if given is not None:
            return given
        try:
            return spc.cdb_usage_mask(
                opcode, service_action, peripheral_type=self.peripheral_type
            )
        except KeyError:
            return spc.derived_cdb_usage(opcode, service_action)

    def execute(self, cmd: Command) -> Response | Future[Response]:
        """Run one command to a Response. Never raises."""
        try:
            # Unlocked peek first: a pending UA is rare, the lock is taken only then.
            if self._unit_attentions and cmd.opcode not in _UA_EXEMPT:
                self._report_unit_attention()
            need = short_cdb(cmd.cdb)
            if need is not None and self.implements_opcode(cmd.opcode):
                # SPC-5 4.2.5.1: the group code of byte 0 defines the CDB length; a CDB cut
                # short (only direct callers can send one: the kernel sizes ring CDBs by the
                # same rule) is refused before dispatch, so no handler reads past its end. The
                # opcode is implemented, its CDB is not valid: INVALID FIELD IN CDB at byte 0
                # (SPC-5 4.4.3). An opcode the device does not implement stays INVALID COMMAND
                # OPERATION CODE (20h/00h, from lookup) whatever its length: the length of a
                # command the device server does not know is not its to judge.
                raise InvalidFieldInCdb(
                    f"CDB has {len(cmd.cdb)} bytes, opcode {cmd.opcode:#04x} needs {need}",
                    field_pointer=0,
                )
            handler, _ = self.lookup(cmd.cdb)
            # SAM-5 5.2 / SPC-5 6.7.2: NORMACA is 0, so NACA set in the CONTROL byte is an
            # invalid field, whatever the command (checked once the opcode is known to be
            # implemented: an unknown one stays INVALID COMMAND OPERATION CODE).
            cdbs.check_control_byte(cmd.cdb)
            result = handler(cmd)
        except BaseException as exc:  # noqa: BLE001 - the one place errors become sense
            return self.respond_error(cmd, exc)
        if isinstance(result, Future):
            return self._chain(cmd, result)
        return self.respond(cmd, result)

    def _chain(self, cmd: Command, inner: Future[Any]) -> Future[Response]:
        outer: Future[Response] = Future()

        def done(f: Future[Any]) -> None:
            try:
                exc = f.exception()
                resp = self.respond_error(cmd, exc) if exc else self.respond(cmd, f.result())
            except Exception as cancelled:  # noqa: BLE001 - a cancelled Future still answers
                resp = self.respond_error(cmd, cancelled)
            outer.set_result(resp)

        inner.add_done_callback(done)
        return outer

    def respond(self, cmd: Command, result: Any) -> Response:
        """Turn a handler's return value into a Response."""
        if result is None:
            return Response()
        if isinstance(result, Response):
            return result
        if isinstance(result, int):
            return Response(data_in_length=result)
        return self.respond_error(cmd, TypeError(f"handler returned {type(result).__name__}"))

    def respond_error(self, cmd: Command, exc: BaseException) -> Response:
        """The one place an exception becomes CHECK CONDITION (SAM-5 5.3). Never raises: if
        the error's own sense cannot be built, the answer is HARDWARE ERROR 44/00."""
        try:
            if not isinstance(exc, ScsiError):
                self.log.error(
                    "%s: handler failed: cdb=%s", self.config.name, cmd.cdb.hex(), exc_info=exc
                )
                exc = HardwareError(str(exc))
            if exc.status != Status.CHECK_CONDITION:
                return Response(status=exc.status)
            return Response(
                status=Status.CHECK_CONDITION,
                sense=exc.sense(descriptor=self.d_sense),
                data_in_length=exc.transferred if exc.transferred is not None else 0,
            )
        except Exception:  # noqa: BLE001 - an answer must go out whatever the error object does
            self.log.exception("%s: building the sense for %r failed", self.config.name, exc)
            return Response(status=Status.CHECK_CONDITION, sense=_HARDWARE_ERROR_SENSE)

    def _report_unit_attention(self) -> None:
        with self.lock:
            ua = self._unit_attentions.popleft() if self._unit_attentions else None
        if ua is not None:
            self._plane_changed()
            raise ua

    def _plane_changed(self) -> None:
        listener = self.plane_listener
        if listener is not None:
            listener()

    # ------------------------------------------------------------------------------------------
    # SPC commands every device answers

    @command(Opcode.TEST_UNIT_READY, inline=True)
    def test_unit_ready(self, cmd: Command) -> None:
        self.check_ready()

    @command(Opcode.INQUIRY, inline=True)
    def inquiry(self, cmd: Command) -> int:
        req = cdbs.Inquiry.parse(cmd.cdb)
        if not req.evpd:
            if req.page_code:
                # SPC-5 6.7.1: PAGE CODE must be zero when EVPD is zero.
                raise InvalidFieldInCdb("page code without EVPD", field_pointer=2)
            data = spc.build_standard_inquiry(
                self.peripheral_type,
                self.vendor,
                self.product,
                self.revision,
                removable=self.removable,
                version_descriptors=self.version_descriptors(),
                # SPC-5 6.7.2: 3PC, the logical unit has a copy manager (EXTENDED COPY);
                # VMware's VAAI and sg_inq look here before they send one.
                three_pc=self.implements_opcode(Opcode.EXTENDED_COPY),
            )
        else:
            pages = self.vpd_pages()
            if req.page_code == 0x00:
                data = spc.build_vpd_supported_pages(self.peripheral_type, [0x00, *sorted(pages)])
            elif req.page_code in pages:
                data = pages[req.page_code]()
            else:
                raise InvalidFieldInCdb(f"VPD page {req.page_code:#x}", field_pointer=2)
        return cmd.write_data_in(spc.truncate(data, req.allocation_length))

    @command(Opcode.REQUEST_SENSE, inline=True)
    def request_sense(self, cmd: Command) -> int:
        req = cdbs.RequestSense.parse(cmd.cdb)
        # SPC-5 6.39: a pending unit attention is reported (and cleared) in the parameter data;
        # otherwise NO SENSE. DESC selects descriptor format.
        with self.lock:
            ua = self._unit_attentions.popleft() if self._unit_attentions else None
        if ua is not None:
            self._plane_changed()
            data = ua.sense(descriptor=req.desc)
        elif req.desc:
            data = spc.build_no_sense(descriptor=True)
        else:
            data = build_fixed_sense(0, 0, 0)
        return cmd.write_data_in(spc.truncate(data, req.allocation_length))

    @command(Opcode.MAINTENANCE_IN, ServiceAction.REPORT_SUPPORTED_OPERATION_CODES, inline=True)
    def report_supported_operation_codes(self, cmd: Command) -> int:
        req = cdbs.ReportSupportedOpcodes.parse(cmd.cdb)
        infos = [
            spc.OpcodeInfo(op, sa, self.cdb_usage(op, sa)) for op, sa in self.supported_commands()
        ]
        if req.reporting_options == 0:
            data = spc.build_rsoc_all(infos, rctd=req.rctd)
        else:
            data = spc.build_rsoc_one(
                infos,
                reporting_options=req.reporting_options,
                opcode=req.requested_opcode,
                service_action=req.requested_service_action,
                rctd=req.rctd,
            )
        return cmd.write_data_in(spc.truncate(data, req.allocation_length))

    @command(Opcode.MODE_SENSE_6, inline=True)
    @command(Opcode.MODE_SENSE_10, inline=True)
    def mode_sense(self, cmd: Command) -> int:
        req = cdbs.ModeSense.parse(cmd.cdb)
        with self.lock:
            pages = self._current_mode_pages()
        data = spc.build_mode_sense(
            pages,
            ten=cmd.opcode == Opcode.MODE_SENSE_10,
            pc=req.pc,
            page_code=req.page_code,
            subpage=req.subpage_code,
            dbd=req.dbd,
            block_descriptors=self.block_descriptors(),
            device_specific=self.device_specific_parameter(),
            llbaa=req.llbaa,
            peripheral_type=self.peripheral_type,
        )
        return cmd.write_data_in(spc.truncate(data, req.allocation_length))

    @command(Opcode.MODE_SELECT_6)
    @command(Opcode.MODE_SELECT_10)
    def mode_select(self, cmd: Command) -> None:
        req = cdbs.ModeSelect.parse(cmd.cdb)
        if req.parameter_list_length == 0:
            return
        check_data_out(cmd, req.parameter_list_length, field_pointer=7 if req.ten else 4)
        data = cmd.read_data_out(req.parameter_list_length)
        parsed = spc.parse_mode_select(
            data, ten=cmd.opcode == Opcode.MODE_SELECT_10, peripheral_type=self.peripheral_type
        )
        if req.sp:
            # SPC-5 6.11: SP=1 asks to save pages; we keep no saved pages, so the SP bit is an
            # invalid field (SAVING PARAMETERS NOT SUPPORTED belongs to MODE SENSE PC=3).
            raise InvalidFieldInCdb(
                "SP: saved pages are not supported", field_pointer=1, bit_pointer=0
            )
        with self.lock:
            pages = {(p.page_code, p.subpage): p for p in self._current_mode_pages()}
            changes = []
            offset = parsed.pages_offset
            for page_code, subpage, body in parsed.pages:
                page = pages.get((page_code, subpage))
                if page is None:
                    raise spc.InvalidFieldInParameterList(
                        f"mode page {page_code:#x}/{subpage:#x}", field_pointer=offset, in_cdb=False
                    )
                changes.append((page, self.check_mode_page(page, body, offset)))
                offset += len(body)
            for density, blocks, length in parsed.block_descriptors:
                self.apply_block_descriptor(density, blocks, length)
            rounded: RoundedParameter | None = None
            for page, new in changes:
                if new != page.current:
                    self._mode_state[(page.page_code, page.subpage)] = new
                    try:
                        self.mode_page_changed(page.page_code, page.subpage, new)
                    except RoundedParameter as exc:  # done: the other pages still apply
                        rounded = exc
            if rounded is not None:
                raise rounded
        if changes:
            # SPC-5 5.14 / SAM-5: other I_T nexuses see MODE PARAMETERS CHANGED; TCMU carries no
            # initiator identity, so this device cannot tell them apart and reports none to
            # the initiator that made the change (LIO does the same for its own backstores).
            pass

    def _current_mode_pages(self) -> list[spc.ModePage]:
        pages = []
        for page in self.mode_pages():
            saved = self._mode_state.get((page.page_code, page.subpage))
            pages.append(page.with_current(saved) if saved is not None else page)
        return pages

    @command(Opcode.LOG_SENSE, inline=True)
    def log_sense(self, cmd: Command) -> int:
        req = cdbs.LogSense.parse(cmd.cdb)
        pages = self.log_pages()
        if req.sp:
            # SPC-5 6.8: saving log parameters is not supported.
            raise InvalidFieldInCdb("SP", field_pointer=1, bit_pointer=0)
        key = (req.page_code, req.subpage)
        if key == (0x00, 0x00):
            data = spc.build_supported_log_pages([0x00, *sorted({p for p, s in pages if s == 0})])
        elif key == (0x00, 0xFF):
            data = spc.build_supported_log_subpages([(0, 0), (0, 0xFF), *sorted(pages)])
        elif key in pages:
            # SPC-5 6.8: PAGE CONTROL selects current or default, cumulative or threshold values.
            data = spc.log_page_from(spc.log_page_values(pages[key](), req.pc),
                                     req.parameter_pointer)
        else:
            raise InvalidFieldInCdb(
                f"log page {req.page_code:#x}/{req.subpage:#x}", field_pointer=2
            )
        n = cmd.write_data_in(spc.truncate(data, req.allocation_length))
        self.log_page_sent(key, req.pc, whole=len(data) <= req.allocation_length)
        return n

    def log_page_sent(self, key: tuple[int, int], pc: int, *, whole: bool) -> None:
        """LOG SENSE sent page `key` (PAGE CONTROL `pc`), all of it (`whole`) or as far as the
        allocation length went; a page read clears what it reported (a tape drive's TapeAlert
        flags) here, once it was delivered. Default: nothing."""
