"""Shared pytest setup: markers and session fixtures for the real local services.

The service fixtures start a service through ``onceflow_dev.devstack`` (or reuse it
when it is already up) and FAIL, never skip, when it cannot start. Services a
session started are stopped at its end unless ``ONCEFLOW_KEEP_SERVICES=1``;
services that were already up are left alone. The project-local folder
defaults to ``<repo>/.onceflow`` so tests find the same caches from any cwd.

To add a marker, add a line to MARKERS.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
from typing import Iterator

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("ONCEFLOW_HOME", str(REPO / ".onceflow"))

MARKERS = {
    "kafka": "needs the local Kafka broker (started on demand by the kafka_bootstrap fixture)",
    "postgres": "needs the local PostgreSQL cluster (postgres_dsn fixture)",
    "prism": "runs pipelines on the Prism runner (prism_path fixture)",
    "flink": "runs pipelines on Beam's Flink job server (flink_job_endpoint fixture)",
    "slow": "takes more than a few seconds",
    "exclusive": "stops or restarts a shared service (the broker): runs while no other test does",
}
# Tests that use a JVM service of the dev stack (the Flink job server, the
# standalone Flink cluster, the Kafka expansion service) run in one worker, one at
# a time: some cancel every job on the job server, the cluster has a few slots,
# and a service started on demand is stopped by the worker that started it.
JVM_SERVICE_FIXTURES = frozenset({"flink_job_endpoint", "flink_cluster_master", "cluster_job_endpoint",
                                  "kafka_expansion_address"})


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    if config.getoption("dist", None) == "loadgroup" and tuple(pytest.version_tuple[:2]) >= (9, 2):
        # pytest-xdist's loadgroup marks a test's group in its ID, which pytest 9.2
        # ignores (pytest-xdist issue 1386): the JVM services' tests would run side
        # by side and stop each other's jobs.
        raise pytest.UsageError(f"--dist loadgroup does not group tests under pytest {pytest.__version__}: "
                                "install pytest<9.2 (`bash scripts/bootstrap.sh dev` does), or run with "
                                "ONCEFLOW_TEST_WORKERS=0")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group into each test's ID
def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """With pytest-xdist (scripts/test.sh runs ``-n 2 --dist loadgroup``): the JVM
    services' tests in one group, so in one worker."""
    for item in items:
        if item.get_closest_marker("flink") or JVM_SERVICE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group("jvm-services"))


@pytest.fixture(autouse=True)
def _alone_when_exclusive(request, tmp_path_factory) -> Iterator[None]:
    """Under pytest-xdist, a test marked ``exclusive`` runs while no other test
    does: every test holds a shared lock on a file all workers see, an exclusive
    test holds it exclusively. A second lock, taken by every test before the first
    one, makes the tests that come after a waiting exclusive one wait behind it (a
    stream of shared holders would otherwise keep it waiting for good). Without
    xdist this does nothing."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import fcntl

    folder = tmp_path_factory.getbasetemp().parent  # shared by the workers of one run
    exclusive = request.node.get_closest_marker("exclusive") is not None
    with open(folder / "onceflow-turnstile.lock", "a") as turnstile, open(folder / "onceflow-alone.lock", "a") as alone:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(alone, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(alone, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)


@contextlib.contextmanager
def _service(name: str, secure: bool | None = None) -> Iterator[None]:
    """Bring ``name`` up for the session; stop it afterwards if we started it."""
    from onceflow_dev import devstack
    from onceflow.errors import ServiceError

    try:
        started = devstack.ensure_up([name], secure=secure)
    except ServiceError as error:
        reason = str(error)
    else:
        reason = ""
    if reason:
        pytest.fail(f"{name} could not be started: {reason}", pytrace=False)
    try:
        yield
    finally:
        if started and os.environ.get("ONCEFLOW_KEEP_SERVICES") != "1":
            devstack.down(started)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``127.0.0.1:<port>`` of a running single-node Kafka broker (its plain listener).
    A broker this session starts has the secured listeners too (``kafka_secure``);
    one already running is used as it is."""
    from onceflow_dev import devstack
    from onceflow_dev.devstack import kafka

    with _service("kafka", secure=None if kafka.status()["pid"] else True):
        yield devstack.kafka_bootstrap_servers()


