"""Test doubles for the observability tests."""

from onceflow.observability.figures import Figures
from onceflow.observability.snapshot import ATTEMPTED, MetricsSnapshot

STARTED_AT = 1_800_000_000.0  # epoch seconds; every fake snapshot is relative to it


class FakeMetricsSource:
    """Hands out snapshots the test writes: ``set(at, counters, gauges)`` adds one
    taken ``at`` seconds after STARTED_AT; ``figures()`` computes from all of them."""

    def __init__(self):
        self.history = []

    def set(self, at, counters, gauges=None):
        self.history.append(MetricsSnapshot(STARTED_AT + at, dict(counters), dict(gauges or {}), ATTEMPTED))

    def figures(self):
        return Figures.of(self.history, STARTED_AT) if self.history else None


def lag_gauges(at, **partition_lags):
    """``consumer_lag.orders.<p>`` gauges set ``at`` seconds after STARTED_AT, from p0=..., p1=..."""
    return {f"consumer_lag.orders.{name[1:]}": (lag, STARTED_AT + at) for name, lag in partition_lags.items()}
