"""BigQuery sink: idempotent writes of aggregate rows, guarded by ``event_count``.

NOTE: nothing in this module has ever run against BigQuery. It is tested up to the
network boundary (schema mapping, the generated SQL, name validation, and the
sequence of client calls against a fake client); see docs/operating.md, "Sinks".

Two methods (``bigquery://PROJECT.DATASET.TABLE?method=merge|cdc``):

``merge`` (default): each batch of at most ``batch_size`` rows, flushed before its
bundle completes, is

1. collapsed to one row per key (the greatest ``event_count``);
2. loaded into a staging table in the same dataset whose name is derived from the
   batch's keys and versions (``TABLE__staging_<sha256 prefix>``: a retried batch
   reuses its name), created with ``CREATE OR REPLACE TABLE ... OPTIONS
   (expiration_timestamp = now + 1 day)`` so an abandoned one disappears;
3. merged with ``MERGE ... WHEN MATCHED AND S.event_count >= T.event_count THEN
   UPDATE ... WHEN NOT MATCHED THEN INSERT ...`` (the source de-duplicated per key
   again, in case two identical batches loaded it concurrently);
4. the staging table dropped.

Every step is idempotent, so a batch retried from any step leaves the table as
one successful run would. Transient errors (HTTP 408/429/5xx, rate limits,
concurrent-DML conflicts, connection errors) are retried with capped backoff; then
the bundle fails loudly. ``google-cloud-bigquery`` (the ``gcp`` extra) is needed
only when writing: this module imports without it.

``cdc``: Beam's Storage Write API with CDC upserts (``WriteToBigQuery(method=
STORAGE_WRITE_API, use_at_least_once=True, use_cdc_writes=True, primary_key=...)``,
Beam 2.77), each row an ``UPSERT`` whose ``change_sequence_number`` is its
``event_count`` in hex: BigQuery applies, per primary key, the change with the
greatest sequence number, which is the same guard. It runs through Beam's Java
expansion service (Java and the GCP expansion-service jar are needed at pipeline
construction) and the table needs a primary key and ``max_staleness``, which
:func:`create_table_ddl` declares.

Names: the project (``[a-z][a-z0-9-]{4,28}[a-z0-9]``), the dataset
(letters, digits, ``_``) and the table and columns
(:func:`onceflow.rows.check_identifier`) are validated before they are quoted with
backticks; values always go through load jobs, never into SQL text.

Types: key fields ``STRING``, window bounds and ``written_at`` ``TIMESTAMP``,
``event_count`` and ``count`` ``INT64``, other aggregates ``FLOAT64``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Callable, Dict, List, Sequence, Set, Tuple

import apache_beam as beam

from onceflow.events import format_utc_ms
from onceflow.io.batching import UpsertRowsDoFn
from onceflow.io.progress import PROGRESS_TABLE, Position, rows_table_name
from onceflow.io.retry import call_with_retries
from onceflow.rows import (
    DEFAULT_BATCH_ROWS, EVENT_COUNT, WRITTEN_AT, RowSchema, check_columns, check_identifier, check_sink_arguments,
    newest_per_key, row_values,
)

METHODS = ("merge", "cdc")
TABLE_FORM = "bigquery://PROJECT.DATASET.TABLE"
STAGING_EXPIRY = "INTERVAL 1 DAY"
CDC_MAX_STALENESS = "INTERVAL 15 MINUTE"

_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_DATASET = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
_TYPES = {"key": "STRING", "timestamp": "TIMESTAMP", "integer": "INT64", "number": "FLOAT64"}
_TIMESTAMP_TEXT = "%Y-%m-%dT%H:%M:%S.%fZ"
_TRANSIENT_CODES = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_REASONS = frozenset({"backendError", "internalError", "rateLimitExceeded", "jobRateLimitExceeded"})


# -- names ----------------------------------------------------------------------


def check_project(project: str) -> str:
    if not isinstance(project, str) or not _PROJECT.match(project):
        raise ValueError(f"project {project!r} is not allowed: 6-30 lowercase letters, digits and -, "
                         "starting with a letter")
    return project


def check_dataset(dataset: str) -> str:
    if not isinstance(dataset, str) or not _DATASET.match(dataset):
        raise ValueError(f"dataset {dataset!r} is not allowed: use letters, digits and _")
    return dataset


def parse_table_spec(text: str) -> Tuple[str, str, str]:
    """``PROJECT.DATASET.TABLE`` to its three validated parts."""
    parts = str(text).split(".")
    if len(parts) != 3:
        raise ValueError(f"{text!r} is not PROJECT.DATASET.TABLE; write {TABLE_FORM}")
    project, dataset, table = parts
    return check_project(project), check_dataset(dataset), rows_table_name(table)


def table_id(project: str, dataset: str, table: str) -> str:
    """``project.dataset.table``, each part validated."""
    return f"{check_project(project)}.{check_dataset(dataset)}.{table}"


def _quoted_table(project: str, dataset: str, table: str) -> str:
    return f"`{table_id(project, dataset, table)}`"


def _q(column: str) -> str:
    return f"`{check_identifier(column, 'column name')}`"


# -- schema and SQL -------------------------------------------------------------


def table_schema(schema: RowSchema) -> List[Dict[str, str]]:
    """The table's fields in BigQuery's JSON schema form (what the client's
    ``SchemaField.from_api_repr`` and Beam's ``WriteToBigQuery`` accept)."""
    fields = []
    for column in schema.columns:
        kind = schema.column_kind(column)
        mode = "NULLABLE" if kind == "number" else "REQUIRED"
        fields.append({"name": column, "type": _TYPES[kind], "mode": mode})
    fields.append({"name": WRITTEN_AT, "type": "TIMESTAMP", "mode": "REQUIRED"})
    return fields


def _column_list(schema: RowSchema) -> str:
    return ", ".join(
        f"{_q(f['name'])} {f['type']}{' NOT NULL' if f['mode'] == 'REQUIRED' else ''}" for f in table_schema(schema))


def create_table_ddl(project: str, dataset: str, table: str, schema: RowSchema, method: str = "merge") -> str:
    """``CREATE TABLE IF NOT EXISTS`` with the (not enforced) primary key; for
    ``cdc`` also the ``max_staleness`` CDC needs."""
    check_identifier(table, "table name")
    _check_method(method)
    key = ", ".join(_q(c) for c in schema.primary_key)
    ddl = (f"CREATE TABLE IF NOT EXISTS {_quoted_table(project, dataset, table)} "
           f"({_column_list(schema)}, PRIMARY KEY ({key}) NOT ENFORCED)")
    if method == "cdc":
        ddl += f" OPTIONS (max_staleness = {CDC_MAX_STALENESS})"
    return ddl


def create_staging_ddl(project: str, dataset: str, staging: str, schema: RowSchema) -> str:
    """An empty staging table that expires by itself if it is never dropped."""
    return (f"CREATE OR REPLACE TABLE {_quoted_table(project, dataset, _check_staging(staging))} "
            f"({_column_list(schema)}) "
            f"OPTIONS (expiration_timestamp = TIMESTAMP_ADD(CURRENT_TIMESTAMP(), {STAGING_EXPIRY}))")


def merge_sql(project: str, dataset: str, table: str, staging: str, schema: RowSchema) -> str:
    """The guarded ``MERGE`` of a staging table into the rows table."""
    check_identifier(table, "table name")
    columns = [*schema.columns, WRITTEN_AT]
    key = ", ".join(_q(c) for c in schema.primary_key)
    on = " AND ".join(f"T.{_q(c)} = S.{_q(c)}" for c in schema.primary_key)
    updates = ", ".join(f"{_q(c)} = S.{_q(c)}" for c in (*schema.value_columns, WRITTEN_AT))
    version = _q(EVENT_COUNT)
    return (
        f"MERGE {_quoted_table(project, dataset, table)} AS T "
        f"USING (SELECT * FROM {_quoted_table(project, dataset, _check_staging(staging))} WHERE TRUE "
        f"QUALIFY ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY {version} DESC) = 1) AS S "
        f"ON {on} "
        f"WHEN MATCHED AND S.{version} >= T.{version} THEN UPDATE SET {updates} "
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(_q(c) for c in columns)}) "
        f"VALUES ({', '.join(f'S.{_q(c)}' for c in columns)})"
    )


