"""YAML configuration: every problem reported at once, with file, key path, value, expectation."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_py.daemon.config import (
    Chap,
    Config,
    Device,
    LunMap,
    Portal,
    dev_config_string,
    load_config,
    load_config_text,
    load_default_config,
    parse_size,
)
from tcmu_py.errors import ConfigError
from tcmu_py.handler import load_handlers
from tcmu_py.handlers.vtl.config import expand_barcodes

GOOD = """
state_dir: /srv/tcmu
defaults:
  hw_max_sectors: 2048
  cmd_time_out: 60
pools:
  - name: main
    path: /srv/tcmu/pools/main
    capacity: 10G
    soft_threshold: 75
    hard_limit: 95%
devices:
  - name: disk0
    handler: raw
    size: 1G
  - name: thin0
    handler: thin
    size: 100G
    block_size: 4096
    pool: main
    options: {unit: 64K, zero: true}
    serial: TCMU0001
    wwn: naa.5001405abcdef012
libraries:
  - name: lib0
    changer: changer0
    drives: [{name: tape0, model: ULT3580-TD8}]
    slots: 24
    import_export: 2
    cartridges: ["ABC000L8..ABC019L8", "CLN001L1"]
    media_dir: /srv/tcmu/media
exports:
  loopback:
    - {device: disk0}
    - {device: thin0, lun: 5}
  iscsi:
    - iqn: iqn.2003-01.org.linux-iscsi.host:sn.1234
      portals: ["127.0.0.1:3260", "[::1]:3261"]
      chap: {userid: tgt, password: secretsecret}
      attributes: {default_cmdsn_depth: 128}
      luns:
        - {device: disk0, lun: 0}
        - {device: thin0, lun: 1}
      acls:
        - initiator: iqn.1994-05.com.redhat:client1
          chap: {userid: u1, password: p1p1p1p1p1p1, mutual_userid: t1, mutual_password: m1m1m1}
          luns: [thin0]
        - initiator: iqn.1994-05.com.redhat:client2
          chap: {userid: u2, password: p2p2p2p2p2p2}
