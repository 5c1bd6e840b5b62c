"""WindowedAggregate: events to one row per key and event-time window."""

from __future__ import annotations

from typing import Any, Dict, Iterable, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.transforms import trigger, window
from apache_beam.utils.timestamp import Duration

from onceflow import metrics
from onceflow.aggregates import AggregateSpec, Aggregation
from onceflow.deadletter import DeadLetter
from onceflow.events import REASON_TOO_LATE, Event, format_utc_ms
from onceflow.rows import WINDOW_END, WINDOW_START
from onceflow.transforms.dedup import DedupByEventId
from onceflow.windowing import WindowSpec, format_duration_ms

STAGE = "aggregate"
_TOO_LATE = "too_late"



class Aggregated(NamedTuple):
    """The outputs of :class:`WindowedAggregate`."""

    rows: beam.PCollection  # PCollection[dict]
    dead_letters: beam.PCollection  # PCollection[DeadLetter]


class _RejectTooLateDoFn(beam.DoFn):
    """Sets each event's timestamp to its event time; sends too-late ones aside."""

    def __init__(self, spec: WindowSpec):
        self._spec = spec
        self._timely = metrics.counter(metrics.EVENTS_TIMELY)
        self._too_late = metrics.dead_letter_counter(REASON_TOO_LATE)

    def process(self, event: Event):
        high_water_ms = event.record.high_water_ms
        if self._spec.is_too_late(event.event_time_ms, high_water_ms):
            self._too_late.inc()
            closed_at = self._spec.earliest_window_end(event.event_time_ms) + self._spec.allowed_lateness_ms
            yield pvalue.TaggedOutput(_TOO_LATE, DeadLetter(
                event.record, STAGE, REASON_TOO_LATE, "TooLate",
                f"event time {format_utc_ms(event.event_time_ms)} falls in a window that closed at "
                f"{format_utc_ms(closed_at)} (window end + allowed lateness "
                f"{format_duration_ms(self._spec.allowed_lateness_ms)}); the source had already "
                f"reached {format_utc_ms(high_water_ms)}",
                event.event_id, event.event_time_ms,
            ))
            return
        self._timely.inc()
        yield window.TimestampedValue(event, event.event_time_ms / 1000.0)


class _AggregateCombineFn(beam.CombineFn):
    def __init__(self, specs: Sequence[AggregateSpec]):
        self._aggregation = Aggregation(specs)

    def create_accumulator(self):
        return self._aggregation.create()

    def add_input(self, accumulator, event: Event):
        return self._aggregation.add(accumulator, event.event_time_ms, event.event_id, event.values)

    def merge_accumulators(self, accumulators: Iterable[Any]):
        return self._aggregation.merge(accumulators)

    def extract_output(self, accumulator) -> Dict[str, Any]:
        return self._aggregation.extract(accumulator)


def _to_row(key_fields: Sequence[str], key: Tuple[str, ...], start_ms: int, end_ms: int,
            columns: Dict[str, Any]) -> Dict[str, Any]:
    row: Dict[str, Any] = dict(zip(key_fields, key))
    row[WINDOW_START] = start_ms
    row[WINDOW_END] = end_ms
    row.update(columns)
    return row


