"""WindowedAggregate: events to one row per key and event-time window."""

from __future__ import annotations

import functools
import json
from typing import Any, Dict, Iterable, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import PickleCoder
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp

from onceflow import metrics
from onceflow.aggregates import AggregateSpec, Aggregation, check_aggregate_specs, value_fields
from onceflow.deadletter import DeadLetter
from onceflow.events import (
    REASON_BAD_TIMESTAMP, REASON_TOO_LATE, Event, SourceRecord, check_field_names, format_utc_ms, is_whole_number,
)
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
    """Sets each event's timestamp to its event time; sends aside the events
    whose windows no sink can store (:meth:`WindowSpec.fits_calendar`), then the
    too-late ones."""

    def __init__(self, spec: WindowSpec):
        self._spec = spec
        self._timely = metrics.counter(metrics.EVENTS_TIMELY)

    def process(self, event: Event):
        letter = refusal_letter(self._spec, event.record, event.event_id, event.event_time_ms)
        if letter is not None:
            metrics.dead_letter_counter(letter.reason).inc()
            yield pvalue.TaggedOutput(_TOO_LATE, letter)
            return
        self._timely.inc()
        yield window.TimestampedValue(event, event.event_time_ms / 1000.0)


def refusal_letter(spec: WindowSpec, record: SourceRecord, event_id: str, event_time_ms: int) -> Optional[DeadLetter]:
    """The dead letter of an event the aggregation refuses, or None: first an
    event with a window outside the calendar, then a too-late one."""
    if not spec.fits_calendar(event_time_ms):
        return DeadLetter(
            record, STAGE, REASON_BAD_TIMESTAMP, "WindowOutOfRange",
            f"event time {format_utc_ms(event_time_ms)} falls in a window ({spec.describe()}) that starts before "
            "0001-01-01 or ends after 9999-12-31T23:59:59.999Z, which no sink can store",
            event_id, event_time_ms,
        )
    if spec.is_too_late(event_time_ms, record.high_water_ms):
        return too_late_letter(spec, record, event_id, event_time_ms)
    return None


def too_late_letter(spec: WindowSpec, record: SourceRecord, event_id: str, event_time_ms: int) -> DeadLetter:
    """The dead letter of an event the lateness rule refuses (see :mod:`onceflow.windowing`)."""
    closed_at = spec.earliest_window_end(event_time_ms) + spec.allowed_lateness_ms
    return DeadLetter(
        record, STAGE, REASON_TOO_LATE, "TooLate",
        f"event time {format_utc_ms(event_time_ms)} falls in a window that closed at "
        f"{format_utc_ms(closed_at)} (window end + allowed lateness "
        f"{format_duration_ms(spec.allowed_lateness_ms)}); the source had already "
        f"reached {format_utc_ms(record.high_water_ms)}",
        event_id, event_time_ms,
    )


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


class _KeyByKeyAndWindowDoFn(beam.DoFn):
    def __init__(self, spec: WindowSpec, key_fields: Sequence[str], fields: Sequence[str]):
        self._spec = spec
        self._key_fields = tuple(key_fields)
        self._fields = frozenset(fields)  # the value fields the aggregates read

    def process(self, event: Event):
        if len(event.key) != len(self._key_fields) or not event.values.keys() >= self._fields:
            raise ValueError(self._mismatch(event))
        # The key fields as one JSON text: a key with a deterministic coder
        # (text, varint, varint), as state keyed by its bytes needs on Flink/Dataflow.
        key_text = json.dumps(event.key, ensure_ascii=False, separators=(",", ":"))
        for start, end in self._spec.windows_for(event.event_time_ms):
            yield (key_text, start, end), event

    def _mismatch(self, event: Event) -> str:
        if len(event.key) != len(self._key_fields):
            return (f"WindowedAggregate names {len(self._key_fields)} key field(s) {list(self._key_fields)}, and the "
                    f"events are keyed by {len(event.key)}: give it the contract's key_fields, in order")
        missing = sorted(self._fields.difference(event.values))
        return (f"WindowedAggregate's aggregates read {', '.join(missing)}, which the events do not hold: add it to "
                "the EventContract's value_fields")


