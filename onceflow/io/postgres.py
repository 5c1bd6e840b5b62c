"""PostgreSQL sinks (psycopg 3): guarded upserts of aggregate rows, the positions
of live jobs, and the connections, sessions and retries the dead-letter table
(:mod:`onceflow.io.dlq.postgres`) shares.

Rows: ``INSERT ... ON CONFLICT (key fields, window_start, window_end) DO UPDATE
SET ... WHERE EXCLUDED.event_count >= t.event_count``, one transaction per batch
of at most ``batch_size`` rows, every batch committed before its bundle
completes. A retried bundle or a replay overwrites with the same version; an
older or less complete version never replaces a newer one.

Transient errors (the connection lost, the backend terminated or the server
shutting down, a serialization failure, a deadlock, a lock timeout, too many
connections) roll the batch back and retry it with capped backoff on a fresh
connection where the old one broke; after the cap the bundle fails loudly.
Because each batch is one transaction and the upsert is idempotent, a batch cut
off in the middle is neither lost nor doubled. Any other error is permanent and
raised at once; a good row is never dead-lettered.

Names: every table and column name is checked with
:func:`onceflow.rows.check_identifier` and quoted with ``psycopg.sql.Identifier``;
values are always bound parameters, so nothing from a flag reaches SQL as syntax.

Types: key fields ``TEXT``, ``window_start``/``window_end`` ``TIMESTAMPTZ``,
``event_count`` and ``count`` ``BIGINT``, other aggregates ``DOUBLE PRECISION``
(the same IEEE double the pipeline computes, so every float round-trips bit for
bit and the column means the same in BigQuery ``FLOAT64`` and Parquet ``double``;
integer sums are exact up to 2**53), ``written_at TIMESTAMPTZ``.

Metrics: ``sink_rows_written``, ``sink_rows_stale`` (refused by the guard or
superseded by a newer version in the same batch), ``sink_retries``.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import apache_beam as beam
import psycopg
from psycopg import sql

from onceflow.io.batching import UpsertRowsDoFn
from onceflow.io.progress import PROGRESS_TABLE, Position
from onceflow.io.retry import DatabaseUnreachable, T, call_with_retries
from onceflow.io.urls import first_line, redact_url
from onceflow.rows import (
    DEFAULT_BATCH_ROWS, EVENT_COUNT, WRITTEN_AT, RowSchema, check_columns, check_identifier, check_sink_arguments,
    newest_per_key, row_values,
    WINDOW_END, WINDOW_START, utc_datetime, utc_millis,
)

_SQL_TYPES = {"key": "TEXT NOT NULL", "timestamp": "TIMESTAMPTZ NOT NULL", "integer": "BIGINT",
              "number": "DOUBLE PRECISION"}
CONNECT_TIMEOUT_S = 10

# SQLSTATEs worth retrying: serialization failure, deadlock, lock not available
# (lock_timeout), admin / crash shutdown (pg_terminate_backend, a restart), the
# server not accepting connections yet, too many connections; and class 08,
# connection exceptions.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"})


def is_transient(error: BaseException) -> bool:
    """Whether retrying the same batch (on a new connection if needed) can succeed."""
    if not isinstance(error, psycopg.Error):
        return False
    state = getattr(error, "sqlstate", None)
    if state:
        return state in TRANSIENT_SQLSTATES or state.startswith("08")
    # No SQLSTATE: raised by the client itself, e.g. "server closed the connection
    # unexpectedly", "connection refused", "the connection is lost"; or a connection
    # the server or libpq refused for good (the server's reason is only in the text).
    if not isinstance(error, psycopg.OperationalError):
        return False
    text = str(error)
    return not any(reason in text for reason in _REFUSED_FOR_GOOD)


# What a connection attempt that no retry can mend says (a database or role that
# does not exist, a login refused, a connection string libpq cannot use); a server
# starting up, shutting down or out of connections says otherwise and is retried.
_REFUSED_FOR_GOOD = (
    "does not exist",  # FATAL:  database "x" does not exist / role "x" does not exist
    "authentication failed",  # password, SCRAM, ident, GSSAPI ...
    "no pg_hba.conf entry",
    "no password supplied",
    "permission denied for database",
    "connection is bad: invalid",  # invalid sslmode value, invalid connection option, invalid integer value
    "in connection info string",  # missing "=" after ..., unterminated quoted string ...
    "server does not support SSL",
)


def unusable(what: str, error: BaseException) -> Exception:
    """The one-line error for a sink or queue ``what`` that ``error`` made unusable:
    :class:`DatabaseUnreachable` for a transient error (retries spent), ValueError
    for anything else (a login, a database or a table that cannot be used)."""
    kind = DatabaseUnreachable if is_transient(error) else ValueError
    return kind(f"cannot use {what}: {first_line(error)}")


def connect(dsn: str, application_name: str) -> psycopg.Connection:
    """An autocommit connection; each write opens its own transaction."""
    return psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                           application_name=application_name)


def with_retries(action: Callable[[], T], what: str) -> T:
    """``action()`` (which opens its own connection), tried again on a transient
    error as the writes are: a session killed or a server restarting while a job
    starts (creating its tables, reading its positions) is not the job's failure."""
    return call_with_retries(action, is_transient, what=what)


