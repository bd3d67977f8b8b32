"""`tcmu-py serve --metrics ADDR:PORT`: the daemon's figures in Prometheus' text format.

Contract:

- Off unless asked for. The endpoint needs the ``metrics`` extra (`prometheus_client`); asked
  for without it, `serve` stops before serving with a one-line error naming the extra.
- Nothing is kept twice: every scrape reads `Daemon.status()` (the same snapshot `tcmu-py
  status` gets) and turns it into metric families, so the endpoint can never disagree with the
  status command, and scrapes cost the data path nothing between them.
- Per device (labels ``device``, ``handler``): commands, reads, writes, bytes each way, commands
  answered with CHECK CONDITION, commands aborted by the initiator, handler failures answered by
  the runner's guard, a latency histogram, size, and whether the device serves.
- Each handler adds its own gauges (`Handler.metrics`): thin and dedup pools' capacity and use,
  a tape library's slots and drives.
- The HTTP server runs on its own daemon thread; a slow or hostile scraper holds only that
  thread. `MetricsServer.close()` stops it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tcmu_py.device.latency import latency_bucket_upper
from tcmu_py.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from tcmu_py.handler import Gauge, Handler

log = logging.getLogger("tcmu_py.daemon")

#: The histogram's ``le`` edges: every fourth bucket of `Counters.latency_hist` (a doubling), from
#: 1 µs up; finer edges would give a scraper 128 series per device for little use.
_EDGE_STEP = 4

#: What a scrape reads: `Daemon.status()` and the classes of the handlers it names.
Snapshot = tuple[Mapping[str, Any], Mapping[str, "type[Handler]"]]

_DEVICE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("commands", "tcmu_py_commands", "SCSI commands completed"),
    ("reads", "tcmu_py_read_commands", "READ commands completed"),
    ("writes", "tcmu_py_write_commands", "WRITE commands completed"),
    ("bytes_read", "tcmu_py_read_bytes", "bytes returned to initiators"),
    ("bytes_written", "tcmu_py_written_bytes", "bytes received from initiators"),
    ("errors", "tcmu_py_check_conditions", "commands answered with CHECK CONDITION"),
    ("aborted", "tcmu_py_aborted_commands", "commands aborted by a task management request"),
    ("failures", "tcmu_py_handler_failures",
     "commands the handler raised an unexpected exception for (answered by the runner)"),
)


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6]:PORT`` for IPv6, ``:PORT`` for every address) -> (addr, port).
    Raises ConfigError naming the option and what was expected."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(
            f"--metrics: {text!r} is not ADDR:PORT (e.g. 127.0.0.1:9571, [::1]:9571, :9571)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def _histogram(hist: Sequence[int], total_seconds: float) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` buckets from a `Counters.latency_hist`, and the sum."""
    buckets: list[tuple[str, float]] = []
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if i % _EDGE_STEP == 0 and i < len(hist) - 1:
            buckets.append((repr(latency_bucket_upper(i)), float(seen)))
    buckets.append(("+Inf", float(seen)))
    return buckets, total_seconds


def families(status: Mapping[str, Any],
             handlers: Mapping[str, type[Handler]]) -> Iterator[Metric]:
    """The metric families of one `Daemon.status()`; `handlers` are the served subtypes' classes
    (their `Handler.metrics` add gauges). A handler whose `metrics` raises is logged and left
    out; the device figures are still given."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    labels = ["device", "handler"]
    counters = {key: CounterMetricFamily(name, text, labels=labels)
                for key, name, text in _DEVICE_COUNTERS}
    latency = HistogramMetricFamily(
        "tcmu_py_command_latency_seconds",
        "time from dequeue to completion of each command", labels=labels)
    size = GaugeMetricFamily("tcmu_py_device_size_bytes", "device capacity", labels=labels)
    up = GaugeMetricFamily(
        "tcmu_py_device_up", "1 while the device serves; 0 if it failed to open, answers "
        "medium access NOT READY (a standby gateway) or its loop stopped", labels=labels)
    for device in status.get("devices", []):
        values = [str(device.get("name", "")), str(device.get("handler", ""))]
        c = device.get("counters") or {}
        for key, family in counters.items():
            family.add_metric(values, float(c.get(key, 0)))
        buckets, total = _histogram(c.get("latency_hist", []), float(c.get("latency_seconds", 0)))
        latency.add_metric(values, buckets, total)
        size.add_metric(values, float(device.get("size", 0)))
        up.add_metric(values, 0.0 if device.get("failed") or device.get("not_ready")
                      or c.get("stopped") else 1.0)
    yield from counters.values()
    yield latency
    yield size
    yield up
    yield from _handler_families(status, handlers)


def _handler_families(status: Mapping[str, Any],
                      handlers: Mapping[str, type[Handler]]) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    merged: dict[str, GaugeMetricFamily] = {}
    label_names: dict[str, tuple[str, ...]] = {}
    for subtype, handler in handlers.items():
        try:
            gauges: list[Gauge] = list(handler.metrics(status))
        except Exception:  # one handler's figures must not take the endpoint down
            log.exception("handler %r: metrics failed", subtype)
            continue
        for g in gauges:
            names = tuple(g.labels)
            family = merged.get(g.name)
            if family is None:
                family = merged[g.name] = GaugeMetricFamily(g.name, g.help, labels=list(names))
                label_names[g.name] = names
            elif label_names[g.name] != names:
                log.error("handler %r: gauge %s with labels %s, already given with %s; ignored",
                          subtype, g.name, names, label_names[g.name])
                continue
            family.add_metric([str(g.labels[n]) for n in names], float(g.value))
    yield from merged.values()


class MetricsServer:
    """The endpoint: an HTTP server on (addr, port) answering ``GET /metrics`` (any path, as
    prometheus_client does) from `snapshot()` at each scrape: the daemon's status and the
    handler classes of the subtypes in it. Port 0 picks a free port (see `address`)."""

    def __init__(self, addr: str, port: int, snapshot: Callable[[], Snapshot]) -> None:
        try:
            from prometheus_client import start_http_server
            from prometheus_client.registry import CollectorRegistry
        except ImportError as exc:
            raise ConfigError(
                "--metrics needs prometheus_client: pip install 'tcmu-py[metrics]'") from exc

        class _Collector:
            def collect(self) -> Iterator[Metric]:
                return families(*snapshot())

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector())  # type: ignore[arg-type]
        try:
            self._httpd, self._thread = start_http_server(port, addr, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"--metrics: cannot listen on {addr}:{port}: {exc.strerror or exc}") from exc
        self.address: tuple[str, int] = self._httpd.server_address[:2]  # type: ignore[assignment]
        self._closed = threading.Event()
        log.info("metrics: serving on http://%s:%d/metrics", *self.address)

    def close(self) -> None:
        """Stop answering and close the socket (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
