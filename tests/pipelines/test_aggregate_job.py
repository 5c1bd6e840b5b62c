"""The main job end to end on files, against an independent reference."""

import base64
import datetime
import json
import sqlite3
import subprocess
import sys
import uuid

import pytest

from onceflow.io.dlq.jsonl import read_dead_letters
from onceflow.options import SAMPLE_INPUT
from onceflow.pipelines.aggregate import run
from tests.pipelines.reference import expected_job

MINUTE = 60_000


def millis(text):
    return round(datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def table_rows(db_path, table="aggregates"):
    """Every row without the wall-clock written_at column."""
    with sqlite3.connect(db_path) as connection:
        connection.row_factory = sqlite3.Row
        return sorted(
            tuple((k, r[k]) for k in r.keys() if k != "written_at")
            for r in connection.execute(f'SELECT * FROM "{table}"')
        )


def run_job(tmp_path, *flags):
    db = tmp_path / "out.db"
    dlq = tmp_path / "dlq.jsonl"
    summary = run([f"--sink=sqlite:///{db}", f"--dlq={dlq}", *flags])
    return summary, db, dlq


def test_sample_matches_an_independent_computation(tmp_path):
    summary, db, dlq = run_job(tmp_path)
    expected_rows, expected_dead = expected_job(SAMPLE_INPUT, MINUTE, 5 * MINUTE)
    found = {}
    for row in table_rows(db):
        row = dict(row)
        found[(row["store"], millis(row["window_start"]))] = row
    assert set(found) == set(expected_rows)
    for key, expected in expected_rows.items():
        row = found[key]
        assert millis(row["window_end"]) - millis(row["window_start"]) == MINUTE
        assert row["event_count"] == expected["count"]
        for column, value in expected.items():
            assert row[column] == value, (key, column)
    dead = {(e["source"]["line"], "too_late" if e["reason"] == "too_late" else "bad")
            for e in read_dead_letters(str(dlq))}
    assert dead == expected_dead
    assert len([d for d in expected_dead if d[1] == "bad"]) == 9 and len(expected_dead) == 11
    assert summary.count("duplicates_dropped") == 45
    assert summary.count("sink_rows_written") == len(expected_rows)


def test_running_twice_leaves_identical_rows(tmp_path):
    _, db, dlq = run_job(tmp_path)
    first = table_rows(db)
    second_summary, _, _ = run_job(tmp_path)
    assert table_rows(db) == first
    assert len(list(read_dead_letters(str(dlq)))) == 11  # appended twice, read once
    assert second_summary.count("sink_rows_stale") == 0  # equal versions are rewritten, not refused


@pytest.mark.parametrize("name", ["marked.jsonl", "marked.jsonl.gz"])
def test_a_byte_order_mark_at_the_start_of_a_file_is_not_part_of_its_first_record(name, tmp_path):
    """A file saved with a UTF-8 byte order mark had its first record refused as
    malformed_json ("Unexpected UTF-8 BOM"); a mark anywhere else still is."""
    import gzip

    data = b"\xef\xbb\xbf" + open(SAMPLE_INPUT, "rb").read()
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    (tmp_path / "ref.jsonl").write_bytes(data)
    _, db, dlq = run_job(tmp_path, f"--input={tmp_path / name}")
    marked = {(row["store"], millis(row["window_start"])): row["event_count"] for row in map(dict, table_rows(db))}
    plain_rows, plain_dead = expected_job(str(tmp_path / "ref.jsonl"), MINUTE, 5 * MINUTE)
    assert marked == {key: row["count"] for key, row in plain_rows.items()}
    dead = {(e["source"]["line"], "too_late" if e["reason"] == "too_late" else "bad")
            for e in read_dead_letters(str(dlq))}
    assert dead == plain_dead and all(line != 1 for line, _ in dead)


def test_sliding_windows_and_other_aggregates(tmp_path):
    _, db, _ = run_job(tmp_path, "--window=10m", "--window_period=5m", "--aggregate=count,first:price",
                       "--allowed_lateness=0")
    rows = [dict(r) for r in table_rows(db)]
    assert rows and all(millis(r["window_end"]) - millis(r["window_start"]) == 10 * MINUTE for r in rows)
    assert {millis(r["window_start"]) % (5 * MINUTE) for r in rows} == {0}
    assert set(rows[0]) == {"store", "window_start", "window_end", "event_count", "count", "first_price"}


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onceflow.pipelines.aggregate", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("flags, fragment", [
    (["--window", "banana"], "--window: 'banana' is not a duration"),
    (["--window=0"], "--window"),
    (["--allowed_lateness=soon"], "--allowed_lateness"),
    (["--allowed_lateness="], "--allowed_lateness: '' is not a duration"),
    (["--aggregate=median:qty"], "--aggregate: unknown aggregate 'median'"),
    (["--sink=mysql://x/y"], "--sink"),
    (["--sink=sqlite:///x.db?table=a;b"], "--sink"),
    (["--sink=sqlite:///x.db?table=onceflow_progress"], "--sink: table 'onceflow_progress' is where onceflow keeps"),
    (["--input=/nonexistent/*.jsonl"], "--input: nothing matches"),
    (["--windw=5m"], "unknown flag --windw; did you mean --window?"),
    (["--key_fields=a,,b"], "--key_fields"),
    (["--early_firing=1500ms"], "--early_firing"),
    (["--window=10m", "--window_period=20m"], "--window_period"),
    (["--key_fields=written_at"], "'written_at' names two columns"),
    (["--runner=NoSuchRunner"], "--runner: unknown runner 'NoSuchRunner'"),
    (["--direct_num_workers=-1"], "--direct_num_workers: -1 is not a number of workers"),  # Beam's IndexError
    (["--kafka_setting=a=b"], "--kafka_setting: nothing in this job is on Kafka"),  # was ignored without a word
    (["--window=99999999999d"], "--window: 99999999999d is longer than the span from 1970, where windows "
                                "are aligned, to the year 9999"),
    # Accepted, it sent every event to the DLQ as bad_timestamp, exit 0.
    (["--window=3650000d"], "--window: 3650000d is longer than the span from 1970, where windows are aligned, "
                            "to the year 9999"),
    # Accepted, it put each event in 60,000 windows: memory grew past 8 GB on 20,000 events.
    (["--window=1m", "--window_period=1ms"], "--window_period: 1ms puts each event in 60,000 windows of 1m; at "
                                             "most 10,000: give a longer period"),
    (["--input_format=avro"], "is not an Avro container file"),
    (["--bogus=1"], "unknown flag --bogus; see --help"),
    (["--time_field="], "--time_field: empty; give the name of the field"),  # named three flags, not this one
    (["--kafka_group=mine"], "--kafka_group: only a kafka://HOST:PORT/TOPIC input reads with it"),
    (["--kafka_readers=2"], "--kafka_readers: only a kafka://HOST:PORT/TOPIC input reads with it"),
    (["--key_fields=window_start"], "'window_start' names two columns"),
    # SQLite said "cannot use x.db as an SQLite database (duplicate column name: Store)".
    (["--key_fields=store,Store"], "--sink: columns 'store' and 'Store' differ only in case, and SQLite takes "
                                   "them for one"),
])
def test_bad_flags_get_one_line(flags, fragment, tmp_path):
    assert_one_usage_line(run_cli(*flags, cwd=tmp_path), fragment)


