"""SQLite sink: a guarded upsert of aggregate rows on their deterministic key."""

from __future__ import annotations

import datetime
import os
import sqlite3
from typing import Any, Dict, List, Sequence

import apache_beam as beam

from onceflow import metrics
from onceflow.events import format_utc_ms
from onceflow.io.retry import call_with_retries
from onceflow.rows import EVENT_COUNT, WRITTEN_AT, RowSchema, check_identifier

_SQL_TYPES = {"key": "TEXT NOT NULL", "timestamp": "TEXT NOT NULL", "integer": "INTEGER", "number": "NUMERIC"}


def _quote(name: str) -> str:
    return '"' + name + '"'


def create_table_sql(table: str, schema: RowSchema) -> str:
    check_identifier(table, "table name")
    columns = [f"{_quote(c)} {_SQL_TYPES[schema.column_kind(c)]}" for c in schema.columns]
    columns.append(f"{_quote(WRITTEN_AT)} TEXT NOT NULL")
    primary_key = ", ".join(_quote(c) for c in schema.primary_key)
    return f"CREATE TABLE IF NOT EXISTS {_quote(table)} ({', '.join(columns)}, PRIMARY KEY ({primary_key}))"


def upsert_sql(table: str, schema: RowSchema) -> str:
    """``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` the stored version is not newer."""
    check_identifier(table, "table name")
    columns = [*schema.columns, WRITTEN_AT]
    updates = ", ".join(f"{_quote(c)} = excluded.{_quote(c)}" for c in (*schema.value_columns, WRITTEN_AT))
    return (
        f"INSERT INTO {_quote(table)} ({', '.join(_quote(c) for c in columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)}) "
        f"ON CONFLICT ({', '.join(_quote(c) for c in schema.primary_key)}) DO UPDATE SET {updates} "
        f"WHERE excluded.{_quote(EVENT_COUNT)} >= {_quote(table)}.{_quote(EVENT_COUNT)}"
    )


def ensure_table(path: str, table: str, schema: RowSchema) -> None:
    """Creates the table if absent; fails with a clear message if it exists with
    other columns (a table from another aggregate spec)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with sqlite3.connect(path, timeout=60) as connection:
        connection.execute(create_table_sql(table, schema))
        found = [row[1] for row in connection.execute(f"PRAGMA table_info({_quote(table)})")]
    expected = [*schema.columns, WRITTEN_AT]
    if found != expected:
        raise ValueError(
            f"table {table!r} in {path} has columns {found}, but this job writes {expected}; "
            "use another table (?table=NAME) or another file"
        )


def to_sql_values(row: Dict[str, Any], schema: RowSchema, written_at: str) -> List[Any]:
    values = []
    for column in schema.columns:
        value = row[column]
        values.append(format_utc_ms(value) if schema.column_kind(column) == "timestamp" else value)
    values.append(written_at)
    return values


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error).lower()


class _SqliteUpsertDoFn(beam.DoFn):
    def __init__(self, path: str, table: str, schema: RowSchema, batch_size: int):
        self._path = path
        self._table = table
        self._schema = schema
        self._batch_size = batch_size
        self._written = metrics.counter(metrics.SINK_ROWS_WRITTEN)
        self._stale = metrics.counter(metrics.SINK_ROWS_STALE)
        self._retries = metrics.counter(metrics.SINK_RETRIES)

    def setup(self) -> None:
        ensure_table(self._path, self._table, self._schema)
        # Beam may call setup, process and teardown on different threads of one worker;
        # this DoFn instance never uses the connection from two threads at once.
        self._connection = sqlite3.connect(self._path, timeout=60, isolation_level=None, check_same_thread=False)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._statement = upsert_sql(self._table, self._schema)

    def start_bundle(self) -> None:
        self._batch: List[Dict[str, Any]] = []

    def process(self, row: Dict[str, Any]):
        self._batch.append(row)
        if len(self._batch) >= self._batch_size:
            self._flush()

    def finish_bundle(self) -> None:
        self._flush()

    def teardown(self) -> None:
        connection = getattr(self, "_connection", None)
        if connection is not None:
            connection.close()

    def _flush(self) -> None:
        if not self._batch:
            return
        written_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        values = [to_sql_values(row, self._schema, written_at) for row in self._batch]
        changed = call_with_retries(
            lambda: self._write(values), _is_transient, what=f"upsert into {self._table}",
            on_retry=lambda _: self._retries.inc(),
        )
        self._written.inc(changed)
        self._stale.inc(len(values) - changed)
        self._batch = []

    def _write(self, values: Sequence[Sequence[Any]]) -> int:
        connection = self._connection
        before = connection.total_changes
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(self._statement, values)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return connection.total_changes - before


class WriteRowsToSqlite(beam.PTransform):
    """Upserts aggregate rows into an SQLite table on their deterministic key.

    Input: ``PCollection[dict]`` of rows from
    :class:`~onceflow.transforms.WindowedAggregate`. Each row is written with
    ``INSERT ... ON CONFLICT (key fields, window_start, window_end) DO UPDATE ...
    WHERE excluded.event_count >= stored.event_count``: a retry or a replay
    overwrites instead of adding, and an older or less complete version never
    replaces a newer one. Writes go in transactions of at most ``batch_size`` rows,
    flushed before each bundle completes; a locked database is retried with backoff,
    then the bundle fails loudly.

    Metrics: ``sink_rows_written``, ``sink_rows_stale`` (refused by the guard),
    ``sink_retries``.
    """

    def __init__(self, path: str, table: str, schema: RowSchema, batch_size: int = 500):
        super().__init__()
        check_identifier(table, "table name")
        if batch_size <= 0:
            raise ValueError("batch size must be positive")
        self._args = (path, table, schema, batch_size)

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return rows | "UpsertRows" >> beam.ParDo(_SqliteUpsertDoFn(*self._args))
