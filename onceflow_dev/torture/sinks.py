"""The sinks a torture run writes to, and the faults it injects into them.

Each kind gives the job's ``--sink`` and ``--dlq``, reads back what the job wrote
(rows as ``(key, window start ms) -> (count, sum)``, dead letters as
``(partition, offset) -> reason``), and stalls the sink the way its writer can be
stalled: PostgreSQL and SQLite by a lock on the table or database, files by the
directory's lock that every window-file writer takes. Only PostgreSQL has
sessions to kill. The fault injection lives here, not in the sinks.
"""

from __future__ import annotations

import datetime
import pathlib
import sqlite3
import time
from typing import Dict, Optional, Tuple

from onceflow_dev.torture.truth import Aggregates, RowKey

SINK_KINDS = ("postgres", "sqlite", "parquet", "avro")
AGGREGATE = "count,sum:v"

Letters = Dict[Tuple[int, int], str]


class TortureSink:
    """One sink kind: where the job writes, how to read it back, how to stall it."""

    kind = ""
    has_sessions = False

    def sink_url(self) -> str:
        raise NotImplementedError

    def dlq_url(self) -> str:
        raise NotImplementedError

    def rows(self) -> Dict[RowKey, Aggregates]:
        raise NotImplementedError

    def dead_letters(self) -> Letters:
        raise NotImplementedError

    def counted_events(self) -> Optional[int]:
        """The sum of ``event_count`` over the rows (None before the sink exists)."""
        raise NotImplementedError

    def stall(self, seconds: float) -> str:
        """Blocks every write of the job for ``seconds``; says how."""
        raise NotImplementedError

    def kill_sessions(self) -> int:
        raise ValueError(f"a {self.kind} sink has no sessions to kill")


class _JsonlDeadLetters:
    """A dead-letter file beside the sink (the file and SQLite sinks)."""

    _dlq_path: pathlib.Path

    def dlq_url(self) -> str:
        return str(self._dlq_path)

    def dead_letters(self) -> Letters:
        from onceflow.io.dlq.jsonl import read_dead_letters

        return {(int(e["source"]["partition"]), int(e["source"]["offset"])): e["reason"]
                for e in read_dead_letters(str(self._dlq_path))}


def _aggregates(row: Dict) -> Aggregates:
    return int(row["count"]), round(row["sum_v"])


class PostgresSink(TortureSink):
    kind = "postgres"
    has_sessions = True

    def __init__(self, dsn: str, table: str):
        self._dsn, self._table = dsn, table

    def _url(self, table: str) -> str:
        separator = "&" if "?" in self._dsn else "?"
        return f"{self._dsn}{separator}table={table}"

    def sink_url(self) -> str:
        return self._url(self._table)

    def dlq_url(self) -> str:
        return self._url(self._table + "_dlq")

    def _connect(self, role: str):
        from onceflow.io.postgres import application_name, connect

        return connect(self._dsn, application_name(self._table) + role)

    def rows(self) -> Dict[RowKey, Aggregates]:
        from onceflow.rows import utc_millis

        with self._connect(":reader") as connection:
            found = connection.execute(f'SELECT k, window_start, count, sum_v FROM "{self._table}"').fetchall()
        return {(k, utc_millis(start)): _aggregates({"count": count, "sum_v": total})
                for k, start, count, total in found}

    def dead_letters(self) -> Letters:
        from onceflow.io.dlq.postgres import read_dead_letters

        return {(int(e["source"]["partition"]), int(e["source"]["offset"])): e["reason"]
                for e in read_dead_letters(self._dsn, self._table + "_dlq")}

    def counted_events(self) -> Optional[int]:
        try:
            with self._connect(":reader") as connection:
                (total,) = connection.execute(f'SELECT COALESCE(SUM(event_count), 0) FROM "{self._table}"').fetchone()
        except Exception:  # not created yet, or the database is away
            return None
        return int(total)

    def stall(self, seconds: float) -> str:
        with self._connect(":lock") as connection:
            with connection.transaction():
                connection.execute(f'LOCK TABLE "{self._table}" IN EXCLUSIVE MODE')
                time.sleep(seconds)
        return f"sink table locked for {seconds:.0f}s"

    def kill_sessions(self) -> int:
        """Kills the server side of every session the job's sink holds."""
        from onceflow.io.postgres import application_name

        with self._connect(":admin") as connection:
            (killed,) = connection.execute(
                "SELECT COUNT(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()", (application_name(self._table),)).fetchone()
        return killed


