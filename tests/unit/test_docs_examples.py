"""The documentation cannot drift from the code.

- docs/handlers.md: every code block marked ``<!-- quote: FILE -->`` is FILE's text, verbatim
  (the tutorial's handler is tests/plugin_example, the one the tests install and run); every
  block marked ``<!-- run -->`` runs, each of its ``test_*`` functions called; every API name it
  mentions (a backticked dotted name from ``tcmu_py.``, or a CamelCase name of the handler API)
  exists.
- docs/configuration.md: its key tables list exactly the keys the loader accepts (found by
  asking the loader: an unknown key's error lists the allowed ones), its defaults are the
  loader's; examples/*.yaml pass the real ``tcmu-py check``.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tcmu_py.configspec import Defaults
from tcmu_py.daemon.config import load_config_text
from tcmu_py.errors import ConfigError
from tcmu_py.handler import Handler, load_handlers

ROOT = Path(__file__).resolve().parents[2]
HANDLERS_MD = ROOT / "docs" / "handlers.md"
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
EXAMPLES = ROOT / "examples"
PLUGIN = ROOT / "tests" / "plugin_example" / "tcmu_py_plugin_example.py"

plugin = pytest.importorskip(
    "tcmu_py_plugin_example",
    reason="tests/plugin_example is not installed (scripts/bootstrap.sh installs it)",
)

# A marker comment, then a fenced block: (marker, language, body).
_BLOCK = re.compile(r"<!-- (?P<marker>[^>]*?) -->\n```(?P<lang>\w*)\n(?P<body>.*?)\n```", re.S)


def blocks(text: str) -> Iterator[tuple[str, str, str]]:
    for m in _BLOCK.finditer(text):
        yield m["marker"].strip(), m["lang"], m["body"]


# --------------------------------------------------------------------------- docs/handlers.md


def test_tutorial_quotes_are_the_plugin_verbatim() -> None:
    text = HANDLERS_MD.read_text()
    quoted: dict[str, list[str]] = {}
    for marker, lang, body in blocks(text):
        if marker.startswith("quote:"):
            quoted.setdefault(marker.removeprefix("quote:").strip(), []).append(body)
            assert lang in ("python", "toml"), marker
    # Every ```python block of the tutorial is either quoted from a file or run.
    marked = {m.start("body") for m in _BLOCK.finditer(text)}
    for m in re.finditer(r"```python\n", text):
        assert m.end() in marked, f"handlers.md: unmarked python block at offset {m.start()}"
    assert set(quoted) == {"tests/plugin_example/tcmu_py_plugin_example.py",
                           "tests/plugin_example/pyproject.toml"}
    for rel, bodies in quoted.items():
        source = (ROOT / rel).read_text()
        for body in bodies:
            assert body in source, f"handlers.md quotes text not in {rel}:\n{body}"
    # The quotes cover the whole handler: every top-level definition and Handler method.
    code = "\n".join(quoted["tests/plugin_example/tcmu_py_plugin_example.py"])
    for m in re.finditer(r"^(?:class|def|    def) (\w+)", PLUGIN.read_text(), re.M):
        assert re.search(rf"^(?:class|def|    def) {m[1]}\b", code, re.M), m[1]


def test_tutorial_test_code_runs() -> None:
    runs = [body for marker, lang, body in blocks(HANDLERS_MD.read_text()) if marker == "run"]
    assert runs, "handlers.md has no <!-- run --> block"
    called = []
    for i, body in enumerate(runs):
        module = types.ModuleType(f"handlers_md_run_{i}")
        exec(compile(body, f"docs/handlers.md <!-- run --> block {i}", "exec"),  # noqa: S102
             module.__dict__)
        for name, fn in list(module.__dict__.items()):
            if name.startswith("test_") and callable(fn):
                fn()
                called.append(name)
    assert {"test_conformance", "test_through_the_ring",
            "test_an_unkept_promise_is_caught"} <= set(called)


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            # A class attribute declared by annotation only (Handler.subtype) exists too.
            if not hasattr(obj, attr) and attr in getattr(obj, "__annotations__", {}):
                return obj.__annotations__[attr]
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


#: Where the tutorial's unqualified CamelCase names come from.
_API_HOMES = ("builtins", "tcmu_py.handler", "tcmu_py.backend", "tcmu_py.testing",
              "tcmu_py.configspec", "tcmu_py.device.block", "tcmu_py.errors",
              "tcmu_py_plugin_example")


def test_tutorial_api_names_exist() -> None:
    text = HANDLERS_MD.read_text()
    prose = _BLOCK.sub("", text)
    qualified = set(re.findall(r"`(tcmu_py(?:\.\w+)+)`", prose))
    assert len(qualified) > 40
    missing = []
    for name in sorted(qualified):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    bare = set(re.findall(r"`([A-Z][a-z]\w*(?:\.\w+)?)`", prose))
    for name in sorted(bare):
        head, _, attr = name.partition(".")
        homes = [importlib.import_module(h) for h in _API_HOMES]
        owner = next((h for h in homes if hasattr(h, head)), None)
        if owner is None or (attr and not hasattr(getattr(owner, head), attr)):
            missing.append(name)
    assert not missing, f"handlers.md names what does not exist: {missing}"
    # The contract table lists every public member of Handler.
    members = {n for n in vars(Handler) if not n.startswith("_")} - {"subtype"}
    table = text.split("## 8. The contract at a glance", 1)[1]
    for n in members:
        assert f"`{n}" in table, n


# --------------------------------------------------------------------------- docs/configuration.md


def key_tables(text: str) -> list[dict[str, str]]:
    """Every row of every table whose first column is ``Key``: {column header: cell}."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "Key":
            header = cells
        elif header is not None and cells[0].startswith("`"):
            assert len(cells) == len(header), line
            row = dict(zip(header, cells, strict=True))
            row["Key"] = row["Key"].strip("`")
            rows.append(row)
    return rows


