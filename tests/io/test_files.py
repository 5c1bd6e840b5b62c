"""Reading JSONL and Avro files: exact bytes, file and line, per-file high water."""

import gzip
import io
import json

import apache_beam as beam
import fastavro
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from onceflow.events import EventContract
from onceflow.io import files
from onceflow.io.files import ReadRecordsFromFiles, read_avro_writer_schema

CONTRACT = EventContract(time_field="t", key_fields=("k",), value_fields=("v",), id_field="id")


def line(event_id, t, v=1):
    return json.dumps({"id": event_id, "t": t, "k": "a", "v": v}).encode()


def summarise(records):
    return records | beam.Map(lambda r: (r.source["line"], r.value, r.high_water_ms))


def test_jsonl_keeps_bytes_line_numbers_and_high_water(tmp_path):
    lines = [line("1", 5000), b"", b"not json at all", line("2", 3000), b"   ", line("3", 9000) + b"\r", line("4", 1)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines))  # no newline at the end
    with TestPipeline() as pipeline:
        records = pipeline | ReadRecordsFromFiles(str(path), CONTRACT)
        assert_that(summarise(records), equal_to([
            (1, lines[0], None),
            (3, b"not json at all", 5000),
            (4, lines[3], 5000),
            (6, line("3", 9000), 5000),
            (7, lines[6], 9000),
        ]))


def test_gzip_and_glob(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as handle:
        handle.write(line("1", 10) + b"\n")
    (tmp_path / "b.jsonl").write_bytes(line("2", 20) + b"\n")
    with TestPipeline() as pipeline:
        records = pipeline | ReadRecordsFromFiles(str(tmp_path / "*.jsonl*"), CONTRACT)
        assert_that(records | beam.Map(lambda r: (r.source["file"].rsplit("/", 1)[1], r.value)),
                    equal_to([("a.jsonl.gz", line("1", 10)), ("b.jsonl", line("2", 20))]))


SCHEMA = {"type": "record", "name": "E", "fields": [
    {"name": "id", "type": "string"}, {"name": "t", "type": "long"},
    {"name": "k", "type": "string"}, {"name": "v", "type": "double"}]}


def test_avro_records_become_their_datum_bytes(tmp_path):
    path = tmp_path / "in.avro"
    rows = [{"id": "1", "t": 100, "k": "a", "v": 1.5}, {"id": "2", "t": 50, "k": "b", "v": 2.5}]
    with open(path, "wb") as handle:
        fastavro.writer(handle, SCHEMA, rows)
    schema = read_avro_writer_schema(str(path))
    contract = EventContract(time_field="t", key_fields=("k",), value_fields=("v",), id_field="id",
                             input_format="avro", avro_writer_schema=schema)
    expected = []
    for row in rows:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, fastavro.parse_schema(SCHEMA), row)
        expected.append(buffer.getvalue())
    with TestPipeline() as pipeline:
        records = pipeline | ReadRecordsFromFiles(str(path), contract)
        assert_that(records | beam.Map(lambda r: (r.source["record"], r.value, r.high_water_ms)),
                    equal_to([(1, expected[0], None), (2, expected[1], 100)]))


def _lines_one_at_a_time(data: bytes):
    """The reading rule, a line at a time: the line break and a terminated line's
    trailing CRs removed, blank lines skipped, lines numbered from 1."""
    handle = io.BytesIO(data)
    for number, line in enumerate(iter(handle.readline, b""), start=1):
        raw = line.rstrip(b"\r\n") if line.endswith(b"\n") else line
        if raw.strip(b" \t\r\n"):  # JSON's white space: a form feed or vertical tab is a record
            yield number, raw


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"{}", b"a", b" ", b"\r", b"\n", b"\r\n", b"\t", b"x\ry", b"\x0c", b"\x0b"]),
                max_size=40),
       st.integers(min_value=1, max_value=7), st.integers(min_value=1, max_value=5))
def test_json_lines_are_read_in_blocks_as_one_at_a_time(pieces, block_bytes, batch_records):
    data = b"".join(pieces)
    original = files._READ_BYTES
    files._READ_BYTES = block_bytes  # block edges anywhere: inside a line, a CRLF, a blank line
    try:
        slices = list(files._json_line_slices(io.BytesIO(data), batch_records))
    finally:
        files._READ_BYTES = original
    assert all(0 < len(values) <= batch_records for _, values in slices)
    assert [pair for positions, values in slices for pair in zip(positions, values)] == \
        list(_lines_one_at_a_time(data))
