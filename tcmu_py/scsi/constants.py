"""SCSI code points as IntEnums.

Rules this file follows:

* Names are the T10 names in UPPER_SNAKE_CASE; values are the wire values.
* One opcode space is shared by every device type, so some opcodes have two names (SBC and
  SSC/SMC reuse values).  Python's IntEnum makes the later name an *alias* of the first:
  ``Opcode.LOAD_UNLOAD is Opcode.START_STOP_UNIT`` and ``Opcode(0x1B).name == "START_STOP_UNIT"``.
  Dispatch tables are per device type, so the alias never matters there; never use ``.name`` to
  tell the commands apart.
* Code that receives a value from the wire keeps unknown values as plain ``int`` (``Opcode(x)``
  would raise on vendor opcodes C0h..FFh); use :func:`opcode_name` for logging.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class Opcode(IntEnum):
    """Operation codes (byte 0 of the CDB), SPC-5 / SBC-4 / SSC-5 / SMC-3."""

    TEST_UNIT_READY = 0x00
    REWIND = 0x01  # SSC
    REQUEST_SENSE = 0x03
    FORMAT_UNIT = 0x04  # SBC (FORMAT MEDIUM is 04h too in SSC)
    READ_BLOCK_LIMITS = 0x05  # SSC
    INITIALIZE_ELEMENT_STATUS = 0x07  # SMC
    READ_6 = 0x08
    WRITE_6 = 0x0A
    WRITE_FILEMARKS_6 = 0x10  # SSC
    SPACE_6 = 0x11  # SSC
    INQUIRY = 0x12
    VERIFY_6 = 0x13  # SSC
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    ERASE_6 = 0x19  # SSC
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B  # SBC
    LOAD_UNLOAD = 0x1B  # SSC (alias)
    OPEN_CLOSE_IMPORT_EXPORT_ELEMENT = 0x1B  # SMC (alias)
    RECEIVE_DIAGNOSTIC = 0x1C
    SEND_DIAGNOSTIC = 0x1D
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_FORMAT_CAPACITIES = 0x23
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    LOCATE_10 = 0x2B  # SSC
    POSITION_TO_ELEMENT = 0x2B  # SMC (alias)
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34  # SBC
    READ_POSITION = 0x34  # SSC (alias)
    SYNCHRONIZE_CACHE_10 = 0x35
    INITIALIZE_ELEMENT_STATUS_WITH_RANGE = 0x37  # SMC
    READ_DEFECT_DATA_10 = 0x37  # SBC (alias)
    WRITE_BUFFER = 0x3B
    READ_BUFFER = 0x3C
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    REPORT_DENSITY_SUPPORT = 0x44  # SSC
    LOG_SELECT = 0x4C
    LOG_SENSE = 0x4D
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    VARIABLE_LENGTH = 0x7F
    ALLOW_OVERWRITE = 0x82  # SSC
    EXTENDED_COPY = 0x83
    RECEIVE_COPY_RESULTS = 0x84
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    ORWRITE_16 = 0x8B
    READ_ATTRIBUTE = 0x8C
    WRITE_ATTRIBUTE = 0x8D
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91  # SBC
    SPACE_16 = 0x91  # SSC (alias)
    LOCATE_16 = 0x92  # SSC
    WRITE_SAME_16 = 0x93  # SBC
    ERASE_16 = 0x93  # SSC (alias)
    SERVICE_ACTION_IN_16 = 0x9E
    SERVICE_ACTION_OUT_16 = 0x9F
    REPORT_LUNS = 0xA0
    SECURITY_PROTOCOL_IN = 0xA2
    MAINTENANCE_IN = 0xA3
    MAINTENANCE_OUT = 0xA4
    MOVE_MEDIUM = 0xA5  # SMC
    EXCHANGE_MEDIUM = 0xA6  # SMC
    READ_12 = 0xA8
    READ_DEFECT_DATA_12 = 0xB7
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    SECURITY_PROTOCOL_OUT = 0xB5
    READ_ELEMENT_STATUS = 0xB8  # SMC


class ServiceAction(IntEnum):
    """Service actions of SERVICE ACTION IN(16) (9Eh) and MAINTENANCE IN (A3h).

    The two ranges do not overlap, so one enum serves both; the opcode says which applies.
    """

    # MAINTENANCE IN (A3h), SPC-5 6.x
    REPORT_IDENTIFYING_INFORMATION = 0x05
    REPORT_TARGET_PORT_GROUPS = 0x0A
    REPORT_ALIASES = 0x0B
    REPORT_SUPPORTED_OPERATION_CODES = 0x0C
    REPORT_SUPPORTED_TMF = 0x0D
    REPORT_PRIORITY = 0x0E
    REPORT_TIMESTAMP = 0x0F
    # SERVICE ACTION IN(16) (9Eh), SBC-4
    READ_CAPACITY_16 = 0x10
    READ_LONG_16 = 0x11
    GET_LBA_STATUS = 0x12
    REPORT_REFERRALS = 0x13


#: Opcodes whose CDB carries a SERVICE ACTION field in byte 1 bits 4..0 (SPC-5 4.2.5.1).
#: VARIABLE LENGTH (7Fh) keeps its service action in bytes 8..9 instead.
SERVICE_ACTION_OPCODES: frozenset[int] = frozenset(
    {
        Opcode.PERSISTENT_RESERVE_IN,
        Opcode.PERSISTENT_RESERVE_OUT,
        Opcode.EXTENDED_COPY,
        Opcode.RECEIVE_COPY_RESULTS,
        Opcode.SERVICE_ACTION_IN_16,
        Opcode.SERVICE_ACTION_OUT_16,
        Opcode.MAINTENANCE_IN,
        Opcode.MAINTENANCE_OUT,
    }
)


class Status(IntEnum):
    """SCSI status codes (SAM-5 5.3)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(IntEnum):
    """Sense keys (SPC-5 4.4.8, table 54)."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF


class PeripheralType(IntEnum):
    """PERIPHERAL DEVICE TYPE of standard INQUIRY data (SPC-5 6.7.2, table 150)."""

    DISK = 0x00
    TAPE = 0x01
    PRINTER = 0x02
    PROCESSOR = 0x03
    WORM = 0x04
    CDROM = 0x05
    SCANNER = 0x06
    OPTICAL = 0x07
    CHANGER = 0x08
    COMMUNICATIONS = 0x09
    STORAGE_ARRAY_CONTROLLER = 0x0C
    ENCLOSURE = 0x0D
    SIMPLIFIED_DISK = 0x0E
    OPTICAL_CARD = 0x0F
    BRIDGE = 0x10
    OSD = 0x11
    AUTOMATION_DRIVE_INTERFACE = 0x12
    ZONED_BLOCK = 0x14
    WELL_KNOWN_LU = 0x1E
    UNKNOWN = 0x1F


class VpdPage(IntEnum):
    """Vital product data page codes (SPC-5 7.7, SBC-4 6.6, SSC-5 8.6)."""

    SUPPORTED_VPD_PAGES = 0x00
    UNIT_SERIAL_NUMBER = 0x80
    DEVICE_IDENTIFICATION = 0x83
    EXTENDED_INQUIRY_DATA = 0x86
    MODE_PAGE_POLICY = 0x87
    SCSI_PORTS = 0x88
    MANAGEMENT_NETWORK_ADDRESSES = 0x85
    BLOCK_LIMITS = 0xB0  # SBC
    SEQUENTIAL_ACCESS_DEVICE_CAPABILITIES = 0xB0  # SSC (alias)
    BLOCK_DEVICE_CHARACTERISTICS = 0xB1  # SBC
    MANUFACTURER_ASSIGNED_SERIAL_NUMBER = 0xB1  # SSC (alias)
    LOGICAL_BLOCK_PROVISIONING = 0xB2  # SBC
    TAPEALERT_SUPPORTED_FLAGS = 0xB2  # SSC (alias)


class ModePageCode(IntEnum):
    """Mode page codes (SPC-5 7.5, SBC-4 6.5, SSC-5 8.3, SMC-3 7.3)."""

    VENDOR = 0x00
    READ_WRITE_ERROR_RECOVERY = 0x01
    DISCONNECT_RECONNECT = 0x02
    VERIFY_ERROR_RECOVERY = 0x07
    CACHING = 0x08
    CONTROL = 0x0A
    DATA_COMPRESSION = 0x0F  # SSC
    DEVICE_CONFIGURATION = 0x10  # SSC
    MEDIUM_PARTITION = 0x11  # SSC
    POWER_CONDITION = 0x1A
    INFORMATIONAL_EXCEPTIONS_CONTROL = 0x1C
    LOGICAL_BLOCK_PROVISIONING = 0x1C  # SBC, subpage 02h (alias)
    MEDIUM_CONFIGURATION = 0x1D  # SSC
    ELEMENT_ADDRESS_ASSIGNMENT = 0x1D  # SMC (alias)
    TRANSPORT_GEOMETRY = 0x1E  # SMC
    DEVICE_CAPABILITIES = 0x1F  # SMC
    ALL_PAGES = 0x3F


#: Subpage code meaning "all subpages" in MODE SENSE / LOG SENSE (SPC-5 6.14.1, 6.8.1).
ALL_SUBPAGES = 0xFF


class LogPage(IntEnum):
    """Log page codes (SPC-5 7.3, SBC-4 6.4, SSC-5 8.2)."""

    SUPPORTED_LOG_PAGES = 0x00
    WRITE_ERROR_COUNTERS = 0x02
    READ_ERROR_COUNTERS = 0x03
    VERIFY_ERROR_COUNTERS = 0x05
    NON_MEDIUM_ERROR = 0x06
    LAST_N_ERROR_EVENTS = 0x07
    LOGICAL_BLOCK_PROVISIONING = 0x0C  # SBC
    SEQUENTIAL_ACCESS_DEVICE = 0x0C  # SSC (alias)
    TEMPERATURE = 0x0D
    START_STOP_CYCLE_COUNTER = 0x0E
    SELF_TEST_RESULTS = 0x10
    SOLID_STATE_MEDIA = 0x11
    BACKGROUND_SCAN_RESULTS = 0x15
    TAPE_ALERT = 0x2E  # SSC
    INFORMATIONAL_EXCEPTIONS = 0x2F
    TAPE_CAPACITY = 0x31  # SSC


class VersionDescriptor(IntEnum):
    """VERSION DESCRIPTOR values of standard INQUIRY data (SPC-5 6.7.2 table 149)."""

    SAM5 = 0x00A0
    SPC4 = 0x0460
    SPC5 = 0x05C0
    SBC3 = 0x04C0
    SBC4 = 0x0600
    SSC3 = 0x0400
    SSC4 = 0x0520
    SMC3 = 0x0480


class CodeSet(IntEnum):
    """CODE SET of a designation descriptor (SPC-5 7.7.6.1 table 598)."""

    BINARY = 1
    ASCII = 2
    UTF8 = 3


class Association(IntEnum):
    """ASSOCIATION of a designation descriptor (SPC-5 7.7.6.1 table 600)."""

    LOGICAL_UNIT = 0
    TARGET_PORT = 1
    TARGET_DEVICE = 2


class DesignatorType(IntEnum):
    """DESIGNATOR TYPE of a designation descriptor (SPC-5 7.7.6.1 table 599)."""

    VENDOR_SPECIFIC = 0
    T10_VENDOR_ID = 1
    EUI64 = 2
    NAA = 3
    RELATIVE_TARGET_PORT = 4
    TARGET_PORT_GROUP = 5
    LOGICAL_UNIT_GROUP = 6
    MD5_LOGICAL_UNIT = 7
    SCSI_NAME = 8


class PageControl(IntEnum):
    """PC field of MODE SENSE (SPC-5 6.14.2 table 175)."""

    CURRENT = 0
    CHANGEABLE = 1
    DEFAULT = 2
    SAVED = 3


class LogPageControl(IntEnum):
    """PC field of LOG SENSE and LOG SELECT (SPC-5 6.7.1 table 184)."""

    THRESHOLD = 0
    CUMULATIVE = 1
    DEFAULT_THRESHOLD = 2
    DEFAULT_CUMULATIVE = 3


class LogParameterFormat(IntEnum):
    """FORMAT AND LINKING, bits 1..0 of a log parameter's control byte (SPC-5 7.3.2.2.2)."""

    BOUNDED_COUNTER = 0x00
    ASCII_LIST = 0x01
    UNBOUNDED_COUNTER = 0x02
    BINARY_LIST = 0x03


class LogParameterControl(IntFlag):
    """Flag bits of a log parameter's control byte (SPC-5 7.3.2.2.2)."""

    DU = 0x80  # disable update
    TSD = 0x20  # target save disable


class RsocSupport(IntEnum):
    """SUPPORT field of a one_command REPORT SUPPORTED OPERATION CODES answer (SPC-5 6.35.4)."""

    NOT_AVAILABLE = 0b000
    NOT_SUPPORTED = 0b001
    SUPPORTED = 0b011


def opcode_name(opcode: int, service_action: int | None = None) -> str:
    """Human-readable name of a wire opcode (and service action), for logs; never raises."""
    try:
        name = Opcode(opcode).name
    except ValueError:
        name = f"OPCODE_{opcode:02X}h"
    if service_action is None:
        return name
    try:
        return f"{name}/{ServiceAction(service_action).name}"
    except ValueError:
        return f"{name}/SA_{service_action:02X}h"


class ProvisioningType(IntEnum):
    """PROVISIONING TYPE of the Logical Block Provisioning VPD page (SBC-4 6.6.4)."""

    FULL = 0b000
    RESOURCE = 0b001
    THIN = 0b010
