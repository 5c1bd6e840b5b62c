"""Reading raw records from JSONL and Avro files in batches, keeping file and line."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import importlib.util
import os
import zlib
from typing import Any, Iterator, List, Optional, Tuple

import apache_beam as beam
import fastavro
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from fastavro.schema import to_parsing_canonical_form

import onceflow.coders  # noqa: F401  (registers RecordBatchCoder for the batches this module outputs)
from onceflow.batches import FILE_LINES, FILE_RECORDS, RecordBatch, decode_values, high_waters, take
from onceflow.events import EventContract, is_whole_number, require_contract


def read_avro_writer_schema(path: str) -> dict:
    """The writer schema in an Avro container file's header."""
    with beam.io.filesystems.FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return dict(fastavro.reader(handle).writer_schema)


def format_by_name(pattern: str) -> str:
    """The input format a file name implies when none is given: avro for ``.avro``,
    else json."""
    return "avro" if pattern.endswith(".avro") else "json"


def first_avro_writer_schema(pattern: str, format_setting: str = "--input_format") -> dict:
    """The writer schema of the first file (by path) ``pattern`` matches: every file
    read must have been written with it. ValueError when nothing matches or that
    file is not an Avro container file."""
    matches = beam.io.filesystems.FileSystems.match([pattern])[0].metadata_list
    if not matches:
        raise ValueError(f"nothing matches {pattern!r}")
    first = sorted(m.path for m in matches)[0]
    try:
        return read_avro_writer_schema(first)
    except Exception as error:  # a corrupt or non-Avro file: say so in one line
        raise ValueError(f"{first} is not an Avro container file ({error}); for JSON lines give "
                         f"{format_setting}=json") from None


BATCH_RECORDS = 10_000  # records per batch a file is read in


class UnreadableInputFile(ValueError):
    """An input file that cannot be read to its end (a compressed file cut off or
    not compressed as its name says, a read error). Its records are not dead
    letters: the run fails, naming the file, so that nothing is silently left out."""


