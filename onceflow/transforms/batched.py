"""AggregateBatches: record batches to windowed rows, a micro-batch at a time.

The batched twin of ``ParseEvents | WindowedAggregate``: the same rows and dead
letters, with Beam's per-element cost paid per batch instead of per record. See
:class:`AggregateBatches` for what it guarantees.
"""

from __future__ import annotations

import json
import zlib
from itertools import chain
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import FastPrimitivesCoder, PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

import onceflow.coders  # noqa: F401  (registers RecordBatchCoder for the batches this module outputs)
from onceflow import metrics
from onceflow.aggregates import AggregateSpec, Aggregation, check_aggregate_specs, value_fields
from onceflow.batches import RecordBatch, Verdicts, batch_from_records, relax_gc, take, taker
from onceflow.deadletter import DeadLetter
from onceflow.events import (
    EventContract, SourceRecord, check_time_source, is_whole_number, require_contract, require_source_record,
)
from onceflow.transforms.aggregate import (
    Aggregated, check_aggregate_arguments, refusal_letter, window_row,
)
from onceflow.transforms.parse import STAGE as PARSE_STAGE
from onceflow.windowing import WindowSpec

DEFAULT_SHARDS = 8
_DEAD_LETTERS = "dead_letters"
_KEY_CACHE_LIMIT = 100_000

# A shard window: (shard, window start, window end). Its sub-batch: the events of
# one batch that fall in it, as columns: key texts, event IDs, event times, and
# one column per value field of the aggregation (Aggregation.fields), in order.
ShardWindow = Tuple[int, int, int]
SubBatch = Tuple[List[str], List[str], List[int], Tuple[List[Any], ...]]


