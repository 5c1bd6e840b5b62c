"""onceflow's transforms for Beam YAML, configured in plain YAML.

Beam YAML works on schema'd PCollections of ``beam.Row``; these wrappers convert
rows to onceflow's records and events, apply the transforms of
:mod:`onceflow.transforms` and :mod:`onceflow.io`, and convert back to rows of
plain types. Register them in a pipeline file with a provider of ``type:
python`` (no ``packages``: Beam then imports them from the environment that runs
the pipeline, nothing is installed)::

    providers:
      - type: python
        config: {}
        transforms:
          ReadRecordsFromFiles: onceflow.yaml_provider.ReadRecordsFromFiles
          ParseEvents: onceflow.yaml_provider.ParseEvents
          DedupByEventId: onceflow.yaml_provider.DedupByEventId
          WindowedAggregate: onceflow.yaml_provider.WindowedAggregate
          AggregateRecords: onceflow.yaml_provider.AggregateRecords
          WriteRows: onceflow.yaml_provider.WriteRows
          WriteDeadLetters: onceflow.yaml_provider.WriteDeadLetters

or from Python with :func:`provider` (an ``InlineProvider``) and
``YamlTransform(spec, providers=provider())``. See ``templates/yaml/``.

Row shapes:

* record: ``raw`` (bytes), ``source`` (JSON text, e.g. ``{"file":..,"line":..}``),
  ``high_water_ms`` (int or null). :class:`ReadRecordsFromFiles` emits them;
  :class:`ParseEvents` and :class:`AggregateRecords` also take any row with one
  text or bytes field (``line`` from Beam's ``ReadFromText``, or ``value``), as a
  record with no source and no high water (so nothing is judged too late, and
  identical refused lines share one ``dlq_id``: the queue's readers count them
  once).
* event: ``event_id``, ``event_time_ms``, the key fields (text), ``values`` (JSON
  text of the value fields), and the record's ``raw``, ``source``,
  ``high_water_ms``.
* aggregate row: the key fields (text), ``window_start``, ``window_end`` (epoch
  ms, UTC), ``event_count`` and ``count`` (int), other aggregates (float).
* dead letter: ``reason``, ``stage``, ``error_class``, ``message``, ``raw``,
  ``source``, ``high_water_ms``, ``event_id``, ``event_time_ms``.

Durations are strings (``"60s"``, ``"5m"``), aggregates a list as in
``--aggregate`` (``"count,sum:qty"``), key fields ``"store"`` or a list, a sink a
``--sink`` URL and a dead-letter queue a ``--dlq`` value.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import apache_beam as beam
from apache_beam.typehints.row_type import RowTypeConstraint

from onceflow import transforms
from onceflow.aggregates import AggregateSpec, parse_aggregates, value_fields as aggregate_value_fields
from onceflow.deadletter import DeadLetter
from onceflow.errors import UsageError
from onceflow.events import Event, EventContract, SourceRecord
from onceflow.options import positive_int, window_spec_of
from onceflow.rows import RowSchema
from onceflow.versions import ONCEFLOW_VERSION
from onceflow.windowing import WindowSpec, parse_duration_ms

PIPELINE_NAME = "yaml"
_TEXT_FIELDS = ("value", "line")
_RECORD_FIELDS = ("raw", "source", "high_water_ms")

RECORD_ROW = RowTypeConstraint.from_fields([
    ("raw", bytes), ("source", str), ("high_water_ms", Optional[int]),
])
DEAD_LETTER_ROW = RowTypeConstraint.from_fields([
    ("reason", str), ("stage", str), ("error_class", str), ("message", str), ("raw", bytes),
    ("source", str), ("high_water_ms", Optional[int]), ("event_id", Optional[str]),
    ("event_time_ms", Optional[int]),
])


# -- configuration in plain YAML ---------------------------------------------------

def _fields(value: Union[str, Sequence[str], None], what: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(item).strip() for item in items)
    if any(not name for name in names):
        raise ValueError(f"{what}: {value!r} has an empty name")
    return names


def _aggregates(value: Union[str, Sequence[str]]) -> Tuple[AggregateSpec, ...]:
    text = value if isinstance(value, str) else ",".join(str(item) for item in value)
    return parse_aggregates(text)


def _duration(value: Union[str, int, None], what: str) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        return parse_duration_ms(str(value))
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def _as_job_checks(check, *args: Any) -> Any:
    """``check(*args)``, one of the job's flag checks, its UsageError as the
    ValueError Beam YAML reports for a transform's configuration."""
    try:
        return check(*args)
    except UsageError as error:
        raise ValueError(str(error)) from None


