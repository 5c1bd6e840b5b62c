"""The main job on registry-framed Avro records from the real broker, with its
writer schemas served by the registry STAND-IN (tests/registry_standin.py): rows
against an independent expectation, and every bad record in the DLQ with its
reason and raw bytes."""

import base64
import io
import json
import sqlite3
import struct
import subprocess
import sys
from collections import defaultdict

import fastavro
import pytest

from onceflow.io.dlq.jsonl import read_dead_letters
from tests.livejob import new_topic, produce
from tests.registry_standin import RegistryStandIn, register_over_http

pytestmark = pytest.mark.kafka
BASE_MS = 1_793_610_000_000  # 2026-11-02T09:00:00Z
MINUTE = 60_000

ORDER = {"type": "record", "name": "Order", "namespace": "shop", "fields": [
    {"name": "order_id", "type": "string"},
    {"name": "event_time", "type": "long"},
    {"name": "store", "type": "string"},
    {"name": "qty", "type": "long"},
    {"name": "price", "type": "double"},
]}
# A schema the registry accepts but whose records break the event contract (qty is text).
ORDER_TEXT_QTY = {**ORDER, "name": "OrderTextQty", "fields": [
    *ORDER["fields"][:3], {"name": "qty", "type": "string"}, ORDER["fields"][4]]}


def encode(schema, record):
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema, named_schemas={}), record)
    return out.getvalue()


def framed(schema_id, payload):
    return b"\x00" + struct.pack(">I", schema_id) + payload


def window_start(millis):
    return millis - millis % MINUTE


