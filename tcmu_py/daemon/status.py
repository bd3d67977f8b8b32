"""`tcmu-py status`: a readable table of what the daemon serves and how busy it is."""

from __future__ import annotations

from typing import Any


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def render_status(status: dict[str, Any] | None, config_path: str | None = None) -> str:
    """The status report; `status` is `Daemon.status()` (None: no daemon answered)."""
    parts = []
    if status is None:
        parts.append("daemon: not running")
    else:
        parts.append(f"daemon: running (pid {status['pid']})")
        rows = []
        for d in status["devices"]:
            c = d["counters"]
            uptime = max(c.get("uptime", 0.0), 1e-9)
            mean_ms = 1000 * c["latency_seconds"] / c["commands"] if c["commands"] else 0.0
            rows.append(
                [
                    d["name"],
                    d["handler"],
                    d["uio"],
                    _size(d["size"]),
                    "FAILED: " + d["failed"] if d["failed"] else "ok",
                    str(c["commands"]),
                    f"{c['commands'] / uptime:.0f}",
                    _size(c["bytes_read"]),
                    _size(c["bytes_written"]),
                    str(c["errors"]),
                    f"{mean_ms:.2f}",
                ]
            )
        parts.append(
            _table(
                [
                    "device",
                    "handler",
                    "uio",
                    "size",
                    "state",
                    "cmds",
                    "cmds/s",
                    "read",
                    "written",
                    "errors",
                    "mean ms",
                ],
                rows,
            )
        )
        pool_rows = []
        for pool in status.get("pools", []):
            pct = 100 * pool["used"] / pool["capacity"] if pool["capacity"] else 0.0
            threshold = pool["soft_threshold"]
            pool_rows.append(
                [
                    pool["name"],
                    pool["path"],
                    _size(pool["capacity"]),
                    _size(pool["used"]),
                    f"{pct:.1f}%",
                    "-" if threshold is None else f"{threshold}%",
                    "ABOVE" if pool["above_threshold"] else "ok",
                    ", ".join(f"{d['name']}={_size(d['used'])}" for d in pool["disks"]),
                ]
            )
        if pool_rows:
            parts.append(
                "\nthin pools\n"
                + _table(
                    ["pool", "path", "capacity", "used", "used%", "soft", "state", "disks"],
                    pool_rows,
                )
            )
        for extra in status.get("sections", []):
            parts.append(f"\n{extra['title']}\n" + _table(extra["headers"], extra["rows"]))
    return "\n".join(parts)
