"""Per-stage counts and rates, lag, DLQ rate and watermark age, from snapshots.

Pure: :meth:`Figures.of` takes snapshots (oldest first) and computes everything
the status line, the health check and ``/metrics`` show.

Each stage's input and output are counters that already exist (summed; a name
ending in ``.*`` sums every counter with that prefix), so Flink and Dataflow show
the same figures under the same step names.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Tuple

from onceflow import metrics
from onceflow.events import REASON_TOO_LATE
from onceflow.observability.snapshot import MetricsSnapshot

DEAD_LETTERS_ALL = metrics.DEAD_LETTERS + ".*"
TOO_LATE = f"{metrics.DEAD_LETTERS}.{REASON_TOO_LATE}"


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage of the pipeline: its short name, its step label and the counters
    that count what goes in and what comes out."""

    name: str
    step: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    unit: str = "events"


STAGES: Tuple[Stage, ...] = (
    Stage("read", "ReadKafka", (), (metrics.KAFKA_RECORDS_READ,), "records"),
    Stage("parse", "AggregateEvents/ScreenAndSplit", (metrics.RECORDS_READ,), (metrics.EVENTS_PARSED,), "records"),
    Stage("dedup", "AggregateEvents/AggregatePerShardWindow", (metrics.EVENTS_TIMELY,), (metrics.EVENTS_UNIQUE,)),
    Stage("aggregate", "AggregateEvents", (metrics.EVENTS_TIMELY, TOO_LATE), (metrics.ROWS_EMITTED,)),
    Stage("sink", "WriteRows", (metrics.SINK_ROWS_WRITTEN, metrics.SINK_ROWS_STALE), (metrics.SINK_ROWS_WRITTEN,),
          "rows"),
    Stage("dlq", "WriteDeadLetters", (DEAD_LETTERS_ALL,), (metrics.DLQ_WRITTEN,), "dead letters"),
)


def total(counters: Mapping[str, int], names: Sequence[str]) -> int:
    """The sum of the named counters; ``prefix.*`` sums every ``prefix.<x>``."""
    found = 0
    for name in names:
        if name.endswith(".*"):
            prefix = name[:-1]
            found += sum(v for k, v in counters.items() if k.startswith(prefix))
        else:
            found += counters.get(name, 0)
    return int(found)


def dead_letters_by_reason(counters: Mapping[str, int]) -> Dict[str, int]:
    prefix = metrics.DEAD_LETTERS + "."
    return {name[len(prefix):]: int(value) for name, value in sorted(counters.items())
            if name.startswith(prefix) and value}


def consumer_lag(gauges: Mapping[str, Tuple[int, float]]) -> Dict[Tuple[str, int], int]:
    """``consumer_lag.<topic>.<partition>`` gauges as ``{(topic, partition): lag}``
    (topic names may contain dots; the partition is after the last one)."""
    prefix = metrics.CONSUMER_LAG + "."
    found: Dict[Tuple[str, int], int] = {}
    for name, (value, _) in gauges.items():
        if not name.startswith(prefix):
            continue
        topic, _, partition = name[len(prefix):].rpartition(".")
        if topic and partition.isdigit():
            found[(topic, int(partition))] = int(value)
    return dict(sorted(found.items()))


def lag_reported_at(gauges: Mapping[str, Tuple[int, float]]) -> Optional[float]:
    """When the partition reported least recently set its ``consumer_lag`` gauge
    (epoch seconds); None without such a gauge or when the runner gives gauges no
    time. A reader sets every partition's gauge at the end of each of its bundles."""
    prefix = metrics.CONSUMER_LAG + "."
    stamps = [stamp for name, (_, stamp) in gauges.items() if name.startswith(prefix)]
    return min(stamps) if stamps and min(stamps) > 0 else None


@dataclasses.dataclass(frozen=True)
class StageFigures:
    name: str
    step: str
    unit: str
    count_in: int
    count_out: int
    in_per_s: float
    out_per_s: float


