"""The ``ceph`` handler against a real Ceph cluster started natively for the session
(`ceph_cluster` in conftest.py: 1 mon, 1 mgr, 3 memstore OSDs, pool ``rbd`` size 2), driven
through the production ring code and a FakeKernel (`RingHarness`)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.errors import ConfigError, DeviceUnavailable
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.ceph import CephDevice, CephHandler
from tcmu_py.handlers.ceph.config import parse
from tcmu_py.scsi.sense import ScsiError
from tcmu_py.testing import cdbs, wait_until
from tcmu_py.testing.harness import Result, RingHarness

BS = 512
SIZE = 8 << 20  # two 4 MiB RBD objects: commands that cross an object boundary are covered


@pytest.mark.parametrize(("cfg", "match"), [
    ("", "key 'image' missing"),
    ("image=rbd", "POOL/IMAGE"),
    ("image=rbd/a/b/c", "POOL/IMAGE"),
    ("image=rbd/x;conf=relative.conf", "absolute path"),
    ("image=rbd/x;lock=maybe", "exclusive, shared"),
    ("image=rbd/x;create=yes", "0 or 1"),
    ("image=rbd/x;id=client.", "client id such as admin"),
    ("image=rbd/x;rbd_cache=on", "0 or 1"),
    ("image=rbd/x;frob=1", "unknown key 'frob'"),
    ("image=rbd/vol@snap", "POOL/IMAGE"),
    ("image=rbd/x;osd_op_timeout=abc", "whole seconds, 1..3600"),
    ("image=rbd/x;osd_op_timeout=2.5", "whole seconds, 1..3600"),
    ("image=rbd/x;osd_op_timeout=30s", "whole seconds, 1..3600"),
    ("image=rbd/x;osd_op_timeout=0", "whole seconds, 1..3600"),
    ("image=rbd/x;image=rbd/y", "key 'image' given twice"),
])
def test_check_config_errors(cfg: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CephHandler.check_config(cfg)


def test_config_string_parses() -> None:
    c = parse("image=rbd/ns1/vol;conf=/c/ceph.conf;id=client.gw1;keyring=/k;create=1;"
              "lock=shared;osd_op_timeout=20;rbd_cache=1")
    assert (c.pool, c.namespace, c.image, c.conf, c.client, c.keyring, c.create, c.lock,
            c.osd_op_timeout, c.rbd_cache) == ("rbd", "ns1", "vol", "/c/ceph.conf", "gw1",
                                               "/k", True, "shared", 20, True)
    assert c.spec == "rbd/ns1/vol"
    assert not parse("image=rbd/x").rbd_cache  # librbd's cache: only when asked for
    # tcmu-runner's rbd form (the image first, no key) moves over by changing the subtype.
    runner = parse("rbd/ns1/vol;osd_op_timeout=20;conf=/c/ceph.conf;id=gw1")
    assert (runner.spec, runner.osd_op_timeout, runner.conf, runner.client) == (
        "rbd/ns1/vol", 20, "/c/ceph.conf", "gw1")
    assert parse("rbd/vol").spec == "rbd/vol"
    assert parse("rbd/vol,id=gw2").client == "gw2"  # targetcli's cfgstring may use commas
    with pytest.raises(ConfigError, match="key 'image' given twice"):
        parse("rbd/vol;image=rbd/other")


@pytest.mark.parametrize(("cmd_time_out", "want"), [
    (30, 14), (60, 29), (300, 30), (10, 4), (6, 2), (5, 2), (3, 1), (1, 1), (0, 30)])
def test_default_osd_op_timeout_is_below_the_kernels_command_timeout(
        cmd_time_out: int, want: int) -> None:
    """With librados' timeout not below the kernel's, a cluster stall ends in the kernel's
    LOGICAL UNIT COMMUNICATION FAILURE (an I/O error for the application) rather than the
    retryable NOT READY; and in a long stall librbd answers a write after up to two of its
    timeouts (9 s measured with 5): the default keeps two below the device's cmd_time_out (it
    was 30, the kernel's default cmd_time_out, then 25)."""
    assert parse("image=rbd/x", cmd_time_out).osd_op_timeout == want
    assert parse("image=rbd/x;osd_op_timeout=40", cmd_time_out).osd_op_timeout == 40
    assert parse("image=rbd/x").osd_op_timeout == 14  # the kernel's default, 30


def test_an_osd_op_timeout_not_below_cmd_time_out_is_warned_of(
        ceph_cluster: Any, caplog: pytest.LogCaptureFixture) -> None:
    image = f"t-{uuid.uuid4().hex[:8]}"
    config = dataclasses.replace(_config(ceph_cluster, image, extra=";create=1;osd_op_timeout=15"),
                                 cmd_time_out=30)
    dev = CephHandler.open(config)
    try:
        assert ("osd_op_timeout 15 s is not below half the device's cmd_time_out 30 s"
                in caplog.text)
        assert "expected at most 14" in caplog.text
    finally:
        dev.close()
    caplog.clear()
    dev = CephHandler.open(_config(ceph_cluster, image))
    try:
        assert dev.backend.cfg.osd_op_timeout == 14  # type: ignore[attr-defined]
        assert "osd_op_timeout" not in caplog.text
    finally:
        dev.close()


def _config(cluster: Any, image: str, *, extra: str = "", size: int = SIZE,
            write_cache: bool = True, name: str = "ceph0", client: str = "admin"
            ) -> DeviceConfig:
    cfg = f"image=rbd/{image};conf={cluster.conf};id={client}{extra}"
    return DeviceConfig(name, "ceph", cfg, size, BS, write_cache=write_cache)


def _open(cluster: Any, image: str, **kw: Any) -> CephDevice:
    dev = CephHandler.open(_config(cluster, image, **kw))
    assert isinstance(dev, CephDevice)
    return dev


def _read(h: RingHarness, lba: int, blocks: int) -> bytes:
    """`blocks` from `lba`, in READ(16)s of up to 1024 blocks (the fake ring's data area)."""
    out = b""
    while blocks:
        n = min(blocks, 1024)
        r = h.run(cdbs.read16(lba, n), data_in_len=n * BS)
        assert r.good, r
        out += r.data
        lba += n
        blocks -= n
    return out


def _harness(dev: CephDevice) -> RingHarness:
    """A ring harness on `dev`, its POWER ON RESET unit attention already taken."""
    h = RingHarness(dev, workers=4)
    assert h.run(cdbs.test_unit_ready()).sense_codes == (0x06, 0x29, 0x00)
    return h


@pytest.fixture
def device(ceph_cluster: Any) -> Iterator[RingHarness]:
    dev = _open(ceph_cluster, f"t-{uuid.uuid4().hex[:8]}", extra=";create=1")
    h = _harness(dev)
    try:
        yield h
    finally:
        h.close()
        dev.close()


