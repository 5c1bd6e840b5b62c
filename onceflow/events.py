"""The event contract: what a raw record must contain, and how it becomes an event.

Everything here is a pure function of its arguments (no clocks, no randomness, no
I/O but the cached fetch of a registry's schemas by their immutable IDs), so the
per-element transforms, the batched paths and the tests share one definition of a
valid event:

* :class:`SourceRecord` is what every reader emits: the raw bytes, where they came
  from, and the source's watermark for that partition or file just before them.
* :class:`EventContract` names the fields (``--id_field``, ``--time_field``,
  ``--key_fields``, the value fields the aggregates read) and the input format, and
  carries the Avro schema every decoded record is validated against.
* :meth:`EventContract.to_event` turns raw bytes into an :class:`Event` or raises
  :class:`RecordError` with a stable ``reason`` (see :data:`REASONS`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import io
import json
import math
import re
import uuid
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import fastavro
from fastavro.validation import validate as avro_validate

from onceflow.io.schema_registry import (
    BadWireFormat, RegistryConfig, UnknownSchema, registry_client, split_wire_format,
)

# Why a record can be refused. These strings are stable: DLQ tooling counts by them.
REASON_INVALID_UTF8 = "invalid_utf8"
REASON_MALFORMED_JSON = "malformed_json"
REASON_NESTING_TOO_DEEP = "nesting_too_deep"
REASON_NON_FINITE_NUMBER = "non_finite_number"
REASON_NOT_AN_OBJECT = "not_an_object"
REASON_AVRO_DECODE_ERROR = "avro_decode_error"
REASON_SCHEMA_VIOLATION = "schema_violation"
REASON_BAD_TIMESTAMP = "bad_timestamp"
REASON_TOO_LATE = "too_late"
REASON_BAD_WIRE_FORMAT = "bad_wire_format"  # not magic byte 0 + 4-byte schema ID + payload
REASON_UNKNOWN_SCHEMA = "unknown_schema"  # the registry has no (usable) schema with the record's ID

REASONS = (
    REASON_INVALID_UTF8,
    REASON_MALFORMED_JSON,
    REASON_NESTING_TOO_DEEP,
    REASON_NON_FINITE_NUMBER,
    REASON_NOT_AN_OBJECT,
    REASON_AVRO_DECODE_ERROR,
    REASON_SCHEMA_VIOLATION,
    REASON_BAD_TIMESTAMP,
    REASON_TOO_LATE,
    REASON_BAD_WIRE_FORMAT,
    REASON_UNKNOWN_SCHEMA,
)

INPUT_FORMATS = ("json", "avro", "avro_registry", "json_registry")
REGISTRY_FORMATS = ("avro_registry", "json_registry")

# Event times must fit Beam's timestamps and Python's datetime: years 1..9999.
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1  # Avro's long: IDs, keys and integer values
# The key fields' text together, in UTF-8: every sink indexes it in the row's primary
# key, and PostgreSQL refuses an index entry past about 2,700 bytes.
MAX_KEY_BYTES = 2000
MIN_EVENT_TIME_MS = -62135596800000  # 0001-01-01T00:00:00Z
MAX_EVENT_TIME_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)

# JSON that nests arrays and objects deeper than this is refused (nesting_too_deep),
# on every path. A fixed limit, checked before parsing: Python's json refuses at its
# recursion limit less the caller's stack depth and orjson at 1,024 levels, so the
# verdict on a record nested about 1,000 deep depended on which decoder read it and
# from where.
MAX_JSON_NESTING = 512


class RecordError(Exception):
    """A record cannot become an event. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str, error_class: Optional[str] = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.error_class = error_class or type(self).__name__


class SourceRecord(NamedTuple):
    """One raw record as a reader saw it.

    ``source`` says where it came from, e.g. ``{"file": path, "line": 12}`` or
    ``{"topic": t, "partition": 0, "offset": 42}``. ``high_water_ms`` is the source's
    watermark for the record's partition (or file) just before this record was read:
    the greatest event time seen earlier in that partition, or ``None`` when the
    source makes no claim. Lateness is decided against it, so that it depends on the
    data and its order in the log, not on timing.
    """

    value: bytes
    source: Mapping[str, Any]
    high_water_ms: Optional[int] = None


class Event(NamedTuple):
    """A valid event: deterministic ID, event time (epoch ms, UTC), key, values.

    ``record`` is the source record it was decoded from, kept so that a stage that
    refuses the event later (for example as too late) can dead-letter the raw bytes.
    """

    event_id: str
    event_time_ms: int
    key: Tuple[str, ...]
    values: Mapping[str, Any]
    record: SourceRecord


