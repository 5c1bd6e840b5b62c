"""Snapshots of a run's ``onceflow`` metrics, from the runner or from this process.

What each runner reports while a pipeline runs (Beam 2.77, measured here):

- **Prism**: ``GetJobMetrics`` answers while the job runs. *Committed* values sum
  the finished bundles; *attempted* values are those of the latest bundle, in
  progress included (so a batch job in a single bundle shows attempted values
  only, and a streaming job's attempted counters go up and down). Live figures
  take the greater of the two. Beam's ``PipelineResult.metrics()`` caches its
  first answer for good, so :func:`read_result` asks the job service afresh.
- **Beam's Flink job server** (2.62): nothing until the job is done.
- **The DirectRunner on bounded input** (the in-process FnApiRunner):
  ``pipeline.run()`` itself blocks until the end, so there is no result to ask.

Where the runner says nothing yet, the process-local mirror of
:mod:`onceflow.metrics` stands in: attempted values of the DoFns that run in this
process (the FnApiRunner's in-memory workers, a LOOPBACK environment on Prism or
Flink). Final figures always come from the runner.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, Mapping, Optional, Tuple

from apache_beam.metrics.metric import MetricsFilter

from onceflow import metrics

ATTEMPTED = "attempted"
COMMITTED = "committed"
LOCAL = "local"  # the in-process mirror (attempted values)
NO_FIGURES = "none"  # none at the end, and none counted here: the workers were other processes


@dataclasses.dataclass(frozen=True)
class MetricsSnapshot:
    """The ``onceflow`` counters (summed over steps) and gauges (the latest value
    over steps, with the epoch second it was set) at ``taken_at`` (epoch seconds).
    ``values`` says where they come from: committed, attempted or local."""

    taken_at: float
    counters: Mapping[str, int]
    gauges: Mapping[str, Tuple[int, float]] = dataclasses.field(default_factory=dict)
    values: str = ATTEMPTED

    def count(self, name: str) -> int:
        return int(self.counters.get(name, 0))

    def gauge(self, name: str) -> Optional[int]:
        found = self.gauges.get(name)
        return None if found is None else found[0]

    def is_empty(self) -> bool:
        return not self.counters and not self.gauges


def snapshot_from_query(query: Mapping, taken_at: float, prefer_committed: bool) -> MetricsSnapshot:
    """A snapshot from ``MetricResults.query(...)``.

    Final figures (``prefer_committed``): each counter's committed value where the
    runner reports one, its attempted value otherwise. Live figures: the greater of
    the two, because runners disagree on what *attempted* means while running:
    cumulative on Dataflow and the FnApiRunner, but on Prism in streaming only the
    latest bundle's (its committed value is the cumulative one). A gauge is the
    newer of its committed and attempted values.
    """
    counters: Dict[str, int] = {}
    used_committed = True
    for result in query.get("counters", ()):
        committed, attempted = result.committed, result.attempted
        if prefer_committed:
            value = committed
            if value is None:
                value, used_committed = attempted, False
        else:
            value = max(int(committed or 0), int(attempted or 0))
        name = result.key.metric.name
        counters[name] = counters.get(name, 0) + int(value or 0)
    gauges: Dict[str, Tuple[int, float]] = {}
    for result in query.get("gauges", ()):
        candidates = [(_seconds(r.timestamp), rank, r.value) for rank, r in enumerate((result.attempted, result.committed))
                      if r is not None and r.value is not None]
        if not candidates:
            continue
        stamp, _, value = max(candidates)  # the newer; the committed one on a tie
        name = result.key.metric.name
        held = gauges.get(name)
        if held is None or stamp >= held[1]:
            gauges[name] = (int(value), stamp)
    values = COMMITTED if (prefer_committed and used_committed and counters) else ATTEMPTED
    return MetricsSnapshot(taken_at, counters, gauges, values)


def _seconds(timestamp) -> float:
    if timestamp is None:
        return 0.0
    if hasattr(timestamp, "micros"):  # a Beam Timestamp
        return timestamp.micros / 1e6
    if hasattr(timestamp, "timestamp"):  # a datetime
        return float(timestamp.timestamp())
    return float(timestamp)


METRICS_TIMEOUT_S = 10.0  # how long the monitor waits for a runner's metrics


def fresh_metrics(result):
    """``result.metrics()``, asked again of a portable job service (Prism, Flink)
    rather than Beam's cached first answer, within ``METRICS_TIMEOUT_S``: a runner
    that stopped answering held the monitor's thread with no timeout, and the
    status line and ``/healthz`` froze at their last figures."""
    service, job_id = getattr(result, "_job_service", None), getattr(result, "_job_id", None)
    if service is not None and job_id is not None:
        from apache_beam.portability.api import beam_job_api_pb2
        from apache_beam.runners.portability.portable_runner import PortableMetrics

        request = beam_job_api_pb2.GetJobMetricsRequest(job_id=job_id)
        return PortableMetrics(service.GetJobMetrics(request, timeout=METRICS_TIMEOUT_S))
    return result.metrics()


def read_result(result, prefer_committed: bool = False, clock=time.time) -> MetricsSnapshot:
    """The ``onceflow`` metrics a runner reports for ``result`` now."""
    query = fresh_metrics(result).query(MetricsFilter().with_namespace(metrics.NAMESPACE))
    return snapshot_from_query(query, clock(), prefer_committed)


class LocalMetricsSource:
    """The process-local mirror, counted from when this source was made."""

    def __init__(self, clock=time.time):
        self._clock = clock
        self._since = clock()
        self._baseline, _ = metrics.local_snapshot()

    def snapshot(self) -> MetricsSnapshot:
        counters, gauges = metrics.local_snapshot()
        delta = {name: value - self._baseline.get(name, 0) for name, value in counters.items()}
        return MetricsSnapshot(
            self._clock(),
            {name: value for name, value in delta.items() if value},
            {name: held for name, held in gauges.items() if held[1] >= self._since},
            LOCAL,
        )
