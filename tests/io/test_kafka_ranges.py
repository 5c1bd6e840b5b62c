"""Backfills of part of a topic, on the real broker: the lateness rule's high water
at the start of a range, and ranges that retention has deleted."""

import json

import pytest

from onceflow.io.dlq import parse_dlq_target, read_dead_letters_from
from tests.livejob import new_topic, produce

pytestmark = pytest.mark.kafka

BASE = 1_793_610_000_000  # event times and Kafka timestamps start here
FLAGS = ["--key_fields=k", "--time_field=t", "--id_field=id", "--aggregate=count,sum:v", "--window=1m",
         "--allowed_lateness=5m"]


def _event(partition, n, t):
    return json.dumps({"id": f"{partition}-{n}", "t": t, "k": f"k{n % 4}", "v": n}).encode()


def _stream_with_late_events():
    """Per partition, 60 records 30 s of event time apart; records 20, 21, 22 and
    45 carry an event time 10 minutes behind the records before them (more than a
    1 m window + 5 m lateness): too late for a reader that saw those records. Kafka
    timestamps rise by 1 s a record, so a timestamp start lands on an offset."""
    records = []
    for partition in range(3):
        for n in range(60):
            t = BASE + 30_000 * n
            if n in (20, 21, 22, 45):
                t -= 600_000
            records.append((partition, _event(partition, n, t), BASE + 1000 * n))
    return records


def _dead_letters(dlq):
    return {(e["source"]["partition"], e["source"]["offset"], e["reason"])
            for e in read_dead_letters_from(parse_dlq_target(str(dlq)))}


def _backfill(topic, tmp_path, name, *flags):
    from onceflow.pipelines.aggregate import run

    dlq = tmp_path / f"{name}.jsonl"
    summary = run([f"--input={topic.url}", f"--sink=sqlite:///{tmp_path}/{name}.db", f"--dlq={dlq}",
                   "--status=off", *FLAGS, *flags])
    return summary, _dead_letters(dlq)


@pytest.mark.slow
def test_a_backfill_of_a_middle_range_refuses_exactly_what_the_whole_read_refused(kafka_bootstrap, tmp_path):
    topic = new_topic(kafka_bootstrap)
    produce(topic, _stream_with_late_events())
    _, whole = _backfill(topic, tmp_path, "whole", "--from=earliest", "--to=latest")
    assert {(p, o) for p, o, reason in whole if reason == "too_late"} == {
        (p, o) for p in range(3) for o in (20, 21, 22, 45)}

    by_offsets, middle = _backfill(topic, tmp_path, "offsets", "--from=offsets:0=20,1=20,2=20",
                                   "--to=offsets:0=50,1=50,2=50")
    assert by_offsets.count("records_read") == 90  # the records before the start are neither emitted nor counted
    assert middle == {letter for letter in whole if 20 <= letter[1] < 50}

    by_time, from_time = _backfill(topic, tmp_path, "timestamp", f"--from={BASE + 20_000}", "--to=latest")
    assert by_time.count("records_read") == 120
    assert from_time == {letter for letter in whole if letter[1] >= 20}


# -- ranges deleted by retention ---------------------------------------------------------