"""


def load(text: str, **kw: object) -> Config:
    return load_config_text(textwrap.dedent(text), "cfg.yaml", **kw)  # type: ignore[arg-type]


def problems(text: str, **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load(text, **kw)
    lines = str(ei.value).splitlines()
    assert lines[0].endswith("problem(s) in cfg.yaml:") or len(lines) == 1
    return lines[1:] if len(lines) > 1 else lines


def test_good_config_values() -> None:
    cfg = load(GOOD)
    assert cfg.state_dir == "/srv/tcmu"
    disk = cfg.device("disk0")
    assert disk.size == 1 << 30 and disk.block_size == 512
    assert disk.hw_max_sectors == 2048 and disk.cmd_time_out == 60
    assert disk.options == (("path", "/srv/tcmu/disk0.img"),)  # default under state_dir
    thin = cfg.device("thin0")
    assert thin.options == (("unit", "64K"), ("zero", "1"))
    assert thin.pool == "main" and thin.serial == "TCMU0001"
    (pool,) = cfg.section("pools")  # thin's section (handlers/thin/config.py)
    assert pool.name == "main" and pool.path == "/srv/tcmu/pools/main"
    assert pool.capacity == 10 << 30 and pool.soft_threshold == 75
    assert pool.hard_limit == (10 << 30) * 95 // 100
    assert cfg.exports.loopback == (LunMap("disk0", 0), LunMap("thin0", 5))
    tgt = cfg.exports.iscsi[0]
    assert tgt.portals == (Portal("127.0.0.1", 3260), Portal("::1", 3261))
    assert str(tgt.portals[1]) == "[::1]:3261"
    assert tgt.chap == Chap("tgt", "secretsecret")
    assert tgt.acls[0].luns == ("thin0",) and tgt.acls[1].luns is None
    assert tgt.acls[0].chap == Chap("u1", "p1p1p1p1p1p1", "t1", "m1m1m1")
    assert tgt.attributes == (("default_cmdsn_depth", 128),)
    (lib,) = cfg.section("libraries")  # the vtl's section (handlers/vtl/config.py)
    assert len(lib.barcodes()) == 21 and lib.barcodes()[0] == "ABC000L8"
    # The library's units are devices of their own, after the declared ones.
    assert [d.name for d in cfg.devices] == ["disk0", "thin0", "changer0", "tape0"]


def test_dev_config_strings() -> None:
    cfg = load(GOOD)
    assert dev_config_string(cfg.device("disk0")) == "raw//srv/tcmu/disk0.img"
    # The pool by directory: the dev_config must describe the device without this YAML file.
    # ...and so does its wwn, last (the daemon strips it before the handler sees the options).
    thin = dev_config_string(cfg.device("thin0"))
    assert thin == "thin/unit=64K;zero=1;pool=/srv/tcmu/pools/main;wwn=naa.5001405abcdef012"
    assert dev_config_string(cfg.device("changer0")) == "vtl/library=/srv/tcmu/media;unit=changer"
    assert dev_config_string(cfg.device("tape0")) == "vtl/library=/srv/tcmu/media;unit=drive0"


@pytest.mark.parametrize("bad", ["a:b", "a,b", "a\nb"])
def test_dev_config_string_rejects_what_kernel_or_rtslib_mangle(bad: str) -> None:
    dev = Device("d", "x", 512, 512, 8, 1, 30, False, (("k", bad),))
    with pytest.raises(ConfigError, match="expected no"):
        dev_config_string(dev)


def test_dev_config_string_length_limit() -> None:
    ok = Device("d", "x", 512, 512, 8, 1, 30, False, (("k", "v" * 251),))  # x/k= + 251 = 255
    assert len(dev_config_string(ok)) == 255
    long = Device("d", "x", 512, 512, 8, 1, 30, False, (("k", "v" * 252),))
    with pytest.raises(ConfigError, match="at most 255"):
        dev_config_string(long)


def test_default_config() -> None:
    cfg = load_default_config()
    (dev,) = cfg.devices
    assert dev.handler == "raw" and dev.size == 256 << 20
    assert dev_config_string(dev).startswith("raw//var/lib/tcmu-py/")
    assert cfg.exports.loopback == (LunMap(dev.name, 0),)
    (tgt,) = cfg.exports.iscsi
    assert tgt.generate_node_acls and tgt.portals == (Portal("127.0.0.1", 3260),)
    assert tgt.luns == (LunMap(dev.name, 0),)


def test_every_problem_reported_at_once() -> None:
    found = problems("""
        state_dir: relative/dir
        defaults: {block_size: 500, colour: blue}
        devices:
          - name: disk0
            handler: raw
            size: 10Q
            hw_max_sectors: 0
          - name: bad/name
            handler: raw
            size: 1G
          - name: disk0
            handler: raw
            size: 1G
          - name: d3
            handler: thin
            size: 1000
            pool: nopool
          - {name: d4, handler: raw}
        exports:
          loopback:
            - {device: ghost}
            - {device: disk0, lun: 300}
          iscsi:
            - iqn: iqn.bogus
              portals: ["127.0.0.1:99999"]
              generate_node_acls: true
    """)
    expected = [
        "cfg.yaml: state_dir: got 'relative/dir', expected an absolute path",
        "cfg.yaml: defaults.colour: got 'blue', expected one of the keys",
        "cfg.yaml: defaults.block_size: got 500, expected a power of two from 512 to 65536",
        "cfg.yaml: devices[0].size: got '10Q', expected a size",
        "cfg.yaml: devices[0].hw_max_sectors: got 0, expected an integer 1..65535",
        "cfg.yaml: devices[1].name: got 'bad/name', expected a name",
        "cfg.yaml: devices[2].name: got 'disk0', expected a device name not used before",
        "cfg.yaml: devices[3].size: got 1000, expected a multiple of the block size 512",
        "cfg.yaml: devices[3].pool: got 'nopool', expected the name of a pool in pools",
        "cfg.yaml: devices[4].size: got nothing, expected this required key",
        "cfg.yaml: exports.loopback[0].device: got 'ghost', expected the name of a device",
        "cfg.yaml: exports.loopback[1].lun: got 300, expected an integer 0..255",
        "cfg.yaml: exports.iscsi[0].iqn: got 'iqn.bogus', expected an iSCSI name",
        "cfg.yaml: exports.iscsi[0].portals[0]: got '127.0.0.1:99999', expected a portal",
    ]
    for want in expected:
        assert any(line.startswith(want) for line in found), (want, found)
    assert len(found) == len(expected), found


def test_unknown_keys_everywhere_are_errors() -> None:
    found = problems("""
        devics: []
        devices:
          - {name: d, handler: raw, size: 1M, blocksize: 4096}
        exports:
          iscsi:
            - iqn: iqn.2003-01.org.x:t
              generate_node_acls: true
              attributes: {authentification: 1}
              acls: [{initiator: iqn.2003-01.org.x:i, lun: [d]}]
    """)
    assert any(p.startswith("cfg.yaml: devics: got []") for p in found)
    assert any(p.startswith("cfg.yaml: devices[0].blocksize: got 4096") for p in found)
    assert any("exports.iscsi[0].attributes.authentification: got 1" in p for p in found)
    assert any("exports.iscsi[0].acls[0].lun: got ['d']" in p for p in found)
    assert len(found) == 4


def test_duplicate_yaml_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"cfg.yaml: line 3 column 1: got duplicate key"):
        load("state_dir: /a\ndevices: []\nstate_dir: /b\n")


def test_lun_and_acl_cross_references() -> None:
    found = problems("""
        devices:
          - {name: a, handler: raw, size: 1M}
          - {name: b, handler: raw, size: 1M}
        exports:
          loopback:
            - {device: a, lun: 1}
            - {device: b, lun: 1}
          iscsi:
            - iqn: iqn.2003-01.org.x:t
              luns: [{device: a}, {device: a, lun: 4}]
              acls:
                - {initiator: iqn.2003-01.org.x:i, luns: [b]}
                - {initiator: IQN.2003-01.org.x:I}
            - iqn: iqn.2003-01.org.x:t
              generate_node_acls: true
            - iqn: iqn.2003-01.org.x:u
    """)
    assert any("exports.loopback[1].lun: got 1, expected a LUN number not used before" in p
               for p in found)
    assert any("exports.iscsi[0].luns[1].device: got 'a', expected a device exported once" in p
               for p in found)
    assert any("exports.iscsi[0].acls[0].luns[0]: got 'b', expected a device exported in this"
               in p for p in found)
    assert any("exports.iscsi[0].acls[1].initiator: got 'IQN.2003-01.org.x:I', expected an"
               " initiator listed once" in p for p in found)
    assert any("exports.iscsi[1].iqn: got 'iqn.2003-01.org.x:t', expected a target name not used"
               in p for p in found)
    assert any("exports.iscsi[2].acls: got nothing, expected at least one ACL" in p
               for p in found)
    assert len(found) == 6, found


def test_lun_numbers_auto_assigned_lowest_free() -> None:
    cfg = load("""
        devices:
          - {name: a, handler: raw, size: 1M}
          - {name: b, handler: raw, size: 1M}
          - {name: c, handler: raw, size: 1M}
        exports:
          loopback: [{device: a, lun: 0}, {device: b}, {device: c, lun: 7}]
    """)
    assert cfg.exports.loopback == (LunMap("a", 0), LunMap("b", 1), LunMap("c", 7))


def test_chap_rules() -> None:
    found = problems("""
        devices: [{name: a, handler: raw, size: 1M}]
        exports:
          iscsi:
            - iqn: eui.0123456789abcdef
              generate_node_acls: true
              chap: {userid: u, password: samesecret1, mutual_userid: t,
                     mutual_password: samesecret1}
            - iqn: naa.5001405000000001
              generate_node_acls: true
              chap: {userid: u, password: pw, mutual_userid: t}
            - iqn: naa.5001405000000002
              generate_node_acls: true
              chap: {userid: u}
    """)
    assert any("exports.iscsi[0].chap.mutual_password: got '<hidden>'" in p for p in found)
    assert not any("samesecret1" in p for p in found)  # secrets never echoed
    assert any("exports.iscsi[1].chap.mutual_password: got nothing" in p for p in found)
    assert any("exports.iscsi[2].chap.password: got nothing" in p for p in found)


def test_chap_is_all_or_nothing_per_target() -> None:
    found = problems("""
        devices: [{name: a, handler: raw, size: 1M}]
        exports:
          iscsi:
            - iqn: iqn.2003-01.org.x:t
              generate_node_acls: true
              luns: [{device: a}]
              acls:
                - {initiator: iqn.2003-01.org.x:i1, chap: {userid: u, password: p}}
                - {initiator: iqn.2003-01.org.x:i2}
    """)
    assert found == [
        "cfg.yaml: exports.iscsi[0].acls[1].chap: got nothing, expected CHAP credentials (this"
        " target uses CHAP, so every initiator needs them)",
        "cfg.yaml: exports.iscsi[0].chap: got nothing, expected CHAP credentials for demo-mode"
        " initiators (generate_node_acls is on and an ACL uses CHAP)"]


def test_data_area_must_hold_the_largest_command() -> None:
    found = problems("""
        devices:
          - {name: a, handler: raw, size: 1M, block_size: 4096, hw_max_sectors: 8192,
             max_data_area_mb: 16}
    """)
    assert len(found) == 1 and "devices[0].hw_max_sectors: got 8192" in found[0]


def test_options_that_would_break_dev_config() -> None:
    found = problems("""
        devices:
          - {name: a, handler: x, size: 1M, options: {host: "a:b"}}
          - {name: b, handler: x, size: 1M, options: {v: [1, 2]}}
          - {name: c, handler: raw, size: 1M, options: {path: /x, extra: 1}}
          - {name: d, handler: x, size: 1M, options: {k: "%s"}}
    """ % ("v" * 300))
    assert any("devices[0].options.host: got 'a:b', expected a value without" in p
               for p in found)
    assert any("devices[1].options.v: got [1, 2], expected a string" in p for p in found)
    assert any("devices[2].options.extra: got 1, expected one of the keys path" in p
               for p in found)
    assert any("devices[3].options: got" in p and "at most 255" in p for p in found)


def test_handler_registry_checks() -> None:
    def check_raw(cfg: str) -> None:
        if not cfg.startswith("/"):  # the cfgstring after "raw/"
            raise ConfigError("path must be absolute")

    def check_thin(cfg: str) -> None:
        raise ConfigError("pool unknown")

    found = problems("""
        devices:
          - {name: a, handler: raw, size: 1M}
          - {name: b, handler: nope, size: 1M}
          - {name: c, handler: thin, size: 1M}
    """, handlers={"raw": check_raw, "thin": check_thin})
    assert any("devices[1].handler: got 'nope', expected an installed handler (raw, thin)" in p
               for p in found)
    assert any("devices[2].options: got None, expected options the 'thin' handler accepts:"
               " pool unknown" in p for p in found)
    assert len(found) == 2


def test_library_structure() -> None:
    found = problems("""
        libraries:
          - name: lib
            changer: ch
            drives: [{name: t0}]
            slots: 2
            cartridges: ["AAA000L8..AAA009L8", "bad-code"]
            media_dir: /m
    """)
    # A drive without a model is the library personality's usual drive (IBM-LTO8 here).
    assert not any("drives[0].model" in p for p in found), found
    assert any("libraries[0].cartridges[1]: got 'bad-code'" in p for p in found)


def test_library_too_many_cartridges() -> None:
    found = problems("""
        libraries:
          - {name: lib, changer: ch, drives: [{name: t0, model: IBM-LTO8}], slots: 2,
             cartridges: ["AAA000L8..AAA009L8"], media_dir: /m}
    """)
    assert found == ["cfg.yaml: libraries[0].cartridges[0]: got 'AAA000L8..AAA009L8', expected"
                     " at most slots + import_export = 2 cartridges in all (this range holds 10,"
                     " the ones before it 0)"]


def test_load_config_file_and_unreadable(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("devices: [{name: a, handler: raw, size: 4K}]\n")
    cfg = load_config(f)
    assert cfg.source == str(f) and cfg.device("a").size == 4096
    f.write_text("devices: [{name: a, handler: raw, size: -1}]\n")
    with pytest.raises(ConfigError, match=rf"^{f}: devices\[0\].size: got -1"):  # one: one line
        load_config(f)
    f.write_text("devices: [{name: a, handler: raw, size: -1}, {name: b, handler: raw}]\n")
    with pytest.raises(ConfigError, match=rf"^2 problem\(s\) in {f}:\n{f}: devices\[0\].size"):
        load_config(f)
    with pytest.raises(ConfigError, match="unreadable"):
        load_config(tmp_path / "missing.yaml")


def test_top_level_must_be_a_mapping() -> None:
    # The built-in handlers only: an installed plugin adds its own section keys (see
    # test_plugin_example.py).
    registry = {name: load_handlers()[name] for name in ("raw", "null", "thin", "vtl")}
    assert problems("- a\n- b\n", registry=registry) == [
        "cfg.yaml: (top level): got ['a', 'b'], expected a mapping with keys defaults, devices,"
        " exports, libraries, pools, state_dir"]


def test_empty_file_is_a_valid_empty_config() -> None:
    cfg = load("")
    assert cfg.devices == () and cfg.exports.loopback == ()


@pytest.mark.parametrize(("text", "n"), [
    ("0", 0), ("512", 512), ("4K", 4096), ("4k", 4096), ("1M", 1 << 20), ("2MiB", 2 << 20),
    ("3G", 3 << 30), ("1TB", 1 << 40), ("1P", 1 << 50), (12345, 12345)])
def test_parse_size(text: object, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["1.5G", "-1", "G", "10X", True, 1.0, None, -5, "1 G B"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(("spec", "first", "last", "count"), [
    ("ABC000L8..ABC019L8", "ABC000L8", "ABC019L8", 20),
    ("ABC009L8..ABC010L8", "ABC009L8", "ABC010L8", 2),
    ("A98..A102", None, None, 0),         # widths differ: rejected
    ("CLN001L1", "CLN001L1", "CLN001L1", 1),
    ("X0..X9", "X0", "X9", 10),
])
def test_expand_barcodes(spec: str, first: str | None, last: str | None, count: int) -> None:
    if first is None:
        with pytest.raises(ValueError):
            expand_barcodes(spec)
        return
    codes = expand_barcodes(spec)
    assert (codes[0], codes[-1], len(codes)) == (first, last, count)
    assert len(set(codes)) == count


@pytest.mark.parametrize("bad", ["AB1..AB0", "AB1..CD2", "ab1..ab2", "A1B..A2C"])
def test_expand_barcodes_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        expand_barcodes(bad)


@given(st.integers(0, 10**6), st.sampled_from(["", "K", "M", "G", "T", "P"]))
def test_parse_size_property(n: int, suffix: str) -> None:
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
    assert parse_size(f"{n}{suffix}") == n * mult[suffix]


LIB = """
state_dir: /srv/t
libraries:
  - name: lab
    changer: lab-ch
    drives:
      - {name: lab-d0, model: IBM-LTO8}
      - {name: lab-d1, model: HP-LTO7, serial: HPSER00001}
    slots: 10
    import_export: 2
    cartridges: ["ABC000L8..ABC003L8", "WRM000LY"]
    media_dir: /srv/t/lab
