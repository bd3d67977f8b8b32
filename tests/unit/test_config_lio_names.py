"""`tcmu-py check` applies rtslib-fb's own rules to iSCSI names when rtslib-fb is installed, so
that a file `check` accepts is one `apply` does not refuse (issue 13)."""

from __future__ import annotations

import textwrap

import pytest

from tcmu_py.daemon import config as cfgmod
from tcmu_py.daemon.config import load_config_text
from tcmu_py.errors import ConfigError

rtslib_utils = pytest.importorskip("rtslib_fb.utils", reason="rtslib-fb (the lio extra) missing")

TEXT = """
devices:
  - {{name: d0, handler: "null", size: 1M}}
exports:
  iscsi:
    - iqn: {target}
      luns: [{{device: d0}}]
      acls: [{{initiator: {initiator}}}]
"""

GOOD_TARGET = "iqn.2003-01.org.linux-iscsi.host:sn.1234"
GOOD_INITIATOR = "iqn.1994-05.com.redhat:client1"

# Each passes RFC 3720's syntax (Checker.wwn) and is refused by rtslib-fb's normalize_wwn for
# the iSCSI fabric (Target and NodeACL).
REFUSED = [
    "iqn.2003-01.org.linux-iscsi.host:disk_1",  # an underscore in the unique part
    "iqn.2003-01.com:target",                   # naming authority without a dot
    "naa.60014050123456789abcdef012345678",     # a 32-digit NAA
    "naa.3001405012345678",                     # NAA type 3: rtslib takes 1, 2, 5, c-f
]


def _load(target: str, initiator: str) -> object:
    return load_config_text(textwrap.dedent(TEXT.format(target=target, initiator=initiator)),
                            "cfg.yaml")


def _rtslib_accepts(name: str) -> bool:
    try:
        rtslib_utils.normalize_wwn(("iqn", "naa", "eui"), name)
    except Exception:  # noqa: BLE001 - RTSLibError
        return False
    return True


@pytest.mark.parametrize("name", REFUSED)
def test_target_name_rtslib_refuses_is_refused(name: str) -> None:
    assert not _rtslib_accepts(name)  # the premise: apply would fail on it
    with pytest.raises(ConfigError) as exc:
        _load(name, GOOD_INITIATOR)
    (line,) = str(exc.value).splitlines()
    assert line.startswith(f"cfg.yaml: exports.iscsi[0].iqn: got '{name}', expected a name "
                           "rtslib-fb accepts"), line


@pytest.mark.parametrize("name", REFUSED)
def test_initiator_name_rtslib_refuses_is_refused(name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(GOOD_TARGET, name)
    assert "exports.iscsi[0].acls[0].initiator: got" in str(exc.value)


@pytest.mark.parametrize("name", [GOOD_TARGET, "eui.0123456789abcdef", "naa.5001405012345678",
                                  "IQN.2003-01.Org.Example:T1"])
def test_names_rtslib_accepts_pass(name: str) -> None:
    assert _rtslib_accepts(name.lower())
    cfg = _load(name, GOOD_INITIATOR)
    assert cfg.exports.iscsi[0].iqn == name.lower()  # type: ignore[attr-defined]


def test_without_rtslib_only_rfc3720(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without rtslib-fb `check` applies the RFC 3720 syntax alone (apply cannot run anyway)."""
    monkeypatch.setattr(cfgmod, "_rtslib_normalize_wwn", lambda: None)
    cfg = _load(REFUSED[0], GOOD_INITIATOR)
    assert cfg.exports.iscsi[0].iqn == REFUSED[0]  # type: ignore[attr-defined]