def _builtin_registry() -> dict[str, type[Handler]]:
    """The built-in handlers only: a third-party one installed here (tests/plugin_example's
    ``ramdisks``) owns keys of its own, documented with it."""
    registry = load_handlers()
    return {name: registry[name] for name in registry
            if registry[name].__module__.startswith("tcmu_py.handlers.")}


_CHAP = {"userid": "u1", "password": "secret-0001"}
#: A valid file holding at least one of every mapping the loader walks, for `_allowed_keys`.
_PROBE_BASE: dict[str, Any] = {
    "state_dir": "/srv/t",
    "defaults": {"block_size": 512},
    "devices": [{"name": "d0", "handler": "raw", "size": "1M",
                 "options": {"path": "/srv/t/d0.img"}}],
    "pools": [{"name": "p0", "path": "/srv/t/p0", "capacity": "1G"}],
    "dedup_pools": [{"name": "dp0", "path": "/srv/t/dp0", "capacity": "1G"}],
    "libraries": [{"name": "lib0", "changer": "ch0", "slots": 4, "media_dir": "/srv/t/lib0",
                   "drives": [{"name": "t0", "model": "IBM-LTO8"}]}],
    "exports": {
        "loopback": [{"device": "d0"}],
        "iscsi": [{"iqn": "iqn.2025-01.org.example:t", "luns": [{"device": "d0"}],
                   "chap": dict(_CHAP),
                   "acls": [{"initiator": "iqn.2025-01.org.example:i", "luns": ["d0"],
                             "chap": dict(_CHAP, password="secret-0002")}],
                   "attributes": {"login_timeout": 15}}],
        "srp": [{"port": "0000:00ff:fe00:7701", "rdma_cm_port": 5555,
                 "luns": [{"device": "d0"}],
                 "acls": [{"initiator": "192.168.77.1", "luns": ["d0"]}]}],
        "fc": [{"wwpn": "naa.2000020000007701", "luns": [{"device": "d0"}],
                "acls": [{"initiator": "naa.2000020000007702", "luns": ["d0"]}]}],
        "usb": [{"wwn": "naa.6001405c0ffee0b1", "udc": "dummy_udc.0",
                 "luns": [{"device": "d0"}]}],
    },
}


