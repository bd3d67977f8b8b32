"""udev rules and systemd unit, checked offline.

The rules are parsed with udev's grammar, then evaluated for sample uio devices by a small
evaluator of the rule subset they use: match keys with fnmatch, udev's "$" substitutions, argv
split with quotes as udevd does, IMPORT{program} really run through /bin/sh. The real
`udevadm test` runs in the VM (tests/kernel)."""

from __future__ import annotations

import configparser
import fnmatch
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

UDEV = Path(__file__).resolve().parents[2] / "udev"
RULES = UDEV / "60-tcmu-py.rules"
UNIT = UDEV / "tcmu-py.service"

# One key/op/value triple: KEY or KEY{attr}, operator, double-quoted value (udev rules(7)).
_PAIR = re.compile(r'\s*([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(,|$)')
MATCH_KEYS = {"ACTION", "SUBSYSTEM", "ATTR", "ENV", "KERNEL", "TAG"}
ASSIGN_KEYS = {"OWNER", "GROUP", "MODE", "SYMLINK", "TAG", "ENV", "IMPORT", "GOTO", "LABEL",
               "RUN", "OPTIONS"}

Rule = list[tuple[str, str | None, str, str]]


def parse_rules(text: str) -> list[Rule]:
    rules = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pos, rule = 0, []
        while pos < len(line):
            m = _PAIR.match(line, pos)
            assert m, f"line {lineno}: cannot parse at {line[pos:]!r}"
            rule.append((m.group(1), m.group(2), m.group(3), m.group(4)))
            pos = m.end()
        rules.append(rule)
    return rules


@dataclass
class Device:
    action: str
    subsystem: str
    attrs: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    symlinks: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    owner: str | None = None
    group: str | None = None
    mode: str | None = None


def substitute(value: str, dev: Device) -> str:
    """udev_event_apply_format for the forms the rules use: $attr{}, $env{}, $$."""
    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        kind, arg = m.group(1), m.group(2)
        return dev.attrs.get(arg, "") if kind == "attr" else dev.env.get(arg, "")
    return re.sub(r"\$\$|\$(attr|env)\{([^}]*)\}", repl, value)


def evaluate(rules: list[Rule], dev: Device) -> Device:
    goto: str | None = None
    for rule in rules:
        if goto is not None:
            if rule[0][0] == "LABEL" and rule[0][3] == goto:
                goto = None
            continue
        matched = True
        for key, attr, op, value in rule:
            if op in ("==", "!="):
                actual = {"ACTION": dev.action, "SUBSYSTEM": dev.subsystem}.get(key)
                if key == "ATTR":
                    actual = dev.attrs.get(attr or "", "")
                elif key == "ENV":
                    actual = dev.env.get(attr or "", "")
                assert actual is not None, key
                hit = fnmatch.fnmatchcase(actual, value)
                if hit != (op == "=="):
                    matched = False
                    break
        if not matched:
            continue
        for key, attr, op, value in rule:
            if op in ("==", "!="):
                continue
            v = substitute(value, dev)
            if key == "GOTO":
                goto = v
            elif key == "OWNER":
                dev.owner = v
            elif key == "GROUP":
                dev.group = v
            elif key == "MODE":
                dev.mode = v
            elif key == "SYMLINK":
                dev.symlinks.append(v)
            elif key == "TAG":
                dev.tags.append(v)
            elif key == "ENV":
                dev.env[attr or ""] = (dev.env.get(attr or "", "") + " " + v).strip() \
                    if op == "+=" else v
            elif key == "IMPORT":
                assert attr == "program"
                argv = shlex.split(v)  # udevd: EXTRACT_UNQUOTE|EXTRACT_RELAX
                assert argv[0].startswith("/"), "helper must be an absolute path"
                out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
                for line in out.splitlines():
                    k, _, val = line.partition("=")
                    dev.env[k] = val
    return dev


@pytest.fixture(scope="module")
def rules() -> list[Rule]:
    return parse_rules(RULES.read_text())