@dataclasses.dataclass(frozen=True)
class Figures:
    """What a run looks like at ``taken_at`` (epoch seconds)."""

    taken_at: float
    elapsed_s: float
    values: str
    stages: Tuple[StageFigures, ...]
    records_read: int
    dead_letters: int
    dead_letters_by_reason: Dict[str, int]
    dead_letters_per_s: float
    dlq_rate: Optional[float]  # dead letters / records read over the DLQ window; None: nothing read
    duplicates_dropped: int
    too_late: int
    consumer_lag: Dict[Tuple[str, int], int]
    watermark_ms: Optional[int]
    counters: Mapping[str, int]
    gauges: Mapping[str, Tuple[int, float]]
    sink_window_end_ms: Optional[int] = None  # the newest window end the sink has written
    lag_reported_at: Optional[float] = None  # see lag_reported_at()

    @property
    def lag_age_s(self) -> Optional[float]:
        """How old the consumer lag is: now minus the time its least recently
        reported partition was reported; None without a time. A live reader reports
        every few seconds, so an old lag is one the reader no longer updates (it is
        not being run), and its value, often 0, says nothing of the records since."""
        if self.lag_reported_at is None:
            return None
        return max(0.0, self.taken_at - self.lag_reported_at)

    @property
    def sink_lag_s(self) -> Optional[float]:
        """How far behind the sink's results are: now minus the newest window end
        written (0 when an early-fired window ends in the future); None before the
        first write. Unlike the consumer lag, it also counts the records a runner
        holds (read and committed, not yet aggregated and written)."""
        if self.sink_window_end_ms is None:
            return None
        return max(0.0, self.taken_at - self.sink_window_end_ms / 1000.0)

    @property
    def total_lag(self) -> Optional[int]:
        """Total consumer lag over partitions; None when no reader reports one."""
        return sum(self.consumer_lag.values()) if self.consumer_lag else None

    @property
    def watermark_age_s(self) -> Optional[float]:
        """Event-time lag: now minus the reader's watermark; None without one."""
        if self.watermark_ms is None:
            return None
        return self.taken_at - self.watermark_ms / 1000.0

    def stage(self, name: str) -> Optional[StageFigures]:
        for stage in self.stages:
            if stage.name == name:
                return stage
        return None

    @classmethod
    def of(cls, history: Sequence[MetricsSnapshot], started_at: float, rate_window_s: float = 5.0,
           dlq_window_s: float = 60.0) -> "Figures":
        """Figures at the last snapshot of ``history`` (oldest first). Rates are over
        the last ``rate_window_s`` (from ``started_at`` and zero counts when the history
        is shorter); the DLQ rate over the last ``dlq_window_s``."""
        if not history:
            raise ValueError("no snapshot to compute figures from")
        now = history[-1]
        rate_base = _base(history, now.taken_at - rate_window_s, started_at)
        dlq_base = _base(history, now.taken_at - dlq_window_s, started_at)

        def per_s(names: Sequence[str], base: Tuple[float, Mapping[str, int]]) -> float:
            seconds = now.taken_at - base[0]
            if seconds <= 0:
                return 0.0
            return max(0.0, (total(now.counters, names) - total(base[1], names)) / seconds)

        stages = []
        for stage in STAGES:
            count_in, count_out = total(now.counters, stage.inputs), total(now.counters, stage.outputs)
            if not count_in and not count_out and stage.name in ("read", "dlq"):
                continue  # files are read without a counter of their own; no dead letters yet
            stages.append(StageFigures(stage.name, stage.step, stage.unit, count_in, count_out,
                                       per_s(stage.inputs, rate_base) if stage.inputs else per_s(stage.outputs, rate_base),
                                       per_s(stage.outputs, rate_base)))
        read_delta = total(now.counters, (metrics.RECORDS_READ,)) - total(dlq_base[1], (metrics.RECORDS_READ,))
        dead_delta = total(now.counters, (DEAD_LETTERS_ALL,)) - total(dlq_base[1], (DEAD_LETTERS_ALL,))
        by_reason = dead_letters_by_reason(now.counters)
        return cls(
            taken_at=now.taken_at,
            elapsed_s=max(0.0, now.taken_at - started_at),
            values=now.values,
            stages=tuple(stages),
            records_read=now.count(metrics.RECORDS_READ),
            dead_letters=sum(by_reason.values()),
            dead_letters_by_reason=by_reason,
            dead_letters_per_s=per_s((DEAD_LETTERS_ALL,), rate_base),
            dlq_rate=(max(0, dead_delta) / read_delta) if read_delta > 0 else None,
            duplicates_dropped=now.count(metrics.DUPLICATES_DROPPED),
            too_late=now.count(TOO_LATE),
            consumer_lag=consumer_lag(now.gauges),
            watermark_ms=now.gauge(metrics.WATERMARK_MS),
            counters=dict(now.counters),
            gauges=dict(now.gauges),
            sink_window_end_ms=now.gauge(metrics.SINK_WINDOW_END_MS),
            lag_reported_at=lag_reported_at(now.gauges),
        )


def _base(history: Sequence[MetricsSnapshot], since: float, started_at: float) -> Tuple[float, Mapping[str, int]]:
    """What rates are measured from: the start of the run (zero counts) when it is
    younger than the window or there is a single snapshot; otherwise the newest
    snapshot at or before ``since`` (the oldest kept, when none is that old)."""
    if len(history) < 2 or since <= started_at:
        return started_at, {}
    chosen = history[0]
    for snapshot in history[:-1]:
        if snapshot.taken_at > since:
            break
        chosen = snapshot
    return chosen.taken_at, chosen.counters
