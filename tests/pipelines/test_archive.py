"""Archive a topic, then aggregate from the archive: the same as from Kafka."""

import datetime
import hashlib
import json
import sqlite3

import apache_beam as beam
import pytest
from apache_beam.testing.util import BeamAssertException, assert_that

from onceflow.events import EventContract, format_utc_ms
from onceflow.io.archive import ReadArchive
from onceflow.io.dlq.jsonl import read_dead_letters
from onceflow.pipelines import archive
from onceflow.pipelines.aggregate import run
from tests.livejob import counted_events, new_topic, produce, sample_lines
from tests.pipelines.reference import expected_from_partitions

pytestmark = pytest.mark.kafka
BASE_MS = 1_793_610_000_000  # 2026-11-02T09:00:00Z


def digests(folder):
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("archive_format", ["avro", "parquet"])
def test_archive_then_aggregate_equals_the_reference(kafka_bootstrap, tmp_path, archive_format):
    topic = new_topic(kafka_bootstrap)
    lines = sample_lines()
    # Record timestamps spread over two hours, so the archive has several hour folders.
    produce(topic, [(n % 3, line, BASE_MS + n * 2_000) for n, line in enumerate(lines)])
    folder = tmp_path / "archive"
    flags = [f"--input={topic.url}", f"--output={folder}", f"--archive_format={archive_format}"]
    written = archive.run(flags)
    first = digests(folder)
    files = [name for name in first if name.startswith("topic=")]
    assert written == len(files) == 6  # 3 partitions x 2 hours: run() returns the file count
    hours = {name.split("/")[1] for name in files}
    assert hours == {"hour=2026-11-02T09", "hour=2026-11-02T10"}
    assert archive.run(flags) == written
    assert digests(folder) == first  # archiving again writes the same files

    db, dlq = tmp_path / "out.db", tmp_path / "dlq.jsonl"
    run([f"--input={folder}", f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--status=off"])
    partitions = [[((p, offset), line) for offset, line in enumerate(lines[p::3])] for p in range(3)]
    expected_rows, expected_dead = expected_from_partitions(partitions, 60_000, 300_000)
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        found = {}
        for row in connection.execute("SELECT * FROM aggregates"):
            start = datetime.datetime.fromisoformat(row["window_start"].replace("Z", "+00:00"))
            found[(row["store"], round(start.timestamp() * 1000))] = {
                column: row[column] for column in next(iter(expected_rows.values()))}
    assert found == expected_rows
    dead = {((e["source"]["partition"], e["source"]["offset"]), "too_late" if e["reason"] == "too_late" else "bad")
            for e in read_dead_letters(str(dlq))}
    assert dead == expected_dead
    sources = [json.dumps(e["source"], sort_keys=True) for e in read_dead_letters(str(dlq))]
    assert all('"topic": "%s"' % topic.topic in s for s in sources)


def cycling_hours_stream(count):
    """``count`` events of one partition whose times (event and Kafka timestamp) cycle
    through three hours: offsets 0, 3, 6... in hour 09, 1, 4, 7... in hour 10, 2,
    5, 8... in hour 11, so every hour file's offsets interleave with the others'."""
    records = []
    for n in range(count):
        timestamp = BASE_MS + (n % 3) * 3_600_000 + n * 1_000
        line = json.dumps({"order_id": f"o-{n}", "event_time": format_utc_ms(timestamp), "store": f"s{n % 4}",
                           "qty": 1, "price": 1.5}).encode()
        records.append((0, line, timestamp))
    return records


def read_exactly(expected):
    """A matcher: the (offset, high water) pairs read are ``expected``; a short message if not."""
    def check(actual):
        actual = sorted(actual)
        if actual != expected:
            missing = sorted(set(o for o, _ in expected) - set(o for o, _ in actual))
            wrong = [pair for pair in actual if pair not in expected]
            raise BeamAssertException(f"{len(actual)} records read of {len(expected)}; missing offsets "
                                      f"{missing[:10]}...; wrong high waters {wrong[:5]}...")
    return check


@pytest.mark.parametrize("archive_format", ["avro", "parquet"])
def test_archive_reads_every_record_once_in_offset_order_when_timestamps_go_back(
        kafka_bootstrap, tmp_path, archive_format):
    topic = new_topic(kafka_bootstrap, partitions=1)
    records = cycling_hours_stream(600)
    produce(topic, records)
    folder = tmp_path / "archive"
    assert archive.run([f"--input={topic.url}", f"--output={folder}", f"--archive_format={archive_format}"]) == 3

    # Each record once, and read in offset order: its high water is the greatest
    # event time of the offsets before it, as a Kafka read of the partition gives.
    expected, high_water = [], None
    for offset, (_, _, timestamp) in enumerate(records):
        expected.append((offset, high_water))
        high_water = timestamp if high_water is None else max(high_water, timestamp)
    contract = EventContract(time_field="event_time", key_fields=("store",), id_field="order_id")
    with beam.Pipeline() as pipeline:
        read = (pipeline | ReadArchive(str(folder), contract)
                | beam.Map(lambda record: (record.source["offset"], record.high_water_ms)))
        assert_that(read, read_exactly(expected))

    # The aggregate over the archive counts all 600 (lateness wide enough for the 3-hour cycle).
    db, dlq = tmp_path / "out.db", tmp_path / "dlq.jsonl"
    run([f"--input={folder}", f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--status=off", "--allowed_lateness=3h"])
    assert counted_events(db) == 600
    assert list(read_dead_letters(str(dlq))) == []


def test_the_archive_job_without_an_input_asks_for_a_topic(capsys):
    """Its --input is the main job's flag, whose default is the bundled file sample."""
    assert archive.main(["--output=unused"]) == 2
    assert capsys.readouterr().err.strip() == ("archive: error: --input: the archive job copies a Kafka topic: give "
                                               "--input=kafka://HOST:PORT/TOPIC")
