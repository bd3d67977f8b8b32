"""Tape data encryption: the record envelope (AES-256-GCM) and the drive's encryption state.

The drive side speaks SECURITY PROTOCOL IN/OUT (SPC-5 6.40/6.41) with the Tape Data Encryption
security protocol 20h (SSC-5 8.5) and the Security Protocol Information protocol 00h (SPC-5
7.7.1). Pages and values follow SSC-5 and what LTO drives report (IBM/HP/Quantum LTO SCSI
references): algorithm index 01h = AES-256-GCM, security algorithm code 00010014h, 32-byte keys,
at most 32 bytes of U-KAD and 12 of A-KAD.

Rules this file obeys
---------------------
* The key lives only in this process's memory: in a `DataKey` (a bytearray wiped when the key is
  cleared or replaced) and in the AESGCM context built from it. It is never written to a
  cartridge, a state file, a log line or a status report: its ``repr`` shows the key identifier
  only. A record stores the *key identifier* (a 16-byte SHA-256 digest of a domain-separated
  key, from which the key cannot be recovered) so that reading knows which key it needs.
* Each encrypted record's payload is an envelope: a 40-byte header (magic, version, algorithm
  index, flags, key identifier, 96-bit nonce, U-KAD and A-KAD lengths), the U-KAD and A-KAD,
  then the AES-256-GCM ciphertext and its 16-byte tag. The nonce is 12 random bytes per record
  (os.urandom, NIST SP 800-38D 8.2.2: at most 2^32 records per key). The associated data is the
  envelope header, the KADs, the record's logical object number and its compression flag, so a
  record moved, relabelled or flipped between compressed and not fails its tag.
* Data is compressed (if at all) before it is encrypted, as an LTO drive does.
* Events that clear the key (SSC-5 8.5.3.2 and its data encryption clause): power on (a daemon
  start: nothing is persisted), demount of the cartridge when CKOD was set, and setting new
  parameters (the old key is wiped). TCMU passes no I_T nexus loss to userspace, so LOCAL scope
  (parameters tied to one I_T nexus) is not offered (capability page AITN only) and refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from typing import ClassVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tcmu_py.scsi.constants import SenseKey
from tcmu_py.scsi.sense import (
    InvalidFieldInCdb,
    InvalidFieldInParameterList,
    ParameterListLengthError,
    ScsiError,
)

#: Security protocols (SPC-5 7.7.1 table 323 / SSC-5 8.5).
PROTOCOL_INFORMATION = 0x00
PROTOCOL_TAPE_ENCRYPTION = 0x20

# Tape Data Encryption pages (SSC-5 8.5.2 SPIN, 8.5.3 SPOUT).
PAGE_IN_SUPPORT = 0x0000
PAGE_OUT_SUPPORT = 0x0001
PAGE_CAPABILITIES = 0x0010
PAGE_KEY_FORMATS = 0x0011
PAGE_MANAGEMENT_CAPABILITIES = 0x0012
PAGE_STATUS = 0x0020
PAGE_NEXT_BLOCK_STATUS = 0x0021
PAGE_SET_DATA_ENCRYPTION = 0x0010

SPIN_PAGES = (PAGE_IN_SUPPORT, PAGE_OUT_SUPPORT, PAGE_CAPABILITIES, PAGE_KEY_FORMATS,
              PAGE_MANAGEMENT_CAPABILITIES, PAGE_STATUS, PAGE_NEXT_BLOCK_STATUS)

#: The one algorithm: index 01h as IBM and HP LTO drives number AES-256-GCM.
ALGORITHM_INDEX = 0x01
#: SSC-5 8.5.2.4: SECURITY ALGORITHM CODE of AES-GCM with a 16-byte tag (SPC-5 table 81 AES-GCM).
SECURITY_ALGORITHM_CODE = 0x00010014
KEY_SIZE = 32
MAX_UKAD = 32
MAX_AKAD = 12

# ENCRYPTION MODE / DECRYPTION MODE (SSC-5 8.5.3.2 tables).
ENCRYPT_DISABLE, ENCRYPT_EXTERNAL, ENCRYPT_ENCRYPT = 0, 1, 2
DECRYPT_DISABLE, DECRYPT_RAW, DECRYPT_DECRYPT, DECRYPT_MIXED = 0, 1, 2, 3
# SCOPE (SSC-5 8.5.3.2): PUBLIC, LOCAL, ALL I_T NEXUS.
SCOPE_PUBLIC, SCOPE_LOCAL, SCOPE_ALL = 0, 1, 2
# RDMC (SSC-5 8.5.3.2): 00b device default, 10b raw reads allowed, 11b raw reads refused.
RDMC_PROTECT = 0x3
# Key-associated data descriptor types (SSC-5 8.5.4.x).
KAD_UKAD, KAD_AKAD, KAD_NONCE, KAD_METADATA = 0x00, 0x01, 0x02, 0x03

# Envelope: magic 4s | version B | algorithm B | flags B | pad B | key id 16s | nonce 12s |
# ukad len H | akad len H.
_ENVELOPE = struct.Struct(">4sBBBx16s12sHH")
ENVELOPE_MAGIC = b"VTLE"
ENVELOPE_VERSION = 1
ENVELOPE_HEADER_SIZE = _ENVELOPE.size
ENVELOPE_FLAG_RDMD = 0x01  # raw reads of this record are refused (RDMC 11b when written)
TAG_SIZE = 16
#: Most bytes an envelope adds to a record's payload.
ENVELOPE_OVERHEAD = ENVELOPE_HEADER_SIZE + MAX_UKAD + MAX_AKAD + TAG_SIZE
_KEY_ID_DOMAIN = b"tcmu-py vtl data key id v1\x00"
_OBJ = struct.Struct(">QB")


# --- DATA PROTECT sense (SPC-5 4.4.9 table 63, ASC 74h; the codes LTO drives report) -------


class DataProtect(ScsiError):
    sense_key = SenseKey.DATA_PROTECT
    asc, ascq = 0x74, 0x00


class UnableToDecrypt(DataProtect):
    """07h/74h/01h UNABLE TO DECRYPT DATA: no key, or decryption disabled."""

    asc, ascq = 0x74, 0x01


class UnencryptedWhileDecrypting(DataProtect):
    """07h/74h/02h UNENCRYPTED DATA ENCOUNTERED WHILE DECRYPTING (DECRYPT mode, plain block)."""

    asc, ascq = 0x74, 0x02


class IncorrectKey(DataProtect):
    """07h/74h/03h INCORRECT DATA ENCRYPTION KEY: the block names another key."""

    asc, ascq = 0x74, 0x03


class IntegrityValidationFailed(DataProtect):
    """07h/74h/04h CRYPTOGRAPHIC INTEGRITY VALIDATION FAILED: the tag does not verify."""

    asc, ascq = 0x74, 0x04


class NotRawReadEnabled(DataProtect):
    """07h/74h/0Ah ENCRYPTED BLOCK NOT RAW READ ENABLED (written with RDMC 11b)."""

    asc, ascq = 0x74, 0x0A


# --- Keys and envelopes ----------------------------------------------------------------------


def key_identifier(key: bytes | bytearray) -> bytes:
    """The 16 bytes a record stores to name its key (a digest: the key is not recoverable)."""
    return hashlib.sha256(_KEY_ID_DOMAIN + bytes(key)).digest()[:16]


class DataKey:
    """A data encryption key held in memory, with the KADs it was set with."""

    __slots__ = ("_key", "_aead", "key_id", "ukad", "akad")

    def __init__(self, key: bytes | bytearray, ukad: bytes = b"", akad: bytes = b"") -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"key of {len(key)} bytes, expected {KEY_SIZE}")
        self._key = bytearray(key)
        self._aead: AESGCM | None = AESGCM(bytes(self._key))
        self.key_id = key_identifier(self._key)
        self.ukad = bytes(ukad)
        self.akad = bytes(akad)

    def __repr__(self) -> str:  # never the key
        return f"DataKey(id={self.key_id.hex()})"

    def wipe(self) -> None:
        """Forget the key (the bytearray is zeroed; the AESGCM context dropped)."""
        for i in range(len(self._key)):
            self._key[i] = 0
        self._aead = None

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            raise ValueError("key was wiped")
        return self._aead

    def seal(self, obj: int, plaintext: bytes, *, compressed: bool, rdmd: bool) -> bytes:
        """The envelope of `plaintext` stored as logical object `obj`."""
        nonce = os.urandom(12)  # 96 random bits per record (NIST SP 800-38D 8.2.2)
        head = _ENVELOPE.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, ALGORITHM_INDEX,
                              ENVELOPE_FLAG_RDMD if rdmd else 0, self.key_id, nonce,
                              len(self.ukad), len(self.akad))
        prefix = head + self.ukad + self.akad
        ct = self._cipher().encrypt(nonce, plaintext, prefix + _OBJ.pack(obj, compressed))
        return prefix + ct

    def unseal(self, env: Envelope, obj: int, stored: bytes, *, compressed: bool) -> bytes:
        """The plaintext of envelope `stored` (object `obj`); InvalidTag if it does not verify."""
        return self._cipher().decrypt(env.nonce, stored[env.body_offset:],
                                      stored[: env.body_offset] + _OBJ.pack(obj, compressed))


@dataclasses.dataclass(frozen=True)
class Envelope:
    """The clear header of an encrypted record."""

    algorithm: int
    rdmd: bool
    key_id: bytes
    nonce: bytes
    ukad: bytes
    akad: bytes

    @property
    def body_offset(self) -> int:
        return ENVELOPE_HEADER_SIZE + len(self.ukad) + len(self.akad)

    @classmethod
    def parse(cls, stored: bytes) -> Envelope | None:
        """The envelope at the start of a record's payload; None if it is not one."""
        if len(stored) < ENVELOPE_HEADER_SIZE + TAG_SIZE:
            return None
        magic, version, alg, flags, key_id, nonce, nu, na = _ENVELOPE.unpack_from(stored)
        if magic != ENVELOPE_MAGIC or version != ENVELOPE_VERSION:
            return None
        if ENVELOPE_HEADER_SIZE + nu + na + TAG_SIZE > len(stored):
            return None
        ukad = bytes(stored[ENVELOPE_HEADER_SIZE : ENVELOPE_HEADER_SIZE + nu])
        akad = bytes(stored[ENVELOPE_HEADER_SIZE + nu : ENVELOPE_HEADER_SIZE + nu + na])
        return cls(alg, bool(flags & ENVELOPE_FLAG_RDMD), key_id, nonce, ukad, akad)


