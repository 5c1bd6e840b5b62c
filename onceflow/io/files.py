"""Reading raw records from JSONL and Avro files, keeping file and line."""

from __future__ import annotations

import io
from typing import Iterator, Optional

import apache_beam as beam
import fastavro
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from fastavro.schema import to_parsing_canonical_form

from onceflow.events import EventContract, SourceRecord


def read_avro_writer_schema(path: str) -> dict:
    """The writer schema in an Avro container file's header."""
    with beam.io.filesystems.FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return dict(fastavro.reader(handle).writer_schema)


class _ReadFileRecordsDoFn(beam.DoFn):
    def __init__(self, contract: EventContract):
        self._contract = contract

    def process(self, readable: fileio.ReadableFile) -> Iterator[SourceRecord]:
        path = readable.metadata.path
        with readable.open(compression_type=CompressionTypes.AUTO) as handle:
            if self._contract.input_format == "avro":
                yield from self._avro_records(path, handle)
            else:
                yield from self._json_lines(path, handle)

    def _json_lines(self, path: str, handle) -> Iterator[SourceRecord]:
        high_water: Optional[int] = None
        for line_number, line in enumerate(iter(handle.readline, b""), start=1):
            raw = line.rstrip(b"\r\n") if line.endswith(b"\n") else line
            if not raw.strip():
                continue  # a blank line is not a record
            yield SourceRecord(raw, {"file": path, "line": line_number}, high_water)
            high_water = _advance(high_water, self._contract.peek_event_time_ms(raw))

    def _avro_records(self, path: str, handle) -> Iterator[SourceRecord]:
        reader = fastavro.reader(handle)
        expected = to_parsing_canonical_form(fastavro.parse_schema(dict(self._contract.avro_writer_schema)))
        found = to_parsing_canonical_form(fastavro.parse_schema(dict(reader.writer_schema)))
        if found != expected:
            raise ValueError(f"{path} has a different Avro schema from the first input file; "
                             "read files of one schema per run")
        parsed = fastavro.parse_schema(dict(reader.writer_schema))
        high_water: Optional[int] = None
        for number, datum in enumerate(reader, start=1):
            buffer = io.BytesIO()
            fastavro.schemaless_writer(buffer, parsed, datum)  # the exact datum bytes
            raw = buffer.getvalue()
            yield SourceRecord(raw, {"file": path, "record": number}, high_water)
            high_water = _advance(high_water, self._contract.peek_event_time_ms(raw))


def _advance(high_water: Optional[int], event_time_ms: Optional[int]) -> Optional[int]:
    if event_time_ms is None:
        return high_water
    return event_time_ms if high_water is None else max(high_water, event_time_ms)


class ReadRecordsFromFiles(beam.PTransform):
    """Reads JSON-lines or Avro container files matching a pattern.

    Output: bounded ``PCollection[SourceRecord]``: each record's exact bytes (a JSON
    line without its line break; for Avro, the datum's binary encoding), its source
    ``{"file": path, "line": n}`` (Avro: ``"record": n``), and the file's high water
    (the greatest event time on earlier lines of the same file, which the lateness
    rule compares against). Blank lines are skipped. Compressed files (.gz, .bz2)
    are read transparently. A pattern that matches nothing fails the pipeline.
    """

    def __init__(self, file_pattern: str, contract: EventContract):
        super().__init__()
        self._pattern = file_pattern
        self._contract = contract

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "MatchFiles" >> fileio.MatchFiles(self._pattern)
            | "OpenFiles" >> fileio.ReadMatches()
            | "ReadRecords" >> beam.ParDo(_ReadFileRecordsDoFn(self._contract))
        )