def test_rules_grammar(rules: list[Rule]) -> None:
    labels = {r[0][3] for r in rules if r[0][0] == "LABEL"}
    for rule in rules:
        for key, attr, op, value in rule:
            if op in ("==", "!="):
                assert key in MATCH_KEYS, key
            else:
                assert key in ASSIGN_KEYS, key
            if key in ("ATTR", "ENV", "IMPORT"):
                assert attr, f"{key} needs {{...}}"
            if key == "GOTO":
                assert value in labels
    assert rules[-1][0][0] == "LABEL"


def tcmu_dev(name: str, action: str = "add") -> Device:
    return Device(action, "uio", {"name": name})


@pytest.mark.skipif(not Path("/bin/sh").exists(), reason="needs /bin/sh")
@pytest.mark.parametrize(("uio_name", "device", "subtype"), [
    ("tcm-user/0/disk0/raw//var/lib/tcmu-py/disk0.img", "disk0", "raw"),
    ("tcm-user/12/thin.a-1/thin/unit=64K;pool=main", "thin.a-1", "thin"),
    ("tcm-user/3/odd/raw//dir with space/*.img", "odd", "raw"),   # no globbing, spaces kept
    ("tcm-user/1/nocfg", "nocfg", ""),
])
def test_tcmu_device_gets_mode_link_and_systemd(rules: list[Rule], uio_name: str, device: str,
                                                subtype: str) -> None:
    dev = evaluate(rules, tcmu_dev(uio_name))
    assert (dev.owner, dev.group, dev.mode) == ("root", "root", "0600")
    assert dev.symlinks == [f"tcmu/{device}"]
    assert dev.env["TCMU_DEVICE"] == device and dev.env["TCMU_SUBTYPE"] == subtype
    assert dev.env["TCMU_HBA"] == uio_name.split("/")[1]
    assert "systemd" in dev.tags and dev.env["SYSTEMD_WANTS"] == "tcmu-py.service"


@pytest.mark.parametrize("dev", [
    Device("add", "uio", {"name": "uio_pdrv_genirq"}),       # some other uio driver
    Device("add", "uio", {"name": "xtcm-user/0/d/raw/"}),
    Device("add", "block", {"name": "tcm-user/0/d/raw/"}),
    Device("remove", "uio", {"name": "tcm-user/0/d/raw/"}),  # links go with the udev db entry
])
def test_other_devices_untouched(rules: list[Rule], dev: Device) -> None:
    out = evaluate(rules, dev)
    assert (out.mode, out.symlinks, out.tags, out.env) == (None, [], [], {})


def test_unit_file() -> None:
    cp = configparser.ConfigParser(strict=True, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    assert cp.sections() == ["Unit", "Service", "Install"]
    svc = cp["Service"]
    # with the YAML its LIO objects too; without (no Condition on it): the devices LIO has,
    # e.g. what `targetctl restore` brings back, and D-Bus activation (SystemdService=) works
    assert svc["ExecStart"].startswith("/bin/sh -c 'if [ -e /etc/tcmu-py/config.yaml ]; then "
                                       "exec tcmu-py serve -c /etc/tcmu-py/config.yaml; "
                                       "else exec tcmu-py serve; fi'")
    assert "ConditionPathExists" not in cp["Unit"]
    assert svc["Restart"] == "on-failure" and svc["Type"] == "notify"
    assert "target.service" in cp["Unit"]["Before"].split()
    assert cp["Install"]["WantedBy"] == "multi-user.target"
    # The rules start the unit by this exact name.
    assert f'ENV{{SYSTEMD_WANTS}}+="{UNIT.name}"' in RULES.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_file_systemd_analyze(tmp_path: Path) -> None:
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True)
    # Only complaints about *this* unit matter (the host may lack target.service etc.).
    mine = [line for line in res.stderr.splitlines() if UNIT.name in line and
            "not found" not in line and "Failed to" not in line]
    assert mine == []
