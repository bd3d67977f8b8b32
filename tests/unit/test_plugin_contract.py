"""The handler contract (tcmu_py.handler.Handler) as the built-ins use it: thin's pools section,
commands and status, and the loader's handling of handlers that claim what is not theirs."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import pytest

from tcmu_py import cli
from tcmu_py.configspec import Checker
from tcmu_py.daemon.config import load_config_text, section_owners
from tcmu_py.daemon.status import render_status
from tcmu_py.errors import ConfigError
from tcmu_py.handler import Handler, StatusTable, load_handlers
from tcmu_py.handlers.null import NullHandler
from tcmu_py.handlers.thin import ThinHandler
from tcmu_py.handlers.thin.config import PoolSpec

MIB = 1 << 20


def test_a_handler_that_needs_none_of_it_gets_defaults() -> None:
    assert NullHandler.config_sections == ()
    assert NullHandler.status([]) == {} and NullHandler.status_tables({}) == []
    assert NullHandler.commands() == {}


def test_thin_owns_pools_through_the_registry() -> None:
    owners = section_owners(load_handlers())
    assert owners["pools"] is ThinHandler
    cfg = load_config_text(
        "pools: [{name: p, path: /srv/p, capacity: 1G, hard_limit: 50%}]\n"
        "devices: [{name: t, handler: thin, size: 1M, pool: p}]\n", "t.yaml")
    assert cfg.section("pools") == (PoolSpec("p", "/srv/p", 1 << 30, 80, 1 << 29),)
    assert cfg.device("t").config_items == (("pool", "/srv/p"),)
    # Without thin, nobody owns pools: the key is unknown like any typo.
    with pytest.raises(ConfigError, match=r"^t.yaml: pools: got .*unknown key"):
        load_config_text("pools: []\n", "t.yaml", registry={"null": NullHandler})


class Imaged(Handler):
    """Takes one option, ``image``, and makes its dev_config of it alone (as raw does)."""

    subtype = "imaged"

    @classmethod
    def open(cls, config: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def load_options(cls, raw: object, path: str, checker: Checker, name: str | None,
                     state_dir: str) -> tuple[tuple[str, str], ...] | None:
        m = checker.mapping(raw, path, {"image"})
        if m is None:
            return None
        img = checker.abspath(m.get("image", f"{state_dir}/{name}.i"), f"{path}.image")
        return None if img is None else (("image", img),)

    @classmethod
    def config_string(cls, options: tuple[tuple[str, str], ...],
                      items: tuple[tuple[str, str], ...]) -> str:
        return dict(options)["image"]

    @classmethod
    def device_image(cls, device: Any) -> str | None:
        return device.options_dict()["image"]


def test_a_handler_owns_its_device_options_and_dev_config() -> None:
    """What raw does (its image path) the loader learns from the handler, not by name."""
    registry: dict[str, type[Handler]] = {"imaged": Imaged, "null": NullHandler}
    cfg = load_config_text("state_dir: /s\ndevices: [{name: a, handler: imaged, size: 1M},"
                           " {name: b, handler: 'null', size: 1M, options: {x: 1}}]\n",
                           "i.yaml", registry=registry)
    assert cfg.device("a").options == (("image", "/s/a.i"),)
    assert cfg.device("b").options == (("x", "1"),)  # the default: key=value items
    with pytest.raises(ConfigError) as err:
        load_config_text("devices: [{name: a, handler: imaged, size: 1M, options: {x: 1}},"
                         " {name: b, handler: imaged, size: 1M, options: {image: /i}},"
                         " {name: c, handler: imaged, size: 1M, options: {image: /i}}]\n",
                         "i.yaml", registry=registry)
    assert str(err.value).splitlines()[1:] == [
        "i.yaml: devices[0].options.x: got 1, expected one of the keys image (unknown key)",
        "i.yaml: devices[2].options: got {'image': '/i'}, expected an image file of its own"
        " (b uses /i)"]


class Greedy(Handler):
    """Claims a loader key and thin's section: both refused, its own section kept."""

    subtype = "greedy"
    config_sections = ("devices", "pools", "greed")

    @classmethod
    def open(cls, config: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def load_section(cls, key: str, raw: object, checker: Checker,
                     doc: Mapping[str, Any]) -> tuple[Any, ...]:
        if raw is not None and raw != "good":
            checker.fail(key, raw, "good")
        return (raw,)


def test_a_section_claimed_twice_stays_with_its_first_owner(caplog) -> None:
    with caplog.at_level(logging.ERROR):
        owners = section_owners({"thin": ThinHandler, "greedy": Greedy})
    assert owners == {"pools": ThinHandler, "greed": Greedy}
    assert "section 'devices' belongs to the loader" in caplog.text
    assert "section 'pools' belongs to handler 'thin'" in caplog.text
    with pytest.raises(ConfigError) as ei:
        load_config_text("greed: bad\ndevices: [{name: d, handler: x, size: 0}]\n", "g.yaml",
                         registry={"thin": ThinHandler, "greedy": Greedy})
    lines = str(ei.value).splitlines()
    assert lines[0] == "2 problem(s) in g.yaml:"
    assert lines[1] == "g.yaml: greed: got 'bad', expected good"
    assert lines[2].startswith("g.yaml: devices[0].size: got 0, expected a size greater")


def test_thin_command_creates_and_reports_pools(tmp_path, capsys) -> None:
    pool = tmp_path / "p"
    assert cli.main(["thin", "create", str(pool), "--name", "main", "--capacity", "64M",
                     "--soft-threshold", "70"]) == 0
    assert cli.main(["thin", "status", "--json", str(pool)]) == 0
    (st,) = json.loads(capsys.readouterr().out)
    assert (st["name"], st["capacity"], st["soft_threshold"], st["used"]) == (
        "main", 64 * MIB, 70, 0)
    assert cli.main(["thin", "status", str(pool)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["pool", "path", "capacity", "used", "used%", "soft", "state",
                                "disks"]
    assert lines[2].split() == ["main", str(pool), "64.0MiB", "0B", "0.0%", "70%", "ok"]
    assert cli.main(["thin", "create", str(tmp_path / "q"), "--name", "q",
                     "--capacity", "lots"]) == 2
    assert "--capacity: got 'lots', expected a size like 10G" in capsys.readouterr().err
    assert cli.main(["thin", "status", str(tmp_path / "none")]) == 2
    assert "no thin pool here" in capsys.readouterr().err


class Broken(NullHandler):
    subtype = "broken"

    @classmethod
    def status_tables(cls, status: Mapping[str, Any]) -> list[StatusTable]:
        raise KeyError("from another version")


def test_status_text_survives_a_broken_handler(caplog) -> None:
    st = {"pid": 1, "devices": [], "pools": [
        {"name": "m", "path": "/p", "capacity": 100, "used": 60, "soft_threshold": 50,
         "above_threshold": True, "disks": [{"name": "d", "used": 60}]}]}
    with caplog.at_level(logging.ERROR):
        text = render_status(st, handlers={"broken": Broken, "thin": ThinHandler})
    assert "status tables failed" in caplog.text
    assert "\nthin pools\n" in text
    assert text.splitlines()[-1].split() == ["m", "/p", "100B", "60B", "60.0%", "50%", "ABOVE",
                                             "d=60B"]


class _Watched(dict[str, type[Handler]]):
    """A registry that records which handlers were imported (looked up)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.looked_up: list[str] = []

    def __getitem__(self, key: str) -> type[Handler]:
        self.looked_up.append(key)
        return super().__getitem__(key)


def test_status_imports_only_the_handlers_that_reported() -> None:
    """`tcmu-py status` renders the tables of the handlers the daemon names in "handlers" and
    of the status's devices, importing no other (an older daemon names none: all of them)."""
    registry = _Watched({"null": NullHandler, "thin": ThinHandler, "vtl": NullHandler})
    st = {"pid": 1, "devices": [], "handlers": ["thin"], "pools": []}
    render_status(st, handlers=registry)
    assert registry.looked_up == ["thin"]
    registry.looked_up.clear()
    render_status({"pid": 1, "devices": [], "pools": []}, handlers=registry)
    assert sorted(registry.looked_up) == ["null", "thin", "vtl"]
