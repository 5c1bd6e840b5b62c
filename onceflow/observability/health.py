"""Health of a running pipeline: thresholds, ``/healthz`` and ``/metrics``.

:func:`evaluate_health` is pure: figures and thresholds in, a verdict and the
figures behind it out. :class:`HealthServer` serves it with the standard
library's HTTP server in a daemon thread, bound to 127.0.0.1 only:

- ``GET /healthz``: JSON; status 200 when every check passes (or before the first
  figures), 503 when one fails.
- ``GET /metrics``: Prometheus text format: every ``onceflow`` Beam counter and
  gauge mirrored (``onceflow_<name>_total``, ``onceflow_dead_letters_total{reason}``,
  ``onceflow_consumer_lag{topic,partition}``), plus derived gauges (total lag,
  watermark age, DLQ rate, per-stage rates, health).
"""

from __future__ import annotations

import dataclasses
import datetime
import http.server
import json
import logging
import re
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from onceflow import metrics
from onceflow.observability.figures import Figures, consumer_lag

_LOGGER = logging.getLogger(__name__)
HOST = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class HealthThresholds:
    """Upper bounds; None leaves a figure unchecked.

    ``max_lag``: total consumer lag in records. ``max_dlq_rate``: the fraction of
    records read over the last minute that went to the DLQ (0.01 = 1%).
    ``max_watermark_age_s``: now minus the reader's event-time watermark.
    ``max_sink_lag_s``: now minus the newest window end the sink has written
    (unchecked before the first write).
    ``max_retention_gap_records``: records the reader should have read but
    retention had deleted (0: any gap is unhealthy, for the rest of the run: the
    loss is permanent and someone must look).
    ``max_figures_age_s``: how old the figures may be (the runner has not answered
    since): a hung runner froze them at their last values, which kept passing every
    check however far the job fell behind.
    ``max_lag_age_s``: how old the consumer lag may be (a live job's reader has not
    run since): a reader no longer scheduled froze its lag, often at 0.
    """

    max_lag: Optional[int] = None
    max_dlq_rate: Optional[float] = None
    max_watermark_age_s: Optional[float] = None
    max_sink_lag_s: Optional[float] = None
    max_retention_gap_records: Optional[int] = 0
    max_figures_age_s: Optional[float] = None
    max_lag_age_s: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class HealthReport:
    healthy: bool
    body: Dict[str, Any]

    @property
    def http_status(self) -> int:
        return 200 if self.healthy else 503


def _check(value, limit) -> Dict[str, Any]:
    ok = value is None or limit is None or value <= limit
    return {"value": value, "max": limit, "ok": ok}


def figures_json(figures: Figures) -> Dict[str, Any]:
    """The figures as JSON-ready data (used by /healthz)."""
    return {
        "elapsed_s": round(figures.elapsed_s, 3),
        "values": figures.values,
        "stages": {s.name: {"step": s.step, "in": s.count_in, "out": s.count_out,
                            "in_per_s": round(s.in_per_s, 3), "out_per_s": round(s.out_per_s, 3)}
                   for s in figures.stages},
        "records_read": figures.records_read,
        "dead_letters": figures.dead_letters,
        "dead_letters_by_reason": figures.dead_letters_by_reason,
        "duplicates_dropped": figures.duplicates_dropped,
        "too_late": figures.too_late,
        "consumer_lag": [{"topic": t, "partition": p, "lag": lag} for (t, p), lag in figures.consumer_lag.items()],
        "consumer_lag_total": figures.total_lag,
        "consumer_lag_age_s": None if figures.lag_age_s is None else round(figures.lag_age_s, 3),
        "watermark_ms": figures.watermark_ms,
        "sink_window_end_ms": figures.sink_window_end_ms,
        "sink_lag_s": None if figures.sink_lag_s is None else round(figures.sink_lag_s, 3),
    }


def evaluate_health(figures: Optional[Figures], thresholds: HealthThresholds,
                    now: Optional[float] = None) -> HealthReport:
    """Healthy when every checked figure is at or under its threshold. Before the
    first figures the status is ``starting`` (healthy: the job is coming up).
    ``now`` (default: the clock) dates the figures for ``max_figures_age_s``."""
    if figures is None:
        return HealthReport(True, {"status": "starting", "healthy": True, "checks": {}})
    age = figures.watermark_age_s
    checks = {
        "consumer_lag": _check(figures.total_lag, thresholds.max_lag),
        "dlq_rate": _check(None if figures.dlq_rate is None else round(figures.dlq_rate, 6),
                           thresholds.max_dlq_rate),
        "watermark_age_s": _check(None if age is None else round(age, 3), thresholds.max_watermark_age_s),
        "sink_lag_s": _check(None if figures.sink_lag_s is None else round(figures.sink_lag_s, 3),
                             thresholds.max_sink_lag_s),
        "retention_gap_records": _check(int(figures.counters.get(metrics.RETENTION_GAP_RECORDS, 0)),
                                        thresholds.max_retention_gap_records),
    }
    if thresholds.max_figures_age_s is not None:
        figures_age = (time.time() if now is None else now) - figures.taken_at
        checks["figures_age_s"] = _check(round(figures_age, 3), thresholds.max_figures_age_s)
    if thresholds.max_lag_age_s is not None:
        lag_age = figures.lag_age_s
        checks["consumer_lag_age_s"] = _check(None if lag_age is None else round(lag_age, 3),
                                              thresholds.max_lag_age_s)
    healthy = all(check["ok"] for check in checks.values())
    as_of = datetime.datetime.fromtimestamp(figures.taken_at, datetime.timezone.utc)
    return HealthReport(healthy, {
        "status": "ok" if healthy else "unhealthy",
        "healthy": healthy,
        "as_of": as_of.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "checks": checks,
        "figures": figures_json(figures),
    })


