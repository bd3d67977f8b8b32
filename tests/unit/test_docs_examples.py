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

import importlib
import re
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcmu_py.handler import Handler

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