def application_name(table: str) -> str:
    """What the sink's sessions show in ``pg_stat_activity``."""
    return f"onceflow:{table}"


# -- aggregate rows -------------------------------------------------------------


def create_table_sql(table: str, schema: RowSchema) -> sql.Composed:
    check_identifier(table, "table name")
    columns = [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(_SQL_TYPES[schema.column_kind(c)]))
               for c in schema.columns]
    columns.append(sql.SQL("{} TIMESTAMPTZ NOT NULL").format(sql.Identifier(WRITTEN_AT)))
    return sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
        sql.Identifier(table), sql.SQL(", ").join(columns),
        sql.SQL(", ").join(map(sql.Identifier, schema.table_key)))


def upsert_sql(table: str, schema: RowSchema) -> sql.Composed:
    """``INSERT ... ON CONFLICT (pk) DO UPDATE ... WHERE EXCLUDED.event_count >= t.event_count``."""
    check_identifier(table, "table name")
    columns = [*schema.columns, WRITTEN_AT]
    updates = sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in (*schema.value_columns, WRITTEN_AT))
    return sql.SQL(
        "INSERT INTO {table} AS t ({columns}) VALUES ({values}) "
        "ON CONFLICT ({key}) DO UPDATE SET {updates} "
        "WHERE EXCLUDED.{version} >= t.{version}"
    ).format(
        table=sql.Identifier(table),
        columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
        values=sql.SQL(", ").join(sql.Placeholder() for _ in columns),
        key=sql.SQL(", ").join(map(sql.Identifier, schema.primary_key)),
        updates=updates,
        version=sql.Identifier(EVENT_COUNT),
    )


def _table_columns(connection: psycopg.Connection, table: str) -> List[str]:
    rows = connection.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position", (table,))
    return [name for (name,) in rows]


def create_checked(dsn: str, table: str, create: sql.Composed, expected: Sequence[str]) -> None:
    """Runs ``create`` (a ``CREATE TABLE IF NOT EXISTS``) under a lock, then
    ValueError (one line) if the table's columns are not ``expected``."""
    def create_and_read_columns() -> List[str]:
        with connect(dsn, application_name(table)) as connection:
            with connection.transaction():
                # Serialises concurrent CREATE TABLE IF NOT EXISTS from several workers.
                connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (application_name(table),))
                connection.execute(create)
            return _table_columns(connection, table)

    check_columns(with_retries(create_and_read_columns, f"create {table}"), expected, table, redact_url(dsn))


def ensure_table(dsn: str, table: str, schema: RowSchema) -> None:
    """Creates the rows table if absent; ValueError (one line) if it exists with
    other columns. Connection errors are raised as they are."""
    create_checked(dsn, table, create_table_sql(table, schema), [*schema.columns, WRITTEN_AT])


