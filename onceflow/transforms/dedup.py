"""DedupByEventId: drop repeated events by their stable event ID."""

from __future__ import annotations

from typing import Any, Tuple

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from onceflow import metrics
from onceflow.events import Event


class _FirstCopyDoFn(beam.DoFn):
    """Per event ID: emit the first copy, remember the ID until the watermark
    passes ``event_time + horizon``, then forget it (an event-time timer)."""

    REMEMBERED_UNTIL = ReadModifyWriteStateSpec("remembered_until_ms", VarIntCoder())
    FORGET = TimerSpec("forget", TimeDomain.WATERMARK)

    def __init__(self, horizon_ms: int):
        self._horizon_ms = horizon_ms
        self._duplicates = metrics.counter(metrics.DUPLICATES_DROPPED)
        self._unique = metrics.counter(metrics.EVENTS_UNIQUE)

    def process(
        self,
        element: Tuple[str, Event],
        remembered=beam.DoFn.StateParam(REMEMBERED_UNTIL),
        forget=beam.DoFn.TimerParam(FORGET),
    ):
        _, event = element
        if remembered.read() is not None:
            self._duplicates.inc()
            return
        until_ms = event.event_time_ms + self._horizon_ms
        remembered.write(until_ms)
        forget.set(Timestamp(micros=until_ms * 1000))
        self._unique.inc()
        yield event

    @on_timer(FORGET)
    def forget_id(self, remembered=beam.DoFn.StateParam(REMEMBERED_UNTIL)):
        remembered.clear()


class DedupByEventId(beam.PTransform):
    """Keeps the first copy of each event ID and drops the rest.

    Input: ``PCollection[Event]`` whose element timestamps are the event times,
    bounded or unbounded. It is re-windowed into the global window, so copies in
    different event-time windows or panes are still recognised as duplicates.
    Output: ``PCollection[Event]`` in the global window, one element per ID.

    Horizon: an ID is remembered until the watermark passes
    ``event_time + horizon``. :class:`~onceflow.transforms.WindowedAggregate` sets
    ``horizon = window size + allowed lateness`` and rejects too-late events
    *before* this step, so every copy that can still be counted arrives while its ID
    is remembered: no event is counted twice. Copies of an ID with different event
    times are the producer's error; the first one seen wins.

    State: on unbounded input, one small value per ID inside the horizon
    (event-time timers only, so it runs on Prism, Flink and Dataflow alike; on
    Prism 2.77 only with ``--experiments=prism_disable_sdf_split``, or a bundle
    split can lose a state update: see docs/torture.md). On
    bounded input (a backfill) every copy is present, so a combiner keeps one copy
    per ID instead, with element timestamps reset to the event time: the same
    result without per-ID state. Delivery stays at-least-once across runs: a replay
    starts with empty state, and the idempotent sink absorbs it.

    Metrics: ``duplicates_dropped``, ``events_unique``.
    """

    def __init__(self, horizon_ms: int):
        super().__init__()
        if not isinstance(horizon_ms, int) or horizon_ms <= 0:
            raise ValueError("the dedup horizon must be a positive number of milliseconds")
        self._horizon_ms = horizon_ms

    def expand(self, events: beam.PCollection) -> beam.PCollection:
        keyed = (
            events
            | "IntoGlobalWindow" >> beam.WindowInto(window.GlobalWindows())
            | "KeyByEventId" >> beam.Map(_key_by_event_id).with_output_types(Tuple[str, Any])
        )
        if events.is_bounded:
            # All copies are in the input: a combiner keeps one, with no per-ID
            # state or timers (which local runners handle slowly).
            return (
                keyed
                | "KeepOneCopy" >> beam.CombinePerKey(_OneCopyCombineFn())
                | "EmitKeptCopy" >> beam.ParDo(_EmitKeptCopyDoFn())
            )
        return keyed | "KeepFirstCopy" >> beam.ParDo(_FirstCopyDoFn(self._horizon_ms))


def _key_by_event_id(event: Event) -> Tuple[str, Event]:
    return event.event_id, event


def _copy_order(event: Event) -> Tuple[str, int, int, bytes]:
    """Where the copy sits in its source (file and line, or topic, partition and
    offset; the earliest is the one a live read sees first), then its raw bytes
    (for records with no position)."""
    source = event.record.source or {}
    origin = source.get("file") or source.get("topic") or ""
    partition = source.get("partition")
    index = source.get("line", source.get("offset"))
    return (str(origin), partition if isinstance(partition, int) else -1, index if isinstance(index, int) else -1,
            event.record.value)


class _OneCopyCombineFn(beam.CombineFn):
    """Bounded input: of all copies of an ID, keep one (the same one whatever the
    order: the first in its source, as a live read keeps, then the least raw
    bytes) and count them."""

    def create_accumulator(self):
        return 0, None

    def add_input(self, accumulator, event: Event):
        copies, kept = accumulator
        if kept is None or _copy_order(event) < _copy_order(kept):
            kept = event
        return copies + 1, kept

    def merge_accumulators(self, accumulators):
        copies, kept = 0, None
        for more, candidate in accumulators:
            copies += more
            if candidate is not None and (kept is None or _copy_order(candidate) < _copy_order(kept)):
                kept = candidate
        return copies, kept

    def extract_output(self, accumulator):
        return accumulator


class _EmitKeptCopyDoFn(beam.DoFn):
    def __init__(self):
        self._duplicates = metrics.counter(metrics.DUPLICATES_DROPPED)
        self._unique = metrics.counter(metrics.EVENTS_UNIQUE)

    def process(self, element: Tuple[str, Tuple[int, Event]]):
        _, (copies, event) = element
        self._duplicates.inc(copies - 1)
        self._unique.inc()
        yield window.TimestampedValue(event, event.event_time_ms / 1000.0)