class _ScreenAndSplitDoFn(beam.DoFn):
    """Per batch: refused records and too-late events to the dead-letter output,
    every other event into the sub-batch of its (key shard, window)."""

    def __init__(self, spec: WindowSpec, shards: int, fields: Sequence[str]):
        self._spec = spec
        self._shards = shards
        self._fields = tuple(fields)
        self._read = metrics.counter(metrics.RECORDS_READ)
        self._parsed = metrics.counter(metrics.EVENTS_PARSED)
        self._timely = metrics.counter(metrics.EVENTS_TIMELY)

    def setup(self) -> None:
        relax_gc()
        # key (the key field's text, or the tuple of them) -> key text, shard
        self._key_texts: Dict[Any, str] = {}
        self._key_shards: Dict[Any, int] = {}

    def process(self, batch: RecordBatch) -> Iterator[Any]:
        if batch.verdicts is None:
            raise ValueError("AggregateBatches needs batches decoded with the event contract")
        groups, letters, parsed, timely = self._split(batch)
        self._read.inc(len(batch.values))
        self._parsed.inc(parsed)
        self._timely.inc(timely)
        for letter in letters:
            metrics.dead_letter_counter(letter.reason).inc()
            yield pvalue.TaggedOutput(_DEAD_LETTERS, letter)
        yield from groups.items()

    def _split(self, batch: RecordBatch) -> Tuple[Dict[ShardWindow, SubBatch], List[DeadLetter], int, int]:
        spec = self._spec
        size, step, lateness = spec.size_ms, spec.step_ms, spec.allowed_lateness_ms
        verdicts = Verdicts.of(batch.verdicts)
        # (record index, dead letter), put in record order at the end
        letters = [(index, DeadLetter(batch.record(index), PARSE_STAGE, refusal.reason, refusal.error_class,
                                      refusal.message)) for index, refusal in verdicts.refusals.items()]
        values_by_name = dict(zip(verdicts.value_names, verdicts.value_columns))
        if len(verdicts.refusals) == len(verdicts):  # per-record verdicts with none decoded have no value column
            values_by_name = {name: verdicts.event_ids for name in self._fields}  # all None, all dropped below
        columns = [verdicts.event_ids, verdicts.event_times, batch.high_waters, *verdicts.key_columns,
                   *(values_by_name[name] for name in self._fields)]
        kept = None
        if verdicts.refusals:
            kept = [index for index in range(len(verdicts)) if index not in verdicts.refusals]
            columns = [take(column, kept) for column in columns]
        event_ids, event_times, marks, *rest = columns
        key_columns, value_columns = rest[:len(verdicts.key_columns)], rest[len(verdicts.key_columns):]
        parsed = len(event_ids)
        # WindowSpec.windows_for and refusal_letter's rules over columns (the
        # bit-for-bit test against the per-event path holds them to the same rules).
        first_starts = [((moment - size) // step + 1) * step for moment in event_times]
        # Look at each event only if the batch's greatest high water makes any late
        # (a batch of records from several sources has no order among its high
        # waters), or its earliest or latest event has a window outside the calendar.
        present = [mark for mark in marks if mark is not None] if None in marks else marks
        latest = max(present) if present else None
        suspects: Iterable[int] = ()
        if latest is not None and min(first_starts) + size + lateness <= latest:
            suspects = [index for index, (start, mark) in enumerate(zip(first_starts, marks))
                        if mark is not None and start + size + lateness <= mark]
        if event_times and not (spec.fits_calendar(min(event_times)) and spec.fits_calendar(max(event_times))):
            suspects = range(parsed)
        refused = []
        for index in suspects:
            record_index = kept[index] if kept is not None else index
            letter = refusal_letter(spec, batch.record(record_index), event_ids[index], event_times[index])
            if letter is not None:
                refused.append(index)
                letters.append((record_index, letter))
        if refused:
            keep = sorted(set(range(parsed)) - set(refused))
            event_ids, event_times, first_starts = take(event_ids, keep), take(event_times, keep), take(
                first_starts, keep)
            key_columns = [take(column, keep) for column in key_columns]
            value_columns = [take(column, keep) for column in value_columns]
        timely = len(event_ids)
        keys = key_columns[0] if len(key_columns) == 1 else list(zip(*key_columns))
        key_texts, shards = self._texts_and_shards(keys)
        groups: Dict[ShardWindow, SubBatch] = {}
        for (shard, start), members in _members(shards, first_starts, size, step, event_times).items():
            pick = taker(members)
            groups[(shard, start, start + size)] = (
                pick(key_texts), pick(event_ids), pick(event_times), tuple(map(pick, value_columns)))
        letters.sort(key=_first)
        return groups, [letter for _, letter in letters], parsed, timely

    def _texts_and_shards(self, keys: List[Any]) -> Tuple[List[str], List[int]]:
        """Each key's text (the key fields as one JSON text, as the per-event path
        keys them) and shard (crc32 of the text modulo the shards)."""
        texts, shards = self._key_texts, self._key_shards
        missing = set(keys).difference(texts)
        if missing:
            if len(texts) + len(missing) > _KEY_CACHE_LIMIT:
                texts.clear()
                shards.clear()
                missing = set(keys)
            for key in missing:
                parts = [key] if type(key) is str else list(key)
                text = texts[key] = json.dumps(parts, ensure_ascii=False, separators=(",", ":"))
                shards[key] = zlib.crc32(text.encode("utf-8")) % self._shards
        return list(map(texts.__getitem__, keys)), list(map(shards.__getitem__, keys))


def _first(pair: Tuple[Any, Any]) -> Any:
    return pair[0]


def _members(shards: List[int], first_starts: List[int], size: int, step: int,
             event_times: List[int]) -> Dict[Tuple[int, int], List[int]]:
    """The indices of the events of each (shard, window start), in order."""
    groups: Dict[Tuple[int, int], List[int]] = {}
    if step == size:  # tumbling: one window per event
        for index, group in enumerate(zip(shards, first_starts)):
            members = groups.get(group)
            if members is None:
                groups[group] = [index]
            else:
                members.append(index)
        return groups
    for index, (shard, first_start, moment) in enumerate(zip(shards, first_starts, event_times)):
        for start in range(first_start, moment + 1, step):
            groups.setdefault((shard, start), []).append(index)
    return groups


def absorb(aggregation: Aggregation, by_key: Dict[str, list], sub_batch: SubBatch) -> Tuple[set, List[int]]:
    """Adds each event of a sub-batch to its key's accumulator unless the key has
    counted its ID already. ``by_key`` maps key text to ``[accumulator, emitted
    count, counted IDs]``. Returns the keys changed and the indices of the copies
    dropped, in order.

    One Python step per key, not per event: a key whose IDs in the sub-batch are
    distinct and new to it (the rule, not the exception) counts them with set
    operations in C and adds its events in one call
    (:meth:`Aggregation.add_groups`); only a key with a copy looks at its events
    one by one, keeping the first copy of each ID it has not counted."""
    key_texts, event_ids, event_times, value_columns = sub_batch
    members_by_key: Dict[str, List[int]] = {}
    for index, key_text in enumerate(key_texts):
        members = members_by_key.get(key_text)
        if members is None:
            members_by_key[key_text] = [index]
        else:
            members.append(index)
    dropped: List[int] = []
    groups: List[Tuple[Any, List[int]]] = []
    changed = set()
    for key_text, members in members_by_key.items():
        ids = take(event_ids, members)
        distinct = set(ids)
        entry = by_key.get(key_text)
        if len(distinct) == len(ids) and (entry is None or entry[2].isdisjoint(distinct)):
            if entry is None:  # a new key keeps the set just built (copying it cost 10-20 % of this step)
                entry = by_key[key_text] = [aggregation.create(), 0, distinct]
            else:
                entry[2] |= distinct
        else:
            if entry is None:
                entry = by_key[key_text] = [aggregation.create(), 0, set()]
            counted = entry[2]
            fresh = []
            for index, event_id in zip(members, ids):
                if event_id not in counted:
                    counted.add(event_id)
                    fresh.append(index)
                else:
                    dropped.append(index)
            if not fresh:
                continue
            members = fresh
        groups.append((entry[0], members))
        changed.add(key_text)
    aggregation.add_groups(groups, event_ids, event_times, value_columns)
    dropped.sort()
    return changed, dropped


def concatenate(sub_batches: Iterable[SubBatch]) -> Optional[SubBatch]:
    """The sub-batches as one, their events in order (None for none)."""
    parts = list(sub_batches)
    if len(parts) <= 1:
        return parts[0] if parts else None
    return (list(chain.from_iterable(part[0] for part in parts)), list(chain.from_iterable(part[1] for part in parts)),
            list(chain.from_iterable(part[2] for part in parts)),
            tuple(list(chain.from_iterable(part[3][field] for part in parts)) for field in range(len(parts[0][3]))))


def absorb_sub_batches(aggregation: Aggregation, by_key: Dict[str, list], sub_batches: Iterable[SubBatch],
                       duplicates_counter, unique_counter, first_window: Optional[Tuple[int, int, int]] = None) -> set:
    """:func:`absorb` for the sub-batches as one (a key's accumulator takes its
    events of all of them in one step), counting duplicates dropped and events
    kept; the keys changed.

    ``first_window``: ``(window start, size, step)`` of sliding windows, where an
    event is in several windows: it is counted only in the first window it falls
    in, so that each event is counted once (a copy is a copy in each of its
    windows). Tumbling windows: None, every event counted."""
    sub_batch = concatenate(sub_batches)
    if sub_batch is None:
        return set()
    changed, dropped = absorb(aggregation, by_key, sub_batch)
    events = len(sub_batch[1])
    if first_window is not None:
        start, size, step = first_window
        firsts = {index for index, moment in enumerate(sub_batch[2]) if ((moment - size) // step + 1) * step == start}
        events, dropped = len(firsts), [index for index in dropped if index in firsts]
    if dropped:
        duplicates_counter.inc(len(dropped))
    if events > len(dropped):
        unique_counter.inc(events - len(dropped))
    return changed


def _first_window(spec: WindowSpec, start_ms: int) -> Optional[Tuple[int, int, int]]:
    """What :func:`absorb_sub_batches` needs to count each event of sliding windows
    once (None for tumbling windows)."""
    return None if spec.step_ms == spec.size_ms else (start_ms, spec.size_ms, spec.step_ms)


class _AggregateShardWindowDoFn(beam.DoFn):
    """Bounded input: every sub-batch of a shard window at once (after a
    GroupByKey), one row per key; no state or timers."""

    def __init__(self, key_fields: Sequence[str], aggregates: Sequence[AggregateSpec], window_spec: WindowSpec):
        self._key_fields = tuple(key_fields)
        self._aggregation = Aggregation(aggregates)
        self._spec = window_spec
        self._duplicates = metrics.counter(metrics.DUPLICATES_DROPPED)
        self._unique = metrics.counter(metrics.EVENTS_UNIQUE)
        self._rows = metrics.counter(metrics.ROWS_EMITTED)

    def setup(self) -> None:
        relax_gc()

    def process(self, element: Tuple[ShardWindow, Iterable[SubBatch]]):
        (_, start_ms, end_ms), sub_batches = element
        by_key: Dict[str, list] = {}
        absorb_sub_batches(self._aggregation, by_key, sub_batches, self._duplicates, self._unique,
                           _first_window(self._spec, start_ms))
        extract, key_fields = self._aggregation.extract, self._key_fields
        self._rows.inc(len(by_key))
        for key_text in sorted(by_key):
            yield window_row(key_fields, key_text, start_ms, end_ms, extract(by_key[key_text][0]))


class _AccumulateShardWindowsDoFn(beam.DoFn):
    """Unbounded input, per (key shard, window): panes from state and timers.

    A sub-batch is only appended to a bag (no state read: on Prism every read is a
    round trip to the runner); the keys' accumulators and counted IDs are read,
    brought up to date from the bag and written when a timer fires.

    One event-time timer per shard window, so it cannot fire out of order with
    itself. Each sub-batch sets it to the window end. Its first firing (the
    watermark passed the window end) emits the on-time pane: every key's row. A
    later sub-batch (a late event within the allowed lateness) sets it to the
    window end again, which has passed, so it fires at once and emits a late pane
    for the keys that changed. After each of those firings it is set to window end
    + allowed lateness, when the state is dropped (by then the lateness rule sends
    any further event to the dead-letter queue). With ``early_firing_ms`` a
    processing-time timer on a fixed grid emits the keys changed since their last
    pane while the window is open.
    """

    PENDING = BagStateSpec("pending", FastPrimitivesCoder())  # sub-batches not yet absorbed
    # ({key text: [accumulator, emitted count, counted IDs]}, on-time pane fired)
    PANES = ReadModifyWriteStateSpec("panes", PickleCoder())
    WINDOW_TIMER = TimerSpec("window", TimeDomain.WATERMARK)
    EARLY = TimerSpec("early", TimeDomain.REAL_TIME)

    def __init__(self, key_fields: Sequence[str], aggregates: Sequence[AggregateSpec], window_spec: WindowSpec,
                 early_firing_ms: Optional[int]):
        self._key_fields = tuple(key_fields)
        self._rows = metrics.counter(metrics.ROWS_EMITTED)
        self._aggregation = Aggregation(aggregates)
        self._spec = window_spec
        self._lateness_ms = window_spec.allowed_lateness_ms
        self._early_firing_ms = early_firing_ms
        self._duplicates = metrics.counter(metrics.DUPLICATES_DROPPED)
        self._unique = metrics.counter(metrics.EVENTS_UNIQUE)

    def setup(self) -> None:
        relax_gc()

    def process(
        self,
        element: Tuple[ShardWindow, SubBatch],
        pending=beam.DoFn.StateParam(PENDING),
        window_timer=beam.DoFn.TimerParam(WINDOW_TIMER),
        early=beam.DoFn.TimerParam(EARLY),
    ):
        (_, _, end_ms), rows = element
        pending.add(rows)
        window_timer.set(Timestamp(micros=end_ms * 1000))
        if self._early_firing_ms is not None:
            early.set(self._next_early_firing())

    @on_timer(WINDOW_TIMER)
    def on_window_timer(self, shard_window=beam.DoFn.KeyParam, fired_at=beam.DoFn.TimestampParam,
                        pending=beam.DoFn.StateParam(PENDING), panes=beam.DoFn.StateParam(PANES),
                        window_timer=beam.DoFn.TimerParam(WINDOW_TIMER)):
        _, start_ms, end_ms = shard_window
        sub_batches = list(pending.read())
        past_lateness = fired_at.micros >= (end_ms + self._lateness_ms) * 1000
        if not sub_batches and self._lateness_ms and past_lateness:
            # The window's end plus the allowed lateness, with no event since its last
            # pane: nothing to emit, so the state is dropped without reading it (a
            # catch-up fires this for every shard window, each holding every key's
            # accumulator and counted IDs).
            panes.clear()
            return
        held = panes.read()
        by_key, fired = held if held is not None else ({}, False)
        changed = self._absorb_pending(by_key, sub_batches, pending, start_ms)
        expired = fired and past_lateness
        # On-time pane: every key; then late panes: the keys that changed.
        yield from self._panes(by_key, changed if fired else by_key, start_ms, end_ms)
        if expired or self._lateness_ms == 0:
            panes.clear()
            return
        panes.write((by_key, True))
        window_timer.set(Timestamp(micros=(end_ms + self._lateness_ms) * 1000))

    @on_timer(EARLY)
    def fire_early(self, shard_window=beam.DoFn.KeyParam, pending=beam.DoFn.StateParam(PENDING),
                   panes=beam.DoFn.StateParam(PANES), early=beam.DoFn.TimerParam(EARLY)):
        held = panes.read()
        if held is not None and held[1]:
            return  # the on-time pane has fired: no more early panes
        by_key = held[0] if held is not None else {}
        _, start_ms, end_ms = shard_window
        changed = self._absorb_pending(by_key, pending.read(), pending, start_ms)
        if not by_key:
            return  # expired: the window timer dropped the state
        yield from self._panes(by_key, [k for k in changed if by_key[k][0].count > by_key[k][1]], start_ms, end_ms)
        panes.write((by_key, False))
        early.set(self._next_early_firing())

    def _absorb_pending(self, by_key: Dict[str, list], sub_batches: Iterable[SubBatch], pending,
                        start_ms: int) -> set:
        """Adds the bag's sub-batches (read from ``pending``) to ``by_key`` and
        empties the bag; the keys changed."""
        changed = absorb_sub_batches(self._aggregation, by_key, sub_batches, self._duplicates, self._unique,
                                     _first_window(self._spec, start_ms))
        pending.clear()
        return changed

    def _panes(self, by_key: Dict[str, list], keys, start_ms: int, end_ms: int):
        emitted = 0
        for key_text in sorted(keys):
            entry = by_key[key_text]
            entry[1] = entry[0].count
            emitted += 1
            yield window_row(self._key_fields, key_text, start_ms, end_ms, self._aggregation.extract(entry[0]))
        if emitted:
            self._rows.inc(emitted)

    def _next_early_firing(self) -> Timestamp:
        """The next point of a fixed processing-time grid: setting it again within
        one interval changes nothing, so steady input cannot keep postponing it."""
        interval_us = self._early_firing_ms * 1000
        return Timestamp(micros=(Timestamp.now().micros // interval_us + 1) * interval_us)


class AggregateBatches(beam.PTransform):
    """Aggregates decoded record batches per key in event-time windows.

    Input: ``PCollection[RecordBatch]`` with verdicts (every onceflow reader decodes
    with the event contract), bounded or unbounded, in any windowing (it is reset:
    windows come from event times). ``key_fields`` only names the key columns: the
    key is what the contract decoded, so give the contract's key fields, in order
    (:class:`AggregateEvents` takes them from the contract).
    Output: :class:`~onceflow.transforms.Aggregated`, rows and dead letters exactly
    as ``ParseEvents | WindowedAggregate`` give them for the same records, but for
    the scope of dedup (below):

    * a refused record goes to ``dead_letters`` with stage ``parse`` and its reason;
      an event too late by the rule of :mod:`onceflow.windowing` with stage
      ``aggregate`` and reason ``too_late``;
    * every other event is counted once per window it falls in, under its key;
      rows and panes (early, on-time, late) are those of
      :class:`~onceflow.transforms.WindowedAggregate`, with ``event_count`` as the
      row's version.

    Dedup scope: an event ID is counted once per key and window. Copies of an event
    (a producer's or a consumer's re-send, any replay) have the same key and event
    time, so they are counted once, as before. Two different events that share an
    ID but differ in key or window are both counted (the per-event
    :class:`~onceflow.transforms.DedupByEventId` keeps the first one seen anywhere);
    within one key and window the first copy seen is counted.

    How: each batch is split by (crc32 of the key text modulo ``shards``, window);
    the runner shuffles those sub-batches. On unbounded input one state value per
    shard window (the keys' accumulators and counted IDs) is read and written once
    per sub-batch, not once per event; on bounded input (a backfill) every record
    is present, so a GroupByKey brings each shard window's sub-batches together and
    each row is emitted once, with no state. ``shards`` bounds the parallelism of
    that step.

    On unbounded input a batch's element timestamp must be no later than the
    high water before its first record (every onceflow reader stamps it so): the
    state of a shard window is dropped once the watermark passes its end plus
    the allowed lateness, and a later timestamp would let the watermark get there
    before a timely event of the batch is counted. The lateness rule reads each
    record's high water (every onceflow reader sets it): a record with none (your
    own source's) is never refused as too late, and on unbounded input one that
    arrives after its window's state was dropped starts that row again from itself
    (the sinks' version guard keeps the fuller row; the event is then counted
    nowhere and not dead-lettered). Give your records high waters (the greatest
    event time before each in its partition) to have such events dead-lettered.

    On Prism 2.77 run unbounded input with ``--experiments=prism_disable_sdf_split``
    (the main job adds it): a bundle split there can lose a state update.

    Metrics: ``records_read``, ``events_parsed``, ``dead_letters.<reason>``,
    ``events_timely``, ``duplicates_dropped``, ``events_unique``, ``rows_emitted``.
    """

    def __init__(
        self,
        key_fields: Sequence[str],
        window_spec: WindowSpec,
        aggregates: Sequence[AggregateSpec],
        early_firing_ms: Optional[int] = None,
        shards: int = DEFAULT_SHARDS,
    ):
        super().__init__()
        check_aggregate_arguments("AggregateBatches", key_fields, window_spec, aggregates, early_firing_ms)
        if not isinstance(shards, int) or shards < 1:
            raise ValueError("the number of shards must be a positive whole number")
        self._key_fields = tuple(key_fields)
        self._spec = window_spec
        self._aggregates = tuple(aggregates)
        self._early_firing_ms = early_firing_ms
        self._shards = shards

    def expand(self, batches: beam.PCollection) -> Aggregated:
        # Windows come from event times here: a windowing set upstream would split each
        # shard window's state (and a GroupByKey's groups) by its own windows.
        batches = batches | "IntoGlobalWindow" >> beam.WindowInto(beam.window.GlobalWindows())
        # The shard window is the state key: typed, so its coder is deterministic.
        split = batches | "ScreenAndSplit" >> beam.ParDo(
            _ScreenAndSplitDoFn(self._spec, self._shards, value_fields(self._aggregates))).with_output_types(
                Tuple[Tuple[int, int, int], Any]).with_outputs(_DEAD_LETTERS, main="sub_batches")
        if split.sub_batches.is_bounded:
            # Every record is in the input: group, then aggregate each shard window once.
            rows = (
                split.sub_batches
                | "GroupPerShardWindow" >> beam.GroupByKey()
                | "AggregatePerShardWindow" >> beam.ParDo(
                    _AggregateShardWindowDoFn(self._key_fields, self._aggregates, self._spec))
            )
        else:
            rows = split.sub_batches | "AggregatePerShardWindow" >> beam.ParDo(_AccumulateShardWindowsDoFn(
                self._key_fields, self._aggregates, self._spec, self._early_firing_ms))
        return Aggregated(rows=rows, dead_letters=split[_DEAD_LETTERS])


class _BatchRecordsDoFn(beam.DoFn):
    """Records to batches of at most ``max_records``, within a bundle, each stamped
    no later than its first record's high water or any record's own timestamp (what
    :class:`AggregateBatches` needs on unbounded input)."""

    def __init__(self, contract: EventContract, max_records: int, time_source: str):
        self._contract = contract
        self._max_records = max_records
        self._time_source = time_source

    def start_bundle(self) -> None:
        self._records: List[SourceRecord] = []
        self._earliest: Optional[Timestamp] = None

    def process(self, record: SourceRecord, timestamp=beam.DoFn.TimestampParam) -> Iterator[WindowedValue]:
        require_source_record(record, "BatchRecords")
        self._records.append(record)
        if self._earliest is None or timestamp < self._earliest:
            self._earliest = timestamp
        if len(self._records) >= self._max_records:
            yield self._batch()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self._records:
            yield self._batch()

    def _batch(self) -> WindowedValue:
        records, stamp = self._records, self._earliest
        self._records, self._earliest = [], None
        first_high_water = next((r.high_water_ms for r in records if r.high_water_ms is not None), None)
        if first_high_water is not None:
            stamp = min(stamp, Timestamp(micros=first_high_water * 1000))
        batch = batch_from_records(records, self._contract, self._time_source)
        return WindowedValue(batch, stamp, [GlobalWindow()])


class BatchRecords(beam.PTransform):
    """``PCollection[SourceRecord]`` to ``PCollection[RecordBatch]`` decoded with
    ``contract``, for sources that emit records one at a time (the archive, a
    user's own source). Each record keeps its source and high water; batches hold
    at most ``max_records`` records and never span a bundle. Each batch is stamped
    with the earliest of its records' timestamps and its first high water, so
    :class:`AggregateBatches` keeps a window's state while a batch could still
    count in it. ``time_source``: the event time is the time field (``field``) or,
    for records that came from Kafka, their Kafka timestamp (``record``)."""

    def __init__(self, contract: EventContract, max_records: int = 10_000, time_source: str = "field"):
        super().__init__()
        require_contract(contract, "BatchRecords")
        if not is_whole_number(max_records) or max_records < 1:
            raise ValueError(f"a batch holds at least one record: max_records is a positive int, not {max_records!r}")
        check_time_source(time_source)
        self._contract = contract
        self._max_records = max_records
        self._time_source = time_source

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return (
            records
            | "IntoGlobalWindow" >> beam.WindowInto(beam.window.GlobalWindows())
            | "BatchAndDecode" >> beam.ParDo(_BatchRecordsDoFn(
                self._contract, self._max_records, self._time_source)).with_output_types(RecordBatch)
        )


class AggregateEvents(AggregateBatches):
    """The main job's transforms as one step, for your own Beam job: decoded record
    batches (from :class:`~onceflow.io.kafka.read.ReadBatchesFromKafka`,
    :class:`~onceflow.io.files.ReadRecordBatchesFromFiles`, or
    :class:`BatchRecords` over your own records, each decoded with ``contract``) to
    :class:`~onceflow.transforms.Aggregated` rows and dead letters, keyed by the
    contract's key fields. Exactly :class:`AggregateBatches`, with its
    guarantees::

        batches = pipeline | ReadRecordBatchesFromFiles("events/*.jsonl", contract)
        aggregated = batches | AggregateEvents(contract, WindowSpec(60_000), parse_aggregates("count,sum:qty"))
    """

    def __init__(self, contract: EventContract, window_spec: WindowSpec, aggregates: Sequence[AggregateSpec],
                 early_firing_ms: Optional[int] = None, shards: int = DEFAULT_SHARDS):
        require_contract(contract, "AggregateEvents")
        check_aggregate_specs(aggregates, "AggregateEvents")
        missing = [name for name in value_fields(aggregates) if name not in contract.value_fields]
        if missing:
            raise ValueError(f"AggregateEvents: the aggregates read {', '.join(missing)}, which the contract's "
                             f"value_fields ({', '.join(contract.value_fields) or 'none'}) do not hold: the "
                             "batches are decoded with the contract, so add them there")
        super().__init__(contract.key_fields, window_spec, aggregates, early_firing_ms=early_firing_ms, shards=shards)