def test_round_trip_against_a_byte_model(device: RingHarness) -> None:
    """Random writes and reads, up to 32 in flight at once, some across the 4 MiB object
    boundary, compared with a bytearray holding what the disk must contain."""
    rng = random.Random(15)
    model = bytearray(SIZE)
    blocks = SIZE // BS
    boundary = (4 << 20) // BS
    for _ in range(4):
        batch: list[Any] = []
        spans: list[tuple[int, int]] = []
        while len(batch) < 32:
            n = rng.choice([1, 8, 64, 256])
            lba = rng.choice([rng.randrange(blocks - n), boundary - n // 2])
            if any(lba < e and s < lba + n for s, e in spans):
                continue  # overlapping writes in one batch have no defined order
            spans.append((lba, lba + n))
            data = rng.randbytes(n * BS)
            model[lba * BS:(lba + n) * BS] = data
            batch.append(device.submit(cdbs.write10(lba, n), data))
        device.wait(batch)
        assert all(p.status == 0 for p in batch), [p.sense for p in batch if p.status]
        reads = [(s, e, device.submit(cdbs.read16(s, e - s), data_in_len=(e - s) * BS))
                 for s, e in spans]
        device.wait([p for _, _, p in reads])
        for s, e, p in reads:
            assert p.status == 0
            assert p.data_in == bytes(model[s * BS:e * BS]), f"lba {s}..{e}"
    assert _read(device, 0, SIZE // BS) == bytes(model)


def _wce(h: RingHarness) -> bool:
    """The WCE bit of the caching mode page (SBC-4 6.5.5)."""
    r = h.run(cdbs.mode_sense10(0x08), data_in_len=1024)
    assert r.good, r
    page = r.data[8 + int.from_bytes(r.data[6:8], "big"):]
    assert page[0] & 0x3F == 0x08
    return bool(page[2] & 0x04)


def test_without_rbd_cache_every_acknowledged_write_is_on_the_osds(ceph_cluster: Any) -> None:
    """By default librbd runs without its cache, whatever the device's ``write_cache``: WCE=0
    (nothing for the initiator to flush), FUA writes go the native loop's plain way (C), and
    what was acknowledged is on the OSDs at once: a second client (lock=shared, opened before)
    reads it right after, with no flush since the writes. (With ``rbd_cache=1`` this test fails:
    WCE=1, and the FUA write goes to Python for its flush.)"""
    image = f"w-{uuid.uuid4().hex[:8]}"
    dev = _open(ceph_cluster, image, extra=";create=1", write_cache=True)
    h = RingHarness(dev, workers=4, native=True)
    other = h2 = None
    try:
        assert h.run(cdbs.test_unit_ready()).sense_codes == (0x06, 0x29, 0x00)
        assert not dev.backend.write_cache
        assert not _wce(h)
        other = _open(ceph_cluster, image, extra=";lock=shared", name="ceph1")
        h2 = _harness(other)
        assert h.run(cdbs.synchronize_cache10()).good
        a, b = b"\x33" * (8 * BS), b"\x44" * (16 * BS)
        assert h.run(cdbs.write10(0, 8, fua=True), a).good
        assert h.run(cdbs.write16(200, 16), b).good
        assert h2.run(cdbs.read10(0, 8), data_in_len=8 * BS).data == a
        assert h2.run(cdbs.read10(200, 16), data_in_len=16 * BS).data == b
        assert _executed(h) >= 2  # both writes submitted to librbd from C
    finally:
        if h2 is not None:
            h2.close()
        if other is not None:
            other.close()
        h.close()
        dev.close()


def test_fua_and_flush_reach_the_cluster(ceph_cluster: Any) -> None:
    """With ``rbd_cache=1`` (librbd's cache, WCE=1) a FUA write and a SYNCHRONIZE CACHE answer
    GOOD, and a second client (its own connection, lock=shared) then reads the data from the
    OSDs."""
    image = f"f-{uuid.uuid4().hex[:8]}"
    dev = _open(ceph_cluster, image, extra=";create=1;rbd_cache=1", write_cache=True)
    h = _harness(dev)
    try:
        assert dev.backend.write_cache
        assert _wce(h)
        a, b = b"\x11" * (8 * BS), b"\x22" * (8 * BS)
        assert h.run(cdbs.write10(0, 8, fua=True), a).good
        assert h.run(cdbs.write16(100, 8), b).good
        assert h.run(cdbs.synchronize_cache10()).good
        other = _open(ceph_cluster, image, extra=";lock=shared", name="ceph1")
        try:
            assert other.backend.not_ready is None
            h2 = _harness(other)
            try:
                assert h2.run(cdbs.read10(0, 8), data_in_len=8 * BS).data == a
                assert h2.run(cdbs.read10(100, 8), data_in_len=8 * BS).data == b
            finally:
                h2.close()
        finally:
            other.close()
    finally:
        h.close()
        dev.close()


def test_unmap_and_write_same(device: RingHarness) -> None:
    rc = device.run(cdbs.read_capacity16(), data_in_len=32)
    assert rc.good and rc.data[14] & 0xC0 == 0xC0  # LBPME and LBPRZ (SBC-4 5.21.2)
    assert int.from_bytes(rc.data[:8], "big") + 1 == SIZE // BS
    pattern = bytes(range(256)) * 2
    assert device.run(cdbs.write_same16(10, 5000), pattern).good
    assert _read(device, 10, 5000) == pattern * 5000
    # UNMAP across the object boundary, and a range of a few blocks: both read zeros.
    boundary = (4 << 20) // BS
    params = cdbs.unmap_parameters([(boundary - 3000, 6000), (11, 3)])
    assert device.run(cdbs.write10(boundary - 3000, 16), b"\x55" * (16 * BS)).good
    assert device.run(cdbs.unmap(len(params)), params).good
    assert _read(device, boundary - 3000, 6000) == bytes(6000 * BS)
    r = device.run(cdbs.read10(10, 5), data_in_len=5 * BS)
    assert r.data == pattern + bytes(3 * BS) + pattern
    # WRITE SAME with UNMAP and a zero block deallocates; it reads zeros.
    assert device.run(cdbs.write_same16(2000, 1000, unmap=True), bytes(BS)).good
    r = device.run(cdbs.read16(1990, 20), data_in_len=20 * BS)
    assert r.data == pattern * 10 + bytes(10 * BS)


def test_an_rbd_image_is_reported_thin_provisioned(device: RingHarness) -> None:
    """SBC-4 6.6.4 / 4.7.3.1: beside LBPME 1, VPD B2h's PROVISIONING TYPE is 010b (thin: objects
    are allocated by the writes that reach them, a full pool refuses new data); before: 000b,
    which says fully provisioned."""
    rc = device.run(cdbs.read_capacity16(), data_in_len=32)
    assert rc.good and rc.data[14] & 0x80  # LBPME
    b2 = device.run(cdbs.inquiry(evpd=True, page_code=0xB2, allocation_length=64),
                    data_in_len=64)
    assert b2.good and b2.data[6] & 0x07 == 0b010, b2.data.hex()


def test_compare_and_write(device: RingHarness) -> None:
    """librbd's atomic compare-and-write takes one 512-byte sector: VPD B0h says 1 block,
    a longer one is INVALID FIELD IN CDB; a miscompare reports the byte in INFORMATION."""
    b0 = device.run(cdbs.inquiry(evpd=True, page_code=0xB0, allocation_length=64),
                    data_in_len=64)
    assert b0.good and b0.data[5] == 1  # SBC-4 6.6.3 MAXIMUM COMPARE AND WRITE LENGTH
    old, new = b"\xaa" * BS, b"\xbb" * BS
    assert device.run(cdbs.write10(40, 1), old).good
    assert device.run(cdbs.compare_and_write(40, 1), old + new).good
    assert device.run(cdbs.read10(40, 1), data_in_len=BS).data == new
    # Miscompare at byte 300 of the compared data: 0Eh/1Dh/00h, INFORMATION 300, no write —
    # in the first RADOS object and past it (librbd 16.2 counts from the object's start).
    boundary = (4 << 20) // BS
    for lba in (40, boundary - 1, boundary, SIZE // BS - 1):
        assert device.run(cdbs.write10(lba, 1), new).good
        for byte in (0, 300, BS - 1):
            wrong = bytearray(new)
            wrong[byte] ^= 1
            r = device.run(cdbs.compare_and_write(lba, 1), bytes(wrong) + old)
            assert r.sense_codes == (0x0E, 0x1D, 0x00)
            assert r.information == byte, (lba, byte, r.information)
        assert device.run(cdbs.read10(lba, 1), data_in_len=BS).data == new
    r = device.run(cdbs.compare_and_write(40, 2), bytes(4 * BS))
    assert r.sense_codes == (0x05, 0x24, 0x00)


def test_missing_image_is_a_config_error_naming_the_key(ceph_cluster: Any) -> None:
    with pytest.raises(ConfigError, match=r"key 'image': rbd/nope-[0-9a-f]+: no such image"):
        _open(ceph_cluster, f"nope-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConfigError, match=r"key 'image': nopool/x: pool 'nopool' does not "):
        CephHandler.open(DeviceConfig("c", "ceph", f"image=nopool/x;conf={ceph_cluster.conf}",
                                      SIZE, BS))
    # The size is the device's, not the config string's `image`: named as YAML and configfs
    # name it (before: "key 'image'").
    with pytest.raises(ConfigError, match=r"the device's size \(YAML `size`, configfs "
                       r"`dev_size`\): 16777216 bytes, larger than the image rbd/s-\w+ "
                       r"\(8388608 bytes\); expected a size up to the image's"):
        image = f"s-{uuid.uuid4().hex[:8]}"
        _open(ceph_cluster, image, extra=";create=1").close()
        _open(ceph_cluster, image, size=2 * SIZE)


def test_a_client_id_with_a_dot(ceph_cluster: Any, tmp_path: Path) -> None:
    """``id=iscsi.gw1`` (client.iscsi.gw1, a gateway's own user) and ``id=client.iscsi.gw1``
    both connect as that client, as ``rbd --id iscsi.gw1`` does."""
    admin = ceph_cluster.admin()
    try:
        keyring = admin.mon_command({"prefix": "auth get-or-create",
                                     "entity": "client.iscsi.gw1", "format": "plain",
                                     "caps": ["mon", "profile rbd", "osd", "profile rbd"]})[0]
    finally:
        admin.shutdown()
    path = tmp_path / "client.iscsi.gw1.keyring"
    path.write_text(keyring)
    image = f"d-{uuid.uuid4().hex[:8]}"
    for client in ("iscsi.gw1", "client.iscsi.gw1"):
        dev = _open(ceph_cluster, image, extra=f";create=1;keyring={path}", client=client)
        try:
            assert dev.backend.cluster.client == "client.iscsi.gw1"
        finally:
            dev.close()


def test_credential_and_conf_errors_name_the_key(ceph_cluster: Any, tmp_path: Path) -> None:
    """A conf file or keyring that is not there, or a client the cluster does not know: a
    ConfigError naming the key and what was expected, not librados' bare errno."""
    image = f"e-{uuid.uuid4().hex[:8]}"
    other = tmp_path / "other.keyring"
    other.write_text("[client.nobody]\n\tkey = AQBHbq1lAAAAABAAdKl2GoOTeRUfYpEYzL2Dpw==\n")
    cases = [
        (dict(extra=";create=1;keyring=/nonexistent.keyring"),
         "key 'keyring': /nonexistent.keyring: no such file; expected the client's keyring"),
        (dict(extra=";create=1", client="nosuchuser"),
         "keys 'id' and 'keyring': the cluster of"),
        (dict(extra=f";create=1;keyring={other}"), "did not let client.admin in with"),
        # a directory (keyring=/etc/ceph): was librados' bare EISDIR
        (dict(extra=f";create=1;keyring={tmp_path}"),
         f"key 'keyring': {tmp_path}: a directory; expected the client's keyring"),
    ]
    garbage = tmp_path / "garbage.keyring"  # librados: EIO, was a bare RadosError
    garbage.write_text("[client.admin]\n\tkey = AQBHbq1l\n")
    cases.append((dict(extra=f";create=1;keyring={garbage}"), "did not let client.admin in"))
    for kw, match in cases:
        with pytest.raises(ConfigError, match=match):
            _open(ceph_cluster, image, **kw)
    cfg = _config(ceph_cluster, image, extra=";create=1")
    cfg = DeviceConfig(cfg.name, cfg.subtype, cfg.cfgstring.replace(
        f"conf={ceph_cluster.conf}", "conf=/nonexistent/ceph.conf"), cfg.size, cfg.block_size)
    with pytest.raises(ConfigError, match="key 'conf': /nonexistent/ceph.conf: no such file"):
        CephHandler.open(cfg)
    # a conf that does not parse is the conf's fault, not the client's (librados: EINVAL)
    broken = tmp_path / "broken.conf"
    broken.write_text("[global\nmon_host = \n")
    cfg = DeviceConfig(cfg.name, cfg.subtype, cfg.cfgstring.replace(
        "conf=/nonexistent/ceph.conf", f"conf={broken}"), cfg.size, cfg.block_size)
    with pytest.raises(ConfigError, match=f"key 'conf': {broken}: librados cannot use it"):
        CephHandler.open(cfg)
    # a conf that names no monitor: the conf's fault (librados: ENOENT), not the credentials'
    nomon = tmp_path / "nomon.conf"
    nomon.write_text("[global]\nfsid = 00000000-0000-0000-0000-000000000000\n")
    cfg = DeviceConfig(cfg.name, cfg.subtype, cfg.cfgstring.replace(
        f"conf={broken}", f"conf={nomon}"), cfg.size, cfg.block_size)
    with pytest.raises(ConfigError, match=f"key 'conf': {nomon}: names no monitor"):
        CephHandler.open(cfg)
    # a client whose caps only read: the key and the caps it needs, not a bare EPERM
    admin = ceph_cluster.admin()
    try:
        keyring = admin.mon_command({"prefix": "auth get-or-create", "entity": "client.ro",
                                     "format": "plain", "caps": ["mon", "profile rbd", "osd",
                                                                 "profile rbd-read-only"]})[0]
    finally:
        admin.shutdown()
    (tmp_path / "ro.keyring").write_text(keyring)
    _open(ceph_cluster, image, extra=";create=1").close()
    with pytest.raises(ConfigError, match=f"key 'id': rbd/{image}: client.ro may not open the "
                       r"image .*\(`profile rbd`\)"):
        _open(ceph_cluster, image, client="ro", extra=f";keyring={tmp_path / 'ro.keyring'}")


def test_exclusive_lock_holder_wins(ceph_cluster: Any) -> None:
    """Two devices on one image: the first takes the exclusive lock; the second is NOT READY
    (02h/04h/03h) with the holder named, unless it is configured lock=shared."""
    image = f"l-{uuid.uuid4().hex[:8]}"
    first = _open(ceph_cluster, image, extra=";create=1")
    try:
        assert first.backend.not_ready is None
        second = _open(ceph_cluster, image, name="ceph1")
        try:
            assert second.backend.not_ready is not None
            assert "exclusive lock is held by" in second.backend.not_ready
            assert second.not_ready_reason == second.backend.not_ready  # `tcmu-py status`
            h = _harness(second)
            try:
                assert h.run(cdbs.test_unit_ready()).sense_codes == (0x02, 0x04, 0x03)
                r = h.run(cdbs.write10(0, 1), b"x" * BS)
                assert r.sense_codes == (0x02, 0x04, 0x03)
            finally:
                h.close()
        finally:
            second.close()
        h1 = _harness(first)
        try:
            assert h1.run(cdbs.write10(0, 1), b"y" * BS).good
            # A gateway sharing the image (lock=shared) while this one holds the exclusive
            # lock: it reads, and a write is WRITE PROTECTED 07h/27h/00h (librbd's EROFS),
            # not a medium error, and changes nothing; the holder keeps its lock.
            shared = _open(ceph_cluster, image, name="ceph2", extra=";lock=shared")
            h2 = _harness(shared)
            try:
                assert h2.run(cdbs.read10(0, 1), data_in_len=BS).data == b"y" * BS
                r = h2.run(cdbs.write10(0, 1), b"z" * BS)
                assert r.sense_codes == (0x07, 0x27, 0x00), r
                # Nothing of its own to write back: SYNCHRONIZE CACHE is GOOD (it was WRITE
                # PROTECTED: librbd refuses the flush as it does a write).
                for sync in (cdbs.synchronize_cache10(), cdbs.synchronize_cache16()):
                    r = h2.run(sync)
                    assert r.good, r
            finally:
                h2.close()  # closes `shared` too
            assert first.image.is_lock_owner()
            assert h1.run(cdbs.read10(0, 1), data_in_len=BS).data == b"y" * BS
        finally:
            h1.close()
    finally:
        first.close()


def test_yaml_device_dev_config() -> None:
    from tcmu_py.daemon.config import dev_config_string, load_config_text

    c = load_config_text(
        "devices:\n  - name: vol1\n    handler: ceph\n    size: 1G\n    options: {image: "
        "rbd/ns1/vol1, conf: /etc/ceph/ceph.conf, id: gw1, create: true, lock: shared}\n",
        "x.yaml")
    cfg = dev_config_string(c.devices[0])
    assert cfg.startswith("ceph/image=rbd/ns1/vol1;conf=/etc/ceph/ceph.conf;id=gw1;create=1;"
                          "lock=shared")
    CephHandler.check_config(cfg.partition("/")[2].split(";wwn=")[0])


def test_yaml_two_exclusive_devices_on_one_image_are_refused() -> None:
    """Before: `check` passed two lock=exclusive devices on one image, one of which could never
    serve (the other holds the lock). Now the second is refused as two devices on one image
    file are; lock=shared devices may share an image."""
    from tcmu_py.daemon.config import load_config_text

    def doc(lock_a: str, lock_b: str, image_b: str = "rbd/ns1/vol1") -> str:
        return ("devices:\n"
                f"  - {{name: a, handler: ceph, size: 1G, options: {{image: rbd/ns1/vol1, "
                f"lock: {lock_a}}}}}\n"
                f"  - {{name: b, handler: ceph, size: 1G, options: {{image: {image_b}, "
                f"conf: /etc/ceph/../ceph/ceph.conf, lock: {lock_b}}}}}\n")

    with pytest.raises(ConfigError, match=r"devices\[1\]\.options: .*expected an image file of "
                       r"its own \(a uses ceph:/etc/ceph/ceph.conf:rbd/ns1/vol1\)"):
        load_config_text(doc("exclusive", "exclusive"), "x.yaml")
    for a, b in (("shared", "shared"), ("exclusive", "shared"), ("shared", "exclusive")):
        load_config_text(doc(a, b), "x.yaml")
    load_config_text(doc("exclusive", "exclusive", "rbd/ns1/vol2"), "x.yaml")


def test_check_warns_of_an_osd_op_timeout_not_below_half_cmd_time_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tcmu-py check` says what the open would log (it said OK, and the operator learned it
    from the daemon's log, if at all); still valid: exit 0."""
    from tcmu_py import cli

    f = tmp_path / "cfg.yaml"
    f.write_text(f"state_dir: {tmp_path}/state\ndevices:\n"
                 "  - {name: a, handler: ceph, size: 1G, cmd_time_out: 30, options: {image: "
                 "rbd/vol1, osd_op_timeout: 20}}\n"
                 "  - {name: b, handler: ceph, size: 1G, cmd_time_out: 30, options: {image: "
                 "rbd/vol2, osd_op_timeout: 10}}\n"
                 "  - {name: c, handler: ceph, size: 1G, options: {image: rbd/vol3}}\n")
    assert cli.main(["check", "-c", str(f)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{f}: OK (3 device(s))"
    assert err.count("warning:") == 1, err
    assert (f"{f}: warning: device a: osd_op_timeout 20 s is not below half the device's "
            "cmd_time_out 30 s") in err and "expected at most 14" in err


@contextlib.contextmanager
def _stopped(procs: list[Any]) -> Iterator[None]:
    """`procs` (daemons of the cluster) stopped with SIGSTOP, every thread of them (bounded),
    and continued with SIGCONT on leaving, whatever happened inside."""
    for p in procs:
        os.kill(p.pid, signal.SIGSTOP)
    try:
        _wait_stopped([p.pid for p in procs])
        yield
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGCONT)


def _wait_stopped(pids: list[int], timeout: float = 10.0) -> None:
    """Until every thread of every process in `pids` is stopped (state T in /proc), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        states = [Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                  for pid in pids for tid in os.listdir(f"/proc/{pid}/task")]
        if all(st == "T" for st in states):
            return
        assert time.monotonic() < deadline, f"OSDs not stopped after {timeout} s: {states}"
        time.sleep(0.05)


def test_cluster_unavailable_is_retryable_not_ready(ceph_cluster: Any) -> None:
    """Every OSD stopped (SIGSTOP): a read and a write fail after ``osd_op_timeout`` with NOT
    READY 02h/04h/01h, which initiators retry, instead of hanging; with the OSDs back they
    succeed. The native loop submits them from C; librbd's failure hands them to Python with
    its errno, which answers at once: one timeout in all, not a second try and two (with the
    defaults, 30 s each, that was past the kernel's cmd_time_out of 30 s)."""
    timeout = 5
    dev = _open(ceph_cluster, f"u-{uuid.uuid4().hex[:8]}",
                extra=f";create=1;osd_op_timeout={timeout}", write_cache=False)
    h = _harness(dev)
    osds = [p for name, p in ceph_cluster.procs.items() if name.startswith("osd.")]
    try:
        data = b"\x5a" * (8 * BS)
        assert h.run(cdbs.write10(0, 8), data).good
        assert _executed(h) == 1
        with _stopped(osds):
            t0 = time.monotonic()
            r = h.run(cdbs.read10(0, 8), data_in_len=8 * BS)
            waited = time.monotonic() - t0
            t0 = time.monotonic()
            w = h.run(cdbs.write10(64, 8), data)
            waited_w = time.monotonic() - t0
        assert r.sense_codes == (0x02, 0x04, 0x01), (r, waited, [p.pid for p in osds])
        assert w.sense_codes == (0x02, 0x04, 0x01), (w, waited_w)
        # One timeout, not two: a second try starts once the first failed (librbd's timer:
        # no sooner than one timeout after the submission) and takes another.
        for took in (waited, waited_w):
            assert timeout * 0.75 <= took < 2 * timeout, (waited, waited_w)
        assert _executed(h) == 1  # C's tries failed: not counted
        deadline = time.monotonic() + 60
        while True:  # the retry an initiator makes, bounded
            r = h.run(cdbs.read10(0, 8), data_in_len=8 * BS)
            if r.good or time.monotonic() > deadline:
                break
        assert r.good and r.data == data, r
        assert _executed(h) >= 2
    finally:
        h.close()
        dev.close()


def test_deallocations_over_several_objects_answer_within_one_timeout(
        ceph_cluster: Any) -> None:
    """Every OSD stopped: UNMAP and WRITE SAME with UNMAP over both RADOS objects of the image
    answered after two ``osd_op_timeout``s (librbd runs more than one operation in turn for
    them; 10 s measured with T=5, 60 s with the defaults, past ``cmd_time_out``). Now NOT READY
    02h/04h/01h after one, and they succeed once the OSDs are back."""
    timeout = 5
    dev = _open(ceph_cluster, f"d-{uuid.uuid4().hex[:8]}",
                extra=f";create=1;osd_op_timeout={timeout}", write_cache=False)
    h = _harness(dev)
    osds = [p for name, p in ceph_cluster.procs.items() if name.startswith("osd.")]
    blocks = SIZE // BS  # both 4 MiB objects
    params = cdbs.unmap_parameters([(0, blocks)])
    try:
        assert h.run(cdbs.write10(0, 8), b"\x5a" * (8 * BS)).good
        assert h.run(cdbs.write16(blocks - 8, 8), b"\x5a" * (8 * BS)).good
        with _stopped(osds):
            took = []
            for cdb, data in ((cdbs.unmap(len(params)), params),
                              (cdbs.write_same16(0, blocks, unmap=True), bytes(BS))):
                t0 = time.monotonic()
                r = h.run(cdb, data)
                took.append(time.monotonic() - t0)
                assert r.sense_codes == (0x02, 0x04, 0x01), (r, took)
        # One timeout, not two: librbd's second operation starts once its first failed (no
        # sooner than one timeout after the submission) and takes another.
        assert all(t < 2 * timeout for t in took), took
        deadline = time.monotonic() + 60
        while True:  # the initiator's retry, bounded
            r = h.run(cdbs.unmap(len(params)), params)
            if r.good or time.monotonic() > deadline:
                break
        assert r.good, r
        assert h.run(cdbs.read16(blocks - 8, 8), data_in_len=8 * BS).data == bytes(8 * BS)
    finally:
        h.close()
        dev.close()


def test_commands_queued_behind_a_stalled_one_answer_within_one_timeout_of_arrival(
        ceph_cluster: Any) -> None:
    """Every OSD stopped, two WRITE SAMEs (a pattern: librbd's writesame, waited for on a
    worker) in one pool chunk. Before: the second started when the first had used its whole
    ``osd_op_timeout`` and waited one more, and the first was answered with it: both at two
    timeouts (50 s with the defaults, past the kernel's cmd_time_out of 30 s). Now one timeout
    counts from the command's arrival, and a command that took long is answered at once."""
    timeout = 4
    dev = _open(ceph_cluster, f"q-{uuid.uuid4().hex[:8]}",
                extra=f";create=1;osd_op_timeout={timeout}", write_cache=False)
    h = RingHarness(dev, workers=1)  # one worker: both commands in one chunk
    assert h.run(cdbs.test_unit_ready()).sense_codes == (0x06, 0x29, 0x00)
    osds = [p for name, p in ceph_cluster.procs.items() if name.startswith("osd.")]
    try:
        assert h.run(cdbs.write10(0, 8), b"\x5a" * (8 * BS)).good
        with _stopped(osds):
            t0 = time.monotonic()
            first, second = h.submit_many([(cdbs.write_same16(0, 64), b"\x01" * BS, 0),
                                           (cdbs.write_same16(64, 64), b"\x02" * BS, 0)])
            took = []
            for p in (first, second):
                h.wait([p], timeout=4 * timeout)
                took.append(time.monotonic() - t0)
        for p in (first, second):
            assert p.status == 2 and p.sense[2] & 0xF == 2, p  # NOT READY
        # One timeout, not two: a second that started only once the first had failed (no
        # sooner than one timeout after the submission) would take another.
        assert all(t < 2 * timeout for t in took), took
    finally:
        h.close()
        dev.close()


def test_a_read_of_blocks_a_stalled_write_is_writing_holds_up_no_later_command(
        ceph_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every OSD stopped; one batch of WRITE x, READ x for both RADOS objects x of the image.
    Before: the native loop waited for the WRITE's librbd operation before handing the READ
    over, which
    held every later command up to one more ``osd_op_timeout``, and each such pair added one
    (measured with the defaults: answers at 14, 28, 28, 42, 42, 56 s, past the kernel's
    cmd_time_out of 30). Now the READ goes to Python at once, which waits for the WRITE (ring
    order), and finds its time gone: every command NOT READY within one timeout.

    Python takes the batch late here, as a loaded machine does (the unit suite beside a VM:
    answers at 3, 6, 6, 6 s). Before, a command's time counted from when Python took it,
    which left the READ that much after the WRITE failed: it started a librbd read of its
    own, which the stopped OSDs held one more timeout. Now it counts from when C dequeued it.

    The bound: an answer within one timeout, plus the time the machine takes to deliver it,
    comes before two; a READ that starts its own operation once the WRITE failed (at least
    one timeout after the submission) cannot answer before two."""
    timeout = 3
    late = timeout / 4  # Python's first take after the submission (C's hand-off waits)
    dev = _open(ceph_cluster, f"o-{uuid.uuid4().hex[:8]}",
                extra=f";create=1;osd_op_timeout={timeout}", write_cache=False)
    h = _harness(dev)
    osds = [p for name, p in ceph_cluster.procs.items() if name.startswith("osd.")]
    obj = (4 << 20) // BS
    serve = h.runner._serve_native
    delays = []  # armed: one late take

    def serve_late() -> int:
        if delays:
            time.sleep(delays.pop())
        return serve()

    monkeypatch.setattr(h.runner, "_serve_native", serve_late)
    try:
        for k in range(2):
            assert h.run(cdbs.write10(k * obj, 8), b"\x5a" * (8 * BS)).good
        with _stopped(osds):
            items = []
            for k in range(2):
                items += [(cdbs.write10(k * obj, 8), b"\xa5" * (8 * BS), 0),
                          (cdbs.read10(k * obj, 8), b"", 8 * BS)]
            delays.append(late)
            t0 = time.monotonic()
            pend = h.submit_many(items)
            took = []
            for p in pend:
                h.wait([p], timeout=8 * timeout)
                took.append(time.monotonic() - t0)
        assert not delays  # Python did take the batch late
        for p in pend:
            assert p.status == 2 and (p.sense[2] & 0xF, p.sense[12], p.sense[13]) == \
                (0x02, 0x04, 0x01), p
        assert max(took) < 2 * timeout, took
        deadline = time.monotonic() + 60
        while True:  # the initiator's retry, bounded: the WRITE's data or the old, whole
            r = h.run(cdbs.read10(0, 8), data_in_len=8 * BS)
            if r.good or time.monotonic() > deadline:
                break
        assert r.good and r.data in (b"\x5a" * (8 * BS), b"\xa5" * (8 * BS)), r
    finally:
        h.close()
        dev.close()


def _time_with_writes_in_flight(cluster: Any, dev: CephDevice, h: RingHarness, timeout: int,
                                call: Any) -> float:
    """Write LBA 0, then with every OSD stopped hand C eight WRITEs (librbd has them in
    flight), call `call()`, and wait for the WRITEs to end (they time out); the seconds from
    handing the WRITEs over until `call` returned. A `call` that waits for them returns no
    sooner than `timeout` after that (librbd fails them `timeout` after C submitted them);
    one that does not returns well before, however slow the machine is to run the rest."""
    loop = h.runner.native
    assert loop is not None
    osds = [p for name, p in cluster.procs.items() if name.startswith("osd.")]
    assert h.run(cdbs.write10(0, 8), b"\x5a" * (8 * BS)).good
    with _stopped(osds):
        loop.figures()
        t0 = time.monotonic()
        pend = h.submit_many([(cdbs.write10(k * 64, 8), b"\xa5" * (8 * BS), 0)
                              for k in range(8)])
        deadline = time.monotonic() + 10
        while not loop.figures()["batches"]:  # C took them: librbd has them in flight
            assert time.monotonic() < deadline
            time.sleep(0.01)
        call()
        took = time.monotonic() - t0
        h.wait(pend, timeout=4 * timeout)
    return took


def test_a_header_change_does_not_wait_for_the_operations_in_flight(ceph_cluster: Any) -> None:
    """librbd's watch callback (a resize by another client) turned the native loop's execution
    off on librbd's thread, which waits for every librbd operation C has in flight; librbd runs
    their completions on that same thread (its one io_context_pool thread), so a resize that met
    writes in flight hung the device for good (an audit: 2 runs of 9 shrinking and growing the
    image under 64 writes at its end). The callback now returns at once (here, with the
    operations held in flight by stopped OSDs: before, it returned after they timed out)."""
    timeout = 5
    dev = _open(ceph_cluster, f"h-{uuid.uuid4().hex[:8]}",
                extra=f";create=1;osd_op_timeout={timeout}", write_cache=False)
    h = _harness(dev)
    try:
        took = _time_with_writes_in_flight(ceph_cluster, dev, h, timeout, dev._on_header_change)
        assert took < timeout, took
        deadline = time.monotonic() + 60
        while True:  # then: a command follows the (unchanged) size, and C serves again
            r = h.run(cdbs.read10(0, 8), data_in_len=8 * BS)
            if r.good or time.monotonic() > deadline:
                break
        assert r.good, r
    finally:
        h.close()
        dev.close()


def test_a_blocklisting_seen_on_librbds_thread_does_not_wait_for_operations_in_flight(
        ceph_cluster: Any) -> None:
    """A failed operation's completion runs on librbd's callback thread; one that says the
    client is blocklisted (ESHUTDOWN) makes the device NOT READY and turned the native loop's
    execution off right there, which waits for every librbd operation C has in flight, whose
    completions need that same thread (the hang of a header change, D89, by another road).
    Now `sense` returns at once (here with operations held in flight by stopped OSDs: before,
    it returned when they timed out), and the device reconnects and serves once they return."""
    timeout = 5
    dev = _open(ceph_cluster, f"k-{uuid.uuid4().hex[:8]}",  # (shared: the old client,
                extra=f";create=1;lock=shared;osd_op_timeout={timeout}",  # not really
                write_cache=False)  # blocklisted here, keeps its exclusive lock)
    h = _harness(dev)
    try:
        took = _time_with_writes_in_flight(
            ceph_cluster, dev, h, timeout,
            lambda: dev.backend.sense(OSError(errno.ESHUTDOWN, "blocklisted"), True))
        assert dev.backend.not_ready is not None
        assert took < timeout, took
        deadline = time.monotonic() + 90
        while True:  # reconnected as a new client: serving again
            r = h.run(cdbs.read10(0, 8), data_in_len=8 * BS)
            if r.good or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.good and r.data in (b"\x5a" * (8 * BS), b"\xa5" * (8 * BS)), r
    finally:
        h.close()
        dev.close()


def test_a_standby_says_so_when_the_exclusive_lock_feature_is_disabled(
        ceph_cluster: Any) -> None:
    """`rbd feature disable ... exclusive-lock` while two lock=exclusive gateways have the
    image. Before: the standby said for good "the exclusive lock is held by another client"
    though no lock exists any more. Now it says the feature was disabled and what to do; it
    stays NOT READY (serving would let it write beside the other gateway, which goes on)."""
    from tcmu_py.handlers.ceph import device as ceph_device

    image = f"f-{uuid.uuid4().hex[:8]}"
    a = _open(ceph_cluster, image, extra=";create=1", write_cache=False)
    ha = _harness(a)
    b = _open(ceph_cluster, image, name="ceph1", write_cache=False)
    hb = _harness(b)
    try:
        assert ha.run(cdbs.write10(0, 8), b"\x3c" * (8 * BS)).good
        assert "held by" in str(b.backend.not_ready)
        subprocess.run(["rbd", "-c", str(ceph_cluster.conf), "feature", "disable",
                        f"rbd/{image}", "object-map,fast-diff,exclusive-lock"],
                       check=True, timeout=60, capture_output=True)
        deadline = time.monotonic() + 4 * ceph_device.LOCK_RETRY_INTERVAL + 30
        while "feature was disabled" not in str(b.backend.not_ready):
            assert time.monotonic() < deadline, b.backend.not_ready
            time.sleep(0.2)
        assert "rbd feature enable" in str(b.backend.not_ready)
        r = hb.run(cdbs.read10(0, 1), data_in_len=BS)
        assert r.sense_codes[:2] == (0x02, 0x04), r
    finally:
        for h, d in ((ha, a), (hb, b)):
            h.close()
            d.close()


def test_a_reconnected_gateway_that_finds_the_lock_taken_stands_by(
        ceph_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another gateway broke this one's lock (``rbd lock rm`` blocklists the holder) and took
    it. Before: this device, reconnected as a new client that found the lock another's,
    answered NOT READY 02h/04h/01h ("becoming ready", which initiators retry for minutes)
    for as long as the other held it. Now 02h/04h/03h, as a standby opened so does. Its new
    client blocklisted too (an operator), it connects a third, and takes over when the other
    gateway lets go (it kept trying with the blocklisted client, which can take no lock)."""
    from tcmu_py.handlers.ceph import device as ceph_device

    monkeypatch.setattr(ceph_device, "RECONNECT_INTERVAL", 0.5)
    monkeypatch.setattr(ceph_device, "LOCK_RETRY_INTERVAL", 0.5)
    image = f"s-{uuid.uuid4().hex[:8]}"
    rbd = ["rbd", "-c", str(ceph_cluster.conf), "--id", "admin"]
    a = _open(ceph_cluster, image, extra=";create=1", write_cache=False)
    ha = _harness(a)
    admin = ceph_cluster.admin()
    blocked: list[str] = []
    b = hb = None
    try:
        assert ha.run(cdbs.write10(0, 8), b"\x3c" * (8 * BS)).good
        out = subprocess.run([*rbd, "lock", "ls", f"rbd/{image}", "--format", "json"],
                             check=True, timeout=60, capture_output=True, text=True).stdout
        found = json.loads(out)
        locks = found if isinstance(found, list) else [{"id": k, **v} for k, v in found.items()]
        assert len(locks) == 1, locks
        blocked.append(locks[0]["address"])
        subprocess.run([*rbd, "lock", "rm", f"rbd/{image}", locks[0]["id"], locks[0]["locker"]],
                       check=True, timeout=60, capture_output=True)
        b = _open(ceph_cluster, image, name="ceph1", write_cache=False)
        hb = _harness(b)
        assert hb.run(cdbs.write10(8, 8), b"\x3d" * (8 * BS)).good  # the lock is b's
        deadline = time.monotonic() + 60
        seen = []
        while True:  # an initiator's retries, bounded: a's new client connects, finds b's lock
            r = ha.run(cdbs.read10(0, 8), data_in_len=8 * BS)
            seen.append(r.sense_codes)
            if r.sense_codes == (0x02, 0x04, 0x03) or time.monotonic() > deadline:
                break
            assert r.sense_codes == (0x02, 0x04, 0x01), r
            time.sleep(0.2)
        assert r.sense_codes == (0x02, 0x04, 0x03), seen[-3:]
        assert hb.run(cdbs.read10(8, 8), data_in_len=8 * BS).data == b"\x3d" * (8 * BS)
        second = a.backend.cluster.address()
        retired = len(a.backend._retired)
        admin.mon_command({"prefix": "osd blocklist", "blocklistop": "add", "addr": second})
        blocked.append(second)
        assert wait_until(lambda: len(a.backend._retired) > retired, 60, 0.2), \
            "no third client after the second was blocklisted"
        hb.close()
        b.close()
        hb = b = None  # b lets go of the lock: a takes over (retry every 0.5 s)
        assert wait_until(lambda: ha.run(cdbs.read10(8, 8), data_in_len=8 * BS).good, 60, 0.2), \
            a.not_ready_reason
        assert _read(ha, 0, 16) == b"\x3c" * (8 * BS) + b"\x3d" * (8 * BS)
        assert ha.run(cdbs.write10(16, 8), b"\x3e" * (8 * BS)).good
    finally:
        for h, dev in ((hb, b), (ha, a)):
            if h is not None:
                h.close()
            if dev is not None:
                dev.close()
        for addr in blocked:
            admin.mon_command({"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr})
        admin.shutdown()


def test_a_failed_write_back_of_librbd_cache_is_not_retryable(ceph_cluster: Any) -> None:
    """``rbd_cache=1`` in write-back mode (after a first flush): with every OSD stopped, a
    write is acknowledged from the cache and SYNCHRONIZE CACHE fails after the timeout. librbd
    then drops those writes (a second flush succeeds at once), so the failure is WRITE ERROR
    03h/0Ch/00h, not NOT READY: sd retries NOT READY, and the retry's GOOD hid the loss."""
    timeout = 3
    dev = _open(ceph_cluster, f"b-{uuid.uuid4().hex[:8]}",
                extra=f";create=1;rbd_cache=1;osd_op_timeout={timeout}")
    h = _harness(dev)
    osds = [p for name, p in ceph_cluster.procs.items() if name.startswith("osd.")]
    try:
        assert h.run(cdbs.write10(0, 8), bytes(8 * BS)).good
        assert h.run(cdbs.synchronize_cache10()).good  # librbd's cache now writes back
        with _stopped(osds):
            assert h.run(cdbs.write10(0, 1), b"A" * BS).good  # from the cache
            r = h.run(cdbs.synchronize_cache10())
        assert r.sense_codes == (0x03, 0x0C, 0x00), r
    finally:
        h.close()
        dev.close()


def test_opening_while_the_cluster_does_not_answer_is_unavailable_not_a_failure(
        ceph_cluster: Any) -> None:
    """The monitor stopped (SIGSTOP) when the device is opened, as when a gateway boots before
    its cluster: the handler raises DeviceUnavailable within ``osd_op_timeout`` (the daemon
    serves the device NOT READY, becoming ready, and opens it again: test_daemon.py), not an
    error that needs an operator; with the monitor back the same open succeeds."""
    config = _config(ceph_cluster, f"m-{uuid.uuid4().hex[:8]}", extra=";create=1;osd_op_timeout=2")
    mons = [p for name, p in ceph_cluster.procs.items() if name.startswith("mon.")]
    assert mons
    with _stopped(mons):
        t0 = time.monotonic()
        with pytest.raises(DeviceUnavailable, match="does not answer") as info:
            CephHandler.open(config)
        waited = time.monotonic() - t0
    assert isinstance(info.value.__cause__, OSError), info.value.__cause__
    assert waited < 20, waited
    dev = CephHandler.open(config)
    try:
        h = _harness(dev)
        try:
            assert h.run(cdbs.write10(0, 1), b"\x11" * BS).good
            assert h.run(cdbs.read10(0, 1), data_in_len=BS).data == b"\x11" * BS
        finally:
            h.close()
    finally:
        dev.close()


@pytest.mark.parametrize(("err", "writing", "codes"), [
    (errno.ETIMEDOUT, False, (0x02, 0x04, 0x01)),
    (errno.ESHUTDOWN, True, (0x02, 0x04, 0x01)),  # this client was blocklisted
    (errno.EIO, False, (0x03, 0x11, 0x00)),
    (errno.EIO, True, (0x03, 0x0C, 0x00)),
    (errno.EROFS, True, (0x07, 0x27, 0x00)),  # another client's exclusive lock: read-only
    (errno.EROFS, False, (0x03, 0x11, 0x00)),
])
def test_errors_become_sense(err: int, writing: bool, codes: tuple[int, int, int]) -> None:
    from tcmu_py.handlers.ceph.device import scsi_error
    from tcmu_py.handlers.ceph.librbd import RadosError

    exc = scsi_error(RadosError(err, "x"), writing)
    assert isinstance(exc, ScsiError)
    assert (exc.sense_key, exc.asc, exc.ascq) == codes


def test_resize_follows_the_image(device: RingHarness) -> None:
    """A TCMU reconfig to a larger size grows the image; READ CAPACITY reports it after
    CAPACITY DATA HAS CHANGED (06h/2Ah/09h)."""
    dev = device.device
    assert isinstance(dev, CephDevice)
    dev.resize(2 * SIZE)
    assert dev.image.size() == 2 * SIZE
    assert device.run(cdbs.read_capacity16(), data_in_len=32).sense_codes == (0x06, 0x2A, 0x09)
    rc = device.run(cdbs.read_capacity16(), data_in_len=32)
    assert int.from_bytes(rc.data[:8], "big") + 1 == 2 * SIZE // BS


def _lba_status(h: RingHarness, lba: int) -> list[tuple[int, int, int]]:
    """GET LBA STATUS from `lba`: [(lba, blocks, provisioning status)] (SBC-4 6.6)."""
    r = h.run(cdbs.get_lba_status(lba), data_in_len=4096)
    assert r.good, r
    n = (int.from_bytes(r.data[:4], "big") - 4) // 16
    return [(int.from_bytes(d[:8], "big"), int.from_bytes(d[8:12], "big"), d[12] & 0x0F)
            for d in (r.data[8 + 16 * i:24 + 16 * i] for i in range(n))]


def _status_of(runs: list[tuple[int, int, int]], lba: int) -> int:
    return next(st for start, n, st in runs if start <= lba < start + n)


def test_get_lba_status_follows_the_image_allocation(device: RingHarness) -> None:
    """GET LBA STATUS reports what librbd says holds data: a fresh image is deallocated,
    written blocks are mapped, blocks UNMAP deallocated whole objects of are deallocated
    again; the runs are contiguous from the requested LBA to the end of the disk."""
    blocks = SIZE // BS
    boundary = (4 << 20) // BS
    assert device.run(cdbs.inquiry(evpd=True, page_code=0xB2, allocation_length=8),
                      data_in_len=8).data[5] & 0x80  # LBPU: UNMAP supported
    assert _lba_status(device, 0) == [(0, blocks, 1)]
    assert device.run(cdbs.write10(100, 8), b"\x01" * (8 * BS)).good
    assert device.run(cdbs.write10(boundary + 50, 1), b"\x02" * BS).good
    runs = _lba_status(device, 0)
    assert runs[0][0] == 0 and sum(n for _, n, _ in runs) == blocks
    assert all(a + n == b for (a, n, _), (b, _, _) in zip(runs, runs[1:], strict=False))
    for lba in (100, 107, boundary + 50):
        assert _status_of(runs, lba) == 0, runs
    assert _status_of(runs, blocks - 1) == 1, runs
    # From an LBA inside the second object: the first descriptor starts there.
    runs = _lba_status(device, boundary + 50)
    assert runs[0][:1] == (boundary + 50,) and runs[0][2] == 0
    # UNMAP of the whole first object removes it: deallocated again.
    params = cdbs.unmap_parameters([(0, boundary)])
    assert device.run(cdbs.unmap(len(params)), params).good
    runs = _lba_status(device, 0)
    assert _status_of(runs, 100) == 1 and _status_of(runs, boundary + 50) == 0, runs
    r = device.run(cdbs.get_lba_status(blocks), data_in_len=64)
    assert r.sense_codes == (0x05, 0x21, 0x00)  # LBA OUT OF RANGE


def test_write_same_of_zeros_without_unmap_leaves_the_blocks_allocated(
        device: RingHarness) -> None:
    """Before: WRITE SAME of a zero block with UNMAP=0 (and NDOB) went to librbd's
    write-zeroes, which removed whole objects: GET LBA STATUS then said deallocated, and a disk
    made "eager-zeroed thick" that way was thin after all. SBC-4 5.50: without UNMAP the blocks
    are written. With UNMAP they may be deallocated, and are."""
    boundary = (4 << 20) // BS
    assert device.run(cdbs.write_same16(0, boundary), bytes(BS)).good  # a fresh object
    assert device.run(cdbs.write10(boundary + 7, 1), b"\x03" * BS).good
    assert device.run(cdbs.write_same16(boundary, boundary, ndob=True)).good  # over data
    runs = _lba_status(device, 0)
    assert [_status_of(runs, lba) for lba in (0, boundary - 1, boundary + 7, 2 * boundary - 1)
            ] == [0, 0, 0, 0], runs
    assert _read(device, 0, 2 * boundary) == bytes(2 * boundary * BS)
    assert device.run(cdbs.write_same16(boundary, boundary, unmap=True), bytes(BS)).good
    runs = _lba_status(device, 0)
    assert _status_of(runs, 0) == 0 and _status_of(runs, boundary + 7) == 1, runs


def test_resize_by_another_client_is_followed(ceph_cluster: Any) -> None:
    """`rbd resize` from another client (its own connection): the device's watch sees the
    header change, the next command reports CAPACITY DATA HAS CHANGED and READ CAPACITY the
    new size; LBAs past the old end then work."""
    image = f"r-{uuid.uuid4().hex[:8]}"
    dev = _open(ceph_cluster, image, extra=";create=1;lock=shared")
    h = _harness(dev)
    try:
        admin = ceph_cluster.admin()
        try:
            ioctx = admin.ioctx("rbd")
            other = ioctx.open_image(image)
            try:
                other.resize(3 * SIZE)
            finally:
                other.close()
                ioctx.close()
        finally:
            admin.shutdown()
        assert wait_until(dev._header_changed.is_set, 30), "no header notification within 30 s"
        assert h.run(cdbs.read_capacity16()).sense_codes == (0x06, 0x2A, 0x09)
        rc = h.run(cdbs.read_capacity16(), data_in_len=32)
        assert int.from_bytes(rc.data[:8], "big") + 1 == 3 * SIZE // BS
        last = 3 * SIZE // BS - 1
        assert h.run(cdbs.write10(last, 1), b"\x07" * BS).good
        assert h.run(cdbs.read10(last, 1), data_in_len=BS).data == b"\x07" * BS
    finally:
        h.close()
        dev.close()


def _resize_elsewhere(cluster: Any, image: str, size: int) -> None:
    """`rbd resize` by another client (a connection of its own)."""
    admin = cluster.admin()
    try:
        ioctx = admin.ioctx("rbd")
        other = ioctx.open_image(image)
        try:
            other.resize(size)
        finally:
            other.close()
            ioctx.close()
    finally:
        admin.shutdown()


def test_a_kernel_resize_grows_the_image_and_never_shrinks_it(ceph_cluster: Any) -> None:
    """A device smaller than its image (allowed) resized by the kernel to a size still below
    the image's: the image keeps its size and the data past the device's end; resized past
    the image's size: the image grows."""
    image = f"k-{uuid.uuid4().hex[:8]}"
    full = _open(ceph_cluster, image, extra=";create=1", size=2 * SIZE)
    h = _harness(full)
    try:
        assert h.run(cdbs.write10(2 * SIZE // BS - 1, 1), b"\x5e" * BS).good
    finally:
        h.close()
        full.close()
    dev = _open(ceph_cluster, image)
    try:
        dev.resize(SIZE + SIZE // 2)
        assert dev.image.size() == 2 * SIZE
        assert dev.num_blocks == (SIZE + SIZE // 2) // BS
        dev.resize(3 * SIZE)
        assert dev.image.size() == 3 * SIZE
        # librbd takes a size within 4 MiB of 2**64 (its object count overflows), then aborts
        # the process at the next write: refused, the device and image keep their sizes
        with pytest.raises(ConfigError, match="dev_size .* is above"):
            dev.resize((1 << 64) - (1 << 22) + 512)
        assert dev.image.size() == 3 * SIZE and dev.num_blocks == 3 * SIZE // BS
    finally:
        dev.close()
    again = _open(ceph_cluster, image, size=3 * SIZE)
    h = _harness(again)
    try:
        assert _read(h, 2 * SIZE // BS - 1, 1) == b"\x5e" * BS
    finally:
        h.close()
        again.close()


def test_a_header_change_that_is_not_a_resize_changes_nothing(ceph_cluster: Any) -> None:
    """A snapshot of the image (`rbd snap create`) changes its header, not its size: a
    device smaller than its image keeps its capacity, with no unit attention."""
    image = f"s-{uuid.uuid4().hex[:8]}"
    _open(ceph_cluster, image, extra=";create=1", size=2 * SIZE).close()
    dev = _open(ceph_cluster, image, extra=";lock=shared")
    h = _harness(dev)
    try:
        subprocess.run(["rbd", "-c", ceph_cluster.conf, "--id", "admin", "snap", "create",
                        f"rbd/{image}@s1"], check=True, timeout=60, capture_output=True)
        assert wait_until(dev._header_changed.is_set, 30), "no header notification within 30 s"
        rc = h.run(cdbs.read_capacity16(), data_in_len=32)
        assert rc.good, rc
        assert int.from_bytes(rc.data[:8], "big") + 1 == SIZE // BS
    finally:
        h.close()
        dev.close()


def test_a_device_smaller_than_its_image_never_grows_past_its_size(ceph_cluster: Any
                                                                   ) -> None:
    """Before: a device made smaller than its image followed the image down when another
    client shrank it below the device (as it must), then followed it up past its own size
    when it grew again (here to 4x the device's configured size). Now it grows back to its
    configured size and no further."""
    image = f"c-{uuid.uuid4().hex[:8]}"
    _open(ceph_cluster, image, extra=";create=1", size=2 * SIZE).close()
    dev = _open(ceph_cluster, image, extra=";lock=shared")  # SIZE: half its image

    def capacity_after(image_size: int) -> int:
        _resize_elsewhere(ceph_cluster, image, image_size)
        assert wait_until(dev._header_changed.is_set, 30), "no header notification in 30 s"
        assert h.run(cdbs.read_capacity16()).sense_codes == (0x06, 0x2A, 0x09)
        rc = h.run(cdbs.read_capacity16(), data_in_len=32)
        return (int.from_bytes(rc.data[:8], "big") + 1) * BS

    h = _harness(dev)
    try:
        assert capacity_after(SIZE // 2) == SIZE // 2
        assert capacity_after(4 * SIZE) == SIZE
    finally:
        h.close()
        dev.close()


@pytest.mark.parametrize("watch", [True, False])
def test_reads_past_a_shrunk_image_never_answer_good(ceph_cluster: Any, watch: bool) -> None:
    """Before: after another client shrank the image (`rbd resize --allow-shrink`), READs
    crossing the new end answered GOOD with the part past it never filled (librbd clips a
    read at the image's end and says how much it read; the count was not looked at):
    commands other workers ran while the first one took the new size used the old one, and a
    device whose header watch is gone (it logs a warning when `watch` fails) never took it.
    Now a short read is LBA OUT OF RANGE and makes the device look at the image's size, and
    commands wait for a size being taken: every READ crossing the end fails, the next
    command reports CAPACITY DATA HAS CHANGED, READ CAPACITY the new size."""
    image = f"h-{uuid.uuid4().hex[:8]}"
    dev = _open(ceph_cluster, image, extra=";create=1;lock=shared", size=2 * SIZE)
    if not watch:
        dev.image.unwatch(dev._watch)
        dev._watch = None
    h = _harness(dev)
    end = SIZE // 2 // BS  # the new end: inside the first RADOS object
    try:
        assert h.run(cdbs.write10(end - 4, 8), b"\xab" * 8 * BS).good
        _resize_elsewhere(ceph_cluster, image, SIZE // 2)
        if watch:
            assert wait_until(dev._header_changed.is_set, 30), "no header notification in 30 s"
        else:  # wholly past the new end, where data was: librbd's EINVAL (was MEDIUM ERROR)
            assert h.run(cdbs.read10(end + 100, 8), data_in_len=8 * BS
                         ).sense_codes == (0x05, 0x21, 0x00)
        pending = h.submit_many([(cdbs.read10(end - 4, 8), b"", 8 * BS)] * 12)
        h.wait(pending, timeout=60)
        for p in pending:
            assert p.status != 0, "a READ past the image's new end answered GOOD"
        codes = {(p.sense[2] & 0x0F, p.sense[12], p.sense[13]) for p in pending}
        assert codes <= {(0x06, 0x2A, 0x09), (0x05, 0x21, 0x00)}, codes
        if not watch:  # a short read had the device look: the unit attention came with
            # one of the later READs or comes now
            assert (0x05, 0x21, 0x00) in codes
            assert h.run(cdbs.test_unit_ready()).sense_codes in ((0, 0, 0), (6, 0x2A, 9))
        rc = h.run(cdbs.read_capacity16(), data_in_len=32)
        assert int.from_bytes(rc.data[:8], "big") + 1 == end
        assert h.run(cdbs.write10(end - 4, 8), b"\xcd" * 8 * BS).sense_codes == (5, 0x21, 0)
        assert _read(h, end - 4, 4) == b"\xab" * 4 * BS
    finally:
        h.close()
        dev.close()


def test_a_resize_elsewhere_is_reported_by_the_next_read_served_in_c(ceph_cluster: Any
                                                                      ) -> None:
    """With the native loop (the default), READs and WRITEs never reach Python: after the
    header changed, the loop hands the next command to Python all the same, so a READ reports
    CAPACITY DATA HAS CHANGED; C serves again after it."""
    image = f"u-{uuid.uuid4().hex[:8]}"
    dev = _open(ceph_cluster, image, extra=";create=1;lock=shared")
    h = RingHarness(dev, workers=4, native=True)
    try:
        assert h.runner.native is not None
        assert h.run(cdbs.test_unit_ready()).sense_codes == (0x06, 0x29, 0x00)
        assert h.run(cdbs.read10(0, 1), data_in_len=BS).good
        _resize_elsewhere(ceph_cluster, image, 2 * SIZE)
        assert wait_until(dev._header_changed.is_set, 30), "no header notification within 30 s"
        assert h.run(cdbs.read10(0, 1), data_in_len=BS).sense_codes == (0x06, 0x2A, 0x09)
        executed = _executed(h)
        for _ in range(4):
            assert h.run(cdbs.read10(SIZE // BS + 1, 1), data_in_len=BS).good
        assert _executed(h) > executed, "C does not serve again after the unit attention"
    finally:
        h.close()
        dev.close()


def test_lock_taken_over_when_the_holder_lets_go(ceph_cluster: Any) -> None:
    """A gateway failover: the second device is NOT READY while the first holds the exclusive
    lock; once the first closes (releasing it) the second takes the lock by itself and
    serves, without being reopened. Its native loop runs throughout: it hands every command
    to Python while the lock is another client's (the backend declares no extent), and serves
    READ/WRITE in C once the lock is taken (the backend calls its ``extent_listener``)."""
    image = f"o-{uuid.uuid4().hex[:8]}"
    first = _open(ceph_cluster, image, extra=";create=1")
    second = _open(ceph_cluster, image, name="ceph1")
    h = _harness(second)
    try:
        assert h.runner.native is not None
        assert h.run(cdbs.write10(0, 1), b"a" * BS).sense_codes == (0x02, 0x04, 0x03)
        assert h.run(cdbs.read10(0, 1), data_in_len=BS).sense_codes == (0x02, 0x04, 0x03)
        assert _executed(h) == 0
        first.close()
        assert wait_until(lambda: second.backend.not_ready is None, 60), \
            "lock not taken within 60 s"
        assert second.image.is_lock_owner()
        assert h.run(cdbs.write10(0, 1), b"b" * BS).good
        for _ in range(2):
            assert h.run(cdbs.read10(0, 1), data_in_len=BS).data == b"b" * BS
        # The first command after the change goes to Python, which declares the new extent.
        assert _executed(h) >= 2
    finally:
        h.close()
        second.close()


# -- The native loop's librbd path (issue 15) ---------------------------------------------------


def _executed(h: RingHarness) -> int:
    """Commands the C data plane executed so far (the native loop's, or stage 1's)."""
    h.runner.refresh_counters()
    if h.runner.native is not None:
        return h.runner.native.executed
    return h.runner.plane.executed if h.runner.plane is not None else 0


@pytest.mark.parametrize("native", [True, False])
def test_read_write_in_c_against_a_byte_model(ceph_cluster: Any, native: bool) -> None:
    """A random mix in batches of 32 the loop sees at once: READ/WRITE(10/16) that the native
    loop submits to librbd from C, and UNMAP, WRITE SAME, COMPARE AND WRITE and FUA writes that
    go through Python (librbd's cache on: a FUA write is a write and a flush). The disk must
    read back as a bytearray that applies every command in submission order. With the native
    loop, commands overlap where the loop orders them: a command overlapping one C has in flight
    runs after it (in Python, which waits for it, and so does what overlaps it then), and
    nothing overtakes a command Python runs, but what
    reaches Python after one (everything a fence sends there: after an UNMAP, the rest of the
    batch) runs as Python runs it, in no defined order (SAM-5: SIMPLE tasks), so nothing
    overlaps those. Without the native loop (stage 1 cannot call librbd) nothing runs in C, and
    nothing overlaps."""
    # librbd's cache on: FUA writes then need a flush, which Python does.
    dev = _open(ceph_cluster, f"n-{uuid.uuid4().hex[:8]}", extra=";create=1;rbd_cache=1")
    h = RingHarness(dev, workers=4, native=native)
    try:
        assert h.run(cdbs.test_unit_ready()).sense_codes == (0x06, 0x29, 0x00)
        assert (h.runner.native is not None) == native
        rng = random.Random(1517)
        model = bytearray(SIZE)
        blocks = SIZE // BS
        boundary = (4 << 20) // BS
        plain = python = overlaps = in_c = 0
        for _ in range(6):
            items: list[tuple[bytes, bytes, int]] = []
            expect: list[bytes | None] = []  # a READ's data, or None: GOOD and no data
            spans: list[tuple[int, int]] = []  # commands nothing may overlap (see above)
            seen: list[tuple[int, int]] = []
            to_python = False  # an UNMAP came: its fence sends the rest of the batch there
            while len(items) < 32:
                kind = rng.choices(["w", "r", "unmap", "ws", "caw", "fua"],
                                   [5, 5, 1, 1, 1, 1])[0]
                n = 1 if kind == "caw" else rng.choice([1, 8, 64, 256])
                lba = rng.choice([rng.randrange(blocks - n), boundary - n // 2,
                                  rng.randrange(64)])  # the low LBAs: overlaps
                if any(lba < e and s < lba + n for s, e in spans):
                    continue
                overlaps += any(lba < e and s < lba + n for s, e in seen)
                seen.append((lba, lba + n))
                if not native or to_python or kind not in ("w", "r"):
                    spans.append((lba, lba + n))
                else:
                    in_c += 1  # a plain READ/WRITE no fence sends to Python
                to_python = to_python or kind == "unmap"
                span = slice(lba * BS, (lba + n) * BS)
                if kind == "w":
                    data = rng.randbytes(n * BS)
                    model[span] = data
                    items.append((rng.choice([cdbs.write10, cdbs.write16])(lba, n), data, 0))
                    expect.append(None)
                    plain += 1
                elif kind == "r":
                    items.append((rng.choice([cdbs.read10, cdbs.read16])(lba, n), b"", n * BS))
                    expect.append(bytes(model[span]))
                    plain += 1
                elif kind == "unmap":
                    params = cdbs.unmap_parameters([(lba, n)])
                    model[span] = bytes(n * BS)
                    items.append((cdbs.unmap(len(params)), params, 0))
                    expect.append(None)
                    python += 1
                elif kind == "ws":
                    block = rng.randbytes(BS)
                    model[span] = block * n
                    items.append((cdbs.write_same16(lba, n), block, 0))
                    expect.append(None)
                    python += 1
                elif kind == "caw":
                    new = rng.randbytes(BS)
                    old = bytes(model[lba * BS:(lba + 1) * BS])
                    model[lba * BS:(lba + 1) * BS] = new
                    items.append((cdbs.compare_and_write(lba, 1), old + new, 0))
                    expect.append(None)
                    python += 1
                else:
                    data = rng.randbytes(n * BS)
                    model[span] = data
                    items.append((cdbs.write10(lba, n, fua=True), data, 0))
                    expect.append(None)
                    python += 1
            pending = h.submit_many(items)
            h.wait(pending, timeout=60)
            for p, want, item in zip(pending, expect, items, strict=True):
                assert p.status == 0, (item[0].hex(), p.sense)
                if want is not None:
                    assert p.data_in == want, item[0].hex()
        assert _read(h, 0, blocks) == bytes(model)
        executed = _executed(h)
        assert overlaps > (20 if native else -1), overlaps
        if native:
            # Every READ/WRITE no fence sent to Python, and the read-back's READs, but for
            # those that overlapped an earlier command of their batch: one still in flight in
            # C sends it to Python, which runs it after it.
            assert executed >= in_c - overlaps + blocks // 1024, (executed, in_c, overlaps)
        else:
            assert executed == 0
        c = h.runner.counters
        assert c.commands >= plain + python
    finally:
        h.close()
        dev.close()


def test_adjacent_commands_go_to_librbd_as_one_operation(ceph_cluster: Any) -> None:
    """Plain READs or WRITEs that come one after the other in the ring, each starting where the
    one before it ends (an initiator's request split at hw_max_sectors), are one librbd
    operation (the `merged` counter); each is still answered on its own and reads back as
    written, across an object boundary too; a READ of blocks WRITEs in flight are writing still
    goes to Python after them (ring order). A group librbd
    fails (every OSD stopped) answers every command of it NOT READY within one timeout."""
    timeout = 3
    dev = _open(ceph_cluster, f"g-{uuid.uuid4().hex[:8]}",
                extra=f";create=1;osd_op_timeout={timeout}")
    h = RingHarness(dev, workers=4, native=True)
    try:
        assert h.run(cdbs.test_unit_ready()).sense_codes == (0x06, 0x29, 0x00)
        assert h.runner.native is not None
        rng = random.Random(77)
        boundary = (4 << 20) // BS
        # Two groups of four (the second across the object boundary), one alone, then READs
        # of the first group's blocks, which must see the WRITEs before them.
        starts = [100, 108, 116, 124, boundary - 16, boundary - 8, boundary, boundary + 8, 4000]
        data = {lba: rng.randbytes(8 * BS) for lba in starts}
        items = [(cdbs.write10(lba, 8), data[lba], 0) for lba in starts]
        items += [(cdbs.read10(lba, 8), b"", 8 * BS) for lba in starts[:4]]
        before = h.runner.refresh_counters().merged
        pending = h.submit_many(items)
        h.wait(pending, timeout=60)
        assert all(p.status == 0 for p in pending), [p.sense for p in pending]
        assert [p.data_in for p in pending[len(starts):]] == [data[lba] for lba in starts[:4]]
        # The READs overlapped WRITEs in flight: Python's, after them (ring order).
        assert h.runner.refresh_counters().merged - before == 3 + 3
        pending = h.submit_many([(cdbs.read16(lba, 8), b"", 8 * BS) for lba in starts])
        h.wait(pending, timeout=60)
        assert [p.data_in for p in pending] == [data[lba] for lba in starts]
        assert h.runner.refresh_counters().merged - before == 6 + 6
        osds = [p for name, p in ceph_cluster.procs.items() if name.startswith("osd.")]
        with _stopped(osds):
            pending = h.submit_many([(cdbs.write10(200 + 8 * k, 8), bytes(8 * BS), 0)
                                     for k in range(3)])
            h.wait(pending, timeout=8 * timeout)
        assert h.runner.refresh_counters().merged - before == 12 + 2
        for p in pending:
            assert p.status == 2 and (p.sense[2] & 0xF, p.sense[12], p.sense[13]) == \
                (0x02, 0x04, 0x01), p
    finally:
        h.close()
        dev.close()


def _wait_dequeued(h: RingHarness, timeout: float = 10.0) -> None:
    """Until the native loop has taken every entry the kernel published (bounded)."""
    assert wait_until(lambda: not h.runner.ring.has_new(), timeout, 0.001), \
        "the native loop did not dequeue"


def test_stop_with_librbd_operations_in_flight(ceph_cluster: Any) -> None:
    """The runner stops while the native loop has librbd writes in flight: every command is
    completed exactly once (the harness checks the ring is idle) and GOOD, and a new device
    on the image reads what they wrote."""
    image = f"s-{uuid.uuid4().hex[:8]}"
    dev = _open(ceph_cluster, image, extra=";create=1")
    h = _harness(dev)
    rng = random.Random(7)
    datas = [rng.randbytes(128 * BS) for _ in range(8)]  # what the fake ring's data area holds
    try:
        pending = h.submit_many([(cdbs.write16(i * 128, 128), d, 0)
                                 for i, d in enumerate(datas)])
        _wait_dequeued(h)
        in_flight = sum(not p.done for p in pending)
    finally:
        h.close()
        dev.close()
    assert all(p.done and p.status == 0 for p in pending), [p.sense for p in pending]
    assert in_flight, "every write had completed before the stop: nothing was tested"
    dev = _open(ceph_cluster, image)
    h = _harness(dev)
    try:
        assert _read(h, 0, 8 * 128) == b"".join(datas)
        assert _executed(h) >= 1
    finally:
        h.close()
        dev.close()


def test_stop_while_the_cluster_does_not_answer(ceph_cluster: Any) -> None:
    """Every OSD stopped with reads in flight from C: stopping the runner waits for them no
    longer than ``osd_op_timeout`` (librbd fails them: Python runs them again and answers NOT
    READY), and no command is lost or completed twice. (The runner's `run()` returns before
    Python's asynchronous commands finish: the test waits for them before the harness checks
    the ring.)"""
    timeout = 2
    dev = _open(ceph_cluster, f"q-{uuid.uuid4().hex[:8]}",
                extra=f";create=1;osd_op_timeout={timeout}", write_cache=False)
    h = _harness(dev)
    osds = [p for name, p in ceph_cluster.procs.items() if name.startswith("osd.")]
    closed = False
    try:
        assert h.run(cdbs.write10(0, 8), b"\x11" * (8 * BS)).good
        with _stopped(osds):
            t0 = time.monotonic()
            pending = h.submit_many([(cdbs.read10(i * 8, 8), b"", 8 * BS) for i in range(8)])
            _wait_dequeued(h)
            h._serving[1]()  # stop the runner: the loop waits for librbd's failures
            took = time.monotonic() - t0
            h.wait(pending, timeout=15)  # Python's second try (async) answers NOT READY
            h.close()
            closed = True
        # It waited for librbd to fail what C had in flight: no sooner than osd_op_timeout
        # after the submission (librbd's timer; 0.9: its clock may be a coarse one), however
        # late the stop came; and not much longer.
        assert timeout * 0.9 <= took < 15, took
        assert all(p.done for p in pending)
        codes = [Result(p.status, p.sense, p.data_in).sense_codes for p in pending]
        assert set(codes) <= {(0x02, 0x04, 0x01), (0, 0, 0)}, codes
        assert (0x02, 0x04, 0x01) in codes
    finally:
        if not closed:
            h.close()
        dev.close()


def _object_acting(cluster: Any, image: str, objno: int) -> list[int]:
    """The OSDs holding RADOS object `objno` of `image` (pool ``rbd``): ``rbd info`` gives the
    data objects' prefix, ``osd map`` the acting set."""
    info = json.loads(subprocess.run(
        ["rbd", "-c", str(cluster.conf), "info", f"rbd/{image}", "--format", "json"],
        check=True, capture_output=True, timeout=60).stdout)
    admin = cluster.admin()
    try:
        out, _ = admin.mon_command({"prefix": "osd map", "pool": "rbd", "format": "json",
                                    "object": f"{info['block_name_prefix']}.{objno:016x}"})
    finally:
        admin.shutdown()
    return [int(o) for o in out["acting"]]


def test_an_overlap_waits_for_the_overlapped_operation_only(ceph_cluster: Any) -> None:
    """librbd operations in flight are not drained for one overlap: with osd.0 stopped, a
    write to an object osd.0 holds stays in flight; a later write to an object it does not
    hold, and a write overlapping that one, both complete meanwhile (the second waits for the
    first only, in ring order). Before, the overlap waited for every operation, the stuck one
    too. With osd.0 back, everything completes and reads back in ring order."""
    image = f"o-{uuid.uuid4().hex[:8]}"
    size = 128 << 20  # 32 objects: some on the two OSDs that are not osd.0
    dev = _open(ceph_cluster, image, extra=";create=1", size=size)
    h = RingHarness(dev, workers=4, native=True)
    osd0 = ceph_cluster.procs["osd.0"]
    try:
        assert h.run(cdbs.test_unit_ready()).sense_codes == (0x06, 0x29, 0x00)
        acting = {n: _object_acting(ceph_cluster, image, n) for n in range(size >> 22)}
        stuck = next(n for n, a in acting.items() if 0 in a)
        free = next(n for n, a in acting.items() if 0 not in a)
        per_object = (4 << 20) // BS
        x, y = stuck * per_object, free * per_object
        sx, a, b = b"\x01" * (8 * BS), b"\x02" * (8 * BS), b"\x03" * (4 * BS)
        # Both objects written once first: a write to an object the object map does not yet
        # list updates the map first, and the map's own object may be on osd.0.
        for lba in (x, y):
            assert h.run(cdbs.write10(lba, 8), bytes(8 * BS)).good
        os.kill(osd0.pid, signal.SIGSTOP)
        try:
            _wait_stopped([osd0.pid])
            pending = h.submit_many([(cdbs.write10(x, 8), sx, 0),
                                     (cdbs.write10(y, 8), a, 0),
                                     (cdbs.write10(y + 4, 4), b, 0)])
            h.wait(pending[1:], timeout=20)
            assert not pending[0].done
            assert [p.status for p in pending[1:]] == [0, 0]
        finally:
            os.kill(osd0.pid, signal.SIGCONT)
        h.wait(pending[:1], timeout=60)
        assert pending[0].status == 0, pending[0].sense
        assert _executed(h) >= 3
        assert h.run(cdbs.read10(y, 8), data_in_len=8 * BS).data == a[:4 * BS] + b
        assert h.run(cdbs.read10(x, 8), data_in_len=8 * BS).data == sx
    finally:
        h.close()
        dev.close()


def test_an_image_without_the_exclusive_lock_feature_is_refused_unless_shared(
        ceph_cluster: Any) -> None:
    """Before: lock=exclusive (the default) on an image made without the exclusive-lock feature
    took no lock and said nothing; two gateways then wrote alongside. Now the open names the
    key and the remedy; lock=shared opens it."""
    from tcmu_py.handlers.ceph.librbd import FEATURE_LAYERING

    image = f"f-{uuid.uuid4().hex[:8]}"
    admin = ceph_cluster.admin()
    try:
        ioctx = admin.ioctx("rbd")
        try:
            ioctx.create_image(image, SIZE, FEATURE_LAYERING)
        finally:
            ioctx.close()
    finally:
        admin.shutdown()
    with pytest.raises(ConfigError, match=f"key 'lock': rbd/{image}: the image has no "
                       f"exclusive-lock feature.*rbd feature enable rbd/{image} exclusive-lock"):
        _open(ceph_cluster, image)
    dev = _open(ceph_cluster, image, extra=";lock=shared")
    dev.close()


def test_create_without_a_size_is_refused(ceph_cluster: Any) -> None:
    """Before: a device of size 0 (the image's size) with create=1 made a 0-byte image, whose
    READ CAPACITY said one block that no READ could reach."""
    image = f"z-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigError, match="key 'create'.*no size to make it with"):
        _open(ceph_cluster, image, extra=";create=1", size=0)


@pytest.mark.parametrize("size", [1 << 62, (1 << 64) - (1 << 22) + 512])
def test_create_with_a_size_librbd_cannot_serve_names_the_size(ceph_cluster: Any,
                                                               size: int) -> None:
    """Before: a size above the object map's limit (2**62 bytes) failed the open with librbd's
    bare "Invalid argument", naming neither the key nor the size; one within 4 MiB of 2**64
    (the object count overflows) made an image whose first WRITE aborted the daemon in librbd
    (ObjectMap.cc, ceph_assert), with every other device it served. Refused before librbd is
    asked; nothing is created."""
    image = f"z-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigError, match=f"key 'create'.*{size} bytes is above"):
        _open(ceph_cluster, image, extra=";create=1", size=size)
    ioctx = ceph_cluster.admin().ioctx("rbd")
    try:
        with pytest.raises(OSError):
            ioctx.open_image(image).close()
    finally:
        ioctx.close()


def test_create_makes_4_mib_objects_whatever_the_conf_says(ceph_cluster: Any,
                                                          tmp_path: Path) -> None:
    """Before: `create` left the object size to the conf's ``rbd default order`` (1 MiB objects
    with order 20), so the documented 4 MiB objects and 0.95 PiB limit did not hold: a size
    within the limit failed with librbd's EINVAL, reported as a pool that cannot hold images.
    Now 4 MiB objects always. And a kernel resize of an image of 1 MiB objects is held to its
    own object map limit (256,000,000 of its objects), not to that of 4 MiB ones."""
    conf = tmp_path / "ceph.conf"
    conf.write_text(Path(ceph_cluster.conf).read_text() + "\n[client]\nrbd default order = 20\n")
    image = f"o-{uuid.uuid4().hex[:8]}"
    cfg = DeviceConfig("ceph0", "ceph", f"image=rbd/{image};conf={conf};id=admin;create=1",
                       SIZE, BS)
    CephHandler.open(cfg).close()
    info = json.loads(subprocess.run(["rbd", "-c", str(ceph_cluster.conf), "info", "--format",
                                      "json", f"rbd/{image}"], check=True, timeout=60,
                                     capture_output=True).stdout)
    assert info["object_size"] == 4 << 20, info
    small = f"o-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rbd", "-c", str(ceph_cluster.conf), "create", "--size", "16M",
                    "--object-size", "1M", f"rbd/{small}"], check=True, timeout=60,
                   capture_output=True)
    dev = _open(ceph_cluster, small)
    try:
        with pytest.raises(ConfigError, match="dev_size .* is above 268435456000000 bytes"):
            dev.resize(300 << 40)  # below 256,000,000 objects of 4 MiB, above 1 MiB ones
        assert dev.image.size() == 16 << 20
    finally:
        dev.close()


def test_create_in_an_erasure_coded_pool_names_the_pool(ceph_cluster: Any) -> None:
    """Before: librbd's EINVAL for a pool that cannot hold an image's metadata was reported as
    the device's size being wrong, whatever the size."""
    admin = ceph_cluster.admin()
    pool = f"ec-{uuid.uuid4().hex[:6]}"
    admin.mon_command({"prefix": "osd erasure-code-profile set", "name": pool,
                       "profile": ["k=2", "m=1", "crush-failure-domain=osd"]})
    admin.mon_command({"prefix": "osd pool create", "pool": pool, "pg_num": 8,
                       "pool_type": "erasure", "erasure_code_profile": pool})
    try:
        admin.mon_command({"prefix": "osd pool application enable", "pool": pool,
                           "app": "rbd"})
        cfg = DeviceConfig("ceph0", "ceph", f"image={pool}/vol;conf={ceph_cluster.conf};"
                           "id=admin;create=1", SIZE, BS)
        with pytest.raises(ConfigError, match=f"key 'image'.*pool {pool!r}.*erasure-coded"):
            CephHandler.open(cfg)
    finally:
        _delete_pool(admin, pool)


def _blocklist_lock_holders(admin: Any, image: str, blocked: list[str]) -> list[str]:
    """Blocklist every client holding the exclusive lock of ``rbd/<image>`` (there must be
    one), adding their addresses to `blocked` (for the test to remove); returns them."""
    ioctx = admin.ioctx("rbd")
    other = ioctx.open_image(image)
    try:
        owners: list[str] = other.lock_owners()
    finally:
        other.close()
        ioctx.close()
    assert owners, "the device holds no lock"
    for addr in owners:
        admin.mon_command({"prefix": "osd blocklist", "blocklistop": "add", "addr": addr})
        blocked.append(addr)
    return owners


def test_a_blocklisted_client_reconnects_and_serves_again(
        ceph_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: once the cluster blocklisted the device's client (another gateway broke its
    lock, or an operator), every READ/WRITE answered NOT READY for good while TEST UNIT READY
    said GOOD: the image had no gateway until the daemon restarted. Now the first failure
    connects a new client (NOT READY 02h/04h/01h meanwhile), which takes the lock again and
    serves; the data is intact."""
    from tcmu_py.handlers.ceph import device as ceph_device

    monkeypatch.setattr(ceph_device, "RECONNECT_INTERVAL", 0.5)
    image = f"k-{uuid.uuid4().hex[:8]}"
    dev = _open(ceph_cluster, image, extra=";create=1", write_cache=False)
    h = _harness(dev)
    admin = ceph_cluster.admin()
    blocked: list[str] = []
    try:
        data = b"\x3c" * (8 * BS)
        assert h.run(cdbs.write10(0, 8), data).good
        owners = _blocklist_lock_holders(admin, image, blocked)
        deadline = time.monotonic() + 30
        while True:  # until the OSDs have the map with the blocklist, bounded
            first = h.run(cdbs.write10(16, 8), data)
            if not first.good or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert first.sense_codes == (0x02, 0x04, 0x01), (first, owners)
        deadline = time.monotonic() + 60
        while True:  # an initiator's retries, bounded
            r = h.run(cdbs.read10(0, 8), data_in_len=8 * BS)
            if r.good or time.monotonic() > deadline:
                break
            assert r.sense_codes == (0x02, 0x04, 0x01), r
            time.sleep(0.2)
        assert r.good and r.data == data, r
        assert h.run(cdbs.write10(8, 8), data).good
        assert h.run(cdbs.read10(8, 8), data_in_len=8 * BS).data == data
        assert dev.backend.not_ready is None
    finally:
        h.close()
        dev.close()
        for addr in blocked:
            admin.mon_command({"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr})
        admin.shutdown()


@contextlib.contextmanager
def _scratch_pool(cluster: Any) -> Iterator[tuple[Any, str]]:
    """A pool of its own for the test (8 PGs, size 2, rbd initialised), deleted afterwards;
    yields (an admin connection, its name)."""
    pool = f"t{uuid.uuid4().hex[:8]}"
    admin = cluster.admin()
    try:
        admin.mon_command({"prefix": "osd pool create", "pool": pool, "pg_num": 8})
        admin.mon_command({"prefix": "osd pool set", "pool": pool, "var": "size", "val": "2"})
        admin.mon_command({"prefix": "osd pool application enable", "pool": pool,
                           "app": "rbd"})
        ioctx = admin.ioctx(pool)
        try:
            ioctx.pool_init()
        finally:
            ioctx.close()
        yield admin, pool
    finally:
        with contextlib.suppress(OSError):
            _delete_pool(admin, pool)
        admin.shutdown()


def _delete_pool(admin: Any, pool: str) -> None:
    admin.mon_command({"prefix": "config set", "who": "mon", "name": "mon_allow_pool_delete",
                       "value": "true"})
    admin.mon_command({"prefix": "osd pool rm", "pool": pool, "pool2": pool,
                       "yes_i_really_really_mean_it": True})


def _pool_flags(admin: Any, pool: str) -> str:
    out, _ = admin.mon_command({"prefix": "osd pool ls", "detail": "detail", "format": "json"})
    return next(str(p.get("flags_names", "")) for p in out if p["pool_name"] == pool)


def test_a_pool_at_its_quota_refuses_new_data_with_data_protect(ceph_cluster: Any) -> None:
    """SBC-4 4.7.3.6, as a thin pool: a write that would store more answers DATA PROTECT
    07h/27h/07h at once, which initiators do not retry; overwrites, reads, UNMAP and
    SYNCHRONIZE CACHE go on; with the quota lifted new writes succeed. Before, every write,
    UNMAP and flush waited ``osd_op_timeout`` and answered NOT READY, retried for ever."""
    with _scratch_pool(ceph_cluster) as (admin, pool):
        timeout = 10
        cfg = (f"image={pool}/q;conf={ceph_cluster.conf};id=admin;create=1;"
               f"osd_op_timeout={timeout}")
        dev = CephHandler.open(DeviceConfig("ceph0", "ceph", cfg, SIZE, BS, write_cache=False))
        h = _harness(dev)
        try:
            old = random.Random(1).randbytes(1 << 20)
            assert h.run(cdbs.write10(0, 2048), old).good  # 1 MiB stored
            admin.mon_command({"prefix": "osd pool set-quota", "pool": pool,
                               "field": "max_bytes", "val": str(1 << 20)})
            assert wait_until(lambda: "full_quota" in _pool_flags(admin, pool), 60, 0.5), \
                "the pool not flagged full at its quota"
            new = random.Random(2).randbytes(1 << 20)
            # New data in the second 4 MiB object, 64 KiB at a time in fresh ranges, until
            # refused: the OSDs take the flag with the next map, a moment after the monitor
            # shows it (a write before that is stored, as under any quota of Ceph's).
            took, r = 0.0, None
            for lba in range(8192, 16384, 128):
                t0 = time.monotonic()
                r = h.run(cdbs.write10(lba, 128), new[: 128 * BS])
                took = time.monotonic() - t0
                if not r.good:
                    break
                time.sleep(0.2)
            assert r is not None and r.sense_codes == (0x07, 0x27, 0x07), r
            # At once: a write that waited for the cluster's answer took osd_op_timeout.
            assert took < timeout, took
            assert h.run(cdbs.write10(0, 8), new[: 8 * BS]).good  # an overwrite in place
            assert _read(h, 0, 8) == new[: 8 * BS]
            assert h.run(cdbs.synchronize_cache10(0, 0)).good
            params = cdbs.unmap_parameters([(1024, 1024)])
            assert h.run(cdbs.unmap(len(params)), params).good
            assert _read(h, 1024, 1024) == bytes(1024 * BS)
            admin.mon_command({"prefix": "osd pool set-quota", "pool": pool,
                               "field": "max_bytes", "val": "0"})
            assert wait_until(lambda: "full" not in _pool_flags(admin, pool), 60, 0.5), \
                "the pool's full flag not cleared"
            assert wait_until(lambda: h.run(cdbs.write10(4096 * 3, 2048), new).good, 30, 0.2), \
                "new data still refused with the quota lifted"
            assert _read(h, 4096 * 3, 2048) == new
        finally:
            h.close()
            dev.close()


def test_a_pool_deleted_under_the_device_is_not_ready_for_good(ceph_cluster: Any) -> None:
    """The first operation that fails once the image's pool is gone makes the device NOT
    READY 02h/04h/03h (manual intervention), TEST UNIT READY included, with the reason in its
    status; before, each WRITE answered WRITE ERROR or WRITE PROTECTED, each READ MEDIUM ERROR
    (librbd says EPERM, ENOENT or EROFS), and TEST UNIT READY GOOD."""
    with _scratch_pool(ceph_cluster) as (admin, pool):
        cfg = f"image={pool}/g;conf={ceph_cluster.conf};id=admin;create=1;osd_op_timeout=10"
        dev = CephHandler.open(DeviceConfig("ceph0", "ceph", cfg, SIZE, BS, write_cache=False))
        h = _harness(dev)
        try:
            assert h.run(cdbs.write10(0, 8), b"\x11" * (8 * BS)).good
            _delete_pool(admin, pool)

            def refused() -> bool:  # GOOD until this client's map has the pool gone; the
                # failures before the device has looked the pool up answer librbd's errno
                r = h.run(cdbs.write10(4096, 8), b"\x22" * (8 * BS))
                assert r.good or r.sense_codes in ((0x02, 0x04, 0x03), (0x03, 0x0C, 0x00),
                                                   (0x07, 0x27, 0x00)), r
                return r.sense_codes == (0x02, 0x04, 0x03)

            assert wait_until(refused, 60, 0.5), "no NOT READY once the pool was deleted"
            assert h.run(cdbs.test_unit_ready()).sense_codes == (0x02, 0x04, 0x03)
            assert h.run(cdbs.read10(0, 8), data_in_len=8 * BS).sense_codes == \
                (0x02, 0x04, 0x03)
            reason = dev.not_ready_reason
            assert reason is not None and "no longer exists" in reason, reason
        finally:
            h.close()
            dev.close()


def test_a_renamed_pool_is_not_a_deleted_one(ceph_cluster: Any) -> None:
    """The pool is looked up by id after an error: renamed (``ceph osd pool rename``: the
    image works on), a `lock=shared` device's refused writes (another client holds the lock:
    EROFS, WRITE PROTECTED) do not make it NOT READY for good."""
    with _scratch_pool(ceph_cluster) as (admin, pool):
        base = f"conf={ceph_cluster.conf};id=admin;osd_op_timeout=10"
        holder = CephHandler.open(DeviceConfig("ceph0", "ceph", f"image={pool}/r;{base};"
                                               "create=1", SIZE, BS, write_cache=False))
        hh = _harness(holder)
        shared = CephHandler.open(DeviceConfig("ceph1", "ceph", f"image={pool}/r;{base};"
                                               "lock=shared", SIZE, BS, write_cache=False))
        hs = _harness(shared)
        try:
            assert hh.run(cdbs.write10(0, 8), b"\x44" * (8 * BS)).good
            admin.mon_command({"prefix": "osd pool rename", "srcpool": pool,
                               "destpool": f"{pool}-new"})
            assert hs.run(cdbs.write10(0, 8), b"\x45" * (8 * BS)).sense_codes == \
                (0x07, 0x27, 0x00)
            backend: Any = shared.backend
            assert wait_until(lambda: backend._pool_check is None, 30, 0.1)
            assert hs.run(cdbs.test_unit_ready()).good and shared.not_ready_reason is None
            assert _read(hs, 0, 8) == b"\x44" * (8 * BS)
            assert hh.run(cdbs.write10(8, 8), b"\x46" * (8 * BS)).good
        finally:
            for h, d in ((hs, shared), (hh, holder)):
                h.close()
                d.close()
            admin.mon_command({"prefix": "osd pool rename", "srcpool": f"{pool}-new",
                               "destpool": pool})


def test_a_non_primary_mirror_image_says_so_and_serves_once_promoted(ceph_cluster: Any
                                                                     ) -> None:
    """A non-primary rbd-mirror image (read-only in this cluster) opened with the exclusive
    lock: NOT READY 02h/04h/03h with a reason that says so and what to do (it said "the
    exclusive lock is held by another client" when no client held it); promoted, the device
    takes the lock by itself and serves."""
    with _scratch_pool(ceph_cluster) as (_admin, pool):
        rbd = ["rbd", "-c", str(ceph_cluster.conf), "--id", "admin"]
        for argv in (["create", "--size", "8M", f"{pool}/m"],
                     ["mirror", "pool", "enable", pool, "image"],
                     ["mirror", "image", "enable", f"{pool}/m", "snapshot"],
                     ["mirror", "image", "demote", f"{pool}/m"]):
            subprocess.run([*rbd, *argv], check=True, capture_output=True, timeout=120)
        cfg = f"image={pool}/m;conf={ceph_cluster.conf};id=admin;osd_op_timeout=10"
        dev = CephHandler.open(DeviceConfig("ceph0", "ceph", cfg, SIZE, BS, write_cache=False))
        h = RingHarness(dev, workers=4)
        try:
            h.run(cdbs.test_unit_ready())  # the power-on unit attention
            assert h.run(cdbs.test_unit_ready()).sense_codes == (0x02, 0x04, 0x03)
            reason = dev.not_ready_reason
            assert reason is not None and "non-primary rbd-mirror image" in reason, reason
            assert "held by" not in reason
            subprocess.run([*rbd, "mirror", "image", "promote", f"{pool}/m"], check=True,
                           capture_output=True, timeout=120)
            assert wait_until(lambda: h.run(cdbs.test_unit_ready()).good, 60, 0.5), \
                dev.not_ready_reason
            assert h.run(cdbs.write10(0, 8), b"\x33" * (8 * BS)).good
            assert _read(h, 0, 8) == b"\x33" * (8 * BS)
        finally:
            h.close()
            dev.close()


def test_a_reconnect_finds_an_image_renamed_while_open(ceph_cluster: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``rbd rename`` of the open image, then the client blocklisted: the new client opens
    the image by its id and serves (it opened by name, found no such image, and stayed NOT
    READY until the daemon restarted)."""
    from tcmu_py.handlers.ceph import device as ceph_device

    monkeypatch.setattr(ceph_device, "RECONNECT_INTERVAL", 0.5)
    image = f"n-{uuid.uuid4().hex[:8]}"
    dev = _open(ceph_cluster, image, extra=";create=1", write_cache=False)
    h = _harness(dev)
    admin = ceph_cluster.admin()
    blocked: list[str] = []
    try:
        data = b"\x4d" * (8 * BS)
        assert h.run(cdbs.write10(0, 8), data).good
        subprocess.run(["rbd", "-c", str(ceph_cluster.conf), "--id", "admin", "rename",
                        f"rbd/{image}", f"rbd/{image}-renamed"], check=True,
                       capture_output=True, timeout=60)
        _blocklist_lock_holders(admin, f"{image}-renamed", blocked)

        def serving() -> bool:  # an initiator's retries, bounded
            r = h.run(cdbs.read10(0, 8), data_in_len=8 * BS)
            assert r.good or r.sense_codes == (0x02, 0x04, 0x01), r
            return r.good and bool(dev.backend._retired)  # served by a new client

        assert wait_until(serving, 60, 0.2), dev.not_ready_reason
        assert _read(h, 0, 8) == data
        assert h.run(cdbs.write10(8, 8), data).good
        assert dev.backend.not_ready is None
    finally:
        h.close()
        dev.close()
        for addr in blocked:
            admin.mon_command({"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr})
        admin.shutdown()
