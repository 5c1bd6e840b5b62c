"""Archive a topic, then aggregate from the archive: the same as from Kafka."""

import datetime
import hashlib
import itertools
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time

import apache_beam as beam
import pytest
from apache_beam.testing.util import BeamAssertException, assert_that

from onceflow.events import EventContract, format_utc_ms
from onceflow.io.archive import ReadArchive
from onceflow.io.dlq.jsonl import read_dead_letters
from onceflow.pipelines import archive
from onceflow.pipelines.aggregate import run
from tests.livejob import counted_events, new_topic, produce, recreate_topic, sample_lines
from tests.pipelines.test_aggregate_job import assert_one_usage_line
from tests.test_deadletter_command import one_error_line
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


def run_job(*flags):
    return subprocess.run([sys.executable, "-m", "onceflow.pipelines.aggregate", *flags, "--status=off"],
                          capture_output=True, text=True, timeout=300)


def test_an_archive_is_read_whole_or_not_at_all(kafka_bootstrap, tmp_path):
    """A run stopped part way, a file deleted, a file cut short, a foreign file: each
    fails the read in one line naming what is wrong (each was read in part, exit 0,
    or ended in a traceback). A file a stopped run left within a finished run's
    offsets is a duplicate of that run's records and is read once."""
    topic = new_topic(kafka_bootstrap)
    lines = sample_lines()
    produce(topic, [(n % 3, line, BASE_MS + n * 2_000) for n, line in enumerate(lines)])
    folder = tmp_path / "archive"
    assert archive.run([f"--input={topic.url}", f"--output={folder}"]) == 6
    manifest = json.loads((folder / "onceflow-archive.json").read_text())
    assert len(manifest["runs"]) == 1 and len(manifest["runs"][0]) == 6
    files = sorted(folder.glob("topic=*/hour=*/*.avro"))
    sink = [f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl"]
    whole = run_job(f"--input={folder}", *sink)
    assert whole.returncode == 0, whole.stderr
    expected = counted_events(tmp_path / "out.db")

    copies = itertools.count()

    def damaged(change):
        copy = tmp_path / f"copy{next(copies)}"
        shutil.copytree(folder, copy)
        change(copy)
        return run_job(f"--input={copy}", f"--sink=sqlite:///{copy}.db", f"--dlq={copy}-dlq.jsonl")

    def no_finished_run(copy):
        (copy / "onceflow-archive.json").write_text(json.dumps({**manifest, "runs": [], "ranges": []}))
    assert_one_usage_line(damaged(no_finished_run), "has finished (the files there were left by a run stopped")

    def one_file_deleted(copy):
        (copy / files[2].relative_to(folder)).unlink()
    partition, first, last = (int(part) for part in re.findall(r"\d+", files[2].name.split("partition=")[1]))
    assert_one_usage_line(damaged(one_file_deleted), f"{files[2].name}, written by a finished archive run, is missing: "
                          f"archive its range again while the topic holds it (--from offsets:{partition}={first} "
                          f"--to offsets:{partition}={last + 1}")

    repaired = tmp_path / "repaired"  # the refusal's flags rewrite the missing file
    shutil.copytree(folder, repaired)
    (repaired / files[2].relative_to(folder)).unlink()
    assert archive.run([f"--input={topic.url}", f"--output={repaired}", f"--from=offsets:{partition}={first}",
                        f"--to=offsets:{partition}={last + 1}"]) >= 1
    read = run_job(f"--input={repaired}", f"--sink=sqlite:///{repaired}.db", f"--dlq={repaired}-dlq.jsonl")
    assert read.returncode == 0, read.stderr
    assert counted_events(f"{repaired}.db") == expected

    def a_file_cut_short(copy):
        path = copy / files[1].relative_to(folder)
        path.write_bytes(path.read_bytes()[:200])
    assert_one_usage_line(damaged(a_file_cut_short), f"{files[1].name}: cannot be read (")

    def a_foreign_file(copy):
        (copy / files[0].relative_to(folder)).with_name("partition=9-x.avro").write_bytes(b"x")
    assert_one_usage_line(damaged(a_foreign_file), "partition=9-x.avro is not an archive file")

    def a_file_beyond_every_run(copy):
        (copy / files[0].relative_to(folder)).with_name("partition=0-offsets=000000090000-000000090009.avro") \
            .write_bytes(files[0].read_bytes())
    assert_one_usage_line(damaged(a_file_beyond_every_run), "is not part of a finished archive run")

    def a_stopped_runs_copy_within_a_finished_run(copy):
        hours = sorted({path.parent.name for path in files})
        source = next(path for path in files if path.parent.name == hours[0])
        (copy / "topic=x").mkdir()  # not a file: ignored by the listing of topic=*/hour=*/*
        target = copy / source.relative_to(folder).parent.with_name(hours[1]) / source.name
        target.write_bytes(source.read_bytes())
    duplicated = damaged(a_stopped_runs_copy_within_a_finished_run)
    assert duplicated.returncode == 0, duplicated.stderr
    assert counted_events(f"{tmp_path}/copy{next(copies) - 1}.db") == expected

    # The archive's files given as a glob were read as plain inputs (the manifest as
    # JSON lines, the Avro files as events: dead letters, exit 0).
    for pattern in (f"{folder}/*", f"{folder}/topic=*/hour=*/*.avro", f"{folder}/onceflow-archive.json"):
        refused = run_job(f"--input={pattern}", *sink)
        assert_one_usage_line(refused, f"matches files of the onceflow archive {folder}; give the folder itself")


def test_the_archive_job_refuses_another_topic_and_an_output_that_is_a_file(kafka_bootstrap, tmp_path, capsys):
    first, second = new_topic(kafka_bootstrap, partitions=1), new_topic(kafka_bootstrap, partitions=1)
    produce(first, [(0, line, BASE_MS) for line in sample_lines()[:10]])
    folder = tmp_path / "archive"
    assert archive.main([f"--input={first.url}", f"--output={folder}"]) == 0
    capsys.readouterr()
    assert archive.main([f"--input={second.url}", f"--output={folder}"]) == 2
    assert f"is an archive of topic {first.topic}: give each topic its own folder" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert archive.main([f"--input={first.url}", f"--output={tmp_path}/a-file"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("archive: error: --output:") and len(err.splitlines()) == 1, err


def test_the_archive_job_over_records_deleted_by_retention_fails_unless_allowed(kafka_bootstrap, tmp_path, capsys):
    from tests.io.test_kafka_ranges import _delete_records

    topic = new_topic(kafka_bootstrap, partitions=1)
    produce(topic, [(0, line, BASE_MS + n * 1_000) for n, line in enumerate(sample_lines()[:300])])
    _delete_records(topic, {0: 100})
    folder = tmp_path / "archive"
    flags = [f"--input={topic.url}", f"--output={folder}", "--from=offsets:0=0"]
    assert archive.main(flags) == 1
    assert capsys.readouterr().err.strip() == (
        f"archive: --from/--to: topic {topic.topic}: 100 records lost to retention (partition 0 offsets "
        "0-99: 100 records); pass --allow_retention_gaps to archive what is left, or start later")
    assert not folder.exists()  # refused before the folder is made an archive
    assert archive.main([*flags, "--allow_retention_gaps"]) == 0
    assert "100 records lost to retention" in capsys.readouterr().err
    (name,) = json.loads((folder / "onceflow-archive.json").read_text())["runs"][0]
    assert name.endswith("partition=0-offsets=000000000100-000000000299.avro")


def test_dead_letters_read_from_an_archive_are_replayed_from_it(kafka_bootstrap, tmp_path, capsys):
    from onceflow import cli

    topic = new_topic(kafka_bootstrap)
    produce(topic, [(n % 3, line, BASE_MS + n * 2_000) for n, line in enumerate(sample_lines())])
    folder = tmp_path / "archive"
    archive.run([f"--input={topic.url}", f"--output={folder}"])
    db, dlq = tmp_path / "out.db", tmp_path / "dlq.jsonl"
    job = [f"--input={folder}", f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--status=off"]
    run(job)
    before = counted_events(db)
    too_late = [letter for letter in read_dead_letters(str(dlq)) if letter["reason"] == "too_late"]
    assert too_late and all("topic" in letter["source"] for letter in too_late)
    # An archive of another topic, or of part of this one, would recompute other records and
    # report the replay done (the other topic's rows written into this table).
    other, part = new_topic(kafka_bootstrap), tmp_path / "part"
    produce(other, [(0, line, BASE_MS) for line in sample_lines()[:5]])
    archive.run([f"--input={other.url}", f"--output={tmp_path}/other"])
    archive.run([f"--input={topic.url}", f"--output={part}", "--to=offsets:0=1,1=1,2=1"])
    capsys.readouterr()
    for folder_given, fragment in ((tmp_path / "other", f"is an archive of {other.topic}: give an archive of "),
                                   (part, f"of the {len(too_late)} selected records are not in the archive {part}")):
        assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--reason", "too_late", "--", *job[1:],
                         f"--input={folder_given}", "--allowed_lateness=3h"]) == 2
        assert fragment in one_error_line(capsys)
    assert counted_events(db) == before
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--reason", "too_late", "--", *job,
                     "--allowed_lateness=3h"]) == 0
    assert f"re-running the job with its own --input {folder}" in capsys.readouterr().err
    assert counted_events(db) == before + len(too_late)