def test_an_input_the_file_system_cannot_reach_is_one_line(monkeypatch):
    """A path the file system cannot reach (a cloud bucket: no access, no network)
    failed in a traceback from the archive check, before the input's own check."""
    from apache_beam.io.filesystems import FileSystems

    from onceflow.errors import ServiceError
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options

    def unreachable(path):
        raise RuntimeError("Deadline of 120.0s exceeded while calling target function\nretrying")

    monkeypatch.setattr(FileSystems, "exists", unreachable)
    with pytest.raises(ServiceError, match=r"^--input: cannot look at '/mnt/bucket/orders/\*.jsonl' \(Deadline of "
                                           r"120.0s exceeded while calling target function\); check the path"):
        job_from_options(parse_pipeline_args(["--input=/mnt/bucket/orders/*.jsonl", "--sink=sqlite:///x.db"]))


def test_a_sink_holding_windows_of_another_size_is_refused(tmp_path):
    """A backfill with another --window into a table of 1-minute rows was accepted:
    the table held 48 rows with 5,200 events against 2,600 produced."""
    sink = f"--sink=sqlite:///{tmp_path}/out.db"
    assert run_cli(sink, f"--dlq={tmp_path}/dlq.jsonl", cwd=tmp_path).returncode == 0
    assert_one_usage_line(run_cli(sink, f"--dlq={tmp_path}/dlq.jsonl", "--window=2m", cwd=tmp_path),
                          f"--sink: sqlite {tmp_path}/out.db (table aggregates) holds windows of 1m, and this job "
                          "writes windows of 2m: rows of both in one table count each event twice")
    assert run_cli(sink, f"--dlq={tmp_path}/dlq.jsonl", "--window=60s", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("sink", ["sqlite", "file", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_sink_a_live_job_keeps_another_window_size_for_is_refused_before_its_first_row(sink, tmp_path, request):
    """A live job stores its settings at its first start, before any row; a
    backfill with another --window into its table, started before the first row,
    was accepted (the newest row was all the check looked at), and the table held
    rows of 10 s and of 20 s: every event counted twice, both runs exit 0."""
    from onceflow.io.progress import JobSettings, settings_positions
    from onceflow.io.sinks import parse_sink_url, progress_store
    from onceflow.windowing import WindowSpec

    if sink == "postgresql":
        url = f"{request.getfixturevalue('postgres_dsn')}?table=t_{uuid.uuid4().hex[:10]}"
    else:
        url = {"sqlite": f"sqlite:///{tmp_path}/out.db", "file": f"file://{tmp_path}/out"}[sink]
    (tmp_path / "out").mkdir()
    store = progress_store(parse_sink_url(url))
    live = JobSettings(WindowSpec(size_ms=10_000, allowed_lateness_ms=300_000), "field", "event_time", "order_id")
    store.write("orders-live#settings", settings_positions("orders", live, "topic-id"))
    refused = run_cli(f"--sink={url}", f"--dlq={tmp_path}/dlq.jsonl", "--window=20s", cwd=tmp_path)
    assert_one_usage_line(refused, "is written by a live job with windows of 10s, and this job writes windows of 20s")
    assert run_cli(f"--sink={url}", f"--dlq={tmp_path}/dlq.jsonl", "--window=10s", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("file_format", ["parquet", "avro"])
def test_a_folder_of_window_files_of_another_size_is_refused(tmp_path, file_format):
    """The same check for window files, from their names: a folder of 1-minute
    files took 2-minute ones beside them (each event counted in both)."""
    sink = f"--sink=file://{tmp_path}/out?format={file_format}"
    assert run_cli(sink, f"--dlq={tmp_path}/dlq.jsonl", cwd=tmp_path).returncode == 0
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert_one_usage_line(run_cli(sink, f"--dlq={tmp_path}/dlq.jsonl", "--window=2m", cwd=tmp_path),
                          f"--sink: file {tmp_path}/out (format {file_format}) holds windows of 1m, and this job "
                          "writes windows of 2m: rows of both in one directory count each event twice; give "
                          "--window the directory's size, or write to another directory")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == written
    assert run_cli(sink, f"--dlq={tmp_path}/dlq.jsonl", "--window=60s", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("first, second", [("parquet", "avro"), ("avro", "parquet")])
def test_a_folder_of_window_files_of_the_other_format_is_refused(tmp_path, first, second):
    """A folder of Parquet window files took Avro files of the same windows beside
    them (121 of each): a reader of the folder counts each event twice."""
    assert run_cli(f"--sink=file:{tmp_path}/out?format={first}", f"--dlq={tmp_path}/dlq.jsonl",
                   cwd=tmp_path).returncode == 0
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert_one_usage_line(run_cli(f"--sink=file:{tmp_path}/out?format={second}", f"--dlq={tmp_path}/dlq.jsonl",
                                  cwd=tmp_path),
                          f"--sink: {tmp_path}/out holds {first} window files, and this job writes {second} ones: "
                          "files of both for the same windows count each event twice; give ?format=" + first)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == written


def test_early_firing_on_a_backfill_is_noted(tmp_path):
    """--early_firing on a bounded run was ignored without a word."""
    result = run_cli(f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl", "--early_firing=5s",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("aggregate: note: --early_firing is for live jobs: a backfill writes each window once it is complete"
            in result.stderr.splitlines())


def assert_one_usage_line(result, fragment):
    """The job refused its input with exit status 2 and one line holding ``fragment``."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip() and "apitools" not in l]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], result.stderr


def _bad_paths(folder):
    """Files a user may point the job at by mistake, in ``folder``."""
    import bz2
    import gzip

    data = open(SAMPLE_INPUT, "rb").read() * 20
    packed = gzip.compress(data)
    (folder / "half.jsonl.gz").write_bytes(packed[:len(packed) // 2])
    packed = bz2.compress(data)
    (folder / "half.jsonl.bz2").write_bytes(packed[:len(packed) // 2])
    (folder / "plain.jsonl.gz").write_bytes(data[:5000])
    (folder / "empty.jsonl.gz").write_bytes(b"")
    (folder / "folder").mkdir()
    (folder / "notes.txt").write_text("not a dead letter\n")
    import io

    import fastavro

    schema = {"type": "record", "name": "Order", "fields": [
        {"name": name, "type": kind} for name, kind in (("order_id", "string"), ("event_time", "string"),
                                                        ("store", "string"), ("qty", "long"), ("price", "double"))]}
    packed = io.BytesIO()
    fastavro.writer(packed, fastavro.parse_schema(schema), [
        {"order_id": f"o{n}", "event_time": "2026-11-02T09:00:00Z", "store": "s1", "qty": 1, "price": 1.0}
        for n in range(3000)])
    (folder / "half.avro").write_bytes(packed.getvalue()[:len(packed.getvalue()) // 2])


@pytest.mark.parametrize("flags, fragment", [
    (["--input=half.jsonl.gz"], "half.jsonl.gz: the compressed file is cut off"),
    (["--input=half.jsonl.bz2"], "half.jsonl.bz2: the compressed file is cut off"),
    (["--input=plain.jsonl.gz"], "plain.jsonl.gz: not compressed as its name says"),
    (["--input=empty.jsonl.gz"], "empty.jsonl.gz: the compressed file is cut off (the file is empty"),
    (["--input=half.avro"], "half.avro: the file is cut off (Expected"),  # said "the compressed file"
    (["--input=folder"], "/folder is a directory; give its files, e.g. --input=/"),
    (["--input=/"], "--input: / is a directory; give its files"),  # Beam's match listed the files of /
    (["--input="], "--input: empty; give a file or glob"),  # said the working directory is a directory
    (["--sink=sqlite:///folder"], "--sink: folder is a directory"),
    (["--sink=file:notes.txt?format=avro"], "--sink: notes.txt is a file; a file sink writes its window files into a "
                                            "folder"),  # it said "notes.txt: file exists"
    (["--sink=sqlite:///notes.txt"], "--sink: cannot use notes.txt as an SQLite database (file is not a database)"),
    (["--dlq=notes.txt"], "--dlq: notes.txt is not a dead-letter queue"),
    (["--dlq=folder"], "--dlq: folder: is a directory"),
    (["--dlq=dlq.jsonl.gz"], "--dlq: dlq.jsonl.gz: a JSON-lines queue is written as plain text"),  # under a .gz name
    (["--metrics_out=folder"], "--metrics_out: folder is a directory"),
    (["--metrics_out=/proc/metrics.json"], "--metrics_out: cannot write in /proc"),  # the rows, then a traceback
    (["--metrics_out=" + "m" * 300 + ".json"], "--metrics_out: the file name is 305 bytes long"),  # lost, exit 0
    # The summary replaced the file, exit 0: the dead letters, the input or the sink's rows lost.
    (["--dlq=d.jsonl", "--metrics_out=./d.jsonl"], "--metrics_out: ./d.jsonl is this run's --dlq file"),
    (["--input=notes.txt", "--metrics_out=notes.txt"], "--metrics_out: notes.txt is this run's --input file"),
    (["--sink=sqlite:///s.db", "--metrics_out=s.db"], "--metrics_out: s.db is this run's --sink file"),
    (["--sink=sqlite:///s.db", "--dlq=s.db"], "--dlq: s.db is the sink's database file"),  # failed mid-run
    # Each run read the last one's dead letters as input, and the queue doubled run after run.
    (["--input=*.txt", "--dlq=new.txt"], "*.txt' takes this run's --dlq file new.txt, so the job would read what"),
    (["--input=*.txt", "--sink=sqlite:///s.txt"], "*.txt' takes this run's --sink file s.txt"),
    (["--input=*.txt", "--metrics_out=m.txt"], "*.txt' takes this run's --metrics_out file m.txt"),
])
def test_bad_files_and_paths_get_one_line_and_nothing_is_half_read(flags, fragment, tmp_path):
    _bad_paths(tmp_path)
    assert_one_usage_line(run_cli(*flags, "--status=off", cwd=tmp_path), fragment)
    assert (tmp_path / "notes.txt").read_text() == "not a dead letter\n"  # never appended to


@pytest.mark.parametrize("pattern, sink", [("in/**", "file:in/out"), ("in/*/*", "file:in/out?format=avro")])
def test_a_file_input_that_takes_the_sink_folder_is_refused(pattern, sink, tmp_path):
    """The next run read the window files (Parquet or Avro bytes) as JSON lines,
    every line a dead letter, and the run after that its own dead letters too."""
    (tmp_path / "in" / "day").mkdir(parents=True)
    (tmp_path / "in" / "day" / "orders.jsonl").write_bytes(open(SAMPLE_INPUT, "rb").read())
    result = run_cli(f"--input={pattern}", f"--sink={sink}", "--dlq=dlq.jsonl", "--status=off", cwd=tmp_path)
    assert_one_usage_line(result, f"/{pattern}' takes this run's sink folder in/out, so the job would read what it")
    assert not (tmp_path / "in" / "out").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--dlq=notes.txt"], "--dlq: notes.txt is not a dead-letter queue"),
    (["--metrics_out=folder"], "--metrics_out: folder is a directory"),
    (["--input=missing.jsonl"], "--input: nothing matches '/"),
])
def test_a_refused_run_creates_no_sink_table(flags, fragment, tmp_path):
    """A run refused by a later check (a bad --dlq, --metrics_out, --input) had
    already created the sink's table with its columns, and the corrected run with
    other aggregates was then refused for the table it had not asked for."""
    _bad_paths(tmp_path)
    db = tmp_path / "out.db"
    assert_one_usage_line(run_cli(*flags, f"--sink=sqlite:///{db}", "--status=off", cwd=tmp_path), fragment)
    assert not db.exists()
    ran = run_cli(f"--sink=sqlite:///{db}", "--aggregate=count,max:qty", "--status=off", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr


def test_help_lists_the_flags():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--input", "--key_fields", "--time_field", "--id_field", "--window", "--allowed_lateness",
                 "--aggregate", "--sink", "--dlq"):
        assert flag in result.stdout


def test_no_flags_runs_the_sample_and_prints_the_summary(tmp_path):
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "records read            2,492" in result.stdout
    assert "duplicates dropped         45" in result.stdout
    assert "too_late 2" in result.stdout
    assert (tmp_path / "onceflow-output" / "aggregates.db").exists()
    assert len(table_rows(tmp_path / "onceflow-output" / "aggregates.db")) > 600


def test_a_live_job_keeps_its_runner_streams_open_past_beams_default_timeout():
    """Beam's portable client gives a job's state and message streams
    --job_server_timeout as their deadline (300 s): a live job raises it, and
    keeps a value the user chose."""
    from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions

    from onceflow.runners import LIVE_JOB_SERVER_TIMEOUT_S, keep_live_job_streams_open

    options = PipelineOptions(["--runner=PrismRunner"])
    keep_live_job_streams_open(options)
    assert options.view_as(PortableOptions).job_server_timeout == LIVE_JOB_SERVER_TIMEOUT_S >= 365 * 24 * 3600
    chosen = PipelineOptions(["--job_server_timeout=86400"])
    keep_live_job_streams_open(chosen)
    assert chosen.view_as(PortableOptions).job_server_timeout == 86400


@pytest.mark.parametrize("flags, shards", [
    (("--input=kafka://127.0.0.1:9/orders", "--kafka_group=g"), 2),  # live, no --runner: Prism
    (("--input=kafka://127.0.0.1:9/orders", "--kafka_group=g", "--runner=PrismRunner"), 2),
    (("--input=kafka://127.0.0.1:9/orders", "--kafka_group=g", "--runner=PortableRunner"), 2),
    (("--input=kafka://127.0.0.1:9/orders", "--kafka_group=g", "--runner=FlinkRunner", "--parallelism=1"), 2),
    (("--input=kafka://127.0.0.1:9/orders", "--kafka_group=g", "--runner=FlinkRunner", "--parallelism=6"), 6),
    (("--input=kafka://127.0.0.1:9/orders", "--from=earliest", "--to=latest", "--runner=PortableRunner"), 8),
    (("--input=kafka://127.0.0.1:9/orders", "--kafka_group=g", "--runner=DataflowRunner"), 8),
    (("--input=kafka://127.0.0.1:9/orders", "--from=earliest", "--to=latest"), 8),  # a backfill: DirectRunner
    (("--input=kafka://127.0.0.1:9/orders", "--kafka_group=g", "--shards=5"), 5),
    (("--input=x.jsonl", "--runner=PortableRunner", "--shards=3"), 3),
])
def test_the_number_of_shards_defaults_by_runner(flags, shards, tmp_path):
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options

    sink = f"--sink=sqlite:///{tmp_path}/out.db"
    assert job_from_options(parse_pipeline_args([*flags, sink])).shards == shards


@pytest.mark.parametrize("flags, local", [
    ((), True),
    (("--runner=DirectRunner",), True),
    (("--runner=direct", "--direct_running_mode=multi_processing", "--direct_num_workers=2"), True),
    (("--runner=PrismRunner",), False),
    (("--runner=PortableRunner",), False),
    (("--streaming",), False),
])
def test_a_backfill_on_the_direct_runner_runs_on_its_fn_api_runner(flags, local):
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

    from onceflow.options import parse_pipeline_args
    from onceflow.runners import local_batch_runner

    options = parse_pipeline_args(list(flags))
    assert isinstance(local_batch_runner(options, live=False), FnApiRunner) is local
    assert local_batch_runner(options, live=True) is None


def test_a_backfill_never_tries_prism_first(tmp_path, caplog):
    """Beam's DirectRunner tries Prism first, fetching its binary from GitHub: a
    backfill would download Prism and run there where that works (slower), and
    waits for the refusal where it does not."""
    import logging

    from onceflow import metrics

    with caplog.at_level(logging.INFO, logger="apache_beam.runners.direct.direct_runner"):
        summary = run([f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl", "--status=off"])
    assert summary.count(metrics.SINK_ROWS_WRITTEN) > 0
    assert not [r for r in caplog.records if "Prism" in r.getMessage()], caplog.text


def shuffled_half_hour(path, count=3_000, seed=7, shuffle=True):
    """A JSON-lines file of ``count`` orders spread over 30 minutes, in random
    time order (or in time order); returns the number of lines."""
    import json
    import random

    from onceflow.events import format_utc_ms

    start = 1_793_610_000_000  # 2026-11-02T09:00:00Z
    events = [{"order_id": f"o-{n}", "event_time": format_utc_ms(start + n * 1_800_000 // count),
               "store": f"s{n % 5}", "sku": "tea", "qty": 1, "price": 1.0} for n in range(count)]
    if shuffle:
        random.Random(seed).shuffle(events)
    path.write_text("".join(json.dumps(event) + "\n" for event in events))
    return count


def test_the_summary_explains_lateness_when_out_of_order_input_goes_to_the_dlq(tmp_path):
    source = tmp_path / "orders.jsonl"
    shuffled_half_hour(source)
    summary = run([f"--input={source}", f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl",
                   "--status=off"])
    too_late = summary.dead_letters_by_reason["too_late"]
    assert too_late >= 300  # at least 10% of the 3,000 records
    text = summary.render()
    assert f"note: {too_late:,} of 3,000 records" in text
    assert "measured against the newest event time before a record in its file or Kafka partition" in text
    assert "--allowed_lateness" in text
    # A command that runs: it lacked --dlq, which dlq replay requires.
    assert f"onceflow dlq replay --dlq={tmp_path}/dlq.jsonl --reason too_late -- <the job's flags>" in text
    assert summary.to_json()["notes"] == summary.notes() != []

    # The same events in time order, or a lateness that covers the disorder: no note.
    summary = run([f"--input={source}", f"--sink=sqlite:///{tmp_path}/wide.db", f"--dlq={tmp_path}/wide.jsonl",
                   "--status=off", "--allowed_lateness=1h"])
    assert summary.dead_letters_by_reason.get("too_late", 0) == 0 and "note:" not in summary.render()
    ordered = tmp_path / "ordered.jsonl"
    shuffled_half_hour(ordered, shuffle=False)
    summary = run([f"--input={ordered}", f"--sink=sqlite:///{tmp_path}/ordered.db",
                   f"--dlq={tmp_path}/ordered-dlq.jsonl", "--status=off"])
    assert "note:" not in summary.render()


def test_the_summary_names_the_field_flags_when_most_records_break_the_schema(tmp_path):
    """A misspelled --time_field sent every record to the DLQ and the run ended
    exit 0 with no word about why (the sample's 3 schema violations get no note)."""
    summary = run([f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl", "--status=off",
                   "--time_field=evnt_time"])
    refused = summary.dead_letters_by_reason["schema_violation"]
    assert refused > 0.5 * summary.count("records_read")
    assert (f"note: {refused:,} of 2,492 records (100%) went to the dead-letter queue as schema_violation: if "
            "--time_field, --key_fields or --aggregate names a field the records do not have") in summary.render()
    summary = run([f"--sink=sqlite:///{tmp_path}/fine.db", f"--dlq={tmp_path}/fine.jsonl", "--status=off"])
    assert summary.dead_letters_by_reason["schema_violation"] == 3 and "note:" not in summary.render()


def test_the_summary_names_the_reader_schema_when_most_records_do_not_decode():
    """A reader schema of another record name dead-lettered every record as
    avro_decode_error, exit 0, without a word."""
    from onceflow import metrics
    from onceflow.pipelines.summary import RunSummary

    counters = {metrics.RECORDS_READ: 283, f"{metrics.DEAD_LETTERS}.avro_decode_error": 263}
    text = RunSummary("DirectRunner", 1.0, counters, "sink", "dlq.jsonl").render()
    assert ("note: 263 of 283 records (93%) went to the dead-letter queue as avro_decode_error: if "
            "--avro_reader_schema does not match the writers' schemas") in text
    assert "onceflow dlq list --dlq=dlq.jsonl --reason avro_decode_error" in text
    counters[f"{metrics.DEAD_LETTERS}.avro_decode_error"] = 3
    assert "note:" not in RunSummary("DirectRunner", 1.0, counters, "sink", "dlq.jsonl").render()


def test_an_id_field_no_record_has_is_warned_of_once(tmp_path):
    """A misspelled --id_field derived every ID from content, without a word: a
    copy differing in any field was counted twice, exit 0."""
    result = run_cli(f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl", "--status=off",
                     "--id_field=orderid", f"--metrics_out={tmp_path}/wrong.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    warning = ("WARNING:onceflow.batches:--id_field 'orderid' is in none of 2,487 records read together: their IDs "
               "are derived from their content")
    assert result.stderr.count(warning) == 1, result.stderr[-2000:]
    # The summary says it too, and --metrics_out counts the records (the 5 that are not JSON objects aside).
    assert ("note: 2,487 of 2,492 records (100%) have no --id_field field: their event IDs were derived from their "
            "content") in result.stdout
    assert json.loads((tmp_path / "wrong.json").read_text())["records_without_id"] == 2_487
    result = run_cli(f"--sink=sqlite:///{tmp_path}/right.db", f"--dlq={tmp_path}/right.jsonl", "--status=off",
                     f"--metrics_out={tmp_path}/right.json", cwd=tmp_path)
    assert result.returncode == 0 and "--id_field" not in result.stderr + result.stdout
    assert json.loads((tmp_path / "right.json").read_text())["records_without_id"] == 64  # the sample's own, no note


def test_an_avro_container_file_end_to_end(tmp_path):
    """A plain Avro container file (writer schema in its header) through the main
    job: rows against a computation here, the record the contract refuses in the DLQ."""
    import fastavro

    schema = {"type": "record", "name": "Order", "fields": [
        {"name": "order_id", "type": "string"}, {"name": "event_time", "type": "string"},
        {"name": "store", "type": "string"}, {"name": "qty", "type": "long"}, {"name": "price", "type": "double"}]}
    base = datetime.datetime(2026, 11, 2, 9, tzinfo=datetime.timezone.utc)
    records = [{"order_id": f"o-{n}", "event_time": (base + datetime.timedelta(seconds=7 * n)).isoformat(),
                "store": f"s{n % 2}", "qty": n, "price": 1.0 + n} for n in range(40)]
    records.insert(12, {**records[3], "order_id": "bad", "event_time": "yesterday"})
    records.append(records[5])  # a duplicate
    path = tmp_path / "orders.avro"
    with open(path, "wb") as handle:
        fastavro.writer(handle, fastavro.parse_schema(schema), records)
    _, db, dlq = run_job(tmp_path, f"--input={path}", "--aggregate=count,sum:qty,max:price", "--status=off")
    expected = {}
    for record in records[:12] + records[13:-1]:
        moment = millis(record["event_time"])
        row = expected.setdefault((record["store"], moment - moment % MINUTE), [0, 0, None])
        row[0] += 1
        row[1] += record["qty"]
        row[2] = record["price"] if row[2] is None else max(row[2], record["price"])
    found = {}
    for row in table_rows(db):
        row = dict(row)
        found[(row["store"], millis(row["window_start"]))] = [row["event_count"], row["sum_qty"], row["max_price"]]
    assert found == expected
    assert [(e["reason"], e["source"]) for e in read_dead_letters(str(dlq))] == [
        ("bad_timestamp", {"file": str(path), "record": 13})]  # record numbers count from 1, like lines


def test_avro_datums_are_read_as_written_and_a_bad_one_is_a_dead_letter(tmp_path):
    """The reader wrote each decoded datum back to get its bytes: a long in a union
    whose double branch comes first came back a double (sum and max off past
    2**53), and a string that is not UTF-8 failed the whole run with a traceback,
    its good records lost. Now the datums keep their bytes, across blocks, and the
    bad one is a dead letter holding them."""
    import io

    import fastavro

    schema = fastavro.parse_schema({"type": "record", "name": "Order", "fields": [
        {"name": "order_id", "type": "string"}, {"name": "event_time", "type": "long"},
        {"name": "store", "type": "string"}, {"name": "qty", "type": ["null", "double", "long"]}]})
    big = 2 ** 53 + 1
    records = [{"order_id": f"o{n}", "event_time": 1_793_610_000_000 + n, "store": "s1", "qty": ("long", big)}
               for n in range(30)]
    records[7]["store"] = "s\u00e9"  # written as C3 A9, patched below into C3 41: not UTF-8
    path = tmp_path / "orders.avro"
    with open(path, "wb") as handle:
        fastavro.writer(handle, schema, records, codec="deflate", sync_interval=200)  # several blocks
    bad = io.BytesIO()
    fastavro.schemaless_writer(bad, schema, records[7])
    raw_bad = bad.getvalue().replace(b"s\xc3\xa9", b"s\xc3\x41")
    plain = tmp_path / "plain.avro"  # the same datums uncompressed, so the bytes can be patched in place
    with open(plain, "wb") as handle:
        fastavro.writer(handle, schema, records, sync_interval=200)
    plain.write_bytes(plain.read_bytes().replace(b"s\xc3\xa9", b"s\xc3\x41"))
    for given in (path, plain):
        db = tmp_path / f"{given.stem}.db"
        run([f"--input={given}", "--aggregate=count,sum:qty,max:qty", "--status=off", f"--sink=sqlite:///{db}",
             f"--dlq={tmp_path}/{given.stem}.jsonl"])
        rows = [dict(row) for row in table_rows(db)]
        assert sorted((row["store"], row["event_count"], row["sum_qty"], row["max_qty"]) for row in rows) == [
            ("s1", 29, 29 * big, big), *([("s\u00e9", 1, big, big)] if given == path else [])]
    letters = list(read_dead_letters(f"{tmp_path}/plain.jsonl"))
    assert [(e["reason"], e["source"]) for e in letters] == [("avro_decode_error", {"file": str(plain), "record": 8})]
    assert base64.b64decode(letters[0]["raw_base64"]) == raw_bad


@pytest.mark.parametrize("scheme, extra", [("gs", "gcp"), ("s3", "aws"), ("azfs", "azure"), ("hdfs", "hadoop")])
def test_a_cloud_path_without_its_file_system_names_the_extra_to_install(scheme, extra, monkeypatch):
    """Beam said "Unable to get filesystem ... e.g. pip install apache-beam[gcp]" for
    every scheme, or an error of the client's (s3: "Must provide one of client or
    options") that onceflow passed on as a network problem."""
    import apache_beam as beam

    from onceflow.errors import UsageError
    from onceflow.io import files
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options

    monkeypatch.setitem(files._FILESYSTEM_EXTRAS, scheme, ("onceflow_surely_absent.client", extra))
    with pytest.raises(UsageError) as error:
        job_from_options(parse_pipeline_args([f"--input={scheme}://bucket/events/*.jsonl"]))
    assert str(error.value) == (f"--input: {scheme}:// paths need Beam's {extra} file system, not installed here: "
                                f"pip install 'apache-beam[{extra}]=={beam.__version__}'")
    monkeypatch.setitem(files._FILESYSTEM_EXTRAS, scheme, ("json", extra))  # installed: nothing is missing
    assert files.missing_filesystem(f"{scheme}://bucket/x.jsonl") is None
    assert files.missing_filesystem("/data/x.jsonl") is None


@pytest.mark.parametrize("sink, dlq, where", [
    ("kafka://127.0.0.1:19092/orders_out", "kafka://127.0.0.1:19092/orders_out", "topic"),
    ("kafka://a:9092,b:9092/rows", "kafka://b:9092,a:9092/rows", "topic"),
    ("postgresql://u@h:5432/db?table=rows", "postgresql://u@h:5432/db?table=rows", "table"),
])
def test_a_sink_and_a_queue_in_one_place_are_refused(sink, dlq, where):
    """Rows and dead letters in one topic made the queue unreadable to `onceflow
    dlq` ("offset 9 is not a dead letter"), exit 0; one PostgreSQL table was
    refused only after the queue's table had been created."""
    from onceflow.errors import UsageError
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options

    with pytest.raises(UsageError, match=f"^--dlq: .* is the sink's {where}: rows and dead letters cannot share one"):
        job_from_options(parse_pipeline_args(["--input=events.jsonl", f"--sink={sink}", f"--dlq={dlq}"]))
    other = dlq.replace("rows", "dead_letters").replace("orders_out", "orders_dlq")
    job = job_from_options(parse_pipeline_args(["--input=events.jsonl", f"--sink={sink}", f"--dlq={other}"]))
    assert job.dlq.table != job.sink.table


def test_a_job_the_runner_failed_without_a_step_error_is_one_line():
    """Prism resumed after a hang of a minute lost its SDK worker and failed the
    job: the run ended in a 25-line traceback of Beam's client."""
    from onceflow.pipelines.aggregate import _runner_failure

    said = ("bundle inst108 stage-003 failed:SDK worker disconnected: worker[job-001[job]_ref_Environment_default_"
            "environment_1], 2 active instructions, error: context canceled")
    assert _runner_failure(RuntimeError(f"Pipeline job-001 failed in state FAILED: {said}")) == said
    step = RuntimeError("Pipeline job-001 failed in state FAILED: bundle inst3 stage-002 failed:Traceback (most "
                        "recent call last):\n  File \"x.py\", line 1\nValueError: a bug")
    assert _runner_failure(step) is None  # a step's error keeps its traceback: it is the report
    assert _runner_failure(RuntimeError("something else")) is None