# --- The drive's data encryption parameters (SSC-5 8.5.3.2) ----------------------------------


@dataclasses.dataclass
class Parameters:
    """What SET DATA ENCRYPTION established (the defaults: everything disabled)."""

    scope: int = SCOPE_PUBLIC
    encryption_mode: int = ENCRYPT_DISABLE
    decryption_mode: int = DECRYPT_DISABLE
    algorithm: int = 0
    rdmc: int = 0
    ckod: bool = False
    key: DataKey | None = None


def _kad_descriptors(ukad: bytes, akad: bytes) -> bytes:
    """KEY-ASSOCIATED DATA descriptors (SSC-5 8.5.4.3/8.5.4.4): U-KAD then A-KAD, if any."""
    out = b""
    for kind, value in ((KAD_UKAD, ukad), (KAD_AKAD, akad)):
        if value:
            # byte 1 AUTHENTICATED (SPIN only): 1h = not authenticated, 2h = authenticated.
            auth = 0x02 if kind == KAD_AKAD else 0x01
            out += struct.pack(">BBH", kind, auth, len(value)) + value
    return out


def _page(code: int, body: bytes) -> bytes:
    return struct.pack(">HH", code, len(body)) + body


@dataclasses.dataclass(frozen=True)
class NextBlock:
    """What the drive knows of the logical object at its position (for page 0021h)."""

    position: int
    kind: str  # "data", "filemark" or "eod"
    envelope: Envelope | None = None


