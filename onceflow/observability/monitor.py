"""The monitor a pipeline's ``run()`` wraps around the run: live status, health
endpoint, final metrics file.

    with Monitor(options, runner) as monitor:
        result = pipeline.run()        # the DirectRunner's FnApiRunner blocks here
        monitor.watch(result)
        result.wait_until_finish()     # Prism, Flink, Dataflow return at once and block here
        summary = monitor.finish(collect_summary(result, ...))

A daemon thread takes a snapshot of the ``onceflow`` metrics every second: from
the runner (``result``) once there is one and it reports anything, from this
process's mirror of the metrics otherwise (see
:mod:`onceflow.observability.snapshot` for what each runner reports while it
runs). Each snapshot feeds the status line and ``/healthz``/``/metrics``;
:meth:`Monitor.finish` writes the final summary to ``--metrics_out``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
import threading
import time
from typing import Deque, Optional, TextIO

from onceflow.errors import UsageError
from onceflow.observability.figures import Figures
from onceflow.observability.health import HealthServer, HealthThresholds
from onceflow.observability.snapshot import NO_FIGURES, LocalMetricsSource, MetricsSnapshot, read_result
from onceflow.observability.status import StatusWriter

_LOGGER = logging.getLogger(__name__)

TICK_S = 1.0  # how often figures are refreshed
LIVE_EVERY_S = 1.0  # the status line on a terminal
PLAIN_EVERY_S = {"auto": 30.0, "on": 5.0}  # status lines when stderr is not a terminal
REMOTE_POLL_S = 30.0  # runners whose metrics are a cloud API call (Dataflow)
_HISTORY_S = 65.0  # snapshots kept: the DLQ rate is over the last minute
FIGURES_MAX_AGE_S = 60.0  # /healthz fails when the runner has given no figures for this long


class Monitor:
    """Watches one run; a context manager (see the module docstring).

    ``options`` are the pipeline's options (:class:`~onceflow.options.MonitoringOptions`
    is read from them); ``stream`` is where the status goes (default stderr);
    ``expected_records`` (a bounded read of known size) adds progress and time left.
    ``live``: an unbounded Kafka read, whose reader reports its lag every few
    seconds while it runs (``/healthz`` then checks the lag's age too; a bounded
    reader stops reporting once it has read its range).
    """

    def __init__(self, options, runner: str = "", stream: Optional[TextIO] = None, clock=time.time,
                 expected_records: Optional[int] = None, live: bool = False):
        from onceflow.options import MonitoringOptions  # options imports nothing from here

        config = options.view_as(MonitoringOptions)
        self._metrics_out: Optional[str] = config.metrics_out
        self._port: int = int(config.health_port or 0)
        on_dataflow = "dataflow" in runner.lower()  # metrics are a cloud API call
        self._poll_every = REMOTE_POLL_S if on_dataflow else TICK_S
        # Figures older than this: the runner has stopped answering (or the monitor is stuck);
        # a live reader's lag older than this: the runner no longer runs the reader (not judged on
        # Dataflow, whose gauge times were never seen here).
        max_age_s = max(FIGURES_MAX_AGE_S, 3 * self._poll_every)
        judge_lag_age = live and not on_dataflow
        self.thresholds = HealthThresholds(config.health_max_lag, config.health_max_dlq_rate,
                                           config.health_max_watermark_age, config.health_max_sink_lag,
                                           max_figures_age_s=max_age_s,
                                           max_lag_age_s=max_age_s if judge_lag_age else None)
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        live = _is_terminal(self._stream)
        mode = config.status or "auto"
        self._status_every: Optional[float] = None
        self._writer: Optional[StatusWriter] = None
        if mode != "off":
            self._status_every = LIVE_EVERY_S if live else PLAIN_EVERY_S[mode]
            self._writer = StatusWriter(self._stream, live, expected_records)
        self._result = None
        self._local: Optional[LocalMetricsSource] = None
        self._history: Deque[MetricsSnapshot] = collections.deque()
        self._figures: Optional[Figures] = None
        self._started_at = clock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_status = 0.0
        self._last_result_poll = 0.0
        self._last_result_snapshot: Optional[MetricsSnapshot] = None
        self.server: Optional[HealthServer] = None

    # -- the context ---------------------------------------------------------------

    def __enter__(self) -> "Monitor":
        self._started_at = self._clock()
        self._last_status = self._started_at
        self._local = LocalMetricsSource(self._clock)
        if self._port:
            try:
                self.server = HealthServer(self.figures, self.thresholds, self._port, self._clock)
            except OSError as error:
                raise UsageError(f"--health_port: cannot listen on 127.0.0.1:{self._port} ({error.strerror or error})"
                                 ) from None
        self._thread = threading.Thread(target=self._loop, name="onceflow-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._halt()
        if self.server is not None:
            self.server.close()
            self.server = None

    def watch(self, result) -> None:
        """The runner's result, once ``pipeline.run()`` has returned it."""
        self._result = result

    def figures(self) -> Optional[Figures]:
        """The latest figures (None before the first snapshot)."""
        return self._figures

    def mirror(self) -> Optional[MetricsSnapshot]:
        """What this process counted and set since the monitor started (None
        outside its context)."""
        return self._local.snapshot() if self._local is not None else None

    def finish(self, summary, counted_elsewhere: bool = False):
        """Stops the status line and writes ``summary`` to ``--metrics_out``; returns it.

        A summary without a counter, from a runner that says nothing once a live job
        is cancelled (Beam's Flink job server) or has gone (a Prism stopped with the
        job), takes the figures this monitor sees last instead: this process's
        mirror when the job's DoFns ran here (a LOOPBACK worker: counted up to the
        end), else the runner's last answer, ``values`` saying which; with none
        anywhere and the DoFns run by other processes (``counted_elsewhere``),
        ``values`` is :data:`NO_FIGURES`: its zeros are not the job's."""
        self._halt()
        if not summary.counters and self._local is not None:
            seen = self._local.snapshot()
            if not seen.counters:
                seen = self._snapshot()
            if seen.counters:
                summary = dataclasses.replace(summary, counters=dict(seen.counters), values=seen.values,
                                              gauges={name: value for name, (value, _) in seen.gauges.items()})
        if not summary.counters and counted_elsewhere:
            summary = dataclasses.replace(summary, values=NO_FIGURES)
        if self._metrics_out:
            try:
                summary.write_json(self._metrics_out)
            except OSError as error:  # checked before the run; a disk full or a folder gone since: say so, go on
                print(f"onceflow: warning: --metrics_out: could not write {self._metrics_out}: "
                      f"{error.strerror or error}; the summary follows", file=sys.stderr)
        return summary

    # -- the thread ----------------------------------------------------------------

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._writer is not None:
            self._writer.clear()

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # never let monitoring take the job down
                _LOGGER.debug("monitor: taking a snapshot failed", exc_info=True)

    def tick(self) -> Figures:
        """Takes a snapshot, updates the figures and, when due, the status."""
        snapshot = self._snapshot()
        if not self._history or snapshot is not self._history[-1]:  # a remote answer is reused between polls
            self._history.append(snapshot)
        while len(self._history) > 2 and snapshot.taken_at - self._history[0].taken_at > _HISTORY_S:
            self._history.popleft()
        figures = Figures.of(list(self._history), self._started_at)
        self._figures = figures
        if self._writer is not None and self._status_every is not None \
                and snapshot.taken_at - self._last_status >= self._status_every - 0.05 and not self._stop.is_set():
            self._last_status = snapshot.taken_at
            self._writer.show(figures)
        return figures

    def _snapshot(self) -> MetricsSnapshot:
        result = self._result
        if result is not None:
            now = self._clock()
            if self._last_result_snapshot is None or now - self._last_result_poll >= self._poll_every:
                self._last_result_poll = now
                try:
                    found = read_result(result, clock=self._clock)
                    self._last_result_snapshot = found if not found.is_empty() else None
                except Exception:  # a runner that cannot answer now: use the mirror
                    _LOGGER.debug("monitor: the runner's metrics are not available", exc_info=True)
            if self._last_result_snapshot is not None:
                return self._last_result_snapshot
        assert self._local is not None
        return self._local.snapshot()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
