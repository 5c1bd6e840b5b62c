"""Bounded, retried batch writes: the skeleton every onceflow sink DoFn shares.

A :class:`BatchWriteDoFn` buffers at most ``batch_size`` elements, writes each full
batch at once and the rest in ``finish_bundle``, so nothing is buffered past the
bundle and memory stays bounded. A batch is written with
:func:`onceflow.io.retry.call_with_retries`: a transient error (``is_transient``)
is retried with capped backoff after ``recover`` (reconnect, roll back), a
permanent one is raised at once, and after the cap the bundle fails loudly and the
runner retries it. A write must therefore be idempotent: the same batch written
twice leaves the store as written once. A transient error never sends a good
element to the dead-letter queue.

:class:`UpsertRowsDoFn` adds what the aggregate-row sinks have in common: one
``written_at`` per batch and the ``sink_rows_written`` / ``sink_rows_stale``
counters (``sink_retries`` counts every retry of any sink, DLQ sinks included).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import apache_beam as beam

from onceflow import metrics
from onceflow.io.retry import call_with_retries
from onceflow.rows import WINDOW_END, utc_now


class BatchWriteDoFn(beam.DoFn):
    """Subclasses implement ``write_batch`` and, as needed, ``open``, ``close``,
    ``is_transient`` and ``recover``."""

    def __init__(self, batch_size: int, what: str):
        if batch_size <= 0:
            raise ValueError("batch size must be positive")
        self._batch_size = batch_size
        self._what = what
        self._retries = metrics.counter(metrics.SINK_RETRIES)

    # -- hooks ----------------------------------------------------------------

    def open(self) -> None:
        """Called once per DoFn instance (``setup``)."""

    def close(self) -> None:
        """Called on ``teardown``; must not raise."""

    def write_batch(self, batch: Sequence[Any]) -> None:
        raise NotImplementedError

    def is_transient(self, error: BaseException) -> bool:
        return False

    def recover(self, error: BaseException) -> None:
        """Called after a transient error, before the retry (e.g. drop a broken connection)."""

    # -- Beam -----------------------------------------------------------------

    def setup(self) -> None:
        self.open()

    def start_bundle(self) -> None:
        self._batch: List[Any] = []

    def process(self, element: Any):
        self._batch.append(element)
        if len(self._batch) >= self._batch_size:
            self._flush()

    def finish_bundle(self) -> None:
        self._flush()

    def teardown(self) -> None:
        self.close()

    def _flush(self) -> None:
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        call_with_retries(lambda: self.write_batch(batch), self.is_transient, what=self._what,
                          on_retry=self._on_retry)

    def _on_retry(self, error: BaseException) -> None:
        self._retries.inc()
        self.recover(error)


class UpsertRowsDoFn(BatchWriteDoFn):
    """A batch of aggregate rows upserted under the ``event_count`` guard;
    subclasses implement ``upsert`` returning how many rows were written (the rest
    were refused by the guard)."""

    def __init__(self, batch_size: int, what: str):
        super().__init__(batch_size, what)
        self._written = metrics.counter(metrics.SINK_ROWS_WRITTEN)
        self._stale = metrics.counter(metrics.SINK_ROWS_STALE)
        self._window_end = metrics.SinkWindowEnd()

    def upsert(self, rows: Sequence[Dict[str, Any]], written_at) -> int:
        raise NotImplementedError

    def write_batch(self, batch: Sequence[Dict[str, Any]]) -> None:
        written = self.upsert(batch, utc_now())
        self._written.inc(written)
        self._stale.inc(len(batch) - written)
        self._window_end.record(max(int(row[WINDOW_END]) for row in batch))
