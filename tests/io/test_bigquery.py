"""The BigQuery sink up to the network boundary. Nothing here talks to BigQuery:
the client is FakeBigQueryClient, a recording stand-in defined below."""

import datetime
import subprocess
import sys
import types

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from onceflow.aggregates import parse_aggregates
from onceflow.io import bigquery
from onceflow.io.sinks import parse_sink_url
from onceflow.rows import RowSchema

SCHEMA = RowSchema(("store",), parse_aggregates("count,sum:qty"))
WRITTEN_AT = datetime.datetime(2026, 11, 2, 9, 30, 0, 123456, tzinfo=datetime.timezone.utc)


def row(store, start, n, qty):
    return {"store": store, "window_start": start, "window_end": start + 60_000, "event_count": n, "count": n,
            "sum_qty": qty}


class FakeJob:
    def __init__(self, affected=None):
        self.num_dml_affected_rows = affected

    def result(self):
        return self


class FakeBigQueryClient:
    """Records every call; MERGE reports ``affected`` rows; ``failures`` is a list of
    (call name, exception) raised once each, in order, by the matching call."""

    def __init__(self, project, affected=None, columns=None, failures=(), types=None, primary_key=None,
                 max_staleness="0-0 0 0:15:0"):
        self.project = project
        self.calls = []
        self.affected = affected
        self.columns = columns
        self.failures = list(failures)
        self.types = types or {}  # column -> type, where the table differs from what CREATE TABLE gives
        self.primary_key = list(SCHEMA.primary_key) if primary_key is None else primary_key
        self.max_staleness = max_staleness

    def _maybe_fail(self, name):
        if self.failures and self.failures[0][0] == name:
            raise self.failures.pop(0)[1]

    def query(self, sql):
        kind = sql.split(" ", 1)[0]
        self.calls.append(("query", sql))
        self._maybe_fail(kind)
        return FakeJob(self.affected if kind == "MERGE" else None)

    def load_table_from_json(self, rows, destination):
        self.calls.append(("load_table_from_json", destination, list(rows)))
        self._maybe_fail("load")
        return FakeJob()

    def delete_table(self, table, not_found_ok=False):
        self.calls.append(("delete_table", table, not_found_ok))
        return None

    def get_table(self, table):
        self.calls.append(("get_table", table))
        # As the API reads a table back: legacy type names (INT64 is INTEGER, FLOAT64 is FLOAT).
        legacy = {"INT64": "INTEGER", "FLOAT64": "FLOAT"}
        fields = {f["name"]: legacy.get(f["type"], f["type"]) for f in bigquery.table_schema(SCHEMA)}
        names = self.columns or list(fields)
        constraints = types.SimpleNamespace(
            primary_key=types.SimpleNamespace(columns=self.primary_key) if self.primary_key else None)
        return types.SimpleNamespace(
            schema=[types.SimpleNamespace(name=n, field_type=self.types.get(n, fields.get(n, "STRING"))) for n in names],
            table_constraints=constraints, max_staleness=self.max_staleness)


class HttpError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def test_schema_mapping():
    assert bigquery.table_schema(SCHEMA) == [
        {"name": "store", "type": "STRING", "mode": "REQUIRED"},
        {"name": "window_start", "type": "TIMESTAMP", "mode": "REQUIRED"},
        {"name": "window_end", "type": "TIMESTAMP", "mode": "REQUIRED"},
        {"name": "event_count", "type": "INT64", "mode": "REQUIRED"},
        {"name": "count", "type": "INT64", "mode": "REQUIRED"},
        {"name": "sum_qty", "type": "FLOAT64", "mode": "NULLABLE"},
        {"name": "written_at", "type": "TIMESTAMP", "mode": "REQUIRED"},
    ]


COLUMNS = ("`store` STRING NOT NULL, `window_start` TIMESTAMP NOT NULL, `window_end` TIMESTAMP NOT NULL, "
           "`event_count` INT64 NOT NULL, `count` INT64 NOT NULL, `sum_qty` FLOAT64, `written_at` TIMESTAMP NOT NULL")


