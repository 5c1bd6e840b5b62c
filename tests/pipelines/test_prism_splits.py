"""The guard that turns Prism's bundle splits off: Prism 2.77 lets two bundles
update one key's state at once after it splits a slow bundle, and updates are lost.

``keep_prism_from_splitting`` adds the experiment on Prism only, keeps the other
experiments given, and the main job's options carry it; a stateful count on
Prism with the guard, where a few slow elements make Prism split bundles, is
exact.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import List, Tuple

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.options.pipeline_options import DebugOptions, PipelineOptions, StandardOptions
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from onceflow.pipelines import aggregate
from onceflow.runners import PRISM_NO_SPLITS_EXPERIMENT, keep_prism_from_splitting

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


@pytest.mark.prism
@pytest.mark.slow
def test_with_the_guard_a_stateful_count_on_prism_is_exact(prism_path, tmp_path):
    options = _prism_options(prism_path)
    keep_prism_from_splitting(options)
    assert _counts(options, tmp_path / "counts.jsonl") == [("k", ELEMENTS)]


def _experiments(options: PipelineOptions) -> List[str]:
    return list(options.view_as(DebugOptions).experiments or [])


@pytest.mark.parametrize("runner", ["PrismRunner", "prism", "prismrunner"])
def test_the_guard_turns_splits_off_on_prism(runner):
    options = PipelineOptions([f"--runner={runner}"])
    keep_prism_from_splitting(options)
    assert _experiments(options) == [PRISM_NO_SPLITS_EXPERIMENT] == ["prism_disable_sdf_split"]


@pytest.mark.parametrize("flags", [[], ["--runner=DirectRunner"], ["--runner=PortableRunner"],
                                   ["--runner=DataflowRunner"], ["--runner=FlinkRunner"]])
def test_the_guard_leaves_other_runners_alone(flags):
    options = PipelineOptions([*flags, "--experiments=keep_me"])
    keep_prism_from_splitting(options)
    assert _experiments(options) == ["keep_me"]


def test_the_guard_keeps_the_experiments_given_and_adds_its_own_once():
    options = PipelineOptions(["--runner=PrismRunner", "--experiments=first", "--experiments=second=2"])
    keep_prism_from_splitting(options)
    keep_prism_from_splitting(options)
    assert _experiments(options) == ["first", "second=2", PRISM_NO_SPLITS_EXPERIMENT]
    given = PipelineOptions(["--runner=PrismRunner", f"--experiments={PRISM_NO_SPLITS_EXPERIMENT}", "--experiments=x"])
    keep_prism_from_splitting(given)
    assert _experiments(given) == [PRISM_NO_SPLITS_EXPERIMENT, "x"]


class _Built(Exception):
    """Raised in place of building the job: the options are all the test needs."""


@pytest.mark.parametrize("runner, guarded", [("PrismRunner", True), ("DirectRunner", False)])
def test_the_main_jobs_options_carry_the_guard_on_prism(monkeypatch, tmp_path, runner, guarded):
    seen = []

    def capture(pipeline, job):
        seen.append(pipeline.options)
        raise _Built()

    monkeypatch.setattr(aggregate, "build", capture)
    with pytest.raises(_Built):
        aggregate.run([f"--runner={runner}", f"--prism_location={tmp_path / 'no-prism'}", "--experiments=mine",
                       f"--sink=sqlite:///{tmp_path / 'out.db'}", f"--dlq={tmp_path / 'dlq.jsonl'}"])
    (options,) = seen
    assert options.view_as(StandardOptions).runner == runner
    experiments = _experiments(options)  # Beam may add its own (beam_fn_api on a portable runner)
    assert "mine" in experiments
    assert (PRISM_NO_SPLITS_EXPERIMENT in experiments) == guarded
