"""The main job live: killed and restarted mid-stream, and on Flink."""

import base64
import dataclasses
import datetime
import json
import os
import random
import re
import signal
import sqlite3
import time
import uuid

import pytest

from onceflow_dev.devstack.flink import cancel_running_jobs, streaming_job_flags
from onceflow.pipelines.aggregate import run
from tests.livejob import (
    child_processes, committed, counted_events, job_output, job_stacks, new_topic, process_alive, produce,
    producer_for, recreate_topic, sample_lines, start_live_job, stop, table_rows, wait_for,
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
             "--allowed_lateness=10s", "--kafka_idle_timeout=3s")
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


def _runner_flags(runner, request):
    if runner == "prism":
        request.getfixturevalue("prism_path")
        return ()
    endpoint = request.getfixturevalue("flink_job_endpoint")
    cancel_running_jobs(endpoint)
    return streaming_job_flags(endpoint)


WORKER_PROCESSES = ("--loopback_worker_processes=2", "--parallelism=2", "--kafka_readers=2")


@pytest.mark.parametrize("runner, extra", [
    pytest.param("prism", (), marks=pytest.mark.prism),
    pytest.param("flink", (), marks=pytest.mark.flink),
    pytest.param("flink", WORKER_PROCESSES, marks=pytest.mark.flink, id="flink-worker-processes"),
])
def test_live_run_equals_a_backfill_and_a_backfill_changes_nothing(kafka_bootstrap, tmp_path, runner, extra, request):
    """The sample (duplicates, late, malformed records) produced to 3 partitions:
    live until caught up into one table, a backfill over the same period into a
    second: identical (written_at aside); the backfill into the live table changes
    nothing."""
    topic = new_topic(kafka_bootstrap)
    lines = sample_lines()
    produce(topic, [(n % 3, line, None) for n, line in enumerate(lines)])
    backfill_db, live_db = tmp_path / "backfill.db", tmp_path / "live.db"
    backfill = [f"--input={topic.url}", "--from=earliest", "--to=latest", "--status=off"]
    run([*backfill, f"--sink=sqlite:///{backfill_db}", f"--dlq={tmp_path}/backfill-dlq.jsonl"])
    expected_events = counted_events(backfill_db)
    group = f"g-{topic.topic}"
    job = start_live_job(topic, group, f"sqlite:///{live_db}", tmp_path / "live-dlq.jsonl",
                         "--kafka_idle_timeout=3s", *_runner_flags(runner, request), *extra)
    try:
        wait_for(lambda: counted_events(live_db) == expected_events, "the live table to catch up", 300, job)
        wait_for(lambda: sum(committed(topic, group)) == len(lines), "offsets committed", 120, job)
    finally:
        # SIGINT: the job cancels its pipeline, which frees the runner's slots for the next test.
        stop(job, signal.SIGINT)
    live_rows = table_rows(live_db)
    assert live_rows == table_rows(backfill_db)
    if not extra:
        # SIGINT to the group, as a terminal's Ctrl-C: the job cancels its pipeline and
        # sums up every record (Prism does not stop on it; Beam's own SIGINT handler used
        # to stop it first, and the job ended in a traceback). Neither runner reports
        # figures for a cancelled job: the summary counts what ran in the job's process
        # (not with worker processes: they are other processes).
        output = job_output(job)
        assert job.returncode == 0, output
        read = re.search(r"^  records read\s+([\d,]+)", output, re.MULTILINE)
        assert read and int(read.group(1).replace(",", "")) == len(lines), output
        assert "note: the runner gave no figures once the job stopped" in output
        assert "Traceback" not in output
    summary = run([*backfill, f"--sink=sqlite:///{live_db}", f"--dlq={tmp_path}/live-dlq.jsonl"])
    assert table_rows(live_db) == live_rows
    assert summary.count("sink_rows_stale") == 0  # equal versions rewritten, none refused, none added


@pytest.mark.flink
def test_a_killed_clients_job_does_not_keep_running_on_flink(kafka_bootstrap, flink_job_endpoint, tmp_path):
    """A supervisor that SIGKILLs a client and cancels its job leaves nothing behind
    on Flink (the 2.62 job server alone marks the job cancelled but the embedded
    Flink job goes on restarting)."""
    from onceflow_dev.devstack.flink import flink_jobs

    topic = new_topic(kafka_bootstrap)
    lines = sample_lines()
    produce(topic, [(n % 3, line, None) for n, line in enumerate(lines)])
    db = tmp_path / "live.db"
    name = f"onceflow-test-{topic.topic}"
    job = start_live_job(topic, f"g-{topic.topic}", f"sqlite:///{db}", tmp_path / "dlq.jsonl",
                         "--kafka_idle_timeout=3s", f"--job_name={name}", *streaming_job_flags(flink_job_endpoint))
    try:
        wait_for(lambda: counted_events(db) > 0, "the job to write rows", 300, job)
        assert [j.state for j in flink_jobs(name)] == ["RUNNING"]
    finally:
        stop(job, signal.SIGKILL)
    cancel_running_jobs(flink_job_endpoint, name_prefix=name)
    wait_for(lambda: all(j.finished for j in flink_jobs(name)), "the Flink job to end", 60)


