"""Writing to Kafka: an idempotent, keyed producer flushed before each bundle ends.

Used for the aggregates topic (key: the row's deterministic key, so a compacted
topic keeps each row's latest write) and, through :mod:`onceflow.io.dlq.kafka`,
for a dead-letter topic (key: ``dlq_id``).

The aggregates writer guards versions like the other sinks: Kafka cannot refuse a
write, so the writer learns, when it starts, the greatest ``event_count`` already
in the topic for every key (it reads the topic once per process and job run), remembers every
version it produces, and does not produce a row whose ``event_count`` is lower
than the one known for its key (counted as ``sink_rows_stale``). So within one
writer process, and against whatever the topic held when it started, a lower
version is never the last message of its key, and a compacted topic keeps the
freshest. What it cannot see is a newer version that *another* process writes
after this one started (two jobs writing the same keys at once): a consumer that
must be exact whatever runs concurrently keeps, per key, the message with the
greatest ``event_count`` (:func:`latest_rows`), on a topic that is not compacted
away before it reads.

Also here: how row messages are made and read back (:func:`row_message`,
:func:`row_from_message`, :func:`row_avro_schema`), and registry-framed Avro
(:class:`RegistryAvroEncoder`, :func:`decode_framed`) for ``?format=avro_registry``.
Reading a topic to its end is :func:`onceflow.io.kafka.admin.read_records_to_end`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import apache_beam as beam

from onceflow import metrics
from onceflow.events import format_utc_ms, is_whole_number
from onceflow.io.kafka.admin import read_records_to_end, read_topic_to_end
from onceflow.io.kafka.config import KafkaTopic, check_guarded_settings, redact
from onceflow.rows import EVENT_COUNT, WINDOW_END, RowSchema

_LOGGER = logging.getLogger(__name__)
_FLUSH_TIMEOUT_S = 60.0

Message = Tuple[bytes, bytes]  # (key, value)


def row_record(row: Dict[str, Any], schema: RowSchema) -> Dict[str, Any]:
    """The row as messages carry it: window bounds as UTC text."""
    return {column: (format_utc_ms(row[column]) if schema.column_kind(column) == "timestamp" else row[column])
            for column in schema.columns}


def row_message_key(record: Dict[str, Any], schema: RowSchema) -> bytes:
    """The JSON list of the primary key: the message key whatever the value's format."""
    return json.dumps([record[column] for column in schema.primary_key], separators=(",", ":")).encode("utf-8")


def row_message(row: Dict[str, Any], schema: RowSchema) -> Message:
    """Key: the JSON list of the primary key (window bounds as UTC text); value:
    the row as a JSON object (strict JSON: an aggregate past the largest double,
    an infinity, is null there)."""
    record = row_record(row, schema)
    try:
        value = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a sum past the largest double: JSON has no Infinity (Python writes one anyway)
        value = json.dumps({column: None if isinstance(item, float) and not math.isfinite(item) else item
                            for column, item in record.items()}, sort_keys=True, separators=(",", ":"))
    return row_message_key(record, schema), value.encode("utf-8")


_AVRO_TYPES = {"key": "string", "timestamp": "string", "integer": "long", "number": ["long", "double"]}


def row_avro_schema(schema: RowSchema) -> Dict[str, Any]:
    """The Avro schema of a row message written with ``?format=avro_registry``:
    the JSON message's fields and types (window bounds as UTC text; a number keeps
    whether it is a long or a double)."""
    return {"type": "record", "name": "AggregateRow", "namespace": "onceflow",
            "fields": [{"name": column, "type": _AVRO_TYPES[schema.column_kind(column)]}
                       for column in schema.columns]}


class RegistryAvroEncoder:
    """Records as Avro in the schema registry's wire format. ``avro_schema`` is
    registered under ``subject`` (``TOPIC-value``, the registry's default subject
    naming) the first time a process encodes a record; the registry being
    unreachable fails the bundle, to be retried."""

    def __init__(self, avro_schema: Dict[str, Any], registry: Any, subject: str):
        self._avro, self._registry, self._subject = avro_schema, registry, subject
        self._writer: Optional[Tuple[int, Any]] = None

    def __getstate__(self):
        return {**self.__dict__, "_writer": None}

    def encode(self, record: Dict[str, Any]) -> bytes:
        """``record`` as a registry-framed Avro message value."""
        import io

        import fastavro

        from onceflow.io.schema_registry import frame, registry_client

        if self._writer is None:
            schema_id = registry_client(self._registry).register(
                self._subject, json.dumps(self._avro, sort_keys=True, separators=(",", ":")))
            self._writer = (schema_id, fastavro.parse_schema(self._avro, named_schemas={}))
        out = io.BytesIO()
        fastavro.schemaless_writer(out, self._writer[1], record)
        return frame(self._writer[0], out.getvalue())


class _AvroRowMessage:
    """Rows as registry-framed Avro (:func:`row_avro_schema`), keyed like JSON rows."""

    def __init__(self, schema: RowSchema, registry: Any, subject: str):
        self._schema = schema
        self._encoder = RegistryAvroEncoder(row_avro_schema(schema), registry, subject)

    def __call__(self, row: Dict[str, Any]) -> Message:
        record = row_record(row, self._schema)
        return row_message_key(record, self._schema), self._encoder.encode(record)


def decode_framed(value: bytes, registry: Any, kind: str) -> Any:
    """A registry-framed Avro message's datum (its writer schema fetched and cached)."""
    import io

    import fastavro

    from onceflow.io.schema_registry import registry_client, split_wire_format

    schema_id, payload = split_wire_format(value)
    writer = registry_client(registry).parsed(
        kind, schema_id, lambda registered: fastavro.parse_schema(json.loads(registered.text), named_schemas={}))
    return fastavro.schemaless_reader(io.BytesIO(bytes(payload)), writer, None)


def row_from_message(value: Optional[bytes], registry: Any = None) -> Optional[Dict[str, Any]]:
    """A row message's row (JSON, or with ``registry`` also registry-framed Avro);
    None for anything else. RegistryUnavailable passes through."""
    if value is None:
        return None
    if registry is not None and value[:1] == b"\x00":
        from onceflow.io.schema_registry import RegistryUnavailable

        try:
            row = decode_framed(value, registry, "AVRO-row")
        except RegistryUnavailable:
            raise
        except Exception:  # pylint: disable=broad-except - not a row message this writer wrote
            return None
        return row if isinstance(row, dict) else None
    try:
        row = json.loads(value)
    except (ValueError, TypeError):
        return None
    return row if isinstance(row, dict) else None


def _produce_error(error: Any, size: int) -> str:
    """The Kafka client's error for one message, saying what to change when the
    message is larger than the producer or the topic takes (a dead letter carries
    its record's bytes in base64: about 1.4 times the record)."""
    from confluent_kafka import KafkaError

    if isinstance(error, KafkaError) and error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
        return (f"a message of {size:,} bytes is larger than Kafka takes here: raise the topic's max.message.bytes "
                "and the producer's message.max.bytes (--kafka_setting message.max.bytes=N), or write this output to "
                "a PostgreSQL table or a file")
    return str(error)


class _ProduceDoFn(beam.DoFn):
    def __init__(self, topic: KafkaTopic, to_message: Callable[[Any], Message], settings: Mapping[str, str],
                 counter_name: str):
        self._topic = topic
        self._to_message = to_message
        self._settings = dict(settings)
        self._counter_name = counter_name

    def setup(self) -> None:
        from confluent_kafka import Producer

        config = {
            "bootstrap.servers": self._topic.bootstrap_servers,
            "enable.idempotence": True,  # no duplicates or reordering from the producer's own retries
            "acks": "all",
            "linger.ms": 20,
            "queue.buffering.max.messages": 100_000,  # bounded: a full queue makes process() wait
            **self._settings,
        }
        _LOGGER.info("producing to %s with %s", self._topic.url, redact(self._settings))
        self._producer = Producer(config)
        self._written = metrics.counter(self._counter_name)

    def start_bundle(self) -> None:
        self._errors: List[str] = []
        self._sent = 0

    def _delivered(self, error, message) -> None:
        if error is not None:
            self._errors.append(_produce_error(error, len(message.value() or b"")))

    def process(self, element: Any) -> None:
        from confluent_kafka import KafkaException

        key, value = self._to_message(element)
        if not self.admit(key, element):
            return
        while True:
            try:
                self._producer.produce(self._topic.topic, value=value, key=key, on_delivery=self._delivered)
                break
            except BufferError:  # the local queue is full: wait for the broker (backpressure)
                self._producer.poll(0.5)
            except KafkaException as error:
                raise RuntimeError(f"cannot produce to {self._topic.url}: "
                                   f"{_produce_error(error.args[0] if error.args else error, len(value or b''))}"
                                   ) from None
        self._sent += 1
        self._producer.poll(0)

    def admit(self, key: bytes, element: Any) -> bool:
        """Whether ``element`` is produced; every element is, unless a subclass guards."""
        return True

    def finish_bundle(self) -> None:
        left = self._producer.flush(_FLUSH_TIMEOUT_S)
        if left or self._errors:
            detail = self._errors[0] if self._errors else f"{left} messages not acknowledged"
            # Fail the bundle: the runner retries it, and keyed rewrites are harmless.
            raise RuntimeError(f"writing to {self._topic.url} failed: {detail}")
        self._written.inc(self._sent)

    def teardown(self) -> None:
        producer = getattr(self, "_producer", None)
        if producer is not None:
            producer.flush(5)


class WriteToKafka(beam.PTransform):
    """Produces each element as one keyed message to a topic.

    The producer is idempotent (``enable.idempotence``, ``acks=all``) and every
    bundle waits until the broker has acknowledged all its messages; a delivery
    error fails the bundle so the runner retries it. Delivery is at-least-once: a
    retried bundle writes its messages again, under the same keys.
    """

    def __init__(self, topic: KafkaTopic, to_message: Callable[[Any], Message],
                 settings: Optional[Mapping[str, str]] = None, counter_name: str = metrics.SINK_ROWS_WRITTEN,
                 fn: Optional[beam.DoFn] = None):
        super().__init__()
        check_guarded_settings(settings or {}, "Kafka producer settings")
        self._fn = fn or _ProduceDoFn(topic, to_message, settings or {}, counter_name)

    def expand(self, elements: beam.PCollection) -> beam.PCollection:
        return elements | "Produce" >> beam.ParDo(self._fn)


class _RowMessage:
    def __init__(self, schema: RowSchema):
        self._schema = schema

    def __call__(self, row: Dict[str, Any]) -> Message:
        return row_message(row, self._schema)


# Per process and writer (one write_rows_to_kafka transform, so one job run): the
# greatest event_count known per message key, read from the topic when the first
# instance of the writer starts in the process, then raised by every row produced.
_KNOWN_VERSIONS: Dict[str, Dict[bytes, int]] = {}
_KNOWN_LOCK = threading.Lock()
_LOAD_TIMEOUT_S = 600.0


def _message_version(value: Optional[bytes], registry: Any = None) -> Optional[int]:
    """The ``event_count`` of a row message; None for anything else (a tombstone,
    a message some other producer wrote)."""
    return _row_version(row_from_message(value, registry))


def _row_version(row: Optional[Dict[str, Any]]) -> Optional[int]:
    version = row.get(EVENT_COUNT) if row is not None else None
    return version if is_whole_number(version) else None


