"""Micro-batches: the unit of work from the reader to the sink.

Beam's Python SDK costs microseconds per element per step, so the batched path
moves one element per poll of a partition (or per slice of a file) instead of one
per record. Everything here is plain Python with no Beam in it:

* :class:`RecordBatch` is what every batched reader emits: consecutive raw records
  of one source partition or file, in log order, each with its coordinates, the
  source's high water just before it (as :class:`~onceflow.events.SourceRecord`
  has it), and the contract's verdict on it (:class:`Decoded` or
  :class:`Refusal`). ``batch.record(i)`` gives back the exact
  :class:`~onceflow.events.SourceRecord` a per-record reader emits, so dead letters
  are the same whichever path refused them.
* :func:`decode_values` decodes a batch of raw values with the contract into
  :class:`Verdicts`: a column per field (IDs, event times, each key field, each
  value field) and the refusals by index, so the steps after the reader loop over
  columns, not over a tuple per record. JSON with an ID field is checked a column
  at a time (msgspec or orjson read the fields, then one type and range check per
  column that accepts only what the contract's Avro schema accepts); any record a
  column check is not sure of goes through the per-record checks and then
  :meth:`EventContract.to_event`, the reference, so the verdict on every record is
  the reference's.

Readers decode, because the lateness rule's high water moves only on valid events:
a reader cannot know the high water of its next record without the verdict on this
one.
"""

from __future__ import annotations

import base64
import gc
from bisect import bisect_right
from itertools import accumulate
from operator import attrgetter, itemgetter
from threading import Lock
from typing import (
    Any, Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple, Union,
)

from onceflow import metrics
from onceflow.events import (
    LONG_MAX as _LONG_MAX, LONG_MIN as _LONG_MIN, MAX_EVENT_TIME_MS as _MAX_EVENT_TIME_MS, MAX_JSON_NESTING,
    MAX_KEY_BYTES, MIN_EVENT_TIME_MS as _MIN_EVENT_TIME_MS, REASON_BAD_TIMESTAMP, EventContract, RecordError,
    SourceRecord, json_nests_too_deep, parse_event_time_ms,
)

try:  # the fast JSON decoder; without it every record takes the reference path
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a core dependency
    _orjson = None

try:  # decodes a record straight into its fields, no dict: about twice orjson's speed here
    import msgspec as _msgspec
except ImportError:  # pragma: no cover - msgspec is a core dependency; orjson reads every record without it
    _msgspec = None

# orjson turns an integer literal it cannot hold in 64 bits into a float; the
# reference (json) keeps it an int. A float this large may be such a literal.
_FLOAT_FROM_BIG_INT = float(2**63)


class Decoded(NamedTuple):
    """A record the contract accepts: what :class:`~onceflow.events.Event` holds
    but its record (which the batch keeps)."""

    event_id: str
    event_time_ms: int
    key: Tuple[str, ...]
    values: Mapping[str, Any]


class Refusal(NamedTuple):
    """A record the contract refuses: the :class:`~onceflow.events.RecordError`'s
    reason, error class and message."""

    reason: str
    error_class: str
    message: str


Verdict = Union[Decoded, Refusal]