TIME_SOURCES = ("field", "record")


def check_time_source(time_source: str) -> None:
    """ValueError unless ``time_source`` is one of :data:`TIME_SOURCES`."""
    if time_source not in TIME_SOURCES:
        raise ValueError(f"time_source must be one of {', '.join(TIME_SOURCES)}, not {time_source!r}")


def is_whole_number(value: Any) -> bool:
    """Whether ``value`` is an int (and not a bool, which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_field_names(names: Any, what: str) -> None:
    """ValueError when ``names`` is one text instead of a sequence of field names
    (a string would be taken for its characters: ``"store"`` as s, t, o, r, e)."""
    if isinstance(names, (str, bytes)):
        raise ValueError(f"{what} is a sequence of field names, e.g. ({names!r},), not one text")


def require_contract(contract: Any, transform: str) -> None:
    """ValueError unless ``contract`` is an :class:`EventContract`."""
    if not isinstance(contract, EventContract):
        raise ValueError(f"{transform} takes an EventContract, e.g. EventContract(time_field='event_time', "
                         f"key_fields=('store',), value_fields=('qty',), id_field='order_id'), not {contract!r}")


def require_source_record(element: Any, transform: str) -> None:
    """TypeError, saying what to do, unless ``element`` is a :class:`SourceRecord`."""
    if not isinstance(element, SourceRecord):
        raise TypeError(f"{transform} takes SourceRecord elements, got {type(element).__name__}: wrap each "
                        "raw value as onceflow.events.SourceRecord(value_bytes, source_dict)")
    if not isinstance(element.value, bytes):
        raise TypeError(f"{transform}: a SourceRecord's value is the raw record as bytes, got "
                        f"{type(element.value).__name__}: encode text first, e.g. SourceRecord(line.encode('utf-8'), "
                        "source_dict)")
    if not isinstance(element.source, Mapping):
        raise TypeError(f"{transform}: a SourceRecord's source is a dict saying where the record came from (e.g. "
                        f"{{'file': path, 'line': n}}, or {{}}), got {type(element.source).__name__}")


def timed_by(event: Event, time_source: str) -> Event:
    """``event`` with the event time ``time_source`` names: its time field's
    (``field``, as decoded) or its Kafka record timestamp (``record``; a record
    without one, from a pre-0.10 message format or not from Kafka, keeps its
    field's). The readers' lateness rule reads the same clock."""
    if time_source == "record":
        stamp = event.record.source.get("timestamp_ms")
        if isinstance(stamp, int) and stamp >= 0:
            return event._replace(event_time_ms=stamp)
    return event


@dataclasses.dataclass(frozen=True)
class EventContract:
    """Which fields an event has, and how raw records are decoded.

    ``id_field`` may be absent from a record: then the ID is derived from the
    record's content. ``value_fields`` are the numeric fields the aggregates read;
    they must be present, non-null numbers (long or double). Key fields are strings
    or longs (longs are keyed by their decimal text). The time field is an ISO-8601
    string with any offset (no offset means UTC) or epoch milliseconds.

    For ``input_format="avro"`` each record's bytes are one Avro datum written
    with ``avro_writer_schema`` (schemaless encoding). For ``avro_registry`` and
    ``json_registry`` each record is in a schema registry's wire format (see
    :mod:`onceflow.io.schema_registry`): its writer schema is fetched from
    ``registry`` by the per-process client (the contract holds only the picklable
    :class:`~onceflow.io.schema_registry.RegistryConfig`), Avro is resolved to
    ``avro_reader_schema`` when given, and JSON is validated against the fetched
    JSON Schema when ``jsonschema`` is installed. A registry that cannot answer
    raises :class:`~onceflow.io.schema_registry.RegistryUnavailable`, never
    :class:`RecordError`: it is not a verdict on the record.
    """

    time_field: str
    key_fields: Tuple[str, ...]
    value_fields: Tuple[str, ...] = ()
    id_field: Optional[str] = None
    input_format: str = "json"
    avro_writer_schema: Optional[Mapping[str, Any]] = None
    registry: Optional[RegistryConfig] = None
    avro_reader_schema: Optional[Mapping[str, Any]] = None

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input format must be one of {', '.join(INPUT_FORMATS)}")
        if (self.input_format in REGISTRY_FORMATS) != (self.registry is not None):
            raise ValueError("a schema registry is needed by, and only by, the avro_registry and json_registry "
                             "formats")
        if self.avro_reader_schema is not None and self.input_format != "avro_registry":
            raise ValueError("a reader schema is for the avro_registry format")
        check_field_names(self.key_fields, "key_fields")
        check_field_names(self.value_fields, "value_fields")
        if not self.key_fields:
            raise ValueError("at least one key field is needed")
        names = [self.time_field, *self.key_fields, *self.value_fields]
        if self.id_field:
            names.append(self.id_field)
        for name in names:
            if not name or not isinstance(name, str):
                raise ValueError("field names must be non-empty strings")
        if len(set(self.key_fields)) != len(self.key_fields):
            raise ValueError("key fields must be distinct")
        overlap = set(self.key_fields) & ({self.time_field} | set(self.value_fields))
        if overlap:
            raise ValueError(f"field {sorted(overlap)[0]!r} cannot be both a key and a value or time")
        if self.input_format == "avro" and self.avro_writer_schema is None:
            raise ValueError("avro input needs the writer schema")
        # Parsed once; dataclass is frozen, so set through object.__setattr__.
        object.__setattr__(self, "_event_schema", fastavro.parse_schema(self.event_avro_schema()))
        if self.avro_writer_schema is not None:
            object.__setattr__(
                self, "_writer_schema", fastavro.parse_schema(dict(self.avro_writer_schema))
            )
        reader = None
        if self.avro_reader_schema is not None:
            reader = fastavro.parse_schema(dict(self.avro_reader_schema), named_schemas={})
        object.__setattr__(self, "_reader_schema", reader)

    # -- the schema every decoded record is validated against -------------------

    def event_avro_schema(self) -> Dict[str, Any]:
        """The Avro schema of a valid event. Extra fields in a record are allowed."""
        fields: List[Dict[str, Any]] = []
        if self.id_field:
            fields.append({"name": self.id_field, "type": ["null", "string", "long"], "default": None})
        fields.append({"name": self.time_field, "type": ["string", "long"]})
        for name in self.key_fields:
            fields.append({"name": name, "type": ["string", "long"]})
        for name in self.value_fields:
            fields.append({"name": name, "type": ["long", "double"]})
        return {"type": "record", "name": "Event", "namespace": "onceflow", "fields": fields}

    # -- decoding ----------------------------------------------------------------

    def decode(self, raw: bytes) -> Dict[str, Any]:
        """Raw bytes to a record (a dict), or :class:`RecordError`."""
        if self.input_format == "avro":
            return _decode_avro(raw, self._writer_schema)  # type: ignore[attr-defined]
        if self.input_format == "avro_registry":
            return self._decode_avro_registry(raw)
        if self.input_format == "json_registry":
            return self._decode_json_registry(raw)
        return decode_json_object(raw)

    def _decode_avro_registry(self, raw: bytes) -> Dict[str, Any]:
        schema_id, payload = _split_framed(raw)
        writer = _registry_schema(self.registry, schema_id, "AVRO", _parse_avro_schema)
        return _decode_avro(bytes(payload), writer, self._reader_schema)  # type: ignore[attr-defined]

    def _decode_json_registry(self, raw: bytes) -> Dict[str, Any]:
        schema_id, payload = _split_framed(raw)
        validator = _registry_schema(self.registry, schema_id, "JSON", _json_schema_validator)
        obj = decode_json_object(bytes(payload))
        if validator is not None:
            from referencing.exceptions import Unresolvable

            try:
                error = next(iter(validator.iter_errors(obj)), None)
            except Unresolvable as unresolved:  # a $ref to another document: nothing here resolves it
                raise RecordError(REASON_UNKNOWN_SCHEMA, f"schema {schema_id} cannot be used: it refers to "
                                  f"{getattr(unresolved, 'ref', unresolved)!r}, another document (schema "
                                  "references are not read)"[:300], "UnusableSchema") from None
            if error is not None:
                where = "/".join(str(part) for part in error.absolute_path) or "the record"
                raise RecordError(REASON_SCHEMA_VIOLATION,
                                  f"{where} violates JSON schema {schema_id}: {error.message}"[:300],
                                  "JsonSchemaViolation")
        return obj

    def to_event(self, record: SourceRecord) -> Event:
        """Decode, validate and normalise one source record into an :class:`Event`."""
        obj = self.decode(record.value)
        self._validate(obj)
        event_time_ms = parse_event_time_ms(obj[self.time_field], self.time_field)
        key = tuple(_key_text(obj[name]) for name in self.key_fields)
        values = {name: obj[name] for name in self.value_fields}
        event_id = self._event_id(obj)
        for name, text in ((self.id_field, event_id), *zip(self.key_fields, key)):
            if "\x00" in text:  # every sink stores keys, and the DLQ IDs, as text; PostgreSQL's holds no NUL
                raise RecordError(REASON_SCHEMA_VIOLATION, f"field {name!r} holds a NUL character (U+0000), which "
                                  "a key or ID may not", "WrongType")
        size = sum(len(part.encode("utf-8")) for part in key)
        if size > MAX_KEY_BYTES:
            raise RecordError(REASON_SCHEMA_VIOLATION, f"the key ({', '.join(self.key_fields)}) is {size} bytes of "
                              f"text; a key may have at most {MAX_KEY_BYTES} (every sink indexes it)", "KeyTooLong")
        return Event(event_id, event_time_ms, key, values, record)

    def peek_event_time_ms(self, raw: bytes) -> Optional[int]:
        """The event time of a raw record if it is a valid event, else None.

        Readers use this to keep their per-partition high water (so a malformed or
        schema-violating record never moves event time); it never raises.
        """
        try:
            return self.to_event(SourceRecord(raw, {})).event_time_ms
        except RecordError:
            return None

    def _validate(self, obj: Dict[str, Any]) -> None:
        if avro_validate(obj, self._event_schema, raise_errors=False):  # type: ignore[attr-defined]
            self._check_long_values(obj)
            return
        # Say which field is wrong: check the fields one at a time.
        for field in self.event_avro_schema()["fields"]:
            name = field["name"]
            if name not in obj:
                if "default" in field:
                    continue
                raise RecordError(REASON_SCHEMA_VIOLATION, f"field {name!r} is missing", "MissingField")
            value = obj[name]
            if not avro_validate(value, field["type"], raise_errors=False):
                expected = " or ".join(t for t in field["type"])
                raise RecordError(
                    REASON_SCHEMA_VIOLATION,
                    f"field {name!r} must be {expected}, got {_describe(value)}",
                    "WrongType",
                )
        raise RecordError(REASON_SCHEMA_VIOLATION, "record does not match the event schema")

    def _check_long_values(self, obj: Dict[str, Any]) -> None:
        """Avro's ``double`` takes any integer, so an integer value outside the
        64-bit range (which ``long`` refuses) passes the schema; the contract
        refuses it, as it does for IDs and keys: no sink column holds it."""
        for name in self.value_fields:
            value = obj[name]
            if type(value) is int and not LONG_MIN <= value <= LONG_MAX:
                raise RecordError(
                    REASON_SCHEMA_VIOLATION,
                    f"field {name!r} must be long or double, got an integer outside the 64-bit range "
                    f"({_describe(value)}); send it as a number with a decimal point or exponent to read it as a "
                    "double",
                    "WrongType",
                )

    def _event_id(self, obj: Dict[str, Any]) -> str:
        if self.id_field:
            given = obj.get(self.id_field)
            if given is not None and given != "":
                return str(given)
        return derive_event_id(obj)


# -- pure helpers, shared with batched paths and tests ----------------------------


def _reject_constant(name: str) -> Any:
    raise RecordError(REASON_NON_FINITE_NUMBER, f"{name} is not a number JSON allows", "NonFiniteNumber")


def _parse_finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RecordError(REASON_NON_FINITE_NUMBER, f"number {text[:40]} overflows a double", "NonFiniteNumber")
    return value


def decode_json_object(raw: bytes) -> Dict[str, Any]:
    """UTF-8 JSON bytes to a dict; NaN, Infinity and overflowing numbers refused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecordError(REASON_INVALID_UTF8, f"not valid UTF-8: {error.reason} at byte {error.start}",
                          "UnicodeDecodeError") from None
    if json_nests_too_deep(raw):
        raise RecordError(REASON_NESTING_TOO_DEEP, f"JSON nested more than {MAX_JSON_NESTING} levels deep",
                          "NestingTooDeep")
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_finite_float)
    except RecordError:
        raise
    except RecursionError:
        raise RecordError(REASON_NESTING_TOO_DEEP, "JSON nested too deeply to decode", "RecursionError") from None
    except json.JSONDecodeError as error:
        raise RecordError(REASON_MALFORMED_JSON, f"malformed JSON: {error.msg} (char {error.pos})",
                          "JSONDecodeError") from None
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        raise RecordError(REASON_MALFORMED_JSON, f"malformed JSON: {error}"[:200], "ValueError") from None
    if "\\u" in text and _has_lone_surrogate(obj):
        raise RecordError(REASON_MALFORMED_JSON, "malformed JSON: a string holds a lone surrogate escape (\\ud800 "
                          "to \\udfff without its pair), which is not Unicode text", "LoneSurrogate")
    if not isinstance(obj, dict):
        raise RecordError(REASON_NOT_AN_OBJECT, f"expected a JSON object, got {_json_kind(obj)}", "NotAnObject")
    return obj