def test_table_ddl():
    assert bigquery.create_table_ddl("my-project", "analytics", "orders_1m", SCHEMA) == (
        f"CREATE TABLE IF NOT EXISTS `my-project.analytics.orders_1m` ({COLUMNS}, "
        "PRIMARY KEY (`store`, `window_start`, `window_end`) NOT ENFORCED)")
    assert bigquery.create_table_ddl("my-project", "analytics", "orders_1m", SCHEMA, "cdc").endswith(
        "NOT ENFORCED) OPTIONS (max_staleness = INTERVAL 15 MINUTE)")


def test_staging_ddl_and_merge():
    staging = "orders_1m__staging_0123456789abcdef"
    assert bigquery.create_staging_ddl("my-project", "analytics", staging, SCHEMA) == (
        f"CREATE OR REPLACE TABLE `my-project.analytics.{staging}` ({COLUMNS}) "
        "OPTIONS (expiration_timestamp = TIMESTAMP_ADD(CURRENT_TIMESTAMP(), INTERVAL 1 DAY))")
    assert bigquery.merge_sql("my-project", "analytics", "orders_1m", staging, SCHEMA) == (
        "MERGE `my-project.analytics.orders_1m` AS T "
        f"USING (SELECT * FROM `my-project.analytics.{staging}` WHERE TRUE "
        "QUALIFY ROW_NUMBER() OVER (PARTITION BY `store`, `window_start`, `window_end` ORDER BY `event_count` DESC)"
        " = 1) AS S "
        "ON T.`store` = S.`store` AND T.`window_start` = S.`window_start` AND T.`window_end` = S.`window_end` "
        "WHEN MATCHED AND S.`event_count` >= T.`event_count` THEN UPDATE SET `event_count` = S.`event_count`, "
        "`count` = S.`count`, `sum_qty` = S.`sum_qty`, `written_at` = S.`written_at` "
        "WHEN NOT MATCHED THEN INSERT (`store`, `window_start`, `window_end`, `event_count`, `count`, `sum_qty`, "
        "`written_at`) VALUES (S.`store`, S.`window_start`, S.`window_end`, S.`event_count`, S.`count`, "
        "S.`sum_qty`, S.`written_at`)")


@pytest.mark.parametrize("spec", [
    "my-project.analytics.orders`; DROP TABLE x", "my-project.analytics.a;b", "my-project.ana`lytics.t",
    "My-Project.analytics.t", "my-project.analytics", "a.b.c.d", "proj.analytics.t", "my-project.ana lytics.t",
    "my-project.analytics.t'x",
])
def test_hostile_or_malformed_names_are_refused(spec):
    with pytest.raises(ValueError):
        bigquery.parse_table_spec(spec)
    with pytest.raises(ValueError):
        parse_sink_url(f"bigquery://{spec}")


def test_names_are_checked_where_sql_is_built():
    with pytest.raises(ValueError):
        bigquery.merge_sql("my-project", "analytics", "t", "t__staging_`x", SCHEMA)
    with pytest.raises(ValueError):
        bigquery.create_table_ddl("my-project", "analytics;", "t", SCHEMA)
    with pytest.raises(ValueError, match="method"):
        bigquery.WriteRowsToBigQuery("my-project", "analytics", "t", SCHEMA, method="stream")


def test_staging_names_depend_on_keys_and_versions_only():
    rows = [row("a", 0, 3, 1), row("b", 0, 2, 5)]
    name = bigquery.staging_table_name("orders", rows, SCHEMA)
    assert name.startswith("orders__staging_") and len(name) == len("orders__staging_") + 16
    assert bigquery.staging_table_name("orders", list(reversed(rows)), SCHEMA) == name
    assert bigquery.staging_table_name("orders", [row("a", 0, 4, 1), row("b", 0, 2, 5)], SCHEMA) != name


