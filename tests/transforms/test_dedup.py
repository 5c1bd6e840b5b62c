"""DedupByEventId: first copy kept, across windows and panes."""

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import FixedWindows, TimestampedValue

from onceflow.transforms import DedupByEventId, ParseEvents
from tests.transforms.helpers import CONTRACT, record


def timestamped(events):
    return events | "EventTime" >> beam.Map(lambda e: TimestampedValue(e, e.event_time_ms / 1000))


def test_duplicates_dropped_even_in_different_windows():
    records = [record("1", 1000, 1), record("1", 1000, 1), record("2", 61000, 2), record("1", 1000, 1),
               record("2", 61000, 2), record("3", 125000, 3)]
    with TestPipeline() as pipeline:
        parsed = pipeline | "Records" >> beam.Create(records) | ParseEvents(CONTRACT)
        windowed = timestamped(parsed.events) | beam.WindowInto(FixedWindows(60))
        unique = windowed | DedupByEventId(horizon_ms=120_000)
        assert_that(unique | beam.Map(lambda e: e.event_id), equal_to(["1", "2", "3"]))


def test_a_backfill_keeps_the_copy_a_live_read_sees_first():
    """Two records with one ID and different payloads: the bounded path kept the
    copy with the least event time and raw bytes (here the later line), where a
    live read, and the batched path, keep the first in the file."""
    later_line = record("1", 1000, 5)._replace(source={"file": "f.jsonl", "line": 2})
    first_line = record("1", 2000, 9)._replace(source={"file": "f.jsonl", "line": 1})
    with TestPipeline() as pipeline:
        parsed = pipeline | "Records" >> beam.Create([later_line, first_line]) | ParseEvents(CONTRACT)
        unique = timestamped(parsed.events) | DedupByEventId(horizon_ms=120_000)
        assert_that(unique | beam.Map(lambda e: (e.event_time_ms, e.values["v"])), equal_to([(2000, 9)]))


def test_ids_forgotten_after_the_horizon_in_event_time():
    # The same ID re-sent after the watermark passed event time + horizon is new again;
    # WindowedAggregate never lets that happen (it rejects such copies as too late).
    stream = (TestStream()
              .advance_watermark_to(0)
              .add_elements([TimestampedValue(record("1", 1000, 1), 1)])
              .add_elements([TimestampedValue(record("1", 1000, 1), 1)])
              .advance_watermark_to(100)
              .add_elements([TimestampedValue(record("1", 1000, 1), 1)])
              .advance_watermark_to_infinity())
    with TestPipeline(options=PipelineOptions(streaming=True)) as pipeline:
        parsed = pipeline | stream | ParseEvents(CONTRACT)
        unique = timestamped(parsed.events) | DedupByEventId(horizon_ms=10_000)
        assert_that(unique | beam.Map(lambda e: e.event_id), equal_to(["1", "1"]))