def _allowed_keys(path: str) -> set[str]:
    """The keys the loader accepts in the mapping at `path` (``exports.iscsi[].chap``; "" the
    top level), as it says itself: an unknown key's error lists the allowed ones."""
    doc = copy.deepcopy(_PROBE_BASE)
    node: Any = doc
    for part in filter(None, re.split(r"\.|(\[\])", path)):
        node = node[0] if part == "[]" else node[part]
    node["zz_probe"] = 1
    try:
        load_config_text(yaml.safe_dump(doc), "probe.yaml", registry=_builtin_registry())
    except ConfigError as exc:
        for line in str(exc).splitlines():
            m = re.fullmatch(r"probe\.yaml: (?:(.*)\.)?zz_probe: got 1, expected one of the keys"
                             r" (.*) \(unknown key\)", line)
            if m and re.sub(r"\[\d+\]", "[]", m[1] or "") == path:
                return set(m[2].split(", "))
        raise AssertionError(f"probe of {path!r}: {exc}") from None
    raise AssertionError(f"the loader accepted an unknown key in {path!r}")


def test_probe_base_is_valid() -> None:
    load_config_text(yaml.safe_dump(_PROBE_BASE), "base.yaml", registry=_builtin_registry())


def test_configuration_documents_exactly_the_keys_the_loader_accepts() -> None:
    rows = key_tables(CONFIGURATION_MD.read_text())
    documented = {r["Key"] for r in rows if "Handler" not in r}
    assert len(documented) == len(
        [r for r in rows if "Handler" not in r]), "a key documented twice"
    # Every mapping the doc documents (and the top level) is probed; by induction a mapping the
    # loader adds shows up as an undocumented key of its parent.
    containers = [""] + [r["Key"] + ("[]" if r["Type"].startswith("list of mappings") else "")
                         for r in rows if "mapping" in r["Type"] and "Handler" not in r
                         and r["Key"] != "devices[].options"]
    accepted: set[str] = set()
    for path in containers:
        accepted |= {f"{path}.{k}" if path else k for k in _allowed_keys(path)}
    # devices[].options: raw's keys come from the loader, the others' from their handler.
    assert _allowed_keys_of_options("raw") == {"path"}
    assert accepted - documented == set(), "keys the loader accepts but the doc omits"
    assert documented - accepted == set(), "keys the doc lists but the loader refuses"


def _allowed_keys_of_options(handler: str) -> set[str]:
    if handler == "raw":
        doc = copy.deepcopy(_PROBE_BASE)
        doc["devices"][0]["options"]["zz_probe"] = 1
        try:
            load_config_text(yaml.safe_dump(doc), "probe.yaml", registry=_builtin_registry())
        except ConfigError as exc:
            m = re.search(r"devices\[0\]\.options\.zz_probe: got 1, expected one of the keys"
                          r" (.*) \(unknown key\)", str(exc))
            assert m, exc
            return set(m[1].split(", "))
        raise AssertionError("raw accepted an unknown option")
    try:
        _builtin_registry()[handler].check_config("zz_probe=1")
    except ConfigError as exc:
        m = re.search(r"unknown key 'zz_probe'; expected one of \[(.*)\]", str(exc))
        assert m, exc
        return {k.strip("' ") for k in m[1].split(",")}
    return set()  # accepts anything: ignores its options (null)


