"""SQLite sink: a guarded upsert of aggregate rows on their deterministic key."""

from __future__ import annotations

import contextlib
import datetime
import os
import sqlite3
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import apache_beam as beam

from onceflow.events import format_utc_ms, parse_event_time_ms
from onceflow.io.batching import UpsertRowsDoFn
from onceflow.io.progress import PROGRESS_TABLE, Position
from onceflow.io.retry import call_with_retries
from onceflow.rows import (
    DEFAULT_BATCH_ROWS, EVENT_COUNT, WINDOW_END, WINDOW_START, WRITTEN_AT, RowSchema, check_columns, check_identifier,
    check_sink_arguments, row_values,
)

SINK_CACHE_KIB = 65536  # the sink connection's page cache
SINK_CHECKPOINT_PAGES = 10_000  # WAL pages (4 KiB) between automatic checkpoints

_SQL_TYPES = {"key": "TEXT NOT NULL", "timestamp": "TEXT NOT NULL", "integer": "INTEGER", "number": "NUMERIC"}


def _quote(name: str) -> str:
    return '"' + name + '"'


def create_table_sql(table: str, schema: RowSchema) -> str:
    check_identifier(table, "table name")
    columns = [f"{_quote(c)} {_SQL_TYPES[schema.column_kind(c)]}" for c in schema.columns]
    columns.append(f"{_quote(WRITTEN_AT)} TEXT NOT NULL")
    primary_key = ", ".join(_quote(c) for c in schema.table_key)
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

    def create() -> List[str]:
        with contextlib.closing(sqlite3.connect(path, timeout=60, isolation_level=None)) as connection:
            # WAL is a property of the file: set here, before any writer starts, the
            # writers' own switch is a no-op (two writers switching at once can
            # deadlock, and SQLite then fails one at once instead of waiting).
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(create_table_sql(table, schema))
            return [row[1] for row in connection.execute(f"PRAGMA table_info({_quote(table)})")]

    found = call_with_retries(create, _is_transient, what=f"create table {table} in {path}")
    check_columns(found, [*schema.columns, WRITTEN_AT], table, path,
                  hint="use another table (?table=NAME) or another file")


def latest_window_ms(path: str, table: str) -> Optional[Tuple[int, int]]:
    """The bounds (epoch ms) of the latest window the table holds, None when empty."""
    check_identifier(table, "table name")
    with sqlite3.connect(path, timeout=60) as connection:
        found = connection.execute(f"SELECT {_quote(WINDOW_START)}, {_quote(WINDOW_END)} FROM {_quote(table)} "
                                   f"ORDER BY {_quote(WINDOW_END)} DESC LIMIT 1").fetchone()
    return None if found is None else (parse_event_time_ms(found[0]), parse_event_time_ms(found[1]))


def to_sql_values(row: Dict[str, Any], schema: RowSchema, written_at: str) -> List[Any]:
    return [*row_values(row, schema, format_utc_ms), written_at]


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error).lower()