@pytest.mark.prism
def test_a_runner_gone_mid_run_ends_the_job_with_one_line(kafka_bootstrap, prism_path, tmp_path):
    """Prism killed under a running job: one line naming the runner and what to do,
    exit status 1, no traceback from the job or its worker's threads (there were
    six); what was written stays."""
    job, db = _small_live_job_writing(kafka_bootstrap, tmp_path)
    try:
        prisms = [pid for pid in child_processes(job.pid) if b"prism" in _cmdline(pid)]
        assert len(prisms) == 1, job_output(job)
        os.kill(prisms[0], signal.SIGKILL)
        status = job.wait(120)
    finally:
        stop(job)
    output = job_output(job, 20_000)
    assert status == 1, output
    assert "aggregate: PrismRunner stopped answering (" in output and "run it again" in output, output
    assert "Traceback" not in output
    assert counted_events(db) > 0


@pytest.mark.prism
def test_sigusr1_prints_every_threads_stack_and_the_job_goes_on(kafka_bootstrap, prism_path, tmp_path):
    """What a live job that makes no progress waits for, without stopping it."""
    job, db = _small_live_job_writing(kafka_bootstrap, tmp_path)
    try:
        stacks = job_stacks(job)
        assert job.poll() is None, job_output(job)
        assert "Current thread" in stacks and "most recent call first" in stacks, stacks
        assert "wait_until_finish" in stacks, stacks  # the main thread waits for the runner
        assert stacks.count("Thread 0x") >= 5, stacks  # and the worker's threads
    finally:
        stop(job)


def _small_live_job_writing(kafka_bootstrap, tmp_path):
    """A live job on Prism over 300 sample records, once it has written rows: (job, its sink)."""
    topic = new_topic(kafka_bootstrap)
    produce(topic, [(n % 3, line, None) for n, line in enumerate(sample_lines()[:300])])
    db = tmp_path / "live.db"
    job = start_live_job(topic, f"g-{topic.topic}", f"sqlite:///{db}", tmp_path / "dlq.jsonl", "--status=off",
                         "--kafka_idle_timeout=3s")
    try:
        wait_for(lambda: counted_events(db) > 0, "the first rows", 120, job)
    except BaseException:
        stop(job)
        raise
    return job, db


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read()
    except OSError:
        return b""


@pytest.mark.flink
def test_worker_processes_end_with_a_killed_job_process(kafka_bootstrap, flink_job_endpoint, tmp_path):
    """With --loopback_worker_processes the SDK workers are processes of their own:
    when the job's process alone is killed (not its process group: an OOM kill),
    they end too instead of going on running the job's steps."""
    topic = new_topic(kafka_bootstrap)
    produce(topic, [(n % 3, line, None) for n, line in enumerate(sample_lines())])
    db = tmp_path / "live.db"
    name = f"onceflow-test-{topic.topic}"
    cancel_running_jobs(flink_job_endpoint)
    job = start_live_job(topic, f"g-{topic.topic}", f"sqlite:///{db}", tmp_path / "dlq.jsonl",
                         "--kafka_idle_timeout=3s", f"--job_name={name}", *streaming_job_flags(flink_job_endpoint),
                         *WORKER_PROCESSES)
    try:
        wait_for(lambda: counted_events(db) > 0, "the job to write rows", 300, job)
        workers = child_processes(job.pid)
        assert len(workers) == 2, job_output(job)
        os.kill(job.pid, signal.SIGKILL)
        job.wait(30)
        wait_for(lambda: not any(map(process_alive, workers)), "the worker processes to end", 30)
    finally:
        stop(job, signal.SIGKILL)
        cancel_running_jobs(flink_job_endpoint, name_prefix=name)



