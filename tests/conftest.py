"""Shared pytest setup: markers and session fixtures for the real local services.

The service fixtures start a service through ``onceflow.devstack`` (or reuse it
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
}


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


@contextlib.contextmanager
def _service(name: str, secure: bool | None = None) -> Iterator[None]:
    """Bring ``name`` up for the session; stop it afterwards if we started it."""
    from onceflow import devstack
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
    from onceflow import devstack
    from onceflow.devstack import kafka

    with _service("kafka", secure=None if kafka.status()["pid"] else True):
        yield devstack.kafka_bootstrap_servers()


@pytest.fixture(scope="session")
def kafka_secure(kafka_bootstrap) -> dict:
    """The dev broker's secured listeners, as ``onceflow dev status --json`` gives
    them: SASL_SSL ``bootstrap_servers``, ``username``, ``password``, ``ca_file``,
    ``client_properties``, and ``mtls`` (mutual TLS). Fails, saying how to restart
    it, when the broker was started without them by someone else."""
    from onceflow.devstack import kafka

    info = kafka.status().get("secure") if kafka.configured_secure() else None
    if not info or not info["healthy"]:
        pytest.fail("the dev Kafka broker runs without its secured listeners; restart it with them: "
                    "onceflow dev down --services kafka && onceflow dev up --services kafka --secure",
                    pytrace=False)
    return info


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """DSN of a running throwaway PostgreSQL cluster (database ``onceflow``)."""
    from onceflow import devstack

    with _service("postgres"):
        yield devstack.postgres_dsn()


@pytest.fixture(scope="session")
def prism_path() -> Iterator[str]:
    """Path of a Prism binary built at the pinned Beam version."""
    from onceflow import devstack

    with _service("prism"):
        location = devstack.prism_location()
        if location is None:
            pytest.fail("prism was built but its binary is missing", pytrace=False)
        yield location


@pytest.fixture(scope="session")
def flink_job_endpoint() -> Iterator[str]:
    """``127.0.0.1:<port>`` of a running Beam Flink job server (embedded Flink)."""
    from onceflow import devstack

    with _service("flink"):
        yield devstack.flink_job_endpoint()


@pytest.fixture(scope="session")
def flink_cluster_master() -> Iterator[str]:
    """``127.0.0.1:<rest port>`` of a standalone Flink session cluster (1 JM, 1 TM)."""
    from onceflow.devstack import flink_cluster

    with _service("flink-cluster"):
        yield flink_cluster.master()
