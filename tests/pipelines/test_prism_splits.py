"""Why the jobs turn Prism's bundle splits off: Prism 2.77 lets two bundles update
one key's state at once after it splits a slow bundle, and updates are lost.

The same stateful count runs twice on Prism, once with the options the aggregate
job uses (``keep_prism_from_splitting``) and once without; a few slow elements
make Prism split bundles. The first is exact; the second shows the runner bug the
guard exists for (when it starts passing, Prism fixed it and the guard can go).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import List, Tuple

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from onceflow.pipelines.aggregate import keep_prism_from_splitting

pytestmark = [pytest.mark.prism, pytest.mark.slow]

ELEMENTS = 400
EMIT_AT = Timestamp(seconds=10**9)  # after every element, before the global window's end


class _CountPerKey(beam.DoFn):
    """Counts a key's elements in state and emits the count once, from a timer.
    Every 100th element is slow (1.5 s), so Prism sees no progress and splits."""

    COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())
    EMIT = TimerSpec("emit", TimeDomain.WATERMARK)

    def process(self, element, count=beam.DoFn.StateParam(COUNT), emit=beam.DoFn.TimerParam(EMIT)):
        _, value = element
        if value % 100 == 50:
            time.sleep(1.5)
        count.write((count.read() or 0) + 1)
        emit.set(EMIT_AT)

    @on_timer(EMIT)
    def emit_count(self, key=beam.DoFn.KeyParam, count=beam.DoFn.StateParam(COUNT)):
        yield key, count.read()


def _append_line(element, path: str) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(element) + "\n")


def _counts(options: PipelineOptions, out: pathlib.Path) -> List[Tuple[str, int]]:
    """Every count the timer emitted (one per key if the state was exact)."""
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | beam.Create([("k", i) for i in range(ELEMENTS)])
             | beam.Reshuffle()
             | beam.ParDo(_CountPerKey())
             | beam.Map(_append_line, str(out)))
    return [tuple(json.loads(line)) for line in out.read_text(encoding="utf-8").splitlines()]


def _prism_options(prism_path: str) -> PipelineOptions:
    # Not the process-wide Prism server: a DirectRunner test earlier in the same
    # session may have created that singleton without --prism_location.
    return PipelineOptions(["--runner=PrismRunner", f"--prism_location={prism_path}",
                            "--experiments=disable_prism_server_singleton"])


def test_with_the_guard_a_stateful_count_on_prism_is_exact(prism_path, tmp_path):
    options = _prism_options(prism_path)
    keep_prism_from_splitting(options)
    assert _counts(options, tmp_path / "counts.jsonl") == [("k", ELEMENTS)]


def test_without_the_guard_prism_loses_state_updates(prism_path, tmp_path):
    counts = _counts(_prism_options(prism_path), tmp_path / "counts.jsonl")
    assert counts != [("k", ELEMENTS)], "Prism no longer splits stateful bundles unsafely: the guard can go"
    assert sum(count for _, count in counts) <= ELEMENTS