@pytest.mark.prism
def test_early_firing_writes_an_open_window_and_then_its_on_time_row(kafka_bootstrap, prism_path, tmp_path):
    """With --early_firing the sink gets a window's running row while the window is
    still open (event times in a window that ends a minute from now), then, once
    the window has closed, its final row: the same count, nothing counted twice."""
    topic = new_topic(kafka_bootstrap)
    db, dlq = tmp_path / "early.db", tmp_path / "dlq.jsonl"
    window_ms = 60_000
    now = int(time.time() * 1000)
    start = now - now % window_ms
    if start + window_ms - now < 30_000:  # leave the window open for at least 30 s
        start += window_ms
    events = [(n % 3, json.dumps({"id": str(n), "t": start + n, "k": "a", "v": 2}).encode(), now) for n in range(50)]
    produce(topic, events + events[:10])  # ten re-sends
    job = start_live_job(topic, f"g-{topic.topic}", f"sqlite:///{db}", dlq, "--key_fields=k", "--time_field=t",
                         "--id_field=id", "--aggregate=count,sum:v", "--window=1m", "--allowed_lateness=0",
                         "--early_firing=2s", "--kafka_idle_timeout=2s")
    try:
        wait_for(lambda: counted_events(db) == 50, "an early row with all 50 events", 120, job)
        assert int(time.time() * 1000) < start + window_ms, "the row came after the window closed: not early"
        wait_for(lambda: time.time() * 1000 > start + window_ms + 10_000, "the window to close", 120, job)
        time.sleep(3)
    finally:
        stop(job)
    rows = [dict(r) for r in table_rows(db)]
    assert [(r["k"], r["count"], r["sum_v"]) for r in rows] == [("a", 50, 100)]


@pytest.mark.prism
def test_sigterm_stops_a_live_job_like_ctrl_c(kafka_bootstrap, prism_path, tmp_path):
    """A supervisor's SIGTERM to the job's process: the job cancels its pipeline,
    prints the summary and exits 0, as on Ctrl-C (it used to end at once)."""
    job, db = _small_live_job_writing(kafka_bootstrap, tmp_path)
    try:
        job.send_signal(signal.SIGTERM)  # the job's own process, not its group (Prism would go too)
        status = job.wait(120)
    finally:
        stop(job)
    output = job_output(job, 20_000)
    assert status == 0, output
    assert "aggregate: stopping..." in output and "onceflow aggregate: done in" in output


@pytest.mark.prism
def test_a_live_job_refused_for_its_runner_stores_no_start(kafka_bootstrap, prism_path, tmp_path, capsys):
    """A live job refused by the runner checks had already stored its start positions
    in the sink: the next run, with other flags (here --from earliest), resumed from
    them and skipped every record before (read 0 of 46, exit 0)."""
    from onceflow.errors import UsageError
    from onceflow.io.sinks import parse_sink_url, progress_store

    topic = new_topic(kafka_bootstrap, partitions=2)
    produce(topic, [(n % 2, b'{"order_id": "o-%d", "event_time": 1793610000000, "store": "s1", "qty": 1}' % n, None)
                    for n in range(10)])
    sink = f"sqlite:///{tmp_path}/out.db"
    flags = [f"--input={topic.url}", "--kafka_group=refused", f"--sink={sink}", f"--dlq={tmp_path}/dlq.jsonl"]
    with pytest.raises(UsageError, match="--kafka_readers: Prism"):
        run([*flags, "--from=latest", "--kafka_readers=2", f"--prism_location={prism_path}"])
    assert progress_store(parse_sink_url(sink)).read("refused", topic.topic) == {}


@pytest.mark.kafka
def test_a_live_job_resumes_only_under_the_flags_its_positions_were_kept_under(kafka_bootstrap, tmp_path):
    """Positions say which windows are final under a window spec, a lateness and a
    clock. Restarted with --allowed_lateness raised (as the summary's note advises for
    too_late records) or another --window, a job rebuilt rows from part of their
    events: 72 of 100 events in the sink, none in the DLQ, exit 0. Now one line."""
    from onceflow.errors import UsageError
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options, with_stored_positions

    topic = new_topic(kafka_bootstrap, partitions=1)
    flags = [f"--input={topic.url}", "--kafka_group=kept", f"--sink=sqlite:///{tmp_path}/out.db",
             f"--dlq={tmp_path}/dlq.jsonl", "--window=10s", "--allowed_lateness=5s"]

    def start(*more):
        return with_stored_positions(job_from_options(parse_pipeline_args([*flags, *more])), [0])

    start()  # the first start stores the positions and the flags
    start()  # the same flags resume
    for more, now in ((["--allowed_lateness=1h"], "--allowed_lateness=1h (kept: 5s)"),
                      (["--window=1m"], "--window=1m (kept: 10s)"),
                      (["--kafka_time_source=record"], "--kafka_time_source=record (kept: field)"),
                      (["--window=10s", "--window_period=5s"], "--window_period=5s (kept: none)"),
                      # A typo in a field name sent every record to the DLQ and moved the positions past
                      # them; another time field puts events in windows already final.
                      (["--time_field=event_tme"], "--time_field=event_tme (kept: another field)"),
                      (["--id_field=id"], "--id_field=id (kept: another field)")):
        with pytest.raises(UsageError, match="were kept under other flags: this run has " + re.escape(now)):
            start(*more)
    start("--window_period=10s")  # the same tumbling windows, said another way (refused before)
    start()