class _AccumulatePanesDoFn(beam.DoFn):
    """Unbounded input: per (key, window), accumulate in state and emit panes.

    One event-time timer per key and window: at the window end it emits the on-time
    pane and is set again to window end + allowed lateness, when it drops the state
    (by then no event can still arrive for the window: the lateness rule sends it
    to the dead-letter queue first). A single timer cannot fire out of order with
    itself, so the on-time pane is never lost to an early clean-up. Late pane: every
    event that arrives after the on-time pane (each one a newer, more complete
    version of the row). Early panes: with ``early_firing_ms``, a processing-time
    timer while the window is open. Runs in the global window with timers only, so it
    behaves alike on every runner (Beam's own accumulating late panes are not
    reliable on every local runner).
    """

    PANE = ReadModifyWriteStateSpec("pane", PickleCoder())  # (accumulator, emitted_count, on_time_fired)
    WINDOW_TIMER = TimerSpec("window", TimeDomain.WATERMARK)  # window end, then end + lateness
    EARLY = TimerSpec("early", TimeDomain.REAL_TIME)

    def __init__(self, aggregates: Sequence[AggregateSpec], allowed_lateness_ms: int,
                 early_firing_ms: Optional[int]):
        self._aggregation = Aggregation(aggregates)
        self._lateness_ms = allowed_lateness_ms
        self._early_firing_ms = early_firing_ms

    def process(
        self,
        element: Tuple[Tuple[str, int, int], Event],
        pane=beam.DoFn.StateParam(PANE),
        window_timer=beam.DoFn.TimerParam(WINDOW_TIMER),
        early=beam.DoFn.TimerParam(EARLY),
    ):
        key, event = element
        held = pane.read()
        if held is None:
            held = (self._aggregation.create(), 0, False)
            _, _, end_ms = key
            window_timer.set(Timestamp(micros=end_ms * 1000))
            if self._early_firing_ms is not None:
                early.set(Timestamp.now() + Duration(micros=self._early_firing_ms * 1000))
        accumulator, emitted, on_time_fired = held
        self._aggregation.add(accumulator, event.event_time_ms, event.event_id, event.values)
        if on_time_fired:  # a late pane
            pane.write((accumulator, accumulator.count, True))
            yield key, self._aggregation.extract(accumulator)
        else:
            pane.write((accumulator, emitted, False))

    @on_timer(WINDOW_TIMER)
    def on_window_timer(self, key=beam.DoFn.KeyParam, pane=beam.DoFn.StateParam(PANE),
                        window_timer=beam.DoFn.TimerParam(WINDOW_TIMER)):
        held = pane.read()
        if held is None:
            return
        accumulator, _, on_time_fired = held
        if on_time_fired:  # window end + allowed lateness: nothing more can come
            pane.clear()
            return
        _, _, end_ms = key
        if self._lateness_ms > 0:
            pane.write((accumulator, accumulator.count, True))
            window_timer.set(Timestamp(micros=(end_ms + self._lateness_ms) * 1000))
        else:
            pane.clear()
        yield key, self._aggregation.extract(accumulator)

    @on_timer(EARLY)
    def fire_early(self, key=beam.DoFn.KeyParam, pane=beam.DoFn.StateParam(PANE),
                   early=beam.DoFn.TimerParam(EARLY)):
        held = pane.read()
        if held is None or held[2]:
            return  # expired, or the on-time pane has fired: no more early panes
        accumulator, emitted, _ = held
        if accumulator.count > emitted:
            pane.write((accumulator, accumulator.count, False))
            yield key, self._aggregation.extract(accumulator)
        early.set(Timestamp.now() + Duration(micros=self._early_firing_ms * 1000))


class KeyAndWindowToRowDoFn(beam.DoFn):
    """The window was folded into the key: ((key, start, end), columns) to a row."""

    def __init__(self, key_fields: Sequence[str]):
        self._key_fields = tuple(key_fields)
        self._rows = metrics.counter(metrics.ROWS_EMITTED)
        self._emitted = 0  # counted once per bundle: a metric update costs more than the row

    def start_bundle(self) -> None:
        self._emitted = 0

    def process(self, element: Tuple[Tuple[str, int, int], Dict[str, Any]]):
        (key_text, start_ms, end_ms), columns = element
        self._emitted += 1
        yield window_row(self._key_fields, key_text, start_ms, end_ms, columns)

    def finish_bundle(self) -> None:
        if self._emitted:
            self._rows.inc(self._emitted)
            self._emitted = 0


def window_row(key_fields: Sequence[str], key_text: str, start_ms: int, end_ms: int,
               columns: Dict[str, Any]) -> Dict[str, Any]:
    """The row of one key and window: the key fields, the window's bounds, the
    aggregate columns."""
    row: Dict[str, Any] = dict(zip(key_fields, _key_values(key_text)))
    row[WINDOW_START] = start_ms
    row[WINDOW_END] = end_ms
    row.update(columns)
    return row


@functools.lru_cache(maxsize=100_000)  # a key's text repeats in every window of the key
def _key_values(key_text: str) -> Tuple[Any, ...]:
    return tuple(json.loads(key_text))


