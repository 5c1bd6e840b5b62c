"""Archive a topic, then aggregate from the archive: the same as from Kafka."""

import datetime
import hashlib
import json
import sqlite3

import pytest

from onceflow.io.dlq import read_dead_letters
from onceflow.pipelines import archive
from onceflow.pipelines.aggregate import run
from tests.livejob import new_topic, produce, sample_lines
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
    assert archive.run(flags) == 0
    first = digests(folder)
    hours = {name.split("/")[1] for name in first if name.startswith("topic=")}
    assert hours == {"hour=2026-11-02T09", "hour=2026-11-02T10"}
    assert archive.run(flags) == 0
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