class _SqliteUpsertDoFn(UpsertRowsDoFn):
    def __init__(self, path: str, table: str, schema: RowSchema, batch_size: int):
        super().__init__(batch_size, what=f"upsert into {table}")
        self._path = path
        self._table = table
        self._schema = schema

    def open(self) -> None:
        # Several instances may open at once (one per bundle a worker runs in
        # parallel), and a concurrent switch to WAL can fail at once as "locked":
        # retried like a locked write.
        call_with_retries(self._open, _is_transient, what=f"open the SQLite sink {self._path}",
                          on_retry=lambda _: self.close())

    def _open(self) -> None:
        ensure_table(self._path, self._table, self._schema)
        # Beam may call setup, process and teardown on different threads of one worker;
        # this DoFn instance never uses the connection from two threads at once.
        self._connection = sqlite3.connect(self._path, timeout=60, isolation_level=None, check_same_thread=False)
        # WAL: set on the file by ensure_table (a property of the file, not the connection).
        # In WAL mode NORMAL syncs at checkpoints, not at every commit (a commit was
        # most of the sink's time). A crash of the process loses nothing; a power
        # loss may lose the last commits, but only a suffix of the log: the
        # positions (same file, committed after their rows) never outlive the rows.
        self._connection.execute("PRAGMA synchronous=NORMAL")
        # SQLite's defaults (a 2 MiB page cache, a checkpoint every 1,000 WAL pages)
        # made a backfill's upserts re-read index pages and checkpoint (with a sync)
        # every few batches: 166,597 rows took 1.1 s, with these 0.67 s. Both are
        # bounds: the cache is at most 64 MiB, the log is checkpointed at about 40 MiB.
        self._connection.execute(f"PRAGMA cache_size=-{SINK_CACHE_KIB}")
        self._connection.execute(f"PRAGMA wal_autocheckpoint={SINK_CHECKPOINT_PAGES}")
        self._statement = upsert_sql(self._table, self._schema)

    def close(self) -> None:
        connection, self._connection = getattr(self, "_connection", None), None
        if connection is not None:
            connection.close()

    def is_transient(self, error: BaseException) -> bool:
        return _is_transient(error)

    def upsert(self, rows: Sequence[Dict[str, Any]], written_at: datetime.datetime) -> int:
        stamp = written_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        values = [to_sql_values(row, self._schema, stamp) for row in rows]
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

    def __init__(self, path: str, table: str, schema: RowSchema, batch_size: int = DEFAULT_BATCH_ROWS):
        super().__init__()
        check_identifier(table, "table name")
        check_sink_arguments("WriteRowsToSqlite", schema, batch_size)
        self._args = (path, table, schema, batch_size)

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return rows | "UpsertRows" >> beam.ParDo(_SqliteUpsertDoFn(*self._args))


# -- progress -------------------------------------------------------------------


class SqliteProgress:
    """The positions of live jobs writing to ``rows_table``, in the table
    ``onceflow_progress`` of the same database file (see :mod:`onceflow.io.progress`)."""

    def __init__(self, path: str, rows_table: str):
        self._path = path
        self._rows_table = check_identifier(rows_table, "table name")

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self._path, timeout=60, isolation_level=None)
        connection.execute(f"CREATE TABLE IF NOT EXISTS {PROGRESS_TABLE} (job TEXT NOT NULL, rows_table TEXT NOT NULL, "
                           "topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, "
                           "high_water_ms INTEGER, final_through_ms INTEGER, updated_at TEXT NOT NULL, "
                           "PRIMARY KEY (job, rows_table, topic, kafka_partition))")
        return connection

    def read(self, job: str, topic: str) -> Dict[int, Position]:
        connection = self._connect()
        try:
            found = connection.execute(
                f"SELECT kafka_partition, next_offset, high_water_ms, final_through_ms FROM {PROGRESS_TABLE} "
                "WHERE job = ? AND rows_table = ? AND topic = ?", (job, self._rows_table, topic)).fetchall()
        finally:
            connection.close()
        return {p: Position(topic, p, offset, high, final) for p, offset, high, final in found}

    def jobs(self) -> Set[Tuple[str, str]]:
        # A backfill asks too: no table is made.
        connection = sqlite3.connect(self._path, timeout=60, isolation_level=None)
        try:
            if not connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                      (PROGRESS_TABLE,)).fetchone():
                return set()
            return {(job, topic) for job, topic in connection.execute(
                f"SELECT DISTINCT job, topic FROM {PROGRESS_TABLE} WHERE rows_table = ?", (self._rows_table,))}
        finally:
            connection.close()

    def write(self, job: str, positions: Sequence[Position]) -> None:
        stamp = format_utc_ms(int(time.time() * 1000))
        values = [(job, self._rows_table, p.topic, p.partition, p.next_offset, p.high_water_ms, p.final_through_ms,
                   stamp) for p in positions]

        def write() -> None:
            connection = self._connect()
            try:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    connection.executemany(_PROGRESS_UPSERT, values)
                    connection.execute("COMMIT")
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
            finally:
                connection.close()

        call_with_retries(write, _is_transient, what=f"store positions in {PROGRESS_TABLE}")


_PROGRESS_UPSERT = (
    f"INSERT INTO {PROGRESS_TABLE} (job, rows_table, topic, kafka_partition, next_offset, high_water_ms, "
    "final_through_ms, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (job, rows_table, topic, kafka_partition) DO UPDATE SET next_offset = excluded.next_offset, "
    "high_water_ms = excluded.high_water_ms, final_through_ms = excluded.final_through_ms, "
    "updated_at = excluded.updated_at "
    f"WHERE excluded.next_offset >= {PROGRESS_TABLE}.next_offset"
)