@pytest.mark.kafka
@pytest.mark.parametrize("sink", ["sqlite", "file", "postgres"])
def test_a_live_job_on_another_topic_into_the_same_rows_is_refused(kafka_bootstrap, tmp_path, sink, request):
    """The same command with another --input topic (and the same group and sink)
    was taken for a first start and wrote the second topic's rows into the first's
    table, where nothing tells them apart (48 rows became 95)."""
    from onceflow.errors import UsageError
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options, with_stored_positions

    first, second = new_topic(kafka_bootstrap, partitions=1), new_topic(kafka_bootstrap, partitions=1)
    url = {"sqlite": f"sqlite:///{tmp_path}/out.db", "file": f"file://{tmp_path}/rows?format=parquet"}.get(sink)
    if sink == "postgres":
        url = f"{request.getfixturevalue('postgres_dsn')}?table=rows_{uuid.uuid4().hex[:12]}"
    (tmp_path / "rows").mkdir()  # as the job prepares its sink before it reads positions

    def start(topic, table=""):
        return with_stored_positions(job_from_options(parse_pipeline_args([
            f"--input={topic.url}", "--kafka_group=g", f"--sink={url}{table}", f"--dlq={tmp_path}/dlq.jsonl"])), [0])

    start(first)
    start(first)  # the same topic resumes
    with pytest.raises(UsageError, match=f"holds the rows of a live job on topic {first.topic} .* write topic "
                                         f"{second.topic}'s rows to another table or sink"):
        start(second)
    if sink != "file":
        start(second, "?table=other" if sink == "sqlite" else "_other")  # another table is fine


