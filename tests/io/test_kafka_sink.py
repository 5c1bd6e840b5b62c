"""The Kafka row sink on the real broker: keys, values, re-runs, the version guard,
a compacted topic, and the consumer rule for the freshest row."""

import json
import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from confluent_kafka import Producer

from onceflow import metrics
from onceflow_dev import devstack
from onceflow.aggregates import parse_aggregates
from onceflow.io.kafka.admin import read_records_to_end
from onceflow.io.kafka.config import KafkaTopic
from onceflow.io.kafka.write import latest_rows, row_message, write_rows_to_kafka
from onceflow.rows import RowSchema

pytestmark = pytest.mark.kafka
SCHEMA = RowSchema(("store",), parse_aggregates("count,sum:qty"))
START = 1_793_610_000_000  # 2026-11-02T09:00:00Z
KEY = b'["oslo-01","2026-11-02T09:00:00.000Z","2026-11-02T09:01:00.000Z"]'


def row(store, events, qty, start=START):
    return {"store": store, "window_start": start, "window_end": start + 60_000,
            "event_count": events, "count": events, "sum_qty": qty}


def topic_for(bootstrap, **config):
    name = f"rows-{uuid.uuid4().hex[:10]}"
    devstack.create_topic(name, partitions=2, config=config)
    return KafkaTopic(bootstrap, name)


def write(topic, rows):
    """Runs one job writing ``rows``; returns (rows written, rows refused as stale)."""
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create(rows) | write_rows_to_kafka(topic, SCHEMA)
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(MetricsFilter().with_namespace(metrics.NAMESPACE))["counters"]}
    return counters.get(metrics.SINK_ROWS_WRITTEN, 0), counters.get(metrics.SINK_ROWS_STALE, 0)


def messages(topic):
    """(key, value as a dict) of every message, in offset order per partition."""
    return [(key, json.loads(value)) for _, _, key, value in sorted(read_records_to_end(topic))]


def last_per_key(topic):
    """What a compacted topic keeps: the last message of each key."""
    last = {}
    for _, _, key, value in sorted(read_records_to_end(topic)):
        last[key] = json.loads(value)
    return last


def test_rows_are_keyed_by_the_row_key_and_valued_as_json(kafka_bootstrap):
    topic = topic_for(kafka_bootstrap)
    assert write(topic, [row("oslo-01", 3, 7), row("paris-02", 1, 2)]) == (2, 0)
    found = dict(messages(topic))
    assert found[KEY] == {"store": "oslo-01", "window_start": "2026-11-02T09:00:00.000Z",
                          "window_end": "2026-11-02T09:01:00.000Z", "event_count": 3, "count": 3, "sum_qty": 7}
    assert set(found) == {KEY, KEY.replace(b"oslo-01", b"paris-02")}


def test_a_sum_past_the_largest_double_is_null_in_strict_json():
    key, value = row_message(row("oslo-01", 3, float("inf")), SCHEMA)
    assert key == KEY
    assert json.loads(value, parse_constant=lambda name: pytest.fail(f"{name} is not JSON")) == {
        "store": "oslo-01", "window_start": "2026-11-02T09:00:00.000Z", "window_end": "2026-11-02T09:01:00.000Z",
        "event_count": 3, "count": 3, "sum_qty": None}


def test_the_sink_reports_the_newest_window_end_it_wrote(kafka_bootstrap):
    topic = topic_for(kafka_bootstrap)
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create([row("oslo-01", 3, 7, START + 120_000), row("paris-02", 1, 2)]) \
        | write_rows_to_kafka(topic, SCHEMA)
    result = pipeline.run()
    result.wait_until_finish()
    gauges = {g.key.metric.name: g.committed.value
              for g in result.metrics().query(MetricsFilter().with_namespace(metrics.NAMESPACE))["gauges"]}
    assert gauges[metrics.SINK_WINDOW_END_MS] == START + 180_000


def test_a_rerun_writes_the_same_messages_under_the_same_keys(kafka_bootstrap):
    topic = topic_for(kafka_bootstrap)
    rows = [row("oslo-01", 3, 7), row("paris-02", 1, 2)]
    write(topic, rows)
    first = sorted(messages(topic))
    assert write(topic, rows) == (2, 0)  # an equal version is rewritten: harmless
    assert sorted(messages(topic)) == sorted(first + first)
    assert latest_rows(topic) == dict(first)


def test_a_stale_version_is_not_produced_after_a_newer_one(kafka_bootstrap):
    topic = topic_for(kafka_bootstrap)
    assert write(topic, [row("oslo-01", 8, 20)]) == (1, 0)
    # A later job (a replay of part of the window) brings an older, less complete version.
    assert write(topic, [row("oslo-01", 5, 11), row("paris-02", 1, 2)]) == (1, 1)
    assert last_per_key(topic)[KEY]["event_count"] == 8
    assert [value["event_count"] for key, value in messages(topic) if key == KEY] == [8]


