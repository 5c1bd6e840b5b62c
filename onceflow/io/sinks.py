"""Choosing a sink by URL, and the one transform that writes rows to it.

Each scheme is one entry of :data:`SINKS`: how to parse its URL, how to prepare
the sink before the pipeline starts, and which transform writes to it. Sink
modules are imported only when their scheme is used, so a missing optional
client (psycopg, google-cloud-bigquery) matters only to its own sink.

    sqlite:///REL/PATH.db | sqlite:////ABS/PATH.db          [?table=NAME]
    postgresql://USER[:PASS]@HOST[:PORT]/DB  (postgres://)  [?table=NAME&sslmode=...]
    bigquery://PROJECT.DATASET.TABLE                        [?method=merge|cdc]
    file:///ABS/DIR | file:REL/DIR                          [?format=parquet|avro]
    kafka://HOST:PORT/TOPIC                                 (messages keyed by the row key)
    kafka://HOST:PORT/TOPIC?format=avro_registry            (values: registry-framed Avro)

Every sink is an idempotent upsert on the row key guarded by ``event_count``.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from typing import Callable, Dict, Optional, Tuple

import apache_beam as beam

from onceflow.io.progress import ProgressStore, rows_table_name
from onceflow.io.targets import Target
from onceflow.io.urls import POSTGRES_FORM, first_line, parse_postgres_url, query_params, redact_url
from onceflow.rows import DEFAULT_BATCH_ROWS, RowSchema, check_distinct_ignoring_case

DEFAULT_TABLE = "aggregates"
KAFKA_ROW_FORMATS = ("json", "avro_registry")  # a kafka:// sink's ?format=


@dataclasses.dataclass(frozen=True)
class SinkKind:
    """One scheme: the URL form (for messages), and how to parse, prepare and write."""

    form: str
    parse: Callable[[str, urllib.parse.SplitResult], Target]
    prepare: Callable[[Target, RowSchema], None]
    write: Callable[[Target, RowSchema, int], Tuple[str, beam.PTransform]]
    # The bounds (epoch ms) of the latest window the sink holds (None: empty); None for
    # sinks that cannot say.
    latest_window: Optional[Callable[[Target], Optional[Tuple[int, int]]]] = None
    # Where a live job keeps its source positions with the rows (onceflow.io.progress);
    # None for sinks that cannot hold them: a live job refuses those.
    progress: Optional[Callable[[Target], ProgressStore]] = None


# -- sqlite ---------------------------------------------------------------------


def _parse_sqlite(url: str, parsed: urllib.parse.SplitResult) -> Target:
    query = query_params(url, ("table",))
    table = rows_table_name(query.get("table", DEFAULT_TABLE))
    if parsed.netloc or not url.strip().startswith(f"{parsed.scheme}://"):  # sqlite:/x.db read as x.db: refused
        raise ValueError(f"{url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db (three or four "
                         "slashes)")
    path = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
    if not path or path.endswith("/"):
        raise ValueError(f"{url!r} names no database file; e.g. sqlite:///out/aggregates.db")
    if path == ":memory:":
        raise ValueError(f"{url!r}: an in-memory database keeps nothing after the run; name a file, e.g. "
                         "sqlite:///out/aggregates.db")
    _refuse_fragment(url, parsed)
    return Target("sqlite", path, table)


def _refuse_fragment(url: str, parsed: urllib.parse.SplitResult) -> None:
    """A ``#`` ends a URL's path: ``x.db#2`` would write ``x.db``."""
    if parsed.fragment or url.rstrip().endswith("#"):
        raise ValueError(f"{url!r}: '#' ends a URL's path, so the rest would be dropped; name a path without '#'")


def _prepare_sqlite(target: Target, schema: RowSchema) -> None:
    import sqlite3

    from onceflow.io.sqlite import ensure_table

    if os.path.isdir(target.location):
        raise ValueError(f"{target.location} is a directory; name a database file in it, e.g. "
                         f"sqlite:///{os.path.join(target.location, 'aggregates.db')}")
    check_distinct_ignoring_case(schema.columns, "SQLite")
    try:
        ensure_table(target.location, target.table, schema)
    except sqlite3.DatabaseError as error:  # not a database, or a file this user cannot create or write
        raise ValueError(f"cannot use {target.location} as an SQLite database ({error}); give a new file in a "
                         "folder you can write, or an SQLite database") from None