@pytest.mark.kafka
def test_positions_of_a_topic_deleted_and_created_again_are_refused(kafka_bootstrap, tmp_path):
    """A topic deleted and created again while the job was stopped, as long as the
    old one or longer: the restart resumed at the old offsets in the new topic and
    skipped its records before them (755 of 2,000 events in no row, exit 0). The
    settings kept with the positions hold Kafka's topic ID."""
    from onceflow.errors import UsageError
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options, with_stored_positions

    topic = new_topic(kafka_bootstrap, partitions=1)
    line = b'{"order_id": "o-%d", "event_time": 1793610000000, "store": "s1", "qty": 1}'
    produce(topic, [(0, line % n, None) for n in range(5)])
    job = job_from_options(parse_pipeline_args([f"--input={topic.url}", "--kafka_group=g",
                                                f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl"]))
    with_stored_positions(job, [0])  # the first start keeps the topic's ID
    with_stored_positions(job, [0])  # the same topic resumes
    recreate_topic(topic)
    produce(topic, [(0, line % n, None) for n in range(5, 15)])
    with pytest.raises(UsageError, match=f"topic {topic.topic} was deleted and created again since job 'g' "
                                         "stored its positions"):
        with_stored_positions(job, [0])


@pytest.mark.prism
@pytest.mark.parametrize("created_again", [False, True])
def test_a_topic_deleted_while_the_job_reads_it_ends_the_job_in_one_line(kafka_bootstrap, prism_path, tmp_path,
                                                                         created_again):
    """The topic deleted under a running live job: it failed with 215 lines of
    tracebacks (the worker's, each of Prism's bundle and job failures, Beam's client)
    and Beam's `RuntimeError: Pipeline job-001 failed`. Created again at once, the
    job read on at the old offsets in the new topic (skipping its first records, or
    waiting past its end with a lag of 0) and never ended. Now the job's own line
    ends it (Beam's worker still prints the one traceback it writes to stderr)."""
    from confluent_kafka.admin import AdminClient

    topic = new_topic(kafka_bootstrap, partitions=2)
    now_ms = int(time.time() * 1000)
    line = b'{"order_id": "o-%d", "event_time": %d, "store": "s1", "qty": 1}'
    produce(topic, [(n % 2, line % (n, now_ms), None) for n in range(20)])
    job = start_live_job(topic, "deleted", f"sqlite:///{tmp_path}/out.db", f"{tmp_path}/dlq.jsonl",
                         "--kafka_idle_timeout=2s", f"--prism_location={prism_path}")
    try:
        wait_for(lambda: "first start on this sink" in job_output(job), "the job's start", 120, job)
        time.sleep(5)
        if created_again:
            recreate_topic(topic, partitions=2)
            produce(topic, [(n % 2, line % (n, now_ms), None) for n in range(40)])
        else:
            admin = AdminClient({"bootstrap.servers": topic.bootstrap_servers})
            admin.delete_topics([topic.topic])[topic.topic].result(30)
        assert job.wait(180) == 1
    finally:
        stop(job)
    output = job_output(job, limit=200_000)
    lines = [line for line in output.splitlines() if line.startswith("aggregate: ")]
    deleted = (f"aggregate: --input: topic '{topic.topic}' does not exist on {kafka_bootstrap} any more: it was "
               "deleted while the job read it; if it was created again, see docs/guarantees.md, Restarts")
    replaced = (f"aggregate: --input: topic '{topic.topic}' was deleted and created again while the job read it "
                "(Kafka's topic ID changed): the job stopped before reading the new topic at the old one's "
                "offsets; a restart refuses its stored positions (see docs/guarantees.md, Restarts)")
    # Created again, the job may still look in the moment the topic is gone.
    assert lines[-1] in ((deleted, replaced) if created_again else (deleted,)), output[-3000:]
    assert output.count("Traceback") <= 1 and "RuntimeError" not in output, output[-3000:]


@pytest.mark.flink
def test_a_job_cancelled_on_the_runner_ends_in_one_line(kafka_bootstrap, flink_job_endpoint, tmp_path):
    """A live job cancelled from outside (the job server, Flink's UI) failed with
    Beam's traceback, `RuntimeError: Pipeline ... failed in state CANCELLED:
    unknown error`."""
    topic = new_topic(kafka_bootstrap, partitions=1)
    cancel_running_jobs(flink_job_endpoint)
    job = start_live_job(topic, "cancelled", f"sqlite:///{tmp_path}/out.db", f"{tmp_path}/dlq.jsonl",
                         "--kafka_idle_timeout=2s", "--job_name=cancelled-from-outside",
                         *streaming_job_flags(flink_job_endpoint))
    try:
        wait_for(lambda: cancel_running_jobs(flink_job_endpoint, "cancelled-from-outside") > 0,
                 "the job on the job server", 120, job)
        assert job.wait(120) == 1
    finally:
        stop(job)
    output = job_output(job, limit=200_000)
    lines = [line for line in output.splitlines() if line.startswith("aggregate: ")]
    assert lines[-1].startswith("aggregate: --runner: the job was cancelled on the runner (from outside this "
                                "process"), output[-3000:]
    assert "Traceback" not in output and "RuntimeError" not in output, output[-3000:]


@pytest.mark.kafka
def test_a_restart_on_a_sink_that_lost_its_rows_is_refused(kafka_bootstrap, tmp_path):
    """The rows table dropped (or emptied) while the job was stopped: the restart
    created it again, resumed from the stored positions and never rebuilt the final
    windows (4 of 28 rows, 200 of 2,600 events, exit 0). A position with a high water
    and a final point was stored after a row was final, so an empty sink has lost it."""
    from onceflow.errors import UsageError
    from onceflow.io.progress import Position
    from onceflow.io.sinks import prepare_sink
    from onceflow.io.sqlite import SqliteProgress
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options, with_stored_positions

    topic = new_topic(kafka_bootstrap, partitions=1)
    db = tmp_path / "out.db"
    flags = [f"--input={topic.url}", "--kafka_group=g", f"--sink=sqlite:///{db}", f"--dlq={tmp_path}/dlq.jsonl"]
    job = job_from_options(parse_pipeline_args(flags))
    prepare_sink(job.sink, job.row_schema)
    with_stored_positions(job, [0])
    progress = SqliteProgress(str(db), "aggregates")
    progress.write("g", [Position(topic.topic, 0, 0, None, 1_793_610_000_000)])  # only refused records so far
    with_stored_positions(job, [0])  # an empty sink is what they leave
    progress.write("g", [Position(topic.topic, 0, 7, 1_793_610_020_000, 1_793_610_060_000)])
    with pytest.raises(UsageError, match="--sink: sqlite .* holds no rows, but the positions job 'g' stored there "
                                         "say windows with events are final in it"):
        with_stored_positions(job, [0])
    record_time = job_from_options(parse_pipeline_args([*flags, "--kafka_time_source=record"]))
    with sqlite3.connect(db) as connection:  # the settings of the other time source, as if it had run so
        connection.execute("DELETE FROM onceflow_progress WHERE job = 'g#settings'")
    with_stored_positions(record_time, [0])  # refused records move its high water: nothing to say
    insert_row(db)  # a backfill wrote the rows again
    with sqlite3.connect(db) as connection:
        connection.execute("DELETE FROM onceflow_progress WHERE job = 'g#settings'")
    assert with_stored_positions(job, [0]).kafka.resume == ((0, 7, 1_793_610_020_000),)


@pytest.mark.kafka
def test_a_restart_on_a_folder_that_lost_its_window_files_is_refused(kafka_bootstrap, tmp_path):
    """The same for window files: the folder's files deleted, its positions file
    kept. A backfill's window file in it lets the job resume."""
    from onceflow.errors import UsageError
    from onceflow.io.file_sink import FileProgress, merge_window
    from onceflow.io.progress import Position
    from onceflow.io.sinks import prepare_sink
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options, with_stored_positions

    topic = new_topic(kafka_bootstrap, partitions=1)
    folder = tmp_path / "out"
    flags = [f"--input={topic.url}", "--kafka_group=g", f"--sink=file://{folder}?format=avro",
             f"--dlq={tmp_path}/dlq.jsonl"]
    job = job_from_options(parse_pipeline_args(flags))
    prepare_sink(job.sink, job.row_schema)
    with_stored_positions(job, [0])
    FileProgress(str(folder)).write("g", [Position(topic.topic, 0, 7, 1_793_610_020_000, 1_793_610_060_000)])
    with pytest.raises(UsageError, match=r"--sink: file .*/out \(format avro\) holds no rows, but the positions "
                                         "job 'g' stored there say windows with events are final in it"):
        with_stored_positions(job, [0])
    row = {column: 1 for column in job.row_schema.columns}  # a backfill wrote the row again
    row.update(store="s1", window_start=1_793_610_000_000, window_end=1_793_610_060_000)
    merge_window(str(folder), job.row_schema, "avro", [row])
    assert with_stored_positions(job, [0]).kafka.resume == ((0, 7, 1_793_610_020_000),)


def insert_row(db) -> None:
    """One aggregate row in the SQLite sink ``db`` (the job's default columns)."""
    with sqlite3.connect(db) as connection:
        connection.execute("INSERT INTO aggregates (store, window_start, window_end, event_count, count, "
                           "written_at) VALUES ('s1', '2026-11-03T10:00:00Z', '2026-11-03T10:01:00Z', 1, 1, 'x')")


@pytest.mark.kafka
def test_a_savepoint_is_refused_on_a_first_start_on_a_sink(kafka_bootstrap, tmp_path):
    """A Flink savepoint restored into a new table or by a new group (what the flags
    refusal's advice leads to, savepoint kept) was never checked against anything:
    Flink restored the old run's windows and positions, and the new table got
    10-second rows among its 20-second ones and rows short of events. A savepoint
    now needs the job's own positions on the sink; nothing is stored when refused."""
    from onceflow.errors import UsageError
    from onceflow.io.sinks import parse_sink_url, progress_store
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options, with_stored_positions

    topic = new_topic(kafka_bootstrap, partitions=1)
    flags = [f"--input={topic.url}", f"--dlq={tmp_path}/dlq.jsonl", "--window=10s"]

    def start(group, db, savepoint=None):
        job = job_from_options(parse_pipeline_args([*flags, f"--kafka_group={group}", f"--sink=sqlite:///{db}"]))
        return with_stored_positions(job, [0], savepoint)

    start("first", tmp_path / "a.db")
    start("first", tmp_path / "a.db", "/sp/savepoint-1")  # its own sink and group: restored
    for group, db in (("first", tmp_path / "b.db"), ("second", tmp_path / "a.db")):
        with pytest.raises(UsageError, match="--savepoint_path: job .* has never run on .* start without "
                                             "--savepoint_path"):
            start(group, db, "/sp/savepoint-1")
        store = progress_store(parse_sink_url(f"sqlite:///{db}"))
        assert store.read(group, topic.topic) == {} and store.read(group + "#settings", topic.topic) == {}


@pytest.mark.kafka
def test_positions_past_a_recreated_topic_are_refused(kafka_bootstrap, tmp_path):
    """The topic deleted and created again: the stored positions pointed past its new
    end, and the job skipped its first records (50 of 150 read) with no warning."""
    from onceflow.errors import ServiceError
    from onceflow.io.progress import Position
    from onceflow.io.sqlite import SqliteProgress
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import _resolve_kafka_start, job_from_options

    topic = new_topic(kafka_bootstrap, partitions=1)
    produce(topic, [(0, b'{"order_id": "o-%d", "event_time": 1793610000000, "store": "s1", "qty": 1}' % n, None)
                    for n in range(5)])
    db = tmp_path / "out.db"
    job = job_from_options(parse_pipeline_args([f"--input={topic.url}", "--kafka_group=g", f"--sink=sqlite:///{db}",
                                                f"--dlq={tmp_path}/dlq.jsonl"]))
    _resolve_kafka_start(job, [0])  # the first start stores offset 0
    SqliteProgress(str(db), "aggregates").write("g", [Position(topic.topic, 0, 100, None)])
    with pytest.raises(ServiceError, match="partition 0 of .* is offset 100, past the partition's end \\(5\\)"):
        _resolve_kafka_start(job, [0])
    SqliteProgress(str(db), "aggregates").write("g", [Position(topic.topic, 1, 3, None)])
    with pytest.raises(ServiceError, match=r"name partitions \[1\] that .* no longer has"):
        _resolve_kafka_start(job, [0])


@pytest.mark.kafka
def test_a_partition_added_while_stopped_starts_at_the_sinks_final_point(kafka_bootstrap, tmp_path):
    """A partition the topic got while the job was stopped has no stored position:
    it is read from its log start with the latest stored final point plus the
    lateness as its high water, and that position is stored before anything is
    read, so a second restart gives the same verdicts."""
    from confluent_kafka.admin import AdminClient, NewPartitions

    from onceflow.io.progress import Position
    from onceflow.io.sinks import prepare_sink
    from onceflow.io.sqlite import SqliteProgress
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options, with_stored_positions

    topic = new_topic(kafka_bootstrap, partitions=1)
    db = tmp_path / "out.db"
    job = job_from_options(parse_pipeline_args([f"--input={topic.url}", "--kafka_group=g", f"--sink=sqlite:///{db}",
                                                f"--dlq={tmp_path}/dlq.jsonl", "--window=10s",
                                                "--allowed_lateness=5s"]))
    prepare_sink(job.sink, job.row_schema)
    with_stored_positions(job, [0])  # the first start
    progress = SqliteProgress(str(db), "aggregates")
    progress.write("g", [Position(topic.topic, 0, 0, 1_793_610_020_000, 1_793_610_010_000)])
    insert_row(db)  # the row of the final window those positions went past
    admin = AdminClient({"bootstrap.servers": topic.bootstrap_servers})
    admin.create_partitions([NewPartitions(topic.topic, 2)])[topic.topic].result(30)
    produce(topic, [(1, b"{}", None)] * 3)  # the partition's log start stays 0
    for _ in range(2):
        resumed = with_stored_positions(job, [0, 1])
        assert resumed.kafka.resume == ((0, 0, 1_793_610_020_000), (1, 0, 1_793_610_015_000))
    assert progress.read("g", topic.topic)[1] == Position(topic.topic, 1, 0, 1_793_610_015_000)
    # Nothing final yet (a first start's positions only): no high water, as at a first start.
    progress.write("h", [Position(topic.topic, 0, 0, None)])
    other = dataclasses.replace(job, kafka=dataclasses.replace(job.kafka, group_id="h"))
    assert with_stored_positions(other, [0, 1]).kafka.resume == ((0, 0, None), (1, 0, None))


def _events(prefix, key, times):
    """JSON events of one key at ``times``, with IDs ``prefix0``, ``prefix1``..."""
    return [json.dumps({"id": f"{prefix}{n}", "t": t, "k": key}).encode() for n, t in enumerate(times)]


def _final_in_sink(db, group, topic, partition, through_ms):
    """Whether the job's position of ``partition`` stored in the SQLite sink says
    every window ending by ``through_ms`` is final there."""
    from onceflow.io.sqlite import SqliteProgress

    stored = SqliteProgress(str(db), "aggregates").read(group, topic.topic) if db.exists() else {}
    return partition in stored and (stored[partition].final_through_ms or 0) >= through_ms


@pytest.mark.prism
def test_a_partition_added_while_stopped_loses_no_event(kafka_bootstrap, prism_path, tmp_path):
    """Partitions added while the job was stopped started as at a first start, from
    their data: their records for windows already final in the sink were counted in
    rows the sink refused as older versions (here 20 events of a written window:
    in no row and not in the DLQ). They are too_late dead letters now; the new
    partition's current events are counted."""
    from confluent_kafka.admin import AdminClient, NewPartitions

    from onceflow.io.dlq.jsonl import read_dead_letters

    topic = new_topic(kafka_bootstrap, partitions=1)
    group = f"g-{topic.topic}"
    db, dlq = tmp_path / "live.db", tmp_path / "dlq.jsonl"
    flags = ("--key_fields=k", "--time_field=t", "--id_field=id", "--aggregate=count", "--window=10s",
             "--allowed_lateness=5s", "--kafka_idle_timeout=2s")
    now = int(time.time() * 1000)
    old_window = now - now % WINDOW_MS - 10 * 60_000  # ten minutes ago: final once the partition is idle

    produce(topic, [(0, value, None) for value in _events("p0-", "a", [old_window + 100 * n for n in range(50)])])
    job = start_live_job(topic, group, f"sqlite:///{db}", dlq, *flags)
    try:
        wait_for(lambda: _final_in_sink(db, group, topic, 0, old_window + WINDOW_MS),
                 "the old window final in the sink", 120, job)
    finally:
        stop(job)
    admin = AdminClient({"bootstrap.servers": topic.bootstrap_servers})
    admin.create_partitions([NewPartitions(topic.topic, 2)])[topic.topic].result(30)
    late = _events("p1-old-", "a", [old_window + 500 + n for n in range(20)])
    current_time = int(time.time() * 1000)
    current = _events("p1-new-", "b", [current_time + n for n in range(20)])
    produce(topic, [(1, value, None) for value in late + current])
    job = start_live_job(topic, group, f"sqlite:///{db}", dlq, *flags)
    try:
        wait_for(lambda: counted_events(db) == 70 and len(list(read_dead_letters(str(dlq)))) == 20,
                 "the current events counted and the late ones dead-lettered", 120, job)
        time.sleep(3)  # anything counted twice would show now
    finally:
        stop(job)
    rows = {(dict(r)["k"], round(datetime.datetime.fromisoformat(dict(r)["window_start"].replace("Z", "+00:00"))
                                  .timestamp() * 1000)): dict(r)["count"] for r in table_rows(db)}
    assert rows[("a", old_window)] == 50
    assert sum(count for (key, _), count in rows.items() if key == "b") == 20
    letters = list(read_dead_letters(str(dlq)))
    assert {letter["reason"] for letter in letters} == {"too_late"}
    assert sorted(json.loads(base64.b64decode(letter["raw_base64"]))["id"] for letter in letters) == sorted(f"p1-old-{n}" for n in range(20))
    assert "partitions [1] are new since the last run" in job_output(job, 100_000)


@pytest.mark.parametrize("runner", [pytest.param("prism", marks=pytest.mark.prism),
                                    pytest.param("flink", marks=pytest.mark.flink)])
def test_a_partition_added_while_running_keeps_its_verdicts_across_a_kill(kafka_bootstrap, tmp_path, runner, request):
    """A partition added while the job runs starts with the wall clock as its high
    water, so its records of windows the job has closed are too_late dead letters.
    Killed before the partition's first position was stored with the rows, the
    restart took it for one added while stopped (a high water from the sink's final
    point) and counted those same records: in a row and in the DLQ. Its start
    position and high water are stored before any of its records is read, so the
    restart gives them the same verdicts."""
    from confluent_kafka.admin import AdminClient, NewPartitions

    from onceflow.io.dlq.jsonl import read_dead_letters

    topic = new_topic(kafka_bootstrap, partitions=1)
    group = f"g-{topic.topic}"
    db, dlq = tmp_path / "live.db", tmp_path / "dlq.jsonl"
    # A long lateness: the added partition's first position is stored with the rows only
    # once a window plus the lateness after it was found has passed; the kill comes before.
    flags = ("--key_fields=k", "--time_field=t", "--id_field=id", "--aggregate=count", "--window=10s",
             "--allowed_lateness=30s", "--kafka_idle_timeout=2s", *_runner_flags(runner, request))
    now = int(time.time() * 1000)
    old_window = now - now % WINDOW_MS - 20 * 60_000  # final in the sink before the partition is added
    between = old_window + 10 * 60_000  # after the stored final point, long before the wall clock

    def dead_letter_ids():
        return sorted(json.loads(base64.b64decode(letter["raw_base64"]))["id"]
                      for letter in read_dead_letters(str(dlq))) if dlq.exists() else []

    produce(topic, [(0, value, None) for value in _events("p0-", "a", [old_window + 100 * n for n in range(50)])])
    job = start_live_job(topic, group, f"sqlite:///{db}", dlq, *flags)
    try:
        wait_for(lambda: _final_in_sink(db, group, topic, 0, old_window + WINDOW_MS),
                 "the old window final in the sink", 120, job)
        admin = AdminClient({"bootstrap.servers": topic.bootstrap_servers})
        admin.create_partitions([NewPartitions(topic.topic, 2)])[topic.topic].result(30)
        produce(topic, [(1, value, None) for value in _events("p1-", "b", [between + n for n in range(20)])])
        expected = sorted(f"p1-{n}" for n in range(20))
        wait_for(lambda: dead_letter_ids() == expected, "the added partition's records dead-lettered", 120, job)
    finally:
        stop(job)
    job = start_live_job(topic, group, f"sqlite:///{db}", dlq, *flags)
    try:
        current = int(time.time() * 1000)
        produce(topic, [(1, value, None) for value in _events("p1-now-", "c", [current])])
        wait_for(lambda: "c" in {dict(r)["k"] for r in table_rows(db)}, "the current event counted", 180, job)
        time.sleep(5)  # a row counting the dead-lettered records would show now
    finally:
        stop(job)
    rows = {dict(r)["k"]: dict(r)["event_count"] for r in table_rows(db)}
    assert rows == {"a": 50, "c": 1}
    assert set(dead_letter_ids()) == set(expected)
