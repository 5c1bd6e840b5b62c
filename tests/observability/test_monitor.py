"""The monitor's in-process figures, and the status writer."""

import io

import apache_beam as beam
import pytest
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.core import RestrictionProvider

from onceflow import metrics
from onceflow.errors import UsageError
from onceflow.observability.monitor import Monitor
from onceflow.observability.status import StatusWriter
from onceflow.options import MonitoringOptions, parse_pipeline_args
from onceflow.pipelines.summary import RunSummary, collect_summary
from tests.observability.fakes import FakeMetricsSource


def test_without_a_result_the_monitor_counts_what_runs_in_this_process():
    """What the DirectRunner's FnApiRunner gives while pipeline.run() blocks: the
    process-local mirror, counted from when the monitor started."""
    metrics.counter(metrics.RECORDS_READ).inc(5)  # before the monitor: not this run's
    with Monitor(PipelineOptions(["--status=off"]), "DirectRunner", stream=io.StringIO()) as monitor:
        metrics.counter(metrics.RECORDS_READ).inc(7)
        metrics.dead_letter_counter("malformed_json").inc()
        metrics.consumer_lag_gauge("orders.eu", 2).set(40)
        figures = monitor.tick()
    assert figures.values == "local"
    assert figures.records_read == 7
    assert figures.dead_letters_by_reason == {"malformed_json": 1}
    assert figures.consumer_lag == {("orders.eu", 2): 40}
    assert monitor.figures() is figures


class _SaysNothing:
    """What Beam's Flink job server answers for a live job it cancelled: no metrics."""

    def metrics(self):
        return self

    def query(self, _filter=None):
        return {"counters": [], "gauges": [], "distributions": []}


def test_a_runner_that_says_nothing_at_the_end_gets_the_figures_counted_in_this_process():
    """A live Flink job stopped with Ctrl-C summed up as 'records read 0' although
    its LOOPBACK worker, in this process, had read every record."""
    result = _SaysNothing()
    with Monitor(PipelineOptions(["--status=off"]), "PortableRunner", stream=io.StringIO()) as monitor:
        monitor.watch(result)
        metrics.counter(metrics.RECORDS_READ).inc(9)
        metrics.consumer_lag_gauge("orders", 0).set(4)
        summary = monitor.finish(collect_summary(result, "PortableRunner", 2.0, "sink", "dlq"))
    assert summary.count(metrics.RECORDS_READ) == 9 and summary.values == "local"
    assert summary.consumer_lag() == {"orders": {"0": 4}}
    assert "note: the runner gave no figures once the job stopped" in summary.render()


class _Countdown(RestrictionProvider):
    def initial_restriction(self, element):
        return OffsetRange(0, element)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element, restriction):
        return restriction.size()


class _LagPerBundle(beam.DoFn):
    """Claims one position per bundle and sets the lag to the positions left, as
    the Kafka reader sets it at the end of each bundle."""

    def process(self, element, tracker=beam.DoFn.RestrictionParam(_Countdown())):
        position = tracker.current_restriction().start
        if tracker.try_claim(position):
            metrics.consumer_lag_gauge("orders", 0).set(element - position - 1)
            tracker.defer_remainder()
        yield from ()


def test_the_summary_keeps_each_gauges_last_value_over_the_runners_first():
    """A Kafka backfill on the DirectRunner summed up with the consumer lag of its
    first bundle (949,933 of 1,009,933 records, all of them read): Beam's
    FnApiRunner reports the value a step set in its first bundle."""
    options = PipelineOptions(["--status=off"])
    pipeline = beam.Pipeline(runner="FnApiRunner", options=options)
    _ = pipeline | beam.Create([4]) | beam.ParDo(_LagPerBundle())
    with Monitor(options, "DirectRunner", stream=io.StringIO()) as monitor:
        result = pipeline.run()
        result.wait_until_finish()
        assert collect_summary(result, "DirectRunner", 1.0, "sink", "dlq").consumer_lag() == {"orders": {"0": 3}}
        summary = monitor.finish(collect_summary(result, "DirectRunner", 1.0, "sink", "dlq", mirror=monitor.mirror()))
    assert summary.consumer_lag() == {"orders": {"0": 0}}


