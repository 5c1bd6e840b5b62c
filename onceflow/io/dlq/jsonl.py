"""A dead-letter queue in a local file of JSON lines: its writer and its reader.

The writer appends envelopes (:mod:`onceflow.io.dlq.envelope`), flushed and
fsynced before each bundle completes, under an exclusive lock since other
workers append to the same file. Delivery is at-least-once: a retried bundle may
append a dead letter again; :func:`read_dead_letters` returns each ``dlq_id``
once, so readers see every refused record exactly once.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
from typing import Any, Dict, Iterator, List

import apache_beam as beam

from onceflow import metrics
from onceflow.deadletter import DeadLetter
from onceflow.io.dlq.envelope import ENVELOPE_TIME, to_envelope, to_json_line

_MAX_BUFFERED = 500


def prepare_file(path: str) -> None:
    """Creates the folder the file goes in and the file itself, empty if it is new
    (so a job that dead-letters nothing leaves an empty queue, not a missing one);
    OSError if it cannot, ValueError if the file holds something other than dead
    letters (dead letters are appended: a wrong path would corrupt that file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "ab+") as handle:
        handle.seek(0)
        first = handle.readline(1 << 20)
    if first.strip():
        try:
            _envelope(first, "its first line")
        except ValueError as error:
            raise ValueError(f"{path} is not a dead-letter queue ({error}); give a new file or the queue of an "
                             "earlier run") from None


class AppendJsonlDoFn(beam.DoFn):
    """Appends each bundle's dead letters to ``path`` (see the module docstring)."""

    def __init__(self, path: str, pipeline: str, pipeline_version: str):
        self._path = path
        self._pipeline = pipeline
        self._version = pipeline_version
        self._written = metrics.counter(metrics.DLQ_WRITTEN)

    def setup(self) -> None:
        prepare_file(self._path)

    def start_bundle(self) -> None:
        self._lines: List[str] = []

    def process(self, letter: DeadLetter):
        self._lines.append(to_json_line(to_envelope(letter, self._pipeline, self._version)))
        if len(self._lines) >= _MAX_BUFFERED:
            self._flush()

    def finish_bundle(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._lines:
            return
        data = ("\n".join(self._lines) + "\n").encode("utf-8")
        with open(self._path, "ab") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # other workers append to the same file
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self._written.inc(len(self._lines))
        self._lines = []


class WriteDeadLettersToJsonl(beam.PTransform):
    """Appends dead letters as JSON lines to a local file (module docstring);
    its one step is ``AppendJsonLines``."""

    def __init__(self, path: str, pipeline: str, pipeline_version: str):
        super().__init__()
        self._args = (path, pipeline, pipeline_version)

    def expand(self, letters: beam.PCollection) -> beam.PCollection:
        return letters | "AppendJsonLines" >> beam.ParDo(AppendJsonlDoFn(*self._args))


# The envelope's fields a reader relies on, with their JSON types.
_ENVELOPE_TYPES = (("dlq_id", str), ("reason", str), ("message", str), ("stage", str), ("source", dict),
                   ("raw_base64", str), ("failed_at", str))


def read_dead_letters(path: str) -> Iterator[Dict[str, Any]]:
    """Each envelope in a DLQ file once (first occurrence of each ``dlq_id``);
    nothing when the file does not exist. A line that is not a dead letter (not
    UTF-8, not JSON, not an envelope) raises ValueError naming the file and the
    line, and a last line cut off mid-record says the file looks cut off; a file
    that cannot be read (a directory, no permission) raises OSError."""
    if not os.path.exists(path):
        return
    seen = set()
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            envelope = _envelope(line, f"{path} line {number}")
            if envelope["dlq_id"] in seen:
                continue
            seen.add(envelope["dlq_id"])
            yield envelope


def _envelope(line: bytes, where: str) -> Dict[str, Any]:
    """The envelope on one line of a DLQ file; ValueError (one line, naming
    ``where``) when the line is not one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not a dead letter: it is not UTF-8 text (is this a dead-letter file?)") from None
    try:
        envelope = json.loads(text)
    except json.JSONDecodeError as error:
        ended_early = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string")
        if ended_early and not line.endswith(b"\n"):  # the last line, cut off mid-record
            raise ValueError(f"{where} is not a dead letter: it ends mid-record (the file looks cut off)") from None
        raise ValueError(f"{where} is not a dead letter: not JSON ({error.msg} at column {error.colno}); "
                         "is this a dead-letter file?") from None
    if not isinstance(envelope, dict):
        raise ValueError(f"{where} is not a dead letter: a JSON {type(envelope).__name__}, not an envelope object")
    for name, kind in _ENVELOPE_TYPES:
        if not isinstance(envelope.get(name), kind):
            raise ValueError(f"{where} is not a dead letter: no {name!r} field of an envelope")
    try:
        datetime.datetime.strptime(envelope["failed_at"], ENVELOPE_TIME)
    except ValueError:
        raise ValueError(f"{where} is not a dead letter: failed_at {envelope['failed_at']!r} is not a time "
                         "like 2026-11-02T09:00:00.000000Z") from None
    return envelope