exports:
  loopback: [{device: lab-ch}, {device: lab-d0}, {device: lab-d1}]
"""


def test_library_units_are_devices_with_tape_settings() -> None:
    cfg = load(LIB)
    ch, d0, d1 = cfg.devices
    assert (ch.name, d0.name, d1.name) == ("lab-ch", "lab-d0", "lab-d1")
    for dev in cfg.devices:
        assert dev.handler == "vtl" and dev.size == 1 << 20
        assert dev.hw_max_sectors * dev.block_size >= 256 << 10  # 256 KiB tape blocks
        assert dev.cmd_time_out >= 120  # long tape operations
    assert dev_config_string(ch) == "vtl/library=/srv/t/lab;unit=changer"
    assert dev_config_string(d1) == "vtl/library=/srv/t/lab;unit=drive1"
    # Drive serials: as declared, else derived from the device name (stable, 10 characters).
    assert d1.serial == "HPSER00001"
    assert d0.serial is not None and len(d0.serial) == 10 and d0.serial.startswith("TP")
    assert load(LIB).devices[1].serial == d0.serial
    assert ch.serial is None
    assert [lm.device for lm in cfg.exports.loopback] == ["lab-ch", "lab-d0", "lab-d1"]


def test_library_problems_name_key_and_value() -> None:
    found = problems("""
        devices: [{name: lab-d0, handler: raw, size: 1M}]
        libraries:
          - name: lab
            changer: lab-ch
            drives: [{name: lab-d0, model: IBM-LTO8}, {name: lab-d1, model: QUANTUM-DLT}]
            slots: 4
            cartridges: ["ABC000..ABC001"]
            media_dir: /srv/lab
          - name: lab2
            changer: ch2
            drives: [{name: x0, model: LTO8, serial: "bad serial"}]
            slots: 4
            media_dir: /srv/lab
    """)
    assert any(p.startswith("cfg.yaml: libraries[0].drives[1].model: got 'QUANTUM-DLT',"
                            " expected a known drive model") for p in found), found
    assert any(p.startswith("cfg.yaml: libraries[0].cartridges[0]: got 'ABC000..ABC001',"
                            " expected barcodes with an LTO media suffix") for p in found), found
    assert any(p.startswith("cfg.yaml: libraries[1].drives[0].serial: got 'bad serial'")
               for p in found), found
    assert any(p.startswith("cfg.yaml: libraries[1].media_dir: got '/srv/lab', expected a"
                            " directory of its own (library lab uses it)") for p in found), found
    assert any(p.startswith("cfg.yaml: libraries[0].drives[0].name: got 'lab-d0', expected a name"
                            " no device or other library unit uses") for p in found), found


def test_library_unit_names_unique_inside_the_library() -> None:
    found = problems("""
        libraries:
          - {name: l, changer: u, drives: [{name: u, model: IBM-LTO8}], slots: 1, media_dir: /m}
    """)
    assert any("libraries[0].drives: got" in p and "'u' repeats" in p for p in found), found


def test_library_needs_the_vtl_handler() -> None:
    found = problems(LIB, handlers={"raw": lambda s: None})
    assert found == ["cfg.yaml: libraries: got ['lab'], expected the vtl handler installed (raw)"]
    # With the handler installed, the units are not checked against a library directory that
    # `tcmu-py apply` has yet to create.
    def refuse(cfg: str) -> None:
        raise ConfigError("no library there")

    assert len(load(LIB, handlers={"vtl": refuse}).devices) == 3


# ---------------------------------------------------------------------------------------------
# Any document: a Config or one ConfigError, never another exception


_KEYS = ["state_dir", "defaults", "pools", "devices", "libraries", "exports", "name", "handler",
         "size", "block_size", "options", "serial", "wwn", "pool", "path", "capacity",
         "hard_limit", "soft_threshold", "changer", "drives", "slots", "import_export",
         "cartridges", "media_dir", "model", "loopback", "iscsi", "iqn", "tpg", "portals",
         "luns", "acls", "chap", "userid", "password", "initiator", "device", "lun",
         "attributes", "generate_node_acls", "hw_max_sectors", "max_data_area_mb",
         "cmd_time_out", "write_cache", "mutual_userid", "mutual_password"]
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["1G", "512", "raw", "thin", "/abs/path", "naa.5001405000000001",
                     "AAA000L8..AAA009L8", "iqn.2003-01.org.x:y", "127.0.0.1:3260", "95%",
                     "ULT3580-TD8", "d0", "main"]))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.integers(0, 3), st.booleans()),
                        inner, max_size=5)),
    max_leaves=30)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6))
def test_any_document_gives_a_config_or_one_config_error(doc: dict) -> None:
    import yaml

    text = yaml.safe_dump(doc)
    try:
        load_config_text(text, "fuzz.yaml")
    except ConfigError as exc:
        assert all(line.startswith("fuzz.yaml: ") or line.endswith("in fuzz.yaml:")
                   for line in str(exc).splitlines())


# ---------------------------------------------------------------------------------------------
# Distinct disks: serials, wwns and image files are not shared (D11)


def test_two_devices_with_one_serial_are_refused() -> None:
    found = problems("""
        devices:
          - {name: d0, handler: raw, size: 1G, serial: SAME0001}
          - {name: d1, handler: "null", size: 1G, serial: SAME0001}
    """)
    assert found == ["cfg.yaml: devices[1].serial: got 'SAME0001', expected a serial no other"
                     " device has (d0 has it: identical VPD 80h/83h, multipath would take both"
                     " for one disk)"]


def test_a_device_serial_equal_to_a_tape_drive_serial_is_refused() -> None:
    found = problems("""
        devices:
          - {name: d0, handler: raw, size: 1G, serial: DRIVE0001}
        libraries:
          - {name: lib, changer: ch, drives: [{name: t0, model: IBM-LTO8, serial: DRIVE0001}],
             slots: 2, media_dir: /m}
    """)
    assert len(found) == 1 and found[0].startswith("cfg.yaml: libraries[0].drives[0].serial:")


def test_two_devices_with_one_wwn_are_refused() -> None:
    found = problems("""
        devices:
          - {name: d0, handler: raw, size: 1G, wwn: naa.5001405000000001}
          - {name: d1, handler: raw, size: 1G, wwn: NAA.5001405000000001}
    """)
    assert found == ["cfg.yaml: devices[1].wwn: got 'naa.5001405000000001', expected a wwn no"
                     " other device has (d0 has it)"]


@pytest.mark.parametrize("wwn", ["naa.6001405abcdef012", "naa.5001405abcdef01234",
                                 "naa.1001405abcdef012", "naa.5" + "0" * 31, "eui.5001405abc"])
def test_wwn_must_be_an_spc_naa_designator(wwn: str) -> None:
    found = problems(f"""
        devices:
          - {{name: d0, handler: raw, size: 1G, wwn: "{wwn}"}}
    """)
    assert len(found) == 1 and "devices[0].wwn" in found[0] and "NAA 6h" in found[0]


def test_wwn_goes_into_every_kind_of_dev_config() -> None:
    cfg = load("""
        devices:
          - {name: r, handler: raw, size: 1G, wwn: naa.5001405000000001}
          - {name: n, handler: "null", size: 1G, wwn: naa.60014050000000000000000000000002}
    """)
    assert dev_config_string(cfg.device("r")) == (
        "raw//var/lib/tcmu-py/r.img;wwn=naa.5001405000000001")
    assert dev_config_string(cfg.device("n")) == "null/wwn=naa.60014050000000000000000000000002"
    from tcmu_py.handler import split_wwn

    assert split_wwn("/var/lib/tcmu-py/r.img;wwn=naa.5001405000000001") == (
        "/var/lib/tcmu-py/r.img", "naa.5001405000000001")
    assert split_wwn("wwn=naa.60014050000000000000000000000002") == (
        "", "naa.60014050000000000000000000000002")
    assert split_wwn("pool=/p;disk=d") == ("pool=/p;disk=d", None)


def test_a_raw_path_that_looks_like_a_wwn_item_is_refused() -> None:
    found = problems("""
        devices:
          - {name: d0, handler: raw, size: 1G, options: {path: "/x;wwn=naa.5001405000000001"}}
    """)
    assert len(found) == 1 and "devices[0].options.path" in found[0]


def test_two_devices_on_one_image_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "sub")
    found = problems(f"""
        pools:
          - {{name: main, path: {tmp_path}/pool, capacity: 1G}}
        devices:
          - {{name: d0, handler: raw, size: 1G, options: {{path: {tmp_path}/sub/d.img}}}}
          - {{name: d1, handler: raw, size: 1G, options: {{path: {tmp_path}/link/d.img}}}}
          - {{name: t0, handler: thin, size: 1G, pool: main, options: {{disk: x}}}}
          - {{name: t1, handler: thin, size: 1G, options: {{pool: {tmp_path}/pool, disk: x}}}}
          - {{name: x, handler: thin, size: 1G, pool: main}}
          - {{name: r, handler: raw, size: 1G, options: {{path: {tmp_path}/pool/x.img}}}}
    """)
    assert [f.split(":")[1].strip() for f in found] == [
        "devices[1].options", "devices[3].options", "devices[4].options", "devices[5].options"]
    assert f"d0 uses {tmp_path}/sub/d.img" in found[0]
    assert f"t0 uses {tmp_path}/pool/x.img" in found[1]


def test_pool_on_a_device_of_a_handler_without_pools_is_refused(tmp_path) -> None:
    """Only handlers that take a pool (`Handler.takes_pool`: thin, dedup) check ``pool:``; any
    other device naming one is an error, not silently ignored."""
    text = f"state_dir: {tmp_path}\ndevices:\n  - {{name: a, handler: raw, size: 1M, pool: p}}\n"
    with pytest.raises(ConfigError) as e:
        load_config_text(text, "c.yaml")
    assert ("c.yaml: devices[0].pool: got 'p', expected no pool: only devices of a handler"
            " with pools take one (") in str(e.value) and "thin" in str(e.value)