def _window_spec(window: str, window_period: Optional[str], allowed_lateness: str) -> WindowSpec:
    """Checked as the job checks --window, --window_period and --allowed_lateness."""
    return _as_job_checks(window_spec_of, window, window_period, allowed_lateness, "")


def _shards(value: Any) -> int:
    return _as_job_checks(positive_int, value, "shards")


def _contract(key_fields, time_field, id_field, aggregates, value_fields, input_format,
              avro_writer_schema: Optional[dict] = None) -> EventContract:
    values = _fields(value_fields, "value_fields")
    if not values and aggregates is not None:
        values = aggregate_value_fields(_aggregates(aggregates))
    if input_format not in ("json", "avro"):
        raise ValueError(f"input_format: {input_format!r} is not json or avro (registry-framed records are read "
                         "from Kafka by the aggregate job)")
    if input_format == "avro" and avro_writer_schema is None:
        raise ValueError("input_format avro: give avro_schema, an Avro file the records were written to (its "
                         "header holds their schema) or a JSON schema file (.avsc)")
    if input_format != "avro" and avro_writer_schema is not None:
        raise ValueError("avro_schema: only avro records take a writer schema; add input_format: avro")
    return EventContract(time_field=str(time_field).strip(), key_fields=_fields(key_fields, "key_fields"),
                         value_fields=values, id_field=(str(id_field).strip() or None) if id_field else None,
                         input_format=input_format,
                         avro_writer_schema=avro_writer_schema)


def _avro_schema(path: Optional[str]) -> Optional[dict]:
    """The writer schema in an Avro container file's header, or a JSON schema file."""
    if path is None:
        return None
    from onceflow.io.files import read_avro_writer_schema

    try:
        return read_avro_writer_schema(str(path))
    except OSError as error:
        raise ValueError(f"avro_schema: cannot read {path} ({error.strerror or error})") from None
    except Exception:  # noqa: BLE001 - not a container file: a JSON schema, or neither
        pass
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(str(path)) as handle:
        text = handle.read()
    try:
        schema = json.loads(text)
    except ValueError:
        schema = None
    if not isinstance(schema, dict):
        raise ValueError(f"avro_schema: {path} is neither an Avro container file nor a JSON schema (.avsc)")
    return schema


# -- rows <-> onceflow's values ----------------------------------------------------

def _as_dict(row: Any) -> Dict[str, Any]:
    if isinstance(row, dict):
        return row
    if hasattr(row, "_asdict"):
        return dict(row._asdict())
    return dict(row.__dict__)


def _source_text(source: Any) -> str:
    return json.dumps(dict(source or {}), sort_keys=True, separators=(",", ":"), default=str)


def _to_bytes(value: Any) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def row_to_record(row: Any, field: Optional[str] = None) -> SourceRecord:
    """A record row, or a row with one text/bytes field (``field``, else ``value``
    or ``line``), as a :class:`SourceRecord`."""
    data = _as_dict(row)
    if field is None and "raw" in data:
        source = data.get("source")
        return SourceRecord(_to_bytes(data["raw"]), json.loads(source) if source else {},
                            data.get("high_water_ms"))
    name = field or next((name for name in _TEXT_FIELDS if name in data), None)
    if name is None:
        if len(data) != 1:
            raise ValueError(f"a record row needs raw, value or line (or config field:); got {sorted(data)}")
        name = next(iter(data))
    return SourceRecord(_to_bytes(data[name]), {}, None)


def record_to_row(record: SourceRecord) -> beam.Row:
    return beam.Row(raw=record.value, source=_source_text(record.source), high_water_ms=record.high_water_ms)


