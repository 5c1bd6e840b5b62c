"""The JSONL dead-letter sink: appends, and readers see each dead letter once."""

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline

from onceflow.deadletter import DeadLetter
from onceflow.io.dlq.envelope import from_envelope
from onceflow.events import SourceRecord
from onceflow.io.dlq.jsonl import WriteDeadLettersToJsonl, read_dead_letters

LETTERS = [DeadLetter(SourceRecord(b"\xff" + bytes([n]), {"line": n}), "parse", "invalid_utf8", "E", "m")
           for n in range(5)]


def write(path):
    with TestPipeline() as pipeline:
        _ = pipeline | beam.Create(LETTERS) | WriteDeadLettersToJsonl(str(path), "aggregate", "0.1.0")


def test_written_twice_read_once_with_exact_bytes(tmp_path):
    path = tmp_path / "dlq" / "dead.jsonl"
    write(path)
    write(path)  # a retried bundle or a second run appends again
    assert len(path.read_text().splitlines()) == 10
    envelopes = list(read_dead_letters(str(path)))
    assert sorted(from_envelope(e).value for e in envelopes) == sorted(l.record.value for l in LETTERS)
    assert {e["reason"] for e in envelopes} == {"invalid_utf8"}


def test_missing_file_reads_as_empty(tmp_path):
    assert list(read_dead_letters(str(tmp_path / "none.jsonl"))) == []