class Verdicts:
    """The contract's verdicts on a batch's records, a column per field.

    ``event_ids``, ``event_times`` and each list of ``key_columns`` (one per key
    field) and ``value_columns`` (one per name in ``value_names``) have one item
    per record; a refused record has None in each and its :class:`Refusal` in
    ``refusals`` under its index. As a sequence it is what a list of verdicts
    would be: ``verdicts[i]`` is record ``i``'s :class:`Decoded` or
    :class:`Refusal`.
    """

    __slots__ = ("event_ids", "event_times", "key_columns", "value_names", "value_columns", "refusals")

    def __init__(self, event_ids: List[Optional[str]], event_times: List[Optional[int]],
                 key_columns: Tuple[List[Optional[str]], ...], value_names: Tuple[str, ...],
                 value_columns: Tuple[List[Any], ...], refusals: Dict[int, Refusal]):
        self.event_ids = event_ids
        self.event_times = event_times
        self.key_columns = key_columns
        self.value_names = value_names
        self.value_columns = value_columns
        self.refusals = refusals

    @classmethod
    def of(cls, verdicts: Sequence[Verdict], contract: Optional[EventContract] = None) -> "Verdicts":
        """Columns from per-record verdicts (all of ``contract``, which gives the
        key and value columns; without it they come from the first decoded record,
        and a batch with none has no key or value column)."""
        if isinstance(verdicts, Verdicts):
            return verdicts
        first = next((verdict for verdict in verdicts if type(verdict) is Decoded), None)
        if contract is not None:
            key_width, names = len(contract.key_fields), tuple(contract.value_fields)
        else:
            key_width = len(first.key) if first is not None else 0
            names = tuple(first.values) if first is not None else ()
        refusals = {index: verdict for index, verdict in enumerate(verdicts) if type(verdict) is not Decoded}
        decoded = [None if type(verdict) is not Decoded else verdict for verdict in verdicts]
        return cls(
            [None if verdict is None else verdict.event_id for verdict in decoded],
            [None if verdict is None else verdict.event_time_ms for verdict in decoded],
            tuple([None if verdict is None else verdict.key[i] for verdict in decoded] for i in range(key_width)),
            names,
            tuple([None if verdict is None else verdict.values[name] for verdict in decoded] for name in names),
            refusals,
        )

    def __len__(self) -> int:
        return len(self.event_ids)

    def __getitem__(self, index: int) -> Verdict:
        if isinstance(index, slice):
            return [self[each] for each in range(*index.indices(len(self.event_ids)))]
        if index < 0:
            index += len(self.event_ids)
        refusal = self.refusals.get(index)
        if refusal is not None:
            return refusal
        return Decoded(self.event_ids[index], self.event_times[index],
                       tuple(column[index] for column in self.key_columns),
                       {name: column[index] for name, column in zip(self.value_names, self.value_columns)})

    def __iter__(self) -> Iterator[Verdict]:
        return (self[index] for index in range(len(self.event_ids)))

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, (Verdicts, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Verdicts({list(self)!r})"

    def __reduce__(self):
        # Plain lists and tuples: pickled in C, no Python call per record.
        refusals = {index: tuple(refusal) for index, refusal in self.refusals.items()}
        return _unpack_verdicts, (self.event_ids, self.event_times, self.key_columns, self.value_names,
                                  self.value_columns, refusals)


def _unpack_verdicts(event_ids, event_times, key_columns, value_names, value_columns, refusals) -> Verdicts:
    return Verdicts(event_ids, event_times, key_columns, value_names, value_columns,
                    {index: Refusal(*fields) for index, fields in refusals.items()})


# Where a batch's records come from; ``record(i)`` builds each one's source from it.
KAFKA = "kafka"  # origin (KAFKA, topic, partition); positions are offsets
FILE_LINES = "file_lines"  # origin (FILE_LINES, path); positions are line numbers
FILE_RECORDS = "file_records"  # origin (FILE_RECORDS, path); positions are Avro record numbers
SOURCES = "sources"  # origin (SOURCES,); ``sources`` holds each record's source as is


class RecordBatch(NamedTuple):
    """Consecutive records of one source partition or file, in order.

    ``values``, ``positions``, ``high_waters`` and ``verdicts`` have one item per
    record; ``timestamps``, ``keys`` and ``headers`` are set for Kafka (the record
    timestamp in ms, the raw key, the raw headers list or None) and ``sources`` for
    :data:`SOURCES` batches. ``verdicts`` is None when the reader had no contract
    (a reader that only copies records, like the archive job).
    """

    origin: Tuple[Any, ...]
    values: List[bytes]
    positions: List[int]
    high_waters: List[Optional[int]]
    verdicts: Optional[Sequence[Verdict]] = None  # Verdicts from every onceflow reader
    timestamps: Optional[List[int]] = None
    keys: Optional[List[Optional[bytes]]] = None
    headers: Optional[List[Optional[list]]] = None
    sources: Optional[List[Mapping[str, Any]]] = None

    def source(self, index: int) -> Dict[str, Any]:
        """The ``source`` mapping a per-record reader gives record ``index``."""
        kind = self.origin[0]
        if kind == KAFKA:
            key = self.keys[index] if self.keys is not None else None
            headers = self.headers[index] if self.headers is not None else None
            return {
                "topic": self.origin[1],
                "partition": self.origin[2],
                "offset": self.positions[index],
                "timestamp_ms": self.timestamps[index] if self.timestamps is not None else None,
                "key": None if key is None else base64.b64encode(key).decode("ascii"),
                "headers": [[name, None if value is None else base64.b64encode(value).decode("ascii")]
                            for name, value in (headers or [])],
            }
        if kind == FILE_LINES:
            return {"file": self.origin[1], "line": self.positions[index]}
        if kind == FILE_RECORDS:
            return {"file": self.origin[1], "record": self.positions[index]}
        return dict(self.sources[index])

    def record(self, index: int) -> SourceRecord:
        """Record ``index`` as the per-record readers emit it."""
        return SourceRecord(self.values[index], self.source(index), self.high_waters[index])

    def records(self) -> List[SourceRecord]:
        return [self.record(i) for i in range(len(self.values))]

    def __reduce__(self):
        # Pickled as plain columns (see Verdicts.__reduce__): runners encode
        # batches between stages and to sample element sizes.
        verdicts = None if self.verdicts is None else Verdicts.of(self.verdicts)
        return _unpack_batch, (self.origin, self.values, self.positions, self.high_waters, verdicts,
                               self.timestamps, self.keys, self.headers, self.sources)


def _unpack_batch(origin, values, positions, marks, verdicts, timestamps, keys, headers, sources) -> RecordBatch:
    return RecordBatch(origin, values, positions, marks, verdicts, timestamps, keys, headers, sources)


def decode_values(contract: EventContract, values: Sequence[bytes]) -> Verdicts:
    """The contract's verdict on each raw value, in order (see the module doc)."""
    fast = _fast_decoder(contract)
    if fast is not None and values:
        return _decode_json_columns(contract, values, fast)
    return Verdicts.of([reference_verdict(contract, raw) for raw in values], contract)


def take(column: Sequence[Any], indices: Sequence[int]) -> List[Any]:
    """The items of ``column`` at ``indices``, in their order."""
    return taker(indices)(column)


def taker(indices: Sequence[int]) -> Callable[[Sequence[Any]], List[Any]]:
    """A function that takes the items at ``indices`` from a column, in their
    order: :func:`take` for several columns at the same indices. A loop in C
    (``itemgetter``): about 15 ns an item against 28 for a map of ``__getitem__``."""
    if len(indices) > 1:
        getter = itemgetter(*indices)
        return lambda column: list(getter(column))
    if indices:
        index = indices[0]
        return lambda column: [column[index]]
    return lambda column: []


_GC_FIRST_GENERATION = 100_000


def relax_gc() -> None:
    """Lets Python's cyclic garbage collector run less often, for this process.

    A batch allocates thousands of small objects that stay alive (the batch, the
    state of a window holds them), and every 700 allocations (the default) the
    collector re-scans the youngest of them, every few of those scans the older
    ones too: measured on the 1,000,000-record file backfill, 1.1 s of 8.6 s went
    to the collector. With a first generation of 100,000 it runs about as rarely as
    with the collector off (7.6 s). The batch loops create no reference cycles, so
    reference counting frees what they drop; cycles elsewhere are still collected.
    Called by the batched reader and transforms; idempotent.
    """
    first, second, third = gc.get_threshold()
    if first and first < _GC_FIRST_GENERATION:
        gc.set_threshold(_GC_FIRST_GENERATION, second, third)


def reference_verdict(contract: EventContract, raw: bytes) -> Verdict:
    """The verdict of :meth:`EventContract.to_event` on one raw value."""
    try:
        event = contract.to_event(SourceRecord(raw, {}))
    except RecordError as error:
        return Refusal(error.reason, error.error_class, error.message)
    return Decoded(event.event_id, event.event_time_ms, event.key, event.values)


def high_waters(verdicts: Sequence[Verdict], start: Optional[int]) -> Tuple[List[Optional[int]], Optional[int]]:
    """Each record's high water (the greatest valid event time before it, starting
    from ``start``), and the high water after the last record."""
    return running_high_water(Verdicts.of(verdicts).event_times, start)


_NO_TIME = _MIN_EVENT_TIME_MS - 1  # below every event time and Kafka timestamp


def running_high_water(event_times: Sequence[Optional[int]],
                       start: Optional[int]) -> Tuple[List[Optional[int]], Optional[int]]:
    """Each record's high water (the greatest event time before it, None times
    skipped, starting from ``start``), and the high water after the last record."""
    if None in event_times:
        event_times = [_NO_TIME if millis is None else millis for millis in event_times]
    marks = list(accumulate(event_times, max, initial=_NO_TIME if start is None else start))
    high = marks.pop()
    if start is None:  # the running maximum rises: the records before the first time form a prefix
        marks[:bisect_right(marks, _NO_TIME)] = [None] * bisect_right(marks, _NO_TIME)
    return marks, None if high == _NO_TIME else high


def batch_from_records(records: Sequence[SourceRecord], contract: Optional[EventContract],
                       time_source: str = "field") -> RecordBatch:
    """A :data:`SOURCES` batch of records that already carry their sources and high
    waters (for example the archive's, or a replay's). With ``time_source``
    ``record`` a valid event's event time is its source's Kafka timestamp
    (:func:`time_by_kafka_timestamps`)."""
    values = [record.value for record in records]
    verdicts = decode_values(contract, values) if contract is not None else None
    if verdicts is not None and time_source == "record":
        time_by_kafka_timestamps(verdicts, [record.source.get("timestamp_ms") for record in records])
    return RecordBatch(
        origin=(SOURCES,),
        values=values,
        positions=list(range(len(values))),
        high_waters=[record.high_water_ms for record in records],
        verdicts=verdicts,
        sources=[record.source for record in records],
    )


def time_by_kafka_timestamps(verdicts: Verdicts, stamps: Sequence[Optional[int]]) -> None:
    """Sets each valid event's event time to its record's Kafka timestamp (the
    ``record`` time source; the time field was still checked). A record with none
    (None or negative: a pre-0.10 message format) keeps its field's; one stamped
    past the year 9999 (a broker takes any 64-bit time) is refused as
    ``bad_timestamp``, as such a time field is."""
    times = verdicts.event_times
    for index, stamp in enumerate(stamps):
        if stamp is None or stamp < 0 or times[index] is None:
            continue
        if stamp <= _MAX_EVENT_TIME_MS:
            times[index] = stamp
            continue
        verdicts.refusals[index] = Refusal(REASON_BAD_TIMESTAMP, "BadTimestamp",
                                           f"Kafka timestamp {stamp} is out of range (years 1 to 9999)")
        verdicts.event_ids[index] = times[index] = None
        for column in (*verdicts.key_columns, *verdicts.value_columns):
            column[index] = None


# -- the column decoder -------------------------------------------------------------


def _decode_json_columns(contract: EventContract, values: Sequence[bytes], fast) -> Verdicts:
    """:func:`decode_values` for JSON with an ID field, a column at a time.

    Each column gets one type and range check over the whole batch (C loops: set,
    min, max); a record whose field fails its column's check (or that neither
    msgspec nor orjson reads, or is not an object, or may nest deeper than the
    contract allows) is "unsure" and takes ``fast`` (the per-record
    checks) and then the reference, exactly what it took before. The column checks
    accept a subset of what the per-record checks accept, with the same result: a
    non-empty string or 64-bit integer ID (as its decimal text), an integer event
    time in range, string or 64-bit integer key fields (as text), integer (64-bit)
    or float (|x| < 2**63) values.
    """
    relax_gc()
    fields = _field_reader(contract).read(values)
    _count_records_without_the_id(contract, fields)
    unsure = set(fields.others)
    if max(map(len, values)) > MAX_JSON_NESTING:  # only a record this long can nest too deep
        unsure.update(index for index, raw in enumerate(values) if json_nests_too_deep(raw))
    column = fields.column

    event_ids = _text_column(column(contract.id_field), unsure, nonempty=True)
    event_times = column(contract.time_field)
    _check(event_times, lambda item: type(item) is int and _MIN_EVENT_TIME_MS <= item <= _MAX_EVENT_TIME_MS,
           {int}, unsure, low=_MIN_EVENT_TIME_MS, high=_MAX_EVENT_TIME_MS)
    key_chars = _key_chars_surely_short(contract)
    key_columns = tuple(_text_column(column(name), unsure, max_chars=key_chars) for name in contract.key_fields)
    value_columns = tuple(column(name) for name in contract.value_fields)
    for numbers in value_columns:
        _check(numbers, _plain_number, {int, float}, unsure, low=-_FLOAT_FROM_BIG_INT, high=_FLOAT_FROM_BIG_INT,
               strict=True)
    refusals: Dict[int, Refusal] = {}
    for index in unsure:
        raw = values[index]
        verdict = fast(raw)
        if verdict is None:
            verdict = reference_verdict(contract, raw)
        if type(verdict) is Decoded:
            event_ids[index], event_times[index] = verdict.event_id, verdict.event_time_ms
            for keys, part in zip(key_columns, verdict.key):
                keys[index] = part
            for numbers, name in zip(value_columns, contract.value_fields):
                numbers[index] = verdict.values[name]
        else:
            refusals[index] = verdict
            event_ids[index] = event_times[index] = None
            for each in (*key_columns, *value_columns):
                each[index] = None
    return Verdicts(event_ids, event_times, key_columns, tuple(contract.value_fields), value_columns, refusals)


_ID_WARNED = False  # _count_records_without_the_id has warned in this process
_ID_WARNING_BATCH = 100  # the fewest records of a batch that lack the ID field for it to warn
_RECORDS_WITHOUT_ID = metrics.counter(metrics.RECORDS_WITHOUT_ID)  # made once: Beam finds the step's at inc()


def _count_records_without_the_id(contract: EventContract, fields: "_Fields") -> None:
    """Counts the JSON objects of a batch without ``--id_field`` (None in its
    column: absent, or null) in ``records_without_id``, which the run's summary
    reads, and warns once per process when none of at least _ID_WARNING_BATCH has
    it: a misspelled field name derives every ID from the record's content,
    silently, and copies that differ in any field are then counted twice. Records
    that are not objects (malformed) do not count. One C-level count per batch."""
    global _ID_WARNED
    ids = fields.columns[contract.id_field]
    objects = len(ids) - len(fields.others)
    without = ids.count(None) - len(fields.others)  # a record that is not an object has None there too
    if without:
        _RECORDS_WITHOUT_ID.inc(without)
    if _ID_WARNED or objects < _ID_WARNING_BATCH or without < objects:
        return
    _ID_WARNED = True
    import logging

    logging.getLogger(__name__).warning(
        "--id_field %r is in none of %s records read together: their IDs are derived from their content, so "
        "copies that differ in any field count twice; name the records' ID field, or give --id_field='' to derive "
        "IDs on purpose", contract.id_field, f"{objects:,}")


class _Fields(NamedTuple):
    """A batch's JSON records read into one list per field the contract names."""

    columns: Dict[str, List[Any]]  # field name -> each record's value, None where it lacks the field
    others: Set[int]  # the indices of the records that are not JSON objects (or not JSON)

    def column(self, name: str) -> List[Any]:
        """A fresh list: the column decoder fills in the unsure records' items."""
        return list(self.columns[name])


class _JsonFieldReader:
    """Reads a batch of JSON records into a column per field the contract names.

    msgspec decodes each record into a struct of every field its records have shown
    (the contract's first), each typed ``Any``: it parses and checks the whole record
    as orjson does (UTF-8, syntax, numbers a double or Python's int holds, no
    constants, nesting) and builds no dict. A record it refuses (a field the struct
    lacks, or anything orjson refuses too) is read with orjson, and its fields are
    learned for the next batches; past ``MAX_FIELDS`` fields (records with
    free-form keys) orjson reads every record. The column decoder checks the
    columns exactly as it checks orjson's. Without msgspec, orjson reads every record.
    """

    MAX_FIELDS = 64

    def __init__(self, names: Sequence[str]):
        self._wanted = tuple(dict.fromkeys(names))  # the contract's fields
        self._names = list(self._wanted)  # and the others learned, in the order seen
        self._lock = Lock()
        self._decoder = self._build(self._names)

    def _build(self, names: List[str]):
        """(decode, one getter per wanted field, a record with every field None)."""
        if _msgspec is None or len(names) > self.MAX_FIELDS or not all(map(_struct_can_name, names)):
            return None
        attributes = [f"f{index}" for index in range(len(names))]
        struct = _msgspec.defstruct("JsonRecord", [(attribute, Any, None) for attribute in attributes],
                                    rename=dict(zip(attributes, names)), forbid_unknown_fields=True, gc=False)
        getters = [attrgetter(attribute) for attribute in attributes[:len(self._wanted)]]
        return _msgspec.json.Decoder(struct).decode, getters, struct()

    def read(self, values: Sequence[bytes]) -> _Fields:
        decoder = self._decoder  # one snapshot: another thread may learn fields meanwhile
        if decoder is None:
            columns, objects = self._read_with_orjson(values)
            return _Fields(columns, {index for index, obj in enumerate(objects) if type(obj) is not dict})
        decode, getters, empty = decoder
        refused: List[int] = []
        try:
            records = list(map(decode, values))
        except Exception:  # noqa: BLE001 - a record msgspec refuses: orjson reads it below
            records = []
            for index, raw in enumerate(values):
                try:
                    records.append(decode(raw))
                except Exception:  # noqa: BLE001
                    records.append(empty)
                    refused.append(index)
        columns = {name: list(map(getter, records)) for name, getter in zip(self._wanted, getters)}
        if not refused:
            return _Fields(columns, set())
        read, objects = self._read_with_orjson([values[index] for index in refused])
        for name, column in columns.items():
            for index, item in zip(refused, read[name]):
                column[index] = item
        self._learn(objects)
        return _Fields(columns, {index for index, obj in zip(refused, objects) if type(obj) is not dict})

    def _read_with_orjson(self, values: Sequence[bytes]) -> Tuple[Dict[str, List[Any]], List[Any]]:
        """The wanted columns, and each record as orjson decodes it (None: refused)."""
        try:
            objects = list(map(_orjson.loads, values))
        except Exception:  # noqa: BLE001 - a record orjson refuses: find it, and go on with the rest
            objects = [_loads_or_none(raw) for raw in values]
        dicts = [obj if type(obj) is dict else {} for obj in objects]
        return {name: [obj.get(name) for obj in dicts] for name in self._wanted}, objects

    def _learn(self, objects: Iterable[Any]) -> None:
        """Adds the fields of these records that the struct lacks."""
        # A name msgspec cannot take stays unknown: records with it are read with orjson.
        new = [name for obj in objects if type(obj) is dict for name in obj
               if name not in self._names and _struct_can_name(name)]
        if not new:
            return
        with self._lock:
            self._names = self._names + [name for name in dict.fromkeys(new) if name not in self._names]
            self._decoder = self._build(self._names)


def _struct_can_name(name: str) -> bool:
    """Whether msgspec takes ``name`` as a struct field's JSON name: not with a
    quote, a backslash or a control character (it raises ValueError, and a record
    with such a field name, valid JSON, failed the whole batch)."""
    return '"' not in name and "\\" not in name and all(char >= " " for char in name)


_FIELD_READERS: Dict[Tuple[str, ...], _JsonFieldReader] = {}


def _field_reader(contract: EventContract) -> _JsonFieldReader:
    """The field reader of a contract's fields, one per process (it learns)."""
    names = (contract.id_field, contract.time_field, *contract.key_fields, *contract.value_fields)
    reader = _FIELD_READERS.get(names)
    if reader is None:
        reader = _FIELD_READERS.setdefault(names, _JsonFieldReader(names))
    return reader


def _loads_or_none(raw: bytes) -> Any:
    try:
        return _orjson.loads(raw)
    except Exception:
        return None


def _text_column(items: List[Any], unsure: set, nonempty: bool = False,
                 max_chars: Optional[int] = None) -> List[Optional[str]]:
    """A column of text fields: strings as they are, 64-bit integers as their
    decimal text; the index of anything else (or of an empty string, with
    ``nonempty``, of a string with a NUL character, or of one longer than
    ``max_chars``, which the contract may refuse) added to ``unsure``."""
    kinds = set(map(type, items))
    if (kinds == {str} and not (nonempty and "" in items) and "\x00" not in "".join(items)
            and (max_chars is None or max(map(len, items)) <= max_chars)):
        return items
    if kinds == {int} and _LONG_MIN <= min(items) and max(items) <= _LONG_MAX:
        return list(map(str, items))
    texts: List[Optional[str]] = []
    for index, item in enumerate(items):
        kind = type(item)
        if (kind is str and (item or not nonempty) and "\x00" not in item
                and (max_chars is None or len(item) <= max_chars)):
            texts.append(item)
        elif kind is int and _LONG_MIN <= item <= _LONG_MAX:
            texts.append(str(item))
        else:
            unsure.add(index)
            texts.append(None)
    return texts


def _key_chars_surely_short(contract: EventContract) -> int:
    """How many characters each key field may have for the key to be surely within
    MAX_KEY_BYTES (4 bytes a character at most in UTF-8); a longer one is checked
    exactly, by the per-record path."""
    return MAX_KEY_BYTES // (4 * len(contract.key_fields))


def _plain_number(item: Any) -> bool:
    kind = type(item)
    if kind is int:
        return _LONG_MIN <= item <= _LONG_MAX
    return kind is float and -_FLOAT_FROM_BIG_INT < item < _FLOAT_FROM_BIG_INT


def _check(items: List[Any], accepts, kinds: set, unsure: set, low: float, high: float,
           strict: bool = False) -> None:
    """Adds to ``unsure`` the index of each item ``accepts`` refuses; first a
    check of the whole column (its types within ``kinds``, within ``low``..``high``,
    exclusive with ``strict``) that passes a clean column in C."""
    if set(map(type, items)) <= kinds:
        least, most = min(items), max(items)
        if (low < least and most < high) if strict else (low <= least and most <= high):
            return
    unsure.update(index for index, item in enumerate(items) if not accepts(item))


# -- the fast per-record decoder -----------------------------------------------------


def _fast_decoder(contract: EventContract):
    """A function raw -> Decoded, or None when the record must take the reference
    path. Only for JSON with an ID field: a derived ID hashes the whole document as
    the reference decoder reads it."""
    if _orjson is None or contract.input_format != "json" or not contract.id_field:
        return None
    loads = _orjson.loads
    new_decoded = tuple.__new__  # a NamedTuple without its keyword-parsing constructor
    id_field, time_field = contract.id_field, contract.time_field
    key_fields, value_fields = contract.key_fields, contract.value_fields
    key_chars = _key_chars_surely_short(contract)

    def decode(raw: bytes) -> Optional[Decoded]:
        if json_nests_too_deep(raw):  # orjson reads 1,024 levels; the contract refuses more than 512
            return None
        try:
            obj = loads(raw)
        except Exception:  # orjson refuses more than json does: let the reference decide
            return None
        if type(obj) is not dict:
            return None
        event_id = obj.get(id_field)
        kind = type(event_id)
        if kind is int:
            if not _LONG_MIN <= event_id <= _LONG_MAX:
                return None
            event_id = str(event_id)
        elif kind is not str or not event_id or "\x00" in event_id:
            return None
        moment = obj.get(time_field)
        kind = type(moment)
        if kind is int:
            if not _MIN_EVENT_TIME_MS <= moment <= _MAX_EVENT_TIME_MS:
                return None
            event_time_ms = moment
        elif kind is str:
            try:
                event_time_ms = parse_event_time_ms(moment, time_field)
            except RecordError:
                return None
        else:
            return None
        key = []
        for name in key_fields:
            part = obj.get(name)
            kind = type(part)
            if kind is str and "\x00" not in part and len(part) <= key_chars:
                key.append(part)
            elif kind is int and _LONG_MIN <= part <= _LONG_MAX:
                key.append(str(part))
            else:
                return None
        values = {}
        for name in value_fields:
            number = obj.get(name)
            kind = type(number)
            if kind is int:
                if not _LONG_MIN <= number <= _LONG_MAX:
                    return None
            elif kind is not float or not -_FLOAT_FROM_BIG_INT < number < _FLOAT_FROM_BIG_INT:
                return None
            values[name] = number
        return new_decoded(Decoded, (event_id, event_time_ms, tuple(key), values))

    return decode
