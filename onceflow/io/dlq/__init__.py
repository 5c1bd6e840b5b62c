"""The dead-letter queue: one home for choosing, preparing, writing and reading it.

A ``--dlq`` value names the queue: a file path (JSON lines), a PostgreSQL table
or a Kafka topic:

    out/dlq.jsonl | /abs/dlq.jsonl                          (JSON lines)
    postgresql://USER[:PASS]@HOST[:PORT]/DB  (postgres://)  [?table=NAME]  (default dead_letters)
    kafka://HOST:PORT/TOPIC                                 [?format=avro_registry]

Each kind is one entry of :data:`DLQ_KINDS`: how to parse its value, prepare the
queue before the pipeline starts, write to it and read it back. Every kind stores
the same envelope (:mod:`onceflow.io.dlq.envelope`), delivers at least once, and
its reader returns each ``dlq_id`` once. The backends are the modules
:mod:`~onceflow.io.dlq.jsonl`, :mod:`~onceflow.io.dlq.postgres` and
:mod:`~onceflow.io.dlq.kafka`, each imported only when its kind is used, so a
missing optional client (psycopg, confluent-kafka) matters only to its own queue.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Any, Callable, Dict, Iterator, Tuple

import apache_beam as beam

from onceflow.io.targets import Target
from onceflow.io.urls import POSTGRES_FORM, parse_postgres_url, query_params, redact_url
from onceflow.rows import check_identifier

DEFAULT_DLQ_TABLE = "dead_letters"
DLQ_FORMS = f"a file path (JSON lines), {POSTGRES_FORM} or kafka://HOST:PORT/TOPIC"
JSONL = "jsonl"  # the kind of a --dlq value without "://": a file path
KAFKA_DLQ_FORMATS = ("json", "avro_registry")  # a kafka:// queue's ?format=

Envelope = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DlqKind:
    """One kind of queue: how to parse its ``--dlq`` value, prepare it, which
    transform writes to it (with its step label) and how to read it back."""

    parse: Callable[[str], Target]
    prepare: Callable[[Target], None]
    write: Callable[[Target, str, str], Tuple[str, beam.PTransform]]
    read: Callable[[Target], Iterator[Envelope]]


# -- jsonl ----------------------------------------------------------------------


def _parse_jsonl(text: str) -> Target:
    return Target(JSONL, text)


def _prepare_jsonl(target: Target) -> None:
    from onceflow.io.dlq.jsonl import prepare_file

    prepare_file(target.location)


def _write_jsonl(target: Target, pipeline: str, pipeline_version: str):
    from onceflow.io.dlq.jsonl import AppendJsonlDoFn

    # The same step as WriteDeadLettersToJsonl's: WriteDeadLetters/AppendJsonLines.
    return "AppendJsonLines", beam.ParDo(AppendJsonlDoFn(target.location, pipeline, pipeline_version))


def _read_jsonl(target: Target) -> Iterator[Envelope]:
    from onceflow.io.dlq.jsonl import read_dead_letters

    return read_dead_letters(target.location)


# -- postgresql -----------------------------------------------------------------


def _parse_postgres(text: str) -> Target:
    location, table = parse_postgres_url(text, DEFAULT_DLQ_TABLE)
    return Target("postgresql", location, check_identifier(table, "table name"))


def _prepare_postgres(target: Target) -> None:
    import psycopg

    from onceflow.io.dlq.postgres import ensure_dlq_table
    from onceflow.io.postgres import unusable

    try:
        ensure_dlq_table(target.location, target.table)
    except psycopg.Error as error:
        raise unusable(target.describe(), error) from None


def _write_postgres(target: Target, pipeline: str, pipeline_version: str):
    from onceflow.io.dlq.postgres import WriteDeadLettersToPostgres

    return "InsertIntoPostgres", WriteDeadLettersToPostgres(target.location, target.table, pipeline, pipeline_version)


def _read_postgres(target: Target) -> Iterator[Envelope]:
    from onceflow.io.dlq.postgres import read_dead_letters

    return read_dead_letters(target.location, target.table)


# -- kafka ----------------------------------------------------------------------


def _parse_kafka(text: str) -> Target:
    from onceflow.io.kafka.config import parse_kafka_url

    value_format = query_params(text, ("format",)).get("format", "json")
    if value_format not in KAFKA_DLQ_FORMATS:
        raise ValueError(f"format {value_format!r}: a Kafka dead-letter topic is written as json or avro_registry")
    topic = parse_kafka_url(urllib.parse.urlunsplit(urllib.parse.urlsplit(text)._replace(query="")))
    options = (("format", value_format),) if value_format != "json" else ()
    return Target("kafka", topic.bootstrap_servers, topic.topic, options)


def _kafka_topic(target: Target):
    from onceflow.io.kafka.config import KafkaTopic

    return KafkaTopic(target.location, target.table)


def _prepare_kafka(target: Target) -> None:
    from onceflow.io.kafka.admin import require_topic

    require_topic(_kafka_topic(target), dict(target.client_settings))


def _write_kafka(target: Target, pipeline: str, pipeline_version: str):
    from onceflow.io.dlq.kafka import write_dead_letters_to_kafka

    avro = target.option("format") == "avro_registry"
    if avro and target.registry is None:
        raise ValueError("a kafka:// dead-letter topic with ?format=avro_registry needs a schema registry")
    return "ProduceToKafka", write_dead_letters_to_kafka(_kafka_topic(target), pipeline, pipeline_version,
                                                         dict(target.client_settings),
                                                         target.registry if avro else None)


def _read_kafka(target: Target) -> Iterator[Envelope]:
    from onceflow.io.dlq.kafka import read_dead_letters

    return read_dead_letters(_kafka_topic(target), dict(target.client_settings), target.registry)


# -- the registry ---------------------------------------------------------------

_POSTGRES = DlqKind(_parse_postgres, _prepare_postgres, _write_postgres, _read_postgres)

DLQ_KINDS: Dict[str, DlqKind] = {
    JSONL: DlqKind(_parse_jsonl, _prepare_jsonl, _write_jsonl, _read_jsonl),
    "postgresql": _POSTGRES,
    "postgres": _POSTGRES,
    "kafka": DlqKind(_parse_kafka, _prepare_kafka, _write_kafka, _read_kafka),
}


def parse_dlq_target(text: str) -> Target:
    """The queue a ``--dlq`` value names (forms in the module docstring).
    ValueError names the expected forms (passwords redacted)."""
    text = str(text).strip()
    if not text:
        raise ValueError(f"a dead-letter queue is needed (dead letters are never dropped): {DLQ_FORMS}")
    if "://" not in text:
        if text.lower().endswith((".gz", ".bz2")):  # appended to as plain text: its name would lie
            raise ValueError(f"{text}: a JSON-lines queue is written as plain text and appended to; name it "
                             "without the compression suffix, e.g. dlq.jsonl")
        return DLQ_KINDS[JSONL].parse(text)
    scheme = urllib.parse.urlsplit(text).scheme
    if scheme == JSONL or scheme not in DLQ_KINDS:
        raise ValueError(f"{redact_url(text)!r} has an unknown scheme; use {DLQ_FORMS}")
    return DLQ_KINDS[scheme].parse(text)


def _kind(target: Target) -> DlqKind:
    kind = DLQ_KINDS.get(target.scheme)
    if kind is None:
        raise ValueError(f"unknown dead-letter queue kind {target.scheme!r}")
    return kind


def prepare_dlq(target: Target) -> None:
    """Checks the queue is usable before the pipeline starts (creates the folder or
    the table, requires the topic); ValueError or OSError with a one-line message,
    passwords redacted."""
    _kind(target).prepare(target)


class WriteDeadLetters(beam.PTransform):
    """Writes dead letters to the queue ``target`` names, at least once; its one
    step is ``AppendJsonLines``, ``InsertIntoPostgres`` or ``ProduceToKafka``."""

    def __init__(self, target: Target, pipeline: str, pipeline_version: str):
        super().__init__()
        self._label, self._transform = _kind(target).write(target, pipeline, pipeline_version)

    def expand(self, letters: beam.PCollection) -> beam.PCollection:
        return letters | self._label >> self._transform


def read_dead_letters_from(target: Target) -> Iterator[Envelope]:
    """Each envelope in the queue once, whichever kind it is."""
    return _kind(target).read(target)
