"""What `tcmu-py check` says of a YAML's dedup pools and devices must be what `apply` and
`serve -c` then do: a device may name its pool as ``options: {pool: <name>}`` (as the
configuration reference says), a block size that does not divide the pool's chunk size and an
existing pool declared with another name or chunk size are refused at load, naming the key,
before anything is created."""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml

from tcmu_py.daemon.config import dev_config_string, load_config_text
from tcmu_py.errors import ConfigError
from tcmu_py.handler import load_handlers
from tcmu_py.handlers.dedup import DedupHandler
from tcmu_py.handlers.dedup.store import create_pool


def _load(doc: dict[str, Any], *, check: bool = False) -> Any:
    reg = load_handlers()
    registry = {n: reg[n] for n in ("raw", "thin", "dedup")}
    handlers = {n: h.check_config for n, h in registry.items()} if check else None
    return load_config_text(yaml.safe_dump(doc), "c.yaml", registry=registry,  # type: ignore[arg-type]
                            handlers=handlers)


def _doc(path: str, device: dict[str, Any], **pool: Any) -> dict[str, Any]:
    return {"dedup_pools": [{"name": "images", "path": path, "capacity": "16M", **pool}],
            "devices": [{"name": "vm7", "handler": "dedup", "size": "8M", **device}]}


@pytest.mark.parametrize("check", [False, True])
def test_a_pool_named_in_options_is_the_declared_pool(tmp_path: os.PathLike[str],
                                                      check: bool) -> None:
    path = os.path.join(tmp_path, "p")
    cfg = _load(_doc(path, {"options": {"pool": "images"}}), check=check)
    (dev,) = cfg.devices
    assert dev.pool == "images"
    # the dev_config names the directory: a daemon started without this YAML opens it
    assert dev_config_string(dev) == f"dedup/pool={path}"
    by_key = _load(_doc(path, {"pool": "images"}), check=check)
    assert dev_config_string(by_key.devices[0]) == dev_config_string(dev)


def test_an_undeclared_pool_name_in_options_is_one_clear_error(tmp_path: os.PathLike[str]
                                                               ) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(_doc(os.path.join(tmp_path, "p"), {"options": {"pool": "imagez"}}), check=True)
    assert str(exc.value) == (
        "c.yaml: devices[0].options.pool: got 'imagez', expected an absolute pool directory "
        "or the name of a pool in dedup_pools (images)")


def test_an_undeclared_pool_is_reported_once(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(_doc(os.path.join(tmp_path, "p"), {"pool": "imagez"}), check=True)
    assert str(exc.value) == ("c.yaml: devices[0].pool: got 'imagez', expected the name of a "
                              "pool in dedup_pools (images)")


@pytest.mark.parametrize("check", [False, True])
def test_a_pool_given_both_as_pool_and_in_options(tmp_path: os.PathLike[str],
                                                  check: bool) -> None:
    """Before: a device with both keys vanished from the configuration (`check` said "OK (0
    device(s))", `apply` created nothing). The same pool twice is that pool; two are refused,
    naming the key."""
    path = os.path.join(tmp_path, "p")
    cfg = _load(_doc(path, {"pool": "images", "options": {"pool": "images"}}), check=check)
    (dev,) = cfg.devices
    assert dev.pool == "images" and dev_config_string(dev) == f"dedup/pool={path}"
    with pytest.raises(ConfigError) as exc:
        _load(_doc(path, {"pool": "images", "options": {"pool": "/srv/other"}}), check=check)
    assert str(exc.value) == (
        "c.yaml: devices[0].options.pool: got '/srv/other', expected the pool devices[0].pool "
        "names ('images'), or no options.pool: a device draws from one pool")


def test_an_absolute_pool_directory_in_options_is_kept(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    cfg = _load({"devices": [{"name": "vm7", "handler": "dedup", "size": "8M",
                              "options": {"pool": path}}]})
    assert dev_config_string(cfg.devices[0]) == f"dedup/pool={path}"


@pytest.mark.parametrize(("block", "chunk", "ok"), [
    (512, "4K", True), (4096, "4K", True), (4096, "64K", True), (8192, "4K", False),
])
def test_block_size_must_divide_the_chunk_size(tmp_path: os.PathLike[str], block: int,
                                               chunk: str, ok: bool) -> None:
    doc = _doc(os.path.join(tmp_path, "p"), {"pool": "images", "block_size": block},
               chunk_size=chunk)
    if ok:
        _load(doc)
        return
    with pytest.raises(ConfigError) as exc:
        _load(doc)
    assert str(exc.value) == ("c.yaml: devices[0].block_size: got 8192, expected a divisor of "
                              "pool 'images''s chunk_size (4096): a chunk holds whole blocks")


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("name", "other", "expected 'images', what the pool at {path} was created with (recorded "
                      "in {path}/pool.json; it cannot change)"),
    ("chunk_size", "8K", "expected 4096, what the pool at {path} was created with (recorded in "
                         "{path}/pool.json; it cannot change)"),
])
def test_an_existing_pool_declared_otherwise_is_refused_before_anything_is_created(
        tmp_path: os.PathLike[str], key: str, value: str, expected: str) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "images", 16 << 20)
    fresh = os.path.join(tmp_path, "fresh")
    doc = _doc(path, {"pool": "images"})
    doc["dedup_pools"][0][key] = value
    doc["dedup_pools"].insert(0, {"name": "fresh", "path": fresh, "capacity": "16M"})
    if key == "name":
        doc["devices"][0]["pool"] = value
    with pytest.raises(ConfigError) as exc:
        _load(doc, check=True)
    got = repr(8192) if key == "chunk_size" else repr(value)
    assert str(exc.value) == (f"c.yaml: dedup_pools[1].{key}: got {got}, "
                              + expected.format(path=path))
    assert not os.path.exists(fresh)
    DedupHandler.check_config(f"pool={path}")  # the pool itself is untouched and valid


