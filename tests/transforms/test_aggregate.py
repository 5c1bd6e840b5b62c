"""WindowedAggregate: panes, lateness, duplicates, out-of-order, sliding windows."""

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import trigger
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Timestamp

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
              # The test runner's virtual clock starts at 0 while timers are set from the
              # wall clock: advance it past now + the early-firing interval.
              .advance_processing_time(Timestamp.now().micros // 1_000_000 + 5)  # early pane: 2 events
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


def test_bounded_and_unbounded_paths_give_the_same_final_rows():
    # A shuffled stream with re-sends and out-of-order events, read in one partition:
    # the high water each record carries is what a reader would attach.
    import random
    rng = random.Random(11)
    records, high_water = [], None
    bodies = []
    for n in range(300):
        if bodies and rng.random() < 0.1:
            event_id, t, v, k = rng.choice(bodies)  # an exact re-send of an earlier event
        else:
            event_id, t, v, k = str(n), n * 1_000 + rng.randint(-40_000, 0), rng.randint(1, 9), rng.choice("ab")
            bodies.append((event_id, t, v, k))
        records.append(record(event_id, t, v, k=k, high_water_ms=high_water)._replace(source={"test": n}))
        high_water = t if high_water is None else max(high_water, t)
    spec = WindowSpec(30_000, 10_000, 15_000)

    def final_rows(rows):
        # The last pane of each row is the one with the most events.
        return (rows | beam.WindowInto(GlobalWindows(), trigger=trigger.AfterWatermark(),
                                       accumulation_mode=trigger.AccumulationMode.DISCARDING)
                | beam.Map(lambda r: ((r["k"], r["window_start"]), r))
                | beam.CombinePerKey(lambda rs: max(rs, key=lambda r: r["event_count"])) | beam.Values())

    with TestPipeline() as pipeline:
        bounded = aggregate(pipeline | beam.Create(records), spec)
        expected_rows = bounded.rows
        expected_late = bounded.dead_letters | "BoundedLate" >> beam.Map(lambda d: d.record.source["test"])
        assert_that(expected_late, equal_to(_too_late_ids(records, spec)), label="bounded_late")
        assert_that(expected_rows | "CountBounded" >> beam.combiners.Count.Globally(),
                    equal_to([len(_reference_rows(records, spec))]), label="bounded_count")
        assert_that(expected_rows, equal_to(_reference_rows(records, spec)), label="bounded_rows")

    stream, watermark = TestStream().advance_watermark_to(-100), -100
    for first in range(0, len(records), 10):
        # The runner's watermark trails the reader's high water, as on a real runner:
        # each group of ten records comes after the watermark reached its first one's.
        group = records[first:first + 10]
        if group[0].high_water_ms is not None and group[0].high_water_ms / 1000 > watermark:
            watermark = group[0].high_water_ms / 1000
            stream = stream.advance_watermark_to(Timestamp(micros=group[0].high_water_ms * 1000))
        stream = stream.add_elements(group)
    # A live stream's watermark moves on past the last windows (this test runner
    # does not fire user timers when the watermark jumps straight to infinity).
    stream = stream.advance_watermark_to(Timestamp(seconds=10**6)).advance_watermark_to_infinity()
    with streaming() as pipeline:
        out = aggregate(pipeline | stream, spec)
        assert_that(final_rows(out.rows), equal_to(_reference_rows(records, spec)), label="unbounded_rows")
        assert_that(out.dead_letters | beam.Map(lambda d: d.record.source["test"]),
                    equal_to(_too_late_ids(records, spec)), label="unbounded_late")


def _too_late_ids(records, spec):
    import json as _json
    out = []
    for r in records:
        t = _json.loads(r.value)["t"]
        first_end = min(s + spec.size_ms for s in range(t - t % spec.step_ms - spec.size_ms, t + 1, spec.step_ms)
                        if s <= t < s + spec.size_ms)
        if r.high_water_ms is not None and first_end + spec.allowed_lateness_ms <= r.high_water_ms:
            out.append(r.source["test"])
    return out


def _reference_rows(records, spec):
    import json as _json
    late = set(_too_late_ids(records, spec))
    seen, groups = set(), {}
    for r in records:
        body = _json.loads(r.value)
        if r.source["test"] in late or body["id"] in seen:
            continue
        seen.add(body["id"])
        t = body["t"]
        for s in range(t - t % spec.step_ms - spec.size_ms, t + 1, spec.step_ms):
            if s <= t < s + spec.size_ms:
                groups.setdefault((body["k"], s), []).append((t, body["id"], body["v"]))
    rows = []
    for (k, s), items in groups.items():
        values = [v for _, _, v in items]
        rows.append(row(k, s, len(items), sum(values), min(values), max(values),
                        min(items)[2], max(items)[2], size=spec.size_ms))
    return rows
