"""File sink: one Parquet or Avro file per window, rewritten idempotently.

Layout: ``DIR/<window_start>_<window_end>.<parquet|avro>``, times as
``2026-11-02T09-00-00.000Z`` (UTC, ``:`` replaced so every filesystem takes the
name). A window's rows may arrive in several bundles or panes, so each write is a
read-merge-write of the window's file:

1. take the directory's lock (``DIR/.onceflow.lock``, ``fcntl.flock``: every
   process on this machine writing into DIR waits its turn);
2. read the window's file if it exists; for each incoming row keep it unless the
   stored row with the same key has a greater ``event_count`` (the same guard as
   the SQL sinks: an older or less complete version never wins);
3. write all rows of the window, sorted by key, to a temporary file in the same
   directory, fsync it, ``os.replace`` it over the window's file, fsync the
   directory.

Readers therefore see either the old or the new file, never a partial one, and a
crash at any point leaves the previous complete file. The content is a function
of the rows alone: no ``written_at`` column (the file's modification time says
when), rows sorted by key, fixed writer settings, and for Avro a sync marker
derived from the file name. Writing the same rows again, in any order or
bundling, gives a byte-identical file (for the same pyarrow / fastavro versions).

Columns: key fields (string), ``window_start`` and ``window_end`` (UTC
timestamps, milliseconds), ``event_count`` and ``count`` (int64), other
aggregates (double). The lock is local: the directory must be on a local (or
POSIX-locking) filesystem, not an object store.

Metrics: ``sink_rows_written``, ``sink_rows_stale``, ``sink_retries`` (a file
sink has no transient errors; an I/O error fails the bundle, which the runner
retries).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import io
import json
import os
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import apache_beam as beam

from onceflow.events import format_utc_ms
from onceflow.io.batching import UpsertRowsDoFn
from onceflow.io.progress import Position
from onceflow.rows import (
    DEFAULT_BATCH_ROWS, EVENT_COUNT, WINDOW_END, WINDOW_START, RowSchema, check_columns, check_sink_arguments,
    newest_per_key, utc_millis,
)

FORMATS = ("parquet", "avro")
LOCK_NAME = ".onceflow.lock"


def window_file_name(start_ms: int, end_ms: int, file_format: str) -> str:
    """``2026-11-02T09-00-00.000Z_2026-11-02T09-01-00.000Z.parquet``: the same
    window always has the same name."""
    _check_format(file_format)
    return f"{format_utc_ms(start_ms).replace(':', '-')}_{format_utc_ms(end_ms).replace(':', '-')}.{file_format}"


def _window_of_file_name(name: str, file_format: str) -> Optional[Tuple[int, int]]:
    """The window bounds :func:`window_file_name` gave ``name``; None for another name."""
    from onceflow.events import RecordError, parse_event_time_ms

    suffix = "." + file_format
    parts = name[:-len(suffix)].split("_")
    if name.startswith(".") or not name.endswith(suffix) or len(parts) != 2:
        return None
    try:  # 2026-11-02T09-00-00.000Z: the time's colons were written as hyphens
        start, end = (parse_event_time_ms(part[:11] + part[11:].replace("-", ":")) for part in parts)
    except (RecordError, ValueError):
        return None
    return start, end


def latest_window_in_directory(directory: str, file_format: str) -> Optional[Tuple[int, int]]:
    """The bounds (epoch ms) of the latest window file in ``directory`` (by its
    name), None when it holds none."""
    windows = [_window_of_file_name(name, file_format) for name in os.listdir(directory)]
    windows = [window for window in windows if window is not None]
    return max(windows, key=lambda window: window[1]) if windows else None


def _check_format(file_format: str) -> None:
    if file_format not in FORMATS:
        raise ValueError(f"format {file_format!r} is not supported; use {' or '.join(FORMATS)}")


# -- encoding -------------------------------------------------------------------


def arrow_schema(schema: RowSchema):
    import pyarrow as pa

    types = {"key": pa.string(), "timestamp": pa.timestamp("ms", tz="UTC"), "integer": pa.int64(),
             "number": pa.float64()}
    return pa.schema([pa.field(c, types[schema.column_kind(c)], nullable=schema.column_kind(c) != "number")
                      for c in schema.columns])


def avro_schema(schema: RowSchema) -> Dict[str, Any]:
    types = {"key": "string", "timestamp": {"type": "long", "logicalType": "timestamp-millis"},
             "integer": "long", "number": "double"}
    return {"type": "record", "name": "AggregateRow", "namespace": "onceflow",
            "fields": [{"name": c, "type": types[schema.column_kind(c)]} for c in schema.columns]}


def _plain(row: Dict[str, Any], schema: RowSchema) -> Dict[str, Any]:
    """The row as stored: numbers typed by column kind, window bounds in ms."""
    out: Dict[str, Any] = {}
    for column in schema.columns:
        value = row[column]
        kind = schema.column_kind(column)
        if kind == "timestamp" and isinstance(value, datetime.datetime):
            value = utc_millis(value)
        elif kind == "number" and value is not None:
            value = float(value)
        elif kind == "integer":
            value = int(value)
        out[column] = value
    return out


def encode(rows: Sequence[Dict[str, Any]], schema: RowSchema, file_format: str, name: str) -> bytes:
    """The bytes of a window file holding ``rows`` (already sorted by key)."""
    _check_format(file_format)
    buffer = io.BytesIO()
    if file_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = arrow_schema(schema)
        table = pa.Table.from_pylist([_plain(r, schema) for r in rows], schema=arrow)
        pq.write_table(table, buffer, compression="snappy", write_statistics=True)
    else:
        import fastavro

        avro = avro_schema(schema)
        records = [_plain(r, schema) for r in rows]  # timestamp-millis as epoch ms
        marker = hashlib.sha256(name.encode("utf-8")).digest()[:16]
        fastavro.writer(buffer, fastavro.parse_schema(avro), records, codec="null", sync_marker=marker)
    return buffer.getvalue()


def decode(data: bytes, schema: RowSchema, file_format: str, name: str = "file") -> List[Dict[str, Any]]:
    """Rows of a window file, window bounds as epoch ms; ValueError if the file has
    other columns (written by a job with other keys or aggregates)."""
    _check_format(file_format)
    if file_format == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        found, rows = table.column_names, table.to_pylist()
    else:
        import fastavro

        reader = fastavro.reader(io.BytesIO(data))
        found = [field["name"] for field in reader.writer_schema["fields"]]
        rows = list(reader)
    check_columns(found, schema.columns, name, "this directory", hint="write into another directory")
    return [_plain(row, schema) for row in rows]


# -- read-merge-write -----------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    with open(os.path.join(directory, LOCK_NAME), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _umask_mode() -> int:
    """The mode a newly created file gets here: 0666 less the process umask (read
    without changing it for other threads where /proc says it, else set and reset)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _replace_atomically(directory: str, name: str, data: bytes) -> None:
    """Writes ``data`` to ``directory/name`` whole or not at all (temp file, fsync,
    rename, fsync of the folder). The file gets the mode a normally created file
    would (0666 less the umask), not mkstemp's owner-only 0600."""
    descriptor, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(descriptor, _umask_mode())
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, os.path.join(directory, name))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def merge_window(directory: str, schema: RowSchema, file_format: str,
                 rows: Sequence[Dict[str, Any]]) -> int:
    """Merges ``rows`` (all of one window) into its file under the guard; the
    number of incoming rows kept (the rest were stale). Call under the lock."""
    newest, superseded = newest_per_key(rows, schema)
    start, end = newest[0][WINDOW_START], newest[0][WINDOW_END]
    name = window_file_name(start, end, file_format)
    path = os.path.join(directory, name)
    stored: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
    if os.path.exists(path):
        with open(path, "rb") as handle:
            stored = {schema.key_of(r): r for r in decode(handle.read(), schema, file_format, name)}
    kept = 0
    for row in newest:
        key = schema.key_of(row)
        old = stored.get(key)
        if old is None or row[EVENT_COUNT] >= old[EVENT_COUNT]:
            stored[key] = _plain(row, schema)
            kept += 1
    merged = [stored[key] for key in sorted(stored)]
    _replace_atomically(directory, name, encode(merged, schema, file_format, name))
    return kept


