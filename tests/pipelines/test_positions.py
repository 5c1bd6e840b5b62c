"""A live job resumes from the positions stored with its rows, not from the
group's committed offsets; sinks that cannot keep positions are refused for live
jobs; the retired rewind flag says what replaced it."""

import signal

import pytest
from confluent_kafka import Consumer, TopicPartition

from onceflow.errors import UsageError
from onceflow.io.progress import Position
from onceflow.io.sqlite import SqliteProgress
from onceflow.pipelines.aggregate import run
from tests.livejob import (
    counted_events, job_output, new_topic, produce, sample_lines, start_live_job, stop, table_rows, wait_for,
)

LIVE = ["--input=kafka://127.0.0.1:9/orders", "--kafka_group=g"]


@pytest.mark.parametrize("sink, which", [("kafka://127.0.0.1:9/rows", "kafka:// sinks"),
                                         ("bigquery://my-project.d.t?method=cdc", "bigquery:// sinks with ?method=cdc")])
def test_a_live_job_refuses_a_sink_that_cannot_keep_its_positions(sink, which):
    with pytest.raises(UsageError) as refused:
        run([*LIVE, f"--sink={sink}"])
    message = str(refused.value)
    assert message.startswith(f"--sink: a live job keeps its Kafka positions with its rows, and {which} cannot")
    assert "sqlite:///PATH.db" in message and "file:///DIR" in message and "bigquery://PROJECT.DATASET.TABLE?method" \
        "=merge" in message and "--from/--to" in message


def test_the_retired_rewind_flag_says_what_replaced_it():
    with pytest.raises(UsageError, match="--kafka_rewind_margin: no longer used: a live job resumes from the "
                                         "positions it stores with its rows"):
        run([*LIVE, "--kafka_rewind_margin=5m"])


@pytest.mark.kafka
@pytest.mark.prism
@pytest.mark.slow
def test_stored_positions_decide_where_a_live_job_resumes_not_committed_offsets(kafka_bootstrap, prism_path,
                                                                               tmp_path):
    """The group has committed the end of every partition, but the positions stored
    with the rows say offset 0 (as a job killed before its first window was final
    leaves them): the job reads everything again and the table ends complete."""
    topic = new_topic(kafka_bootstrap)
    lines = sample_lines()
    produce(topic, [(n % 3, line, None) for n, line in enumerate(lines)])
    backfill_db, live_db = tmp_path / "backfill.db", tmp_path / "live.db"
    run([f"--input={topic.url}", "--from=earliest", "--to=latest", "--status=off",
         f"--sink=sqlite:///{backfill_db}", f"--dlq={tmp_path}/backfill-dlq.jsonl"])
    group = f"g-{topic.topic}"
    committer = Consumer({"bootstrap.servers": topic.bootstrap_servers, "group.id": group})
    ends = [committer.get_watermark_offsets(TopicPartition(topic.topic, p), timeout=10)[1] for p in range(3)]
    committer.commit(offsets=[TopicPartition(topic.topic, p, end) for p, end in enumerate(ends)], asynchronous=False)
    committer.close()
    SqliteProgress(str(live_db), "aggregates").write(group, [Position(topic.topic, p, 0, None) for p in range(3)])

    job = start_live_job(topic, group, f"sqlite:///{live_db}", tmp_path / "live-dlq.jsonl", "--kafka_idle_timeout=3s")
    try:
        wait_for(lambda: counted_events(live_db) == counted_events(backfill_db), "the live table to be complete",
                 300, job)
    finally:
        stop(job, signal.SIGINT)
    assert "resuming from the positions stored with the rows (partition@offset: 0@0, 1@0, 2@0)" in job_output(job, 100_000)
    assert table_rows(live_db) == table_rows(backfill_db)


@pytest.mark.kafka
@pytest.mark.prism
@pytest.mark.slow
def test_a_first_start_stores_its_start_positions_before_it_reads(kafka_bootstrap, prism_path, tmp_path):
    """Killed before it wrote any row, a job that started from the group's
    committed offsets resumes from them, not from wherever the group got to."""
    topic = new_topic(kafka_bootstrap)
    lines = sample_lines()
    produce(topic, [(n % 3, line, None) for n, line in enumerate(lines)])
    group = f"g-{topic.topic}"
    committer = Consumer({"bootstrap.servers": topic.bootstrap_servers, "group.id": group})
    committer.commit(offsets=[TopicPartition(topic.topic, p, 100) for p in range(3)], asynchronous=False)
    committer.close()
    db = tmp_path / "live.db"
    job = start_live_job(topic, group, f"sqlite:///{db}", tmp_path / "dlq.jsonl", "--kafka_idle_timeout=3s")
    try:
        wait_for(lambda: "first start on this sink" in job_output(job, 100_000), "the job to store its start", 120, job)
    finally:
        stop(job)
    stored = SqliteProgress(str(db), "aggregates").read(group, topic.topic)
    assert {p: (s.next_offset, s.high_water_ms) for p, s in stored.items()} == {0: (100, None), 1: (100, None),
                                                                                2: (100, None)}


@pytest.mark.kafka
def test_reads_start_at_the_stored_positions_and_an_unstored_partition_at_its_log_start(kafka_bootstrap):
    from onceflow.io.kafka.admin import resolve_partition_reads
    from onceflow.io.kafka.config import COMMITTED, KafkaReadConfig

    topic = new_topic(kafka_bootstrap)
    produce(topic, [(n % 3, b'{"x": 1}', None) for n in range(30)])
    group = f"g-{topic.topic}"
    committer = Consumer({"bootstrap.servers": topic.bootstrap_servers, "group.id": group})
    committer.commit(offsets=[TopicPartition(topic.topic, p, 9) for p in range(3)], asynchronous=False)
    committer.close()
    config = KafkaReadConfig(topic, start=COMMITTED, group_id=group, resume=((0, 5, 123),))
    reads = resolve_partition_reads(config, [0, 1, 2])
    assert [(r.partition, r.start_offset, r.high_water_ms) for r in reads] == [(0, 5, 123), (1, 0, None), (2, 0, None)]
