"""Source positions kept with the results: where a restarted live job resumes.

A live job keeps, per (job, rows table, topic, partition), a progress record in
its sink (:class:`Position`): the offset from which a restarted job must read so
that every window not yet final in the sink is rebuilt in full, and the
partition's high water at that offset (the state of the lateness rule, so the
restarted job refuses as too late exactly what the first run refused).

How a position becomes safe to store: the reader's batches carry the next offset
and the high water ``h`` after them (:class:`ProgressMarks`). Every valid event
before that offset has an event time at most ``h``, so every window it falls in
ends at the latest at the last window end of ``h``; its last pane is emitted when
the watermark passes that end plus the allowed lateness. A dead letter of a
record before the offset carries its batch's timestamp, at most ``h``.
:class:`KeepProgress` holds each mark until the watermark of the *written* rows
and dead letters passes that point (``final_at_ms``): by then every row and dead
letter the mark covers has been committed by the sink's writer (a writer's output
watermark moves only after its bundle, which writes before it completes). Only
then is the position written. A crash before that leaves the previous position:
the restart re-reads a little more, which dedup, the row guard and the dead
letters' IDs absorb; it never resumes later than a record whose window is not
final. With early firing the same holds: a position moves past an event only once
its windows are final, whatever early panes wrote.

The store is the sink's own: a table ``onceflow_progress`` in the same SQLite file
or PostgreSQL database, a manifest file in a file sink's directory. A sink that
cannot hold positions (a Kafka topic) is refused for live jobs.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, NamedTuple, Optional, Protocol, Sequence, Set, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from onceflow.batches import KAFKA, RecordBatch
from onceflow.rows import check_identifier
from onceflow.windowing import WindowSpec, format_duration_ms

if TYPE_CHECKING:
    from onceflow.io.kafka.admin import KafkaPartitionRead

PROGRESS_TABLE = "onceflow_progress"


def rows_table_name(name: str) -> str:
    """A valid table name for rows, other than the table that keeps live jobs'
    positions beside them (a job writing its rows there failed only after it had
    created the table it could not use)."""
    table = check_identifier(name, "table name")
    if table.lower() == PROGRESS_TABLE:
        raise ValueError(f"table {table!r} is where onceflow keeps live jobs' positions beside the rows; name "
                         "another table")
    return table


class Position(NamedTuple):
    """Where a partition resumes: read from ``next_offset`` with the partition's
    high water ``high_water_ms`` (None: no valid event before it). ``final_through_ms``:
    every window that ended at or before it is final in the sink (None at a job's
    first start)."""

    topic: str
    partition: int
    next_offset: int
    high_water_ms: Optional[int]
    final_through_ms: Optional[int] = None


class ProgressStore(Protocol):
    """Where a sink keeps the positions of the live jobs that write to it."""

    def read(self, job: str, topic: str) -> Dict[int, Position]:
        """The stored positions of ``job`` on ``topic``, by partition (empty: none)."""

    def write(self, job: str, positions: Sequence[Position]) -> None:
        """Stores ``positions`` (a partition's stored offset never moves back)."""

    def jobs(self) -> Set[Tuple[str, str]]:
        """(job, topic) of every entry kept with these rows (a job's settings too)."""


def kept_topics(store: ProgressStore) -> Set[str]:
    """The topics of every job whose positions are kept with these rows."""
    return {topic for _, topic in store.jobs()}


def kept_window_sizes(store: ProgressStore) -> Set[int]:
    """The window sizes (ms) live jobs writing these rows keep in their settings:
    stored at a job's first start, before any row, so a table with no row yet
    says which windows it is to hold."""
    sizes = set()
    for job, topic in store.jobs():
        if job.endswith(SETTINGS_SUFFIX):
            entry = store.read(job, topic).get(0)  # the --window entry
            if entry is not None and entry.high_water_ms:
                sizes.add(entry.high_water_ms)
    return sizes


def start_position(read: KafkaPartitionRead) -> Position:
    """The position to store for a partition before any of its records is read:
    where the read starts, with its starting high water. A resume offset that
    retention has deleted is kept as it is, so the read reports the gap."""
    first = read.retention_gap.first if read.retention_gap is not None else read.start_offset
    return Position(read.topic, read.partition, first, read.high_water_ms)


class StoreAddedPartitions:
    """Given to a live Kafka read (``on_partitions_added``): stores the start
    position of each partition added to the topic while the job runs, with the
    wall-clock high water it joins with, before any of its records is read.

    Without it, a kill before the partition's first position was stored with the
    rows left the restart to take it for one added while the job was stopped, with
    a lower high water (the sink's final point): records this run had dead-lettered
    as too late were then counted too, in a row and in the DLQ. With it, the
    restart gives them the verdicts this run gave."""

    def __init__(self, store: ProgressStore, job: str):
        self._store = store
        self._job = job

    def __call__(self, reads: Sequence[KafkaPartitionRead]) -> None:
        self._store.write(self._job, [start_position(read) for read in reads])


# The flags a job's positions were taken under, kept beside them (job key
# ``GROUP#settings``, one entry per flag, the value in ``high_water_ms`` with
# ``next_offset`` 0 so that a first start may replace stale ones): a position says
# which windows are final, under this window spec, lateness, clock and event
# contract, so a resume under others would rebuild rows from part of their events.
# Field names are kept as a digest (the store holds numbers). The entry after the
# flags keeps a digest of Kafka's ID of the topic: a topic deleted and created again
# under the same name has new records at the old offsets.
SETTINGS_SUFFIX = "#settings"
_SETTINGS = ("--window", "--window_period", "--allowed_lateness", "--kafka_time_source", "--time_field",
             "--id_field")
_FIELD_NAMES = ("--time_field", "--id_field")
_TOPIC_ID_ENTRY = len(_SETTINGS)


def text_digest(text: str) -> int:
    """A stable 48-bit number for ``text``: fits every store's integer column and a
    JSON number."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:6], "big")


class JobSettings(NamedTuple):
    """The flags a job's positions are taken under (see above)."""

    spec: WindowSpec
    time_source: str
    time_field: str
    id_field: str

    def flags(self) -> Tuple[str, ...]:
        """Each flag as it is given, e.g. ``--window=1m``."""
        spec = self.spec
        values = (format_duration_ms(spec.size_ms), format_duration_ms(spec.period_ms) if spec.period_ms else "none",
                  format_duration_ms(spec.allowed_lateness_ms), self.time_source, self.time_field, self.id_field)
        return tuple(f"{flag}={value}" for flag, value in zip(_SETTINGS, values))

    def values(self) -> Tuple[int, ...]:
        """Each flag as the number its entry keeps."""
        spec = self.spec
        return (spec.size_ms, spec.period_ms or 0, spec.allowed_lateness_ms, 1 if self.time_source == "record" else 0,
                text_digest(self.time_field), text_digest(self.id_field))


def settings_positions(topic: str, settings: JobSettings, topic_id: Optional[str]) -> List[Position]:
    """The entries that record ``settings`` and the topic's Kafka ID (None: the
    broker does not say)."""
    values = [*settings.values(), None if topic_id is None else text_digest(topic_id)]
    return [Position(topic, index, 0, value) for index, value in enumerate(values)]


def changed_settings(kept: Dict[int, Position], settings: JobSettings) -> List[str]:
    """This run's flags that differ from those the kept entries say, each with the
    kept value where the entry keeps one (``--window=1m (kept: 10s)``). An entry an
    older onceflow did not keep is not compared."""
    changed = []
    for index, (flag, value) in enumerate(zip(settings.flags(), settings.values())):
        stored = kept[index].high_water_ms if index in kept else None
        name = flag.split("=")[0]
        if name == "--window_period" and stored == settings.spec.size_ms:
            stored = 0  # kept by a run that gave the window's own size as its period: tumbling
        if stored is None or stored == value:
            continue
        if name in _FIELD_NAMES:
            was = "another field"
        elif name == "--kafka_time_source":
            was = "record" if stored else "field"
        elif name == "--window_period" and stored == 0:
            was = "none"
        else:
            was = format_duration_ms(stored)
        changed.append(f"{flag} (kept: {was})")
    return changed


def topic_replaced(kept: Dict[int, Position], topic_id: Optional[str]) -> bool:
    """Whether the kept entries name another Kafka topic ID than ``topic_id`` (the
    topic deleted and created again since); False where either is not known."""
    entry = kept.get(_TOPIC_ID_ENTRY)
    stored = None if entry is None else entry.high_water_ms
    return stored is not None and topic_id is not None and stored != text_digest(topic_id)


class Mark(NamedTuple):
    """A position the reader has passed, and the watermark (epoch ms) after which
    every row and dead letter of the records before it has been written."""

    final_at_ms: int
    next_offset: int
    high_water_ms: Optional[int]


def final_at_ms(spec: WindowSpec, high_water_ms: Optional[int], batch_time_ms: int) -> int:
    """The watermark after which every window of an event at or before
    ``high_water_ms`` has emitted its last pane (its end plus the allowed lateness),
    and the batch's dead letters (timestamped ``batch_time_ms``) have passed."""
    if high_water_ms is None:
        return batch_time_ms + 1
    last_end = max(end for _, end in spec.windows_for(high_water_ms))
    return max(batch_time_ms, last_end + spec.allowed_lateness_ms) + 1


def high_water_after(batch: RecordBatch, time_source: str = "field") -> Optional[int]:
    """A Kafka batch's partition high water after its last record: the reader's
    rule (the greatest valid event time, or Kafka timestamp with ``time_source``
    ``record``), continued from the last record's own high water."""
    index = len(batch.values) - 1
    high = batch.high_waters[index]
    if time_source == "record" or batch.verdicts is None:
        stamp = batch.timestamps[index] if batch.timestamps is not None else -1
        moment = stamp if stamp is not None and stamp >= 0 else None
    else:
        moment = getattr(batch.verdicts[index], "event_time_ms", None)
    if moment is not None and (high is None or moment > high):
        return moment
    return high


def batch_marks(batch: RecordBatch, spec: WindowSpec, time_source: str, batch_time_ms: int) -> List[Mark]:
    """The positions a Kafka batch passes, at the grain of the final point: before
    each record whose high water moves into a later window step than the next
    record's (the furthest position of each final point), and after the batch.
    A batch read while catching up can span minutes of event time; one mark per
    batch would hold the whole batch until its last window is final, so after a
    restart the positions could not move until a window plus the lateness after
    the restart. The position before record ``i`` covers the records before it,
    whose high water is ``high_waters[i]``."""
    positions, high_waters = batch.positions, batch.high_waters
    step = spec.step_ms
    marks: List[Mark] = []
    last = len(positions) - 1
    for index in range(1, last + 1):
        high = high_waters[index]
        if index < last:
            following = high_waters[index + 1]
            if (None if high is None else high // step) == (None if following is None else following // step):
                continue  # a later position has the same final point
        marks.append(Mark(final_at_ms(spec, high, batch_time_ms), positions[index], high))
    high = high_water_after(batch, time_source)
    marks.append(Mark(final_at_ms(spec, high, batch_time_ms), positions[-1] + 1, high))
    return marks


class _MarksDoFn(beam.DoFn):
    """Per bundle, the furthest mark of each (partition, final point) of the Kafka
    batches it saw (:func:`batch_marks`): a few marks per bundle, not one per
    record."""

    def __init__(self, spec: WindowSpec, time_source: str):
        self._spec = spec
        self._time_source = time_source

    def start_bundle(self) -> None:
        self._latest: Dict[Tuple[str, int, int], Tuple[Mark, Timestamp]] = {}

    def process(self, batch: RecordBatch, timestamp=beam.DoFn.TimestampParam) -> None:
        if batch.origin[0] != KAFKA or not batch.values:
            return
        _, topic, partition = batch.origin
        for mark in batch_marks(batch, self._spec, self._time_source, timestamp.micros // 1000):
            key = (topic, partition, mark.final_at_ms)
            held = self._latest.get(key)
            if held is None or held[0].next_offset < mark.next_offset:
                self._latest[key] = (mark, timestamp)  # emitted in finish_bundle

    def finish_bundle(self) -> Iterator[WindowedValue]:
        latest, self._latest = self._latest, {}
        for (topic, partition, _), (mark, timestamp) in latest.items():
            yield WindowedValue(((topic, partition), mark), timestamp, [GlobalWindow()])


class _KeepProgressDoFn(beam.DoFn):
    """Per partition: holds marks until the watermark passes their ``final_at_ms``,
    then stores the furthest one that is final (see the module docstring)."""

    PENDING = ReadModifyWriteStateSpec("pending", PickleCoder())  # [Mark], by final_at
    FINAL = TimerSpec("final", TimeDomain.WATERMARK)

    def __init__(self, store: ProgressStore, job: str, allowed_lateness_ms: int):
        self._store = store
        self._job = job
        self._lateness_ms = allowed_lateness_ms

    def process(self, element: Tuple[Tuple[str, int], Optional[Mark]],
                pending=beam.DoFn.StateParam(PENDING), final=beam.DoFn.TimerParam(FINAL)):
        _, mark = element
        if mark is None:  # the writers' outputs are flattened in for their watermark only
            return
        by_final = {m.final_at_ms: m for m in pending.read() or []}
        held = by_final.get(mark.final_at_ms)
        if held is None or held.next_offset < mark.next_offset:
            by_final[mark.final_at_ms] = mark
        marks = sorted(by_final.values())
        pending.write(marks)
        final.set(Timestamp(micros=marks[0].final_at_ms * 1000))

    @on_timer(FINAL)
    def on_final(self, key=beam.DoFn.KeyParam, fired_at=beam.DoFn.TimestampParam,
                 pending=beam.DoFn.StateParam(PENDING), final=beam.DoFn.TimerParam(FINAL)):
        topic, partition = key
        marks: List[Mark] = pending.read() or []
        now_ms = fired_at.micros // 1000
        ready = [m for m in marks if m.final_at_ms <= now_ms]
        rest = [m for m in marks if m.final_at_ms > now_ms]
        if ready:
            furthest = max(ready, key=lambda m: m.next_offset)
            # The watermark has passed now_ms - 1: windows ending by then minus the lateness are final.
            final_through = now_ms - 1 - self._lateness_ms
            self._store.write(self._job, [Position(topic, partition, furthest.next_offset, furthest.high_water_ms,
                                                   final_through)])
        if rest:
            pending.write(rest)
            final.set(Timestamp(micros=rest[0].final_at_ms * 1000))
        else:
            pending.clear()


class KeepProgress(beam.PTransform):
    """Stores each Kafka partition's resume position in ``store`` once every row
    and dead letter of the records before it has been written.

    Input: ``(batches, *written)``: the reader's ``PCollection[RecordBatch]``, and
    the outputs of the steps that write rows and dead letters (their elements are
    ignored; their watermark says what has been written). ``job`` keys the
    records (the consumer group), so two jobs writing to one table do not mix.
    """

    def __init__(self, store: ProgressStore, job: str, spec: WindowSpec, time_source: str = "field"):
        super().__init__()
        self._store = store
        self._job = job
        self._spec = spec
        self._time_source = time_source

    def expand(self, inputs: Tuple[beam.PCollection, ...]) -> beam.PCollection:
        batches, *written = inputs
        key_and_mark = Tuple[Tuple[str, int], Any]
        marks = batches | "Marks" >> beam.ParDo(_MarksDoFn(self._spec, self._time_source)).with_output_types(
            key_and_mark)
        signals = [
            pcoll | f"WrittenSignal{index}" >> beam.Map(lambda _: (("", -1), None)).with_output_types(key_and_mark)
            for index, pcoll in enumerate(written)
        ]
        return ((marks, *signals)
                | "FlattenMarksAndWrites" >> beam.Flatten().with_output_types(key_and_mark)
                | "StoreFinalPositions" >> beam.ParDo(
                    _KeepProgressDoFn(self._store, self._job, self._spec.allowed_lateness_ms)))