def utc_ms(text):
    import datetime
    return round(datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def test_avro_registry_records_from_kafka_end_to_end(kafka_bootstrap, tmp_path):
    topic = new_topic(kafka_bootstrap, partitions=1)
    with RegistryStandIn(first_id=101) as registry:
        order_id = register_over_http(registry.url, f"{topic.topic}-value", ORDER)
        text_qty_id = register_over_http(registry.url, f"{topic.topic}-value", ORDER_TEXT_QTY)
        good, values = [], []
        for n in range(60):  # in event-time order, 5 s apart: nothing is late
            record = {"order_id": f"o-{n}", "event_time": BASE_MS + n * 5_000, "store": f"s{n % 3}",
                      "qty": n % 7 + 1, "price": 0.25 * n}
            good.append(record)
            values.append(framed(order_id, encode(ORDER, record)))
            if n % 10 == 0:  # a re-sent duplicate: counted once
                values.append(values[-1])
        expected_bad = {}  # offset -> reason
        bad = [
            (framed(4242, encode(ORDER, good[3])), "unknown_schema"),
            (framed(order_id, encode(ORDER, good[4])[:-3]), "avro_decode_error"),
            (b"\x01" + framed(order_id, encode(ORDER, good[5]))[1:], "bad_wire_format"),
            (framed(text_qty_id, encode(ORDER_TEXT_QTY, {**good[6], "order_id": "x-6", "qty": "three"})),
             "schema_violation"),
            (json.dumps(good[7]).encode(), "bad_wire_format"),  # plain JSON where framed Avro is expected
        ]
        for position, (value, reason) in zip((7, 20, 33, 45, 60), bad):
            values.insert(position, value)
        for offset, value in enumerate(values):
            for bad_value, reason in bad:
                if value is bad_value:
                    expected_bad[offset] = (reason, value)
        produce(topic, [(0, value, None) for value in values])

        db, dlq = tmp_path / "out.db", tmp_path / "dlq.jsonl"
        result = subprocess.run(
            [sys.executable, "-m", "onceflow.pipelines.aggregate", f"--input={topic.url}", "--from=earliest",
             "--to=latest", "--input_format=avro_registry", f"--schema_registry_url={registry.url}",
             f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--aggregate=count,sum:qty,max:price", "--status=off"],
            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr[-3000:]
        fetched = sorted(path for method, path, _ in registry.requests if method == "GET")
    # The job asked the registry for each schema ID it met, and for nothing else.
    assert set(fetched) == {f"/schemas/ids/{i}" for i in (order_id, text_qty_id, 4242)}

    expected = defaultdict(lambda: {"event_count": 0, "sum_qty": 0, "max_price": None})
    for record in good:
        row = expected[(record["store"], window_start(record["event_time"]))]
        row["event_count"] += 1
        row["sum_qty"] += record["qty"]
        row["max_price"] = record["price"] if row["max_price"] is None else max(row["max_price"], record["price"])
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        found = {(row["store"], utc_ms(row["window_start"])): {k: row[k] for k in ("event_count", "sum_qty",
                                                                                   "max_price")}
                 for row in connection.execute("SELECT * FROM aggregates")}
    assert found == dict(expected)

    letters = list(read_dead_letters(str(dlq)))
    assert {letter["source"]["offset"]: (letter["reason"], base64.b64decode(letter["raw_base64"]))
            for letter in letters} == expected_bad
    assert len(letters) == len(bad)


def test_an_unreachable_registry_fails_the_job_and_dead_letters_nothing(kafka_bootstrap, tmp_path):
    topic = new_topic(kafka_bootstrap, partitions=1)
    record = {"order_id": "o-1", "event_time": BASE_MS, "store": "s1", "qty": 1, "price": 1.0}
    produce(topic, [(0, framed(101, encode(ORDER, record)), None)])
    db, dlq = tmp_path / "out.db", tmp_path / "dlq.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "onceflow.pipelines.aggregate", f"--input={topic.url}", "--from=earliest",
         "--to=latest", "--input_format=avro_registry", "--schema_registry_url=http://127.0.0.1:9",
         "--schema_registry_setting=max.retries=1", f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--status=off"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "schema registry http://127.0.0.1:9 did not give schema 101" in result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1  # a service error, one line
    assert "Traceback" not in result.stderr, result.stderr  # Beam's logged traceback of it is dropped
    assert list(read_dead_letters(str(dlq))) == []


def test_rows_topic_as_registry_framed_avro(kafka_bootstrap, tmp_path):
    """--sink kafka://...?format=avro_registry: row values are registry-framed Avro
    under the topic's -value subject; a second run (the version guard reads the Avro
    rows back) leaves the latest rows unchanged."""
    from onceflow.io.kafka.write import latest_rows
    from onceflow.io.schema_registry import RegistryConfig
    from onceflow.io.kafka.admin import read_topic_to_end

    source, rows_topic = new_topic(kafka_bootstrap, partitions=1), new_topic(kafka_bootstrap, partitions=1)
    with RegistryStandIn() as registry:
        order_id = register_over_http(registry.url, f"{source.topic}-value", ORDER)
        records = [{"order_id": f"o-{n}", "event_time": BASE_MS + n * 20_000, "store": f"s{n % 2}", "qty": n,
                    "price": 1.0 + n} for n in range(12)]
        produce(source, [(0, framed(order_id, encode(ORDER, r)), None) for r in records])
        flags = [sys.executable, "-m", "onceflow.pipelines.aggregate", f"--input={source.url}", "--from=earliest",
                 "--to=latest", "--input_format=avro_registry", f"--schema_registry_url={registry.url}",
                 f"--sink={rows_topic.url}?format=avro_registry", f"--dlq={tmp_path / 'dlq.jsonl'}",
                 "--aggregate=count,sum:qty,mean:price", "--status=off"]
        first = subprocess.run(flags, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert first.returncode == 0, first.stderr[-3000:]
        config = RegistryConfig(registry.url)
        latest = latest_rows(rows_topic, registry=config)
        second = subprocess.run(flags, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert second.returncode == 0, second.stderr[-3000:]
        assert latest_rows(rows_topic, registry=config) == latest
        row_ids = {i for i, (kind, text) in registry.schemas.items() if "AggregateRow" in text}
        assert len(row_ids) == 1
        row_schema = fastavro.parse_schema(json.loads(registry.schemas[row_ids.pop()][1]), named_schemas={})
        messages = list(read_topic_to_end(rows_topic))
        # what the writer's version guard reads back from the topic: each message's event_count
        from onceflow.io.kafka.write import _message_version
        versions = [_message_version(value, config) for _, value in messages]
    expected = defaultdict(lambda: [0, 0, []])
    for r in records:
        row = expected[(r["store"], window_start(r["event_time"]))]
        row[0] += 1
        row[1] += r["qty"]
        row[2].append(r["price"])
    # every message decodes on its own, with the registered schema, from the wire format
    decoded = {}
    for key, value in messages:
        assert value[0] == 0
        row = fastavro.schemaless_reader(io.BytesIO(value[5:]), row_schema, None)
        assert json.loads(key) == [row["store"], row["window_start"], row["window_end"]]
        decoded[(row["store"], utc_ms(row["window_start"]))] = [row["event_count"], row["sum_qty"], row["mean_price"]]
    assert versions == [fastavro.schemaless_reader(io.BytesIO(v[5:]), row_schema, None)["event_count"]
                        for _, v in messages]
    assert decoded == {k: [c, s, pytest.approx(sum(p) / len(p))] for k, (c, s, p) in expected.items()}
    assert {(r["store"], utc_ms(r["window_start"])) for r in latest.values()} == set(expected)


def test_dead_letter_topic_as_registry_framed_avro(kafka_bootstrap, tmp_path):
    """--dlq kafka://...?format=avro_registry: every dead letter is registry-framed
    Avro with its raw bytes; `onceflow dlq count` and the readers decode them."""
    from onceflow.io.dlq import parse_dlq_target, read_dead_letters_from
    from onceflow.io.schema_registry import RegistryConfig

    source, dlq_topic = new_topic(kafka_bootstrap, partitions=1), new_topic(kafka_bootstrap, partitions=1)
    with RegistryStandIn() as registry:
        order_id = register_over_http(registry.url, f"{source.topic}-value", ORDER)
        good = {"order_id": "o-1", "event_time": BASE_MS, "store": "s1", "qty": 1, "price": 1.0}
        values = [framed(order_id, encode(ORDER, good)), framed(9999, encode(ORDER, good)), b"\x07bad",
                  framed(order_id, b"\xff")]
        produce(source, [(0, value, None) for value in values])
        dlq_url = f"{dlq_topic.url}?format=avro_registry"
        result = subprocess.run(
            [sys.executable, "-m", "onceflow.pipelines.aggregate", f"--input={source.url}", "--from=earliest",
             "--to=latest", "--input_format=avro_registry", f"--schema_registry_url={registry.url}",
             f"--sink=sqlite:///{tmp_path / 'out.db'}", f"--dlq={dlq_url}", "--status=off"],
            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr[-3000:]
        import dataclasses
        target = dataclasses.replace(parse_dlq_target(dlq_url), registry=RegistryConfig(registry.url))
        letters = list(read_dead_letters_from(target))
        counted = subprocess.run(
            [sys.executable, "-m", "onceflow.cli", "dlq", "count", f"--dlq={dlq_url}",
             f"--schema-registry-url={registry.url}"], capture_output=True, text=True, timeout=120)
        from onceflow.io.kafka.admin import read_topic_to_end
        raw_messages = [value for _, value in read_topic_to_end(dlq_topic)]
    assert counted.returncode == 0, counted.stderr[-2000:]
    assert "unknown_schema" in counted.stdout and "bad_wire_format" in counted.stdout
    assert {(letter["source"]["offset"], letter["reason"], base64.b64decode(letter["raw_base64"]))
            for letter in letters} == {(1, "unknown_schema", values[1]), (2, "bad_wire_format", values[2]),
                                       (3, "avro_decode_error", values[3])}
    assert all(letter["source"]["topic"] == source.topic for letter in letters)
    assert raw_messages and all(value[0] == 0 for value in raw_messages)  # the wire format, not JSON
    # Read without ?format=avro_registry: one line that says so (it was a JSON error about utf-32).
    unframed = subprocess.run([sys.executable, "-m", "onceflow.cli", "dlq", "count", f"--dlq={dlq_topic.url}"],
                              capture_output=True, text=True, timeout=120)
    assert unframed.returncode != 0 and "Traceback" not in unframed.stderr
    assert f"give the queue as {dlq_topic.url}?format=avro_registry" in unframed.stderr.strip().splitlines()[-1]
