"""A device's ``copy_domain:`` (issue 19): validated, carried in its dev_config before ``wwn=``,
split off by the daemon before the handler sees the config string."""

from __future__ import annotations

from pathlib import Path

import pytest

from tcmu_py.daemon.config import dev_config_string, load_config_text
from tcmu_py.errors import ConfigError
from tcmu_py.handler import split_copy_domain, split_daemon_items, split_wwn

WWN = "naa.5001405000000abc"


def _config(tmp_path: Path, extra: str) -> str:
    return (f"state_dir: {tmp_path}\ndevices:\n"
            f"  - {{name: a, handler: raw, size: 1M{extra}}}\n"
            f"  - {{name: b, handler: raw, size: 1M, copy_domain: vms}}\n")


def test_copy_domain_goes_into_the_dev_config_before_the_wwn(tmp_path: Path) -> None:
    cfg = load_config_text(_config(tmp_path, f", copy_domain: vms, wwn: {WWN}"))
    a, b = cfg.devices
    assert (a.copy_domain, b.copy_domain) == ("vms", "vms")
    text = dev_config_string(a)
    assert text == f"raw/{tmp_path}/a.img;copy_domain=vms;wwn={WWN}"
    assert split_daemon_items(text.partition("/")[2]) == (f"{tmp_path}/a.img", WWN, "vms")
    assert dev_config_string(b) == f"raw/{tmp_path}/b.img;copy_domain=vms"


def test_no_copy_domain_leaves_the_dev_config_as_it_was(tmp_path: Path) -> None:
    a, _ = load_config_text(_config(tmp_path, "")).devices
    assert a.copy_domain is None
    assert dev_config_string(a) == f"raw/{tmp_path}/a.img"
    assert split_daemon_items(f"{tmp_path}/a.img") == (f"{tmp_path}/a.img", None, None)


@pytest.mark.parametrize("bad", ["'a b'", "'x;y'", "''", "[vms]"])
def test_a_bad_copy_domain_is_named(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config_text(_config(tmp_path, f", copy_domain: {bad}"), "c.yaml")
    assert "c.yaml: devices[0].copy_domain: got" in str(e.value)


def test_a_raw_image_path_that_looks_like_a_copy_domain_is_refused(tmp_path: Path) -> None:
    text = (f"state_dir: {tmp_path}\ndevices:\n  - {{name: a, handler: raw, size: 1M,"
            f" options: {{path: '{tmp_path}/x;copy_domain=vms'}}}}\n")
    with pytest.raises(ConfigError) as e:
        load_config_text(text, "c.yaml")
    assert "devices[0].options.path" in str(e.value) and "copy_domain" in str(e.value)


def test_split_order() -> None:
    assert split_copy_domain("pool=/p;copy_domain=d1") == ("pool=/p", "d1")
    assert split_copy_domain("copy_domain=d1") == ("", "d1")
    assert split_wwn(f"pool=/p;copy_domain=d1;wwn={WWN}") == ("pool=/p;copy_domain=d1", WWN)
    assert split_copy_domain("pool=/p;copy_domain=d1;x=1") == ("pool=/p;copy_domain=d1;x=1", None)