def latest_window_ms(dsn: str, table: str) -> Optional[Tuple[int, int]]:
    """The bounds (epoch ms) of the latest window the table holds, None when empty."""
    check_identifier(table, "table name")

    def read() -> Optional[Tuple[Any, Any]]:
        with connect(dsn, application_name(table)) as connection:
            return connection.execute(sql.SQL("SELECT {}, {} FROM {} ORDER BY {} DESC LIMIT 1").format(
                sql.Identifier(WINDOW_START), sql.Identifier(WINDOW_END), sql.Identifier(table),
                sql.Identifier(WINDOW_END))).fetchone()

    found = with_retries(read, f"read the latest window of {table}")
    return None if found is None else (utc_millis(found[0]), utc_millis(found[1]))


def to_pg_values(row: Dict[str, Any], schema: RowSchema, written_at: datetime.datetime) -> List[Any]:
    return [*row_values(row, schema, utc_datetime), written_at]


class Session:
    """One connection, opened on first use and reopened after it broke."""

    def __init__(self, dsn: str, table: str):
        self._dsn = dsn
        self._table = table
        self._connection: Optional[psycopg.Connection] = None

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_connection": None}

    def execute_batch(self, statement: sql.Composed, values: Sequence[Sequence[Any]]) -> int:
        """Runs ``statement`` for each row of ``values`` in one transaction; the
        number of rows it changed."""
        if self._connection is None or self._connection.closed:
            self._connection = connect(self._dsn, application_name(self._table))
        with self._connection.transaction():
            with self._connection.cursor() as cursor:
                cursor.executemany(statement, values)
                return max(cursor.rowcount, 0)

    def recover(self, _error: BaseException) -> None:
        """After a transient error: drop the connection if it broke (the retry
        reconnects); otherwise the transaction was rolled back and it is reused."""
        if self._connection is not None and (self._connection.broken or self._connection.closed):
            self.close()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # a broken connection may fail to close; it is gone either way
                pass


class SessionHooks:
    """The retry hooks of a batch writer that holds a :class:`Session` as ``_session``."""

    _session: Session

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)

    def recover(self, error: BaseException) -> None:
        self._session.recover(error)

    def close(self) -> None:
        self._session.close()


class _PostgresUpsertDoFn(SessionHooks, UpsertRowsDoFn):
    def __init__(self, dsn: str, table: str, schema: RowSchema, batch_size: int):
        super().__init__(batch_size, what=f"upsert into {table}")
        self._dsn = dsn
        self._table = table
        self._schema = schema
        self._session = Session(dsn, table)

    def open(self) -> None:
        ensure_table(self._dsn, self._table, self._schema)
        self._statement = upsert_sql(self._table, self._schema)


    def upsert(self, rows: Sequence[Dict[str, Any]], written_at: datetime.datetime) -> int:
        newest, _ = newest_per_key(rows, self._schema)
        values = [to_pg_values(row, self._schema, written_at) for row in newest]
        return self._session.execute_batch(self._statement, values)


class WriteRowsToPostgres(beam.PTransform):
    """Upserts aggregate rows into a PostgreSQL table on their deterministic key.

    Input: ``PCollection[dict]`` of rows from
    :class:`~onceflow.transforms.WindowedAggregate`; any windowing, bounded or
    unbounded. Guarantee: after the pipeline (or each bundle) succeeds, the table
    holds for each key the version with the greatest ``event_count`` ever written;
    replays and retries change only ``written_at``. The table is created if absent
    (a table with other columns is refused). See the module docstring for
    batching, retries and metrics.
    """

    def __init__(self, dsn: str, table: str, schema: RowSchema, batch_size: int = DEFAULT_BATCH_ROWS):
        super().__init__()
        check_identifier(table, "table name")
        check_sink_arguments("WriteRowsToPostgres", schema, batch_size)
        self._args = (dsn, table, schema, batch_size)

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return rows | "UpsertRows" >> beam.ParDo(_PostgresUpsertDoFn(*self._args))