_JSON_SPECIAL = re.compile(rb'[\\"\[\]{}]')
_QUOTE, _BACKSLASH, _OPENERS, _CLOSERS = ord('"'), ord("\\"), (ord("["), ord("{")), (ord("]"), ord("}"))


def json_nests_too_deep(raw: bytes) -> bool:
    """Whether JSON bytes open more than :data:`MAX_JSON_NESTING` arrays and objects
    at once, outside strings (well formed or not). Two counts in C for a record that
    cannot (fewer bytes or brackets than the limit); else one pass over its quotes,
    backslashes and brackets."""
    if len(raw) <= MAX_JSON_NESTING or raw.count(b"[") + raw.count(b"{") <= MAX_JSON_NESTING:
        return False
    depth, in_string, escaped = 0, False, -1
    for match in _JSON_SPECIAL.finditer(raw):
        position = match.start()
        if position == escaped:  # the character after a backslash in a string
            continue
        char = raw[position]
        if in_string:
            if char == _BACKSLASH:
                escaped = position + 1
            elif char == _QUOTE:
                in_string = False
        elif char == _QUOTE:
            in_string = True
        elif char in _OPENERS:
            depth += 1
            if depth > MAX_JSON_NESTING:
                return True
        elif char in _CLOSERS:
            depth -= 1
    return False


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in a decoded JSON value (keys included) cannot be
    encoded as UTF-8: JSON's \\u escapes can spell half a surrogate pair, and no
    sink, coder or DLQ tool can carry such text."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _split_framed(raw: bytes):
    try:
        return split_wire_format(raw)
    except BadWireFormat as error:
        raise RecordError(REASON_BAD_WIRE_FORMAT, str(error), "BadWireFormat") from None


