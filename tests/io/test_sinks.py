"""Choosing sinks and dead-letter queues by URL: forms, errors, redaction."""

import pytest

from onceflow.aggregates import parse_aggregates
from onceflow.io import sinks
from onceflow.io.dlq import DLQ_KINDS, WriteDeadLetters, parse_dlq_target, prepare_dlq
from onceflow.io.sinks import WriteRows, parse_sink_url, prepare_sink
from onceflow.io.targets import Target
from onceflow.rows import RowSchema

SCHEMA = RowSchema(("store",), parse_aggregates("count,sum:qty"))


@pytest.mark.parametrize("url, scheme, location, table, options", [
    ("sqlite:///out/agg.db", "sqlite", "out/agg.db", "aggregates", ()),
    ("postgresql://app:s3cret@db.example:5432/metrics?table=orders_1m", "postgresql",
     "postgresql://app:s3cret@db.example:5432/metrics", "orders_1m", ()),
    ("postgres://app@127.0.0.1/metrics", "postgresql", "postgresql://app@127.0.0.1/metrics", "aggregates", ()),
    ("postgresql://app@h:5432/m?sslmode=require&table=t", "postgresql", "postgresql://app@h:5432/m?sslmode=require",
     "t", ()),
    ("bigquery://my-project.analytics.orders_1m", "bigquery", "my-project.analytics", "orders_1m",
     (("method", "merge"),)),
    ("bigquery://my-project.analytics.orders_1m?method=cdc", "bigquery", "my-project.analytics", "orders_1m",
     (("method", "cdc"),)),
    ("file:///data/aggregates", "file", "/data/aggregates", None, (("format", "parquet"),)),
    ("file:///data/aggregates/?format=avro", "file", "/data/aggregates", None, (("format", "avro"),)),
    ("file:out/aggregates", "file", "out/aggregates", None, (("format", "parquet"),)),
])
def test_sink_urls(url, scheme, location, table, options):
    assert parse_sink_url(url) == Target(scheme, location, table, options)


