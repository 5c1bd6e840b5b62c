"""A live job on Flink stopped with a savepoint and resumed from it, with its state.

On the standalone cluster (``flink-cluster``), reached two ways: through the dev
stack's job server with ``--flink_master`` set to the cluster, and through a job
server of the test's own started against it (``cluster_job_endpoint``). Beam's
embedded Flink (the dev job server's ``[local]``) writes a savepoint but does not
restore one: pinned by the last test (see docs/runner-findings.md).
"""

import datetime
import json
import os
import random
import re
import signal
import time
import urllib.request

import pytest

from onceflow_dev.devstack.flink import cancel_running_jobs, flink_jobs, streaming_job_flags
from onceflow.io import flink_rest
from onceflow.pipelines.flink_savepoint import savepoint_folder
from tests.livejob import (
    counted_events, job_output, new_topic, produce, producer_for, sample_lines, start_live_job, stop, table_rows,
    wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.flink, pytest.mark.slow]
WINDOW_MS = 10_000
EVENT_FLAGS = ("--key_fields=k", "--time_field=t", "--id_field=id", "--aggregate=count,sum:v", "--window=10s",
               "--allowed_lateness=10s", "--kafka_idle_timeout=3s", "--status=off")


class _Events:
    """Events produced in real time to 3 partitions (event time: now), and the
    aggregates they must give, per (key, window start)."""

    def __init__(self, topic, seed):
        self._topic = topic
        self._producer = producer_for(topic)
        self._rng = random.Random(seed)
        self.truth = {}
        self.produced = 0

    def send(self, count, pause_s=0.05):
        for _ in range(count):
            n, now = self.produced, int(time.time() * 1000)
            key, value = self._rng.choice("abc"), self._rng.randint(1, 9)
            produce(self._topic, [(n % 3, json.dumps({"id": str(n), "t": now, "k": key, "v": value}).encode(),
                                   now)], self._producer)
            start = now - now % WINDOW_MS
            count_so_far, total = self.truth.get((key, start), (0, 0))
            self.truth[(key, start)] = (count_so_far + 1, total + value)
            self.produced += 1
            time.sleep(pause_s)


def _table(db):
    found = {}
    for row in table_rows(db):
        row = dict(row)
        start = round(datetime.datetime.fromisoformat(row["window_start"].replace("Z", "+00:00")).timestamp() * 1000)
        found[(row["k"], start)] = (row["count"], row["sum_v"])
    return found


def _summary_count(output, label):
    found = re.search(rf"^\s+{label}\s+([\d,]+)", output, re.MULTILINE)
    assert found, f"no {label!r} in the summary: {output}"
    return int(found.group(1).replace(",", ""))


def _stop_and_wait(job, sig):
    """Sends ``sig`` to the job's process group; its exit status and output."""
    os.killpg(job.pid, sig)
    status = job.wait(240)
    return status, job_output(job, 200_000)


def _cancel_on_cluster(rest, name):
    for job in flink_rest.list_jobs(rest):
        if job.name == name and job.state not in flink_rest.FINISHED_STATES:
            flink_rest.cancel_job(rest, job.job_id)


def _user_config(rest, job_id):
    """The pipeline options Beam's job server handed Flink (camelCase names)."""
    with urllib.request.urlopen(f"{rest}/jobs/{job_id}/config", timeout=10) as response:
        return json.load(response)["execution-config"]["user-config"]


@pytest.mark.parametrize("route, sig", [pytest.param("dev job server", signal.SIGINT, id="dev-job-server-SIGINT"),
                                        pytest.param("own job server", signal.SIGTERM, id="own-job-server-SIGTERM")])
