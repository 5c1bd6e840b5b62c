"""A dead-letter queue on a Kafka topic: its writer and its reader.

Each dead letter is one message keyed by its ``dlq_id``: the envelope as JSON,
or with ``?format=avro_registry`` as registry-framed Avro
(:data:`DEAD_LETTER_AVRO_SCHEMA`). The producer is the rows' idempotent one
(:class:`onceflow.io.kafka.write.WriteToKafka`): every bundle is acknowledged
before it completes, at-least-once; :func:`read_dead_letters` returns each
``dlq_id`` once.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, Iterator, Mapping, Optional

from onceflow import metrics
from onceflow.deadletter import DeadLetter
from onceflow.io.dlq.envelope import checked_envelope, to_envelope, to_json_line
from onceflow.io.kafka.admin import describe_topic, read_records_to_end
from onceflow.io.kafka.config import EARLIEST, KafkaReadConfig, KafkaTopic
from onceflow.io.kafka.write import Message, RegistryAvroEncoder, WriteToKafka, decode_framed

# The envelope as Avro: the JSON envelope's fields, but the raw bytes as bytes (not
# base64) and the source as its JSON text (its values mix types).
DEAD_LETTER_AVRO_SCHEMA = {
    "type": "record", "name": "DeadLetter", "namespace": "onceflow",
    "fields": [
        {"name": "dlq_id", "type": "string"}, {"name": "reason", "type": "string"},
        {"name": "error_class", "type": "string"}, {"name": "message", "type": "string"},
        {"name": "stage", "type": "string"}, {"name": "source_json", "type": "string"},
        {"name": "raw", "type": "bytes"}, {"name": "raw_preview", "type": "string"},
        {"name": "event_id", "type": ["null", "string"], "default": None},
        {"name": "event_time", "type": ["null", "string"], "default": None},
        {"name": "failed_at", "type": "string"}, {"name": "pipeline", "type": "string"},
        {"name": "pipeline_version", "type": "string"},
    ],
}


class _DeadLetterMessage:
    def __init__(self, pipeline: str, version: str):
        self._pipeline, self._version = pipeline, version

    def __call__(self, letter: DeadLetter) -> Message:
        envelope = to_envelope(letter, self._pipeline, self._version)
        return envelope["dlq_id"].encode("ascii"), to_json_line(envelope).encode("utf-8")


class _AvroDeadLetterMessage:
    """Dead letters as Avro in the registry's wire format (schema registered under
    ``TOPIC-value`` on first use, like rows)."""

    def __init__(self, pipeline: str, version: str, registry: Any, subject: str):
        self._pipeline, self._version = pipeline, version
        self._encoder = RegistryAvroEncoder(DEAD_LETTER_AVRO_SCHEMA, registry, subject)

    def __call__(self, letter: DeadLetter) -> Message:
        envelope = to_envelope(letter, self._pipeline, self._version)
        record = {name: value for name, value in envelope.items() if name not in ("source", "raw_base64")}
        record["source_json"] = json.dumps(envelope["source"], sort_keys=True, separators=(",", ":"))
        record["raw"] = base64.b64decode(envelope["raw_base64"])
        return envelope["dlq_id"].encode("ascii"), self._encoder.encode(record)


def write_dead_letters_to_kafka(topic: KafkaTopic, pipeline: str, version: str,
                                settings: Optional[Mapping[str, str]] = None, registry: Any = None) -> WriteToKafka:
    """Dead-letter envelopes (JSON, or with ``registry`` registry-framed Avro:
    :data:`DEAD_LETTER_AVRO_SCHEMA`) keyed by ``dlq_id``; its one step is ``Produce``."""
    to_message = (_DeadLetterMessage(pipeline, version) if registry is None
                  else _AvroDeadLetterMessage(pipeline, version, registry, f"{topic.topic}-value"))
    return WriteToKafka(topic, to_message, settings, metrics.DLQ_WRITTEN)


def envelope_from_message(value: bytes, registry: Any = None) -> Dict[str, Any]:
    """A dead-letter topic's message as the JSON envelope (also from Avro with
    ``registry``)."""
    if registry is not None and value[:1] == b"\x00":
        record = decode_framed(value, registry, "AVRO-dead-letter")
        envelope = {name: item for name, item in record.items() if name not in ("source_json", "raw")}
        envelope["source"] = json.loads(record["source_json"])
        envelope["raw_base64"] = base64.b64encode(record["raw"]).decode("ascii")
        return envelope
    return json.loads(value)


def read_dead_letters(topic: KafkaTopic, settings: Optional[Mapping[str, str]] = None,
                      registry: Any = None) -> Iterator[Dict[str, Any]]:
    """Each envelope on the topic once (first occurrence of each ``dlq_id``), the
    topic read to its end. The broker is asked for the topic first, as a job's
    start does (:func:`~onceflow.io.kafka.admin.describe_topic`): a broker out of
    reach raises :class:`~onceflow.io.kafka.errors.BrokerUnreachable`, a missing
    topic :class:`~onceflow.io.kafka.errors.UnknownGroupOrTopic`, each one line;
    a message that is not a dead letter raises ValueError naming its partition and
    offset."""
    describe_topic(KafkaReadConfig(topic, start=EARLIEST, client_settings=dict(settings or {})))
    seen = set()
    for partition, offset, _key, value in read_records_to_end(topic, dict(settings or {})):
        where = f"{topic.url} partition {partition} offset {offset}"
        try:
            envelope = envelope_from_message(value or b"", registry)
        except (ValueError, KeyError, TypeError) as error:
            if registry is None and (value or b"")[:1] == b"\x00":
                raise ValueError(f"{where} is in the registry's wire format (a 0 byte, then a schema ID): give the "
                                 f"queue as {topic.url}?format=avro_registry with --schema-registry-url") from None
            raise ValueError(f"{where} is not a dead letter ({type(error).__name__}: {error}); is this the job's "
                             "dead-letter topic?") from None
        dlq_id = checked_envelope(envelope, where)["dlq_id"]
        if dlq_id not in seen:
            seen.add(dlq_id)
            yield envelope
