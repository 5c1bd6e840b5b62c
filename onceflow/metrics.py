"""Names of the Beam metrics onceflow emits, in one place.

Every metric is in the ``onceflow`` namespace, so runners (Flink, Dataflow) and
:mod:`onceflow.pipelines.summary` find them the same way. Which counters are the
input and output of each stage is in :mod:`onceflow.observability.figures`.

Counters and gauges made here are ordinary Beam metrics. Each is also mirrored in
a process-local table (:func:`local_snapshot`) so a local run can show live figures
while a runner that reports metrics only at the end (the DirectRunner's in-process
FnApiRunner) is still running. The mirror holds *attempted* values (a retried
bundle counts twice) and sees only DoFns that run in this process; the final
figures always come from the runner.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, Optional, Tuple

from apache_beam.metrics import Metrics

NAMESPACE = "onceflow"

RECORDS_READ = "records_read"
KAFKA_RECORDS_READ = "kafka_records_read"
RETENTION_GAP_RECORDS = "retention_gap_records"  # records a read should have read, deleted by retention
CONSUMER_LAG = "consumer_lag"  # a gauge per partition: consumer_lag.<topic>.<partition>
EVENTS_PARSED = "events_parsed"
RECORDS_WITHOUT_ID = "records_without_id"  # JSON objects without --id_field (or null): IDs derived from content
DEAD_LETTERS = "dead_letters"  # counted per reason: dead_letters.<reason>
EVENTS_TIMELY = "events_timely"
DUPLICATES_DROPPED = "duplicates_dropped"
EVENTS_UNIQUE = "events_unique"
ROWS_EMITTED = "rows_emitted"
SINK_ROWS_WRITTEN = "sink_rows_written"
SINK_ROWS_STALE = "sink_rows_stale"  # refused by the version guard
SINK_RETRIES = "sink_retries"
DLQ_WRITTEN = "dlq_written"
ARCHIVE_FILES_WRITTEN = "archive_files_written"
WATERMARK_MS = "watermark_ms"  # a gauge: the Kafka reader's event-time watermark (epoch ms)
EVENT_TIME_LAG_MS = "event_time_lag_ms"  # a gauge: wall clock minus that watermark when it was set
SINK_WINDOW_END_MS = "sink_window_end_ms"  # a gauge: the newest window end the sink has written (epoch ms)

# -- the process-local mirror ---------------------------------------------------------

_LOCK = threading.Lock()
_LOCAL_COUNTERS: Dict[str, int] = {}
_LOCAL_GAUGES: Dict[str, Tuple[int, float]] = {}


def local_snapshot() -> Tuple[Dict[str, int], Dict[str, Tuple[int, float]]]:
    """Copies of the mirrored counters and gauges (value, time set in epoch seconds)
    of this process, summed over every pipeline it has run."""
    with _LOCK:
        return dict(_LOCAL_COUNTERS), dict(_LOCAL_GAUGES)


class _Counter:
    """A Beam counter that also counts in the process-local mirror."""

    def __init__(self, name: str):
        self._name = name
        self._counter = Metrics.counter(NAMESPACE, name)

    def inc(self, n: int = 1) -> None:
        self._counter.inc(n)
        with _LOCK:
            _LOCAL_COUNTERS[self._name] = _LOCAL_COUNTERS.get(self._name, 0) + n

    def dec(self, n: int = 1) -> None:
        self.inc(-n)


class _Gauge:
    """A Beam gauge that also sets the process-local mirror."""

    def __init__(self, name: str):
        self._name = name
        self._gauge = Metrics.gauge(NAMESPACE, name)

    def set(self, value: int) -> None:
        self._gauge.set(value)
        with _LOCK:
            _LOCAL_GAUGES[self._name] = (int(value), time.time())


def counter(name: str) -> _Counter:
    return _Counter(name)


def dead_letter_counter(reason: str) -> _Counter:
    return _Counter(f"{DEAD_LETTERS}.{reason}")


def gauge(name: str) -> _Gauge:
    return _Gauge(name)


def consumer_lag_gauge(topic: str, partition: int) -> _Gauge:
    """``consumer_lag.<topic>.<partition>``: records between the reader's position
    and the partition's end offset (its backlog)."""
    return _Gauge(f"{CONSUMER_LAG}.{topic}.{partition}")


class SinkWindowEnd:
    """``sink_window_end_ms`` of one sink writer: the newest window end it has
    written (a late pane of an old window does not lower it; a window before 1970
    has a negative end). Now minus it is how far behind the sink's results are."""

    def __init__(self) -> None:
        self._newest: Optional[int] = None

    def record(self, window_end_ms: int) -> None:
        if self._newest is None or window_end_ms > self._newest:
            self._newest = window_end_ms
        gauge(SINK_WINDOW_END_MS).set(self._newest)


def record_watermark(watermark_ms: Optional[int]) -> None:
    """Sets ``watermark_ms`` and ``event_time_lag_ms`` (now minus the watermark);
    nothing while a reader has no watermark yet."""
    if watermark_ms is None:
        return
    gauge(WATERMARK_MS).set(watermark_ms)
    gauge(EVENT_TIME_LAG_MS).set(int(time.time() * 1000) - int(watermark_ms))
