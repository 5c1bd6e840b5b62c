"""Helpers for tests that run the main job live against the local broker."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid

from confluent_kafka import Producer

from onceflow_dev import devstack
from onceflow.io.kafka.admin import committed_offsets, new_consumer
from onceflow.io.kafka.config import KafkaReadConfig, KafkaTopic
from onceflow.options import SAMPLE_INPUT


def new_topic(bootstrap, partitions=3):
    """A fresh topic that keeps its records whatever their Kafka timestamps: the
    tests produce fixed timestamps of early November 2026, and with the broker's
    default retention (7 days, checked every 5 minutes) a check between producing
    and reading deleted them (a backfill then refused a "retention gap")."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    devstack.create_topic(name, partitions=partitions, config={"retention.ms": "-1"})
    return KafkaTopic(bootstrap, name)


def recreate_topic(topic, partitions=1):
    """Deletes ``topic`` and creates it again under the same name (a new Kafka
    topic ID, offsets from 0), waiting for the broker to finish the deletion."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": topic.bootstrap_servers})  # kept alive until the future resolves
    admin.delete_topics([topic.topic])[topic.topic].result(30)
    deadline = time.monotonic() + 60
    while True:  # the broker finishes a deletion in the background
        try:
            if devstack.create_topic(topic.topic, partitions=partitions, config={"retention.ms": "-1"}):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


def sample_lines():
    """The bundled sample's non-empty lines, as bytes."""
    with open(SAMPLE_INPUT, "rb") as sample:
        return [line for line in sample.read().split(b"\n") if line.strip()]


def producer_for(topic):
    return Producer({"bootstrap.servers": topic.bootstrap_servers, "enable.idempotence": True})


def produce(topic, records, producer=None):
    """records: (partition, value, timestamp_ms or None); flushed before returning."""
    producer = producer or producer_for(topic)
    for partition, value, timestamp in records:
        kwargs = {"timestamp": timestamp} if timestamp is not None else {}
        producer.produce(topic.topic, value=value, key=value[:4], partition=partition,
                         headers=[("h", b"x")], **kwargs)
    assert producer.flush(30) == 0


def start_live_job(topic, group, sink, dlq, *flags, log_dir=None):
    """The main job reading ``topic`` live, in its own process group; its output goes
    to a log file beside the DLQ, or in ``log_dir`` (for a kafka:// DLQ) (a pipe
    nobody reads would fill and block the job)."""
    log_path = f"{dlq if log_dir is None else os.path.join(log_dir, 'job')}.{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "onceflow.pipelines.aggregate", f"--input={topic.url}", f"--kafka_group={group}",
             f"--sink={sink}", f"--dlq={dlq}", *flags],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
            start_new_session=True)
    job.log_path = log_path
    return job


def job_output(job, limit=3000):
    """The last ``limit`` characters the job printed."""
    with open(job.log_path, "rb") as log:
        return log.read().decode(errors="replace")[-limit:]


def counted_events(db, table="aggregates"):
    try:
        with sqlite3.connect(db) as connection:
            return connection.execute(f'SELECT COALESCE(SUM(event_count), 0) FROM "{table}"').fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def table_rows(db, table="aggregates"):
    """Every row without the wall-clock written_at column, sorted."""
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        return sorted(tuple((k, r[k]) for k in r.keys() if k != "written_at")
                      for r in connection.execute(f'SELECT * FROM "{table}"'))


def committed(topic, group, partitions=3):
    """The group's committed offset of each partition (0 where it has none)."""
    consumer = new_consumer(KafkaReadConfig(topic, group_id=group), "test")
    try:
        found = committed_offsets(consumer, topic.topic, range(partitions), timeout_s=10)
    finally:
        consumer.close()
    return [found.get(p, 0) for p in range(partitions)]


def wait_for(condition, what, deadline_s, job=None):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if condition():
            return
        if job is not None and job.poll() is not None:
            raise AssertionError(f"the live job exited while waiting for {what}: {job_output(job)}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}" + (f": {job_output(job)}{job_stacks(job)}"
                                                            if job is not None else ""))


def job_stacks(job):
    """The stacks of the running job's threads (``kill -USR1`` makes the job print
    them), to see what a job that makes no progress waits for; empty once it has ended."""
    if job.poll() is not None:
        return ""
    with open(job.log_path, "rb") as log:
        printed = len(log.read())
    os.kill(job.pid, signal.SIGUSR1)
    time.sleep(2)
    with open(job.log_path, "rb") as log:
        log.seek(printed)
        return "\nthe job's threads:\n" + log.read().decode(errors="replace")[-20_000:]


def stop(job, sig=signal.SIGKILL):
    """Stops the job's whole process group (the job and the runner it started);
    SIGKILL after 60 s if a gentler signal did not end it."""
    try:
        os.killpg(job.pid, sig)
        job.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(60)
    except ProcessLookupError:
        pass


def _proc_stat(pid):
    """(state, parent pid) of a process from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def process_alive(pid):
    """Whether ``pid`` runs (a zombie, ended but not reaped, does not)."""
    found = _proc_stat(pid)
    return found is not None and found[0] != "Z"


def child_processes(pid):
    """The pids of the live processes whose parent is ``pid``."""
    found = {int(entry): _proc_stat(entry) for entry in os.listdir("/proc") if entry.isdigit()}
    return [child for child, stat in found.items() if stat is not None and stat[1] == pid and stat[0] != "Z"]
