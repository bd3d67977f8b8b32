"""Text tables for people: the one layout of ``tcmu-py status`` and of handlers' tools
(``tcmu-py thin status``). Imports nothing: the status command must start fast."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_size", "render_table"]


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The headers, a rule of dashes, the rows; columns as wide as their widest cell, two
    spaces apart, no trailing blanks."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     .rstrip() for line in lines)


def format_size(n: float) -> str:
    """A byte count (or rate): ``512B``, ``1.5KiB`` ... ``2.0TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"