def _delete_records(topic, before):
    """Deletes each partition's records below ``before[partition]`` (what retention does)."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": topic.bootstrap_servers})  # kept alive until the futures resolve
    futures = admin.delete_records([TopicPartition(topic.topic, p, o) for p, o in before.items()])
    for future in futures.values():
        future.result(30)


def _run_job(topic, tmp_path, *flags):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "onceflow.pipelines.aggregate", f"--input={topic.url}",
         f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl", "--status=off", *FLAGS, *flags],
        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_backfill_over_records_deleted_by_retention_says_so_and_fails_unless_allowed(kafka_bootstrap, tmp_path):
    topic = new_topic(kafka_bootstrap)
    produce(topic, [(n % 3, _event(n % 3, n, BASE + 1000 * n), None) for n in range(3000)])
    _delete_records(topic, {0: 500, 1: 500, 2: 500})

    refused = _run_job(topic, tmp_path, "--from=offsets:0=0,1=0,2=0", "--to=latest")
    assert refused.returncode == 1, refused.stderr[-2000:]
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert lines == [
        f"aggregate: --from/--to: topic {topic.topic}: 1,500 records lost to retention (partition 0 offsets 0-499: "
        "500 records; partition 1 offsets 0-499: 500 records; partition 2 offsets 0-499: 500 records); "
        "pass --allow_retention_gaps to read what is left, or start later"]

    # A range wholly deleted is refused too, naming only what it asked for.
    refused = _run_job(topic, tmp_path, "--from=offsets:0=100,1=0,2=0", "--to=offsets:0=300,1=0,2=0")
    assert refused.returncode == 1
    assert "200 records lost to retention (partition 0 offsets 100-299: 200 records)" in refused.stderr

    allowed = _run_job(topic, tmp_path, "--from=offsets:0=0,1=0,2=0", "--to=latest", "--allow_retention_gaps")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "records read            1,500" in allowed.stdout
    assert "lost to retention       1,500" in allowed.stdout
    assert "1,500 records lost to retention" in allowed.stderr


def _read_until_done(reader, restriction, deadline_s=30):
    """Runs the reader's bundles as a runner would until the restriction is done;
    fails when it is still reading after ``deadline_s``."""
    import time

    from tests.io.test_kafka_source import _read_bundle

    read, residual = [], restriction
    deadline = time.monotonic() + deadline_s
    while residual is not None:
        assert time.monotonic() < deadline, f"the bounded read still waits after {deadline_s}s (read {len(read)})"
        more, residual = _read_bundle(reader, residual)
        read += more
    return read


@pytest.mark.parametrize("deleted_up_to", [60, 100])
def test_records_deleted_after_the_range_was_resolved_are_reported_not_waited_for(kafka_bootstrap, deleted_up_to):
    """Retention deletes the start of a bounded range after its offsets were resolved
    (a topic emptied by time retention while the backfill starts): the reader used
    to be reset to the log end and wait for offsets that no longer exist, forever."""
    from onceflow import metrics
    from onceflow.io.kafka.config import KafkaReadConfig, parse_position
    from onceflow.io.kafka.read import PartitionSpan, PartitionsRestriction, RetentionGapError, _ReadPartitionsDoFn
    from tests.io.test_kafka_source import CONTRACT

    topic = new_topic(kafka_bootstrap, partitions=1)
    produce(topic, [(0, _event(0, n, BASE + 1000 * n), None) for n in range(100)])
    restriction = PartitionsRestriction(topic.topic, (PartitionSpan(0, 10, 100),))  # resolved before the deletion
    _delete_records(topic, {0: deleted_up_to})

    for allow in (False, True):
        config = KafkaReadConfig(topic, start=parse_position("earliest"), stop=parse_position("latest"),
                                 allow_retention_gaps=allow)
        reader = _ReadPartitionsDoFn(config, CONTRACT, idle_timeout_s=30.0)
        reader.setup()
        try:
            if not allow:
                with pytest.raises(RetentionGapError, match=f"{deleted_up_to - 10} records lost to retention "
                                                            f"\\(partition 0 offsets 10-{deleted_up_to - 1}"):
                    _read_until_done(reader, restriction)
                continue
            before = metrics.local_snapshot()[0].get(metrics.RETENTION_GAP_RECORDS, 0)
            read = _read_until_done(reader, restriction)
            assert read == [(0, offset) for offset in range(deleted_up_to, 100)]
            assert metrics.local_snapshot()[0][metrics.RETENTION_GAP_RECORDS] - before == deleted_up_to - 10
        finally:
            reader.teardown()


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(url):
    """(status, body text) of a GET; an HTTP error status is an answer too."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.prism
