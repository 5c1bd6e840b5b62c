"""The metrics of the main job over the bundled sample equal counts computed
independently (tests/pipelines/reference.py), in the returned summary and in the
JSON written by --metrics_out."""

import json
import os

from onceflow.options import SAMPLE_INPUT
from onceflow.pipelines.aggregate import run
from tests.pipelines.reference import expected_job

MINUTE = 60_000

# The sample's broken records by reason (scripts/make_sample_data.py plants them).
BROKEN_BY_REASON = {"bad_timestamp": 1, "invalid_utf8": 1, "malformed_json": 1, "non_finite_number": 1,
                    "not_an_object": 2, "schema_violation": 3}


def independent_counts():
    rows, dead = expected_job(SAMPLE_INPUT, MINUTE, 5 * MINUTE)
    with open(SAMPLE_INPUT, "rb") as handle:
        lines = [line for line in handle.read().split(b"\n") if line.strip()]
    records = len(lines)
    without_id = sum(1 for line in lines if _object_without(line, "order_id"))
    bad = sum(1 for _, kind in dead if kind == "bad")
    too_late = sum(1 for _, kind in dead if kind == "too_late")
    unique = sum(row["count"] for row in rows.values())
    timely = records - bad - too_late
    return {"records": records, "bad": bad, "too_late": too_late, "timely": timely, "unique": unique,
            "duplicates": timely - unique, "rows": len(rows), "without_id": without_id}


def _object_without(line: bytes, field: str) -> bool:
    """A JSON object whose ``field`` is absent or null (its event ID is derived)."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get(field) is None


def test_metrics_of_the_sample_run_equal_the_known_counts(tmp_path):
    n = independent_counts()
    assert (n["records"], n["bad"], n["too_late"], n["duplicates"]) == (2492, 9, 2, 45)
    assert sum(BROKEN_BY_REASON.values()) == n["bad"]
    out = tmp_path / "reports" / "metrics.json"
    summary = run([f"--sink=sqlite:///{tmp_path / 'out.db'}", f"--dlq={tmp_path / 'dlq.jsonl'}",
                   f"--metrics_out={out}", "--status=off"])

    dead_letters = {**BROKEN_BY_REASON, "too_late": n["too_late"]}
    expected_counters = {
        "records_read": n["records"],
        "events_parsed": n["records"] - n["bad"],
        "records_without_id": n["without_id"],
        **{f"dead_letters.{reason}": count for reason, count in dead_letters.items()},
        "events_timely": n["timely"],
        "duplicates_dropped": n["duplicates"],
        "events_unique": n["unique"],
        "rows_emitted": n["rows"],
        "sink_rows_written": n["rows"],
        "dlq_written": n["bad"] + n["too_late"],
    }
    assert {name: value for name, value in summary.counters.items() if value} == expected_counters
    assert summary.count("sink_rows_stale") == 0 and summary.count("sink_retries") == 0
    assert summary.values == "committed"

    written = json.loads(out.read_text())
    assert written["format"] == "onceflow-run-summary/1"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a report others may read (mkstemp's file was 0600)
    assert {name: value for name, value in written["counters"].items() if value} == expected_counters
    assert written["dead_letters"] == {"total": n["bad"] + n["too_late"], "by_reason": dead_letters}
    assert (written["records_read"], written["duplicates_dropped"], written["too_late"]) == (2492, 45, 2)
    assert {name: (stage["step"], stage["in"], stage["out"]) for name, stage in written["stages"].items()} == {
        "parse": ("AggregateEvents/ScreenAndSplit", n["records"], n["records"] - n["bad"]),
        "dedup": ("AggregateEvents/AggregatePerShardWindow", n["timely"], n["unique"]),
        "aggregate": ("AggregateEvents", n["records"] - n["bad"], n["rows"]),
        "sink": ("WriteRows", n["rows"], n["rows"]),
        "dlq": ("WriteDeadLetters", n["bad"] + n["too_late"], n["bad"] + n["too_late"]),
    }
    assert written["stages"]["parse"]["per_s"] > 0
    assert written["consumer_lag"] == {} and written["consumer_lag_total"] is None
    assert written["runner"] == "DirectRunner" and written["values"] == "committed"
    # The sink reports the newest window end it wrote: what its event-time lag is measured from.
    rows, _ = expected_job(SAMPLE_INPUT, MINUTE, 5 * MINUTE)
    assert written["gauges"]["sink_window_end_ms"] == max(start for _, start in rows) + MINUTE


def test_with_sliding_windows_each_event_and_copy_is_counted_once(tmp_path):
    """An event is in window / period windows: duplicates and unique events were
    counted in each (450 copies dropped of the sample's 45, more events out of
    dedup than into it). 10-minute windows every minute: each event's first
    window ends when its 1-minute window does, so the lateness rule, and with the
    sample's exact re-sends the copies, are the tumbling run's."""
    n = independent_counts()
    summary = run([f"--sink=sqlite:///{tmp_path / 'out.db'}", f"--dlq={tmp_path / 'dlq.jsonl'}", "--status=off",
                   "--window=10m", "--window_period=1m"])
    assert (summary.count("events_timely"), summary.count("duplicates_dropped"), summary.count("events_unique")) == (
        n["timely"], n["duplicates"], n["unique"])