def test_the_consumer_rule_keeps_the_freshest_row_whatever_was_written_last(kafka_bootstrap):
    """A version the writer could not see (another producer wrote it after the
    writer started) may leave a lower version last; latest_rows keeps the greatest
    event_count per key, which the plain last-message-per-key reading does not."""
    topic = topic_for(kafka_bootstrap)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    newer = json.dumps({**row("oslo-01", 8, 20), "window_start": "2026-11-02T09:00:00.000Z",
                        "window_end": "2026-11-02T09:01:00.000Z"}).encode()
    older = newer.replace(b'"event_count": 8', b'"event_count": 5')
    for value in (newer, older):
        producer.produce(topic.topic, key=KEY, value=value)
    assert producer.flush(30) == 0
    assert last_per_key(topic)[KEY]["event_count"] == 5
    assert latest_rows(topic)[KEY]["event_count"] == 8


@pytest.mark.slow
def test_a_compacted_topic_keeps_the_freshest_version(kafka_bootstrap):
    # Small segments and an eager cleaner, so the broker compacts within seconds.
    topic = topic_for(kafka_bootstrap, **{"cleanup.policy": "compact", "segment.ms": "100",
                                          "min.cleanable.dirty.ratio": "0.001", "delete.retention.ms": "100",
                                          "min.compaction.lag.ms": "0"})
    write(topic, [row("oslo-01", 3, 7, START + 60_000 * n) for n in range(3)])
    write(topic, [row("oslo-01", 8, 20)])
    assert write(topic, [row("oslo-01", 5, 11)]) == (0, 1)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        time.sleep(1)
        write(topic, [row("paris-02", 1, 2, START + int(time.time()))])  # rolls the active segment
        found = [value["event_count"] for key, value in messages(topic) if key == KEY]
        if found == [8]:
            break
    assert found == [8], f"the topic still holds versions {found} of the key after compaction"
    assert latest_rows(topic)[KEY]["event_count"] == 8


def test_a_sink_or_dead_letter_topic_that_does_not_exist_is_refused_before_the_job_starts(kafka_bootstrap):
    from onceflow.io.dlq import parse_dlq_target, prepare_dlq
    from onceflow.io.sinks import parse_sink_url, prepare_sink

    missing = f"kafka://{kafka_bootstrap}/no-such-{uuid.uuid4().hex[:10]}"
    with pytest.raises(ValueError, match="does not exist"):
        prepare_sink(parse_sink_url(missing), SCHEMA)
    with pytest.raises(ValueError, match="does not exist"):
        prepare_dlq(parse_dlq_target(missing))
    existing = topic_for(kafka_bootstrap).url
    prepare_sink(parse_sink_url(existing), SCHEMA)
    prepare_dlq(parse_dlq_target(existing))


def test_a_topic_holding_rows_of_other_columns_is_refused_before_the_job_starts(kafka_bootstrap):
    """A job with other aggregates added rows of a second shape to the topic, exit 0
    (the other sinks refuse a table with other columns)."""
    from onceflow.io.sinks import parse_sink_url, prepare_sink

    topic = topic_for(kafka_bootstrap)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    row = {"store": "oslo-01", "window_start": START, "window_end": START + 60_000, "event_count": 2, "count": 2,
           "sum_qty": 3}
    key, value = row_message(row, SCHEMA)
    producer.produce(topic.topic, key=key, value=value, partition=0)
    producer.flush(30)
    target = parse_sink_url(topic.url)
    prepare_sink(target, SCHEMA)
    with pytest.raises(ValueError, match=r"holds rows with columns .*'sum_qty'.*, but this job writes"):
        prepare_sink(target, RowSchema(("store",), parse_aggregates("count")))
    producer.produce(topic.topic, value=b"not a row", partition=0)  # the last record of each partition counts
    producer.flush(30)
    prepare_sink(target, RowSchema(("store",), parse_aggregates("count")))


def test_a_topic_is_read_to_its_end_past_transaction_markers_and_for_as_long_as_records_come(kafka_bootstrap):
    """A topic ending in a transaction's marker (no record has that offset) was
    read until the timeout and then refused; and the read had a fixed deadline, so
    `onceflow dlq count` of a queue of 1.8 million dead letters failed after 30 s."""
    topic = topic_for(kafka_bootstrap)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": topic.topic})
    producer.init_transactions()
    producer.begin_transaction()
    for i in range(12_000):
        producer.produce(topic.topic, b"%d" % i, partition=i % 2)
    producer.commit_transaction()
    producer.begin_transaction()
    producer.produce(topic.topic, b"aborted", partition=0)
    producer.abort_transaction()
    started = time.monotonic()
    values = []
    for _, _, _, value in read_records_to_end(topic, timeout_s=1.0):
        values.append(value)
        if len(values) % 3_000 == 0:
            time.sleep(0.5)  # a slow caller: the read takes 2 s and more, twice the timeout
    assert sorted(values) == sorted(b"%d" % i for i in range(12_000))
    assert time.monotonic() - started >= 2.0
