"""Real local services for development and tests: Kafka, PostgreSQL, Prism, Flink.

Command line: ``onceflow dev up|status|down [--services kafka,postgres,prism,flink,flink-cluster]``
(``up`` defaults to kafka,postgres; ``up --secure`` adds Kafka's SASL_SSL and
mutual-TLS listeners, see :mod:`onceflow_dev.devstack.kafka_secure`). ``flink`` is Beam's Flink job server with an
embedded Flink; ``flink-cluster`` a standalone Flink session cluster it can target
(``ONCEFLOW_FLINK_MASTER=127.0.0.1:18081``). From Python::

    from onceflow_dev import devstack
    devstack.ensure_up(["kafka", "postgres"])      # idempotent
    devstack.status()["kafka"]["bootstrap_servers"]  # '127.0.0.1:19092'
    devstack.create_topic("events", partitions=3)
    devstack.prism_location()                        # path or None

Everything lives in the project-local folder, ``$ONCEFLOW_HOME`` or else
``./.onceflow`` (git ignores it): downloads and builds under ``cache/``, each
service's data, config, log and pid file under ``<service>/``. ``down`` stops
only processes started from that folder.

Ports (all on 127.0.0.1; environment variable, default):

=================================  =======  ===========================
``ONCEFLOW_KAFKA_PORT``            19092    Kafka client listener
``ONCEFLOW_KAFKA_CONTROLLER_PORT`` 19093    Kafka KRaft controller
``ONCEFLOW_KAFKA_SASL_PORT``       19094    Kafka SASL_SSL listener (``up --secure``)
``ONCEFLOW_KAFKA_MTLS_PORT``       19095    Kafka mutual-TLS listener (``up --secure``)
``ONCEFLOW_POSTGRES_PORT``         15432    PostgreSQL
``ONCEFLOW_FLINK_JOB_PORT``        18099    Beam job service (Flink)
``ONCEFLOW_FLINK_ARTIFACT_PORT``   18098    Beam artifact staging (Flink)
``ONCEFLOW_FLINK_EXPANSION_PORT``  18097    Java expansion service (Flink job server)
``ONCEFLOW_FLINK_REST_PORT``       18081    Flink cluster REST (``--flink_master``)
``ONCEFLOW_FLINK_RPC_PORT``        16123    Flink cluster JobManager RPC
``ONCEFLOW_FLINK_BLOB_PORT``       16124    Flink cluster blob server
``ONCEFLOW_FLINK_TM_RPC_PORT``     16125    Flink cluster TaskManager RPC
=================================  =======  ===========================

Modules: one per service (``kafka``, ``postgres``, ``prism``, ``flink``,
``flink_cluster``, ``kafka_expansion``), each with ``up``, ``down`` and ``status``
and, but for ``prism`` (a binary, not a process), its process described by a
:class:`~onceflow_dev.devstack.service.ManagedService`; ``common`` (folder, ports, pid
files, waiting, logged commands), ``maven`` (jars from Maven), ``beam_java`` (the
Beam Java release the Java services share), ``kafka_secure`` (the broker's secured
listeners) and ``command`` (``onceflow dev``).

Other settings: ``ONCEFLOW_FLINK_MASTER`` (job server's Flink, default ``[local]``),
``ONCEFLOW_PG_BINDIR`` (PostgreSQL binaries), ``ONCEFLOW_KEEP_SERVICES=1`` (tests
leave the services they started running).
"""

from __future__ import annotations

import concurrent.futures
from types import ModuleType
from typing import Any, Iterable

from onceflow_dev.devstack import flink, flink_cluster, kafka, kafka_expansion, postgres, prism
from onceflow_dev.devstack.kafka import create_topic
from onceflow_dev.devstack.prism import prism_location
from onceflow.errors import UsageError

# Service name -> module with up() -> bool, down() -> bool, status() -> dict.
SERVICES: dict[str, ModuleType] = {
    "kafka": kafka,
    "postgres": postgres,
    "prism": prism,
    "flink": flink,
    "flink-cluster": flink_cluster,
    "kafka-expansion": kafka_expansion,
}
DEFAULT_SERVICES = ("kafka", "postgres")

__all__ = [
    "SERVICES",
    "DEFAULT_SERVICES",
    "parse_services",
    "ensure_up",
    "down",
    "status",
    "create_topic",
    "prism_location",
    "kafka_bootstrap_servers",
    "postgres_dsn",
    "flink_job_endpoint",
]


def parse_services(value: str | Iterable[str] | None, default: Iterable[str] = DEFAULT_SERVICES) -> list[str]:
    """Service names from ``"kafka,postgres"`` or a list, checked and de-duplicated,
    in the order given; ``None`` or empty means ``default``."""
    if value is None:
        names: list[str] = list(default)
    elif isinstance(value, str):
        names = [part.strip() for part in value.split(",") if part.strip()]
    else:
        names = [str(part).strip() for part in value]
    if not names:
        names = list(default)
    unknown = [name for name in names if name not in SERVICES]
    if unknown:
        raise UsageError(
            f"unknown service {unknown[0]!r}: choose from {','.join(SERVICES)}"
        )
    return list(dict.fromkeys(names))


def ensure_up(services: str | Iterable[str] | None = None, secure: bool | None = None) -> list[str]:
    """Start (or build) each service unless it is already up; return the names
    this call started, in the order given. ``secure`` is Kafka's (see
    :func:`kafka.up`): True for its SASL_SSL and mutual-TLS listeners. Raises
    ServiceError with one line saying what to do.

    Prism is built (a first time: minutes of Go compiling) while the others start
    and their jars download; it needs none of them."""
    names = parse_services(services)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as builder:
        prism_built = builder.submit(prism.up) if "prism" in names and len(names) > 1 else None
        started = {name: _up(name, secure) for name in names if not (name == "prism" and prism_built)}
        if prism_built is not None:
            started["prism"] = prism_built.result()
    return [name for name in names if started[name]]


def _up(name: str, secure: bool | None) -> bool:
    return kafka.up(secure=secure) if name == "kafka" else SERVICES[name].up()


def down(services: str | Iterable[str] | None = None) -> list[str]:
    """Stop each service this package started (default: all); return those stopped."""
    stopped = []
    for name in parse_services(services, default=SERVICES):
        if SERVICES[name].down():
            stopped.append(name)
    return stopped


def status(services: str | Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Each service's status dict (default: all); every one has ``healthy``."""
    return {name: SERVICES[name].status() for name in parse_services(services, default=SERVICES)}


def kafka_bootstrap_servers() -> str:
    """``127.0.0.1:<port>`` of the dev broker."""
    return kafka.bootstrap_servers()


def postgres_dsn() -> str:
    """``postgresql://onceflow@127.0.0.1:<port>/onceflow`` of the dev cluster."""
    return postgres.dsn()


def flink_job_endpoint() -> str:
    """``127.0.0.1:<port>`` of the dev Flink job server."""
    return flink.job_endpoint()
