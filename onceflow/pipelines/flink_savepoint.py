"""Stopping a live job on Flink with a savepoint, and resuming from one.

The flags are :class:`onceflow.options.FlinkOptions`;
:func:`savepoint_stop_from_options` checks them into a :class:`SavepointStop`
(or None: the job is cancelled on Ctrl-C as before). The main job then

1. checks that Flink's REST API answers before submitting (:func:`check_reachable`),
   and after submitting waits until it lists the job as running under its
   ``--job_name`` (:func:`attach`), so a wrong address fails at the start, not at
   the stop; with ``--savepoint_path`` it says whether Flink restored the job
   from it;
2. on Ctrl-C or SIGTERM, asks Flink to stop the job with a savepoint
   (:func:`stop_with_savepoint`) and prints the savepoint's path and the flag that
   resumes from it.

Flink does the work; the REST calls are in :mod:`onceflow.io.flink_rest`. The
positions the job stores with its rows (:mod:`onceflow.io.progress`) stay the
safety net: a job started without its state resumes from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import time
import urllib.parse
import uuid
from typing import Callable, Optional

from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions

from onceflow.errors import ServiceError, UsageError
from onceflow.io import flink_rest
from onceflow.io.flink_rest import FlinkJob, FlinkRestError, FlinkUnreachable
from onceflow.options import FlinkOptions, optional_text
from onceflow.runners import runs_on_flink

# How long after submission Flink may take to list the job as running (a session
# cluster receives the job server's jars first), and a savepoint to complete.
ATTACH_TIMEOUT_S = 180.0
SAVEPOINT_TIMEOUT_S = 600.0
# Flink reports the restore with the job's checkpoint statistics, at the latest
# just after it runs.
_RESTORE_REPORT_GRACE_S = 10.0
# A savepoint holds the aggregation's state per shard: a job restored with another
# --shards would put a key's new events in another shard than its counted ones. So
# savepoints go into a folder that names the number, and a restore reads it there.
_SHARDS_FOLDER = "onceflow-shards-{}"
_SHARDS_IN_PATH = re.compile(r"(?:^|/)onceflow-shards-([1-9][0-9]*)(?=/|$)")
# And in a folder naming the job whose state it holds (its group, topic and sink, as a
# digest): a savepoint of another job, restored, read that job's topic into these rows.
_JOB_FOLDER = "onceflow-job-{}"
_JOB_IN_PATH = re.compile(r"(?:^|/)onceflow-job-([0-9a-f]{12})(?=/|$)")


def job_identity(group: str, topic: str, sink: str) -> str:
    """The digest that names a live job's savepoints: its consumer group, its
    topic and its sink (as :meth:`Target.describe` shows it)."""
    return hashlib.sha256("\n".join((group, topic, sink)).encode("utf-8")).hexdigest()[:12]


def check_savepoint_of_job(savepoint_path: str, identity: str) -> None:
    """UsageError (one line) when ``savepoint_path`` names another job's folder
    (see :func:`job_identity`); a path that names none (taken by an earlier
    onceflow, or by hand) is not checked here."""
    named = _JOB_IN_PATH.findall(savepoint_path)
    if named and named[-1] != identity:
        raise UsageError(f"--savepoint_path: {savepoint_path} is a savepoint of another job (its folder "
                         f"onceflow-job-{named[-1]}; this job's, by its --kafka_group, topic and --sink, is "
                         f"onceflow-job-{identity}): restoring it would read that job's topic and windows into "
                         "these rows; give a savepoint of this job, or start without --savepoint_path")


@dataclasses.dataclass(frozen=True)
class SavepointStop:
    """How a live job on Flink is stopped: with a savepoint in ``savepoint_dir``
    (the ``--flink_savepoint_dir`` folder for the job's number of shards), through
    the REST API at ``rest_url``, where it runs as ``job_name``; without
    ``savepoint_dir`` (``--flink_rest_url`` alone) it is cancelled, through the job
    server and through the REST API (the 2.62 job server's own cancel can leave the
    Flink job running). ``restore_from``: the ``--savepoint_path`` it was started
    from, if any."""

    rest_url: str
    savepoint_dir: Optional[str]
    job_name: str
    restore_from: Optional[str] = None


def _check_directory(text: str) -> str:
    """An absolute path or a URI with a scheme (file://, s3://, hdfs://, ...)."""
    value = text.strip()
    scheme = urllib.parse.urlsplit(value).scheme
    if (scheme and len(scheme) > 1) or os.path.isabs(value):
        return value
    raise UsageError(f"--flink_savepoint_dir: {text!r} is relative; give an absolute path or a URI the "
                     "JobManager can write, e.g. file:///var/onceflow/savepoints or s3://bucket/savepoints")


def savepoint_folder(directory: str, shards: int, identity: Optional[str] = None) -> str:
    """Where the savepoints of a job with ``shards`` shards (and ``identity``, see
    :func:`job_identity`) go in ``directory``."""
    folder = f"{directory.rstrip('/')}/{_SHARDS_FOLDER.format(shards)}"
    return folder if identity is None else f"{folder}/{_JOB_FOLDER.format(identity)}"


def shards_to_restore(savepoint_path: str, given: Optional[int]) -> int:
    """The number of shards a job restored from ``savepoint_path`` runs with: the
    one its folder names (see :func:`savepoint_folder`). UsageError (one line) when
    ``--shards`` (``given``) says otherwise, or when the path names none and
    ``--shards`` is not given."""
    named = _SHARDS_IN_PATH.findall(savepoint_path)  # the innermost is the one onceflow added
    if not named:
        if given is None:
            raise UsageError(f"--savepoint_path: {savepoint_path} does not name the job's number of shards (onceflow "
                             "keeps its savepoints under .../onceflow-shards-N/); add --shards with the number the "
                             "job ran with (a job started on Flink without --shards by an earlier onceflow ran with 8)")
        return given
    recorded = int(named[-1])
    if given is not None and given != recorded:
        raise UsageError(f"--shards={given}: the savepoint {savepoint_path} holds the job's state in {recorded} "
                         f"shards; pass --shards={recorded} or leave --shards out")
    return recorded


def savepoint_stop_from_options(options: PipelineOptions, live: bool, shards: int,
                                identity: Optional[str] = None) -> Optional[SavepointStop]:
    """Checks the savepoint flags (one-line UsageError naming the flag) and
    returns how to stop the job, or None when ``--flink_savepoint_dir`` is not
    set. A job without ``--job_name`` gets a unique one here, by which the stop
    finds it on Flink; ``shards``: the job's number of shards; ``identity``: the
    job's (:func:`job_identity`), which names its savepoints' folder and which a
    ``--savepoint_path`` must not contradict."""
    flags = options.view_as(FlinkOptions)
    directory = optional_text(flags.flink_savepoint_dir)
    rest_url = optional_text(flags.flink_rest_url)
    restore_from = optional_text(flags.savepoint_path)
    flink = runs_on_flink(options)
    runner = options.view_as(StandardOptions).runner
    runner = f"the runner is {runner}" if runner else "no --runner is given (a live job would run on Prism)"
    if restore_from is not None:
        if not live:
            raise UsageError("--savepoint_path: only a live kafka:// job (no --to) resumes from a savepoint")
        if not flink:
            raise UsageError(f"--savepoint_path: only Flink restores a savepoint; {runner} "
                             "(use --runner=PortableRunner --job_endpoint=<Flink job server>)")
        if identity is not None:
            check_savepoint_of_job(restore_from, identity)
    elif flags.allow_non_restored_state:
        raise UsageError("--allow_non_restored_state: only means something with --savepoint_path")
    if directory is None and rest_url is None:
        return None
    if directory is None:  # --flink_rest_url alone: a stop cancels the job on Flink too
        if not live:
            raise UsageError("--flink_rest_url: only a live kafka:// job (no --to) is stopped through Flink's REST "
                             "API; a bounded job ends by itself")
        if not flink:
            raise UsageError(f"--flink_rest_url: Flink's REST API stops a job on Flink only; {runner}")
    elif not live:
        raise UsageError("--flink_savepoint_dir: only a live kafka:// job (no --to) is stopped with a savepoint; "
                         "a bounded job ends by itself")
    elif not flink:
        raise UsageError(f"--flink_savepoint_dir: stopping with a savepoint needs Flink; {runner} "
                         "(use --runner=PortableRunner --job_endpoint=<Flink job server>)")
    if rest_url is None:
        raise UsageError("--flink_savepoint_dir: needs --flink_rest_url=http://HOST:PORT, Flink's REST address "
                         "(the JobManager's), to ask for the savepoint")
    try:
        rest_url = flink_rest.check_rest_url(rest_url)
    except ValueError as error:
        raise UsageError(f"--flink_rest_url: {error}") from None
    cloud = options.view_as(GoogleCloudOptions)
    job_name = optional_text(cloud.job_name)
    if job_name is None:
        job_name = f"onceflow-aggregate-{uuid.uuid4().hex[:12]}"
        cloud.job_name = job_name
    folder = None if directory is None else savepoint_folder(_check_directory(directory), shards, identity)
    return SavepointStop(rest_url, folder, job_name, restore_from)


def check_reachable(stop: SavepointStop) -> None:
    """ServiceError (one line) unless Flink's REST API answers and runs no job of
    this name yet: checked before the job is submitted, so a wrong address never
    leaves a job that cannot be stopped with a savepoint (nor cancelled through
    it). A job whose process was killed stays on Flink, restarting for good (its
    LOOPBACK worker is gone) and holding its slots: a new job of the same name
    would wait for slots, and its stop could not tell the two apart."""
    try:
        flink_rest.flink_version(stop.rest_url)
        alive = [job for job in flink_rest.list_jobs(stop.rest_url)
                 if job.name == stop.job_name and job.state not in flink_rest.FINISHED_STATES]
    except FlinkRestError as error:
        raise ServiceError(f"--flink_rest_url: {error}") from None
    if alive:
        listed = ", ".join(f"{job.job_id} {job.state}" for job in alive)
        raise ServiceError(
            f"--job_name: Flink at {stop.rest_url} already has a job named {stop.job_name!r} ({listed}); one "
            "left by a run whose process was killed holds its slots for good: cancel it (curl -X PATCH "
            f"'{stop.rest_url}/jobs/{alive[0].job_id}?mode=cancel'), or if it is another live run, give this one "
            "its own --job_name")


def attach(stop: SavepointStop, ended: Callable[[], bool]) -> Optional[FlinkJob]:
    """Waits until Flink runs the job, then prints where it runs and, with
    ``--savepoint_path``, whether Flink restored it from the savepoint. None when
    the pipeline ended first (``ended()``: its failure is then reported by the
    runner). ServiceError (one line) when the REST API does not answer or does
    not list the job within :data:`ATTACH_TIMEOUT_S`. A request that gets no
    answer is asked again until then: one unanswered request (a busy JobManager
    once left one past its 10 s timeout in a test run) does not end the job."""
    deadline = time.monotonic() + ATTACH_TIMEOUT_S
    try:
        while True:
            try:
                job, unanswered = flink_rest.find_job(stop.rest_url, stop.job_name), None
            except FlinkUnreachable as error:
                job, unanswered = None, error
            if job is not None and job.state == "RUNNING":
                break
            if ended():
                return None
            if time.monotonic() > deadline:
                if unanswered is not None:
                    raise unanswered
                seen = f"it is {job.state}" if job is not None else "no such job is listed"
                raise ServiceError(f"--flink_rest_url: Flink at {stop.rest_url} does not run a job named "
                                   f"{stop.job_name!r} {ATTACH_TIMEOUT_S:.0f}s after submission ({seen}); is it "
                                   "the REST address of the Flink the job server submits to?")
            time.sleep(1.0)
        how = (f"stops it with a savepoint in {stop.savepoint_dir}" if stop.savepoint_dir is not None
               else "cancels it there")
        print(f"aggregate: Flink runs the job as {stop.job_name!r} ({job.job_id}) at {stop.rest_url}; Ctrl-C or "
              f"SIGTERM {how}", file=sys.stderr)
        if stop.restore_from is not None:
            _report_restore(stop, job)
        return job
    except FlinkRestError as error:
        raise ServiceError(f"--flink_rest_url: {error}") from None


def _report_restore(stop: SavepointStop, job: FlinkJob) -> None:
    """One line: the savepoint Flink restored the job from, or a warning that it
    started without state (it then resumes from the positions in the sink)."""
    deadline = time.monotonic() + _RESTORE_REPORT_GRACE_S
    while True:
        restored = flink_rest.restored_savepoint(stop.rest_url, job.job_id)
        if restored is not None:
            print(f"aggregate: Flink restored the job from the savepoint {restored}", file=sys.stderr)
            return
        if time.monotonic() > deadline:
            print(f"aggregate: warning: Flink reports no restore from {stop.restore_from}: the job started "
                  "without its state and resumes from the positions stored with its rows", file=sys.stderr)
            return
        time.sleep(1.0)


class JobNotListed(FlinkRestError):
    """Flink lists no job of the name: stopped while the job server was still
    submitting it, or already gone."""


# How long a stop that found no job on Flink waits for one to appear: the job server may
# still submit a job it was handed before the stop (seen: listed about 10 s after a
# Ctrl-C, then RESTARTING for good with nobody to cancel it).
NOT_YET_LISTED_WAIT_S = 30.0


def stop_with_savepoint(stop: SavepointStop) -> str:
    """Stops the job with a savepoint and returns its path; FlinkRestError (one
    line) when no running job has the name (:class:`JobNotListed` when none is
    listed), or the savepoint failed."""
    job = flink_rest.find_job(stop.rest_url, stop.job_name)
    if job is None:
        raise JobNotListed(f"Flink at {stop.rest_url} runs no job named {stop.job_name!r} (none is listed)")
    if job.state != "RUNNING":
        raise FlinkRestError(f"Flink at {stop.rest_url} runs no job named {stop.job_name!r} (it is {job.state})")
    return flink_rest.stop_with_savepoint(stop.rest_url, job.job_id, stop.savepoint_dir, SAVEPOINT_TIMEOUT_S)


def cancel_on_flink(stop: SavepointStop, wait_s: float = 0.0, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Cancels the job through Flink's REST API too, if Flink still runs it and
    answers (the 2.62 job server's own cancel leaves a Flink job running); with
    ``wait_s``, waits that long for a job not listed yet. Whether one was cancelled."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            job = flink_rest.find_job(stop.rest_url, stop.job_name)
            if job is not None:
                flink_rest.cancel_job(stop.rest_url, job.job_id)
                return True
        except FlinkRestError:
            return False
        if time.monotonic() >= deadline:
            return False
        sleep(1.0)


def resume_hint(location: str) -> str:
    """The one line printed after a stop with a savepoint."""
    return (f"aggregate: stopped with a savepoint at {location}; resume with the same flags and "
            f"--savepoint_path={location}")