def test_configuration_documents_each_handlers_options() -> None:
    rows = [r for r in key_tables(CONFIGURATION_MD.read_text()) if "Handler" in r]
    by_handler: dict[str, set[str]] = {}
    for r in rows:
        assert r["Key"].startswith("devices[].options."), r
        by_handler.setdefault(r["Handler"].strip("`"), set()).add(
            r["Key"].removeprefix("devices[].options."))
    assert set(by_handler) | {"null"} == set(_builtin_registry())
    for handler, keys in by_handler.items():
        assert keys == _allowed_keys_of_options(handler), handler
    assert _allowed_keys_of_options("null") == set()  # "null ignores its options"


def test_configuration_defaults_are_the_loaders() -> None:
    rows = {r["Key"]: r for r in key_tables(CONFIGURATION_MD.read_text())}
    base = Defaults()
    for name in base.__dataclass_fields__:
        doc = rows[f"defaults.{name}"]["Default"].strip("`")
        assert doc == str(getattr(base, name)).lower(), name
        # A device's own key defaults to the file's defaults.
        assert rows[f"devices[].{name}"]["Default"] == f"`defaults.{name}`"
    cfg = load_config_text("{}", "empty.yaml")
    assert rows["state_dir"]["Default"] == f"`{cfg.state_dir}`"


# --------------------------------------------------------------------------- examples/*.yaml

_DOCUMENTED_EXAMPLES = ("default.yaml", "thin-pool.yaml", "dedup-pool.yaml",
                        "tape-library.yaml", "iscsi-chap-acl.yaml")


def run_check(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command line: the venv's interpreter running ``tcmu-py check -c``."""
    return subprocess.run([sys.executable, "-m", "tcmu_py.cli", "check", "-c", str(config)],
                          cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_every_example_is_documented() -> None:
    names = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert names == sorted(_DOCUMENTED_EXAMPLES)
    text = CONFIGURATION_MD.read_text()
    for name in names:
        assert f"(../examples/{name})" in text, name


@pytest.mark.parametrize("name", _DOCUMENTED_EXAMPLES)
def test_example_passes_tcmu_py_check(name: str, tmp_path: Path) -> None:
    """`tcmu-py check` needs no state (it creates nothing; pools and libraries are made by
    apply), so the examples are checked as they are, state under /var/lib/tcmu-py. On a host
    where that directory exists (an installed tcmu-py), its state would be read too: the
    example is then checked as a copy with its state under tmp_path."""
    example = EXAMPLES / name
    text = example.read_text()
    assert "/var/lib/tcmu-py" in text
    for path in re.findall(r"(?m)(?:state_dir|path|media_dir):\s+(\S+)", text):
        assert path.startswith("/var/lib/tcmu-py"), (name, path)
    config = Path("examples") / name  # as a user types it in the checkout
    if os.path.exists("/var/lib/tcmu-py"):
        config = tmp_path / name
        config.write_text(text.replace("/var/lib/tcmu-py", str(tmp_path / "state")))
    r = run_check(config, ROOT)
    devices = len(load_config_text(text, name).devices)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"{config}: OK ({devices} device(s))\n"


def test_default_example_is_the_embedded_default() -> None:
    embedded = ROOT / "tcmu_py" / "daemon" / "default.yaml"
    assert (EXAMPLES / "default.yaml").read_text() == embedded.read_text()


def test_documented_error_output(tmp_path: Path) -> None:
    """The error example of configuration.md is what `tcmu-py check` prints, byte for byte."""
    text = CONFIGURATION_MD.read_text()
    files = {m.removeprefix("config:").strip(): body
             for m, _, body in blocks(text) if m.startswith("config:")}
    outputs = {m.removeprefix("check output:").strip(): body
               for m, _, body in blocks(text) if m.startswith("check output:")}
    assert files and set(files) == set(outputs)
    for name, body in files.items():
        (tmp_path / name).write_text(body + "\n")
        r = run_check(Path(name), tmp_path)
        command, *expected = outputs[name].splitlines()
        assert command == f"$ tcmu-py check -c {name}"
        assert r.returncode == 2
        assert r.stdout == ""
        assert r.stderr.splitlines() == expected