class _ToRowDoFn(beam.DoFn):
    """Streaming path: the window comes from Beam's windowing."""

    def __init__(self, key_fields: Sequence[str]):
        self._key_fields = tuple(key_fields)
        self._rows = metrics.counter(metrics.ROWS_EMITTED)

    def process(self, element: Tuple[Tuple[str, ...], Dict[str, Any]], win=beam.DoFn.WindowParam):
        key, columns = element
        self._rows.inc()
        yield _to_row(self._key_fields, key, win.start.micros // 1000, win.end.micros // 1000, columns)


class _KeyByKeyAndWindowDoFn(beam.DoFn):
    def __init__(self, spec: WindowSpec):
        self._spec = spec

    def process(self, event: Event):
        for start, end in self._spec.windows_for(event.event_time_ms):
            yield (event.key, start, end), event


class _KeyAndWindowToRowDoFn(beam.DoFn):
    """Bounded path: the window was folded into the key."""

    def __init__(self, key_fields: Sequence[str]):
        self._key_fields = tuple(key_fields)
        self._rows = metrics.counter(metrics.ROWS_EMITTED)

    def process(self, element: Tuple[Tuple[Tuple[str, ...], int, int], Dict[str, Any]]):
        (key, start_ms, end_ms), columns = element
        self._rows.inc()
        yield _to_row(self._key_fields, key, start_ms, end_ms, columns)


def _key_of(event: Event) -> Tuple[Tuple[str, ...], Event]:
    return event.key, event


class WindowedAggregate(beam.PTransform):
    """Aggregates events per key in fixed or sliding event-time windows.

    Input: ``PCollection[Event]`` (from :class:`~onceflow.transforms.ParseEvents`),
    bounded or unbounded, in any windowing; element timestamps are set here from
    each event's event time.

    Steps: (1) an event that is too late by the rule of :mod:`onceflow.windowing`
    (its earliest window ended ``allowed_lateness`` or more before its source's
    high water) goes to ``dead_letters`` with reason ``too_late`` and is counted;
    nothing reaches Beam's late-data dropping, so nothing vanishes silently.
    (2) With ``dedup`` (the default), repeated event IDs are dropped by
    :class:`~onceflow.transforms.DedupByEventId` with horizon window size + allowed
    lateness. (3) Events are windowed and combined per key.

    Output rows (dicts): the key fields, ``window_start`` and ``window_end`` (epoch
    milliseconds, UTC; the deterministic primary key with the key fields), one
    column per aggregate spec, and ``event_count``, the number of distinct events
    covered, which orders two versions of the same row. Panes accumulate, so every
    pane is a complete newer version of its row: on a streaming runner the on-time
    pane fires when the watermark passes the window end, optional early panes every
    ``early_firing_ms`` of processing time, and a late pane for each late event
    within the allowed lateness. In batch each row is emitted once.

    On bounded input (a backfill) there are no panes to fire: the window is
    folded into the key (the windows of :class:`~onceflow.windowing.WindowSpec`,
    the same ones Beam assigns) and combined in the global window, which is several
    times faster on local runners and gives the same rows as the final pane of a
    live run. Aggregate values do not depend on event order or bundling (see
    :mod:`onceflow.aggregates`), so a live run, a restart and a backfill agree.

    Metrics: ``events_timely``, ``dead_letters.too_late``, ``duplicates_dropped``,
    ``events_unique``, ``rows_emitted``.
    """

    def __init__(
        self,
        key_fields: Sequence[str],
        window_spec: WindowSpec,
        aggregates: Sequence[AggregateSpec],
        early_firing_ms: Optional[int] = None,
        dedup: bool = True,
    ):
        super().__init__()
        if not key_fields:
            raise ValueError("WindowedAggregate needs at least one key field")
        if not aggregates:
            raise ValueError("WindowedAggregate needs at least one aggregate")
        if early_firing_ms is not None and (early_firing_ms <= 0 or early_firing_ms % 1000):
            raise ValueError("the early firing interval must be a whole number of seconds")
        self._key_fields = tuple(key_fields)
        self._spec = window_spec
        self._aggregates = tuple(aggregates)
        self._early_firing_ms = early_firing_ms
        self._dedup = dedup

    def _window_fn(self):
        if self._spec.is_sliding:
            return window.SlidingWindows(self._spec.size_ms / 1000.0, self._spec.step_ms / 1000.0)
        return window.FixedWindows(self._spec.size_ms / 1000.0)

    def _trigger(self):
        early = None
        if self._early_firing_ms is not None:
            early = trigger.AfterProcessingTime(self._early_firing_ms // 1000)
        return trigger.AfterWatermark(early=early, late=trigger.AfterCount(1))

    def expand(self, events: beam.PCollection) -> Aggregated:
        screened = events | "RejectTooLate" >> beam.ParDo(_RejectTooLateDoFn(self._spec)).with_outputs(
            _TOO_LATE, main="timely"
        )
        timely = screened.timely
        if self._dedup:
            timely = timely | "DedupByEventId" >> DedupByEventId(self._spec.dedup_horizon_ms)
        if timely.is_bounded:
            rows = (
                timely
                | "KeyByKeyAndWindow" >> beam.ParDo(_KeyByKeyAndWindowDoFn(self._spec)).with_output_types(
                    Tuple[Tuple[Tuple[str, ...], int, int], Any])
                | "CombinePerKeyAndWindow" >> beam.CombinePerKey(_AggregateCombineFn(self._aggregates))
                | "ToRows" >> beam.ParDo(_KeyAndWindowToRowDoFn(self._key_fields))
            )
            return Aggregated(rows=rows, dead_letters=screened[_TOO_LATE])
        rows = (
            timely
            | "IntoEventTimeWindows" >> beam.WindowInto(
                self._window_fn(),
                trigger=self._trigger(),
                accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
                allowed_lateness=Duration(micros=self._spec.allowed_lateness_ms * 1000),
            )
            | "KeyByKeyFields" >> beam.Map(_key_of).with_output_types(Tuple[Tuple[str, ...], Any])
            | "CombinePerKeyAndWindow" >> beam.CombinePerKey(_AggregateCombineFn(self._aggregates))
            | "ToRows" >> beam.ParDo(_ToRowDoFn(self._key_fields))
        )
        return Aggregated(rows=rows, dead_letters=screened[_TOO_LATE])