@pytest.mark.parametrize("flags, fragment", [
    (["--kafka_group=g"], "--kafka_group: the archive job copies records as they are"),
    (["--window=5m"], "--window: the archive job copies records as they are"),
    (["--input_format=avro_registry"], "--input_format: the archive job copies records as they are"),
    (["--from=2026-11-02T10:00:00Z", "--to=2026-11-02T09:00:00Z"], "--from/--to: the start is after the stop"),
    (["--from=latest", "--to=earliest"], "--from/--to: the start is after the stop"),
    (["--from=offsets:0=5", "--to=offsets:0=1"], "--from/--to: partition 0 starts after its stop"),
    # Accepted and ignored: no port answered, no file written, nothing said why.
    (["--health_port=18705"], "--health_port: the archive job runs to its end in this process and prints one line"),
    (["--metrics_out=m.json"], "--metrics_out: the archive job runs to its end in this process"),
    (["--savepoint_path=/tmp/sp"], "--savepoint_path: the archive job runs to its end in this process"),
])
def test_the_archive_job_refuses_flags_it_would_ignore(flags, fragment, tmp_path, capsys):
    assert archive.main(["--input=kafka://127.0.0.1:1/orders", f"--output={tmp_path}/a", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


@pytest.mark.parametrize("flag, fragment", [
    ("--runner=FlinkRunner", "--runner=FlinkRunner: the archive job writes a local folder"),
    ("--direct_running_mode=multi_processing", "--direct_running_mode=multi_processing: the DirectRunner's worker "
                                               "processes drop the rest of a Kafka read"),
])
def test_the_archive_job_runs_in_this_process_only(flag, fragment, tmp_path, capsys):
    assert archive.main(["--input=kafka://127.0.0.1:1/orders", f"--output={tmp_path}/a", flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_a_run_that_wrote_no_file_still_records_the_range_it_read(tmp_path):
    """A top-up over only an aborted transaction writes no file. The manifest kept a
    run only when its list of files was new, so after one empty run the next was
    dropped with its range, and the next top-up, from where the archive truly
    ended, was refused for a hole over offsets already read. A run with the same
    files and ranges as one recorded is still recorded once."""
    from onceflow.io.archive import holes_left_by, read_manifest, record_run, write_marker

    folder = tmp_path / "archive"
    folder.mkdir()
    write_marker(str(folder), "avro", "orders")
    first = folder / "topic=orders/hour=2026-11-02T09/partition=0-offsets=000000000000-000000000009.avro"
    record_run(str(folder), [str(first)], {0: (0, 11)})
    record_run(str(folder), [], {0: (11, 11)})  # nothing new in the topic
    record_run(str(folder), [], {0: (11, 22)})  # ten aborted records and their marker
    record_run(str(folder), [], {0: (11, 22)})  # the same range again
    manifest = read_manifest(str(folder))
    assert manifest["ranges"] == [{"0": [0, 11]}, {"0": [11, 11]}, {"0": [11, 22]}]
    assert holes_left_by(manifest, 0, 22, 33) == []
    assert holes_left_by(manifest, 0, 23, 33) == [(22, 23)]


def test_a_damaged_list_of_runs_is_one_line(tmp_path, capsys):
    from onceflow.io.archive import check_archive, write_marker

    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "onceflow-archive.json").write_text(json.dumps({"format": "avro", "runs": [["not-a-file-name"]]}))
    with pytest.raises(ValueError, match="its list of finished runs is damaged; restore it, or archive the topic"):
        check_archive(str(folder))
    with pytest.raises(ValueError, match="its list of finished runs is damaged"):
        write_marker(str(folder), "avro", "orders")  # the archive job: --output, one line


def test_an_archive_written_before_runs_were_recorded_is_read_and_topped_up(kafka_bootstrap, tmp_path):
    """Its manifest lists no runs: read as it is, and an archive run into it takes its
    files as a finished run (they would otherwise count as left by a stopped run)."""
    topic = new_topic(kafka_bootstrap, partitions=1)
    lines = sample_lines()
    produce(topic, [(0, line, BASE_MS + n * 1_000) for n, line in enumerate(lines[:100])])
    folder = tmp_path / "archive"
    archive.run([f"--input={topic.url}", f"--output={folder}"])
    manifest_path = folder / "onceflow-archive.json"
    manifest = json.loads(manifest_path.read_text())
    for later in ("runs", "ranges", "gaps", "topic_id"):
        del manifest[later]
    manifest_path.write_text(json.dumps(manifest))  # as an earlier onceflow wrote it
    produce(topic, [(0, line, BASE_MS + (100 + n) * 1_000) for n, line in enumerate(lines[100:150])])
    archive.run([f"--input={topic.url}", f"--output={folder}", "--from=offsets:0=100"])
    assert len(json.loads(manifest_path.read_text())["runs"]) == 2
    db, dlq = tmp_path / "out.db", tmp_path / "dlq.jsonl"
    summary = run([f"--input={folder}", f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--status=off"])
    assert "records read              150" in summary.render()


def test_a_kafka_timestamp_outside_the_years_1_to_9999_is_archived(kafka_bootstrap, tmp_path):
    """The broker takes any timestamp; one before the year 1 failed the archive job
    with an OverflowError traceback, and the topic could never be archived."""
    from onceflow.io.kafka.config import KafkaTopic
    from onceflow_dev import devstack

    topic = KafkaTopic(kafka_bootstrap, f"t-{time.monotonic_ns()}")
    devstack.create_topic(topic.topic, partitions=1, config={  # future timestamps too (the default: an hour ahead)
        "retention.ms": "-1", "message.timestamp.after.max.ms": str(2**63 - 1)})
    lines = sample_lines()[:3]
    produce(topic, [(0, lines[0], BASE_MS), (0, lines[1], -62_135_596_800_001), (0, lines[2], 253_402_300_800_000)])
    folder = tmp_path / "archive"
    assert archive.run([f"--input={topic.url}", f"--output={folder}"]) == 3
    contract = EventContract(time_field="event_time", key_fields=("store",), id_field="order_id")
    with beam.Pipeline() as pipeline:
        read = pipeline | ReadArchive(str(folder), contract) | beam.Map(lambda r: (r.source["offset"], r.value))
        assert_that(read, read_exactly([(offset, line) for offset, line in enumerate(lines)]))


def test_an_archive_run_that_would_leave_offsets_out_is_refused(kafka_bootstrap, tmp_path, capsys):
    """An archive topped up after retention took records it had not read, or from
    a later offset than it ended at, held a hole that the archive job and a job
    reading the archive both passed over in silence (696 of 800 records read)."""
    from tests.io.test_kafka_ranges import _delete_records

    topic = new_topic(kafka_bootstrap, partitions=1)
    lines = sample_lines()
    produce(topic, [(0, line, BASE_MS + n * 1_000) for n, line in enumerate(lines[:100])])
    folder = tmp_path / "archive"
    flags = [f"--input={topic.url}", f"--output={folder}"]
    assert archive.main(flags) == 0
    produce(topic, [(0, line, BASE_MS + (100 + n) * 1_000) for n, line in enumerate(lines[100:200])])
    capsys.readouterr()
    assert archive.main([*flags, "--from=offsets:0=150"]) == 2
    assert ("leaves offsets 100-149 out of the archive, which a job reading it would take for the whole topic; "
            "start where the archive ends (--from offsets:0=100) or earlier") in capsys.readouterr().err
    _delete_records(topic, {0: 150})
    assert archive.main(flags) == 2
    assert "they were deleted by retention before an archive run read them: pass --allow_retention_gaps" \
        in capsys.readouterr().err
    assert archive.main([*flags, "--allow_retention_gaps"]) == 0
    assert "partition 0 offsets 100-149 were deleted by retention" in capsys.readouterr().err
    read = run_job(f"--input={folder}", f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl")
    assert read.returncode == 0, read.stderr
    assert f"warning: the archive {folder} lacks records: topic {topic.topic} partition 0 offsets 100-149" \
        in read.stderr
    assert archive.main(flags) == 0  # the same range again: nothing new is left out


def test_a_topic_deleted_and_created_again_is_not_archived_into_the_old_ones_folder(kafka_bootstrap, tmp_path,
                                                                                     capsys):
    """The new topic's offsets start over: archived into the same folder, a read of
    it took 100 old records for new ones at the same offsets."""
    topic = new_topic(kafka_bootstrap, partitions=1)
    produce(topic, [(0, line, BASE_MS) for line in sample_lines()[:10]])
    folder = tmp_path / "archive"
    assert archive.main([f"--input={topic.url}", f"--output={folder}"]) == 0
    recreate_topic(topic)
    produce(topic, [(0, line, BASE_MS) for line in sample_lines()[10:20]])
    capsys.readouterr()
    assert archive.main([f"--input={topic.url}", f"--output={folder}"]) == 2
    assert "the topic was deleted and created again, and its offsets started over" in capsys.readouterr().err


def test_an_offset_archived_twice_with_different_records_fails_the_read(tmp_path):
    from onceflow.io.archive import encode_file, file_name, merged_rows

    def row(value):
        return {"topic": "t", "partition": 0, "offset": 0, "timestamp_ms": BASE_MS, "key": None, "headers": [],
                "value": value}
    paths = []
    for hour, value in (("2026-11-02T09", b"old"), ("2026-11-02T10", b"new")):
        name = file_name("t", hour, 0, 0, 0, "avro")
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / name).write_bytes(encode_file([row(value)], "avro", name))
        paths.append(str(tmp_path / name))
    assert [r["value"] for r in merged_rows(paths[:1] * 2)] == [b"old"]  # the same record twice: kept once
    with pytest.raises(ValueError, match="partition 0 offset 0 of t is archived twice with different records"):
        list(merged_rows(paths))


@pytest.mark.parametrize("content", ["", '{"format": "avro", "runs": [[', "[]"], ids=["empty", "cut", "a-list"])
def test_a_damaged_manifest_is_one_line_for_both_jobs(kafka_bootstrap, tmp_path, capsys, content):
    """A damaged manifest passed for one written before runs were recorded: every
    check was off (20,242 of 20,300 records read, exit 0), and the next archive run
    replaced the list of finished runs by its own."""
    topic = new_topic(kafka_bootstrap, partitions=1)
    produce(topic, [(0, line, BASE_MS) for line in sample_lines()[:10]])
    folder = tmp_path / "archive"
    assert archive.main([f"--input={topic.url}", f"--output={folder}"]) == 0
    (folder / "onceflow-archive.json").write_text(content)
    read = run_job(f"--input={folder}", f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl")
    assert_one_usage_line(read, "the archive's manifest is damaged")
    capsys.readouterr()
    assert archive.main([f"--input={topic.url}", f"--output={folder}"]) == 2
    assert "the archive's manifest is damaged" in capsys.readouterr().err
    assert (folder / "onceflow-archive.json").read_text() == content


def test_the_archive_jobs_help_lists_only_its_own_flags(capsys):
    """It listed eight flags it refuses, and --input's default, the bundled sample of
    files, which it refuses too."""
    assert archive.main(["--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "--output" in shown and "--allow_retention_gaps" in shown and "kafka://HOST:PORT/TOPIC. Required" in shown
    for refused in ("--kafka_group", "--input_format", "--kafka_time_source", "--window", "bundled sample"):
        assert refused not in shown
    # --from/--to said what they do in the aggregate job (a live job's first start, a backfill).
    assert "live job" not in shown and "backfill" not in shown and "top an archive up" in shown