class DriveEncryption:
    """One drive's data encryption parameters and the SPIN/SPOUT pages built from them."""

    #: SSC-5 8.5.3.2: SPOUT Set Data Encryption page header, before the KEY field.
    SDE_HEADER: ClassVar[int] = 20

    def __init__(self) -> None:
        self.params = Parameters()
        self.key_instance = 0  # SSC-5 8.5.2.7 KEY INSTANCE COUNTER: bumped at each change

    # The state the drive's read and write paths consult ---------------------------------------

    @property
    def encrypting(self) -> DataKey | None:
        """The key records are written with now (None: written in clear)."""
        p = self.params
        return p.key if p.encryption_mode == ENCRYPT_ENCRYPT else None

    @property
    def raw_protect(self) -> bool:
        return self.params.rdmc == RDMC_PROTECT

    def read_key(self, env: Envelope | None) -> DataKey | None:
        """How a READ treats the data block at the position (SSC-5 8.5.3.2 decryption modes;
        the codes as LTO drives report them): the key to decrypt with, None to return the
        stored bytes (a clear block, or an encrypted one in RAW mode), or a DATA PROTECT 74h
        error."""
        mode = self.params.decryption_mode
        if env is None:
            if mode == DECRYPT_DECRYPT:
                # SSC-5 8.5.3.2 DECRYPT: only encrypted blocks are returned; a clear block is
                # DATA PROTECT, UNENCRYPTED DATA ENCOUNTERED WHILE DECRYPTING.
                raise UnencryptedWhileDecrypting("the block is not encrypted")
            return None
        if mode == DECRYPT_RAW:
            if env.rdmd:
                # SSC-5 8.5.3.2 RDMC 11b: the block was written with raw reads disabled.
                raise NotRawReadEnabled("the block was written with raw reads disabled")
            return None
        key = self.params.key
        if mode == DECRYPT_DISABLE or key is None or env.algorithm != ALGORITHM_INDEX:
            raise UnableToDecrypt("decryption disabled or no key")
        if key.key_id != env.key_id:
            raise IncorrectKey("the block was written with another key")
        return key

    def clear(self) -> None:
        """Back to the defaults, the key wiped (power on, CKOD demount)."""
        if self.params.key is not None:
            self.params.key.wipe()
        if self.params != Parameters():
            self.key_instance = (self.key_instance + 1) & 0xFFFFFFFF
        self.params = Parameters()

    def demounted(self) -> None:
        """The cartridge left the drive: SSC-5 8.5.3.2 CKOD clears the key on demount."""
        if self.params.ckod:
            self.clear()

    # SECURITY PROTOCOL IN ---------------------------------------------------------------------

    def spin(self, protocol: int, page: int, *, loaded_generation: int | None,
             next_block: NextBlock | None) -> bytes:
        """The SPIN parameter data for `protocol`/`page`; InvalidFieldInCdb if unsupported."""
        if protocol == PROTOCOL_INFORMATION:
            if page == 0x0000:
                # SPC-5 7.7.1.2: supported security protocols list.
                return bytes(6) + struct.pack(">H", 2) + bytes(
                    (PROTOCOL_INFORMATION, PROTOCOL_TAPE_ENCRYPTION))
            if page == 0x0001:
                # SPC-5 7.7.1.3: certificate data; no certificate (length 0), as LTO drives.
                return bytes(4)
            raise InvalidFieldInCdb(f"protocol 00h page {page:04X}h", field_pointer=2)
        if protocol != PROTOCOL_TAPE_ENCRYPTION:
            # SPC-5 6.40: an unsupported SECURITY PROTOCOL is INVALID FIELD IN CDB.
            raise InvalidFieldInCdb(f"security protocol {protocol:02X}h", field_pointer=1)
        if page == PAGE_IN_SUPPORT:
            return _page(page, b"".join(struct.pack(">H", p) for p in SPIN_PAGES))
        if page == PAGE_OUT_SUPPORT:
            return _page(page, struct.pack(">H", PAGE_SET_DATA_ENCRYPTION))
        if page == PAGE_CAPABILITIES:
            return self._capabilities(loaded_generation)
        if page == PAGE_KEY_FORMATS:
            return _page(page, b"\x00")  # SSC-5 8.5.2.5: key format 00h (plain text key)
        if page == PAGE_MANAGEMENT_CAPABILITIES:
            # SSC-5 8.5.2.6: LOCK_C 0, CKOD_C 1, CKORP_C/CKORL_C 0; scopes: PUBLIC and ALL I_T
            # NEXUS (LOCAL needs I_T nexus loss events TCMU does not deliver).
            return _page(page, bytes([0x00, 0x04, 0x00, 0x05]) + bytes(8))
        if page == PAGE_STATUS:
            return self._status()
        if page == PAGE_NEXT_BLOCK_STATUS:
            return self._next_block_status(next_block)
        raise InvalidFieldInCdb(f"tape data encryption page {page:04X}h", field_pointer=2)

    def _capabilities(self, generation: int | None) -> bytes:
        """SSC-5 8.5.2.4 Data Encryption Capabilities page, one algorithm descriptor as LTO
        drives report AES-256-GCM (HP LTO: page length 28h, descriptor length 14h)."""
        avfmv = generation is not None and generation >= 4  # LTO-4 and later media only
        desc = bytes([
            ALGORITHM_INDEX, 0x00, 0x00, 0x14,
            # AVFMV | SDK_C 0 | MAC_C 1 | DELB_C 1 | DECRYPT_C 10b | ENCRYPT_C 10b (hardware)
            (0x80 if avfmv else 0) | 0x20 | 0x10 | 0x08 | 0x02,
            # AVFCLP 00b | NONCE_C 01b (the device generates nonces) | KADF_C 0 | VCELB_C 0 |
            # UKADF 0 | AKADF 0
            0x10,
        ]) + struct.pack(">HHH", MAX_UKAD, MAX_AKAD, KEY_SIZE) + bytes([
            # DKAD_C 00b | EEMC_C 00b | RDMC_C 100b (RDMC honoured per block) | EAREM 0
            0x08, 0x00, 0x00, 0x00,
        ]) + bytes(4) + struct.pack(">I", SECURITY_ALGORITHM_CODE)
        # byte 4: EXTDECC 00b (no external control) | CFG_P 01b (parameters may be changed)
        return _page(PAGE_CAPABILITIES, bytes([0x01]) + bytes(15) + desc)

    def _status(self) -> bytes:
        """SSC-5 8.5.2.7 Data Encryption Status page."""
        p = self.params
        scope = p.scope
        rdmd = 1 if p.rdmc == RDMC_PROTECT else 0
        body = struct.pack(
            ">BBBBIBBH8x",
            (scope << 5) | scope,  # I_T NEXUS SCOPE | KEY SCOPE
            p.encryption_mode,
            p.decryption_mode,
            p.algorithm,
            self.key_instance,
            (0x1 << 4) | rdmd,  # PARAMETERS CONTROL 001b (host), VCELB 0, CEEMS 00b, RDMD
            0,
            0,  # ASDK COUNT
        )
        if p.key is not None:
            body += _kad_descriptors(p.key.ukad, p.key.akad)
        return _page(PAGE_STATUS, body)

    def _next_block_status(self, nb: NextBlock | None) -> bytes:
        """SSC-5 8.5.2.8 Next Block Encryption Status page for the object at the position."""
        if nb is None:  # no cartridge: status 0h, incapable of determining
            return _page(PAGE_NEXT_BLOCK_STATUS, bytes(12))
        alg, flags, kads = 0, 0, b""
        if nb.kind != "data":
            status = 0x2 if nb.kind == "filemark" else 0x1  # not a logical block / EOD
        elif nb.envelope is None:
            status = 0x3  # not encrypted
        else:
            env = nb.envelope
            alg, flags = env.algorithm, 1 if env.rdmd else 0  # RDMDS
            kads = _kad_descriptors(env.ukad, env.akad)
            key = self.params.key
            if env.algorithm != ALGORITHM_INDEX:
                status = 0x4
            elif (self.params.decryption_mode in (DECRYPT_DECRYPT, DECRYPT_MIXED)
                  and key is not None and key.key_id == env.key_id):
                status = 0x5  # encrypted, and this drive can decrypt it now
            else:
                status = 0x6  # encrypted, no (right) key or decryption not enabled
        # COMPRESSION STATUS 0h (not reported) | ENCRYPTION STATUS
        body = struct.pack(">QBBBx", nb.position, status, alg, flags) + kads
        return _page(PAGE_NEXT_BLOCK_STATUS, body)

    # SECURITY PROTOCOL OUT --------------------------------------------------------------------

    def spout(self, protocol: int, page_code: int, data: bytes) -> None:
        """Apply a SPOUT parameter list (`page_code` is the CDB's SECURITY PROTOCOL SPECIFIC)."""
        if protocol != PROTOCOL_TAPE_ENCRYPTION:
            raise InvalidFieldInCdb(f"security protocol {protocol:02X}h", field_pointer=1)
        if page_code != PAGE_SET_DATA_ENCRYPTION:
            raise InvalidFieldInCdb(f"SPOUT page {page_code:04X}h", field_pointer=2)
        self.params = self._parse_set_data_encryption(data, self.params)

    def _parse_set_data_encryption(self, d: bytes, old: Parameters) -> Parameters:
        """Validate a Set Data Encryption page (SSC-5 8.5.3.2) whole before anything changes;
        05h/26h/00h with the field pointer of the first bad field."""
        if len(d) < self.SDE_HEADER:
            raise ParameterListLengthError(f"set data encryption page of {len(d)} bytes")
        code, length = struct.unpack_from(">HH", d)
        if code != PAGE_SET_DATA_ENCRYPTION:
            # SSC-5 8.5.3.1: the page code must match the SECURITY PROTOCOL SPECIFIC field.
            raise InvalidFieldInParameterList(f"page code {code:04X}h", field_pointer=0)
        if length + 4 > len(d) or length + 4 < self.SDE_HEADER:
            raise InvalidFieldInParameterList(f"page length {length}", field_pointer=2)
        d = d[: length + 4]
        scope, lock = d[4] >> 5, d[4] & 0x01
        ceem, rdmc = d[5] >> 6, (d[5] >> 4) & 0x3
        sdk, ckod, ckorp, ckorl = (d[5] >> 3) & 1, (d[5] >> 2) & 1, (d[5] >> 1) & 1, d[5] & 1
        enc, dec, alg, key_format = d[6], d[7], d[8], d[9]
        key_length = struct.unpack_from(">H", d, 18)[0]

        def bad(msg: str, byte: int, bit: int | None = None) -> InvalidFieldInParameterList:
            return InvalidFieldInParameterList(msg, field_pointer=byte, bit_pointer=bit)

        # SSC-5 8.5.3.2 SCOPE: PUBLIC (use the shared parameters, the rest ignored) or ALL I_T
        # NEXUS; LOCAL is not offered (page 0012h: LOCAL_C 0).
        if scope not in (SCOPE_PUBLIC, SCOPE_ALL):
            raise bad(f"scope {scope}", 4, 7)
        if lock:  # page 0012h LOCK_C 0
            raise bad("LOCK", 4, 0)
        if scope == SCOPE_PUBLIC:
            return old
        if ceem > 1:  # capabilities EEMC_C 00b: no external encryption mode check
            raise bad(f"CEEM {ceem}", 5, 7)
        if rdmc == 0x1:  # SSC-5 8.5.3.2 RDMC 01b is reserved
            raise bad("RDMC 01b", 5, 5)
        if sdk:  # capabilities: MAXIMUM SUPPLEMENTAL DECRYPTION KEY COUNT 0, SDK_C 0
            raise bad("SDK", 5, 3)
        if ckorp or ckorl:  # page 0012h CKORP_C / CKORL_C 0
            raise bad("CKORP/CKORL", 5, 1 if ckorp else 0)
        if enc not in (ENCRYPT_DISABLE, ENCRYPT_ENCRYPT):  # EXTERNAL: ENCRYPT_C is 10b only
            raise bad(f"encryption mode {enc}", 6)
        if dec > DECRYPT_MIXED:
            raise bad(f"decryption mode {dec}", 7)
        needs_key = enc == ENCRYPT_ENCRYPT or dec in (DECRYPT_DECRYPT, DECRYPT_MIXED)
        if not needs_key:
            # SSC-5 8.5.3.2: with both modes DISABLE (or DISABLE/RAW) the algorithm, key and
            # KAD fields are ignored (stenc -e off sends a zeroed 32-byte key).
            if old.key is not None:
                old.key.wipe()
            new = Parameters(SCOPE_ALL, enc, dec, 0, rdmc, bool(ckod))
            self.key_instance = (self.key_instance + 1) & 0xFFFFFFFF
            return new
        if alg != ALGORITHM_INDEX:  # SSC-5 8.5.3.2: an index page 0010h does not report
            raise bad(f"algorithm index {alg}", 8)
        if key_format != 0x00:  # page 0011h lists key format 00h only
            raise bad(f"key format {key_format:02X}h", 9)
        if key_length != KEY_SIZE:  # capabilities KEY SIZE 0020h
            raise bad(f"key length {key_length}", 18)
        if self.SDE_HEADER + key_length > len(d):
            raise bad("key runs past the page", 2)
        key = d[self.SDE_HEADER : self.SDE_HEADER + key_length]
        ukad = akad = None
        pos = self.SDE_HEADER + key_length
        while pos < len(d):
            if pos + 4 > len(d):
                raise bad("truncated key-associated data descriptor", pos)
            kind, _auth, n = struct.unpack_from(">BBH", d, pos)
            if pos + 4 + n > len(d):
                raise bad(f"descriptor length {n}", pos + 2)
            value = bytes(d[pos + 4 : pos + 4 + n])
            # SSC-5 8.5.4: U-KAD (at most MAX_UKAD bytes), A-KAD (MAX_AKAD), each at most once;
            # NONCE (capabilities NONCE_C 01b: the device makes nonces) and M-KAD are refused.
            if kind == KAD_UKAD and ukad is None and n <= MAX_UKAD:
                ukad = value
            elif kind == KAD_AKAD and akad is None and n <= MAX_AKAD:
                akad = value
            elif kind in (KAD_UKAD, KAD_AKAD):
                raise bad(f"KAD type {kind} repeated or {n} bytes long", pos + 2)
            else:
                raise bad(f"KAD type {kind:02X}h", pos)
            pos += 4 + n
        if old.key is not None:
            old.key.wipe()
        self.key_instance = (self.key_instance + 1) & 0xFFFFFFFF
        return Parameters(SCOPE_ALL, enc, dec, alg, rdmc, bool(ckod),
                          DataKey(key, ukad or b"", akad or b""))
