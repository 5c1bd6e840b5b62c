"""onceflow.io.flink_rest against a stand-in for Flink's REST API (answers as
Flink 1.19 gives them, recorded from the dev stack's cluster)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest

from onceflow.io import flink_rest
from onceflow.io.flink_rest import FlinkJob, FlinkRestError


class _FakeFlink:
    """Answers ``routes[(method, path)]``: a (status, JSON body) pair (or a triple
    with a delay in seconds), or a list of them served one per request (the last
    one repeated). Records each request."""

    def __init__(self, routes):
        self.routes = routes
        self.requests = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append((self.command, self.path, body))
                answer = fake.routes.get((self.command, self.path), (404, {"errors": ["Not found: " + self.path]}))
                if isinstance(answer, list):
                    answer = answer.pop(0) if len(answer) > 1 else answer[0]
                status, payload, *delay = answer
                if delay:  # (status, body, seconds): answers that late
                    time.sleep(delay[0])
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_flink():
    servers = []

    def start(routes):
        servers.append(_FakeFlink(routes))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _overview(*jobs):
    return (200, {"jobs": [{"jid": jid, "name": name, "state": state} for jid, name, state in jobs]})


def test_check_rest_url_takes_only_http_host_port():
    assert flink_rest.check_rest_url("http://127.0.0.1:8081/") == "http://127.0.0.1:8081"
    assert flink_rest.check_rest_url(" https://jm.example:443 ") == "https://jm.example:443"
    for bad in ("127.0.0.1:8081", "http://127.0.0.1", "http://127.0.0.1:8081/jobs", "ftp://h:1", "http://h:x"):
        with pytest.raises(ValueError, match="http://HOST:PORT"):
            flink_rest.check_rest_url(bad)


def test_find_job_takes_the_unfinished_job_of_that_name(fake_flink):
    flink = fake_flink({("GET", "/jobs/overview"): _overview(
        ("a1", "job-a", "FINISHED"), ("a2", "job-a", "RUNNING"), ("b1", "job-b", "RUNNING"),
        ("c1", "job-c", "CANCELED"))})
    assert flink_rest.find_job(flink.url, "job-a") == FlinkJob("a2", "job-a", "RUNNING")
    assert flink_rest.find_job(flink.url, "job-c") is None
    assert flink_rest.find_job(flink.url, "job") is None  # names match exactly, not by prefix


def test_two_running_jobs_of_one_name_are_refused(fake_flink):
    flink = fake_flink({("GET", "/jobs/overview"): _overview(("x1", "twin", "RUNNING"), ("x2", "twin", "RESTARTING"))})
    with pytest.raises(FlinkRestError, match="2 jobs named 'twin'.*give each job its own --job_name"):
        flink_rest.find_job(flink.url, "twin")


def test_stop_with_savepoint_posts_the_stop_and_polls_until_complete(fake_flink):
    location = "file:/savepoints/savepoint-8d724a-0aac8e8b0e4d"
    flink = fake_flink({
        ("POST", "/jobs/j1/stop"): (202, {"request-id": "r1"}),
        ("GET", "/jobs/j1/savepoints/r1"): [(200, {"status": {"id": "IN_PROGRESS"}}),
                                             (200, {"status": {"id": "IN_PROGRESS"}}),
                                             (200, {"status": {"id": "COMPLETED"}, "operation": {"location": location}})],
    })
    found = flink_rest.stop_with_savepoint(flink.url, "j1", "file:///savepoints", poll_s=0, sleep=lambda s: None)
    assert found == location
    assert flink.requests[0] == ("POST", "/jobs/j1/stop", {"targetDirectory": "file:///savepoints", "drain": False})
    assert [r[1] for r in flink.requests].count("/jobs/j1/savepoints/r1") == 3


def test_a_failed_savepoint_is_one_line_with_its_cause(fake_flink):
    trace = ("java.util.concurrent.CompletionException: java.util.concurrent.CompletionException: "
             "org.apache.flink.runtime.checkpoint.CheckpointException: An Exception occurred while triggering the "
             "checkpoint. IO-problem detected.\n\tat org.apache.flink...\n"
             "Caused by: org.apache.flink.runtime.checkpoint.CheckpointException: An Exception occurred ...\n"
             "\tat org.apache.flink...\n"
             "Caused by: java.io.IOException: Failed to create savepoint directory at /proc/sp\n\t... 12 more")
    flink = fake_flink({
        ("POST", "/jobs/j1/stop"): (202, {"request-id": "r1"}),
        ("GET", "/jobs/j1/savepoints/r1"): (200, {"status": {"id": "COMPLETED"}, "operation": {
            "failure-cause": {"class": "java.util.concurrent.CompletionException", "stack-trace": trace}}}),
    })
    with pytest.raises(FlinkRestError) as raised:
        flink_rest.stop_with_savepoint(flink.url, "j1", "/nowhere", poll_s=0, sleep=lambda s: None)
    assert str(raised.value) == (
        "the savepoint of job j1 failed: org.apache.flink.runtime.checkpoint.CheckpointException: An Exception "
        "occurred while triggering the checkpoint. IO-problem detected. (caused by java.io.IOException: Failed to "
        "create savepoint directory at /proc/sp)")


def test_a_savepoint_that_never_completes_times_out(fake_flink):
    flink = fake_flink({("POST", "/jobs/j1/stop"): (202, {"request-id": "r1"}),
                        ("GET", "/jobs/j1/savepoints/r1"): (200, {"status": {"id": "IN_PROGRESS"}})})
    with pytest.raises(FlinkRestError, match="not complete after 0s"):
        flink_rest.stop_with_savepoint(flink.url, "j1", "/sp", timeout_s=0, poll_s=0, sleep=lambda s: None)


def test_flinks_own_error_text_is_kept(fake_flink):
    flink = fake_flink({("POST", "/jobs/j1/stop"): (
        409, {"errors": ["Job j1 is not in a state that allows a savepoint\nmore detail"]})})
    with pytest.raises(FlinkRestError) as raised:
        flink_rest.stop_with_savepoint(flink.url, "j1", "/sp", poll_s=0, sleep=lambda s: None)
    assert str(raised.value) == (f"POST {flink.url}/jobs/j1/stop answered HTTP 409: Job j1 is not in a state "
                                 "that allows a savepoint")


def test_an_unreachable_rest_api_is_one_line():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(FlinkRestError, match=rf"REST API at http://127.0.0.1:{port}/config did not answer"):
        flink_rest.flink_version(f"http://127.0.0.1:{port}")


def test_restored_savepoint_and_cancel(fake_flink):
    flink = fake_flink({
        ("GET", "/jobs/j1/checkpoints"): (200, {"latest": {"completed": None, "restored": {
            "id": 3, "is_savepoint": True, "external_path": "file:/sp/savepoint-1"}}}),
        ("GET", "/jobs/j2/checkpoints"): (200, {"latest": {"completed": None, "restored": None}}),
        ("PATCH", "/jobs/j1?mode=cancel"): (202, {}),
        ("GET", "/config"): (200, {"flink-version": "1.19.0"}),
    })
    assert flink_rest.restored_savepoint(flink.url, "j1") == "file:/sp/savepoint-1"
    assert flink_rest.restored_savepoint(flink.url, "j2") is None
    flink_rest.cancel_job(flink.url, "j1")
    assert ("PATCH", "/jobs/j1?mode=cancel", None) in flink.requests
    assert flink_rest.flink_version(flink.url) == "1.19.0"


def test_attaching_asks_again_when_a_request_gets_no_answer_in_time(fake_flink, monkeypatch, capsys):
    """A busy JobManager once left a request unanswered past its timeout, and the
    job gave up on the REST API it had just been checked against."""
    from onceflow.pipelines.flink_savepoint import SavepointStop, attach

    monkeypatch.setattr(flink_rest, "_REQUEST_TIMEOUT_S", 0.2)
    running = _overview(("j1", "orders", "RUNNING"))
    flink = fake_flink({("GET", "/jobs/overview"): [(*running, 1.0), running]})
    job = attach(SavepointStop(flink.url, "/tmp/savepoints", "orders"), ended=lambda: False)
    assert job == FlinkJob("j1", "orders", "RUNNING")
    assert len(flink.requests) >= 2
    assert "Flink runs the job as 'orders' (j1)" in capsys.readouterr().err


def test_attaching_to_a_rest_api_that_never_answers_ends_in_one_line(monkeypatch):
    from onceflow.errors import ServiceError
    from onceflow.pipelines import flink_savepoint

    monkeypatch.setattr(flink_savepoint, "ATTACH_TIMEOUT_S", 0.5)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(ServiceError, match=r"^--flink_rest_url: Flink's REST API at .* did not answer"):
        flink_savepoint.attach(flink_savepoint.SavepointStop(url, "/tmp/savepoints", "orders"), ended=lambda: False)


def test_a_job_of_the_same_name_left_on_flink_is_refused_before_submitting(fake_flink):
    """A job whose process was killed (SIGKILL) stays on Flink, RESTARTING for good
    (its LOOPBACK worker is gone) and holding the slots: the new job of the same
    name waited for slots, and its stop took whichever of the two it found."""
    from onceflow.errors import ServiceError
    from onceflow.pipelines.flink_savepoint import SavepointStop, check_reachable

    flink = fake_flink({("GET", "/config"): (200, {"flink-version": "1.19.0"}),
                        ("GET", "/jobs/overview"): [
                            _overview(("k1", "orders", "RESTARTING"), ("f1", "orders", "FINISHED")),
                            _overview(("f1", "orders", "FINISHED"), ("k1", "orders", "CANCELED"))]})
    stop = SavepointStop(flink.url, "/tmp/savepoints", "orders")
    with pytest.raises(ServiceError, match=r"^--job_name: Flink at .* already has a job named 'orders' \(k1 "
                                           r"RESTARTING\); .*cancel it \(curl -X PATCH '.*/jobs/k1\?mode=cancel'\)"):
        check_reachable(stop)
    check_reachable(stop)  # once it is cancelled


def test_a_stop_waits_for_a_job_the_job_server_was_still_submitting_and_cancels_it(fake_flink):
    """Ctrl-C before Flink listed the job: the stop said the job was cancelled, and
    it appeared on Flink some 10 s later, RESTARTING for good."""
    from onceflow.pipelines.flink_savepoint import SavepointStop, cancel_on_flink

    flink = fake_flink({("GET", "/jobs/overview"): [_overview(), _overview(), _overview(("j1", "orders", "RUNNING"))],
                        ("PATCH", "/jobs/j1?mode=cancel"): (202, {})})
    stop = SavepointStop(flink.url, "/tmp/savepoints", "orders")
    assert cancel_on_flink(stop, wait_s=30.0, sleep=lambda seconds: None)
    assert ("PATCH", "/jobs/j1?mode=cancel", None) in flink.requests
    nothing = fake_flink({("GET", "/jobs/overview"): _overview()})
    assert not cancel_on_flink(SavepointStop(nothing.url, "/tmp/savepoints", "orders"))  # no wait: asked once
    assert len(nothing.requests) == 1
