"""The end-of-run summary of a pipeline, read from its Beam metrics."""

from __future__ import annotations

import dataclasses
from typing import Dict

from apache_beam.metrics.metric import MetricsFilter

from onceflow import metrics


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """Counters of one run (namespace ``onceflow``), and where the output is."""

    runner: str
    seconds: float
    counters: Dict[str, int]
    sink: str
    dlq: str

    def count(self, name: str) -> int:
        return self.counters.get(name, 0)

    @property
    def dead_letters_by_reason(self) -> Dict[str, int]:
        prefix = metrics.DEAD_LETTERS + "."
        return {name[len(prefix):]: value for name, value in sorted(self.counters.items())
                if name.startswith(prefix) and value}

    def render(self) -> str:
        by_reason = self.dead_letters_by_reason
        reasons = ", ".join(f"{reason} {count}" for reason, count in by_reason.items()) or "none"
        read = self.count(metrics.RECORDS_READ)
        rate = f"{read / self.seconds:,.0f} records/s" if self.seconds > 0 else ""
        lines = [
            f"onceflow aggregate: done in {self.seconds:.1f}s on {self.runner} ({rate})",
            f"  records read        {read:>9,}",
            f"  events parsed       {self.count(metrics.EVENTS_PARSED):>9,}",
            f"  duplicates dropped  {self.count(metrics.DUPLICATES_DROPPED):>9,}",
            f"  dead letters        {sum(by_reason.values()):>9,}   by reason: {reasons}",
            f"  rows emitted        {self.count(metrics.ROWS_EMITTED):>9,}",
            f"  rows written        {self.count(metrics.SINK_ROWS_WRITTEN):>9,}   "
            f"(kept newer stored versions: {self.count(metrics.SINK_ROWS_STALE):,})",
            f"  output:       {self.sink}",
            f"  dead letters: {self.dlq}",
        ]
        return "\n".join(lines)


def collect_summary(result, runner: str, seconds: float, sink: str, dlq: str) -> RunSummary:
    """Sums each ``onceflow`` counter over steps (committed values where the runner
    reports them, attempted otherwise)."""
    counters: Dict[str, int] = {}
    query = result.metrics().query(MetricsFilter().with_namespace(metrics.NAMESPACE))
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        name = counter.key.metric.name
        counters[name] = counters.get(name, 0) + int(value or 0)
    return RunSummary(runner, seconds, counters, sink, dlq)
