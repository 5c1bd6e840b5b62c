"""Figures from snapshots: per-stage counts and rates, lag, DLQ rate (pure)."""

import pytest

from onceflow.observability.figures import Figures, consumer_lag, total
from onceflow.observability.snapshot import MetricsSnapshot
from tests.observability.fakes import STARTED_AT, FakeMetricsSource, lag_gauges


def test_stage_counts_come_from_the_counters_of_each_stage():
    source = FakeMetricsSource()
    source.set(10, {"records_read": 1000, "events_parsed": 990, "dead_letters.malformed_json": 10,
                    "events_timely": 980, "dead_letters.too_late": 10, "events_unique": 970,
                    "duplicates_dropped": 10, "rows_emitted": 40, "sink_rows_written": 38,
                    "sink_rows_stale": 2, "dlq_written": 20})
    figures = source.figures()
    counts = {s.name: (s.count_in, s.count_out) for s in figures.stages}
    assert counts == {"parse": (1000, 990), "dedup": (980, 970), "aggregate": (990, 40),
                      "sink": (40, 38), "dlq": (20, 20)}
    assert figures.stage("parse").in_per_s == 100.0  # 1,000 records in the 10 s since the start
    assert figures.dead_letters == 20 and figures.too_late == 10 and figures.duplicates_dropped == 10
    assert figures.dead_letters_by_reason == {"malformed_json": 10, "too_late": 10}


def test_rates_are_over_the_last_five_seconds_and_the_dlq_rate_over_the_last_minute():
    source = FakeMetricsSource()
    source.set(60, {"records_read": 1000, "dead_letters.bad_timestamp": 0})
    source.set(100, {"records_read": 5000, "dead_letters.bad_timestamp": 40})
    source.set(110, {"records_read": 6000, "dead_letters.bad_timestamp": 50})
    figures = source.figures()
    assert figures.stage("parse").in_per_s == 100.0  # (6000 - 5000) / (110 - 100): the newest base 5 s old or more
    assert figures.dlq_rate == pytest.approx(50 / 5000)  # since the snapshot at 60 s, the last one a minute old
    assert figures.dead_letters_per_s == 1.0


def test_consumer_lag_per_partition_and_total_with_dotted_topic_names():
    gauges = {"consumer_lag.shop.orders.0": (5, 1.0), "consumer_lag.shop.orders.11": (7, 1.0),
              "watermark_ms": (123, 1.0)}
    assert consumer_lag(gauges) == {("shop.orders", 0): 5, ("shop.orders", 11): 7}
    figures = Figures.of([MetricsSnapshot(STARTED_AT + 3, {}, gauges)], STARTED_AT)
    assert figures.total_lag == 12
    assert figures.watermark_ms == 123


def test_no_reader_means_no_lag_and_no_watermark_age():
    source = FakeMetricsSource()
    source.set(1, {"records_read": 3}, lag_gauges(1))
    figures = source.figures()
    assert figures.total_lag is None and figures.watermark_age_s is None


def test_total_sums_prefixed_counters():
    assert total({"dead_letters.a": 2, "dead_letters.b": 3, "records_read": 9}, ("dead_letters.*",)) == 5
