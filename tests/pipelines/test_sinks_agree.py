"""The main job into every sink that runs here: the same rows everywhere, and in
PostgreSQL exactly the aggregates an independent reference computes."""

import datetime
import sqlite3
import uuid

import psycopg
import pytest

from onceflow.aggregates import parse_aggregates
from onceflow.io import file_sink
from onceflow.io.dlq import parse_dlq_target, read_dead_letters_from
from onceflow.options import SAMPLE_INPUT
from onceflow.pipelines.aggregate import run
from onceflow.rows import RowSchema
from tests.pipelines.reference import expected_job

pytestmark = pytest.mark.postgres

MINUTE = 60_000
SCHEMA = RowSchema(("store",), parse_aggregates("count,sum:qty,min:price,max:price,mean:price,last:price"))
INTEGER_COLUMNS = ("event_count", "count")


def millis(value):
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime.datetime):
        return round(value.timestamp() * 1000)
    return value


def normalized(rows):
    """{(store, window_start ms, window_end ms): {column: value}}, written_at dropped,
    counts as int and aggregates as float (each store's own number type)."""
    out = {}
    for row in rows:
        row = dict(row)
        row.pop("written_at", None)
        key = (row.pop("store"), millis(row.pop("window_start")), millis(row.pop("window_end")))
        assert key not in out, key
        out[key] = {c: int(v) if c in INTEGER_COLUMNS else float(v) for c, v in row.items()}
    return out


def sqlite_rows(path, table="aggregates"):
    with sqlite3.connect(path) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(r) for r in connection.execute(f'SELECT * FROM "{table}"')]


def postgres_rows(dsn, table):
    with psycopg.connect(dsn) as connection:
        cursor = connection.execute(f'SELECT * FROM "{table}"')
        names = [d.name for d in cursor.description]
        return [dict(zip(names, values)) for values in cursor]


def unique(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def test_postgres_sqlite_and_files_get_the_same_rows(postgres_dsn, tmp_path):
    table = unique("agree")
    dlq = f"--dlq={tmp_path / 'dlq.jsonl'}"
    run([f"--sink={postgres_dsn}?table={table}", dlq])
    run([f"--sink=sqlite:///{tmp_path / 'out.db'}", dlq])
    run([f"--sink=file://{tmp_path / 'parquet'}?format=parquet", dlq])
    run([f"--sink=file://{tmp_path / 'avro'}?format=avro", dlq])
    in_postgres = normalized(postgres_rows(postgres_dsn, table))
    assert len(in_postgres) == 707
    assert normalized(sqlite_rows(tmp_path / "out.db")) == in_postgres
    assert normalized(file_sink.read_rows(str(tmp_path / "parquet"), SCHEMA, "parquet")) == in_postgres
    assert normalized(file_sink.read_rows(str(tmp_path / "avro"), SCHEMA, "avro")) == in_postgres


def test_the_job_twice_into_postgres_equals_the_reference(postgres_dsn):
    table, dead_table = unique("job"), unique("dlq")
    flags = [f"--sink={postgres_dsn}?table={table}", f"--dlq={postgres_dsn}?table={dead_table}"]
    first = run(flags)
    snapshot = normalized(postgres_rows(postgres_dsn, table))
    second = run(flags)
    assert normalized(postgres_rows(postgres_dsn, table)) == snapshot
    assert second.count("sink_rows_written") == first.count("sink_rows_written") == len(snapshot)
    assert "***" not in second.sink and second.sink.endswith(f"(table {table})")

    expected_rows, expected_dead = expected_job(SAMPLE_INPUT, MINUTE, 5 * MINUTE)
    assert set(snapshot) == {(store, start, start + MINUTE) for store, start in expected_rows}
    for (store, start), expected in expected_rows.items():
        row = snapshot[(store, start, start + MINUTE)]
        assert row["event_count"] == expected["count"]
        for column, value in expected.items():
            assert row[column] == value, (store, start, column)

    letters = list(read_dead_letters_from(parse_dlq_target(f"{postgres_dsn}?table={dead_table}")))
    dead = {(e["source"]["line"], "too_late" if e["reason"] == "too_late" else "bad") for e in letters}
    assert dead == expected_dead and len(letters) == len(expected_dead)  # written twice, stored once