def read_rows(directory: str, schema: RowSchema, file_format: str) -> List[Dict[str, Any]]:
    """Every row of every window file in ``directory``, sorted by key."""
    _check_format(file_format)
    rows: List[Dict[str, Any]] = []
    suffix = "." + file_format
    for name in sorted(os.listdir(directory)):
        if name.endswith(suffix) and not name.startswith("."):
            with open(os.path.join(directory, name), "rb") as handle:
                rows.extend(decode(handle.read(), schema, file_format, name))
    return sorted(rows, key=schema.key_of)


def prepare_directory(directory: str, schema: Optional[RowSchema] = None, file_format: Optional[str] = None) -> None:
    """Creates the directory and checks it takes files and the lock (fail fast);
    with ``schema``, that it holds no window files of the other format and that
    its window files have this job's columns (ValueError, one line: a job with
    other keys or aggregates failed at the first window file it shared, after
    writing the others)."""
    if os.path.exists(directory) and not os.path.isdir(directory):  # makedirs said "file exists"
        raise ValueError(f"{directory} is a file; a file sink writes its window files into a folder: give a "
                         "folder's path")
    os.makedirs(directory, exist_ok=True)
    with _locked(directory):
        pass
    if schema is None:
        return
    _check_format(file_format)
    for other in FORMATS:
        found = other != file_format and latest_window_in_directory(directory, other)
        if found:  # a reader of the folder would count each event in both
            raise ValueError(f"{directory} holds {other} window files, and this job writes {file_format} ones: "
                             "files of both for the same windows count each event twice; give ?format="
                             f"{other}, or write into another directory")
    suffix = "." + file_format
    existing = sorted(name for name in os.listdir(directory) if name.endswith(suffix) and not name.startswith("."))
    if existing:
        check_columns(_file_columns(os.path.join(directory, existing[0]), file_format), schema.columns,
                      existing[0], "this directory", hint="write into another directory")


