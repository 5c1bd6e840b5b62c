"""Beam's Flink job server with an embedded Flink (``--flink-master=[local]``).

Beam 2.62.0 Java with Flink 1.19.0: why these versions, and the jars, are
in :mod:`onceflow_dev.devstack.beam_java`. The main class
``org.apache.beam.runners.flink.FlinkJobServerDriver`` lives in the runner module
itself, so ``java -cp '<jars>/*' FlinkJobServerDriver`` is the job server that
the (unserved) shaded job-server jar would have been. Beam's Java KafkaIO jars
(:func:`onceflow_dev.devstack.kafka_expansion.resolve_kafka_io_jars`) follow on its
classpath: with the ``EMBEDDED`` environment the Java transforms of
:mod:`onceflow.io.kafka.java` run in this JVM.

The Python 2.77.0 SDK runs through it with the portable protocol, batch and
streaming (``PeriodicImpulse`` + windowed ``GroupByKey`` emitting each window
while the source still produces), checked by ``tests/devstack/test_flink.py``::

    --runner=PortableRunner --job_endpoint=127.0.0.1:18099 --environment_type=LOOPBACK

``--runner=FlinkRunner --flink_job_server_jar=...`` cannot be used: it wants a
single jar. Add ``--streaming`` (and ``--checkpointing_interval=<ms>`` when
bundle finalization matters) for unbounded pipelines.

Ports (environment variable, default): job ``ONCEFLOW_FLINK_JOB_PORT`` (18099),
artifact ``ONCEFLOW_FLINK_ARTIFACT_PORT`` (18098), expansion
``ONCEFLOW_FLINK_EXPANSION_PORT`` (18097), all on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from typing import Any, NamedTuple

from onceflow_dev.devstack import flink_cluster, maven
from onceflow_dev.devstack.beam_java import FLINK_VERSION, JAVA_OPENS, JOB_SERVER_BEAM_VERSION, job_server_jars
from onceflow_dev.devstack.common import (
    HOST,
    env_port,
    grpc_answers,
    progress,
    require_free_ports,
    require_java,
    service_dir,
)
from onceflow_dev.devstack.kafka_expansion import resolve_kafka_io_jars
from onceflow_dev.devstack.service import ManagedService

_LOGGER = logging.getLogger(__name__)

NAME = "flink"
MAIN_CLASS = "org.apache.beam.runners.flink.FlinkJobServerDriver"
START_TIMEOUT = 120.0


def job_port() -> int:
    return env_port("ONCEFLOW_FLINK_JOB_PORT", 18099)


def artifact_port() -> int:
    return env_port("ONCEFLOW_FLINK_ARTIFACT_PORT", 18098)


def expansion_port() -> int:
    return env_port("ONCEFLOW_FLINK_EXPANSION_PORT", 18097)


def flink_master() -> str:
    """``--flink-master`` for the job server: ``$ONCEFLOW_FLINK_MASTER``, else
    ``[local]`` (an embedded Flink inside the job server). ``host:port`` of a
    REST endpoint, e.g. the ``flink-cluster`` service's ``127.0.0.1:18081``,
    sends jobs to that cluster instead."""
    return os.environ.get("ONCEFLOW_FLINK_MASTER") or "[local]"


def job_endpoint() -> str:
    """``127.0.0.1:<port>`` of the job server (whether or not it runs)."""
    return f"{HOST}:{job_port()}"


def pipeline_args() -> list[str]:
    """The flags that send a Python pipeline to this job server."""
    return ["--runner=PortableRunner", f"--job_endpoint={job_endpoint()}", "--environment_type=LOOPBACK"]


def _dir() -> pathlib.Path:
    return service_dir(NAME)


def _artifacts() -> pathlib.Path:
    return _dir() / "artifacts"


def _service() -> ManagedService:
    """The job server process; the artifacts folder on its command line marks it as ours."""
    folder = _dir()
    return ManagedService(name=NAME, label="the Flink job server", folder=folder,
                          pid_file=folder / "jobserver.pid", log=folder / "jobserver.log",
                          marker=str(_artifacts()), address=job_endpoint(), answers=_answers)


def _write_flink_conf() -> pathlib.Path:
    """The Flink configuration every job of this job server gets: checkpoints to
    files under the service folder. Flink's default keeps them in the JobManager's
    memory, limited to 5 MB per state: a streaming job whose dedup state outgrew
    that (the long torture run, 9 MB) failed every checkpoint, never committed an
    offset and restarted in a loop."""
    conf_dir = _dir() / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "flink-conf.yaml").write_text(
        "state.checkpoint-storage: filesystem\n"
        f"state.checkpoints.dir: {(_dir() / 'checkpoints').resolve().as_uri()}\n",
        encoding="utf-8")
    return conf_dir


def _master_file() -> pathlib.Path:
    """The ``--flink-master`` the running job server was started with."""
    return _dir() / "jobserver.master"


# JobService.GetJobs; an empty GetJobsRequest serializes to b"". Calling it raw
# keeps apache_beam (slow to import, chatty) out of `onceflow dev status`.
_GET_JOBS = "/org.apache.beam.model.job_management.v1.JobService/GetJobs"


def _answers() -> bool:
    """True when a Beam JobService answers GetJobs on the job port."""
    return grpc_answers(job_port(), _GET_JOBS, timeout=2.0)


def up() -> bool:
    """Start the job server unless it already runs; True when this call started it."""
    service = _service()
    if service.is_up():
        return False
    require_free_ports(
        service.label,
        {
            "ONCEFLOW_FLINK_JOB_PORT": job_port(),
            "ONCEFLOW_FLINK_ARTIFACT_PORT": artifact_port(),
            "ONCEFLOW_FLINK_EXPANSION_PORT": expansion_port(),
        },
    )
    classpath = maven.classpath(job_server_jars()) + os.pathsep + maven.classpath(resolve_kafka_io_jars())
    _artifacts().mkdir(parents=True, exist_ok=True)
    command = [
        require_java(),
        "-Xmx2g",
        *JAVA_OPENS,
        "-cp",
        classpath,
        MAIN_CLASS,
        f"--flink-master={flink_master()}",
        f"--job-host={HOST}",
        f"--job-port={job_port()}",
        f"--artifact-port={artifact_port()}",
        f"--expansion-port={expansion_port()}",
        f"--artifacts-dir={_artifacts()}",
        f"--flink-conf-dir={_write_flink_conf()}",
    ]
    progress(
        f"starting the Beam {JOB_SERVER_BEAM_VERSION} Flink {FLINK_VERSION} job server on "
        f"{job_endpoint()} (flink master {flink_master()})..."
    )
    _master_file().write_text(flink_master() + "\n", encoding="utf-8")
    service.start(command, START_TIMEOUT)
    return True


def down() -> bool:
    """Stop the job server if this package started it; True when something was stopped."""
    return _service().stop()


def status() -> dict[str, Any]:
    """Whether the job server runs and answers, and the flags that select it."""
    info = _service().status()
    running = info["pid"] is not None
    info.update({
        "job_endpoint": job_endpoint(),
        "artifact_port": artifact_port(),
        "expansion_port": expansion_port(),
        "job_server_beam_version": JOB_SERVER_BEAM_VERSION,
        "flink_version": FLINK_VERSION,
        "flink_master": _master_file().read_text(encoding="utf-8").strip()
        if running and _master_file().exists()
        else flink_master(),
        "pipeline_args": pipeline_args(),
    })
    return info


# The first checkpoint of a streaming job must not start while the job's first
# bundle runs. On this job server (Beam Java 2.62) a checkpoint taken then loses,
# now and then, the single element of Impulse: the job starts, checkpoints keep
# completing, and nothing is ever read (traced: the partition discovery's
# ``initial_restriction`` runs, its ``process`` never does). The likely mechanism:
# the bundle's output is held back during the snapshot while Impulse's final
# watermark goes on, so the next keyed stage drops the element as late. Measured
# on the main job: with ``--checkpointing_interval=2000`` (Flink's first checkpoint
# comes at a random moment within the first interval) 1 start in 3 read; with the
# first checkpoint at least 15 s after the start, 6 in 6 (a seventh start failed
# because earlier jobs had exhausted the job server's direct memory).
STREAMING_CHECKPOINT_FLAGS = ("--checkpointing_interval=20000", "--min_pause_between_checkpoints=15000")


def streaming_job_flags(job_endpoint: str) -> list[str]:
    """Flags that run a streaming pipeline on this job server, its workers inside
    the submitting process; offsets are committed at each checkpoint (20 s)."""
    return ["--runner=PortableRunner", f"--job_endpoint={job_endpoint}", "--environment_type=LOOPBACK",
            "--streaming", *STREAMING_CHECKPOINT_FLAGS]


def cancel_running_jobs(job_endpoint: str, name_prefix: str = "") -> int:
    """Cancels every job still running whose name starts with ``name_prefix`` (a
    job whose client was killed keeps its slots and restarts forever); returns
    how many the job service cancelled.

    Twice over: through the Beam job service, and on Flink itself (see
    :func:`cancel_flink_jobs`), because this job server marks an embedded job
    cancelled without stopping it."""
    import grpc
    from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc

    states = beam_job_api_pb2.JobState
    finished = {states.DONE, states.FAILED, states.CANCELLED, states.UPDATED, states.DRAINED}
    cancelled = 0
    with grpc.insecure_channel(job_endpoint) as channel:
        service = beam_job_api_pb2_grpc.JobServiceStub(channel)
        for job in service.GetJobs(beam_job_api_pb2.GetJobsRequest(), timeout=30).job_info:
            if job.state not in finished and job.job_name.startswith(name_prefix):
                service.Cancel(beam_job_api_pb2.CancelJobRequest(job_id=job.job_id), timeout=30)
                cancelled += 1
    cancel_flink_jobs(name_prefix)
    return cancelled


_FLINK_DONE = {"FINISHED", "CANCELED", "CANCELLING", "FAILED"}


def flink_rest_endpoints() -> list[str]:
    """``host:port`` of the Flink REST APIs this job server's jobs run behind: the
    cluster's, or with ``[local]`` each embedded job's own (one Flink mini cluster
    per job, its port in the job server's log) and the ``flink-cluster`` service's,
    where a job given ``--flink_master`` runs."""
    master = _master_file().read_text(encoding="utf-8").strip() if _master_file().exists() else flink_master()
    if master != "[local]":
        return [master]
    try:
        log = _service().log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        log = ""
    ports = dict.fromkeys(re.findall(r"Rest endpoint listening at localhost:(\d+)", log))
    return [*(f"{HOST}:{port}" for port in ports), flink_cluster.master()]


class FlinkJob(NamedTuple):
    """A job as Flink's REST API lists it."""

    endpoint: str
    job_id: str
    name: str
    state: str

    @property
    def finished(self) -> bool:
        return self.state in _FLINK_DONE


def flink_jobs(name_prefix: str = "") -> list[FlinkJob]:
    """The jobs whose name starts with ``name_prefix`` on every Flink REST API of
    :func:`flink_rest_endpoints` that still answers."""
    import http.client
    import urllib.request

    jobs = []
    for endpoint in flink_rest_endpoints():
        try:
            with urllib.request.urlopen(f"http://{endpoint}/jobs/overview", timeout=2) as response:
                listed = json.load(response).get("jobs", [])
        except (OSError, ValueError, http.client.HTTPException):
            continue  # that mini cluster is gone (its port may serve something else now)
        jobs += [FlinkJob(endpoint, job["jid"], str(job.get("name", "")), str(job.get("state", "")))
                 for job in listed if str(job.get("name", "")).startswith(name_prefix)]
    return jobs


def cancel_flink_jobs(name_prefix: str) -> int:
    """Cancels, through Flink's REST API, every job not yet finished whose name
    starts with ``name_prefix``; returns how many. The 2.62 job server's Cancel
    only interrupts its own wait for an embedded job: the Flink job goes on
    restarting (and holding memory) until cancelled here."""
    import http.client
    import urllib.request

    cancelled = 0
    for job in flink_jobs(name_prefix):
        if job.finished:
            continue
        request = urllib.request.Request(f"http://{job.endpoint}/jobs/{job.job_id}?mode=cancel", method="PATCH")
        try:
            urllib.request.urlopen(request, timeout=10).close()
            cancelled += 1
        except (OSError, http.client.HTTPException) as error:
            _LOGGER.warning("cancelling Flink job %s at %s failed: %s", job.name, job.endpoint, error)
    return cancelled