def staging_table_name(table: str, rows: Sequence[Dict[str, Any]], schema: RowSchema) -> str:
    """``TABLE__staging_<16 hex>`` from the batch's keys and versions: the same
    batch, retried, always uses the same staging table."""
    check_identifier(table, "table name")
    identity = sorted([list(schema.key_of(row)), row[EVENT_COUNT]] for row in rows)
    digest = hashlib.sha256(json.dumps(identity, separators=(",", ":"), default=str).encode("utf-8"))
    return f"{table}__staging_{digest.hexdigest()[:16]}"


def _check_staging(name: str) -> str:
    # A table name (already checked) plus a fixed suffix: letters, digits, _.
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,62}__staging_[0-9a-f]{16}$", str(name)):
        raise ValueError(f"staging table name {name!r} is not allowed")
    return name


def to_json_row(row: Dict[str, Any], schema: RowSchema, written_at) -> Dict[str, Any]:
    """A row as a JSON load job takes it (timestamps as RFC 3339 text)."""
    out = dict(zip(schema.columns, row_values(row, schema, format_utc_ms)))
    out[WRITTEN_AT] = written_at.strftime(_TIMESTAMP_TEXT)
    return out


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not supported; use {' or '.join(METHODS)}")
    return method


# -- client ---------------------------------------------------------------------


