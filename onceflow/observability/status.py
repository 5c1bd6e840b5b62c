"""The live one-line status of a local run (pure formatting, and its writer)."""

from __future__ import annotations

import shutil
from typing import Optional, TextIO

from onceflow.observability.figures import Figures

# Stages shown on the line, in pipeline order (dedup and the DLQ writer are
# summed up by the DLQ figure and the final summary).
_SHOWN = ("read", "parse", "aggregate", "sink")
STALE_LAG_S = 30.0  # a running reader reports its lag every few seconds


def format_duration(seconds: Optional[float]) -> str:
    """``7s``, ``3m05s``, ``2h03m``, ``4d02h``; ``-`` for None; negatives are 0s."""
    if seconds is None:
        return "-"
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def format_rate(per_s: float) -> str:
    """``0``, ``0.4``, ``12``, ``4,243``: one decimal below 10 per second."""
    if per_s <= 0:
        return "0"
    if per_s < 10:
        return f"{per_s:.1f}"
    return f"{per_s:,.0f}"


def format_progress(records_read: int, expected: int, elapsed_s: float) -> str:
    """``1,200 of 10,000 (12%), 1m12s left`` for a bounded read of known size."""
    share = min(1.0, records_read / expected) if expected else 1.0
    text = f"{records_read:,} of {expected:,} ({share:.0%})"
    if 0 < records_read < expected and elapsed_s > 0:
        text += f", {format_duration((expected - records_read) / (records_read / elapsed_s))} left"
    return text


def format_status(figures: Figures, width: Optional[int] = None, expected_records: Optional[int] = None) -> str:
    """One line: elapsed time, events/s per stage, consumer lag, event-time lag
    and the DLQ, e.g.

    ``12s | read 1,203/s | parse 1,200/s | aggregate 1,190/s | sink 35 rows/s | lag 1,234 | sink behind 3m05s | event-time lag 42s | DLQ 3 (0.2%)``

    Lag and event-time lag appear only when a Kafka reader reports them. ``sink
    behind`` (now minus the newest window end written) appears once the sink has
    written a row: next to the consumer lag because a runner may hold a backlog
    the consumer lag cannot see (offsets are committed once the runner holds the
    records, not once they are aggregated and written). A lag its reader last
    reported over ``STALE_LAG_S`` ago says how long ago: the runner has not run
    the reader since, and records may have come. The DLQ
    percentage is of the records read over the last minute. ``width`` cuts the line
    to fit a terminal.
    """
    parts = [format_duration(figures.elapsed_s)]
    if expected_records is not None:
        parts.append(format_progress(figures.records_read, expected_records, figures.elapsed_s))
    for name in _SHOWN:
        stage = figures.stage(name)
        if stage is None:
            continue
        suffix = " rows/s" if stage.unit == "rows" else "/s"
        parts.append(f"{name} {format_rate(stage.in_per_s)}{suffix}")
    if figures.total_lag is not None:
        lag_age = figures.lag_age_s
        stale = f" (reported {format_duration(lag_age)} ago)" if lag_age is not None and lag_age > STALE_LAG_S else ""
        parts.append(f"lag {figures.total_lag:,}{stale}")
    if figures.sink_lag_s is not None:
        parts.append(f"sink behind {format_duration(figures.sink_lag_s)}")
    if figures.watermark_age_s is not None:
        parts.append(f"event-time lag {format_duration(figures.watermark_age_s)}")
    dlq = f"DLQ {figures.dead_letters:,}"
    if figures.dlq_rate is not None:
        dlq += f" ({figures.dlq_rate:.1%})"
    parts.append(dlq)
    line = " | ".join(parts)
    if width is not None and width > 4 and len(line) > width:
        line = line[: width - 3] + "..."
    return line


class StatusWriter:
    """Writes status lines to ``stream``: rewritten in place on a terminal,
    one line each otherwise."""

    def __init__(self, stream: TextIO, live: bool, expected_records: Optional[int] = None):
        self._stream = stream
        self._live = live
        self._shown = False
        self._expected = expected_records

    def show(self, figures: Figures) -> None:
        if self._live:
            width = shutil.get_terminal_size((120, 24)).columns - 1
            self._stream.write("\r" + format_status(figures, width, self._expected) + "\x1b[K")
            self._shown = True
        else:
            self._stream.write("onceflow status: " + format_status(figures, None, self._expected) + "\n")
        self._stream.flush()

    def clear(self) -> None:
        """Removes the live line so the final summary starts on a clean line."""
        if self._live and self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False
