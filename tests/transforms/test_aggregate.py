"""WindowedAggregate: panes, lateness, duplicates, out-of-order, sliding windows."""

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to

from onceflow.aggregates import parse_aggregates
from onceflow.transforms import ParseEvents, WindowedAggregate
from onceflow.windowing import WindowSpec
from tests.transforms.helpers import CONTRACT, record

SPECS = parse_aggregates("count,sum:v,min:v,max:v,first:v,last:v")
MINUTE = 60_000


def aggregate(records_pcoll, spec, early_firing_ms=None):
    parsed = records_pcoll | ParseEvents(CONTRACT)
    return parsed.events | WindowedAggregate(("k",), spec, SPECS, early_firing_ms=early_firing_ms)


def row(k, start, n, total, low, high, first, last, size=MINUTE):
    return {"k": k, "window_start": start, "window_end": start + size, "event_count": n, "count": n,
            "sum_v": total, "min_v": low, "max_v": high, "first_v": first, "last_v": last}


def streaming():
    return TestPipeline(options=PipelineOptions(streaming=True))


def test_batch_rows_are_exact_and_out_of_order_does_not_matter():
    records = [record("3", 65_000, 4), record("1", 5_000, 1), record("2", 70_000, 2), record("4", 1_000, 8),
               record("5", 30_000, 16, k="b"), record("1", 5_000, 1)]
    with TestPipeline() as pipeline:
        out = aggregate(pipeline | beam.Create(records), WindowSpec(MINUTE, None, 0))
        assert_that(out.rows, equal_to([
            row("a", 0, 2, 9, 1, 8, 8, 1),
            row("a", MINUTE, 2, 6, 2, 4, 4, 2),
            row("b", 0, 1, 16, 16, 16, 16, 16),
        ]), label="rows")
        assert_that(out.dead_letters, equal_to([]), label="no_dead_letters")


def test_on_time_then_late_panes_accumulate_and_too_late_goes_to_the_dlq():
    stream = (TestStream()
              .advance_watermark_to(0)
              .add_elements([record("1", 1_000, 1), record("2", 50_000, 2)])
              .advance_watermark_to(61)                                   # on-time pane: 2 events
              .add_elements([record("3", 10_000, 4, high_water_ms=61_000)])   # late, within lateness
              .add_elements([record("1", 1_000, 1, high_water_ms=61_000)])    # duplicate across panes
              .advance_watermark_to(95)
              .add_elements([record("4", 20_000, 8, high_water_ms=95_000)])   # beyond lateness (closed at 90s)
              .advance_watermark_to_infinity())
    with streaming() as pipeline:
        out = aggregate(pipeline | stream, WindowSpec(MINUTE, None, 30_000))
        assert_that(out.rows, equal_to([
            row("a", 0, 2, 3, 1, 2, 1, 2),
            row("a", 0, 3, 7, 1, 4, 1, 2),
        ]), label="panes")
        assert_that(out.dead_letters | beam.Map(lambda d: (d.event_id, d.reason, d.stage)),
                    equal_to([("4", "too_late", "aggregate")]), label="too_late")


def test_early_firings_then_on_time():
    stream = (TestStream()
              .advance_watermark_to(0)
              .add_elements([record("1", 1_000, 1), record("2", 2_000, 2)])
              .advance_processing_time(5)                                 # early pane: 2 events
              .add_elements([record("3", 3_000, 4)])
              .advance_watermark_to(61)                                   # on-time pane: 3 events
              .advance_watermark_to_infinity())
    with streaming() as pipeline:
        out = aggregate(pipeline | stream, WindowSpec(MINUTE, None, 0), early_firing_ms=2_000)
        assert_that(out.rows | beam.Map(lambda r: (r["event_count"], r["sum_v"])),
                    equal_to([(2, 3), (3, 7)]))


def test_duplicates_across_windows_and_partitions_count_once():
    stream = (TestStream()
              .advance_watermark_to(0)
              .add_elements([record("1", 1_000, 1), record("2", 61_000, 2)])
              .add_elements([record("1", 1_000, 1), record("2", 61_000, 2)])  # re-sent by another partition
              .advance_watermark_to(200)
              .advance_watermark_to_infinity())
    with streaming() as pipeline:
        out = aggregate(pipeline | stream, WindowSpec(MINUTE, None, MINUTE))
        assert_that(out.rows | beam.Map(lambda r: (r["window_start"], r["event_count"])),
                    equal_to([(0, 1), (MINUTE, 1)]))


def test_sliding_windows():
    records = [record("1", 5_000, 1), record("2", 25_000, 2), record("3", 45_000, 4)]
    spec = WindowSpec(MINUTE, 20_000, 0)
    with TestPipeline() as pipeline:
        out = aggregate(pipeline | beam.Create(records), spec)
        assert_that(out.rows | beam.Map(lambda r: (r["window_start"], r["window_end"], r["sum_v"])), equal_to([
            (-40_000, 20_000, 1), (-20_000, 40_000, 3), (0, MINUTE, 7), (20_000, 80_000, 6), (40_000, 100_000, 4),
        ]))


def test_too_late_in_batch_follows_the_sources_high_water():
    # A file whose high water had passed the window's close: same decision as live.
    records = [record("1", 200_000, 1), record("2", 1_000, 2, high_water_ms=200_000)]
    with TestPipeline() as pipeline:
        out = aggregate(pipeline | beam.Create(records), WindowSpec(MINUTE, None, MINUTE))
        assert_that(out.rows | beam.Map(lambda r: r["window_start"]), equal_to([180_000]), label="rows")
        assert_that(out.dead_letters | beam.Map(lambda d: (d.event_id, d.reason, d.record.value)),
                    equal_to([("2", "too_late", records[1].value)]), label="dlq")
