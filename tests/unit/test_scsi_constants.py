"""Code points: aliases between device types, names for logs, CDB sizes by group."""

from __future__ import annotations

import pytest

from tcmu_py.scsi import cdb as c
from tcmu_py.scsi.constants import SERVICE_ACTION_OPCODES, Opcode, ServiceAction, opcode_name


@pytest.mark.parametrize(
    "alias,canonical",
    [
        (Opcode.LOAD_UNLOAD, Opcode.START_STOP_UNIT),
        (Opcode.OPEN_CLOSE_IMPORT_EXPORT_ELEMENT, Opcode.START_STOP_UNIT),
        (Opcode.POSITION_TO_ELEMENT, Opcode.LOCATE_10),
        (Opcode.READ_POSITION, Opcode.PRE_FETCH_10),
        (Opcode.SPACE_16, Opcode.SYNCHRONIZE_CACHE_16),
        (Opcode.ERASE_16, Opcode.WRITE_SAME_16),
    ],
)
def test_aliases_share_values(alias, canonical):
    assert alias is canonical


def test_opcode_name():
    assert opcode_name(0x28) == "READ_10"
    assert opcode_name(0xC5) == "OPCODE_C5h"
    assert opcode_name(0x9E, 0x10) == "SERVICE_ACTION_IN_16/READ_CAPACITY_16"
    assert opcode_name(0x9E, 0x1F) == "SERVICE_ACTION_IN_16/SA_1Fh"


@pytest.mark.parametrize(
    "opcode,size",
    [(Opcode.READ_6, 6), (Opcode.READ_10, 10), (Opcode.MODE_SENSE_10, 10),
     (Opcode.READ_16, 16), (Opcode.SERVICE_ACTION_IN_16, 16), (Opcode.READ_12, 12),
     (Opcode.REPORT_LUNS, 12), (Opcode.READ_ELEMENT_STATUS, 12), (Opcode.ALLOW_OVERWRITE, 16)],
)
def test_cdb_sizes(opcode, size):
    assert c.cdb_length(bytes([opcode]) + bytes(15)) == size


def test_service_action_opcodes():
    assert Opcode.MAINTENANCE_IN in SERVICE_ACTION_OPCODES
    assert Opcode.READ_10 not in SERVICE_ACTION_OPCODES
    assert ServiceAction.REPORT_SUPPORTED_OPERATION_CODES == 0x0C