# -- Prometheus ------------------------------------------------------------------------

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def _metric_name(name: str) -> str:
    return "onceflow_" + _INVALID.sub("_", name)


class BeamMetricsCollector(Collector):
    """Mirrors the latest figures' Beam metrics into Prometheus families at scrape time."""

    def __init__(self, figures: Callable[[], Optional[Figures]], thresholds: HealthThresholds,
                 clock: Callable[[], float] = time.time):
        self._figures = figures
        self._thresholds = thresholds
        self._clock = clock

    def collect(self) -> Iterator:
        figures = self._figures()
        healthy = GaugeMetricFamily("onceflow_healthy", "1 when /healthz passes, else 0")
        healthy.add_metric([], 1 if evaluate_health(figures, self._thresholds, self._clock()).healthy else 0)
        yield healthy
        if figures is None:
            return
        prefix = metrics.DEAD_LETTERS + "."
        dead = CounterMetricFamily("onceflow_dead_letters", "Dead letters by reason", labels=["reason"])
        for name, value in sorted(figures.counters.items()):
            if name.startswith(prefix):
                dead.add_metric([name[len(prefix):]], value)
            else:
                family = CounterMetricFamily(_metric_name(name), f"Beam counter {metrics.NAMESPACE}:{name}")
                family.add_metric([], value)
                yield family
        yield dead
        lag = GaugeMetricFamily("onceflow_consumer_lag", "Records between the reader and the partition end",
                                labels=["topic", "partition"])
        for (topic, partition), value in consumer_lag(figures.gauges).items():
            lag.add_metric([topic, str(partition)], value)
        yield lag
        lag_prefix = metrics.CONSUMER_LAG + "."
        for name, (value, _) in sorted(figures.gauges.items()):
            if not name.startswith(lag_prefix):
                family = GaugeMetricFamily(_metric_name(name), f"Beam gauge {metrics.NAMESPACE}:{name}")
                family.add_metric([], value)
                yield family
        if figures.total_lag is not None:
            family = GaugeMetricFamily("onceflow_consumer_lag_total", "Consumer lag summed over partitions")
            family.add_metric([], figures.total_lag)
            yield family
        if figures.watermark_age_s is not None:
            family = GaugeMetricFamily("onceflow_watermark_age_seconds", "Now minus the event-time watermark")
            family.add_metric([], figures.watermark_age_s)
            yield family
        if figures.sink_lag_s is not None:
            family = GaugeMetricFamily("onceflow_sink_lag_seconds", "Now minus the newest window end written")
            family.add_metric([], figures.sink_lag_s)
            yield family
        if figures.dlq_rate is not None:
            family = GaugeMetricFamily("onceflow_dlq_rate", "Dead letters per record read, last minute")
            family.add_metric([], figures.dlq_rate)
            yield family
        rates = GaugeMetricFamily("onceflow_stage_input_per_second", "Elements into each stage per second",
                                  labels=["stage"])
        for stage in figures.stages:
            rates.add_metric([stage.name], stage.in_per_s)
        yield rates


class HealthServer:
    """``/healthz`` and ``/metrics`` on ``127.0.0.1:port`` (0: a free port; see
    :attr:`port`), served from ``figures()`` in a daemon thread."""

    def __init__(self, figures: Callable[[], Optional[Figures]], thresholds: HealthThresholds, port: int = 0,
                 clock: Callable[[], float] = time.time):
        self._figures = figures
        self._thresholds = thresholds
        self._clock = clock
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(BeamMetricsCollector(figures, thresholds, clock))
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    report = evaluate_health(server._figures(), server._thresholds, server._clock())
                    self._send(report.http_status, "application/json",
                               (json.dumps(report.body, sort_keys=True) + "\n").encode())
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(server._registry))
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /healthz or /metrics\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args) -> None:  # noqa: A002 (the stdlib's signature)
                _LOGGER.debug("health endpoint: " + format, *args)

        self._httpd = http.server.ThreadingHTTPServer((HOST, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="onceflow-health", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