def _registry_schema(config: Any, schema_id: int, schema_type: str, parse) -> Any:
    """The registry's schema ``schema_id`` as ``parse`` makes it, cached per
    process. RecordError(unknown_schema) when the registry has none by that ID or
    it cannot be used; RegistryUnavailable (not a RecordError) passes through."""

    def checked(registered):
        if registered.schema_type != schema_type:
            raise RecordError(REASON_UNKNOWN_SCHEMA, f"schema {schema_id} is a {registered.schema_type} schema, "
                              f"not {schema_type}", "WrongSchemaType")
        try:
            return parse(registered.text)
        except Exception as error:  # a registered schema this reader cannot use
            raise RecordError(REASON_UNKNOWN_SCHEMA, f"schema {schema_id} cannot be used: "
                              f"{type(error).__name__}: {error}"[:300], "UnusableSchema") from None

    try:
        return registry_client(config).parsed(schema_type, schema_id, checked)
    except UnknownSchema as error:
        raise RecordError(REASON_UNKNOWN_SCHEMA, str(error), "UnknownSchema") from None


def _parse_avro_schema(text: str) -> Any:
    return fastavro.parse_schema(json.loads(text), named_schemas={})


def _json_schema_validator(text: str) -> Any:
    """A validator of the JSON Schema ``text``, or None when the optional
    ``jsonschema`` package is not installed (then only the contract validates)."""
    schema = json.loads(text)
    try:
        import jsonschema
    except ImportError:
        return None
    import referencing

    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    # An empty registry: a $ref to another document is refused (unknown_schema), never fetched (jsonschema's
    # default registry fetches http(s) references from a worker).
    return cls(schema, registry=referencing.Registry())