def _latest_window_sqlite(target: Target) -> Optional[Tuple[int, int]]:
    from onceflow.io.sqlite import latest_window_ms

    return latest_window_ms(target.location, target.table)


def _progress_sqlite(target: Target):
    from onceflow.io.sqlite import SqliteProgress

    return SqliteProgress(target.location, target.table)


def _write_sqlite(target: Target, schema: RowSchema, batch_size: int):
    from onceflow.io.sqlite import WriteRowsToSqlite

    return "WriteToSqlite", WriteRowsToSqlite(target.location, target.table, schema, batch_size)


# -- postgresql -----------------------------------------------------------------


def _parse_postgres(url: str, parsed: urllib.parse.SplitResult) -> Target:
    location, table = parse_postgres_url(url, DEFAULT_TABLE)
    return Target("postgresql", location, rows_table_name(table))


def _prepare_postgres(target: Target, schema: RowSchema) -> None:
    from onceflow.io import postgres

    try:
        postgres.ensure_table(target.location, target.table, schema)
    except postgres.psycopg.Error as error:
        raise postgres.unusable(target.describe(), error) from None


def _latest_window_postgres(target: Target) -> Optional[Tuple[int, int]]:
    from onceflow.io.postgres import latest_window_ms

    return latest_window_ms(target.location, target.table)


def _progress_postgres(target: Target):
    from onceflow.io.postgres import PostgresProgress

    return PostgresProgress(target.location, target.table)


def _write_postgres(target: Target, schema: RowSchema, batch_size: int):
    from onceflow.io.postgres import WriteRowsToPostgres

    return "WriteToPostgres", WriteRowsToPostgres(target.location, target.table, schema, batch_size)


# -- bigquery -------------------------------------------------------------------


def _parse_bigquery(url: str, parsed: urllib.parse.SplitResult) -> Target:
    from onceflow.io.bigquery import METHODS, TABLE_FORM, parse_table_spec

    query = query_params(url, ("method",))
    if parsed.path or not parsed.netloc:
        raise ValueError(f"{url!r}: write {TABLE_FORM}")
    project, dataset, table = parse_table_spec(parsed.netloc)
    method = query.get("method", "merge")
    if method not in METHODS:
        raise ValueError(f"{url!r}: method {method!r} is not supported; use {' or '.join(METHODS)}")
    return Target("bigquery", f"{project}.{dataset}", table, (("method", method),))


def _bigquery_parts(target: Target) -> Tuple[str, str, str]:
    project, dataset = target.location.split(".")
    return project, dataset, target.table


def _prepare_bigquery(target: Target, schema: RowSchema) -> None:
    from onceflow.io.bigquery import ensure_table

    check_distinct_ignoring_case(schema.columns, "BigQuery")
    try:
        ensure_table(*_bigquery_parts(target), schema, target.option("method"))
    except ValueError:
        raise
    except Exception as error:  # the client's errors, whatever their class: one line
        raise ValueError(f"cannot use {target.describe()}: {first_line(error)}") from None


def _progress_bigquery(target: Target):
    """Positions go with ``?method=merge`` (each batch written before its bundle
    completes); ``cdc`` hands rows to the Storage Write API, whose writes the
    pipeline cannot order positions after: no positions."""
    if target.option("method") != "merge":
        return None
    from onceflow.io.bigquery import BigQueryProgress

    return BigQueryProgress(*_bigquery_parts(target))


def _write_bigquery(target: Target, schema: RowSchema, batch_size: int):
    from onceflow.io.bigquery import WriteRowsToBigQuery

    return "WriteToBigQuery", WriteRowsToBigQuery(*_bigquery_parts(target), schema, batch_size,
                                                  method=target.option("method"))


# -- files ----------------------------------------------------------------------


def _parse_file(url: str, parsed: urllib.parse.SplitResult) -> Target:
    from onceflow.io.file_sink import FORMATS

    query = query_params(url, ("format",))
    if parsed.netloc:
        raise ValueError(f"{url!r}: write file:///ABSOLUTE/DIR or file:RELATIVE/DIR (no host)")
    _refuse_fragment(url, parsed)
    directory = urllib.parse.unquote(parsed.path).rstrip("/")
    if not directory:
        raise ValueError(f"{url!r} names no directory; e.g. file:///data/aggregates?format=parquet")
    file_format = query.get("format", "parquet")
    if file_format not in FORMATS:
        raise ValueError(f"{url!r}: format {file_format!r} is not supported; use ?format=parquet or ?format=avro")
    return Target("file", directory, None, (("format", file_format),))