def default_client(project: str):
    """A ``google.cloud.bigquery.Client`` for ``project`` (the ``gcp`` extra)."""
    try:
        from google.cloud import bigquery  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ValueError("bigquery:// needs google-cloud-bigquery: pip install 'onceflow[gcp]'") from None
    return bigquery.Client(project=project)


def is_transient(error: BaseException) -> bool:
    """HTTP 408/429/5xx, rate-limit and backend reasons, concurrent-DML conflicts,
    connection errors (duck-typed on google-api-core exceptions, not imported)."""
    if getattr(error, "code", None) in _TRANSIENT_CODES:
        return True
    reasons = {item.get("reason") for item in (getattr(error, "errors", None) or []) if isinstance(item, dict)}
    if reasons & _TRANSIENT_REASONS:
        return True
    text = str(error).lower()
    if "could not serialize access" in text or "concurrent update" in text:
        return True
    return isinstance(error, (ConnectionError, TimeoutError))


ClientFactory = Callable[[str], Any]


def ensure_table(project: str, dataset: str, table: str, schema: RowSchema, method: str = "merge",
                 client_factory: ClientFactory = default_client) -> None:
    """Creates the table if absent; ValueError if it exists with other columns or
    column types, or, for ``cdc``, without the primary key or ``max_staleness``
    that CDC upserts need (``CREATE TABLE IF NOT EXISTS`` leaves a table as it is)."""
    client = client_factory(project)
    client.query(create_table_ddl(project, dataset, table, schema, method)).result()
    check_table(client.get_table(table_id(project, dataset, table)), schema, method, table, f"{project}.{dataset}")


# The API names some types by their legacy names (a column created INT64 is read back INTEGER).
_LEGACY_TYPES = {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN"}


def check_table(found: Any, schema: RowSchema, method: str, table: str, where: str) -> None:
    """ValueError (one line) when ``found`` (the client's Table) is not a table this
    job can write with ``method``."""
    hint = f"use another table ({TABLE_FORM})"
    expected = table_schema(schema)
    check_columns([field.name for field in found.schema], [f["name"] for f in expected], table, where, hint)
    for field, wanted in zip(found.schema, expected):
        if _LEGACY_TYPES.get(field.field_type, field.field_type) != _LEGACY_TYPES.get(wanted["type"], wanted["type"]):
            raise ValueError(f"table {table!r} in {where}: column {field.name!r} is {field.field_type}, but this job "
                             f"writes {wanted['type']}; {hint}")
    if method != "cdc":
        return
    constraints = found.table_constraints
    key = list(constraints.primary_key.columns) if constraints is not None and constraints.primary_key else []
    if key != list(schema.primary_key):
        raise ValueError(f"table {table!r} in {where} has primary key {key or 'none'}, but ?method=cdc upserts on "
                         f"{list(schema.primary_key)}; {hint}")
    if not found.max_staleness:
        raise ValueError(f"table {table!r} in {where} has no max_staleness, which ?method=cdc needs; set it (ALTER "
                         f"TABLE ... SET OPTIONS (max_staleness = {CDC_MAX_STALENESS})) or {hint}")


class _BigQueryMergeDoFn(UpsertRowsDoFn):
    def __init__(self, project: str, dataset: str, table: str, schema: RowSchema, batch_size: int,
                 client_factory: ClientFactory):
        super().__init__(batch_size, what=f"merge into {project}.{dataset}.{table}")
        self._where = (project, dataset, table)
        self._schema = schema
        self._client_factory = client_factory

    def open(self) -> None:
        self._client = self._client_factory(self._where[0])

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)

    def upsert(self, rows: Sequence[Dict[str, Any]], written_at) -> int:
        project, dataset, table = self._where
        newest, _ = newest_per_key(rows, self._schema)
        staging = staging_table_name(table, newest, self._schema)
        client = self._client
        client.query(create_staging_ddl(project, dataset, staging, self._schema)).result()
        client.load_table_from_json([to_json_row(r, self._schema, written_at) for r in newest],
                                    table_id(project, dataset, staging)).result()
        merge = client.query(merge_sql(project, dataset, table, staging, self._schema))
        merge.result()
        client.delete_table(table_id(project, dataset, staging), not_found_ok=True)
        return int(merge.num_dml_affected_rows or 0)


