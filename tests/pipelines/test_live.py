"""The main job live: killed and restarted mid-stream, and on Flink."""

import datetime
import json
import random
import signal
import time

import pytest

from onceflow.options import SAMPLE_INPUT
from onceflow.pipelines.aggregate import run
from tests.livejob import (
    committed, counted_events, new_topic, produce, producer_for, start_live_job, stop, table_rows, wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
WINDOW_MS = 10_000


@pytest.mark.prism
def test_sigkill_mid_stream_then_restart_ends_with_the_true_table(kafka_bootstrap, prism_path, tmp_path):
    """Events produced in real time; the job is killed with SIGKILL while windows are
    open (their state lives only in the runner's memory) and started again: the
    table ends equal to the aggregates computed here from what was produced."""
    topic = new_topic(kafka_bootstrap)
    group = f"g-{topic.topic}"
    db, dlq = tmp_path / "live.db", tmp_path / "dlq.jsonl"
    flags = ("--key_fields=k", "--time_field=t", "--id_field=id", "--aggregate=count,sum:v", "--window=10s",
             "--allowed_lateness=10s", "--kafka_idle_timeout=3s", "--kafka_rewind_margin=5s")
    rng = random.Random(5)
    truth = {}
    producer = producer_for(topic)
    job = start_live_job(topic, group, f"sqlite:///{db}", dlq, *flags)
    produced = 0
    try:
        for n in range(400):
            if n == 200:  # kill it mid-stream, once some windows are written and others open
                wait_for(lambda: counted_events(db) > 0, "the first rows", 120, job)
                stop(job)
                job = start_live_job(topic, group, f"sqlite:///{db}", dlq, *flags)
            now = int(time.time() * 1000)
            key, value = rng.choice("abc"), rng.randint(1, 9)
            produce(topic, [(n % 3, json.dumps({"id": str(n), "t": now, "k": key, "v": value}).encode(), now)],
                    producer)
            start = now - now % WINDOW_MS
            count, total = truth.get((key, start), (0, 0))
            truth[(key, start)] = (count + 1, total + value)
            produced += 1
            time.sleep(0.05)
        wait_for(lambda: counted_events(db) == produced, f"all {produced} events in the sink", 180, job)
        time.sleep(4)  # anything counted twice would show now
    finally:
        stop(job)
    rows = {(dict(r)["k"], dict(r)["window_start"]): dict(r) for r in table_rows(db)}
    found = {(k, round(datetime.datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp() * 1000)):
             (row["count"], row["sum_v"]) for (k, start), row in rows.items()}
    assert found == truth


@pytest.mark.flink
def test_live_run_on_flink_gives_the_same_table_as_a_backfill(kafka_bootstrap, flink_job_endpoint, tmp_path):
    topic = new_topic(kafka_bootstrap)
    lines = [line for line in open(SAMPLE_INPUT, "rb").read().split(b"\n") if line.strip()]
    produce(topic, [(n % 3, line, None) for n, line in enumerate(lines)])
    backfill_db, live_db = tmp_path / "backfill.db", tmp_path / "live.db"
    run([f"--input={topic.url}", "--from=earliest", "--to=latest", f"--sink=sqlite:///{backfill_db}",
         f"--dlq={tmp_path}/backfill-dlq.jsonl"])
    expected_events = counted_events(backfill_db)
    job = start_live_job(topic, f"g-{topic.topic}", f"sqlite:///{live_db}", tmp_path / "live-dlq.jsonl",
                         "--runner=PortableRunner", f"--job_endpoint={flink_job_endpoint}",
                         "--environment_type=LOOPBACK", "--streaming", "--checkpointing_interval=2000",
                         "--kafka_idle_timeout=3s")
    try:
        wait_for(lambda: counted_events(live_db) == expected_events, "the live table to catch up", 300, job)
        wait_for(lambda: sum(committed(topic, f"g-{topic.topic}")) == len(lines), "offsets committed on Flink",
                 120, job)
    finally:
        stop(job, signal.SIGTERM)
    assert table_rows(live_db) == table_rows(backfill_db)
