"""``/healthz`` and ``/metrics`` of a live job on Prism, against the real broker:
while it runs, while the broker is down, and after the broker is back."""

import json
import os
import signal
import time

import pytest

from onceflow_dev.devstack import kafka
from tests.io.test_kafka_ranges import free_port, http_get
from tests.livejob import (
    child_processes, counted_events, job_output, new_topic, produce, start_live_job, stop, wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.prism, pytest.mark.slow, pytest.mark.exclusive]  # it stops the broker


def _event(n, t):
    return json.dumps({"id": str(n), "t": t, "k": f"k{n % 3}", "v": 1}).encode()


def _failing(url, check):
    """Whether /healthz answers 503 with ``check`` failing."""
    status, body = http_get(url + "/healthz")
    return status == 503 and not json.loads(body)["checks"][check]["ok"]


def _cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read()


def _metric(exposition, name):
    """The value of an unlabelled sample in Prometheus text, or None."""
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_health_endpoints_of_a_live_job_follow_the_job_and_a_broker_stop(kafka_bootstrap, prism_path, tmp_path):
    topic = new_topic(kafka_bootstrap)
    group = f"g-{topic.topic}"
    db = tmp_path / "live.db"
    base = (int(time.time()) - 600) * 1000 // 60_000 * 60_000  # ten minutes ago, on a minute
    produce(topic, [(n % 3, _event(n, base + 1000 * n), None) for n in range(300)])  # minutes 0-4
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    job = start_live_job(topic, group, f"sqlite:///{db}", tmp_path / "dlq.jsonl", "--key_fields=k",
                         "--time_field=t", "--id_field=id", "--aggregate=count", "--window=1m",
                         "--allowed_lateness=1m", "--kafka_idle_timeout=2s", "--health_max_watermark_age=20s",
                         f"--health_port={port}", "--status=off")
    try:
        def answers():
            try:
                return http_get(url + "/healthz")[0] in (200, 503)
            except OSError:
                return False

        wait_for(answers, "the health endpoint to answer", 120, job)
        wait_for(lambda: counted_events(db) == 300, "the 300 events in the sink", 180, job)

        def figures_caught_up():
            status, body = http_get(url + "/healthz")
            figures = json.loads(body).get("figures", {})
            return (status == 200 and figures.get("records_read") == 300 and figures.get("consumer_lag_total") == 0
                    and figures.get("sink_window_end_ms") == base + 5 * 60_000)

        wait_for(figures_caught_up, "/healthz to show the job caught up", 60, job)
        status, body = http_get(url + "/healthz")
        report = json.loads(body)
        assert status == 200 and report["status"] == "ok"
        assert {name: check["ok"] for name, check in report["checks"].items()} == {
            "consumer_lag": True, "dlq_rate": True, "watermark_age_s": True, "sink_lag_s": True,
            "retention_gap_records": True, "figures_age_s": True, "consumer_lag_age_s": True}
        assert report["checks"]["figures_age_s"]["value"] < 10
        assert report["checks"]["consumer_lag_age_s"]["value"] < 10  # the reader reports every few seconds
        # The sink holds windows up to base + 5m: about 5 minutes behind now.
        assert 240 < report["checks"]["sink_lag_s"]["value"] < 600
        assert report["checks"]["watermark_age_s"]["value"] < 20  # idle partitions follow the wall clock
        assert [lag["lag"] for lag in report["figures"]["consumer_lag"]] == [0, 0, 0]
        _, exposition = http_get(url + "/metrics")
        assert _metric(exposition, "onceflow_kafka_records_read_total") == 300
        assert _metric(exposition, "onceflow_consumer_lag_total") == 0
        assert _metric(exposition, "onceflow_sink_window_end_ms") == base + 5 * 60_000
        assert 240 < _metric(exposition, "onceflow_sink_lag_seconds") < 600
        assert _metric(exposition, "onceflow_healthy") == 1

        assert kafka.down(), "the dev broker was not started by the project's helpers"
        try:
            # No broker: no end offsets, so idle partitions no longer advance the
            # watermark; once it is older than 20 s the job reports unhealthy.
            wait_for(lambda: _failing(url, "watermark_age_s"), "/healthz to turn unhealthy with the broker down", 90,
                     job)
            _, exposition = http_get(url + "/metrics")
            assert _metric(exposition, "onceflow_healthy") == 0
            assert _metric(exposition, "onceflow_watermark_age_seconds") > 20
            assert _metric(exposition, "onceflow_kafka_records_read_total") == 300
        finally:
            kafka.up()

        now = int(time.time() * 1000)
        produce(topic, [(n % 3, _event(n, now), None) for n in range(300, 330)])
        wait_for(lambda: counted_events(db) == 330, "the events produced after the restart", 180, job)
        wait_for(lambda: http_get(url + "/healthz")[0] == 200, "/healthz healthy again", 90, job)
        _, exposition = http_get(url + "/metrics")
        assert _metric(exposition, "onceflow_kafka_records_read_total") == 330
        assert _metric(exposition, "onceflow_healthy") == 1

        # A runner that stops answering: its figures froze at their last, healthy, values (the
        # monitor waited on it with no timeout). They age now, and /healthz fails on their age.
        (runner,) = [pid for pid in child_processes(job.pid) if b"prism" in _cmdline(pid)]
        os.kill(runner, signal.SIGSTOP)
        try:
            wait_for(lambda: _failing(url, "figures_age_s"), "/healthz to fail on figures the runner no longer renews",
                     120, job)
            _, exposition = http_get(url + "/metrics")
            assert _metric(exposition, "onceflow_healthy") == 0
        finally:
            os.kill(runner, signal.SIGCONT)
    except AssertionError as error:
        raise AssertionError(f"{error}\njob output: {job_output(job)}") from None
    finally:
        stop(job)