@pytest.mark.slow
def test_a_live_job_whose_committed_offsets_were_deleted_reports_the_gap_and_turns_unhealthy(
        kafka_bootstrap, prism_path, tmp_path):
    from confluent_kafka import Consumer, TopicPartition

    from tests.livejob import counted_events, job_output, start_live_job, stop, wait_for

    topic = new_topic(kafka_bootstrap)
    group = f"g-{topic.topic}"
    produce(topic, [(n % 3, _event(n % 3, n, BASE + 1000 * n), None) for n in range(300)])
    committer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    committer.commit(offsets=[TopicPartition(topic.topic, p, 0) for p in range(3)], asynchronous=False)
    committer.close()
    _delete_records(topic, {0: 40, 1: 40, 2: 100})  # the job's resume positions are gone; partition 2 whole

    port = free_port()
    db = tmp_path / "live.db"
    job = start_live_job(topic, group, f"sqlite:///{db}", tmp_path / "dlq.jsonl", *FLAGS,
                         "--kafka_idle_timeout=2s", f"--health_port={port}", "--status=off")
    try:
        def unhealthy():
            try:
                status, body = http_get(f"http://127.0.0.1:{port}/healthz")
            except OSError:
                return False
            return status == 503 and json.loads(body)["checks"]["retention_gap_records"]["value"] == 180

        wait_for(unhealthy, "/healthz to report the 180 records lost to retention", 180, job)
        status, body = http_get(f"http://127.0.0.1:{port}/healthz")
        report = json.loads(body)
        assert report["status"] == "unhealthy"
        assert report["checks"]["retention_gap_records"] == {"value": 180, "max": 0, "ok": False}
        _, exposition = http_get(f"http://127.0.0.1:{port}/metrics")
        assert "onceflow_retention_gap_records_total 180.0" in exposition
        assert "onceflow_healthy 0.0" in exposition
        assert f"topic {topic.topic}: 180 records lost to retention (partition 0 offsets 0-39: 40 records; " \
               in job_output(job, 100_000)
        wait_for(lambda: counted_events(db) == 120, "the 120 records left in the sink", 180, job)
    finally:
        stop(job)
    # Reported once: the empty partition's stored position stayed at the deleted offset 0, and each
    # restart reported its 100 records again.
    job = start_live_job(topic, group, f"sqlite:///{db}", tmp_path / "dlq.jsonl", *FLAGS,
                         "--kafka_idle_timeout=2s", "--status=off")
    try:
        wait_for(lambda: "resuming from the positions stored" in job_output(job, 100_000), "the restart", 120, job)
    finally:
        stop(job)
    assert "lost to retention" not in job_output(job, 100_000)


def test_a_range_naming_a_partition_the_topic_lacks_is_refused(kafka_bootstrap, tmp_path):
    """It read nothing there, silently (a typo in a partition number)."""
    from onceflow.pipelines import archive

    topic = new_topic(kafka_bootstrap)
    refused = _run_job(topic, tmp_path, "--from=offsets:0=0,5=0", "--to=latest")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert [line for line in refused.stderr.splitlines() if line.strip()] == [
        f"aggregate: error: --from: topic {topic.topic} has no partition 5 (its partitions: 0, 1, 2)"]
    assert archive.main([f"--input={topic.url}", f"--output={tmp_path}/archive", "--to=offsets:7=1"]) == 2


def test_partitions_an_offsets_stop_leaves_out_are_named_and_a_start_there_is_refused(kafka_bootstrap, tmp_path):
    """`--to offsets:` reads only the partitions it names: that was said nowhere
    (the summary even showed "lag 0 over 3 partitions"), a --from that named a
    partition --to left out read nothing from it, and a partition named twice took
    the last offset given."""
    topic = new_topic(kafka_bootstrap)
    produce(topic, [(n % 3, _event(n % 3, n, BASE + 1000 * n), None) for n in range(30)])

    ran = _run_job(topic, tmp_path, "--from=earliest", "--to=offsets:0=4")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert f"aggregate: note: --to offsets: does not name partitions 1, 2 of {topic.topic}: not read" in ran.stderr
    assert "records read                4" in ran.stdout, ran.stdout

    refused = _run_job(topic, tmp_path, "--from=offsets:0=5", "--to=offsets:1=2")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert [line for line in refused.stderr.splitlines() if line.strip()] == [
        "aggregate: error: --from names partition 0, which --to offsets: does not: a partition --to leaves out is "
        "not read; name it there too (offsets:0=OFFSET), or stop at latest or a time"]

    twice = _run_job(topic, tmp_path, "--from=offsets:0=1,0=2", "--to=latest")
    assert twice.returncode == 2
    assert "--from: 'offsets:0=1,0=2' names partition 0 twice; give each partition once" in twice.stderr


def test_offsets_past_a_partitions_end_are_noted(kafka_bootstrap, tmp_path):
    """A --to past the end read to the end, and a --from past it read nothing of the
    partition, both without a word."""
    topic = new_topic(kafka_bootstrap)
    produce(topic, [(n % 3, _event(n % 3, n, BASE + 1000 * n), None) for n in range(30)])  # 10 a partition

    for flags, note, read in [
        (("--from=earliest", "--to=offsets:0=99,1=5,2=10"),
         f"--to offsets: partition 0 of {topic.topic} ends at offset 10, before the 99 asked: read to its end", 25),
        (("--from=offsets:0=0,1=50,2=3", "--to=latest"),
         f"--from offsets: partition 1 of {topic.topic} ends at offset 10, before the 50 asked: nothing of it is "
         "read", 17),
    ]:
        ran = _run_job(topic, tmp_path, *flags)
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert [line for line in ran.stderr.splitlines() if "note:" in line] == [f"aggregate: note: {note}"]
        assert f"records read               {read}" in ran.stdout, ran.stdout
