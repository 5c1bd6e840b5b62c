"""The raw-record archive: Kafka records kept as files, so history outlives retention.

Layout (one folder per topic and hour of the Kafka timestamp, one file per
partition and offset span, Avro or Parquet)::

    DIR/onceflow-archive.json
    DIR/topic=orders/hour=2026-11-02T09/partition=2-offsets=000000000100-000000000199.avro

Each row keeps everything a Kafka reader gives: topic, partition, offset,
timestamp_ms, key, headers and the exact value bytes. A file's name and content
depend only on its records (sorted by offset; Avro sync markers derived from the
name), so archiving the same range again rewrites identical files; files are
written to a temporary name and renamed. Archiving overlapping ranges may store a
record twice: the reader keeps each (topic, partition, offset) once. Kafka
timestamps need not grow with offsets, so one partition's hour files may
interleave in offsets; the reader merges them by offset, so it gives every
archived record once and in offset order whatever the timestamps.

The manifest (``onceflow-archive.json``) lists each finished run's files, written
by the run's last step once every file is in place. :func:`check_archive` holds a
folder to it before a job reads it: a listed file missing, a data file that no
finished run wrote and none covers (a run stopped part way), or a file that is not
an archive file fails the read in one line, so an archive is never read in part.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import heapq
import io
import json
import os
import re
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import apache_beam as beam
import fastavro
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from onceflow import metrics
from onceflow.events import MAX_EVENT_TIME_MS, EventContract, SourceRecord, check_time_source

MARKER = "onceflow-archive.json"
FORMATS = ("avro", "parquet")
_FILE = re.compile(r"topic=(?P<topic>[^/]+)/hour=[^/]+/partition=(?P<partition>\d+)"
                   r"-offsets=(?P<first>\d+)-(?P<last>\d+)\.")

ARCHIVE_SCHEMA = {
    "type": "record", "name": "ArchivedRecord", "namespace": "onceflow",
    "fields": [
        {"name": "topic", "type": "string"},
        {"name": "partition", "type": "int"},
        {"name": "offset", "type": "long"},
        {"name": "timestamp_ms", "type": "long"},
        {"name": "key", "type": ["null", "bytes"], "default": None},
        {"name": "headers", "type": {"type": "array", "items": {
            "type": "record", "name": "Header",
            "fields": [{"name": "name", "type": "string"}, {"name": "value", "type": ["null", "bytes"]}]}}},
        {"name": "value", "type": "bytes"},
    ],
}
_PARSED_SCHEMA = fastavro.parse_schema(ARCHIVE_SCHEMA)


def is_archive(path: str) -> bool:
    """Whether ``path`` is an archive folder (it holds the marker file). A path on a
    file system this installation cannot reach is not one."""
    try:
        return FileSystems.exists(FileSystems.join(path, MARKER))
    except ValueError:  # e.g. gs:// without apache-beam[gcp]
        return False


def _b64(value: Optional[str]) -> Optional[bytes]:
    import base64

    return None if value is None else base64.b64decode(value)


def _to_row(record: SourceRecord) -> Dict[str, Any]:
    source = record.source
    return {
        "topic": source["topic"], "partition": source["partition"], "offset": source["offset"],
        "timestamp_ms": source["timestamp_ms"], "key": _b64(source.get("key")),
        "headers": [{"name": name, "value": _b64(value)} for name, value in source.get("headers", [])],
        "value": record.value,
    }


def _to_record(row: Dict[str, Any], high_water_ms: Optional[int]) -> SourceRecord:
    import base64

    def text(value: Optional[bytes]) -> Optional[str]:
        return None if value is None else base64.b64encode(value).decode("ascii")

    source = {
        "topic": row["topic"], "partition": row["partition"], "offset": row["offset"],
        "timestamp_ms": row["timestamp_ms"], "key": text(row["key"]),
        "headers": [[header["name"], text(header["value"])] for header in row["headers"]],
    }
    return SourceRecord(bytes(row["value"]), source, high_water_ms)


def file_name(topic: str, hour: str, partition: int, first: int, last: int, archive_format: str) -> str:
    return f"topic={topic}/hour={hour}/partition={partition}-offsets={first:012d}-{last:012d}.{archive_format}"


def _hour(timestamp_ms: int) -> str:
    """The hour folder of a record's Kafka timestamp (YYYY-MM-DDTHH). The broker
    takes any timestamp; one before the year 1 or after 9999 (a producer's bug)
    goes in the first or last hour there is. The hour names the file only: the
    reader merges a partition's files by offset, and the record keeps its own."""
    from onceflow.events import MAX_EVENT_TIME_MS, MIN_EVENT_TIME_MS, format_utc_ms

    return format_utc_ms(min(max(timestamp_ms, MIN_EVENT_TIME_MS), MAX_EVENT_TIME_MS))[:13]


def encode_file(rows: List[Dict[str, Any]], archive_format: str, name: str) -> bytes:
    """The bytes of one archive file: deterministic for the same rows and name."""
    buffer = io.BytesIO()
    if archive_format == "avro":
        marker = hashlib.sha256(name.encode("utf-8")).digest()[:16]
        fastavro.writer(buffer, _PARSED_SCHEMA, rows, sync_marker=marker, codec="deflate")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), buffer, compression="zstd")
    return buffer.getvalue()


