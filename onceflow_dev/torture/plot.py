"""The torture run's PNG: throughput, consumer lag and the job's memory over time,
with the faults marked. Needs matplotlib (in the ``dev`` extra)."""

from __future__ import annotations

import pathlib
from typing import Optional

from onceflow_dev.torture.faults import BROKER_RESTART, CONNECTION_KILL, KILL, STALL
from onceflow_dev.torture.timeline import Timeline

_FAULT_COLOURS = {KILL: "tab:red", BROKER_RESTART: "tab:purple", STALL: "tab:orange", CONNECTION_KILL: "tab:brown"}


def _per_second(times, counts, span=5):
    """Rates over the last ``span`` samples (counts move in steps: offsets are
    committed and windows written in batches)."""
    rates = []
    for i in range(span, len(times)):
        first, last = counts[i - span], counts[i]
        elapsed = times[i] - times[i - span]
        rates.append(None if first is None or last is None or elapsed <= 0 else max(0.0, (last - first) / elapsed))
    return times[span:], rates


def write_plot(timeline: Timeline, path: pathlib.Path, title: str, re_read_bound: Optional[int] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = list(timeline.samples)
    times = [s.at_s for s in samples]
    figure, (throughput, lag, memory) = plt.subplots(3, 1, sharex=True, figsize=(11, 8))
    for label, counts in (("produced", [s.produced for s in samples]),
                          ("consumed (offsets committed)", [s.consumed for s in samples]),
                          ("counted in the sink", [s.in_sink for s in samples])):
        x, rates = _per_second(times, counts)
        throughput.plot(x, [float("nan") if r is None else r for r in rates], label=label, linewidth=1)
    throughput.set_ylabel("records/s")
    throughput.legend(loc="upper right")
    lag.plot(times, [float("nan") if s.lag is None else s.lag for s in samples], label="consumer lag (records)",
             linewidth=1)
    lag.plot(times, [float("nan") if s.backlog is None else s.backlog for s in samples],
             label="sink backlog (events not yet counted)", linewidth=1)
    kills = [m for m in timeline.faults if m.re_read is not None]
    if kills:
        lag.scatter([m.start_s for m in kills], [m.re_read for m in kills], marker="v", color="tab:red", zorder=3,
                    label="records re-read after a kill (committed minus stored positions)")
        if re_read_bound is not None:
            lag.axhline(re_read_bound, color="tab:red", linewidth=0.8, linestyle=":",
                        label="a window + the lateness + 30 s of stream")
    lag.set_ylabel("records / events")
    lag.legend(loc="upper right")
    memory.plot(times, [s.rss_bytes / 2**20 for s in samples], color="tab:green", linewidth=1)
    memory.set_ylabel("job memory RSS (MiB)")
    memory.set_xlabel("seconds since production began")
    for axes in (throughput, lag, memory):
        for mark in timeline.faults:
            colour = _FAULT_COLOURS.get(mark.kind, "black")
            if mark.end_s is not None and mark.end_s - mark.start_s > 1:
                axes.axvspan(mark.start_s, mark.end_s, color=colour, alpha=0.15)
            axes.axvline(mark.start_s, color=colour, linewidth=1, linestyle="--")
    for mark in timeline.faults:
        throughput.annotate(mark.kind.replace("_", " "), (mark.start_s, 1.0), xycoords=("data", "axes fraction"),
                            rotation=90, fontsize=7, va="top", ha="right",
                            color=_FAULT_COLOURS.get(mark.kind, "black"))
    throughput.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
