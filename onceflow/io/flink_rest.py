"""Flink's REST API, for stopping a job with a savepoint and checking its restore.

Only what a live job needs, over plain HTTP with the standard library (Flink 1.19's
``/jobs/...`` endpoints, as the JobManager of a session cluster and the mini
cluster of Beam's embedded Flink serve them):

* :func:`flink_version`: whether the REST API answers (``/config``);
* :func:`find_job`: the job not yet finished that has a given name (the
  ``--job_name`` the job server gives Flink), from ``/jobs/overview``;
* :func:`restored_savepoint`: the savepoint Flink restored the job from, from
  ``/jobs/<jid>/checkpoints`` (``latest.restored``);
* :func:`stop_with_savepoint`: ``POST /jobs/<jid>/stop`` (``drain`` false: no
  final watermark, so open windows stay open in the savepoint), then polls
  ``/jobs/<jid>/savepoints/<trigger id>`` until the savepoint is complete;
* :func:`cancel_job`: ``PATCH /jobs/<jid>?mode=cancel``.

Every failure (unreachable, an HTTP error, a failed savepoint, a timeout) is a
:class:`FlinkRestError` whose message is one line.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, List, NamedTuple, Optional

# Flink's job states after which a job does not run again.
FINISHED_STATES = frozenset({"FINISHED", "CANCELED", "CANCELLING", "FAILED"})
_REQUEST_TIMEOUT_S = 10.0


class FlinkRestError(RuntimeError):
    """Flink's REST API did not do what was asked; the message is one line."""


class FlinkUnreachable(FlinkRestError):
    """Flink's REST API did not answer at all (refused, reset, timed out): worth
    asking again, unlike an answer that refuses."""


class FlinkJob(NamedTuple):
    """A job as ``/jobs/overview`` lists it."""

    job_id: str
    name: str
    state: str


def check_rest_url(url: str) -> str:
    """``url`` without a trailing slash when it is ``http(s)://HOST:PORT``; else ValueError."""
    parsed = urllib.parse.urlsplit(str(url).strip())
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None \
            or parsed.path.strip("/") or parsed.query:
        raise ValueError(f"{url!r} is not Flink's REST address; give http://HOST:PORT, e.g. http://127.0.0.1:8081")
    return f"{parsed.scheme}://{parsed.netloc}"


def _request(url: str, method: str = "GET", body: Optional[dict] = None) -> Any:
    """The JSON answer of one request; FlinkRestError with Flink's own error text."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=_REQUEST_TIMEOUT_S) as response:
            text = response.read()
    except urllib.error.HTTPError as error:
        raise FlinkRestError(f"{method} {url} answered HTTP {error.code}: {_flink_errors(error)}") from None
    except (OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        raise FlinkUnreachable(f"Flink's REST API at {url} did not answer: {reason}") from None
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        raise FlinkRestError(f"{method} {url} did not answer JSON: {text[:100]!r}") from None


def _flink_errors(error: urllib.error.HTTPError) -> str:
    """The first line of the ``errors`` Flink puts in an error answer."""
    try:
        errors = json.loads(error.read()).get("errors") or []
    except (OSError, ValueError, AttributeError):
        errors = []
    text = str(errors[0]) if errors else str(error.reason)
    return _first_line(text)


_WRAPPERS = ("java.util.concurrent.CompletionException: ", "java.util.concurrent.ExecutionException: ")


def _java_failure(trace: str) -> str:
    """A Java stack trace as one line: its exception without the future's
    wrappers, and its root cause (the last ``Caused by:``)."""
    lines = [line.strip() for line in trace.strip().splitlines()]
    head = lines[0] if lines else trace
    while head.startswith(_WRAPPERS):
        head = head.split(": ", 1)[1]
    causes = [line[len("Caused by: "):] for line in lines if line.startswith("Caused by: ")]
    if causes and causes[-1] not in head:
        head = f"{head} (caused by {causes[-1]})"
    return _first_line(head)


def _first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0][:400]


def flink_version(rest_url: str) -> str:
    """The Flink version the REST API reports (``/config``): a check that it answers."""
    return str(_request(f"{rest_url}/config").get("flink-version", "unknown"))


def list_jobs(rest_url: str) -> List[FlinkJob]:
    """Every job the JobManager knows (``/jobs/overview``)."""
    answer = _request(f"{rest_url}/jobs/overview")
    return [FlinkJob(str(job.get("jid", "")), str(job.get("name", "")), str(job.get("state", "")))
            for job in answer.get("jobs", [])]


def find_job(rest_url: str, name: str) -> Optional[FlinkJob]:
    """The job named ``name`` that has not finished, or None when there is none.
    FlinkRestError when several are (the name does not say which one to stop)."""
    jobs = [job for job in list_jobs(rest_url) if job.name == name and job.state not in FINISHED_STATES]
    if len(jobs) > 1:
        raise FlinkRestError(f"{len(jobs)} jobs named {name!r} run on Flink at {rest_url} "
                             f"({', '.join(job.job_id for job in jobs)}); give each job its own --job_name")
    return jobs[0] if jobs else None


def restored_savepoint(rest_url: str, job_id: str) -> Optional[str]:
    """The path of the savepoint (or retained checkpoint) Flink restored the job
    from, or None when it started without state."""
    latest = _request(f"{rest_url}/jobs/{job_id}/checkpoints").get("latest") or {}
    restored = latest.get("restored") or {}
    return restored.get("external_path") or None


def stop_with_savepoint(rest_url: str, job_id: str, target_directory: str, timeout_s: float = 600.0,
                        poll_s: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> str:
    """Stops the job with a savepoint in ``target_directory`` and returns the
    savepoint's path once Flink reports it complete (the job then ends FINISHED).
    ``drain`` is false: sources stop without emitting a final watermark, so open
    windows and timers stay in the savepoint. FlinkRestError when the savepoint
    failed or was not complete within ``timeout_s``."""
    trigger = _request(f"{rest_url}/jobs/{job_id}/stop", "POST",
                       {"targetDirectory": target_directory, "drain": False})
    request_id = trigger.get("request-id")
    if not request_id:
        raise FlinkRestError(f"Flink at {rest_url} did not start a savepoint of job {job_id}: {trigger}")
    deadline = time.monotonic() + timeout_s
    while True:
        answer = _request(f"{rest_url}/jobs/{job_id}/savepoints/{request_id}")
        if (answer.get("status") or {}).get("id") == "COMPLETED":
            operation = answer.get("operation") or {}
            if operation.get("location"):
                return str(operation["location"])
            cause = operation.get("failure-cause") or {}
            raise FlinkRestError(f"the savepoint of job {job_id} failed: "
                                 f"{_java_failure(str(cause.get('stack-trace') or cause or 'no location'))}")
        if time.monotonic() >= deadline:
            raise FlinkRestError(f"the savepoint of job {job_id} was not complete after {timeout_s:.0f}s")
        sleep(poll_s)


def cancel_job(rest_url: str, job_id: str) -> None:
    """Asks Flink to cancel the job (no savepoint)."""
    _request(f"{rest_url}/jobs/{job_id}?mode=cancel", "PATCH")