def check_aggregate_arguments(transform: str, key_fields: Sequence[str], window_spec: WindowSpec,
                              aggregates: Sequence[AggregateSpec], early_firing_ms: Optional[int]) -> None:
    """ValueError unless there are key fields (a sequence of names), a WindowSpec,
    aggregates (AggregateSpec values), and a whole-second early firing interval (in
    ms, an int) or none."""
    check_field_names(key_fields, f"{transform} key_fields")
    if not key_fields:
        raise ValueError(f"{transform} needs at least one key field")
    if not isinstance(window_spec, WindowSpec):
        raise ValueError(f"{transform} takes a WindowSpec, e.g. WindowSpec(60_000), not {window_spec!r}")
    check_aggregate_specs(aggregates, transform)
    if not aggregates:
        raise ValueError(f"{transform} needs at least one aggregate")
    if early_firing_ms is not None and (not is_whole_number(early_firing_ms) or early_firing_ms <= 0
                                        or early_firing_ms % 1000):
        raise ValueError("the early firing interval must be a whole number of seconds, in milliseconds (an int)")


class WindowedAggregate(beam.PTransform):
    """Aggregates events per key in fixed or sliding event-time windows.

    Input: ``PCollection[Event]`` (from :class:`~onceflow.transforms.ParseEvents`),
    bounded or unbounded, in any windowing (it is reset: windows come from event
    times); element timestamps are set here from each event's event time.
    ``key_fields`` only names the key columns: an event's key is what
    :class:`ParseEvents` decoded, so give the contract's key fields, in order.

    Steps: (1) an event that is too late by the rule of :mod:`onceflow.windowing`
    (its earliest window ended ``allowed_lateness`` or more before its source's
    high water) goes to ``dead_letters`` with reason ``too_late`` and is counted;
    nothing reaches Beam's late-data dropping, so nothing vanishes silently. The
    rule needs the record's high water (every onceflow reader sets it): an event
    without one is never refused, and on unbounded input it can arrive after its
    window's state was dropped and start the row again from itself (see
    :class:`~onceflow.transforms.AggregateBatches`).
    (2) With ``dedup`` (the default), repeated event IDs are dropped by
    :class:`~onceflow.transforms.DedupByEventId` with horizon window size + allowed
    lateness. (3) Events are windowed and combined per key.

    Output rows (dicts): the key fields, ``window_start`` and ``window_end`` (epoch
    milliseconds, UTC; the deterministic primary key with the key fields), one
    column per aggregate spec, and ``event_count``, the number of distinct events
    covered, which orders two versions of the same row.

    Windows are those of :class:`~onceflow.windowing.WindowSpec` (the same ones
    Beam's ``FixedWindows``/``SlidingWindows`` assign), folded into the key; the
    grouping runs in the global window. On bounded input (a backfill) a combiner
    emits each row once. On unbounded input a stateful step emits panes, each a
    complete newer version of its row: early panes every ``early_firing_ms`` of
    processing time (optional), the on-time pane when the watermark passes the
    window end, and a late pane for each later event within the allowed lateness.
    Aggregate values do not depend on event order or bundling (see
    :mod:`onceflow.aggregates`), so the final pane of a live run, a restart and a
    backfill agree.

    On Prism 2.77 run unbounded input with ``--experiments=prism_disable_sdf_split``
    (the main job adds it): a bundle split there can lose a state update.

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
        check_aggregate_arguments("WindowedAggregate", key_fields, window_spec, aggregates, early_firing_ms)
        self._key_fields = tuple(key_fields)
        self._spec = window_spec
        self._aggregates = tuple(aggregates)
        self._early_firing_ms = early_firing_ms
        self._dedup = dedup

    def expand(self, events: beam.PCollection) -> Aggregated:
        # Windows come from event times here (see above): a windowing set upstream is reset.
        events = events | "IntoGlobalWindow" >> beam.WindowInto(beam.window.GlobalWindows())
        screened = events | "RejectTooLate" >> beam.ParDo(_RejectTooLateDoFn(self._spec)).with_outputs(
            _TOO_LATE, main="timely"
        )
        timely = screened.timely
        if self._dedup:
            timely = timely | "DedupByEventId" >> DedupByEventId(self._spec.dedup_horizon_ms)
        keyed = timely | "KeyByKeyAndWindow" >> beam.ParDo(_KeyByKeyAndWindowDoFn(
            self._spec, self._key_fields, value_fields(self._aggregates))).with_output_types(
            Tuple[Tuple[str, int, int], Any])
        if timely.is_bounded:
            columns = keyed | "CombinePerKeyAndWindow" >> beam.CombinePerKey(_AggregateCombineFn(self._aggregates))
        else:
            columns = keyed | "AccumulatePerKeyAndWindow" >> beam.ParDo(_AccumulatePanesDoFn(
                self._aggregates, self._spec.allowed_lateness_ms, self._early_firing_ms))
        rows = columns | "ToRows" >> beam.ParDo(KeyAndWindowToRowDoFn(self._key_fields))
        return Aggregated(rows=rows, dead_letters=screened[_TOO_LATE])