def _decode_avro(raw: bytes, writer_schema: Any, reader_schema: Any = None) -> Dict[str, Any]:
    stream = io.BytesIO(raw)
    try:
        obj = fastavro.schemaless_reader(stream, writer_schema, reader_schema)
    except RecursionError:
        raise RecordError(REASON_NESTING_TOO_DEEP, "Avro datum nested too deeply", "RecursionError") from None
    except Exception as error:  # fastavro raises many types on corrupt input
        # Without object addresses (fastavro names its stream: <_io.BytesIO object at 0x7f...>), so a record's
        # dead letter reads the same in every run.
        text = re.sub(r"<([\w.]+) object at 0x[0-9a-f]+>", r"<\1>", str(error))
        raise RecordError(REASON_AVRO_DECODE_ERROR, f"cannot decode Avro datum: {type(error).__name__}: {text}"[:300],
                          type(error).__name__) from None
    if stream.tell() != len(raw):
        raise RecordError(REASON_AVRO_DECODE_ERROR,
                          f"{len(raw) - stream.tell()} trailing bytes after the Avro datum", "TrailingBytes")
    if not isinstance(obj, dict):
        raise RecordError(REASON_NOT_AN_OBJECT, "the Avro datum is not a record", "NotAnObject")
    for name, value in obj.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordError(REASON_NON_FINITE_NUMBER, "the Avro datum holds NaN or Infinity", "NonFiniteNumber")
        # fastavro reads logical types as Python objects: a timestamp (-millis or
        # -micros, local or not: UTC) becomes epoch milliseconds, as the contract reads
        # event times; a uuid its text. Other logical types (date, time, decimal)
        # stay as fastavro gives them, and the schema check refuses them.
        if isinstance(value, datetime.datetime):
            obj[name] = _datetime_to_ms(value)
        elif isinstance(value, uuid.UUID):
            obj[name] = str(value)
    return obj