def test_stopped_with_a_savepoint_and_resumed_with_its_state_on_the_cluster(
        kafka_bootstrap, flink_cluster_master, tmp_path, request, route, sig):
    """Events produced in real time; the job is stopped (SIGINT, or a supervisor's
    SIGTERM) with a savepoint while windows are open, events go on arriving while
    no job runs, and the job is started again from the savepoint. Flink reports
    the restore; the two runs together read every record exactly once (the second
    went on from the savepoint's positions, not from the positions stored in the
    sink, which lag behind); the table ends equal to the aggregates computed here."""
    if route == "dev job server":
        runner = (*streaming_job_flags(request.getfixturevalue("flink_job_endpoint")),
                  f"--flink_master={flink_cluster_master}")
    else:
        runner = streaming_job_flags(request.getfixturevalue("cluster_job_endpoint"))
    rest = f"http://{flink_cluster_master}"
    topic = new_topic(kafka_bootstrap)
    name = f"onceflow-test-savepoint-{topic.topic}"
    db, dlq = tmp_path / "live.db", tmp_path / "dlq.jsonl"
    flags = (*EVENT_FLAGS, f"--job_name={name}", f"--flink_rest_url={rest}",
             f"--flink_savepoint_dir={tmp_path / 'savepoints'}", *runner)
    events = _Events(topic, seed=11)
    job = start_live_job(topic, f"g-{topic.topic}", f"sqlite:///{db}", dlq, *flags)
    try:
        events.send(150)
        wait_for(lambda: counted_events(db) > 0, "the first rows", 300, job)
        events.send(40)  # windows open when it stops
        status, first = _stop_and_wait(job, sig)
        assert status == 0, first
        location = re.search(r"aggregate: stopped with a savepoint at (\S+); resume with the same flags and "
                             r"--savepoint_path=(\S+)", first).group(1)
        assert f"{tmp_path}/savepoints/onceflow-shards-2/" in location  # the job's shards (2, the default), for the restore
        assert [j.state for j in flink_rest.list_jobs(rest) if j.name == name] == ["FINISHED"]
        events.send(60)  # while no job runs
        job = start_live_job(topic, f"g-{topic.topic}", f"sqlite:///{db}", dlq, *flags,
                             f"--savepoint_path={location}")
        events.send(150)  # while it starts and runs
        wait_for(lambda: counted_events(db) == events.produced, f"all {events.produced} events in the sink", 300, job)
        running = flink_rest.find_job(rest, name)
        assert flink_rest.restored_savepoint(rest, running.job_id) == location
        assert _user_config(rest, running.job_id)["savepointPath"] == location  # the flag, as Flink's runner got it
        time.sleep(4)  # anything counted twice would show now
        status, second = _stop_and_wait(job, sig)
        assert status == 0, second
    finally:
        stop(job)
        _cancel_on_cluster(rest, name)
    assert f"aggregate: Flink restored the job from the savepoint {location}" in second
    assert "stopped with a savepoint at" in second
    assert _summary_count(first, "records read") + _summary_count(second, "records read") == events.produced
    assert _summary_count(first, "duplicates dropped") == _summary_count(second, "duplicates dropped") == 0
    assert _table(db) == events.truth


def test_a_savepoint_flink_cannot_write_cancels_the_job_with_one_line(
        kafka_bootstrap, flink_cluster_master, flink_job_endpoint, tmp_path):
    """The savepoint directory is not writable for the JobManager: the stop fails,
    the job says so in one line, exits 1, and is cancelled on Flink."""
    rest = f"http://{flink_cluster_master}"
    topic = new_topic(kafka_bootstrap)
    produce(topic, [(n % 3, line, None) for n, line in enumerate(sample_lines()[:300])])
    name = f"onceflow-test-savepoint-{topic.topic}"
    db = tmp_path / "live.db"
    job = start_live_job(topic, f"g-{topic.topic}", f"sqlite:///{db}", tmp_path / "dlq.jsonl", "--status=off",
                         "--kafka_idle_timeout=3s", f"--job_name={name}", f"--flink_rest_url={rest}",
                         "--flink_savepoint_dir=/proc/onceflow-savepoints", f"--flink_master={flink_cluster_master}",
                         *streaming_job_flags(flink_job_endpoint))
    try:
        wait_for(lambda: counted_events(db) > 0, "the first rows", 300, job)
        status, output = _stop_and_wait(job, signal.SIGINT)
        wait_for(lambda: [j.state for j in flink_rest.list_jobs(rest) if j.name == name] == ["CANCELED"],
                 "the Flink job to be cancelled", 60)
    finally:
        stop(job)
        _cancel_on_cluster(rest, name)
    assert status == 1, output
    errors = [line for line in output.splitlines() if line.startswith("aggregate: --flink_savepoint_dir")]
    assert len(errors) == 1, output
    assert "could not stop with a savepoint: the savepoint of job " in errors[0]
    assert "Failed to create savepoint directory at /proc/onceflow-savepoints" in errors[0]
    assert "the job was cancelled instead" in errors[0]
    assert "Traceback" not in output


