"""Dead-letter sinks and readers: JSON lines in a local file."""

from __future__ import annotations

import fcntl
import json
import os
from typing import Dict, Iterator, List

import apache_beam as beam

from onceflow import metrics
from onceflow.deadletter import DeadLetter, to_envelope, to_json_line

_MAX_BUFFERED = 500


class _AppendJsonlDoFn(beam.DoFn):
    def __init__(self, path: str, pipeline: str, pipeline_version: str):
        self._path = path
        self._pipeline = pipeline
        self._version = pipeline_version
        self._written = metrics.counter(metrics.DLQ_WRITTEN)

    def setup(self) -> None:
        directory = os.path.dirname(os.path.abspath(self._path))
        os.makedirs(directory, exist_ok=True)

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
    """Appends dead letters as JSON lines (the envelope of
    :mod:`onceflow.deadletter`) to a local file, flushed and fsynced before each
    bundle completes.

    Delivery is at-least-once: a retried bundle may append a dead letter again.
    Every envelope carries a deterministic ``dlq_id``, and :func:`read_dead_letters`
    returns each ID once, so readers see every refused record exactly once.
    """

    def __init__(self, path: str, pipeline: str, pipeline_version: str):
        super().__init__()
        self._args = (path, pipeline, pipeline_version)

    def expand(self, letters: beam.PCollection) -> beam.PCollection:
        return letters | "AppendJsonLines" >> beam.ParDo(_AppendJsonlDoFn(*self._args))


def read_dead_letters(path: str) -> Iterator[Dict]:
    """Each envelope in a DLQ file once (first occurrence of each ``dlq_id``)."""
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
