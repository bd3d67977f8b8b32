"""`tcmu-py status`: a readable table of what the daemon serves and how busy it is."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tcmu_py.device.latency import latency_bucket_upper
from tcmu_py.table import format_size, render_table

if TYPE_CHECKING:
    from tcmu_py.handler import Handler

log = logging.getLogger(__name__)


def _state(device: dict[str, Any]) -> str:
    """The state column: unavailable (the handler is being opened again); the handler failed
    to open; open but NOT READY to medium access (why: a standby gateway, a client being
    reconnected); the loop thread stopped serving (it no longer answers); or ok, with how
    many commands the runner's guard had to answer."""
    if device.get("unavailable"):
        return "UNAVAILABLE (retrying): " + device["failed"]
    if device["failed"]:
        return "FAILED: " + device["failed"]
    if device.get("not_ready"):
        return "NOT READY: " + device["not_ready"]
    c = device["counters"]
    if c.get("stopped"):
        return "STOPPED: " + c["stopped"]
    if c.get("failures"):
        return f"ok ({c['failures']} handler failures, see the log)"
    return "ok"


def percentile(hist: list[int], q: float) -> float:
    """The `q` quantile (0 < q <= 1) of a `Counters.latency_hist`, in seconds (the upper edge of
    the bucket it falls in); 0.0 for an empty histogram."""
    total = sum(hist)
    if not total:
        return 0.0
    need = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= need:
            return latency_bucket_upper(i)
    return latency_bucket_upper(len(hist) - 1)


def window(counters: dict[str, Any], earlier: dict[str, Any] | None) -> dict[str, float]:
    """One device's rates between two counter snapshots (`Counters.snapshot`); `earlier` None, or
    a snapshot from before the runner restarted, gives the rates since the runner started.

    Keys: seconds, iops, read_bps, write_bps, mean_s, p99_s, errors.
    """
    if earlier is None or earlier["commands"] > counters["commands"]:
        earlier = {k: 0 for k in counters} | {"latency_hist": [], "uptime": 0.0}
    seconds = max(counters["uptime"] - earlier["uptime"], 1e-9)
    cmds = counters["commands"] - earlier["commands"]
    old = earlier["latency_hist"]
    hist = [n - (old[i] if i < len(old) else 0) for i, n in enumerate(counters["latency_hist"])]
    return {
        "seconds": seconds,
        "iops": cmds / seconds,
        "read_bps": (counters["bytes_read"] - earlier["bytes_read"]) / seconds,
        "write_bps": (counters["bytes_written"] - earlier["bytes_written"]) / seconds,
        "mean_s": (counters["latency_seconds"] - earlier["latency_seconds"]) / cmds
        if cmds
        else 0.0,
        "p99_s": percentile(hist, 0.99),
        "errors": counters["errors"] - earlier["errors"],
    }


def add_windows(status: dict[str, Any], earlier: dict[str, Any] | None) -> None:
    """Set `device["window"]` (see `window`) on every device of `status`, against the same device
    in `earlier` (another `Daemon.status()`, taken before; None: since each device started)."""
    before = {d["name"]: d["counters"] for d in (earlier or {}).get("devices", [])}
    for d in status["devices"]:
        d["window"] = window(d["counters"], before.get(d["name"]))


def _handlers(registry: Mapping[str, type[Handler]] | None,
              status: Mapping[str, Any]) -> list[type[Handler]]:
    """The handlers whose tables the report shows: those of the status's devices and those that
    added entries (``status["handlers"]``); every registered one when the daemon did not say
    (an older daemon). Only these are imported."""
    if registry is None:
        from tcmu_py.handler import load_handlers

        registry = load_handlers()
    wanted = status.get("handlers")
    if isinstance(wanted, list):
        named = {str(x) for x in wanted} | {str(d.get("handler")) for d in status["devices"]}
        subtypes = [s for s in registry if s in named]
    else:
        subtypes = list(registry)
    out = []
    for subtype in subtypes:
        try:
            out.append(registry[subtype])
        except KeyError:  # failed to import: logged by the registry
            continue
    return out


def render_status(status: dict[str, Any] | None, config_path: str | None = None,
                  handlers: Mapping[str, type[Handler]] | None = None) -> str:
    """The status report; `status` is `Daemon.status()` (None: no daemon answered), with
    `add_windows` applied for rates over a window (otherwise rates since each device started).
    After the device table, each handler's `Handler.status_tables` (``handlers``: default every
    registered one), e.g. thin's pools."""
    parts = []
    if status is None:
        parts.append("daemon: not running")
    else:
        parts.append(f"daemon: running (pid {status['pid']})")
        rows = []
        seconds = []
        for d in status["devices"]:
            c = d["counters"]
            w = d.get("window") or window(c, None)
            seconds.append(w["seconds"])
            rows.append(
                [
                    d["name"],
                    d["handler"],
                    d["uio"],
                    format_size(d["size"]),
                    _state(d),
                    str(c["commands"]),
                    str(c["errors"]),
                    f"{w['iops']:.0f}",
                    format_size(w["read_bps"]) + "/s",
                    format_size(w["write_bps"]) + "/s",
                    f"{1000 * w['mean_s']:.2f}",
                    f"{1000 * w['p99_s']:.2f}",
                ]
            )
        for o in status.get("opening", []):  # not served yet: the handler's open runs
            rows.append([o["name"], o["handler"], o["uio"], "-",
                         f"OPENING (for {o['seconds']:.0f} s)", "-", "-", "-", "-", "-", "-",
                         "-"])
        since = (
            f"over the last {min(seconds):.1f} s"
            if any(
                "window" in d and d["window"]["seconds"] < d["counters"]["uptime"]
                for d in status["devices"]
            )
            else "since each device started"
        )
        parts.append(
            render_table(
                [
                    "device",
                    "handler",
                    "uio",
                    "size",
                    "state",
                    "cmds",
                    "errors",
                    "IOPS",
                    "read",
                    "write",
                    "mean ms",
                    "p99 ms",
                ],
                rows,
            )
        )
        if rows:
            parts.append(f"(cmds, errors: total; IOPS, read, write, mean, p99: {since})")
        for handler in _handlers(handlers, status):
            try:
                tables = handler.status_tables(status)
            except Exception:  # a report from another version, or a broken handler
                log.exception("handler %r: status tables failed", handler.subtype)
                continue
            for table in tables:
                parts.append(f"\n{table.title}\n"
                             + table.render())
        for extra in status.get("sections", []):
            parts.append(f"\n{extra['title']}\n" + render_table(extra["headers"], extra["rows"]))
    return "\n".join(parts)
