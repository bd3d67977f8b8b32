"""docs/internals.md matches the code: every ``tcmu_py.<dotted name>`` it writes in backticks
imports (the longest importable module prefix, then attributes)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "internals.md"


def dotted_names(text: str) -> list[str]:
    """``tcmu_py.x.y`` names inside inline code spans and fenced blocks."""
    names = []
    for span in re.findall(r"```.*?```|`[^`\n]+`", text, re.S):
        names += re.findall(r"\btcmu_py(?:\.[A-Za-z_]\w*)+", span)
    return sorted(set(names))


def resolve(name: str) -> object:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_every_dotted_name_in_internals_resolves() -> None:
    names = dotted_names(DOC.read_text(encoding="utf-8"))
    assert len(names) > 20  # the doc does name the code
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{name}: {exc}")
    assert missing == []


def test_the_checker_catches_a_name_that_does_not_exist() -> None:
    assert dotted_names("see `tcmu_py.scsi.constants.Asc` and `tcmu_py.ring.Ring`") == [
        "tcmu_py.ring.Ring", "tcmu_py.scsi.constants.Asc"]
    resolve("tcmu_py.ring.Ring")
    try:
        resolve("tcmu_py.scsi.constants.Asc")
    except AttributeError:
        return
    raise AssertionError("tcmu_py.scsi.constants.Asc resolved")