@pytest.mark.parametrize("url, fragment", [
    ("mysql://x/y", "unknown scheme"),
    ("out.db", "unknown scheme"),
    ("postgresql://app@h:5432/m?table=a;b", "not allowed"),
    ("postgresql://app@h:5432/m?tbl=a", "unknown parameter 'tbl'"),
    ("postgresql://app@h:5432/m?table=a&table=b", "2 times"),
    ("postgresql://app@h:port/m", "port must be a number"),
    ("postgresql://app@h:5432", "names no database"),
    ("postgresql:///m", "names no host"),
    ("bigquery://my-project.analytics", "PROJECT.DATASET.TABLE"),
    ("bigquery://my-project.analytics.t/x", "PROJECT.DATASET.TABLE"),
    ("bigquery://my-project.analytics.t?method=insert", "method 'insert'"),
    ("file://host/dir", "no host"),
    ("file:///data?format=csv", "format 'csv'"),
    ("file:///", "names no directory"),
    ("kafka://127.0.0.1:19092/bad topic", "topic names use"),
    ("kafka://nohost/aggregates", "HOST:PORT"),
])
def test_bad_sink_urls(url, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_sink_url(url)


def test_unknown_schemes_list_every_form():
    with pytest.raises(ValueError) as caught:
        parse_sink_url("mysql://x/y")
    for form in ("sqlite:///", "postgresql://USER[:PASS]@HOST:PORT/DB?table=NAME", "bigquery://PROJECT.DATASET.TABLE",
                 "file:///DIR?format=parquet|avro"):
        assert form in str(caught.value)


def test_passwords_are_never_shown():
    target = parse_sink_url("postgresql://app:s3cret@db.example:5432/metrics?table=t")
    assert target.describe() == "postgresql postgresql://app:***@db.example:5432/metrics (table t)"
    assert "s3cret" not in repr(target) and "s3cret" not in str(target)
    with pytest.raises(ValueError) as caught:
        parse_sink_url("postgresql://app:s3cret@db.example:5432/metrics?bad=1")
    assert "s3cret" not in str(caught.value)
    dlq = parse_dlq_target("postgresql://app:s3cret@db.example/metrics?table=dead")
    assert "s3cret" not in dlq.describe() and "s3cret" not in repr(dlq)


def test_prepare_fails_in_one_line_without_the_password(tmp_path, few_database_retries):
    """A server that does not answer is a service down (the job exits 1, as for a
    broker), not a wrong flag (it exited 2)."""
    from onceflow.io.retry import DatabaseUnreachable

    target = parse_sink_url("postgresql://app:s3cret@127.0.0.1:1/metrics?table=t")  # nothing listens on port 1
    with pytest.raises(DatabaseUnreachable) as caught:
        prepare_sink(target, SCHEMA)
    message = str(caught.value)
    assert message.startswith("cannot use postgresql postgresql://app:***@127.0.0.1:1/metrics")
    assert "s3cret" not in message and "\n" not in message


def test_prepare_creates_files_and_sqlite(tmp_path):
    prepare_sink(parse_sink_url(f"file://{tmp_path}/rows?format=avro"), SCHEMA)
    assert (tmp_path / "rows").is_dir()
    prepare_sink(parse_sink_url(f"sqlite:///{tmp_path}/out.db"), SCHEMA)
    assert (tmp_path / "out.db").exists()


@pytest.mark.parametrize("url, label", [
    ("sqlite:///out.db", "WriteToSqlite"),
    ("postgresql://app@h:5432/m", "WriteToPostgres"),
    ("bigquery://my-project.analytics.t", "WriteToBigQuery"),
    ("file:///tmp/x?format=avro", "WriteToFiles"),
])
def test_write_rows_dispatches_by_scheme(url, label):
    assert WriteRows(parse_sink_url(url), SCHEMA)._label == label


def test_every_scheme_is_one_registry_entry():
    assert set(sinks.SINKS) == {"sqlite", "postgresql", "postgres", "bigquery", "file", "kafka"}
    assert parse_sink_url("kafka://127.0.0.1:19092/aggregates") == Target("kafka", "127.0.0.1:19092",
                                                                                     "aggregates")


@pytest.mark.parametrize("text, target", [
    ("out/dlq.jsonl", Target("jsonl", "out/dlq.jsonl")),
    ("/abs/dlq.jsonl", Target("jsonl", "/abs/dlq.jsonl")),
    ("postgresql://app@h:5432/m?table=dead", Target("postgresql", "postgresql://app@h:5432/m", "dead")),
    ("kafka://127.0.0.1:19092/dead", Target("kafka", "127.0.0.1:19092", "dead")),
    ("kafka://127.0.0.1:19092/dead?format=avro_registry",
     Target("kafka", "127.0.0.1:19092", "dead", (("format", "avro_registry"),))),
    ("postgres://app@h/m", Target("postgresql", "postgresql://app@h/m", "dead_letters")),
])
def test_dlq_targets(text, target):
    assert parse_dlq_target(text) == target


@pytest.mark.parametrize("text, fragment", [
    ("", "never dropped"),
    ("kafka://127.0.0.1:19092/", "topic names use"),
    ("s3://bucket/dlq", "unknown scheme"),
    ("jsonl://out/dlq", "unknown scheme"),
    ("kafka://127.0.0.1:19092/dead?format=xml", "written as json or avro_registry"),
    ("postgresql://app@h:5432/m?table=x;y", "not allowed"),
    ("postgresql://app@h:5432", "names no database"),
])
def test_bad_dlq_targets(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_dlq_target(text)


def test_write_dead_letters_dispatches_by_kind():
    assert WriteDeadLetters(parse_dlq_target("x.jsonl"), "p", "1")._label == "AppendJsonLines"
    assert WriteDeadLetters(parse_dlq_target("postgresql://a@h/m"), "p", "1")._label == "InsertIntoPostgres"
    assert WriteDeadLetters(parse_dlq_target("kafka://127.0.0.1:19092/dead"), "p", "1")._label == "ProduceToKafka"
    with pytest.raises(ValueError, match="needs a schema registry"):
        WriteDeadLetters(parse_dlq_target("kafka://127.0.0.1:19092/dead?format=avro_registry"), "p", "1")
    with pytest.raises(ValueError, match="unknown dead-letter queue kind 'sqlite'"):
        WriteDeadLetters(Target("sqlite", "x.db"), "p", "1")


def test_every_dlq_kind_is_one_registry_entry():
    assert set(DLQ_KINDS) == {"jsonl", "postgresql", "postgres", "kafka"}


def test_one_target_type_describes_sinks_and_queues_without_secrets():
    assert type(parse_sink_url("sqlite:///out.db")) is type(parse_dlq_target("x.jsonl")) is Target
    assert parse_dlq_target("out/dlq.jsonl").describe() == "out/dlq.jsonl"
    assert parse_dlq_target("postgresql://app:s3cret@h/m?table=dead").describe() == \
        "postgresql postgresql://app:***@h/m (table dead)"
    kafka = Target("kafka", "127.0.0.1:19092", "dead", (("format", "avro_registry"),),
                   client_settings=(("sasl.password", "s3cret"),))
    assert kafka.describe() == "kafka://127.0.0.1:19092/dead?format=avro_registry"
    assert "s3cret" not in repr(kafka) and "s3cret" not in str(kafka)
    assert kafka.option("format") == "avro_registry" and kafka.option("method") is None


def test_prepare_dlq(tmp_path, few_database_retries):
    prepare_dlq(parse_dlq_target(str(tmp_path / "new" / "dlq.jsonl")))
    assert (tmp_path / "new").is_dir()
    from onceflow.io.retry import DatabaseUnreachable

    with pytest.raises(DatabaseUnreachable) as caught:  # a service down (exit 1), not a wrong flag
        prepare_dlq(parse_dlq_target("postgresql://app:s3cret@127.0.0.1:1/metrics?table=dead"))
    assert "s3cret" not in str(caught.value) and "\n" not in str(caught.value)