class SqliteSink(_JsonlDeadLetters, TortureSink):
    kind = "sqlite"

    def __init__(self, out: pathlib.Path, table: str):
        self._path, self._table = out / "sink.db", table
        self._dlq_path = out / "dlq.jsonl"

    def sink_url(self) -> str:
        return f"sqlite:///{self._path.resolve()}?table={self._table}"

    def _query(self, text: str):
        connection = sqlite3.connect(self._path, timeout=60)
        try:
            return connection.execute(text).fetchall()
        finally:
            connection.close()

    def rows(self) -> Dict[RowKey, Aggregates]:
        from onceflow.events import parse_event_time_ms

        return {(k, parse_event_time_ms(start)): _aggregates({"count": count, "sum_v": total})
                for k, start, count, total in self._query(f'SELECT k, window_start, count, sum_v FROM "{self._table}"')}

    def counted_events(self) -> Optional[int]:
        if not self._path.exists():
            return None
        try:
            return int(self._query(f'SELECT COALESCE(SUM(event_count), 0) FROM "{self._table}"')[0][0])
        except sqlite3.Error:
            return None

    def stall(self, seconds: float) -> str:
        connection = sqlite3.connect(self._path, timeout=60, isolation_level=None)
        try:
            connection.execute("BEGIN EXCLUSIVE")
            time.sleep(seconds)
            connection.execute("ROLLBACK")
        finally:
            connection.close()
        return f"sink database locked for {seconds:.0f}s"


class FileSink(_JsonlDeadLetters, TortureSink):
    def __init__(self, out: pathlib.Path, file_format: str):
        self.kind = file_format
        self._directory, self._format = out / "sink", file_format
        self._dlq_path = out / "dlq.jsonl"

    def sink_url(self) -> str:
        return f"file://{self._directory.resolve()}?format={self._format}"

    def _rows(self):
        from onceflow.aggregates import parse_aggregates
        from onceflow.io.file_sink import read_rows
        from onceflow.rows import RowSchema

        if not self._directory.exists():
            return []
        return read_rows(str(self._directory), RowSchema(("k",), parse_aggregates(AGGREGATE)), self._format)

    def rows(self) -> Dict[RowKey, Aggregates]:
        return {(row["k"], _millis(row["window_start"])): _aggregates(row) for row in self._rows()}

    def counted_events(self) -> Optional[int]:
        try:
            return sum(int(row["event_count"]) for row in self._rows())
        except (OSError, ValueError):  # a file replaced while read
            return None

    def stall(self, seconds: float) -> str:
        from onceflow.io.file_sink import LOCK_NAME
        import fcntl

        with open(self._directory / LOCK_NAME, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            time.sleep(seconds)
            fcntl.flock(handle, fcntl.LOCK_UN)
        return f"sink directory locked for {seconds:.0f}s"


def _millis(value) -> int:
    if isinstance(value, datetime.datetime):
        from onceflow.rows import utc_millis

        return utc_millis(value)
    return int(value)


def torture_sink(kind: str, out: pathlib.Path, dsn: str, table: str) -> TortureSink:
    """The sink of ``--sink KIND`` for a run writing under ``out``."""
    if kind == "postgres":
        return PostgresSink(dsn, table)
    if kind == "sqlite":
        return SqliteSink(out, table)
    if kind in ("parquet", "avro"):
        return FileSink(out, kind)
    raise ValueError(f"unknown sink kind {kind!r}; use one of {', '.join(SINK_KINDS)}")