def _prepare_file(target: Target, schema: RowSchema) -> None:
    from onceflow.io.file_sink import prepare_directory

    prepare_directory(target.location, schema, target.option("format"))


def _latest_window_file(target: Target) -> Optional[Tuple[int, int]]:
    from onceflow.io.file_sink import latest_window_in_directory

    return latest_window_in_directory(target.location, target.option("format"))


def _progress_file(target: Target):
    from onceflow.io.file_sink import FileProgress

    return FileProgress(target.location)


def _write_file(target: Target, schema: RowSchema, batch_size: int):
    from onceflow.io.file_sink import WriteRowsToFiles

    return "WriteToFiles", WriteRowsToFiles(target.location, schema, target.option("format"), batch_size)


# -- kafka ----------------------------------------------------------------------


def _parse_kafka(url: str, parsed: urllib.parse.SplitResult) -> Target:
    from onceflow.io.kafka.config import parse_kafka_url

    query = query_params(url, ("format",))
    value_format = query.get("format", "json")
    if value_format not in KAFKA_ROW_FORMATS:
        raise ValueError(f"format {value_format!r}: a Kafka sink writes {' or '.join(KAFKA_ROW_FORMATS)}")
    topic = parse_kafka_url(urllib.parse.urlunsplit(parsed._replace(query="")))
    options = (("format", value_format),) if value_format != "json" else ()
    return Target("kafka", topic.bootstrap_servers, topic.topic, options)


def _prepare_kafka(target: Target, schema: RowSchema) -> None:
    """The topic exists, and the last row of each partition has this job's columns
    (a job with other keys or aggregates added rows of a second shape, exit 0)."""
    from onceflow.io.kafka.admin import read_records_to_end, require_topic
    from onceflow.io.kafka.config import KafkaTopic
    from onceflow.io.kafka.write import row_from_message
    from onceflow.io.schema_registry import RegistryUnavailable

    topic = KafkaTopic(target.location, target.table)
    require_topic(topic, dict(target.client_settings))
    for _, _, _, value in read_records_to_end(topic, dict(target.client_settings), last_only=True):
        try:
            row = row_from_message(value, target.registry)
        except RegistryUnavailable as error:
            raise ValueError(f"cannot read the rows topic {topic.topic!r} holds: {error}") from None
        if row is not None and set(row) != set(schema.columns):
            raise ValueError(f"topic {topic.topic!r} holds rows with columns {sorted(row)}, but this job writes "
                             f"{sorted(schema.columns)}; write to another topic")


def _write_kafka(target: Target, schema: RowSchema, batch_size: int):
    from onceflow.io.kafka.config import KafkaTopic
    from onceflow.io.kafka.write import write_rows_to_kafka

    registry = None
    if target.option("format") == "avro_registry":
        if target.registry is None:
            raise ValueError("a kafka:// sink with ?format=avro_registry needs --schema_registry_url")
        registry = target.registry
    return "WriteToKafka", write_rows_to_kafka(KafkaTopic(target.location, target.table), schema,
                                               dict(target.client_settings), registry)


# -- the registry ---------------------------------------------------------------

_POSTGRES = SinkKind(POSTGRES_FORM, _parse_postgres, _prepare_postgres,
                     _write_postgres, _latest_window_postgres, _progress_postgres)

SINKS: Dict[str, SinkKind] = {
    "sqlite": SinkKind("sqlite:///PATH.db?table=NAME", _parse_sqlite, _prepare_sqlite, _write_sqlite,
                       _latest_window_sqlite, _progress_sqlite),
    "postgresql": _POSTGRES,
    "postgres": _POSTGRES,
    "bigquery": SinkKind("bigquery://PROJECT.DATASET.TABLE", _parse_bigquery, _prepare_bigquery, _write_bigquery,
                         progress=_progress_bigquery),
    "file": SinkKind("file:///DIR?format=parquet|avro", _parse_file, _prepare_file, _write_file,
                     _latest_window_file, _progress_file),
    "kafka": SinkKind("kafka://HOST:PORT/TOPIC[?format=avro_registry]", _parse_kafka, _prepare_kafka, _write_kafka),
}


def expected_forms() -> str:
    forms = dict.fromkeys(kind.form for kind in SINKS.values())
    return ", ".join(forms)