def to_cdc_element(row: Dict[str, Any], schema: RowSchema, written_at) -> Dict[str, Any]:
    """A row as a Storage Write API CDC upsert, versioned by ``event_count``."""
    from apache_beam.utils.timestamp import Timestamp  # pylint: disable=import-outside-toplevel

    record = dict(zip(schema.columns, row_values(row, schema, lambda millis: Timestamp(micros=millis * 1000))))
    for column in schema.columns:  # Beam's row conversion wants FLOAT64 values as floats
        if schema.column_kind(column) == "number" and record[column] is not None:
            record[column] = float(record[column])
    record[WRITTEN_AT] = Timestamp(micros=int(written_at.timestamp() * 1_000_000))
    return {"record": record,
            "row_mutation_info": {"mutation_type": "UPSERT", "change_sequence_number": f"{row[EVENT_COUNT]:X}"}}


def cdc_write_arguments(project: str, dataset: str, table: str, schema: RowSchema) -> Dict[str, Any]:
    """The arguments of Beam's ``WriteToBigQuery`` for CDC upserts on the row key."""
    from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery  # pylint: disable=import-outside-toplevel

    return {
        "table": table_id(project, dataset, check_identifier(table, "table name")),
        "schema": {"fields": table_schema(schema)},
        "method": WriteToBigQuery.Method.STORAGE_WRITE_API,
        "create_disposition": BigQueryDisposition.CREATE_NEVER,  # prepare_sink creates it with its key
        "write_disposition": BigQueryDisposition.WRITE_APPEND,
        "use_at_least_once": True,
        "use_cdc_writes": True,
        "primary_key": list(schema.primary_key),
    }


def cdc_write(project: str, dataset: str, table: str, schema: RowSchema) -> beam.PTransform:
    """Beam's ``WriteToBigQuery`` configured for CDC upserts (needs ``apache-beam[gcp]``)."""
    from apache_beam.io.gcp.bigquery import WriteToBigQuery  # pylint: disable=import-outside-toplevel

    return WriteToBigQuery(**cdc_write_arguments(project, dataset, table, schema))


class _ToCdcElementDoFn(beam.DoFn):
    def __init__(self, schema: RowSchema):
        self._schema = schema

    def process(self, row: Dict[str, Any]):
        from onceflow.rows import utc_now  # pylint: disable=import-outside-toplevel

        yield to_cdc_element(row, self._schema, utc_now())


class WriteRowsToBigQuery(beam.PTransform):
    """Upserts aggregate rows into a BigQuery table on their deterministic key,
    never replacing a version with a greater ``event_count``; ``method`` is
    ``merge`` (staging load + guarded MERGE per batch) or ``cdc`` (Storage Write
    API upserts). Never run against BigQuery: see the module docstring.

    Metrics (``merge``): ``sink_rows_written``, ``sink_rows_stale``,
    ``sink_retries``; (``cdc``) Beam's own.
    """

    def __init__(self, project: str, dataset: str, table: str, schema: RowSchema, batch_size: int = DEFAULT_BATCH_ROWS,
                 method: str = "merge", client_factory: ClientFactory = default_client):
        super().__init__()
        table_id(project, dataset, check_identifier(table, "table name"))
        _check_method(method)
        check_sink_arguments("WriteRowsToBigQuery", schema, batch_size)
        self._where = (project, dataset, table)
        self._schema = schema
        self._batch_size = batch_size
        self._method = method
        self._client_factory = client_factory

    def expand(self, rows: beam.PCollection):
        if self._method == "cdc":
            return (rows
                    | "ToCdcUpserts" >> beam.ParDo(_ToCdcElementDoFn(self._schema))
                    | "StorageWriteCdc" >> cdc_write(*self._where, self._schema))
        return rows | "MergeRows" >> beam.ParDo(
            _BigQueryMergeDoFn(*self._where, self._schema, self._batch_size, self._client_factory))


# -- progress -------------------------------------------------------------------

_PROGRESS_FIELDS = (("job", "STRING NOT NULL"), ("rows_table", "STRING NOT NULL"), ("topic", "STRING NOT NULL"),
                    ("kafka_partition", "INT64 NOT NULL"), ("next_offset", "INT64 NOT NULL"),
                    ("high_water_ms", "INT64"), ("final_through_ms", "INT64"), ("updated_at", "TIMESTAMP NOT NULL"))