def parse_event_time_ms(value: Any, field: str = "event time") -> int:
    """An ISO-8601 string (any offset; none means UTC), epoch milliseconds, or an
    aware datetime, to epoch milliseconds. Sub-millisecond digits are truncated."""
    if isinstance(value, bool):
        raise RecordError(REASON_BAD_TIMESTAMP, f"{field} is a boolean", "BadTimestamp")
    if isinstance(value, int):
        millis = value
    elif isinstance(value, datetime.datetime):
        millis = _datetime_to_ms(value)
    elif isinstance(value, str):
        millis = _iso_to_ms(value, field)
    else:
        raise RecordError(REASON_BAD_TIMESTAMP, f"{field} must be ISO-8601 text or epoch milliseconds",
                          "BadTimestamp")
    if not MIN_EVENT_TIME_MS <= millis <= MAX_EVENT_TIME_MS:
        raise RecordError(REASON_BAD_TIMESTAMP, f"{field} {value!r} is out of range (years 1 to 9999)",
                          "BadTimestamp")
    return millis


def parse_iso_time_us(text: str, field: str = "time") -> int:
    """An ISO-8601 string to epoch microseconds, with the forms and range of
    :func:`parse_event_time_ms` (a dead letter's ``failed_at`` keeps microseconds)."""
    millis = parse_event_time_ms(str(text), field)
    return millis * 1000 + _iso_to_datetime(text, field).microsecond % 1000


def _iso_to_ms(text: str, field: str) -> int:
    return _datetime_to_ms(_iso_to_datetime(text, field))


def _iso_to_datetime(text: str, field: str) -> datetime.datetime:
    candidate = text.strip()
    if candidate.endswith(("z", "Z")):
        candidate = candidate[:-1] + "+00:00"
    try:
        return datetime.datetime.fromisoformat(candidate)
    except ValueError:
        raise RecordError(REASON_BAD_TIMESTAMP, f"{field} {text[:60]!r} is not an ISO-8601 timestamp",
                          "BadTimestamp") from None


def _datetime_to_ms(moment: datetime.datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


@functools.lru_cache(maxsize=4096)  # sinks format the same window bounds for every key
def format_utc_ms(millis: int) -> str:
    """Epoch milliseconds as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (fixed width, sortable)."""
    moment = _EPOCH + datetime.timedelta(milliseconds=millis)
    # Not strftime: its %Y does not pad years before 1000 to four digits.
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:{moment.minute:02d}:"
            f"{moment.second:02d}.{moment.microsecond // 1000:03d}Z")


def derive_event_id(obj: Mapping[str, Any]) -> str:
    """A deterministic ID from a record's content (key order does not matter)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:40]


def _key_text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _json_kind(obj: Any) -> str:
    if isinstance(obj, list):
        return "an array"
    if isinstance(obj, str):
        return "a string"
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    return "a number"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"