def decode_file(data: bytes, archive_format: str) -> Iterator[Dict[str, Any]]:
    if archive_format == "avro":
        yield from fastavro.reader(io.BytesIO(data))
    else:
        import pyarrow.parquet as pq

        yield from pq.read_table(io.BytesIO(data)).to_pylist()


class _WriteFileDoFn(beam.DoFn):
    def __init__(self, directory: str, archive_format: str):
        self._directory = directory
        self._format = archive_format
        self._files_written = metrics.counter(metrics.ARCHIVE_FILES_WRITTEN)

    def process(self, element: Tuple[Tuple[str, int, str], Iterable[SourceRecord]]) -> Iterator[str]:
        (topic, partition, hour), records = element
        rows = sorted((_to_row(record) for record in records), key=lambda row: row["offset"])
        name = file_name(topic, hour, partition, rows[0]["offset"], rows[-1]["offset"], self._format)
        path = os.path.join(self._directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.tmp-{os.getpid()}"
        with open(temporary, "wb") as handle:
            handle.write(encode_file(rows, self._format, name))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        self._files_written.inc()
        yield path


class WriteArchive(beam.PTransform):
    """Writes bounded ``PCollection[SourceRecord]`` read from Kafka to archive files
    (one per topic, hour of the Kafka timestamp and partition), then records the
    run as finished in the folder's manifest (:func:`record_run`, with the offset
    ``ranges`` read and the ``gaps`` retention left; make the folder an archive
    with :func:`write_marker` first). Output: the paths written. Local folders
    only (the rename is what makes a file appear whole)."""

    def __init__(self, directory: str, archive_format: str = "avro",
                 ranges: Optional[Dict[int, Tuple[int, int]]] = None, gaps: Iterable[str] = ()):
        super().__init__()
        if archive_format not in FORMATS:
            raise ValueError(f"archive format must be one of {', '.join(FORMATS)}")
        self._directory = directory
        self._format = archive_format
        self._ranges = ranges
        self._gaps = list(gaps)

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        directory, ranges, gaps = self._directory, self._ranges, self._gaps
        paths = (
            records
            | "KeyByPartitionAndHour" >> beam.Map(
                lambda r: ((r.source["topic"], r.source["partition"], _hour(r.source["timestamp_ms"])), r))
            | "GroupFiles" >> beam.GroupByKey()
            | "WriteFiles" >> beam.ParDo(_WriteFileDoFn(directory, self._format))
        )
        # Once every file is in place: the run is finished, and the manifest says so.
        _ = (paths
             | "ListFiles" >> beam.combiners.ToList()
             | "RecordRun" >> beam.Map(lambda written: record_run(directory, written, ranges, gaps)))
        return paths


def read_manifest(directory: str) -> Dict[str, Any]:
    """The archive's manifest (``{}`` when there is none). ValueError (one line)
    when it is there but damaged (not JSON, cut off, its list of finished runs or
    their offset ranges not what the archive job writes): a damaged manifest must
    not pass for an archive written before runs were recorded, whose files are
    taken as they are, nor be replaced by a new list of runs."""
    path = FileSystems.join(directory, MARKER)
    try:
        with FileSystems.open(path) as handle:
            data = handle.read()
    except OSError:  # Beam raises its own IOError subclass for a missing file
        return {}
    damaged = ValueError(f"{path}: the archive's manifest is damaged; restore it, or archive the topic again into "
                         "a new folder")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError:
        raise damaged from None
    if not isinstance(manifest, dict):
        raise damaged
    runs = manifest.get("runs", [])
    if not (isinstance(runs, list) and all(isinstance(run, list) for run in runs)
            and all(isinstance(name, str) and _is_archive_file_name(name) for run in runs
                    for name in run)):
        raise ValueError(f"{path}: its list of finished runs is damaged; restore it, or archive the topic again "
                         "into a new folder")
    ranges = manifest.get("ranges", [None] * len(runs))
    if not (isinstance(ranges, list) and len(ranges) == len(runs) and all(
            run_ranges is None or (isinstance(run_ranges, dict) and all(
                key.isdigit() and isinstance(span, list) and len(span) == 2
                and all(isinstance(offset, int) for offset in span) for key, span in run_ranges.items()))
            for run_ranges in ranges)):
        raise damaged
    return manifest


def _write_manifest(directory: str, manifest: Dict[str, Any]) -> None:
    """Writes the manifest whole or not at all: a temporary file, synced, renamed,
    and the folder synced (a crash leaves the old manifest or the new one)."""
    path = os.path.join(directory, MARKER)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_marker(directory: str, archive_format: str, topic: str, topic_id: Optional[str] = None) -> None:
    """Makes ``directory`` an archive folder of ``topic`` (its manifest), keeping the
    finished runs of an archive already there. An archive
    of another topic is refused (ValueError): a job reading the folder would add the
    two topics up; so is one of the same name deleted and created again since
    (another ``topic_id``, Kafka's ID of the topic): its offsets start over, and
    the reader would take the old records for the new ones at the same offsets."""
    os.makedirs(directory, exist_ok=True)
    with _manifest_lock(directory):
        _write_marker_locked(directory, archive_format, topic, topic_id)


def _write_marker_locked(directory: str, archive_format: str, topic: str, topic_id: Optional[str]) -> None:
    manifest = read_manifest(directory)
    if manifest and "runs" not in manifest:  # written before runs were recorded: its files are taken as they are
        legacy = sorted(_data_files(directory))
        manifest["runs"] = [legacy] if legacy else []
    topics = {_FILE.search(name).group("topic") for run in manifest.get("runs", ()) for name in run}
    if topics - {topic}:
        raise ValueError(f"{directory} is an archive of topic {sorted(topics)[0]}: give each topic its own folder")
    kept_id = manifest.get("topic_id")
    if kept_id and topic_id and kept_id != topic_id and manifest.get("runs"):
        raise ValueError(f"{directory} is an archive of an earlier topic {topic} (Kafka topic ID {kept_id}, now "
                         f"{topic_id}): the topic was deleted and created again, and its offsets started over; "
                         "give the new topic its own folder")
    runs = manifest.get("runs", [])
    _write_manifest(directory, {"format": archive_format, "schema": ARCHIVE_SCHEMA, "topic_id": topic_id or kept_id,
                                "runs": runs, "ranges": manifest.get("ranges", [None] * len(runs)),
                                "gaps": manifest.get("gaps", [])})


def record_run(directory: str, paths: Iterable[str], ranges: Optional[Dict[int, Tuple[int, int]]] = None,
               gaps: Iterable[str] = ()) -> None:
    """Adds a finished run (the files it wrote, relative to ``directory``, and the
    offset range ``[start, stop)`` it read of each partition) to the manifest,
    unless a run with the same files and ranges is there already (archiving a range
    again leaves the folder as it was). A run with the files of another but other
    ranges is added: one that wrote no file (its range held only aborted
    transactions or control markers) still read its range, and left out, the next
    top-up was refused for a hole there. ``gaps``: offsets the run let retention
    take (said when the archive is read)."""
    names = sorted(os.path.relpath(path, directory).replace(os.sep, "/") for path in paths)
    read = None if ranges is None else {str(p): list(span) for p, span in sorted(ranges.items())}
    with _manifest_lock(directory):  # two runs ending at once: each adds its own to what the other wrote
        manifest = read_manifest(directory)
        runs = manifest.setdefault("runs", [])
        run_ranges = manifest.setdefault("ranges", [None] * len(runs))
        if (names, read) not in zip(runs, run_ranges):
            runs.append(names)
            run_ranges.append(read)
            manifest.setdefault("gaps", []).extend(gap for gap in gaps if gap not in manifest["gaps"])
            _write_manifest(directory, manifest)


@contextlib.contextmanager
def _manifest_lock(directory: str) -> Iterator[None]:
    """An exclusive lock on the folder's manifest while it is read and rewritten."""
    with open(os.path.join(directory, MARKER + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def archived_ranges(manifest: Dict[str, Any]) -> Dict[int, List[Tuple[int, int]]]:
    """Each partition's offset ranges ``[start, stop)`` the finished runs read,
    merged (runs recorded without ranges, by earlier versions, are left out)."""
    spans: Dict[int, List[Tuple[int, int]]] = {}
    for run_ranges in manifest.get("ranges", ()):
        for partition, (start, stop) in (run_ranges or {}).items():
            if stop > start:
                spans.setdefault(int(partition), []).append((start, stop))
    merged: Dict[int, List[Tuple[int, int]]] = {}
    for partition, found in spans.items():
        for start, stop in sorted(found):
            runs = merged.setdefault(partition, [])
            if runs and start <= runs[-1][1]:
                runs[-1] = (runs[-1][0], max(runs[-1][1], stop))
            else:
                runs.append((start, stop))
    return merged


def holes_left_by(manifest: Dict[str, Any], partition: int, start: int, stop: int) -> List[Tuple[int, int]]:
    """The offsets ``[first, stop)`` no run would have read if a run read
    ``[start, stop)`` of ``partition`` now, between the archived ranges and it (an
    archive that ends at 196 topped up from 300 leaves 196-299 out)."""
    archived = archived_ranges(manifest).get(partition, [])
    if not archived or stop <= start:
        return []
    before = [(low, high) for low, high in archived if high < start]
    after = [(low, high) for low, high in archived if low > stop]
    holes = []
    if before and not any(low <= start <= high for low, high in archived):
        holes.append((max(high for _, high in before), start))
    if after and not any(low <= stop <= high for low, high in archived):
        holes.append((stop, min(low for low, _ in after)))
    # Not new: part of a hole the archive had already (between two ranges), which this run narrows.
    had = list(zip((high for _, high in archived), (low for low, _ in archived[1:])))
    return [hole for hole in holes if not any(low <= hole[0] and hole[1] <= high for low, high in had)]


def check_archive(directory: str) -> List[str]:
    """Raises ValueError (one line) unless every record the folder's finished runs
    archived is there and every data file is part of one: a file a finished run
    listed is missing; a data file that no finished run wrote nor covers (its
    partition's offsets within one run's first and last) was left by a run stopped
    part way; a file that is not an archive file. An archive written before runs
    were recorded (its manifest lists none) is checked for the last kind only.
    Returns the gaps the runs let retention take (``--allow_retention_gaps``), to
    be said to whoever reads it."""
    found = _data_files(directory)
    manifest = read_manifest(directory)
    if "runs" not in manifest:
        return []
    runs = manifest["runs"]
    if found and not runs:
        raise ValueError(f"no archive run into {directory} has finished (the files there were left by a run "
                         "stopped part way): run the archive job again")
    for run in runs:
        for name in run:
            if name not in found:
                (_, partition), (first, last) = next(iter(_spans([name]).items()))
                raise ValueError(f"{FileSystems.join(directory, name)}, written by a finished archive run, is "
                                 f"missing: archive its range again while the topic holds it (--from "
                                 f"offsets:{partition}={first} --to offsets:{partition}={last + 1}: the job rewrites "
                                 "what is missing), or restore the file")
    spans: Dict[Tuple[str, int], List[Tuple[int, int]]] = {}
    for run in runs:
        for (topic, partition), (first, last) in _spans(run).items():
            spans.setdefault((topic, partition), []).append((first, last))
    listed = {name for run in runs for name in run}
    for name in sorted(found - listed):
        (topic, partition), (first, last) = next(iter(_spans([name]).items()))
        if not any(low <= first and last <= high for low, high in spans.get((topic, partition), ())):
            raise ValueError(f"{FileSystems.join(directory, name)} is not part of a finished archive run (a run "
                             "stopped part way): archive its range again, or remove the file")
    return [str(gap) for gap in manifest.get("gaps", [])]


def _is_archive_file_name(name: str) -> bool:
    """Whether ``name`` (relative to the folder) is one :func:`file_name` gives."""
    stem, _, extension = name.rpartition(".")
    return extension in FORMATS and _FILE.fullmatch(stem + ".") is not None


def _data_files(directory: str) -> set:
    """The archive files in the folder, relative to it (not the ones a run was
    writing when it stopped); ValueError (one line) for a file that is not one."""
    listing = FileSystems.match([FileSystems.join(directory, "topic=*", "hour=*", "*")])[0].metadata_list
    found = set()
    for metadata in listing:
        name = os.path.relpath(metadata.path, directory).replace(os.sep, "/")
        if ".tmp-" in name.rsplit("/", 1)[-1]:
            continue  # a file a run was writing when it stopped: never read
        if not _is_archive_file_name(name):
            raise ValueError(f"{metadata.path} is not an archive file (partition=P-offsets=FIRST-LAST.avro or "
                             ".parquet): remove it from the archive folder")
        found.add(name)
    return found


def archived_spans(directory: str) -> Dict[Tuple[str, int], List[Tuple[int, int]]]:
    """The (first, last) offsets of each data file in the archive folder, per
    (topic, partition): a record is in the archive when one of its partition's
    spans holds its offset."""
    spans: Dict[Tuple[str, int], List[Tuple[int, int]]] = {}
    for name in _data_files(directory):
        for key, span in _spans([name]).items():
            spans.setdefault(key, []).append(span)
    return spans


def _spans(names: Iterable[str]) -> Dict[Tuple[str, int], Tuple[int, int]]:
    """The (first, last) offsets the files cover, per (topic, partition)."""
    spans: Dict[Tuple[str, int], Tuple[int, int]] = {}
    for name in names:
        match = _FILE.search(name)
        key = (match.group("topic"), int(match.group("partition")))
        first, last = int(match.group("first")), int(match.group("last"))
        low, high = spans.get(key, (first, last))
        spans[key] = (min(low, first), max(high, last))
    return spans


def _first_offset(path: str) -> int:
    return int(_FILE.search(path).group("first"))


def _file_rows(path: str) -> Iterator[Dict[str, Any]]:
    """The rows of one archive file, in offset order (as they were written); a file
    that cannot be read to its end fails the read in one line naming it."""
    from onceflow.io.files import UnreadableInputFile

    archive_format = path.rsplit(".", 1)[1]
    try:
        with FileSystems.open(path) as handle:
            data = handle.read()
        yield from decode_file(data, archive_format)
    except Exception as error:  # fastavro's and pyarrow's errors for a cut or damaged file have no common base
        raise UnreadableInputFile(f"{path}: cannot be read ({type(error).__name__}: {error}); archive its range "
                                  "again") from error


def merged_rows(paths: Iterable[str]) -> Iterator[Dict[str, Any]]:
    """Every row of one partition's archive files exactly once, in offset order.

    Files of different hours may interleave in offsets (Kafka timestamps need not
    grow with offsets), and overlapping archive runs may store an offset twice: the
    rows of all files are merged by offset and each offset is kept once. A file is
    opened only once the merge reaches its first offset, so the files open at once
    are those whose offset spans overlap.
    """
    pending = sorted(paths, key=_first_offset, reverse=True)  # pop() gives the lowest first offset
    heap: List[Tuple[int, int, Dict[str, Any], Iterator[Dict[str, Any]]]] = []
    opened = 0
    last_offset, kept = -1, None
    while heap or pending:
        while pending and (not heap or _first_offset(pending[-1]) <= heap[0][0]):
            rows = _file_rows(pending.pop())
            opened += 1
            row = next(rows, None)
            if row is not None:
                heapq.heappush(heap, (row["offset"], opened, row, rows))
        if not heap:
            continue
        offset, order, row, rows = heapq.heappop(heap)
        following = next(rows, None)
        if following is not None:
            heapq.heappush(heap, (following["offset"], order, following, rows))
        if offset > last_offset:  # an offset archived twice by overlapping runs: keep it once
            last_offset, kept = offset, row
            yield row
        elif row != kept:
            raise ValueError(f"partition {row['partition']} offset {offset} of {row['topic']} is archived twice with "
                             "different records: the topic was deleted and created again between two archive runs "
                             "into this folder; archive the new topic into its own folder")


class _ReadPartitionFilesDoFn(beam.DoFn):
    def __init__(self, contract: EventContract, time_source: str):
        self._contract = contract
        self._by_field = time_source == "field"

    def process(self, element: Tuple[Tuple[str, int], Iterable[str]]) -> Iterator[SourceRecord]:
        _, paths = element
        high_water: Optional[int] = None
        for row in merged_rows(paths):
            record = _to_record(row, high_water)
            yield record
            if self._by_field:
                event_time = self._contract.peek_event_time_ms(record.value)
            else:  # the Kafka reader's rule for time_source "record": every record's timestamp in years 1970-9999
                event_time = row["timestamp_ms"] if 0 <= row["timestamp_ms"] <= MAX_EVENT_TIME_MS else None
            if event_time is not None and (high_water is None or event_time > high_water):
                high_water = event_time


class ReadArchive(beam.PTransform):
    """Reads an archive folder back as bounded ``PCollection[SourceRecord]``, each
    partition in offset order with the same sources and high waters a Kafka read
    of the same records gives, so the transforms make the same decisions.
    ``time_source`` is the Kafka read's (``field`` or ``record``): it decides the
    high waters as it does there."""

    def __init__(self, directory: str, contract: EventContract, time_source: str = "field"):
        super().__init__()
        check_time_source(time_source)
        self._directory = directory
        self._contract = contract
        self._time_source = time_source

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "MatchFiles" >> fileio.MatchFiles(FileSystems.join(self._directory, "topic=*", "hour=*", "partition=*"))
            | "SkipUnfinished" >> beam.Filter(lambda m: m.path.rsplit(".", 1)[-1] in FORMATS)  # not *.tmp-PID
            | "KeyByPartition" >> beam.Map(lambda m: (
                (_FILE.search(m.path).group("topic"), int(_FILE.search(m.path).group("partition"))), m.path))
            | "GroupByPartition" >> beam.GroupByKey()
            | "ReadInOffsetOrder" >> beam.ParDo(_ReadPartitionFilesDoFn(self._contract, self._time_source))
        )
