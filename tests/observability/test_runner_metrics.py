"""What a runner reports while a pipeline runs: on Prism, attempted values of the
bundle in progress (asked afresh of the job service), committed ones at the end."""

import io
import os
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from onceflow import metrics
from onceflow.observability.monitor import Monitor
from onceflow.observability.snapshot import read_result

PROBE = "test_probe_in_flight"


class _CountThenWait(beam.DoFn):
    """Counts 7 and sets a lag gauge, then holds its bundle open until the flag file exists."""

    def __init__(self, flag: str):
        self._flag = flag
        self._counter = metrics.counter(PROBE)

    def process(self, element):
        self._counter.inc(7)
        metrics.consumer_lag_gauge("probe", 0).set(42)
        deadline = time.monotonic() + 300  # never hang a test run for good
        while not os.path.exists(self._flag) and time.monotonic() < deadline:
            time.sleep(0.1)
        yield element


def wait_for(condition, what, deadline_s):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.prism
@pytest.mark.slow
def test_prism_reports_metrics_of_a_bundle_in_progress_and_committed_ones_at_the_end(prism_path, tmp_path):
    flag = tmp_path / "release"
    # Its own job server: Beam shares one per process, and an earlier DirectRunner
    # streaming test may have made it without --prism_location.
    options = PipelineOptions(["--runner=PrismRunner", f"--prism_location={prism_path}", "--status=off",
                               "--experiments=disable_prism_server_singleton"])
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | beam.Create(["x"]) | beam.ParDo(_CountThenWait(str(flag)))
    with Monitor(options, "PrismRunner", stream=io.StringIO()) as monitor:
        result = pipeline.run()
        monitor.watch(result)
        try:
            def in_flight():
                found = read_result(result)
                return found if found.count(PROBE) == 7 and found.gauge("consumer_lag.probe.0") == 42 else None

            live = wait_for(in_flight, "the in-flight count and gauge", 180)
            assert result.state == PipelineState.RUNNING  # the bundle is still held open
            assert live.values == "attempted"
            figures = monitor.tick()
            assert figures.values == "attempted"  # from the runner, not the in-process mirror
            assert figures.counters[PROBE] == 7 and figures.total_lag == 42
        finally:
            flag.touch()
        assert result.wait_until_finish() == PipelineState.DONE
    final = read_result(result, prefer_committed=True)
    assert final.values == "committed" and final.count(PROBE) == 7