def letter_to_row(letter: DeadLetter) -> beam.Row:
    return beam.Row(reason=letter.reason, stage=letter.stage, error_class=letter.error_class,
                    message=letter.message, raw=letter.record.value, source=_source_text(letter.record.source),
                    high_water_ms=letter.record.high_water_ms, event_id=letter.event_id,
                    event_time_ms=letter.event_time_ms)


def row_to_letter(row: Any) -> DeadLetter:
    data = _as_dict(row)
    source = data.get("source")
    record = SourceRecord(_to_bytes(data["raw"]), json.loads(source) if source else {}, data.get("high_water_ms"))
    return DeadLetter(record, data["stage"], data["reason"], data.get("error_class") or data["reason"],
                      data.get("message") or "", data.get("event_id"), data.get("event_time_ms"))


def _check_names(key_fields: Sequence[str], reserved: Iterable[str], what: str) -> None:
    clash = set(key_fields) & set(reserved)
    if clash:
        raise ValueError(f"key field {sorted(clash)[0]!r} collides with a column of the {what} row")


_EVENT_COLUMNS = ("event_id", "event_time_ms", "values", *_RECORD_FIELDS)


def event_row_type(key_fields: Sequence[str]) -> RowTypeConstraint:
    _check_names(key_fields, _EVENT_COLUMNS, "event")
    return RowTypeConstraint.from_fields([
        ("event_id", str), ("event_time_ms", int), *((name, str) for name in key_fields),
        ("values", str), ("raw", bytes), ("source", str), ("high_water_ms", Optional[int]),
    ])


def event_to_row(event: Event, key_fields: Sequence[str]) -> beam.Row:
    return beam.Row(event_id=event.event_id, event_time_ms=event.event_time_ms,
                    **dict(zip(key_fields, event.key)),
                    values=json.dumps(dict(event.values), sort_keys=True, separators=(",", ":")),
                    raw=event.record.value, source=_source_text(event.record.source),
                    high_water_ms=event.record.high_water_ms)


def row_to_event(row: Any, key_fields: Sequence[str], value_names: Sequence[str] = ()) -> Event:
    """An event row (from ParseEvents) as an :class:`Event`; ValueError naming a value
    the aggregates read that the row does not hold (ParseEvents decodes only the
    value fields of its own aggregates or value_fields)."""
    data = _as_dict(row)
    record = SourceRecord(_to_bytes(data["raw"]), json.loads(data["source"]) if data.get("source") else {},
                          data.get("high_water_ms"))
    values = json.loads(data["values"]) if data.get("values") else {}
    missing = [name for name in value_names if name not in values]
    if missing:
        raise ValueError(f"WindowedAggregate: an event row holds no value {missing[0]!r}: give ParseEvents the "
                         "same aggregates (or value_fields naming it)")
    return Event(data["event_id"], data["event_time_ms"], tuple(str(data[name]) for name in key_fields),
                 values, record)


def aggregate_row_type(key_fields: Sequence[str], aggregates: Sequence[AggregateSpec]) -> RowTypeConstraint:
    schema = RowSchema(tuple(key_fields), tuple(aggregates))  # checks names and collisions
    kinds = {"key": str, "timestamp": int, "integer": int, "number": Optional[float]}
    return RowTypeConstraint.from_fields([(column, kinds[schema.column_kind(column)]) for column in schema.columns])


def _aggregate_row_to_beam(row: Dict[str, Any], columns: Sequence[str], kinds: Dict[str, str]) -> beam.Row:
    out = {}
    for column in columns:
        value = row.get(column)
        if kinds[column] == "number" and value is not None:
            value = float(value)
        out[column] = value
    return beam.Row(**out)


def _inputs(inputs: Any) -> List[beam.PCollection]:
    if isinstance(inputs, beam.PCollection):
        return [inputs]
    return list(inputs.values()) if isinstance(inputs, dict) else list(inputs)


def _flatten(inputs: Any, label: str) -> beam.PCollection:
    """One PCollection from a YAML ``input:`` of one or several."""
    pcolls = _inputs(inputs)
    if len(pcolls) == 1:
        return pcolls[0]
    return tuple(pcolls) | label >> beam.Flatten()