def test_two_devices_on_one_disk_of_a_pool_are_refused_at_load(tmp_path: os.PathLike[str]
                                                               ) -> None:
    """Before: `check` said OK, and the second device's open failed "already open"."""
    doc = _doc(os.path.join(tmp_path, "p"), {"pool": "images", "options": {"disk": "x"}})
    doc["devices"].append({"name": "vm8", "handler": "dedup", "size": "8M", "pool": "images",
                           "options": {"disk": "x"}})
    with pytest.raises(ConfigError) as exc:
        _load(doc, check=True)
    assert str(exc.value) == ("c.yaml: devices[1].options.disk: got 'x', expected a disk of "
                              "pool 'images' no other device uses (devices[0] is that disk)")
    del doc["devices"][0]["options"]  # the first device's own name is its disk then
    doc["devices"][1]["options"] = {"disk": "vm7"}
    with pytest.raises(ConfigError, match=r"devices\[1\]\.options\.disk: got 'vm7'"):
        _load(doc, check=True)
    doc["devices"][1]["options"] = {"disk": "y"}
    assert len(_load(doc, check=True).devices) == 2


def test_two_pools_in_one_directory_are_refused_at_load(tmp_path: os.PathLike[str]) -> None:
    """Before: `check` said OK, and `apply` refused the second pool's name."""
    path = os.path.join(tmp_path, "p")
    doc = _doc(path, {"pool": "images"})
    doc["dedup_pools"].append({"name": "other", "path": path + "/", "capacity": "16M"})
    with pytest.raises(ConfigError) as exc:
        _load(doc, check=True)
    assert str(exc.value).startswith("c.yaml: dedup_pools[1].path: got '")
    assert str(exc.value).endswith("', expected a directory no other pool or library uses "
                                   "(dedup_pools[0].path has it)")



@pytest.mark.parametrize("section,handler", [("pools", "thin"), ("dedup_pools", "dedup")])
def test_a_pool_without_soft_threshold(tmp_path: os.PathLike[str], section: str,
                                       handler: str) -> None:
    """Before: ``soft_threshold: null`` was refused ("expected a percentage 1..100") though a
    pool can have none (pool.json's null, MODE SELECT's disabling). Now the pool is made
    without one, and an existing pool's threshold is taken away; a bad value still names the
    key."""
    from tcmu_py.cli import prepare_handlers
    from tcmu_py.handlers.dedup.store import load_pool_config as dedup_pool_config
    from tcmu_py.handlers.thin.pool import load_pool_config as thin_pool_config

    load_pool = dedup_pool_config if handler == "dedup" else thin_pool_config
    path = os.path.join(tmp_path, "p")

    def doc(soft: object) -> dict[str, Any]:
        return {section: [{"name": "images", "path": path, "capacity": "16M",
                           "soft_threshold": soft}],
                "devices": [{"name": "vm7", "handler": handler, "size": "8M",
                             "pool": "images"}]}

    prepare_handlers(_load(doc(70), check=True))
    assert load_pool(path).soft_threshold == 70
    cfg = _load(doc(None), check=True)
    assert cfg.section(section)[0].soft_threshold is None
    prepare_handlers(cfg)
    assert load_pool(path).soft_threshold is None
    with pytest.raises(ConfigError, match=rf"c.yaml: {section}\[0\].soft_threshold: got 0, "
                       r"expected a percentage 1..100, or null for none"):
        _load(doc(0), check=True)


@pytest.mark.parametrize("section", ["dedup_pools", "pools"])
def test_a_pool_path_that_is_a_file_is_refused_at_load(tmp_path: os.PathLike[str],
                                                       section: str) -> None:
    """Before: `check` said OK, then `apply` and `serve -c` failed making the pool with a bare
    NotADirectoryError traceback."""
    path = os.path.join(tmp_path, "image.img")
    open(path, "w").close()
    handler = "dedup" if section == "dedup_pools" else "thin"
    doc = {section: [{"name": "images", "path": path, "capacity": "16M"}],
           "devices": [{"name": "vm7", "handler": handler, "size": "8M", "pool": "images"}]}
    with pytest.raises(ConfigError) as exc:
        _load(doc, check=True)
    msg = str(exc.value)  # (a long value is shortened in the middle)
    assert msg.startswith(f"c.yaml: {section}[0].path: got '") and msg.endswith(
        "image.img', expected a directory, or a path where one can be made: it is a file")
