"""An out-of-tree handler (tests/plugin_example, installed by scripts/bootstrap.sh) plugs in
through the handler contract alone: its YAML section, its status rows, its CLI subcommand."""

from __future__ import annotations

import json
import textwrap
import threading
from pathlib import Path

import pytest
from test_daemon import MIB, Host

from tcmu_py import cli
from tcmu_py.daemon.serve import Daemon
from tcmu_py.daemon.status import render_status
from tcmu_py.handler import load_handlers
from tcmu_py.testing import cdbs

plugin = pytest.importorskip(
    "tcmu_py_plugin_example",
    reason="tests/plugin_example is not installed (scripts/bootstrap.sh installs it)",
)


def write_yaml(tmp_path: Path, body: str) -> Path:
    f = tmp_path / "cfg.yaml"
    f.write_text(f"state_dir: {tmp_path}/state\n" + textwrap.dedent(body))
    return f


def test_registered_through_its_entry_point() -> None:
    registry = load_handlers()
    assert "ramdisk" in registry
    assert registry["ramdisk"] is plugin.RamDiskHandler


def test_check_accepts_its_section_and_exports_its_devices(tmp_path, capsys) -> None:
    f = write_yaml(tmp_path, """
        ramdisks:
          limit: 64M
          disks:
            - {name: r0, size: 16M}
            - {name: r1, size: 48M}
        devices:
          - {name: n0, handler: "null", size: 1M}
        exports:
          loopback: [{device: r0}, {device: r1}, {device: n0}]
    """)
    assert cli.main(["check", "-c", str(f)]) == 0
    assert capsys.readouterr().out.strip() == f"{f}: OK (3 device(s))"
    from tcmu_py.daemon.config import dev_config_string, load_config

    cfg = load_config(f)
    r1 = cfg.device("r1")
    assert (r1.handler, r1.size) == ("ramdisk", 48 * MIB)
    assert dev_config_string(r1) == "ramdisk/"
    assert [s.name for s in cfg.section("ramdisks")] == ["r0", "r1"]


def test_check_reports_its_problems_with_everyone_elses(tmp_path, capsys) -> None:
    """Its problems come in the loader's format, all at once, with the rest of the file's."""
    f = write_yaml(tmp_path, """
        ramdisks:
          limit: 32M
          colour: blue
          disks:
            - {name: r0, size: 16M}
            - {name: r1, size: 17M}
            - {name: bad/name, size: 1000}
        devices:
          - {name: r0, handler: "null", size: 1M}
        exports:
          loopback: [{device: ghost}]
    """)
    assert cli.main(["check", "-c", str(f)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == ["tcmu-py: configuration error:", f"6 problem(s) in {f}:"]
    want = [
        f"{f}: ramdisks.colour: got 'blue', expected one of the keys disks, limit (unknown key)",
        f"{f}: ramdisks.disks[1].size: got '17M', expected a size within ramdisks.limit"
        f" ({32 * MIB} bytes in all; the disks before it take {16 * MIB})",
        f"{f}: ramdisks.disks[2].name: got 'bad/name', expected a name of 1..64 characters",
        f"{f}: ramdisks.disks[2].size: got 1000, expected a multiple of 512 bytes",
        # the section's device and a devices: entry share a name (one LIO object each)
        f"{f}: ramdisks.disks[0].name: got 'r0', expected a name no other device uses",
        f"{f}: exports.loopback[0].device: got 'ghost', expected the name of a device",
    ]
    for line in want:
        assert any(e.startswith(line) for e in err[2:]), (line, err)


def test_its_command(capsys) -> None:
    assert cli.main(["ramdisk", "pages", "16M", "1"]) == 0
    assert capsys.readouterr().out == f"{16 * MIB // 4096 + 1} pages ({16 * MIB + 4096} bytes)\n"
    with pytest.raises(SystemExit) as ei:
        cli.main(["ramdisk", "pages", "16Q"])
    assert ei.value.code == 2
    assert "expected bytes or a size like 16M" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        cli.main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "ramdisk" in out and "RAM disk sizes" in out and "thin pool administration" in out


def test_its_status_rows(tmp_path, capsys) -> None:
    """The daemon asks every handler for its status entries; `tcmu-py status` prints its
    table (text) and its entries as they are (--json)."""
    host = Host(tmp_path)
    host.add("uio0", 0, "r0", "ramdisk/", 4 * MIB)
    host.add("uio1", 0, "n0", "null/", 4 * MIB)
    registry = load_handlers()
    d = Daemon(
        handlers={name: registry[name] for name in ("null", "thin", "ramdisk")},
        configfs_root=host.configfs,
        uio_class=host.uio_class,
        run_dir=tmp_path / "run",
        use_netlink=False,
        use_udev=False,
        uio_opener=host.open_uio,
    )
    d.start()
    t = threading.Thread(target=d.run, kwargs={"install_signals": False})
    t.start()
    try:
        host.run("uio0", cdbs.test_unit_ready())  # the power-on unit attention
        assert host.run("uio0", cdbs.write10(0, 8), data_out=bytes(4096)).good
        st = d.status()
        assert st["ramdisks"] == [{"name": "r0", "size": 4 * MIB, "written": 4096}]
        assert st["pools"] == []  # thin's entry, with no thin device served
        text = render_status(st)
        assert "\nram disks\nramdisk  bytes    written\n" in text
        assert "r0       4194304  4096" in text
        assert "thin pools" not in text
        run = str(tmp_path / "run")
        assert cli.main(["status", "--run-dir", run, "-i", "0", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["ramdisks"][0]["written"] == 4096
        assert cli.main(["status", "--run-dir", run, "-i", "0"]) == 0
        assert "ram disks" in capsys.readouterr().out
    finally:
        d.stop()
        t.join(timeout=30)
    assert not t.is_alive()
