"""--kafka_time_source=record: the event time is the Kafka timestamp, for the windows
and the lateness rule alike (the windows followed the time field while the
lateness rule read the timestamps: wrong rows, and timely events dead-lettered as
too late)."""

import json
import sqlite3

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from onceflow.events import EventContract, SourceRecord, format_utc_ms
from onceflow.io.dlq.jsonl import read_dead_letters
from onceflow.pipelines import archive
from onceflow.transforms import ParseEvents
from tests.livejob import new_topic, produce
from tests.pipelines.test_archive import run_job

BASE_MS = 1_793_610_000_000  # 2026-11-02T09:00:00Z
WINDOW_MS = 60_000
CONTRACT_FLAGS = ["--id_field=order_id", "--time_field=event_time", "--key_fields=store", "--aggregate=count,sum:qty",
                  "--window=60s", "--allowed_lateness=5m", "--kafka_time_source=record"]


def stream():
    """Records whose Kafka timestamps rise 10 s apart while their time fields jump
    hours back and forth (by the field, most would be too late), a re-send of the
    same bytes a second later, and one record the contract refuses."""
    records, expected = [], {}
    for n in range(40):
        stamp = BASE_MS + n * 10_000
        line = json.dumps({"order_id": f"o-{n}", "event_time": format_utc_ms(BASE_MS - (n % 4) * 3 * 3_600_000),
                           "store": f"s{n % 2}", "qty": n}).encode()
        records.append((n % 2, line, stamp))
        key = (f"s{n % 2}", stamp - stamp % WINDOW_MS)
        count, total = expected.get(key, (0, 0))
        expected[key] = (count + 1, total + n)
        if n == 7:
            records.append((n % 2, line, stamp + 1_000))
    records.append((0, b'{"order_id": "bad", "store": "s0", "qty": 1}', BASE_MS + 500_000))
    return records, expected


def rows(db):
    with sqlite3.connect(db) as connection:
        return {(store, start): (count, total) for store, start, count, total in connection.execute(
            "SELECT store, window_start, count, sum_qty FROM aggregates")}


def as_text(expected):
    return {(store, format_utc_ms(start)): value for (store, start), value in expected.items()}


@pytest.mark.kafka
def test_a_kafka_range_and_its_archive_window_by_the_kafka_timestamp(kafka_bootstrap, tmp_path):
    topic = new_topic(kafka_bootstrap, partitions=2)
    records, expected = stream()
    produce(topic, records)

    ranged = run_job(f"--input={topic.url}", "--from=earliest", "--to=latest", *CONTRACT_FLAGS,
                     f"--sink=sqlite:///{tmp_path}/range.db", f"--dlq={tmp_path}/range-dlq.jsonl")
    assert ranged.returncode == 0, ranged.stderr[-2000:]
    assert rows(tmp_path / "range.db") == as_text(expected)
    assert [letter["reason"] for letter in read_dead_letters(str(tmp_path / "range-dlq.jsonl"))] == [
        "schema_violation"]

    folder = tmp_path / "archive"
    assert archive.run([f"--input={topic.url}", f"--output={folder}"]) > 0
    archived = run_job(f"--input={folder}", *CONTRACT_FLAGS, f"--sink=sqlite:///{tmp_path}/archive.db",
                       f"--dlq={tmp_path}/archive-dlq.jsonl")
    assert archived.returncode == 0, archived.stderr[-2000:]
    assert rows(tmp_path / "archive.db") == as_text(expected)
    assert [letter["reason"] for letter in read_dead_letters(str(tmp_path / "archive-dlq.jsonl"))] == [
        "schema_violation"]


def test_parse_events_takes_the_time_source_of_the_reader():
    contract = EventContract(time_field="t", key_fields=("k",), value_fields=(), id_field="id")
    value = json.dumps({"id": "a", "t": 1_000, "k": "x"}).encode()
    records = [SourceRecord(value, {"topic": "t", "partition": 0, "offset": 0, "timestamp_ms": 90_000}),
               SourceRecord(value, {"file": "f", "line": 1})]
    with beam.Pipeline() as pipeline:
        created = pipeline | beam.Create(records)
        by_record = created | "ByRecord" >> ParseEvents(contract, time_source="record")
        by_field = created | "ByField" >> ParseEvents(contract)
        assert_that(by_record.events | "RecordTimes" >> beam.Map(lambda e: e.event_time_ms), equal_to([90_000, 1_000]),
                    label="record")
        assert_that(by_field.events | "FieldTimes" >> beam.Map(lambda e: e.event_time_ms), equal_to([1_000, 1_000]),
                    label="field")
    with pytest.raises(ValueError, match="time_source must be one of field, record"):
        ParseEvents(contract, time_source="kafka")


@pytest.mark.kafka
@pytest.mark.parametrize("source", ["range", "archive"])
def test_a_kafka_timestamp_past_the_year_9999_is_a_bad_timestamp_dead_letter(source, kafka_bootstrap, tmp_path):
    """A broker takes any 64-bit time; such a record crashed the job (an
    OverflowError formatting the year 10000, or making Beam's timestamp), and the
    archive job too, with every other record of the run lost with it."""
    import uuid

    from onceflow.io.kafka.config import KafkaTopic
    from onceflow_dev import devstack

    topic = KafkaTopic(kafka_bootstrap, f"t-{uuid.uuid4().hex[:10]}")
    devstack.create_topic(topic.topic, partitions=1, config={"retention.ms": "-1",
                                                            "message.timestamp.after.max.ms": str(2**63 - 1)})
    records, expected = stream()
    records = [record for record in records if record[0] == 0 and b'"bad"' not in record[1]]
    for far in (253_402_300_800_000, 10**17, 2**62):  # the year 10000, and past Beam's timestamps
        records.insert(3, (0, json.dumps({"order_id": f"far-{far}", "event_time": BASE_MS, "store": "s0",
                                          "qty": 1}).encode(), far))
    produce(topic, records)
    expected = {key: value for key, value in expected.items() if key[0] == "s0"}
    if source == "range":
        flags = [f"--input={topic.url}", "--from=earliest", "--to=latest"]
    else:
        folder = tmp_path / "archive"
        assert archive.run([f"--input={topic.url}", f"--output={folder}"]) > 0
        flags = [f"--input={folder}"]
    ran = run_job(*flags, *CONTRACT_FLAGS, f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert rows(tmp_path / "out.db") == as_text(expected)
    letters = list(read_dead_letters(str(tmp_path / "dlq.jsonl")))
    assert sorted(letter["message"] for letter in letters) == sorted(
        f"Kafka timestamp {far} is out of range (years 1 to 9999)" for far in (253_402_300_800_000, 10**17, 2**62))
    assert {letter["reason"] for letter in letters} == {"bad_timestamp"}
