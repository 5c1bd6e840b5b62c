"""How ``onceflow lag`` shows a consumer group's lag: a table, JSON, an exit status.

The lag itself is asked of the broker by
:func:`onceflow.io.kafka.admin.consumer_group_lag`: per partition, committed
offset, log start and end offsets and the records in between. A partition the
group has no committed offset for counts from the log start offset
(``lag = end - start``): a reader that resumes from committed offsets starts such
a partition at ``earliest`` by default, so all of it is still to read. A
committed offset below the log start (records removed by retention) also counts
from the log start.
"""

from __future__ import annotations

from typing import Dict, Optional

from onceflow.io.kafka.admin import GroupLag

EXIT_OK = 0
EXIT_OVER_MAX_LAG = 1
EXIT_UNREACHABLE = 3  # the broker cannot be reached, or it refused a request
EXIT_UNKNOWN = 4  # no such consumer group or topic


def to_json(lag: GroupLag, max_lag: Optional[int] = None) -> Dict:
    """The lag as one JSON object, with the verdict against ``max_lag``."""
    return {
        "bootstrap_servers": lag.bootstrap_servers,
        "group": lag.group,
        "partitions": [
            {"topic": p.topic, "partition": p.partition, "committed": p.committed, "start": p.start,
             "end": p.end, "lag": p.lag} for p in lag.partitions
        ],
        "total_lag": lag.total,
        "missing_topics": list(lag.missing_topics),
        "max_lag": max_lag,
        "over_max_lag": None if max_lag is None else lag.total > max_lag,
    }


def render(lag: GroupLag, max_lag: Optional[int] = None) -> str:
    """A table per partition and the total."""
    header = ("TOPIC", "PARTITION", "COMMITTED", "START", "END", "LAG")
    rows = [(p.topic, str(p.partition), "-" if p.committed is None else str(p.committed), str(p.start),
             str(p.end), str(p.lag)) for p in lag.partitions]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"consumer group {lag.group} on {lag.bootstrap_servers}"]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    if any(p.committed is None for p in lag.partitions):
        lines.append("(-: no committed offset; its lag counts from the log start: END - START)")
    for topic in lag.missing_topics:
        lines.append(f"(topic {topic} has committed offsets but no longer exists; not counted)")
    verdict = ""
    if max_lag is not None:
        verdict = f" (above --max-lag {max_lag:,})" if lag.total > max_lag else f" (within --max-lag {max_lag:,})"
    lines.append(f"total lag: {lag.total}{verdict}")
    return "\n".join(lines)


def exit_status(lag: GroupLag, max_lag: Optional[int]) -> int:
    return EXIT_OVER_MAX_LAG if max_lag is not None and lag.total > max_lag else EXIT_OK
