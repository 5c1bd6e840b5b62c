"""The Flink flags: the savepoint flags checked into one-line errors before anything
runs, and a live job's bundle time."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from onceflow.errors import UsageError
from onceflow.options import parse_pipeline_args
from onceflow.pipelines.flink_savepoint import SavepointStop, savepoint_stop_from_options, shards_to_restore
from onceflow.runners import (
    JOB_PROCESS_ENV, LIVE_FLINK_BUNDLE_TIME_MS, USE_LOOPBACK_PROCESS_WORKER, prepare_runner, runs_on_flink,
)
from tests.livejob import process_alive

FLINK = ("--runner=PortableRunner", "--job_endpoint=127.0.0.1:18099")
LIVE = ("--input=kafka://127.0.0.1:9/orders", "--kafka_group=g")
REST = "--flink_rest_url=http://127.0.0.1:18081"


def _stop(*flags, live=True, shards=2, identity=None):
    return savepoint_stop_from_options(parse_pipeline_args(list(flags)), live, shards, identity)


def test_no_savepoint_flags_mean_no_savepoint_stop():
    assert _stop(*FLINK) is None
    assert _stop() is None


def test_the_flags_become_a_savepoint_stop():
    stop = _stop(*FLINK, "--flink_savepoint_dir=/var/sp", REST + "/", "--job_name=orders-live",
                 "--savepoint_path=file:/var/sp/savepoint-1", "--allow_non_restored_state")
    assert stop == SavepointStop("http://127.0.0.1:18081", "/var/sp/onceflow-shards-2", "orders-live",
                                 "file:/var/sp/savepoint-1")
    assert _stop(*FLINK, "--flink_savepoint_dir=s3://bucket/sp/", REST, "--job_name=j",
                 shards=8).savepoint_dir == "s3://bucket/sp/onceflow-shards-8"


def test_the_rest_address_alone_becomes_a_stop_that_cancels_on_flink():
    assert _stop(*FLINK, REST, "--job_name=orders-live") == SavepointStop("http://127.0.0.1:18081", None,
                                                                          "orders-live")


def test_a_job_without_a_name_gets_a_unique_one_on_flink():
    options = parse_pipeline_args([*FLINK, "--flink_savepoint_dir=/var/sp", REST])
    first = savepoint_stop_from_options(options, live=True, shards=2).job_name
    assert first.startswith("onceflow-aggregate-")
    assert options.get_all_options()["job_name"] == first  # what the job server names the Flink job
    assert _stop(*FLINK, "--flink_savepoint_dir=/var/sp", REST).job_name != first


@pytest.mark.parametrize("runner, flink", [("PortableRunner", True), ("portable", True), ("FlinkRunner", True),
                                           ("flink", True), ("PrismRunner", False), ("DirectRunner", False),
                                           ("DataflowRunner", False), (None, False)])
def test_which_runners_count_as_flink(runner, flink):
    assert runs_on_flink(parse_pipeline_args([f"--runner={runner}"] if runner else [])) is flink


@pytest.mark.parametrize("flags, live, fragment", [
    (("--flink_savepoint_dir=/var/sp", REST), True,
     "--flink_savepoint_dir: stopping with a savepoint needs Flink; no --runner is given"),
    (("--runner=PrismRunner", "--flink_savepoint_dir=/var/sp", REST), True, "the runner is PrismRunner"),
    ((*FLINK, "--flink_savepoint_dir=/var/sp"), True, "--flink_savepoint_dir: needs --flink_rest_url=http://HOST:PORT"),
    ((*FLINK, "--flink_savepoint_dir=/var/sp", REST), False, "--flink_savepoint_dir: only a live kafka:// job"),
    ((*FLINK, "--flink_savepoint_dir=sp", REST), True, "--flink_savepoint_dir: 'sp' is relative"),
    ((*FLINK, "--flink_savepoint_dir=/var/sp", "--flink_rest_url=127.0.0.1:8081"), True,
     "--flink_rest_url: '127.0.0.1:8081' is not Flink's REST address"),
    ((*FLINK, REST), False, "--flink_rest_url: only a live kafka:// job (no --to) is stopped through Flink's REST"),
    (("--runner=PrismRunner", REST), True, "--flink_rest_url: Flink's REST API stops a job on Flink only"),
    (("--savepoint_path=/var/sp/savepoint-1",), True, "--savepoint_path: only Flink restores a savepoint"),
    ((*FLINK, "--savepoint_path=/var/sp/savepoint-1"), False, "--savepoint_path: only a live kafka:// job"),
    ((*FLINK, "--allow_non_restored_state"), True, "--allow_non_restored_state: only means something with"),
])
def test_bad_combinations_are_refused(flags, live, fragment):
    with pytest.raises(UsageError) as raised:
        _stop(*flags, live=live)
    assert fragment in str(raised.value)
    assert "\n" not in str(raised.value)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "onceflow.pipelines.aggregate", *args],
                          capture_output=True, text=True, timeout=300)


def _lines(stderr):
    return [line for line in stderr.splitlines()
            if line.strip() and "apitools" not in line and not line.startswith("onceflow: passing flags")]


def test_the_job_refuses_them_in_one_line_before_it_reads(tmp_path):
    result = _run_cli(*LIVE, f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl",
                      "--runner=PrismRunner", f"--flink_savepoint_dir={tmp_path}", REST)
    assert result.returncode == 2
    assert _lines(result.stderr) == ["aggregate: error: --flink_savepoint_dir: stopping with a savepoint needs "
                                     "Flink; the runner is PrismRunner (use --runner=PortableRunner "
                                     "--job_endpoint=<Flink job server>)"], result.stderr
    assert not (tmp_path / "out.db").exists()


def test_an_unreachable_rest_api_stops_the_job_before_it_is_submitted(tmp_path):
    """Checked first: a job whose REST address is wrong could be neither stopped
    with a savepoint nor cancelled through Flink."""
    result = _run_cli(*LIVE, *FLINK, f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl",
                      f"--flink_savepoint_dir={tmp_path}", "--flink_rest_url=http://127.0.0.1:9")
    assert result.returncode == 1
    lines = _lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("aggregate: --flink_rest_url: Flink's REST API at http://127.0.0.1:9/config did "
                               "not answer: ")


@pytest.mark.parametrize("path, given, shards", [
    ("file:/var/sp/onceflow-shards-2/savepoint-1a2b", None, 2),
    ("s3://bucket/sp/onceflow-shards-16/savepoint-1a2b/", None, 16),
    ("/var/sp/onceflow-shards-8/savepoint-1a2b", 8, 8),
    ("file:/var/sp/savepoint-1a2b", 8, 8),  # taken elsewhere: --shards says it
    ("/sp/onceflow-shards-8/onceflow-shards-2/savepoint-1a2b", None, 2),  # the folder onceflow added is the innermost
])
def test_a_restored_job_runs_with_the_shards_its_savepoint_was_taken_with(path, given, shards):
    assert shards_to_restore(path, given) == shards


@pytest.mark.parametrize("path, given, message", [
    ("file:/var/sp/onceflow-shards-2/savepoint-1a2b", 8,
     "--shards=8: the savepoint file:/var/sp/onceflow-shards-2/savepoint-1a2b holds the job's state in 2 shards; "
     "pass --shards=2 or leave --shards out"),
    ("file:/var/sp/savepoint-1a2b", None,
     "--savepoint_path: file:/var/sp/savepoint-1a2b does not name the job's number of shards (onceflow keeps its "
     "savepoints under .../onceflow-shards-N/); add --shards with the number the job ran with (a job started on "
     "Flink without --shards by an earlier onceflow ran with 8)"),
    ("file:/var/sp/my-onceflow-shards-2/savepoint-1a2b", None, "does not name the job's number of shards"),
])
def test_a_restore_with_other_shards_or_none_named_is_refused(path, given, message):
    with pytest.raises(UsageError) as refused:
        shards_to_restore(path, given)
    assert message in str(refused.value)


def test_the_job_takes_its_shards_from_the_savepoint_and_refuses_others_in_one_line(tmp_path):
    from onceflow.pipelines.aggregate import job_from_options

    sink = f"--sink=sqlite:///{tmp_path}/out.db"
    restore = f"--savepoint_path=file:{tmp_path}/onceflow-shards-3/savepoint-1a2b"
    assert job_from_options(parse_pipeline_args([*LIVE, *FLINK, sink, restore])).shards == 3
    # Not on Flink: the savepoint flag is refused later, by the savepoint checks, in their words.
    assert job_from_options(parse_pipeline_args([*LIVE, "--runner=PrismRunner", sink,
                                                 "--savepoint_path=file:/var/sp/savepoint-1"])).shards == 2
    result = _run_cli(*LIVE, *FLINK, sink, f"--dlq={tmp_path}/dlq.jsonl", restore, "--shards=2")
    assert result.returncode == 2
    assert _lines(result.stderr) == [f"aggregate: error: --shards=2: the savepoint file:{tmp_path}/onceflow-shards-3/"
                                     "savepoint-1a2b holds the job's state in 3 shards; pass --shards=3 or leave "
                                     "--shards out"], result.stderr
    assert not (tmp_path / "out.db").exists()


def test_help_lists_the_savepoint_flags():
    result = _run_cli("--help")
    for flag in ("--flink_savepoint_dir", "--flink_rest_url", "--savepoint_path", "--allow_non_restored_state"):
        assert flag in result.stdout


@pytest.mark.parametrize("flags, live, bundle_ms", [
    (FLINK, True, LIVE_FLINK_BUNDLE_TIME_MS),
    (("--runner=FlinkRunner",), True, LIVE_FLINK_BUNDLE_TIME_MS),
    ((*FLINK, "--max_bundle_time_mills=1000"), True, 1000),
    (FLINK, False, None),
    (("--runner=PrismRunner", "--prism_location=/bin/true"), True, None),
    (("--runner=DataflowRunner",), True, None),
])
def test_a_live_job_on_flink_gets_short_bundles_unless_told(flags, live, bundle_ms):
    options = parse_pipeline_args(list(flags))
    prepare_runner(options, live=live, reads_kafka=True, kafka_readers=1)
    # what the portable runner sends the job server: every option, unknown ones too
    sent = options.get_all_options(retain_unknown_options=True)
    assert sent.get("max_bundle_time_mills") == bundle_ms


def test_a_bundle_time_below_one_millisecond_is_refused_in_one_line():
    with pytest.raises(UsageError, match="--max_bundle_time_mills: 0 is not a positive number of milliseconds"):
        prepare_runner(parse_pipeline_args([*FLINK, "--max_bundle_time_mills=0"]), live=True, reads_kafka=True,
                       kafka_readers=1)


LOOPBACK = (*FLINK, "--environment_type=LOOPBACK")


def test_loopback_worker_processes_run_the_workers_as_processes_of_this_interpreter(monkeypatch):
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))
    monkeypatch.setenv(JOB_PROCESS_ENV, "")  # restored (removed) after the test
    options = parse_pipeline_args([*LOOPBACK, "--loopback_worker_processes=2", "--parallelism=2"])
    prepare_runner(options, live=True, reads_kafka=True, kafka_readers=2)
    sent = options.get_all_options(retain_unknown_options=True)
    assert sent["sdk_worker_parallelism"] == 2
    assert USE_LOOPBACK_PROCESS_WORKER in sent["experiments"]
    # Beam starts each worker as `python -c ...`: the name must find this interpreter
    assert os.path.samefile(shutil.which("python"), sys.executable)
    assert os.environ[JOB_PROCESS_ENV] == str(os.getpid())


@pytest.mark.parametrize("flags, fragment", [
    ((*LOOPBACK, "--loopback_worker_processes=0"), "0 is not a positive number of processes"),
    ((*FLINK, "--environment_type=DOCKER", "--loopback_worker_processes=2"), "needs a job on Flink with"),
    (("--runner=PrismRunner", "--prism_location=/bin/true", "--environment_type=LOOPBACK",
      "--loopback_worker_processes=2"), "needs a job on Flink with"),
])
def test_loopback_worker_processes_where_they_cannot_work_are_refused_in_one_line(flags, fragment):
    with pytest.raises(UsageError, match=fragment):
        prepare_runner(parse_pipeline_args(list(flags)), live=True, reads_kafka=True, kafka_readers=1)


def test_without_the_flag_the_workers_stay_threads():
    options = parse_pipeline_args(list(LOOPBACK))
    prepare_runner(options, live=True, reads_kafka=True, kafka_readers=1)
    sent = options.get_all_options(retain_unknown_options=True)
    assert sent.get("sdk_worker_parallelism") == 1
    assert USE_LOOPBACK_PROCESS_WORKER not in (sent.get("experiments") or [])


def test_a_worker_process_ends_when_the_job_process_is_killed(tmp_path):
    """A LOOPBACK worker process outlives a killed job process (it is re-parented)
    and would go on running the job's steps: importing onceflow there starts a
    watch that ends it."""
    parent = (
        "import os, subprocess, sys, time\n"
        f"os.environ[{JOB_PROCESS_ENV!r}] = str(os.getpid())\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import onceflow, time; time.sleep(60)'],\n"
        "                         stdout=subprocess.DEVNULL)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(3)\n"  # the child has imported onceflow
        "os.kill(os.getpid(), 9)\n"
    )
    started = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    child = int(started.stdout.split()[0])
    deadline = time.monotonic() + 15
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    exited = not process_alive(child)
    if not exited:
        os.kill(child, 9)
    assert exited, "the worker process outlived the job process"


def test_a_process_the_job_process_did_not_start_is_not_watched():
    code = (f"import os; os.environ[{JOB_PROCESS_ENV!r}] = '1'; "
            "import threading, onceflow; "
            "print([t.name for t in threading.enumerate()])")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "onceflow-exit-with-job" not in found.stdout and found.returncode == 0


def test_flags_passed_on_to_the_runner_are_not_also_said_to_be_discarded(caplog, capsys):
    """Beam's Python SDK logs "Discarding unparseable args" for the flags it does
    not know, which the portable runner passes on all the same: beside onceflow's
    own line it read as a contradiction."""
    import logging

    with caplog.at_level(logging.WARNING):
        options = parse_pipeline_args([*FLINK, "--checkpointing_interval=20000"])
        options.get_all_options()
    assert "passing flags unknown to Beam's Python SDK on to the runner: --checkpointing_interval" in \
        capsys.readouterr().err
    assert not [record for record in caplog.records if "Discarding" in record.getMessage()]


def test_a_backfill_on_prism_runs_the_built_prism(monkeypatch, tmp_path):
    """--runner=PrismRunner without --prism_location made Beam download Prism from
    GitHub (a 130-line traceback where it cannot be reached), though the dev stack
    had built one; a live job without --runner used the built one already."""
    from apache_beam.options.pipeline_options import PrismRunnerOptions

    from onceflow import runners
    from onceflow.options import parse_pipeline_args

    built = tmp_path / "prism"
    monkeypatch.setattr(runners, "built_prism", lambda: str(built))
    options = parse_pipeline_args(["--runner=PrismRunner"])
    runners.prepare_runner(options, live=False, reads_kafka=False, kafka_readers=1)
    assert options.view_as(PrismRunnerOptions).prism_location == str(built)
    given = parse_pipeline_args(["--runner=PrismRunner", "--prism_location=/opt/prism"])
    runners.prepare_runner(given, live=False, reads_kafka=False, kafka_readers=1)
    assert given.view_as(PrismRunnerOptions).prism_location == "/opt/prism"


def test_a_live_job_without_a_built_prism_names_where_it_looked(monkeypatch, tmp_path):
    """Run from another folder than the one `onceflow dev up` ran in, a live job found
    no Prism and told the user to build it, which they had: the refusal names the
    folder it looked in and ONCEFLOW_HOME."""
    from onceflow import runners

    monkeypatch.setenv("ONCEFLOW_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(UsageError) as refused:
        runners.choose_streaming_runner(parse_pipeline_args([]))
    assert str(tmp_path / "elsewhere") in str(refused.value)
    assert "ONCEFLOW_HOME" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_savepoints_go_into_a_folder_naming_their_job_and_another_jobs_is_refused():
    """A savepoint of another job (another group, topic and table) was restored:
    that job's topic was read into these rows, and the table could not be resumed
    after (the audit: 53 extra rows, 122 extra dead letters)."""
    from onceflow.pipelines.flink_savepoint import job_identity

    mine = job_identity("orders-live", "kafka://127.0.0.1:19092/orders", "postgresql ... (table rows)")
    other = job_identity("orders-live", "kafka://127.0.0.1:19092/payments", "postgresql ... (table rows)")
    assert mine != other and len(mine) == 12
    stop = _stop(*FLINK, "--flink_savepoint_dir=/var/sp", REST, "--job_name=j", identity=mine)
    assert stop.savepoint_dir == f"/var/sp/onceflow-shards-2/onceflow-job-{mine}"
    for fine in (f"file:/var/sp/onceflow-shards-2/onceflow-job-{mine}/savepoint-1a2b",
                 "file:/var/sp/onceflow-shards-2/savepoint-1a2b"):  # an earlier onceflow's: not checked
        assert _stop(*FLINK, REST, f"--savepoint_path={fine}", identity=mine).restore_from == fine
    with pytest.raises(UsageError) as refused:
        _stop(*FLINK, REST, f"--savepoint_path=file:/var/sp/onceflow-shards-2/onceflow-job-{other}/savepoint-1a2b",
              identity=mine)
    assert str(refused.value).startswith(f"--savepoint_path: file:/var/sp/onceflow-shards-2/onceflow-job-{other}/"
                                         f"savepoint-1a2b is a savepoint of another job (its folder onceflow-job-"
                                         f"{other}; this job's, by its --kafka_group, topic and --sink, is "
                                         f"onceflow-job-{mine})")