def test_json_rows():
    assert bigquery.to_json_row(row("a", 60_000, 3, 7), SCHEMA, WRITTEN_AT) == {
        "store": "a", "window_start": "1970-01-01T00:01:00.000Z", "window_end": "1970-01-01T00:02:00.000Z",
        "event_count": 3, "count": 3, "sum_qty": 7.0, "written_at": "2026-11-02T09:30:00.123456Z"}


def run_dofn(client, rows, batch_size):
    sink = bigquery._BigQueryMergeDoFn("my-project", "analytics", "orders", SCHEMA, batch_size, lambda _: client)
    sink.setup()
    sink.start_bundle()
    for r in rows:
        sink.process(r)
    sink.finish_bundle()
    sink.teardown()
    return sink


def test_each_batch_is_staged_merged_and_dropped():
    client = FakeBigQueryClient("my-project", affected=2)
    rows = [row("a", 0, 3, 1), row("a", 0, 1, 1), row("b", 0, 2, 5)]  # "a" twice: only the newer is staged
    run_dofn(client, rows, batch_size=10)
    staging = bigquery.staging_table_name("orders", [rows[0], rows[2]], SCHEMA)
    staging_id = f"my-project.analytics.{staging}"
    assert [c[0] for c in client.calls] == ["query", "load_table_from_json", "query", "delete_table"]
    assert client.calls[0][1] == bigquery.create_staging_ddl("my-project", "analytics", staging, SCHEMA)
    assert client.calls[1][1] == staging_id
    assert [(r["store"], r["event_count"]) for r in client.calls[1][2]] == [("a", 3), ("b", 2)]
    assert client.calls[2][1] == bigquery.merge_sql("my-project", "analytics", "orders", staging, SCHEMA)
    assert client.calls[3] == ("delete_table", staging_id, True)


def test_batches_are_bounded():
    client = FakeBigQueryClient("my-project", affected=1)
    run_dofn(client, [row(f"s{i}", 0, 1, i) for i in range(5)], batch_size=2)
    assert [c[0] for c in client.calls].count("load_table_from_json") == 3


def test_a_transient_error_retries_the_whole_batch():
    client = FakeBigQueryClient("my-project", affected=1, failures=[("MERGE", HttpError(503, "backend error"))])
    run_dofn(client, [row("a", 0, 1, 1)], batch_size=10)
    assert [c[0] for c in client.calls] == ["query", "load_table_from_json", "query",
                                            "query", "load_table_from_json", "query", "delete_table"]


def test_a_permanent_error_is_raised_at_once():
    client = FakeBigQueryClient("my-project", failures=[("MERGE", HttpError(400, "Invalid value"))])
    with pytest.raises(HttpError):
        run_dofn(client, [row("a", 0, 1, 1)], batch_size=10)
    assert [c[0] for c in client.calls].count("load_table_from_json") == 1


@pytest.mark.parametrize("error, transient", [
    (HttpError(429, "rate"), True), (HttpError(500, "x"), True), (HttpError(503, "x"), True),
    (HttpError(400, "Could not serialize access to table t due to concurrent update"), True),
    (ConnectionError("reset"), True), (HttpError(400, "Invalid"), False), (HttpError(404, "Not found"), False),
    (ValueError("x"), False),
])
def test_transient_errors(error, transient):
    assert bigquery.is_transient(error) is transient


def test_ensure_table_creates_then_checks_columns():
    client = FakeBigQueryClient("my-project")
    bigquery.ensure_table("my-project", "analytics", "orders", SCHEMA, client_factory=lambda _: client)
    assert client.calls == [("query", bigquery.create_table_ddl("my-project", "analytics", "orders", SCHEMA)),
                            ("get_table", "my-project.analytics.orders")]
    other = FakeBigQueryClient("my-project", columns=["store", "n"])
    with pytest.raises(ValueError, match=r"has columns .*; use another table \(bigquery://PROJECT.DATASET.TABLE\)"):
        bigquery.ensure_table("my-project", "analytics", "orders", SCHEMA, client_factory=lambda _: other)