def test_a_savepoint_flink_cannot_restore_is_one_line(kafka_bootstrap, flink_cluster_master, flink_job_endpoint,
                                                      tmp_path):
    """A --savepoint_path that holds no savepoint: Flink fails the job at its start,
    and the job said so in a 25-line traceback. Now one line, exit status 2."""
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options, with_stored_positions

    rest = f"http://{flink_cluster_master}"
    topic = new_topic(kafka_bootstrap)
    name = f"onceflow-test-savepoint-{topic.topic}"
    group, db, dlq = f"g-{topic.topic}", tmp_path / "live.db", tmp_path / "dlq.jsonl"
    # The job has run on this sink before (a savepoint on a first start is refused before Flink sees it).
    with_stored_positions(job_from_options(parse_pipeline_args(
        [f"--input={topic.url}", f"--kafka_group={group}", f"--sink=sqlite:///{db}", f"--dlq={dlq}",
         *EVENT_FLAGS])), [0, 1, 2])
    missing = tmp_path / "savepoints" / "onceflow-shards-2" / "savepoint-gone"
    job = start_live_job(topic, group, f"sqlite:///{db}", dlq, *EVENT_FLAGS, f"--job_name={name}",
                         f"--flink_rest_url={rest}", f"--savepoint_path={missing}",
                         f"--flink_master={flink_cluster_master}", *streaming_job_flags(flink_job_endpoint))
    try:
        status = job.wait(300)
        output = job_output(job, 200_000)
    finally:
        stop(job)
        _cancel_on_cluster(rest, name)
    assert status == 2, output
    errors = [line for line in output.splitlines() if line.startswith("aggregate: error: --savepoint_path")]
    assert len(errors) == 1, output
    assert f"Flink finds no savepoint at '{missing}'" in errors[0]
    assert "start without --savepoint_path" in errors[0]
    assert "Traceback" not in output


@pytest.mark.parametrize("said, line", [
    ("java.io.IOException: Unexpected magic number. This can have multiple reasons: (1) You are trying to load a "
     "Flink 1.0 savepoint", "Flink read no savepoint there (not a savepoint, or a corrupt one)"),
    ("java.lang.IllegalStateException: Failed to rollback to checkpoint/savepoint file:/sp/savepoint-d9. Cannot map "
     "checkpoint/savepoint state for operator bc764cd8 to the new program, because the operator is not available",
     "the savepoint does not fit this job (Flink cannot map the state of its operator bc764cd8: another "
     "--parallelism, other steps or another onceflow version)"),
    # Both read "the runner failed the job: ...; run it again", which failed again the same way.
    ("java.io.FileNotFoundException: Cannot find meta data file '_metadata' in directory '/sp/empty'. Please try to "
     "load the checkpoint/savepoint directly from the metadata file", "Flink finds no savepoint there (the directory "
     "holds no _metadata)"),
    ("java.io.EOFException", "Flink could not read the savepoint to its end (a cut-off or corrupt _metadata)"),
    ("java.io.IOException: Connection reset by peer", None),
])
def test_what_flink_says_of_a_savepoint_it_cannot_restore(said, line):
    """Flink's reasons as the job server reports a failed start (a restore with
    another --parallelism fails so: its steps are chained, and named, otherwise)."""
    from onceflow.pipelines.aggregate import _savepoint_restore_failure

    error = RuntimeError(f"Pipeline onceflow_x failed in state FAILED: {said}")
    assert _savepoint_restore_failure(error) == line