def _known_versions(writer: str, topic: KafkaTopic, settings: Mapping[str, str],
                    registry: Any = None) -> Dict[bytes, int]:
    """The process's table of versions for ``writer``, read from ``topic`` the first
    time it is asked for."""
    with _KNOWN_LOCK:
        known = _KNOWN_VERSIONS.get(writer)
        if known is None:
            known = {}
            consumer_settings = {name: value for name, value in settings.items() if name not in _PRODUCER_ONLY}
            for _, _, key, value in read_records_to_end(topic, consumer_settings, _LOAD_TIMEOUT_S):
                version = _message_version(value, registry)
                if key is not None and version is not None and version > known.get(key, -1):
                    known[key] = version
            _KNOWN_VERSIONS[writer] = known
        return known


_PRODUCER_ONLY = frozenset({"acks", "linger.ms", "enable.idempotence", "queue.buffering.max.messages",
                            "compression.type", "batch.size", "retries", "transactional.id"})


class _ProduceRowsDoFn(_ProduceDoFn):
    """Produces aggregate rows under the ``event_count`` guard (module docstring)."""

    def __init__(self, topic: KafkaTopic, to_message: Callable[[Any], Message], settings: Mapping[str, str],
                 registry: Any = None):
        super().__init__(topic, to_message, settings, metrics.SINK_ROWS_WRITTEN)
        self._writer = f"{topic.url}#{uuid.uuid4().hex}"  # made once, when the job is built
        self._registry = registry

    def setup(self) -> None:
        super().setup()
        self._known = _known_versions(self._writer, self._topic, self._settings, self._registry)
        self._stale = metrics.counter(metrics.SINK_ROWS_STALE)
        self._window_end = metrics.SinkWindowEnd()

    def start_bundle(self) -> None:
        super().start_bundle()
        self._bundle_window_end: Optional[int] = None

    def finish_bundle(self) -> None:
        super().finish_bundle()  # every message acknowledged
        if self._bundle_window_end is not None:
            self._window_end.record(self._bundle_window_end)

    def admit(self, key: bytes, element: Any) -> bool:
        end = int(element[WINDOW_END])
        if self._bundle_window_end is None or end > self._bundle_window_end:
            self._bundle_window_end = end
        version = int(element[EVENT_COUNT])
        with _KNOWN_LOCK:
            if version < self._known.get(key, -1):
                admitted = False
            else:
                self._known[key] = version
                admitted = True
        if not admitted:
            self._stale.inc()
        return admitted


def write_rows_to_kafka(topic: KafkaTopic, schema: RowSchema,
                        settings: Optional[Mapping[str, str]] = None, registry: Any = None) -> WriteToKafka:
    """Aggregate rows keyed by their deterministic key, guarded by ``event_count``:
    a row with a lower ``event_count`` than the topic held for its key when the
    writer's process started, or than this process produced since, is not produced
    (an equal one is: a harmless rewrite). See the module docstring for what the
    guard cannot see and the consumer rule that covers it (:func:`latest_rows`).
    With ``registry`` (a RegistryConfig) the values are registry-framed Avro
    (:func:`row_avro_schema`), the keys the same JSON text."""
    to_message = _RowMessage(schema) if registry is None else _AvroRowMessage(schema, registry, f"{topic.topic}-value")
    return WriteToKafka(topic, to_message, settings,
                        fn=_ProduceRowsDoFn(topic, to_message, settings or {}, registry))


def latest_rows(topic: KafkaTopic, settings: Optional[Mapping[str, str]] = None,
                timeout_s: float = 30.0, registry: Any = None) -> Dict[bytes, Dict[str, Any]]:
    """What a consumer of an aggregates topic must do to read the freshest rows:
    read the topic to its end and keep, per message key, the row with the greatest
    ``event_count`` (on a tie the later one, as the other sinks' upserts keep).
    Rows as JSON objects (window bounds as UTC text), by message key; with
    ``registry``, registry-framed Avro rows are read too."""
    latest: Dict[bytes, Dict[str, Any]] = {}
    for key, value in read_topic_to_end(topic, settings, timeout_s):
        row = row_from_message(value, registry)
        version = _row_version(row)
        if key is None or version is None:
            continue
        kept = latest.get(key)
        if kept is None or version >= kept[EVENT_COUNT]:
            latest[key] = row
    return latest
