"""A dead-letter queue in a local file of JSON lines: its writer and its reader.

The writer appends envelopes (:mod:`onceflow.io.dlq.envelope`), flushed and
fsynced before each bundle completes, under an exclusive lock since other
workers append to the same file. Delivery is at-least-once: a retried bundle may
append a dead letter again; :func:`read_dead_letters` returns each ``dlq_id``
once, so readers see every refused record exactly once.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from typing import Any, Dict, Iterator, List, Optional

import apache_beam as beam

from onceflow import metrics
from onceflow.deadletter import DeadLetter
from onceflow.io.dlq.envelope import checked_envelope, to_envelope, to_json_line

_MAX_BUFFERED = 500
_FIRST_KEY = '{"dlq_id":'  # how every line a writer appends begins (to_json_line sorts the keys)


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
            _parsed_line(first, "its first line")
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
        with open(self._path, "ab+") as handle:  # + to read its last byte
            fcntl.flock(handle, fcntl.LOCK_EX)  # other workers append to the same file
            size = os.fstat(handle.fileno()).st_size
            if size and os.pread(handle.fileno(), 1, size - 1) != b"\n":
                data = b"\n" + data  # a writer stopped mid-record: never glue a dead letter to its part
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


def read_dead_letters(path: str) -> Iterator[Dict[str, Any]]:
    """Each envelope in a DLQ file once (first occurrence of each ``dlq_id``);
    nothing when the file does not exist. A line that is not a dead letter (not
    UTF-8, not JSON, not an envelope) raises ValueError naming the file and the
    line; a file that cannot be read (a directory, no permission) raises OSError.
    A dead letter cut off mid-record (a writer stopped while appending it) is
    skipped with a warning: its bundle did not complete, so the job writes it
    again when it reads its record again."""
    if not os.path.exists(path):
        return
    seen = set()
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            envelope = _parsed_line(line, f"{path} line {number}")
            if envelope is None:
                print(f"onceflow: warning: {path} line {number}: a dead letter cut off mid-record (a writer stopped "
                      "while appending it), skipped: the job writes it again when it re-reads its record",
                      file=sys.stderr)
                continue
            if envelope["dlq_id"] in seen:
                continue
            seen.add(envelope["dlq_id"])
            yield envelope


def _parsed_line(line: bytes, where: str) -> Optional[Dict[str, Any]]:
    """The envelope on one line of a DLQ file, or None for a dead letter cut off
    mid-record (what a writer began: an envelope's first key, then JSON that ends
    early); ValueError (one line, naming ``where``) when the line is not one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not a dead letter: it is not UTF-8 text (is this a dead-letter file?)") from None
    try:
        envelope = json.loads(text)
    except json.JSONDecodeError as error:
        ended_early = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string")
        begun = text.rstrip("\n")
        if ended_early and (begun.startswith(_FIRST_KEY) or (len(begun) > 1 and _FIRST_KEY.startswith(begun))):
            return None
        raise ValueError(f"{where} is not a dead letter: not JSON ({error.msg} at column {error.colno}); "
                         "is this a dead-letter file?") from None
    return checked_envelope(envelope, where)