def test_the_embedded_flink_writes_a_savepoint_but_does_not_restore_it(kafka_bootstrap, flink_job_endpoint,
                                                                       tmp_path):
    """Beam's 2.62 job server with ``--flink-master=[local]`` (the dev job server):
    a stop with a savepoint works through the job's mini cluster's REST API, and
    ``--savepoint_path`` reaches the job (Flink shows it in the job's options), but
    the job starts without the state: the embedded environment ignores it. The job
    then resumes from the positions stored with its rows. If this fails because
    Flink reports a restore, the job server learnt it: update
    docs/runner-findings.md and docs/deploying.md."""
    topic = new_topic(kafka_bootstrap)
    produce(topic, [(n % 3, line, None) for n, line in enumerate(sample_lines()[:300])])
    name = f"onceflow-test-savepoint-local-{topic.topic}"
    db, dlq = tmp_path / "live.db", tmp_path / "dlq.jsonl"
    flags = ("--status=off", "--kafka_idle_timeout=3s", f"--job_name={name}", *streaming_job_flags(flink_job_endpoint))

    def running():
        jobs = [j for j in flink_jobs(name) if j.state == "RUNNING"]
        return jobs[0] if jobs else None

    job = start_live_job(topic, f"g-{topic.topic}", f"sqlite:///{db}", dlq, *flags)
    try:
        wait_for(lambda: counted_events(db) > 0, "the first rows", 300, job)
        first = running()
        location = flink_rest.stop_with_savepoint(f"http://{first.endpoint}", first.job_id,
                                                  savepoint_folder(str(tmp_path / "savepoints"), 2))
        assert job.wait(120) == 0, job_output(job)  # the client sees its job end
        job = start_live_job(topic, f"g-{topic.topic}", f"sqlite:///{db}", dlq, *flags,
                             f"--savepoint_path={location}")
        wait_for(lambda: running() is not None, "the job to run again", 300, job)
        second = running()
        rest = f"http://{second.endpoint}"
        assert _user_config(rest, second.job_id)["savepointPath"] == location
        time.sleep(10)  # Flink reports a restore as the job starts
        assert flink_rest.restored_savepoint(rest, second.job_id) is None
        assert "starting from the savepoint" in job_output(job)
        assert "warning: without --flink_rest_url nothing checks that Flink restores the savepoint" in job_output(job)
    finally:
        stop(job, signal.SIGINT)
        cancel_running_jobs(flink_job_endpoint, name_prefix=name)


def _states_on_cluster(rest, name, settle_s=20):
    """The states Flink lists for jobs named ``name`` once none is CANCELLING, or
    after ``settle_s`` seconds."""
    deadline = time.monotonic() + settle_s
    while True:
        states = sorted(job.state for job in flink_rest.list_jobs(rest) if job.name == name)
        if "CANCELLING" not in states or time.monotonic() > deadline:
            return states
        time.sleep(1)


def test_a_stop_cancels_the_job_on_flink_through_its_rest_address(kafka_bootstrap, flink_cluster_master,
                                                                  flink_job_endpoint, tmp_path):
    """Without --flink_rest_url a Ctrl-C cancels the job through the job server
    only, which leaves it on the cluster (its LOOPBACK worker gone, it restarts
    forever): the job says so in a warning. With the flag alone it cancels the job
    there too."""
    runner = (*streaming_job_flags(flink_job_endpoint), f"--flink_master={flink_cluster_master}")
    rest = f"http://{flink_cluster_master}"
    topic = new_topic(kafka_bootstrap)
    events = _Events(topic, seed=12)
    for attempt, rest_flag in enumerate(((), (f"--flink_rest_url={rest}",))):
        name = f"onceflow-test-cancel-{attempt}-{topic.topic}"
        db, dlq = tmp_path / f"live{attempt}.db", tmp_path / f"dlq{attempt}.jsonl"
        job = start_live_job(topic, f"g{attempt}-{topic.topic}", f"sqlite:///{db}", dlq, *EVENT_FLAGS,
                             f"--job_name={name}", *rest_flag, *runner)
        try:
            events.send(30)
            wait_for(lambda: counted_events(db) > 0, "the first rows", 300, job)
            status, output = _stop_and_wait(job, signal.SIGINT)
            assert status == 0, output
            states = _states_on_cluster(rest, name)
        finally:
            stop(job)
            _cancel_on_cluster(rest, name)
        if rest_flag:
            assert "Ctrl-C or SIGTERM cancels it there" in output and "warning" not in output, output
            assert states == ["CANCELED"], states
        else:
            assert "aggregate: warning: cancelled through the job server, which can leave the job running" in output
            assert states and "CANCELED" not in states, states  # what the warning is about
