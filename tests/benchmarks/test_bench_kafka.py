"""The Kafka benchmark's truth, workload and comparison (no services needed)."""

import importlib.util
import json
import pathlib
import signal
import sys

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kafka.py"
_SPEC = importlib.util.spec_from_file_location("bench_kafka", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("bench_kafka", bench)  # dataclasses look their module up there
_SPEC.loader.exec_module(bench)


def line(order_id, t, store, qty):
    return json.dumps({"order_id": order_id, "event_time": t, "store": store, "qty": qty, "price": 1.5}).encode()


def test_truth_dedups_by_id_and_windows_by_minute():
    base = 1_793_610_000_000  # a whole minute
    lines = [line("a", base + 1, "s1", 2), line("a", base + 1, "s1", 2),  # an exact re-send
             line("b", base + 59_999, "s1", 3), line("c", base + 60_000, "s1", 4),
             line("d", base - 1, "s2", 5), b""]
    truth = bench.truth_from_lines(lines)
    assert truth.table == {("s1", base): (2, 5), ("s1", base + 60_000): (1, 4), ("s2", base - 60_000): (1, 5)}
    assert truth.records == 5 and truth.distinct == 4
    assert truth.max_behind_ms == 60_001  # "d" came after "c"


def test_workload_is_deterministic_with_exact_resends_keyed_by_store():
    first = list(bench.workload(5000, 100, seed=7))
    assert first == list(bench.workload(5000, 100, seed=7))
    values = [value for _, value in first]
    assert len(set(values)) == 5000
    resends = len(values) - 5000
    assert 20 <= resends <= 90  # about 1%
    for key, value in first:
        assert json.loads(value)["store"].encode() == key
    truth = bench.truth_from_lines(values)
    assert truth.distinct == 5000 and truth.max_behind_ms < 5 * 60_000


def test_compare_counts_wrong_missing_and_extra_rows():
    truth = {("s1", 0): (1, 2), ("s2", 0): (3, 4), ("s3", 0): (1, 1)}
    got = {("s1", 0): (1, 2), ("s2", 0): (3, 5), ("s4", 0): (1, 1)}
    diff = bench.compare(truth, got)
    assert (diff.wrong, diff.missing, diff.extra) == (1, 1, 1) and not diff.exact
    assert bench.compare(truth, dict(truth)).exact


def test_sink_window_start_is_read_as_epoch_ms():
    assert bench.utc_ms("2026-11-02T09:00:00.000Z") == 1_793_610_000_000
    assert bench.utc_ms("2026-11-02T10:00:00+01:00") == 1_793_610_000_000


def test_a_child_that_ignores_sigint_is_stopped_by_sigterm(tmp_path):
    """A background shell starts commands with SIGINT ignored and children inherit
    that: the benchmark stops a job with SIGTERM (which the job treats as Ctrl-C),
    not with the SIGKILL that follows a minute later."""
    code = ("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "open(__import__('sys').argv[1], 'w').close(); time.sleep(300)")
    ready = tmp_path / "ready"
    child = bench.Child([sys.executable, "-c", code, str(ready)], str(tmp_path / "child.log"))
    while not ready.exists() and child.poll() is None:
        child.wait(0.05)
    child.stop()
    assert child.returncode == -signal.SIGTERM


def test_a_live_run_is_timed_to_the_sinks_last_write(tmp_path):
    """The harness looks at the sink every few seconds; a live run's time is the
    job's last write (the rows' greatest written_at), not the look that found it."""
    import datetime
    import sqlite3

    db = tmp_path / "sink.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE aggregates (store TEXT, written_at TEXT)")
        connection.executemany("INSERT INTO aggregates VALUES (?, ?)", [
            ("s1", "2026-12-03T17:00:01.250000Z"), ("s2", "2026-12-03T17:00:03.500000Z")])
    expected = datetime.datetime(2026, 12, 3, 17, 0, 3, 500000, tzinfo=datetime.timezone.utc).timestamp()
    assert bench.last_write(str(db)) == expected
    with sqlite3.connect(db) as connection:
        connection.execute("DELETE FROM aggregates")
    assert bench.last_write(str(db)) is None