def _require_columns(inputs: Any, names: Iterable[str], transform: str, hint: str) -> None:
    """ValueError, when the pipeline is built, if an input's rows (where their schema
    is known) lack a column the transform reads: otherwise each row fails in a worker."""
    for pcoll in _inputs(inputs):
        row_type = pcoll.element_type
        if not isinstance(row_type, RowTypeConstraint):
            continue
        held = [name for name, _ in row_type._fields]
        missing = [name for name in names if name not in held]
        if missing:
            raise ValueError(f"{transform}: its input rows have no {', '.join(map(repr, missing))} (they hold "
                             f"{', '.join(held)}); {hint}")


def _require_record_field(inputs: Any, field: Optional[str], transform: str) -> None:
    """The input rows hold a record: ``field``, else ``raw``, ``value``, ``line``
    or a single field (see :func:`row_to_record`)."""
    if field is not None:
        _require_columns(inputs, (field,), transform, "name the field that holds the raw record in field:")
        return
    for pcoll in _inputs(inputs):
        row_type = pcoll.element_type
        if isinstance(row_type, RowTypeConstraint):
            held = [name for name, _ in row_type._fields]
            if len(held) != 1 and not {"raw", *_TEXT_FIELDS} & set(held):
                raise ValueError(f"{transform}: its input rows hold no raw, value or line field (they hold "
                                 f"{', '.join(held)}); name the field that holds the raw record in field:")


def _letters_to_rows(letters: beam.PCollection) -> beam.PCollection:
    return letters | "DeadLettersToRows" >> beam.Map(letter_to_row).with_output_types(DEAD_LETTER_ROW)


# -- the transforms ----------------------------------------------------------------

