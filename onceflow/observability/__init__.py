"""Seeing into a running pipeline: live figures, a health endpoint, consumer lag.

- :mod:`~onceflow.observability.snapshot`: the ``onceflow`` Beam metrics of a run,
  read from the runner while it runs (or from the in-process mirror).
- :mod:`~onceflow.observability.figures`: per-stage counts and rates, lag, DLQ rate
  and watermark age, computed from snapshots (pure).
- :mod:`~onceflow.observability.status`: the live one-line status.
- :mod:`~onceflow.observability.health`: health thresholds, ``/healthz`` and
  ``/metrics`` (Prometheus text) on 127.0.0.1.
- :mod:`~onceflow.observability.monitor`: the background poller ``run()`` uses.
- :mod:`~onceflow.observability.lag` and ``command``: ``onceflow lag`` (the lag
  itself is asked in :mod:`onceflow.io.kafka.admin`).
"""