@pytest.mark.parametrize("method, table, message", [
    ("merge", {"types": {"event_count": "STRING"}}, "column 'event_count' is STRING, but this job writes INT64"),
    ("merge", {"types": {"window_start": "DATETIME"}}, "column 'window_start' is DATETIME, but this job writes "
                                                        "TIMESTAMP"),
    ("cdc", {"primary_key": []}, "has primary key none, but ?method=cdc upserts on"),
    ("cdc", {"primary_key": ["store"]}, r"has primary key \['store'\], but"),
    ("cdc", {"max_staleness": None}, "has no max_staleness, which ?method=cdc needs"),
])
def test_an_existing_table_of_other_types_or_without_what_cdc_needs_is_refused(method, table, message):
    """CREATE TABLE IF NOT EXISTS leaves an existing table as it is: one with the
    right names but other types (the MERGE or the load would fail on the first
    batch), or, for CDC, no primary key or max_staleness (the Storage Write API
    refuses CDC upserts into it), is refused when the job starts."""
    client = FakeBigQueryClient("my-project", **table)
    with pytest.raises(ValueError, match=message.replace("?", "\\?")):
        bigquery.ensure_table("my-project", "analytics", "orders", SCHEMA, method, client_factory=lambda _: client)


def test_a_table_as_the_job_creates_it_is_accepted_for_either_method():
    for method in ("merge", "cdc"):
        client = FakeBigQueryClient("my-project")
        bigquery.ensure_table("my-project", "analytics", "orders", SCHEMA, method, client_factory=lambda _: client)
    merge_only = FakeBigQueryClient("my-project", primary_key=[], max_staleness=None)  # MERGE needs neither
    bigquery.ensure_table("my-project", "analytics", "orders", SCHEMA, "merge", client_factory=lambda _: merge_only)


FAKE_CLIENTS = []


def fake_client_factory(project):
    client = FakeBigQueryClient(project, affected=1)
    FAKE_CLIENTS.append(client)
    return client


def test_the_transform_in_a_pipeline_uses_the_client_factory():
    FAKE_CLIENTS.clear()
    with TestPipeline() as pipeline:
        _ = (pipeline | beam.Create([row("a", 0, 1, 1), row("b", 0, 1, 2)])
             | bigquery.WriteRowsToBigQuery("my-project", "analytics", "orders", SCHEMA,
                                            client_factory=fake_client_factory))
    loaded = [r["store"] for c in FAKE_CLIENTS for call in c.calls if call[0] == "load_table_from_json"
              for r in call[2]]
    assert sorted(loaded) == ["a", "b"]


def test_cdc_upserts_carry_event_count_as_sequence_number():
    element = bigquery.to_cdc_element(row("a", 60_000, 26, 7), SCHEMA, WRITTEN_AT)
    assert element["row_mutation_info"] == {"mutation_type": "UPSERT", "change_sequence_number": "1A"}
    assert element["record"]["window_start"].micros == 60_000_000
    assert element["record"]["sum_qty"] == 7.0


def test_cdc_write_arguments_ask_for_storage_write_api_cdc_upserts():
    arguments = bigquery.cdc_write_arguments("my-project", "analytics", "orders", SCHEMA)
    assert arguments == {
        "table": "my-project.analytics.orders",
        "schema": {"fields": bigquery.table_schema(SCHEMA)},
        "method": "STORAGE_WRITE_API",
        "create_disposition": "CREATE_NEVER",
        "write_disposition": "WRITE_APPEND",
        "use_at_least_once": True,
        "use_cdc_writes": True,
        "primary_key": ["store", "window_start", "window_end"],
    }


def test_the_module_imports_without_the_client_library():
    code = ("import sys; sys.modules['google.cloud.bigquery'] = None\n"
            "from onceflow.io import bigquery\n"
            "try:\n    bigquery.default_client('my-project')\n"
            "except ValueError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'onceflow[gcp]'" in result.stdout, result.stderr
