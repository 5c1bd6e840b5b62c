"""The live status line (pure formatting)."""

from onceflow.observability.status import format_duration, format_rate, format_status
from tests.observability.fakes import STARTED_AT, FakeMetricsSource


def kafka_run():
    source = FakeMetricsSource()
    source.set(12, {"kafka_records_read": 12_036, "records_read": 12_000, "events_parsed": 11_964,
                    "dead_letters.malformed_json": 36, "events_timely": 11_964, "events_unique": 11_900,
                    "rows_emitted": 420, "sink_rows_written": 420, "dlq_written": 36},
               {"consumer_lag.orders.0": (1000, STARTED_AT + 12), "consumer_lag.orders.1": (234, STARTED_AT + 12),
                "watermark_ms": (int((STARTED_AT - 30) * 1000), STARTED_AT + 12)})
    return source.figures()


def test_status_line_of_a_kafka_run():
    assert format_status(kafka_run()) == (
        "12s | read 1,003/s | parse 1,000/s | aggregate 997/s | sink 35 rows/s | lag 1,234 | "
        "event-time lag 42s | DLQ 36 (0.3%)")


def test_status_line_shows_how_far_behind_the_sink_is_next_to_a_zero_consumer_lag():
    """Offsets are committed once the runner holds the records: the consumer lag is
    0 while the backlog waits in the runner; the sink's newest window end shows it."""
    source = FakeMetricsSource()
    source.set(60, {"kafka_records_read": 200_000, "records_read": 200_000, "sink_rows_written": 40},
               {"consumer_lag.orders.0": (0, STARTED_AT + 60),
                "sink_window_end_ms": (int((STARTED_AT - 125) * 1000), STARTED_AT + 59)})
    figures = source.figures()
    assert figures.sink_lag_s == 185.0
    assert "| lag 0 | sink behind 3m05s |" in format_status(figures)


def test_status_line_says_how_old_a_lag_its_reader_no_longer_reports_is():
    source = FakeMetricsSource()
    source.set(100, {"kafka_records_read": 50}, {"consumer_lag.orders.0": (0, STARTED_AT + 70)})
    assert "| lag 0 |" in format_status(source.figures())  # 30 s: a busy runner's pause
    source.set(101, {"kafka_records_read": 50}, {"consumer_lag.orders.0": (0, STARTED_AT + 70)})
    assert "| lag 0 (reported 31s ago) |" in format_status(source.figures())


def test_status_line_of_a_file_run_has_no_lag():
    source = FakeMetricsSource()
    source.set(2, {"records_read": 9, "events_parsed": 8, "dead_letters.invalid_utf8": 1, "events_timely": 8})
    assert format_status(source.figures()) == "2s | parse 4.5/s | aggregate 4.0/s | sink 0 rows/s | DLQ 1 (11.1%)"


def test_status_line_fits_the_width():
    line = format_status(kafka_run(), width=40)
    assert len(line) == 40 and line.endswith("...")


def test_durations_and_rates():
    assert [format_duration(s) for s in (None, -3, 7, 185, 7380, 90000)] == ["-", "0s", "7s", "3m05s", "2h03m", "1d01h"]
    assert [format_rate(r) for r in (0, 0.44, 12.4, 4243.2)] == ["0", "0.4", "12", "4,243"]


def test_backfill_progress_shows_done_of_total_and_time_left():
    from onceflow.observability.status import format_progress

    assert format_progress(1200, 10000, 12.0) == "1,200 of 10,000 (12%), 1m28s left"
    assert format_progress(0, 10, 1.0) == "0 of 10 (0%)"
    assert format_progress(10, 10, 1.0) == "10 of 10 (100%)"