def parse_sink_url(url: str) -> Target:
    """A :class:`Target` from a ``--sink`` URL (forms in the module docstring).

    Raises ValueError whose message says what is wrong and the expected forms
    (passwords redacted).
    """
    text = str(url)
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in SINKS:
        raise ValueError(f"{redact_url(text)!r} has an unknown scheme; use one of: {expected_forms()}")
    kind = SINKS[parsed.scheme]
    return kind.parse(text, parsed)


def _kind(target: Target) -> SinkKind:
    kind = SINKS.get(target.scheme)
    if kind is None:
        raise ValueError(f"{target.scheme} sinks are not supported")
    return kind


def latest_window(target: Target) -> Optional[Tuple[int, int]]:
    """The bounds (epoch ms) of the latest window the sink holds; None when it is
    empty or cannot say (BigQuery, Kafka)."""
    reader = _kind(target).latest_window
    return None if reader is None else reader(target)


def check_window_size(target: Target, size_ms: int) -> None:
    """ValueError (one line) when the sink's rows are windows of another size, or a
    live job writing them keeps another size in its settings (stored at its first
    start: its table may hold no row yet): rows of two sizes in one table count
    each event twice (a backfill with another ``--window`` into a live job's
    table). Sinks that cannot say are not checked."""
    from onceflow.io.progress import kept_window_sizes
    from onceflow.windowing import format_duration_ms

    if _kind(target).latest_window is None:
        return
    try:
        latest = latest_window(target)
        store = progress_store(target)
        kept = kept_window_sizes(store) if store is not None else set()
    except Exception as error:  # the sink's client's: a table the login may not read, a server away
        raise _unusable(target, error) from None
    sizes = kept | ({latest[1] - latest[0]} if latest is not None else set())
    other = min(sizes - {size_ms}, default=None)
    if other is not None:
        where = "directory" if target.scheme == "file" else "table"
        held = "holds" if latest is not None and latest[1] - latest[0] == other else "is written by a live job with"
        raise ValueError(f"{target.describe()} {held} windows of {format_duration_ms(other)}, and "
                         f"this job writes windows of {format_duration_ms(size_ms)}: rows of both in one {where} "
                         f"count each event twice; give --window the {where}'s size, or write to another {where}"
                         + (" (?table=NAME)" if where == "table" else ""))


def database_client(error: BaseException) -> Optional[str]:
    """The sink client that raised ``error`` (``psycopg``, ``sqlite3``, ``google``),
    or None when it is not one of theirs."""
    client = type(error).__module__.split(".")[0]
    return client if client in ("psycopg", "sqlite3", "google") else None


def _unusable(target: Target, error: Exception) -> Exception:
    """A database client's error as one line (ValueError; DatabaseUnreachable when
    PostgreSQL is away); any other error as it is."""
    client = database_client(error)
    if client == "psycopg":
        from onceflow.io import postgres

        return postgres.unusable(target.describe(), error)
    if client == "sqlite3":
        return ValueError(f"cannot use {target.describe()}: {error}")
    return error


def holds_no_rows(target: Target) -> bool:
    """Whether the sink says it holds no row (SQLite, PostgreSQL, window files);
    False where it cannot say (BigQuery, Kafka)."""
    return _kind(target).latest_window is not None and latest_window(target) is None


def progress_store(target: Target) -> Optional[ProgressStore]:
    """Where a live job writing to ``target`` keeps its source positions; None
    when the sink cannot hold them (see :func:`position_sinks`)."""
    factory = _kind(target).progress
    return None if factory is None else factory(target)


def position_sinks() -> str:
    """The URL forms of the sinks that keep a live job's positions, for messages."""
    forms = [kind.form + ("?method=merge" if kind.form.startswith("bigquery") else "")
             for kind in SINKS.values() if kind.progress is not None]
    return ", ".join(dict.fromkeys(forms))


def prepare_sink(target: Target, schema: RowSchema) -> None:
    """Checks the sink is usable before the pipeline starts: creates the table or
    directory, refuses a table with other columns. Raises ValueError or OSError
    with a one-line message (passwords redacted)."""
    _kind(target).prepare(target, schema)


class WriteRows(beam.PTransform):
    """Writes aggregate rows to the sink a :class:`Target` names, as an
    idempotent upsert guarded by ``event_count`` (see each sink's docstring)."""

    def __init__(self, target: Target, schema: RowSchema, batch_size: int = DEFAULT_BATCH_ROWS):
        super().__init__()
        self._label, self._transform = _kind(target).write(target, schema, batch_size)

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return rows | self._label >> self._transform