def _yes_or_no(value: Any, name: str) -> bool:
    """A YAML boolean, or its text ("false" quoted is false, not a non-empty string)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{name}: {value!r} is not true or false")


class ReadRecordsFromFiles(beam.PTransform):
    """Reads JSON-lines (or Avro) files as record rows, exactly as the aggregate
    job reads them: each record's source (file and line) and the file's high
    water before it, which the lateness rule needs.

    Args:
      path: a file path or glob.
      key_fields: the key field names ("store" or a list).
      time_field: the event time field.
      id_field: the event ID field (absent: derived from the content).
      aggregates: the aggregates ("count,sum:qty"), naming the value fields.
      value_fields: the numeric value fields, when aggregates are not given.
      input_format: json or avro (default: avro for a path ending in .avro, as
        the job reads it; the first file's schema must be every file's).
    """

    def __init__(self, path: str, key_fields: Union[str, List[str]], time_field: str = "event_time",
                 id_field: Optional[str] = None, aggregates: Optional[Union[str, List[str]]] = None,
                 value_fields: Optional[Union[str, List[str]]] = None, input_format: Optional[str] = None):
        super().__init__()
        from apache_beam.io.filesystems import FileSystems

        from onceflow.io.files import first_avro_writer_schema, format_by_name

        if not FileSystems.match([path])[0].metadata_list:  # Beam's own check fails later, in a worker's traceback
            raise ValueError(f"path: nothing matches {path!r}")
        self._path = path
        input_format = input_format or format_by_name(path)
        writer_schema = None
        if input_format == "avro":
            try:
                writer_schema = first_avro_writer_schema(path, "input_format")
            except ValueError as error:
                raise ValueError(f"path: {error}") from None
        self._contract = _contract(key_fields, time_field, id_field, aggregates, value_fields, input_format,
                                   writer_schema)

    def expand(self, pbegin):
        from onceflow.io.files import ReadRecordsFromFiles as ReadRecords

        return (pbegin
                | "ReadRecords" >> ReadRecords(self._path, self._contract)
                | "ToRows" >> beam.Map(record_to_row).with_output_types(RECORD_ROW))


class _ParseRowsDoFn(beam.DoFn):
    def __init__(self, field: Optional[str]):
        self._field = field

    def process(self, row):
        yield row_to_record(row, self._field)


class ParseEvents(beam.PTransform):
    """Decodes and validates records into event rows; every refused record is a
    dead-letter row (stage parse). Outputs ``events`` and ``dead_letters``.

    Args:
      key_fields: the key field names ("store" or a list).
      time_field: the event time field.
      id_field: the event ID field (absent: derived from the content).
      aggregates: the aggregates ("count,sum:qty"), naming the value fields.
      value_fields: the numeric value fields, when aggregates are not given.
      field: the input row's field holding the raw record (default: raw, value or line).
      input_format: json or avro.
      avro_schema: for avro, the records' writer schema: an Avro file they were
        written to (its header's schema) or a JSON schema file (.avsc).
    """

    def __init__(self, key_fields: Union[str, List[str]], time_field: str = "event_time",
                 id_field: Optional[str] = None, aggregates: Optional[Union[str, List[str]]] = None,
                 value_fields: Optional[Union[str, List[str]]] = None, field: Optional[str] = None,
                 input_format: str = "json", avro_schema: Optional[str] = None):
        super().__init__()
        self._contract = _contract(key_fields, time_field, id_field, aggregates, value_fields, input_format,
                                   _avro_schema(avro_schema))
        self._field = field
        self._row_type = event_row_type(self._contract.key_fields)

    def expand(self, rows):
        _require_record_field(rows, self._field, "ParseEvents")
        key_fields = self._contract.key_fields
        parsed = (_flatten(rows, "FlattenInputs")
                  | "ToRecords" >> beam.ParDo(_ParseRowsDoFn(self._field)).with_output_types(SourceRecord)
                  | "ParseEvents" >> transforms.ParseEvents(self._contract))
        events = parsed.events | "EventsToRows" >> beam.Map(event_to_row, key_fields).with_output_types(
            self._row_type)
        return {"events": events, "dead_letters": _letters_to_rows(parsed.dead_letters)}


def _carry_row(row: Any) -> Event:
    """An event for DedupByEventId that carries its row in ``values``, and its
    record's source: of copies that differ, the first in its source is kept."""
    data = _as_dict(row)
    source = data.get("source")
    return Event(data["event_id"], data["event_time_ms"], (), data,
                 SourceRecord(_to_bytes(data.get("raw") or b""), json.loads(source) if source else {}, None))


class DedupByEventId(beam.PTransform):
    """Keeps the first copy of each event ID among event rows (from ParseEvents).

    Args:
      horizon: how long after its event time an ID is remembered, e.g. "6m"
        (window size + allowed lateness; see onceflow.transforms.DedupByEventId).
    """

    def __init__(self, horizon: str):
        super().__init__()
        self._horizon_ms = _duration(horizon, "horizon")
        if not self._horizon_ms:
            raise ValueError("horizon: give a duration greater than 0, e.g. 6m")

    def expand(self, rows):
        _require_columns(rows, ("event_id", "event_time_ms"), "DedupByEventId", "give it ParseEvents' events")
        rows = _flatten(rows, "FlattenInputs")
        row_type = rows.element_type
        return (rows
                | "ToEvents" >> beam.Map(_carry_row).with_output_types(Event)
                | "DedupByEventId" >> transforms.DedupByEventId(self._horizon_ms)
                | "ToRows" >> beam.Map(lambda event: beam.Row(**event.values)).with_output_types(row_type))


class WindowedAggregate(beam.PTransform):
    """Aggregates event rows (from ParseEvents) per key in event-time windows, as
    onceflow.transforms.WindowedAggregate. Outputs ``rows`` and ``dead_letters``
    (too-late events, stage aggregate).

    Args:
      key_fields: the key field names ("store" or a list).
      window: the window size, e.g. "60s".
      aggregates: e.g. "count,sum:qty,max:price".
      window_period: for sliding windows, how often one starts, e.g. "30s".
      allowed_lateness: e.g. "5m" (the default).
      early_firing: an early pane interval in whole seconds, e.g. "10s".
      dedup: drop repeated event IDs (the default).
    """

    def __init__(self, key_fields: Union[str, List[str]], window: str, aggregates: Union[str, List[str]],
                 window_period: Optional[str] = None, allowed_lateness: str = "5m",
                 early_firing: Optional[str] = None, dedup: bool = True):
        super().__init__()
        self._key_fields = _fields(key_fields, "key_fields")
        self._aggregates = _aggregates(aggregates)
        self._spec = _window_spec(window, window_period, allowed_lateness)
        self._early_ms = _duration(early_firing, "early_firing")
        self._dedup = _yes_or_no(dedup, "dedup")
        self._row_type = aggregate_row_type(self._key_fields, self._aggregates)
        self._transform = transforms.WindowedAggregate(self._key_fields, self._spec, self._aggregates,
                                                       early_firing_ms=self._early_ms, dedup=self._dedup)

    def expand(self, rows):
        _require_columns(rows, ("event_id", "event_time_ms", *self._key_fields, "values", *_RECORD_FIELDS),
                         "WindowedAggregate", "give it ParseEvents' events, with the same key_fields")
        value_names = aggregate_value_fields(self._aggregates)
        aggregated = (_flatten(rows, "FlattenInputs")
                      | "ToEvents" >> beam.Map(row_to_event, self._key_fields, value_names).with_output_types(Event)
                      | "WindowedAggregate" >> self._transform)
        return {"rows": _rows_out(aggregated.rows, self._key_fields, self._aggregates, self._row_type),
                "dead_letters": _letters_to_rows(aggregated.dead_letters)}


def _rows_out(rows: beam.PCollection, key_fields, aggregates, row_type) -> beam.PCollection:
    schema = RowSchema(tuple(key_fields), tuple(aggregates))
    kinds = {column: schema.column_kind(column) for column in schema.columns}
    return rows | "ToRows" >> beam.Map(_aggregate_row_to_beam, schema.columns, kinds).with_output_types(row_type)


class AggregateRecords(beam.PTransform):
    """The batched path the aggregate job runs (onceflow.transforms.BatchRecords
    and AggregateBatches): record rows to aggregate rows and dead letters, parse
    included. Outputs ``rows`` and ``dead_letters``.

    Args:
      key_fields: the key field names ("store" or a list).
      window: the window size, e.g. "60s".
      aggregates: e.g. "count,sum:qty,max:price".
      time_field: the event time field.
      id_field: the event ID field (absent: derived from the content).
      window_period: for sliding windows, how often one starts, e.g. "30s".
      allowed_lateness: e.g. "5m" (the default).
      early_firing: an early pane interval in whole seconds, e.g. "10s".
      field: the input row's field holding the raw record (default: raw, value or line).
      shards: the parallelism of the aggregation step.
      input_format: json or avro.
      avro_schema: for avro, the records' writer schema: an Avro file they were
        written to (its header's schema) or a JSON schema file (.avsc).
    """

    def __init__(self, key_fields: Union[str, List[str]], window: str, aggregates: Union[str, List[str]],
                 time_field: str = "event_time", id_field: Optional[str] = None,
                 window_period: Optional[str] = None, allowed_lateness: str = "5m",
                 early_firing: Optional[str] = None, field: Optional[str] = None, shards: int = 8,
                 input_format: str = "json", avro_schema: Optional[str] = None):
        super().__init__()
        self._contract = _contract(key_fields, time_field, id_field, aggregates, None, input_format,
                                   _avro_schema(avro_schema))
        self._aggregates = _aggregates(aggregates)
        self._field = field
        self._row_type = aggregate_row_type(self._contract.key_fields, self._aggregates)
        self._transform = transforms.AggregateBatches(
            self._contract.key_fields, _window_spec(window, window_period, allowed_lateness), self._aggregates,
            early_firing_ms=_duration(early_firing, "early_firing"), shards=_shards(shards))

    def expand(self, rows):
        _require_record_field(rows, self._field, "AggregateRecords")
        aggregated = (_flatten(rows, "FlattenInputs")
                      | "ToRecords" >> beam.ParDo(_ParseRowsDoFn(self._field)).with_output_types(SourceRecord)
                      | "BatchRecords" >> transforms.BatchRecords(self._contract)
                      | "AggregateBatches" >> self._transform)
        return {"rows": _rows_out(aggregated.rows, self._contract.key_fields, self._aggregates, self._row_type),
                "dead_letters": _letters_to_rows(aggregated.dead_letters)}


def _refuse_registry_format(target: Any, setting: str) -> None:
    if target.scheme == "kafka" and target.option("format") == "avro_registry":
        raise ValueError(f"{setting}: ?format=avro_registry needs a schema registry, which these transforms are not "
                         "given; write JSON (no ?format), or run the aggregate job with --schema_registry_url")


class WriteRows(beam.PTransform):
    """Upserts aggregate rows into the sink a URL names (as --sink: sqlite:///PATH.db,
    postgresql://..., file:///DIR?format=parquet, ...), guarded by event_count.
    The table (or folder) is created when the pipeline is built.

    Args:
      sink: the sink URL.
      key_fields: the key field names ("store" or a list).
      aggregates: the aggregates, as given to WindowedAggregate.
      batch_size: rows per write.
    """

    def __init__(self, sink: str, key_fields: Union[str, List[str]], aggregates: Union[str, List[str]],
                 batch_size: int = 500):
        super().__init__()
        from onceflow.io import sinks

        self._schema = RowSchema(_fields(key_fields, "key_fields"), _aggregates(aggregates))
        self._target = sinks.parse_sink_url(sink)
        _refuse_registry_format(self._target, "sink")
        sinks.prepare_sink(self._target, self._schema)
        self._transform = sinks.WriteRows(self._target, self._schema, int(batch_size))

    def expand(self, rows):
        columns = self._schema.columns
        _require_columns(rows, columns, "WriteRows", "give it the rows of WindowedAggregate or AggregateRecords, "
                         "with the same key_fields and aggregates")
        return (_flatten(rows, "FlattenInputs")
                | "ToDicts" >> beam.Map(lambda row: {c: getattr(row, c) for c in columns})
                | "WriteRows" >> self._transform)


class WriteDeadLetters(beam.PTransform):
    """Writes dead-letter rows to the queue a --dlq value names: a file path (JSON
    lines) or postgresql://.../DB?table=NAME. Several inputs are merged.

    Args:
      dlq: the dead-letter queue.
      pipeline: the pipeline name written in each envelope.
    """

    def __init__(self, dlq: str, pipeline: str = PIPELINE_NAME):
        super().__init__()
        from onceflow.io import dlq as dlq_io

        target = dlq_io.parse_dlq_target(dlq)
        _refuse_registry_format(target, "dlq")
        dlq_io.prepare_dlq(target)
        self._transform = dlq_io.WriteDeadLetters(target, pipeline, ONCEFLOW_VERSION)

    def expand(self, rows):
        _require_columns(rows, ("reason", "stage", "raw"), "WriteDeadLetters",
                         "give it the dead_letters of ParseEvents, WindowedAggregate or AggregateRecords")
        return (_flatten(rows, "FlattenInputs")
                | "ToDeadLetters" >> beam.Map(row_to_letter).with_output_types(DeadLetter)
                | "WriteDeadLetters" >> self._transform)


# -- registering -------------------------------------------------------------------

TRANSFORMS = {
    "ReadRecordsFromFiles": ReadRecordsFromFiles,
    "ParseEvents": ParseEvents,
    "DedupByEventId": DedupByEventId,
    "WindowedAggregate": WindowedAggregate,
    "AggregateRecords": AggregateRecords,
    "WriteRows": WriteRows,
    "WriteDeadLetters": WriteDeadLetters,
}


def provider():
    """An InlineProvider of every transform above, for ``YamlTransform(spec,
    providers=provider())`` from Python."""
    from apache_beam.yaml.yaml_provider import InlineProvider

    return InlineProvider(dict(TRANSFORMS), no_input_transforms=("ReadRecordsFromFiles",))


def provider_spec() -> Dict[str, Any]:
    """The ``providers:`` entry of a pipeline file that registers them by name."""
    return {"type": "python", "config": {},
            "transforms": {name: f"{__name__}.{name}" for name in TRANSFORMS}}