def test_the_runners_final_figures_are_kept():
    with Monitor(PipelineOptions(["--status=off"]), "PortableRunner", stream=io.StringIO()) as monitor:
        metrics.counter(metrics.RECORDS_READ).inc(9)
        final = RunSummary("PortableRunner", 2.0, {metrics.RECORDS_READ: 7}, "sink", "dlq")
        assert monitor.finish(final) is final
    assert "note" not in final.render()


def test_no_figures_from_workers_in_other_processes_are_said_to_be_missing(tmp_path):
    """With --loopback_worker_processes on Flink, a cancelled job's summary read
    "0 records/s, records read 0" as if nothing had been read (30,000 were), and
    --metrics_out said the zeros were committed."""
    import json

    out = tmp_path / "metrics.json"
    options = PipelineOptions(["--status=off", f"--metrics_out={out}"])
    with Monitor(options, "PortableRunner", stream=io.StringIO()) as monitor:
        summary = monitor.finish(RunSummary("PortableRunner", 2.0, {}, "sink", "dlq"), counted_elsewhere=True)
    assert summary.values == "none"
    assert "the zeros above are not the job's" in summary.render()
    assert json.loads(out.read_text())["values"] == "none"
    with Monitor(PipelineOptions(["--status=off"]), "DirectRunner", stream=io.StringIO()) as monitor:
        empty = monitor.finish(RunSummary("DirectRunner", 2.0, {}, "sink", "dlq"))  # an empty input: true zeros
    assert empty.values == "committed" and "note" not in empty.render()


def test_the_monitor_reads_health_thresholds_from_the_flags():
    monitor = Monitor(PipelineOptions(["--health_max_lag=60", "--health_max_dlq_rate=2%",
                                       "--health_max_watermark_age=90s"]), "PrismRunner", stream=io.StringIO())
    assert (monitor.thresholds.max_lag, monitor.thresholds.max_dlq_rate,
            monitor.thresholds.max_watermark_age_s) == (60, 0.02, 90.0)


def test_status_writer_rewrites_one_line_on_a_terminal_and_prints_lines_otherwise():
    source = FakeMetricsSource()
    source.set(3, {"records_read": 30, "events_parsed": 30})
    figures = source.figures()
    terminal = io.StringIO()
    live = StatusWriter(terminal, live=True)
    live.show(figures)
    live.show(figures)
    live.clear()
    line = "3s | parse 10/s | aggregate 0/s | sink 0 rows/s | DLQ 0 (0.0%)"
    assert terminal.getvalue() == f"\r{line}\x1b[K" * 2 + "\r\x1b[K"
    log = io.StringIO()
    plain = StatusWriter(log, live=False)
    plain.show(figures)
    plain.clear()
    assert log.getvalue() == f"onceflow status: {line}\n"


def test_monitoring_flags_survive_the_round_trip_beam_makes_for_workers():
    options = parse_pipeline_args(["--health_port=9000", "--health_max_dlq_rate=1%", "--health_max_watermark_age=2m"])
    again = PipelineOptions.from_dictionary(options.get_all_options(drop_default=False)).view_as(MonitoringOptions)
    assert (again.health_port, again.health_max_dlq_rate, again.health_max_watermark_age) == (9000, 0.01, 120.0)


def test_wrong_monitoring_flags_are_one_line_usage_errors():
    for flag, message in (("--health_port=http", "is not a port"), ("--health_max_dlq_rate=2", "fraction"),
                          ("--health_max_watermark_age=soon", "is not a duration"), ("--status=loud", "invalid choice")):
        with pytest.raises(UsageError, match=message):
            parse_pipeline_args([flag])
