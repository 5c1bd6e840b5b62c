"""Dead-letter sinks and readers: JSON lines in a local file, or a PostgreSQL
table; :func:`parse_dlq_target` reads a ``--dlq`` value and
:class:`WriteDeadLetters` writes to whichever it names."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import urllib.parse
from typing import Any, Dict, Iterator, List, Optional, Tuple

import apache_beam as beam

from onceflow import metrics
from onceflow.deadletter import DeadLetter, to_envelope, to_json_line
from onceflow.io.urls import POSTGRES_FORM, first_line, parse_postgres_url, query_params, redact_url
from onceflow.rows import check_identifier

_MAX_BUFFERED = 500


class _AppendJsonlDoFn(beam.DoFn):
    def __init__(self, path: str, pipeline: str, pipeline_version: str):
        self._path = path
        self._pipeline = pipeline
        self._version = pipeline_version
        self._written = metrics.counter(metrics.DLQ_WRITTEN)

    def setup(self) -> None:
        directory = os.path.dirname(os.path.abspath(self._path))
        os.makedirs(directory, exist_ok=True)

    def start_bundle(self) -> None:
        self._lines: List[str] = []

    def process(self, letter: DeadLetter):
        self._lines.append(to_json_line(to_envelope(letter, self._pipeline, self._version)))
        if len(self._lines) >= _MAX_BUFFERED:
            self._flush()

    def finish_bundle(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._lines:
            return
        data = ("\n".join(self._lines) + "\n").encode("utf-8")
        with open(self._path, "ab") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # other workers append to the same file
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self._written.inc(len(self._lines))
        self._lines = []


class WriteDeadLettersToJsonl(beam.PTransform):
    """Appends dead letters as JSON lines (the envelope of
    :mod:`onceflow.deadletter`) to a local file, flushed and fsynced before each
    bundle completes.

    Delivery is at-least-once: a retried bundle may append a dead letter again.
    Every envelope carries a deterministic ``dlq_id``, and :func:`read_dead_letters`
    returns each ID once, so readers see every refused record exactly once.
    """

    def __init__(self, path: str, pipeline: str, pipeline_version: str):
        super().__init__()
        self._args = (path, pipeline, pipeline_version)

    def expand(self, letters: beam.PCollection) -> beam.PCollection:
        return letters | "AppendJsonLines" >> beam.ParDo(_AppendJsonlDoFn(*self._args))


def read_dead_letters(path: str) -> Iterator[Dict]:
    """Each envelope in a DLQ file once (first occurrence of each ``dlq_id``)."""
    if not os.path.exists(path):
        return
    seen = set()
    with open(path, "rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            envelope = json.loads(line)
            if envelope["dlq_id"] in seen:
                continue
            seen.add(envelope["dlq_id"])
            yield envelope


# -- choosing the dead-letter queue ---------------------------------------------

DEFAULT_DLQ_TABLE = "dead_letters"
# Schemes a --dlq URL may use; the Kafka dead-letter topic goes here when it exists.
DLQ_SCHEMES = ("postgresql", "postgres", "kafka")
DLQ_FORMS = f"a file path (JSON lines), {POSTGRES_FORM} or kafka://HOST:PORT/TOPIC"


@dataclasses.dataclass(frozen=True, repr=False)
class DlqTarget:
    """A parsed ``--dlq`` value: ``kind`` ``jsonl`` (``location`` a file path) or
    ``postgresql`` (``location`` a libpq URI that may hold a password: print
    :meth:`describe`, never the field)."""

    kind: str
    location: str
    table: str = ""  # the topic, for kafka
    # Client settings (kafka: --kafka_setting); may hold secrets, never described.
    client_settings: Tuple[Tuple[str, str], ...] = ()
    # kafka ?format=avro_registry: envelopes as registry-framed Avro, with this
    # schema registry (a RegistryConfig); json otherwise.
    value_format: str = "json"
    registry: Optional[object] = None

    def describe(self) -> str:
        if self.kind == "jsonl":
            return self.location
        if self.kind == "kafka":
            shown = f"kafka://{self.location}/{self.table}"
            return shown + ("?format=avro_registry" if self.value_format == "avro_registry" else "")
        return f"{self.kind} {redact_url(self.location)} (table {self.table})"

    def __repr__(self) -> str:
        return f"DlqTarget({self.describe()!r})"


def parse_dlq_target(text: str) -> DlqTarget:
    """A file path, or ``postgresql://USER[:PASS]@HOST:PORT/DB?table=NAME``
    (default table ``dead_letters``). ValueError names the expected forms."""
    text = str(text).strip()
    if not text:
        raise ValueError(f"a dead-letter queue is needed (dead letters are never dropped): {DLQ_FORMS}")
    if "://" not in text:
        return DlqTarget("jsonl", text)
    scheme = urllib.parse.urlsplit(text).scheme
    if scheme == "kafka":
        from onceflow.io.kafka.config import parse_kafka_url

        value_format = query_params(text, ("format",)).get("format", "json")
        if value_format not in ("json", "avro_registry"):
            raise ValueError(f"format {value_format!r}: a Kafka dead-letter topic is written as json or avro_registry")
        topic = parse_kafka_url(urllib.parse.urlunsplit(urllib.parse.urlsplit(text)._replace(query="")))
        return DlqTarget("kafka", topic.bootstrap_servers, topic.topic, value_format=value_format)
    if scheme not in DLQ_SCHEMES:
        raise ValueError(f"{redact_url(text)!r} has an unknown scheme; use {DLQ_FORMS}")
    location, table = parse_postgres_url(text, DEFAULT_DLQ_TABLE)
    return DlqTarget("postgresql", location, check_identifier(table, "table name"))


def prepare_dlq(target: DlqTarget) -> None:
    """Checks the queue is usable before the pipeline starts (creates the folder or
    the table); ValueError or OSError with a one-line message, passwords redacted."""
    if target.kind == "jsonl":
        os.makedirs(os.path.dirname(os.path.abspath(target.location)), exist_ok=True)
        return
    if target.kind == "kafka":
        from onceflow.io.kafka.admin import require_topic
        from onceflow.io.kafka.config import KafkaTopic

        require_topic(KafkaTopic(target.location, target.table), dict(target.client_settings))
        return
    from onceflow.io import postgres

    try:
        postgres.ensure_dlq_table(target.location, target.table)
    except postgres.psycopg.Error as error:
        raise ValueError(f"cannot use {target.describe()}: {first_line(error)}") from None


class WriteDeadLetters(beam.PTransform):
    """Writes dead letters to the queue a :class:`DlqTarget` names: appended JSON
    lines (:class:`WriteDeadLettersToJsonl`) or a PostgreSQL table
    (:class:`onceflow.io.postgres.WriteDeadLettersToPostgres`). Either way
    at-least-once delivery, and readers see each ``dlq_id`` once."""

    def __init__(self, target: DlqTarget, pipeline: str, pipeline_version: str):
        super().__init__()
        if target.kind == "jsonl":
            # The same step as WriteDeadLettersToJsonl's: WriteDeadLetters/AppendJsonLines.
            self._label = "AppendJsonLines"
            self._transform = beam.ParDo(_AppendJsonlDoFn(target.location, pipeline, pipeline_version))
        elif target.kind == "postgresql":
            from onceflow.io.postgres import WriteDeadLettersToPostgres  # needs psycopg only here

            self._label = "InsertIntoPostgres"
            self._transform = WriteDeadLettersToPostgres(target.location, target.table, pipeline, pipeline_version)
        elif target.kind == "kafka":
            from onceflow.io.kafka.config import KafkaTopic
            from onceflow.io.kafka.write import write_dead_letters_to_kafka

            self._label = "ProduceToKafka"
            if target.value_format == "avro_registry" and target.registry is None:
                raise ValueError("a kafka:// dead-letter topic with ?format=avro_registry needs a schema registry")
            self._transform = write_dead_letters_to_kafka(
                KafkaTopic(target.location, target.table), pipeline, pipeline_version, dict(target.client_settings),
                target.registry if target.value_format == "avro_registry" else None)
        else:
            raise ValueError(f"unknown dead-letter queue kind {target.kind!r}")

    def expand(self, letters: beam.PCollection) -> beam.PCollection:
        return letters | self._label >> self._transform


def read_dead_letters_from(target: DlqTarget) -> Iterator[Dict[str, Any]]:
    """Each envelope in the queue once, whichever kind it is."""
    if target.kind == "jsonl":
        return read_dead_letters(target.location)
    if target.kind == "kafka":
        return _read_dead_letters_from_kafka(target)
    from onceflow.io.postgres import read_dead_letters as read_table

    return read_table(target.location, target.table)


def _read_dead_letters_from_kafka(target: DlqTarget) -> Iterator[Dict[str, Any]]:
    from onceflow.io.kafka.admin import read_topic_to_end
    from onceflow.io.kafka.config import KafkaTopic
    from onceflow.io.kafka.write import envelope_from_message

    seen = set()
    for key, value in read_topic_to_end(KafkaTopic(target.location, target.table), dict(target.client_settings)):
        envelope = envelope_from_message(value, target.registry)
        if envelope["dlq_id"] not in seen:
            seen.add(envelope["dlq_id"])
            yield envelope
