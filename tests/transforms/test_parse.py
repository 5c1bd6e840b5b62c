"""ParseEvents in a pipeline: every record out once, as an event or a dead letter."""

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from onceflow.events import SourceRecord
from onceflow.transforms import ParseEvents
from tests.transforms.helpers import CONTRACT, record

BAD = [
    (b"\xc3\x28", "invalid_utf8"),
    (b'{"id": "x", "t": 1', "malformed_json"),
    (b"[1]", "not_an_object"),
    (b'"s"', "not_an_object"),
    (b'{"id": "x", "t": 1, "k": "a", "v": NaN}', "non_finite_number"),
    (b"[" * 20000 + b"]" * 20000, "nesting_too_deep"),
    (b'{"id": "x", "t": 1, "k": "a"}', "schema_violation"),
    (b'{"id": "x", "t": 1, "k": null, "v": 1}', "schema_violation"),
    (b'{"id": "x", "t": "noon", "k": "a", "v": 1}', "bad_timestamp"),
]


def test_events_and_dead_letters():
    good = [record("1", 1000, 5), record("2", 2000, 7, k="b")]
    bad = [SourceRecord(raw, {"line": n}) for n, (raw, _) in enumerate(BAD)]
    with TestPipeline() as pipeline:
        parsed = pipeline | beam.Create(good + bad) | ParseEvents(CONTRACT)
        assert_that(
            parsed.events | "Summarise" >> beam.Map(lambda e: (e.event_id, e.event_time_ms, e.key, e.values["v"])),
            equal_to([("1", 1000, ("a",), 5), ("2", 2000, ("b",), 7)]), label="events")
        assert_that(
            parsed.dead_letters | "Reasons" >> beam.Map(lambda d: (d.record.source["line"], d.stage, d.reason)),
            equal_to([(n, "parse", reason) for n, (_, reason) in enumerate(BAD)]), label="dead_letters")


def test_dead_letters_keep_the_raw_bytes():
    raw = b'{"id": "x", "t": 1, "k": "a", "v": "\xff"}'
    with TestPipeline() as pipeline:
        parsed = pipeline | beam.Create([SourceRecord(raw, {"line": 9})]) | ParseEvents(CONTRACT)
        assert_that(parsed.dead_letters | beam.Map(lambda d: (d.record.value, dict(d.record.source))),
                    equal_to([(raw, {"line": 9})]))