@pytest.fixture(scope="session")
def kafka_secure(kafka_bootstrap) -> dict:
    """The dev broker's secured listeners, as ``onceflow dev status --json`` gives
    them: SASL_SSL ``bootstrap_servers``, ``username``, ``password``, ``ca_file``,
    ``client_properties``, and ``mtls`` (mutual TLS). Fails, saying how to restart
    it, when the broker was started without them by someone else."""
    from onceflow_dev.devstack import kafka

    info = kafka.status().get("secure") if kafka.configured_secure() else None
    if not info or not info["healthy"]:
        pytest.fail("the dev Kafka broker runs without its secured listeners; restart it with them: "
                    "onceflow dev down --services kafka && onceflow dev up --services kafka --secure",
                    pytrace=False)
    return info


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """DSN of a running throwaway PostgreSQL cluster (database ``onceflow``)."""
    from onceflow_dev import devstack

    with _service("postgres"):
        yield devstack.postgres_dsn()


@pytest.fixture(scope="session")
def prism_path() -> Iterator[str]:
    """Path of a Prism binary built at the pinned Beam version."""
    from onceflow_dev import devstack

    with _service("prism"):
        location = devstack.prism_location()
        if location is None:
            pytest.fail("prism was built but its binary is missing", pytrace=False)
        yield location


@pytest.fixture(scope="session")
def flink_job_endpoint() -> Iterator[str]:
    """``127.0.0.1:<port>`` of a running Beam Flink job server (embedded Flink)."""
    from onceflow_dev import devstack

    with _service("flink"):
        yield devstack.flink_job_endpoint()


@pytest.fixture(scope="session")
def flink_cluster_master() -> Iterator[str]:
    """``127.0.0.1:<rest port>`` of a standalone Flink session cluster (1 JM, 1 TM)."""
    from onceflow_dev.devstack import flink_cluster

    with _service("flink-cluster"):
        yield flink_cluster.master()


@pytest.fixture(scope="session")
def kafka_expansion_address() -> Iterator[str]:
    """``127.0.0.1:<port>`` of Beam's Java Kafka expansion service (dev stack)."""
    from onceflow_dev.devstack import kafka_expansion

    with _service("kafka-expansion"):
        yield kafka_expansion.address()


@pytest.fixture
def few_database_retries(monkeypatch) -> None:
    """Two tries instead of eight for a database that does not answer: the tests
    of what a user sees then wait 0.1 s, not 11 s, for the same line."""
    from onceflow.io import retry

    monkeypatch.setattr(retry, "MAX_ATTEMPTS", 2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def cluster_job_endpoint(flink_cluster_master, tmp_path) -> Iterator[str]:
    """``127.0.0.1:<port>`` of a Beam Flink job server of the test's own that
    submits to the standalone cluster: its own ONCEFLOW_HOME under tmp_path (the
    jar cache linked) and ports, ``ONCEFLOW_FLINK_MASTER`` the cluster's REST
    address; stopped at the end. The shared job server is left alone."""
    from onceflow_dev.devstack.common import home

    own_home = tmp_path / "home"
    own_home.mkdir()
    (own_home / "cache").symlink_to(home() / "cache", target_is_directory=True)
    env = {
        **os.environ,
        "ONCEFLOW_HOME": str(own_home),
        "ONCEFLOW_FLINK_MASTER": flink_cluster_master,
        "ONCEFLOW_FLINK_JOB_PORT": str(_free_port()),
        "ONCEFLOW_FLINK_ARTIFACT_PORT": str(_free_port()),
        "ONCEFLOW_FLINK_EXPANSION_PORT": str(_free_port()),
    }
    command = [sys.executable, "-m", "onceflow.cli", "dev"]
    started = subprocess.run([*command, "up", "--services", "flink"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield f"127.0.0.1:{env['ONCEFLOW_FLINK_JOB_PORT']}"
    finally:
        subprocess.run([*command, "down", "--services", "flink"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