@contextlib.contextmanager
def _open_decompressed(readable: fileio.ReadableFile) -> Iterator[Any]:
    """The file's bytes, decompressed by its name (.gz, .bz2) with Python's own
    modules, which raise EOFError on a stream cut off (Beam's decompressor ends it
    quietly there: half a file read as a whole one); other names as Beam opens them.
    An empty file so named is cut off too: compressing nothing still gives a header."""
    name = readable.metadata.path.lower()
    if not name.endswith((".gz", ".bz2")):
        with readable.open(compression_type=CompressionTypes.AUTO) as handle:
            yield handle
        return
    if readable.metadata.size_in_bytes == 0:  # both modules read an empty stream as no data
        raise EOFError("the file is empty: no compressed stream at all")
    with readable.open(compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        with (gzip.GzipFile(fileobj=raw, mode="rb") if name.endswith(".gz") else bz2.BZ2File(raw, mode="rb")) as handle:
            yield handle


def _reading_error(error: BaseException, path: str) -> str:
    if isinstance(error, EOFError):  # a compressed stream, or an Avro container, that ends mid-way
        what = "compressed file" if path.lower().endswith((".gz", ".bz2")) else "file"
        return f"the {what} is cut off ({error}); restore the whole file and run again"
    if isinstance(error, (zlib.error, gzip.BadGzipFile)) or "Invalid data stream" in str(error):
        return f"not compressed as its name says ({error}); fix the file or its name and run again"
    return f"cannot be read ({error}); fix the file and run again"


class _ReadFileBatchesDoFn(beam.DoFn):
    def __init__(self, contract: EventContract, batch_records: int):
        self._contract = contract
        self._batch_records = batch_records

    def process(self, readable: fileio.ReadableFile) -> Iterator[RecordBatch]:
        path = readable.metadata.path
        try:
            with _open_decompressed(readable) as handle:
                if self._contract.input_format == "avro":
                    slices = _slices(self._avro_records(path, handle), self._batch_records)
                    origin = (FILE_RECORDS, path)
                else:
                    slices = _json_line_slices(handle, self._batch_records)
                    origin = (FILE_LINES, path)
                high_water: Optional[int] = None
                for positions, values in slices:
                    verdicts = decode_values(self._contract, values)
                    marks, high_water = high_waters(verdicts, high_water)
                    yield RecordBatch(origin, values, positions, marks, verdicts)
        except (OSError, EOFError, zlib.error) as error:  # a file is not a record: it fails the run
            raise UnreadableInputFile(f"{path}: {_reading_error(error, path)}") from error

    def _avro_records(self, path: str, handle) -> Iterator[Tuple[int, bytes]]:
        """(record number, the datum's bytes as the file holds them): each block
        decompressed, cut at its datums' ends. Re-encoding the decoded datums
        changed them: a long in a union whose double branch comes first was written
        back as a double (past 2**53 another number), and a datum fastavro cannot
        decode (a string that is not UTF-8) failed the whole run instead of being a
        dead letter; the contract decodes each datum when it screens the batch."""
        blocks = fastavro.block_reader(handle)
        expected = to_parsing_canonical_form(fastavro.parse_schema(dict(self._contract.avro_writer_schema)))
        found = to_parsing_canonical_form(fastavro.parse_schema(dict(blocks.writer_schema)))
        if found != expected:
            raise UnreadableInputFile(f"{path} has a different Avro schema from the first input file; "
                                      "read files of one schema per run")
        layout = fastavro.parse_schema(_datum_layout(dict(blocks.writer_schema)), named_schemas={})
        number = 0
        for block in blocks:
            data = block.bytes_
            value = data.getvalue()
            start = data.tell()
            for _ in range(block.num_records):
                try:
                    fastavro.schemaless_reader(data, layout, None)
                except Exception as error:  # the block's own structure is broken: no datum after it can be found
                    raise UnreadableInputFile(f"{path}: a block is corrupt after record {number} ({error}); "
                                              "fix the file and run again") from None
                number += 1
                yield number, value[start:data.tell()]
                start = data.tell()


def _datum_layout(schema: Any) -> Any:
    """An Avro ``schema`` with each string read as bytes (the same encoding) and
    no logical types: reading a datum with it finds where the datum ends, whatever
    its strings hold, and converts nothing."""
    if schema == "string":
        return "bytes"
    if isinstance(schema, list):
        return [_datum_layout(branch) for branch in schema]
    if not isinstance(schema, dict):
        return schema  # another primitive, or a named type defined before
    layout = {key: value for key, value in schema.items() if key != "logicalType"}
    kind = schema.get("type")
    if kind in ("record", "error"):
        layout["fields"] = [{"name": field["name"], "type": _datum_layout(field["type"])}
                            for field in schema["fields"]]
    elif kind == "array":
        layout["items"] = _datum_layout(schema["items"])
    elif kind == "map":
        layout["values"] = _datum_layout(schema["values"])
    elif kind not in ("enum", "fixed"):
        layout["type"] = _datum_layout(kind)
    return layout


_READ_BYTES = 8 << 20  # a JSON-lines file is read this much at a time


_BYTE_ORDER_MARK = b"\xef\xbb\xbf"
_JSON_WHITESPACE = b" \t\r\n"  # a line of only these is blank; a form feed or vertical tab is a (malformed) record


def _json_line_slices(handle, size: int) -> Iterator[Tuple[List[int], List[bytes]]]:
    """(line numbers, lines) of at most ``size`` records at a time: each line
    without its line break (a trailing CR of a terminated line goes too), blank
    lines skipped, a UTF-8 byte order mark at the file's start dropped (editors on
    Windows write one; JSON readers may ignore it, and the first record would be
    refused for it). Reads large blocks and splits them in C, not line by line."""
    positions: List[int] = []
    values: List[bytes] = []
    line_number = 0
    block = handle.read(_READ_BYTES)
    while block and len(block) < len(_BYTE_ORDER_MARK) and _BYTE_ORDER_MARK.startswith(block):
        more = handle.read(_READ_BYTES)  # a read may stop short, even inside the mark
        if not more:
            break
        block += more
    if block.startswith(_BYTE_ORDER_MARK):
        block = block[len(_BYTE_ORDER_MARK):] or handle.read(_READ_BYTES)
    rest = b""
    while True:
        if block:
            text = rest + block
            lines = text.split(b"\n")
            rest = lines.pop()  # the unterminated end: it goes on in the next block
            if b"\r" in text:
                lines = [line.rstrip(b"\r") for line in lines]
        elif rest:
            lines, rest = [rest], b""  # the last line, without a line break: kept as it is
        else:
            break
        numbers = range(line_number + 1, line_number + 1 + len(lines))
        line_number += len(lines)
        if not all(map(bytes.strip, lines)):  # a blank line is not a record
            kept = [index for index, line in enumerate(lines) if line.strip(_JSON_WHITESPACE)]
            numbers, lines = take(numbers, kept), take(lines, kept)
        positions.extend(numbers)
        values.extend(lines)
        while len(values) >= size:
            yield positions[:size], values[:size]
            del positions[:size], values[:size]
        block = handle.read(_READ_BYTES)
    if values:
        yield positions, values


def _slices(records: Iterator[Tuple[int, bytes]], size: int) -> Iterator[Tuple[List[int], List[bytes]]]:
    """(positions, values) of at most ``size`` consecutive records at a time."""
    positions: List[int] = []
    values: List[bytes] = []
    for position, value in records:
        positions.append(position)
        values.append(value)
        if len(values) >= size:
            yield positions, values
            positions, values = [], []
    if values:
        yield positions, values


def absolute_local_path(path: str) -> str:
    """``path`` made absolute and normal when it is local (no ``scheme://``);
    wildcards are kept as they are."""
    return path if "://" in path else os.path.abspath(path)


# Beam's file systems whose client library comes with an extra: scheme -> (a module
# the file system imports, the Beam extra that installs it).
_FILESYSTEM_EXTRAS = {"gs": ("google.cloud.storage", "gcp"), "s3": ("boto3", "aws"),
                      "azfs": ("azure.storage.blob", "azure"), "hdfs": ("hdfs", "hadoop")}


def missing_filesystem(path: str) -> Optional[str]:
    """What to install to read or write ``path`` when its scheme's Beam file system
    lacks its client library (Beam says it only as "Unable to get filesystem" or an
    error of the client's own); None when nothing is missing."""
    scheme = path.partition("://")[0] if "://" in path else ""  # Beam's schemes are lower case
    needed = _FILESYSTEM_EXTRAS.get(scheme)
    if needed is None:
        return None
    module, extra = needed
    try:
        if importlib.util.find_spec(module) is not None:
            return None
    except ImportError:  # a parent package is absent
        pass
    return (f"{scheme}:// paths need Beam's {extra} file system, not installed here: pip install "
            f"'apache-beam[{extra}]=={beam.__version__}'")


class ReadRecordBatchesFromFiles(beam.PTransform):
    """Reads JSON-lines or Avro container files matching a pattern, in batches.

    Output: bounded ``PCollection[RecordBatch]``: consecutive records of one file
    (at most ``batch_records``), each with its exact bytes (a JSON line without its
    line break; for Avro, the datum's binary encoding), its line (Avro: record)
    number, the contract's verdict, and the file's high water before it (the
    greatest valid event time on earlier lines of the same file, which the
    lateness rule compares against). Blank lines are skipped. Compressed files
    (.gz, .bz2) are read transparently. A pattern that matches nothing fails the
    pipeline (``Empty match for pattern ...``), a wildcard too. A local pattern is
    made absolute where the pipeline is built, so each record's source names its
    file one way however the path was spelled (``in/a.jsonl``, ``./in/a.jsonl``)
    and from whichever folder: a dead letter's ID depends on it.
    """

    def __init__(self, file_pattern: str, contract: EventContract, batch_records: int = BATCH_RECORDS):
        super().__init__()
        require_contract(contract, "ReadRecordBatchesFromFiles")
        if not is_whole_number(batch_records) or batch_records < 1:
            raise ValueError(f"a batch holds at least one record: batch_records is a positive int, not "
                             f"{batch_records!r}")
        self._pattern = absolute_local_path(file_pattern)
        self._contract = contract
        self._batch_records = batch_records

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "MatchFiles" >> fileio.MatchFiles(self._pattern, empty_match_treatment=fileio.EmptyMatchTreatment.DISALLOW)
            | "OpenFiles" >> fileio.ReadMatches()
            | "ReadBatches" >> beam.ParDo(_ReadFileBatchesDoFn(self._contract, self._batch_records)).with_output_types(
                RecordBatch)
        )


class ReadRecordsFromFiles(beam.PTransform):
    """:class:`ReadRecordBatchesFromFiles` one record at a time: a bounded
    ``PCollection[SourceRecord]`` with sources ``{"file": path, "line": n}`` (Avro:
    ``"record": n``) and the file's high water before each record."""

    def __init__(self, file_pattern: str, contract: EventContract):
        super().__init__()
        require_contract(contract, "ReadRecordsFromFiles")
        self._pattern = file_pattern
        self._contract = contract

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "ReadBatches" >> ReadRecordBatchesFromFiles(self._pattern, self._contract)
            | "ToRecords" >> beam.FlatMap(RecordBatch.records)
        )
