"""A dead-letter queue in a PostgreSQL table (psycopg 3): its writer and its reader.

The table has one column per envelope field (:data:`DLQ_COLUMNS`) and is created
if absent; a table with other columns is refused. ``dlq_id`` is the primary key
and the insert is ``ON CONFLICT (dlq_id) DO NOTHING``, so a retried bundle or a
second run stores each dead letter once (the first ``failed_at`` is kept).
Connections, batches, transactions and retries are those of the rows' sink
(:mod:`onceflow.io.postgres`).
"""

from __future__ import annotations

import datetime
from typing import Any, Dict, Iterator, List, Optional, Sequence

import apache_beam as beam
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from onceflow import metrics
from onceflow.deadletter import DeadLetter
from onceflow.events import format_utc_ms
from onceflow.io.batching import BatchWriteDoFn
from onceflow.io.dlq.envelope import ENVELOPE_TIME, to_envelope
from onceflow.io.postgres import Session, SessionHooks, application_name, connect, create_checked
from onceflow.io.urls import first_line, redact_url
from onceflow.rows import check_identifier, utc_millis

# The envelope (onceflow.io.dlq.envelope), one column per field.
DLQ_COLUMNS = (
    ("dlq_id", "TEXT PRIMARY KEY"),
    ("reason", "TEXT NOT NULL"),
    ("error_class", "TEXT NOT NULL"),
    ("message", "TEXT NOT NULL"),
    ("stage", "TEXT NOT NULL"),
    ("source", "JSONB NOT NULL"),
    ("raw_base64", "TEXT NOT NULL"),
    ("raw_preview", "TEXT NOT NULL"),
    ("event_id", "TEXT"),
    ("event_time", "TIMESTAMPTZ"),
    ("failed_at", "TIMESTAMPTZ NOT NULL"),
    ("pipeline", "TEXT NOT NULL"),
    ("pipeline_version", "TEXT NOT NULL"),
)
_DLQ_NAMES = tuple(name for name, _ in DLQ_COLUMNS)


def create_dlq_table_sql(table: str) -> sql.Composed:
    """``CREATE TABLE IF NOT EXISTS`` of a dead-letter table."""
    check_identifier(table, "table name")
    return sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
        sql.Identifier(table),
        sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in DLQ_COLUMNS))


def insert_dlq_sql(table: str) -> sql.Composed:
    """``INSERT ... ON CONFLICT (dlq_id) DO NOTHING``: each dead letter stored once."""
    check_identifier(table, "table name")
    return sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO NOTHING").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, _DLQ_NAMES)),
        sql.SQL(", ").join(sql.Placeholder() for _ in _DLQ_NAMES), sql.Identifier("dlq_id"))


def ensure_dlq_table(dsn: str, table: str) -> None:
    """Creates the dead-letter table if absent; ValueError if it has other columns."""
    create_checked(dsn, table, create_dlq_table_sql(table), _DLQ_NAMES)


def _text(value: Optional[str]) -> Optional[str]:
    # PostgreSQL text cannot hold NUL; only the people-facing fields can contain
    # one (raw_base64 keeps the exact bytes).
    return None if value is None else value.replace("\x00", "\ufffd")


def _parse_envelope_time(text: Optional[str]) -> Optional[datetime.datetime]:
    if text is None:
        return None
    return datetime.datetime.strptime(text, ENVELOPE_TIME).replace(tzinfo=datetime.timezone.utc)


def envelope_values(envelope: Dict[str, Any]) -> List[Any]:
    """The envelope's fields in :data:`DLQ_COLUMNS` order, as psycopg binds them."""
    values: List[Any] = []
    for name in _DLQ_NAMES:
        value = envelope[name]
        if name == "source":
            value = Jsonb(value)
        elif name in ("event_time", "failed_at"):
            value = _parse_envelope_time(value)
        elif isinstance(value, str):
            value = _text(value)
        values.append(value)
    return values


class _PostgresDeadLetterDoFn(SessionHooks, BatchWriteDoFn):
    def __init__(self, dsn: str, table: str, pipeline: str, pipeline_version: str, batch_size: int):
        super().__init__(batch_size, what=f"insert into {table}")
        self._dsn = dsn
        self._table = table
        self._pipeline = pipeline
        self._version = pipeline_version
        self._session = Session(dsn, table)
        self._delivered = metrics.counter(metrics.DLQ_WRITTEN)

    def open(self) -> None:
        ensure_dlq_table(self._dsn, self._table)
        self._statement = insert_dlq_sql(self._table)

    def write_batch(self, batch: Sequence[DeadLetter]) -> None:
        values = [envelope_values(to_envelope(letter, self._pipeline, self._version)) for letter in batch]
        self._session.execute_batch(self._statement, values)
        self._delivered.inc(len(batch))


class WriteDeadLettersToPostgres(beam.PTransform):
    """Inserts dead letters (the envelope, one column per field) into a
    PostgreSQL table, created if absent; its one step is ``InsertDeadLetters``.

    ``dlq_id`` is the primary key and the insert is ``ON CONFLICT (dlq_id) DO
    NOTHING``, so a retried bundle or a second run stores each dead letter once
    (the first ``failed_at`` is kept). Batches, transactions and retries as for
    rows; ``dlq_written`` counts dead letters delivered.
    """

    def __init__(self, dsn: str, table: str, pipeline: str, pipeline_version: str, batch_size: int = 500):
        super().__init__()
        check_identifier(table, "table name")
        self._args = (dsn, table, pipeline, pipeline_version, batch_size)

    def expand(self, letters: beam.PCollection) -> beam.PCollection:
        return letters | "InsertDeadLetters" >> beam.ParDo(_PostgresDeadLetterDoFn(*self._args))


def read_dead_letters(dsn: str, table: str) -> Iterator[Dict[str, Any]]:
    """Each envelope in a dead-letter table once, oldest first, in the same shape as
    :func:`onceflow.io.dlq.jsonl.read_dead_letters` returns from a file. ValueError
    (one line, password redacted) when the database has no table of that name;
    other errors are psycopg's (the server out of reach, no such database)."""
    check_identifier(table, "table name")
    query = sql.SQL("SELECT {} FROM {} ORDER BY {}, {}").format(
        sql.SQL(", ").join(map(sql.Identifier, _DLQ_NAMES)), sql.Identifier(table),
        sql.Identifier("failed_at"), sql.Identifier("dlq_id"))
    with connect(dsn, application_name(table)) as connection:
        try:
            rows = connection.execute(query)
        except psycopg.errors.UndefinedTable:
            raise ValueError(f"no dead-letter table {table!r} exists in {redact_url(dsn)}: check ?table= "
                             "(a job creates its table when it starts; the default is dead_letters)") from None
        except psycopg.errors.UndefinedColumn as error:  # another table: the rows', say
            raise ValueError(f"table {table!r} in {redact_url(dsn)} is not a dead-letter table "
                             f"({first_line(error)}): check ?table= (the default is dead_letters)") from None
        for values in rows:
            envelope = dict(zip(_DLQ_NAMES, values))
            if envelope["event_time"] is not None:
                envelope["event_time"] = format_utc_ms(utc_millis(envelope["event_time"]))
            envelope["failed_at"] = envelope["failed_at"].astimezone(datetime.timezone.utc).strftime(ENVELOPE_TIME)
            yield envelope