def _file_columns(path: str, file_format: str) -> List[str]:
    try:
        if file_format == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        import fastavro

        with open(path, "rb") as handle:
            return [field["name"] for field in fastavro.reader(handle).writer_schema["fields"]]
    except Exception as error:  # pyarrow's and fastavro's errors for a damaged file have no common base
        raise ValueError(f"{os.path.basename(path)} in this directory cannot be read ({type(error).__name__}: "
                         f"{error}); write into another directory") from None


class _FileUpsertDoFn(UpsertRowsDoFn):
    def __init__(self, directory: str, schema: RowSchema, file_format: str, batch_size: int):
        super().__init__(batch_size, what=f"write window files in {directory}")
        self._directory = directory
        self._schema = schema
        self._format = file_format

    def open(self) -> None:
        prepare_directory(self._directory)

    def upsert(self, rows: Sequence[Dict[str, Any]], written_at: datetime.datetime) -> int:
        by_window: Dict[Tuple[int, int], List[Dict[str, Any]]] = {}
        for row in rows:
            by_window.setdefault((row[WINDOW_START], row[WINDOW_END]), []).append(row)
        kept = 0
        with _locked(self._directory):
            for window in sorted(by_window):
                kept += merge_window(self._directory, self._schema, self._format, by_window[window])
        return kept


class WriteRowsToFiles(beam.PTransform):
    """Writes aggregate rows as one Parquet or Avro file per window, merged under
    the ``event_count`` guard and replaced atomically (see the module docstring).

    Input: ``PCollection[dict]`` of rows, any windowing. Guarantee: once the
    pipeline succeeds, each window's file holds, for each key, the version with the
    greatest ``event_count`` ever written, sorted by key; rewriting the same rows
    gives a byte-identical file. Batches of at most ``batch_size`` rows, every one
    written before its bundle completes.
    """

    def __init__(self, directory: str, schema: RowSchema, file_format: str = "parquet",
                 batch_size: int = DEFAULT_BATCH_ROWS):
        super().__init__()
        _check_format(file_format)
        check_sink_arguments("WriteRowsToFiles", schema, batch_size)
        self._args = (directory, schema, file_format, batch_size)

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return rows | "WriteWindowFiles" >> beam.ParDo(_FileUpsertDoFn(*self._args))


# -- progress -------------------------------------------------------------------

PROGRESS_MANIFEST = "_onceflow_progress.json"


class FileProgress:
    """The positions of live jobs writing window files into ``directory``, in the
    manifest ``DIR/_onceflow_progress.json`` (see :mod:`onceflow.io.progress`):
    read and replaced whole (temp file, fsync, rename) under the directory's lock,
    after the window files it covers were replaced the same way."""

    def __init__(self, directory: str):
        self._directory = directory

    def _load(self) -> Dict[str, Any]:
        path = os.path.join(self._directory, PROGRESS_MANIFEST)
        if not os.path.exists(path):
            return {}
        with open(path, "rb") as handle:
            return json.loads(handle.read())

    def read(self, job: str, topic: str) -> Dict[int, Position]:
        with _locked(self._directory):
            stored = self._load().get(job, {}).get(topic, {})
        return {int(p): Position(topic, int(p), entry["next_offset"], entry["high_water_ms"],
                                 entry.get("final_through_ms")) for p, entry in stored.items()}

    def jobs(self) -> Set[Tuple[str, str]]:
        with _locked(self._directory):
            return {(job, topic) for job, by_topic in self._load().items() for topic in by_topic}

    def write(self, job: str, positions: Sequence[Position]) -> None:
        with _locked(self._directory):
            manifest = self._load()
            for position in positions:
                entries = manifest.setdefault(job, {}).setdefault(position.topic, {})
                held = entries.get(str(position.partition))
                if held is not None and held["next_offset"] > position.next_offset:
                    continue  # a stored offset never moves back
                entries[str(position.partition)] = {
                    "next_offset": position.next_offset, "high_water_ms": position.high_water_ms,
                    "final_through_ms": position.final_through_ms,
                    "updated_at": format_utc_ms(int(time.time() * 1000))}
            data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
            _replace_atomically(self._directory, PROGRESS_MANIFEST, data)