# -- progress -------------------------------------------------------------------

_PROGRESS_CREATE = sql.SQL(
    "CREATE TABLE IF NOT EXISTS {} (job TEXT NOT NULL, rows_table TEXT NOT NULL, topic TEXT NOT NULL, "
    "kafka_partition INTEGER NOT NULL, next_offset BIGINT NOT NULL, high_water_ms BIGINT, "
    "final_through_ms BIGINT, updated_at TIMESTAMPTZ NOT NULL, "
    "PRIMARY KEY (job, rows_table, topic, kafka_partition))").format(sql.Identifier(PROGRESS_TABLE))
_PROGRESS_UPSERT = sql.SQL(
    "INSERT INTO {0} AS p (job, rows_table, topic, kafka_partition, next_offset, high_water_ms, final_through_ms, "
    "updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, now()) "
    "ON CONFLICT (job, rows_table, topic, kafka_partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, "
    "high_water_ms = EXCLUDED.high_water_ms, final_through_ms = EXCLUDED.final_through_ms, "
    "updated_at = EXCLUDED.updated_at WHERE EXCLUDED.next_offset >= p.next_offset").format(
        sql.Identifier(PROGRESS_TABLE))


class PostgresProgress:
    """The positions of live jobs writing to ``rows_table``, in the table
    ``onceflow_progress`` of the same database (see :mod:`onceflow.io.progress`).
    Transient errors are retried like the rows' writes."""

    def __init__(self, dsn: str, rows_table: str):
        self._dsn = dsn
        self._rows_table = check_identifier(rows_table, "table name")
        self._session = Session(dsn, rows_table)

    def _create(self) -> None:
        with connect(self._dsn, application_name(self._rows_table)) as connection:
            with connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (PROGRESS_TABLE,))
                connection.execute(_PROGRESS_CREATE)

    def read(self, job: str, topic: str) -> Dict[int, Position]:
        def read() -> List[Tuple[int, int, Optional[int], Optional[int]]]:
            self._create()
            with connect(self._dsn, application_name(self._rows_table)) as connection:
                return connection.execute(sql.SQL(
                    "SELECT kafka_partition, next_offset, high_water_ms, final_through_ms FROM {} "
                    "WHERE job = %s AND rows_table = %s AND topic = %s").format(sql.Identifier(PROGRESS_TABLE)),
                    (job, self._rows_table, topic)).fetchall()

        found = with_retries(read, f"read positions from {PROGRESS_TABLE}")
        return {p: Position(topic, p, offset, high, final) for p, offset, high, final in found}

    def jobs(self) -> Set[Tuple[str, str]]:
        def read() -> List[Tuple[str, str]]:
            # A backfill asks too: no table is made.
            with connect(self._dsn, application_name(self._rows_table)) as connection:
                if connection.execute("SELECT to_regclass(%s)", (PROGRESS_TABLE,)).fetchone()[0] is None:
                    return []
                return connection.execute(sql.SQL("SELECT DISTINCT job, topic FROM {} WHERE rows_table = %s").format(
                    sql.Identifier(PROGRESS_TABLE)), (self._rows_table,)).fetchall()

        return {(job, topic) for job, topic in with_retries(read, f"read positions from {PROGRESS_TABLE}")}

    def write(self, job: str, positions: Sequence[Position]) -> None:
        values = [(job, self._rows_table, p.topic, p.partition, p.next_offset, p.high_water_ms, p.final_through_ms)
                  for p in positions]
        if not getattr(self, "_created", False):
            with_retries(self._create, f"create {PROGRESS_TABLE}")
            self._created = True
        call_with_retries(lambda: self._session.execute_batch(_PROGRESS_UPSERT, values), is_transient,
                          what=f"store positions in {PROGRESS_TABLE}", on_retry=self._session.recover)

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_created": False}