_PROGRESS_KEY = ("job", "rows_table", "topic", "kafka_partition")


def create_progress_ddl(project: str, dataset: str) -> str:
    columns = ", ".join(f"{_q(name)} {kind}" for name, kind in _PROGRESS_FIELDS)
    key = ", ".join(_q(c) for c in _PROGRESS_KEY)
    return (f"CREATE TABLE IF NOT EXISTS {_quoted_table(project, dataset, PROGRESS_TABLE)} "
            f"({columns}, PRIMARY KEY ({key}) NOT ENFORCED)")


def merge_progress_sql(project: str, dataset: str, staging: str) -> str:
    """The ``MERGE`` of staged positions: a stored offset never moves back."""
    names = [name for name, _ in _PROGRESS_FIELDS]
    on = " AND ".join(f"T.{_q(c)} = S.{_q(c)}" for c in _PROGRESS_KEY)
    updates = ", ".join(f"{_q(c)} = S.{_q(c)}" for c in names if c not in _PROGRESS_KEY)
    return (
        f"MERGE {_quoted_table(project, dataset, PROGRESS_TABLE)} AS T "
        f"USING {_quoted_table(project, dataset, _check_staging(staging))} AS S ON {on} "
        f"WHEN MATCHED AND S.{_q('next_offset')} >= T.{_q('next_offset')} THEN UPDATE SET {updates} "
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(_q(c) for c in names)}) "
        f"VALUES ({', '.join(f'S.{_q(c)}' for c in names)})"
    )


class BigQueryProgress:
    """The positions of live jobs writing to ``rows_table`` (``?method=merge``), in
    the table ``onceflow_progress`` of the same dataset, written the way rows are:
    a load into a staging table named after its content, then a guarded MERGE
    (values never enter SQL text). Never run against BigQuery: tested against a
    fake client, like the rows."""

    def __init__(self, project: str, dataset: str, rows_table: str, client_factory: ClientFactory = default_client):
        self._where = (project, dataset)
        self._rows_table = check_identifier(rows_table, "table name")
        self._client_factory = client_factory
        self._client = None

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def _connected(self):
        if self._client is None:
            self._client = self._client_factory(self._where[0])
            self._client.query(create_progress_ddl(*self._where)).result()
        return self._client

    def read(self, job: str, topic: str) -> Dict[int, Position]:
        client = self._connected()
        found = {}
        for row in client.list_rows(table_id(*self._where, PROGRESS_TABLE)):
            if (row["job"], row["rows_table"], row["topic"]) == (job, self._rows_table, topic):
                partition = int(row["kafka_partition"])
                found[partition] = Position(topic, partition, int(row["next_offset"]), row["high_water_ms"],
                                            row["final_through_ms"])
        return found

    def jobs(self) -> Set[Tuple[str, str]]:
        client = self._connected()
        return {(row["job"], row["topic"]) for row in client.list_rows(table_id(*self._where, PROGRESS_TABLE))
                if row["rows_table"] == self._rows_table}

    def write(self, job: str, positions: Sequence[Position]) -> None:
        from onceflow.rows import utc_now  # pylint: disable=import-outside-toplevel

        stamp = utc_now().strftime(_TIMESTAMP_TEXT)
        rows = [{"job": job, "rows_table": self._rows_table, "topic": p.topic, "kafka_partition": p.partition,
                 "next_offset": p.next_offset, "high_water_ms": p.high_water_ms,
                 "final_through_ms": p.final_through_ms, "updated_at": stamp} for p in positions]
        identity = json.dumps([[r[c] for c in (*_PROGRESS_KEY, "next_offset")] for r in rows], default=str)
        staging = f"{PROGRESS_TABLE}__staging_{hashlib.sha256(identity.encode('utf-8')).hexdigest()[:16]}"

        def write() -> None:
            client = self._connected()
            columns = ", ".join(f"{_q(name)} {kind.replace(' NOT NULL', '')}" for name, kind in _PROGRESS_FIELDS)
            client.query(f"CREATE OR REPLACE TABLE {_quoted_table(*self._where, staging)} ({columns}) "
                         f"OPTIONS (expiration_timestamp = TIMESTAMP_ADD(CURRENT_TIMESTAMP(), {STAGING_EXPIRY}))"
                         ).result()
            client.load_table_from_json(rows, table_id(*self._where, staging)).result()
            client.query(merge_progress_sql(*self._where, staging)).result()
            client.delete_table(table_id(*self._where, staging), not_found_ok=True)

        call_with_retries(write, is_transient, what=f"store positions in {PROGRESS_TABLE}")
