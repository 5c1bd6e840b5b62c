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
from typing import Any, Dict, Iterator, List

import apache_beam as beam

from onceflow import metrics
from onceflow.deadletter import DeadLetter
from onceflow.io.dlq.envelope import to_envelope, to_json_line

_MAX_BUFFERED = 500


def prepare_file(path: str) -> None:
    """Creates the folder the file goes in; OSError if it cannot."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


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


def read_dead_letters(path: str) -> Iterator[Dict[str, Any]]:
    """Each envelope in a DLQ file once (first occurrence of each ``dlq_id``);
    nothing when the file does not exist."""
    if not os.path.exists(path):
        return
    seen = set()
    with open(path, "rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            envelope = json.loads(line)
            if envelope["dlq_id"] in seen:
                continue
            seen.add(envelope["dlq_id"])
            yield envelope
