"""``onceflow torture`` end to end against the real broker, PostgreSQL and Prism,
with the issue's short-run settings, and its one-line refusals of wrong flags."""

import json
import signal
import subprocess
import sys

import pytest

COMMAND = [sys.executable, "-m", "onceflow.cli", "torture"]


def torture(*flags: str, timeout_s: float = 1500) -> subprocess.CompletedProcess:
    """A torture run, stopped with SIGTERM if it outlasts ``timeout_s`` (it then
    stops its live job, which a SIGKILL of the torture, subprocess.run's timeout,
    left running with its runner after the test)."""
    process = subprocess.Popen([*COMMAND, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
        pytest.fail(f"the torture ran past {timeout_s}s; its last output:\n{stdout[-4000:]}{stderr[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.prism
@pytest.mark.slow
@pytest.mark.exclusive  # it restarts the broker
def test_a_short_torture_run_ends_exact_live_and_after_the_backfill(kafka_bootstrap, postgres_dsn, prism_path,
                                                                    tmp_path):
    """20,000 records, 3 SIGKILLs, 1 broker restart, 1 stall, 1 sink connection kill."""
    out = tmp_path / "run"
    run = torture("--events", "20000", "--kills", "3", "--broker-restarts", "1", "--stalls", "1", "--out", str(out))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["failures"] == []
    assert (report["kills"], report["broker_restarts"], report["stalls"], report["connection_kills"]) == (3, 1, 1, 1)
    assert report["job_starts"] == 4 and report["unexpected_exits"] == []
    assert report["records_produced"] == 20000 and report["missing_from_topic"] == 0
    assert report["records_in_topic"] >= 20000  # a producer retry after the broker restart may store one twice
    assert min(report["duplicates"], report["malformed"], report["too_late"], report["late_within_lateness"]) > 0
    for phase in ("live", "after_backfill"):
        assert report[phase]["exact"]
        assert report[phase]["rows_found"] == report[phase]["rows_expected"] > 0
        assert report[phase]["dlq_found"] == report[phase]["dlq_expected"] >= report["malformed"] + report["too_late"]
    assert report["stall_memory"][0]["rss_growth_mib"] <= report["memory_bound_mib"]
    # Faults a crowded schedule pushed past the stream's end are counted (they test restarts while catching up).
    assert report["last_record_produced_s"] >= 20000 / 200
    assert report["faults_after_production"] == sum(
        1 for fault in report["faults"] if fault["start_s"] > report["last_record_produced_s"])
    assert (out / "plot.png").stat().st_size > 10_000
    assert sum(1 for _ in open(out / "ledger.jsonl")) == 20000
    assert "onceflow torture: PASS" in run.stdout


@pytest.mark.kafka
@pytest.mark.prism
@pytest.mark.slow
@pytest.mark.exclusive  # it restarts the broker
def test_a_kill_before_the_first_row_loses_nothing_with_a_parquet_sink(kafka_bootstrap, postgres_dsn, prism_path,
                                                                      tmp_path):
    """The issue's second check: 5 SIGKILLs, the first after the job has read
    records and before it has stored a position past its start, into Parquet window files (their
    positions in the directory's manifest), with a broker restart and a stall of
    the directory's lock."""
    out = tmp_path / "run"
    run = torture("--events", "20000", "--kills", "5", "--kill-early", "--sink", "parquet", "--out", str(out))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["sink"] == "parquet" and report["kill_early"]
    assert (report["kills"], report["broker_restarts"], report["stalls"], report["connection_kills"]) == (5, 1, 1, 0)
    kills = [fault for fault in report["faults"] if fault["kind"] == "kill"]
    assert kills[0]["note"].startswith("before the first position past the start")
    for phase in ("live", "after_backfill"):
        assert report[phase]["exact"] and report[phase]["rows_found"] == report[phase]["rows_expected"] > 0
    jobs = json.loads((out / "sink" / "_onceflow_progress.json").read_text())
    (group,) = [name for name in jobs if not name.endswith("#settings")]
    assert sorted(jobs[group][report["topic"]]) == ["0", "1", "2"]  # the job's positions, kept in the sink's directory
    assert sorted(jobs[group + "#settings"][report["topic"]]) == [str(n) for n in range(7)]  # flags, topic ID


@pytest.mark.kafka
@pytest.mark.flink
@pytest.mark.slow
@pytest.mark.exclusive  # it restarts the broker
def test_sliding_windows_with_early_firing_into_avro_files_on_flink_stay_exact_under_kills(kafka_bootstrap,
                                                                                           flink_job_endpoint,
                                                                                           tmp_path):
    """Another corner of the matrix: 20 s windows every 5 s (each event in four
    rows), written early every 5 s, into Avro window files, on the Flink job
    server, through SIGKILLs, a broker restart and a stall of the files' lock."""
    out = tmp_path / "run"
    run = torture("--runner", "flink", "--sink", "avro", "--window", "20s", "--window-period", "5s", "--early-firing",
                  "5s", "--events", "8000", "--kills", "2", "--broker-restarts", "1", "--stalls", "1",
                  "--stall-seconds", "10", "--seed", "7", "--out", str(out))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and (report["sink"], report["window"], report["window_period"]) == ("avro", "20s", "5s")
    assert (report["kills"], report["broker_restarts"], report["stalls"]) == (2, 1, 1)
    for phase in ("live", "after_backfill"):
        assert report[phase]["exact"] and report[phase]["rows_found"] == report[phase]["rows_expected"] > 0
    # A window starts every 5 s for each of the stream's 20 keys (fixed 20 s windows would be a quarter of it).
    assert report["live"]["rows_expected"] >= report["production_s"] / 5 * 20
    assert "onceflow torture: PASS on flink, avro sink, 20s windows every 5s" in run.stdout


@pytest.mark.parametrize("flags, message", [
    (["--sink", "parquet", "--connection-kills", "1"], "--connection-kills: a parquet sink has no database sessions"),
    (["--kill-early", "--kills", "0"], "--kill-early: it moves the first of --kills"),
    (["--early-firing", "soon"], "--early-firing:"),
    (["--events", "0"], "is not a whole number above 0"),
    (["--kills", "-1"], "is not a whole number (0 or more)"),
    (["--runner", "spark"], "invalid choice: 'spark'"),
    (["--job-flag", "shards=4"], "--job-flag: 'shards=4' is not a flag"),
    (["--job-flag=--window=20s"], "--job-flag: the torture gives the job --window itself"),
    (["--job-flag=--kafka_time_source=record"], "--job-flag: the torture gives the job --kafka_time_source"),
    (["--window", "0s"], "--window: '0s' is not above 0"),
    (["--window", "20s", "--window-period", "15s"], "--window-period: '15s' does not divide --window 20s"),
    (["--allowed-lateness", "5s"], "--allowed-lateness: at --rate 200 the stream's events are up to 23 s behind"),
    (["--rate", "5"], "--allowed-lateness: at --rate 5 the stream's events are up to 107 s behind the clock"),
    (["--window", "20s", "--window-period", "0s"], "--window-period: '0s' is not above 0"),
    (["--job-flag=--window_per=5s"], "--job-flag: the job refuses its flags: unknown flag --window_per; did you "
                                     "mean --window_period?"),
    (["--job-flag=--shards=many"], "--job-flag: the job refuses its flags: --shards"),
    (["--window", "25m", "--allowed-lateness", "10m"], "--window plus --allowed-lateness must be at most 30m"),
    (["--bootstrap-server", "10.0.0.1:9092"], "--broker-restarts stops and starts the dev stack's broker only"),
])
def test_wrong_flags_get_one_line_and_status_2(flags, message):
    run = subprocess.run([*COMMAND, *flags], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr
