"""Health: thresholds (pure, with a fake metrics source) and the real HTTP server."""

import io
import json
import urllib.error
import urllib.request

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from onceflow.errors import UsageError
from onceflow.observability.health import HealthServer, HealthThresholds, evaluate_health
from onceflow.observability.monitor import Monitor
from tests.observability.fakes import STARTED_AT, FakeMetricsSource, lag_gauges

THRESHOLDS = HealthThresholds(max_lag=100, max_dlq_rate=0.05, max_watermark_age_s=600)


def test_healthy_below_every_threshold_and_the_body_has_the_figures():
    source = FakeMetricsSource()
    source.set(10, {"records_read": 1000, "dead_letters.malformed_json": 10},
               {**lag_gauges(10, p0=40, p1=20), "watermark_ms": (int((STARTED_AT - 50) * 1000), STARTED_AT + 10)})
    report = evaluate_health(source.figures(), THRESHOLDS)
    assert report.healthy and report.http_status == 200
    assert report.body["status"] == "ok"
    assert report.body["checks"] == {
        "consumer_lag": {"value": 60, "max": 100, "ok": True},
        "dlq_rate": {"value": 0.01, "max": 0.05, "ok": True},
        "watermark_age_s": {"value": 60.0, "max": 600, "ok": True},
        "sink_lag_s": {"value": None, "max": None, "ok": True},
        "retention_gap_records": {"value": 0, "max": 0, "ok": True},
    }
    assert report.body["figures"]["consumer_lag"] == [
        {"topic": "orders", "partition": 0, "lag": 40}, {"topic": "orders", "partition": 1, "lag": 20}]


def test_unhealthy_when_the_sink_falls_behind_although_the_consumer_lag_is_zero():
    source = FakeMetricsSource()
    thresholds = HealthThresholds(max_lag=100, max_sink_lag_s=300)
    source.set(1, {"records_read": 10}, lag_gauges(1, p0=0))
    assert evaluate_health(source.figures(), thresholds).body["checks"]["sink_lag_s"]["value"] is None
    source.set(2, {"records_read": 20}, {**lag_gauges(2, p0=0),
                                         "sink_window_end_ms": (int((STARTED_AT - 240) * 1000), STARTED_AT + 2)})
    assert evaluate_health(source.figures(), thresholds).healthy  # 242 s behind
    source.set(100, {"records_read": 30}, {**lag_gauges(100, p0=0),
                                           "sink_window_end_ms": (int((STARTED_AT - 240) * 1000), STARTED_AT + 2)})
    report = evaluate_health(source.figures(), thresholds)
    assert not report.healthy and report.http_status == 503
    assert report.body["checks"]["sink_lag_s"] == {"value": 340.0, "max": 300, "ok": False}
    assert report.body["checks"]["consumer_lag"]["ok"]


def test_unhealthy_when_lag_passes_the_threshold_and_healthy_again_when_it_falls():
    source = FakeMetricsSource()
    source.set(1, {"records_read": 10}, lag_gauges(1, p0=100))
    assert evaluate_health(source.figures(), THRESHOLDS).healthy  # at the threshold: still healthy
    source.set(2, {"records_read": 20}, lag_gauges(2, p0=60, p1=41))
    report = evaluate_health(source.figures(), THRESHOLDS)
    assert not report.healthy and report.http_status == 503
    assert report.body["status"] == "unhealthy"
    assert report.body["checks"]["consumer_lag"] == {"value": 101, "max": 100, "ok": False}
    source.set(3, {"records_read": 30}, lag_gauges(3, p0=0, p1=5))
    assert evaluate_health(source.figures(), THRESHOLDS).healthy


@pytest.mark.parametrize("counters, gauges, failing", [
    ({"records_read": 100, "dead_letters.schema_violation": 6}, {}, "dlq_rate"),
    ({"records_read": 100}, {"watermark_ms": (int((STARTED_AT - 700) * 1000), STARTED_AT)}, "watermark_age_s"),
])
def test_unhealthy_on_dlq_rate_or_watermark_age(counters, gauges, failing):
    source = FakeMetricsSource()
    source.set(5, counters, gauges)
    report = evaluate_health(source.figures(), THRESHOLDS)
    assert not report.healthy
    assert [name for name, check in report.body["checks"].items() if not check["ok"]] == [failing]


def test_unchecked_figures_and_no_figures_yet_are_healthy():
    source = FakeMetricsSource()
    source.set(1, {"records_read": 10, "dead_letters.bad_timestamp": 10}, lag_gauges(1, p0=10**9))
    assert evaluate_health(source.figures(), HealthThresholds()).healthy
    starting = evaluate_health(None, THRESHOLDS)
    assert starting.healthy and starting.body["status"] == "starting"


def test_unhealthy_when_the_figures_are_older_than_the_limit():
    """A runner that stopped answering froze the figures at their last values,
    and every check kept passing however far the job fell behind."""
    source = FakeMetricsSource()
    source.set(10, {"records_read": 10}, lag_gauges(10, p0=0))
    figures = source.figures()
    thresholds = HealthThresholds(max_lag=100, max_figures_age_s=60)
    assert evaluate_health(figures, thresholds, now=figures.taken_at + 60).healthy
    report = evaluate_health(figures, thresholds, now=figures.taken_at + 61)
    assert not report.healthy
    assert report.body["checks"]["figures_age_s"] == {"value": 61.0, "max": 60, "ok": False}
    assert "figures_age_s" not in evaluate_health(figures, THRESHOLDS).body["checks"]  # unchecked without a limit


def test_unhealthy_when_a_live_readers_lag_is_older_than_the_limit():
    """A reader the runner no longer ran (after Prism hung for a minute) froze its
    lag at 0 while records kept coming: the status line and /healthz said "lag 0"
    while `onceflow lag` said 8,000. The partition reported least recently counts."""
    thresholds = HealthThresholds(max_lag=100, max_lag_age_s=60)
    source = FakeMetricsSource()
    source.set(70, {"records_read": 10}, {**lag_gauges(69, p0=0), **lag_gauges(10, p1=0)})
    report = evaluate_health(source.figures(), thresholds, now=STARTED_AT + 70)
    assert report.healthy and report.body["checks"]["consumer_lag_age_s"] == {"value": 60.0, "max": 60, "ok": True}
    source.set(71, {"records_read": 10}, {**lag_gauges(71, p0=0), **lag_gauges(10, p1=0)})
    report = evaluate_health(source.figures(), thresholds, now=STARTED_AT + 71)
    assert not report.healthy
    assert report.body["checks"]["consumer_lag_age_s"] == {"value": 61.0, "max": 60, "ok": False}
    assert report.body["figures"]["consumer_lag_age_s"] == 61.0
    assert "consumer_lag_age_s" not in evaluate_health(source.figures(), THRESHOLDS).body["checks"]  # bounded reads
    untimed = FakeMetricsSource()  # a runner that gives its gauges no time: nothing to judge
    untimed.set(100, {"records_read": 10}, {"consumer_lag.orders.0": (0, 0.0)})
    assert evaluate_health(untimed.figures(), thresholds).body["checks"]["consumer_lag_age_s"]["value"] is None


def test_only_a_live_jobs_monitor_checks_the_lags_age():
    live = Monitor(PipelineOptions([]), "PrismRunner", stream=io.StringIO(), live=True)
    assert live.thresholds.max_lag_age_s == live.thresholds.max_figures_age_s == 60
    assert Monitor(PipelineOptions([]), "PrismRunner", stream=io.StringIO()).thresholds.max_lag_age_s is None


def test_the_runners_metrics_are_asked_for_with_a_timeout():
    from onceflow.observability.snapshot import METRICS_TIMEOUT_S, fresh_metrics

    class Service:
        def GetJobMetrics(self, request, timeout=None):  # noqa: N802 (the job service's name)
            self.asked = (request.job_id, timeout)
            raise TimeoutError("the runner did not answer")

    class Result:
        _job_service, _job_id = Service(), "job-1"

    with pytest.raises(TimeoutError):
        fresh_metrics(Result())
    assert Result._job_service.asked == ("job-1", METRICS_TIMEOUT_S)


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_the_server_answers_healthz_and_metrics_on_loopback():
    source = FakeMetricsSource()
    source.set(10, {"records_read": 1000, "events_parsed": 990, "dead_letters.malformed_json": 10,
                    "sink_rows_written": 7}, lag_gauges(10, p0=30, p1=20))
    server = HealthServer(source.figures, THRESHOLDS, port=0)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        status, content_type, body = get(server.url + "/healthz")
        assert (status, content_type) == (200, "application/json")
        health = json.loads(body)
        assert health["checks"]["consumer_lag"]["value"] == 50
        assert health["figures"]["stages"]["parse"]["in"] == 1000

        status, content_type, text = get(server.url + "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        lines = set(text.splitlines())
        assert {
            "onceflow_records_read_total 1000.0",
            "onceflow_events_parsed_total 990.0",
            'onceflow_dead_letters_total{reason="malformed_json"} 10.0',
            'onceflow_consumer_lag{partition="0",topic="orders"} 30.0',
            "onceflow_consumer_lag_total 50.0",
            "onceflow_healthy 1.0",
        } <= lines

        source.set(11, {"records_read": 1001}, lag_gauges(11, p0=300, p1=20))
        status, _, body = get(server.url + "/healthz")
        assert status == 503 and json.loads(body)["checks"]["consumer_lag"] == {"value": 320, "max": 100, "ok": False}
        assert "onceflow_healthy 0.0" in get(server.url + "/metrics")[2].splitlines()
        assert get(server.url + "/nothing")[0] == 404
    finally:
        server.close()


def test_a_port_in_use_is_a_one_line_flag_error():
    taken = HealthServer(lambda: None, THRESHOLDS, port=0)
    try:
        with pytest.raises(UsageError, match=f"--health_port: cannot listen on 127.0.0.1:{taken.port}"):
            with Monitor(PipelineOptions([f"--health_port={taken.port}", "--status=off"]), "DirectRunner"):
                pass
    finally:
        taken.close()
