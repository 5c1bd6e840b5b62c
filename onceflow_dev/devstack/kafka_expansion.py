"""A Java expansion service for Beam's KafkaIO, matched to the Flink job server.

Used by :class:`onceflow.io.kafka.java.ReadFromKafkaWithJava`: a Python pipeline
asks it (at construction) to expand the Java Kafka read, then runs it on the
``flink`` service, where the Java part executes inside the job server.

Versions, and why. The stock expansion service jar
(``beam-sdks-java-io-expansion-service``) is served here only up to 2.43, far
older than the 2.77 SDK; and no Beam 2.77 Java artifact is served at all. So this
service is assembled from Maven like the Flink job server, at the job server's
Beam version (2.62.0), so that the expanded transform and the runner executing
it are the same Java release:

* the Flink job server's own jars (``beam_java.job_server_jars()``: Beam 2.62.0 core,
  ``beam-sdks-java-expansion-service``, the Java SDK harness, ...);
* ``org.apache.beam:beam-sdks-java-io-kafka:2.62.0`` with its runtime
  dependencies, excluding ``io.confluent:*`` (the Confluent Avro serializer and
  schema-registry client, which only ``packages.confluent.io`` serves and the
  byte-array reader never loads), and ``org.apache.kafka:kafka-clients:3.9.1``
  (a ``provided`` dependency of KafkaIO; 3.9.1 is the newest 3.x, which talks to
  the Kafka 4.x dev broker). Jars the job server already has are dropped from
  this folder, so the job server's versions are the only ones on its classpath.

The same Kafka IO jars are put on the ``flink`` job server's classpath (see
:mod:`onceflow_dev.devstack.flink`): with the ``EMBEDDED`` environment the Java
transforms run in the job server's JVM, in process. The service is started as
``java -cp ... org.apache.beam.sdk.expansion.service.ExpansionService PORT
--defaultEnvironmentType=EMBEDDED --experiments=use_deprecated_read``: a
``DOCKER`` environment (the default) cannot run here, and the Flink job server
runs KafkaIO's splittable-DoFn expansion without ever reading a record, while
it reads the legacy ``UnboundedSource`` natively.

Port: ``ONCEFLOW_KAFKA_EXPANSION_PORT`` (default 18096). Like the job server,
Beam's expansion service binds every interface: run it on a trusted host only.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

from onceflow_dev.devstack import maven
from onceflow_dev.devstack.beam_java import JAVA_OPENS, JOB_SERVER_BEAM_VERSION, job_server_jars
from onceflow_dev.devstack.common import (
    HOST,
    cache_dir,
    env_port,
    grpc_answers,
    progress,
    require_free_ports,
    require_java,
    service_dir,
)
from onceflow_dev.devstack.service import ManagedService

NAME = "kafka-expansion"
BEAM_JAVA_VERSION = JOB_SERVER_BEAM_VERSION  # 2.62.0: the runner's release
KAFKA_CLIENTS_VERSION = "3.9.1"
MAIN_CLASS = "org.apache.beam.sdk.expansion.service.ExpansionService"
ENVIRONMENT_TYPE = "EMBEDDED"
# Expand KafkaIO to the primitive Read of its UnboundedSource, which the Flink
# runner executes natively. The default (splittable DoFn) expansion is accepted
# by the 2.62 Flink job server but its ProcessElement never runs there (seen:
# restrictions and sizes computed, no record read in 4 minutes).
EXPERIMENTS = ("--experiments=use_deprecated_read",)
KAFKA_IO_ARTIFACTS = (
    f"org.apache.beam:beam-sdks-java-io-kafka:{BEAM_JAVA_VERSION}",
    f"org.apache.kafka:kafka-clients:{KAFKA_CLIENTS_VERSION}",
    # The in-process Java SDK harness (EMBEDDED) sizes its caches with jamm, a
    # ``provided`` dependency of beam-sdks-java-harness, so not in the job server's jars.
    "com.github.jbellis:jamm:0.4.0",
)
# group:artifact patterns left out of every dependency above (not on Maven Central).
EXCLUSIONS = ("io.confluent:*",)
START_TIMEOUT = 90.0


def port() -> int:
    return env_port("ONCEFLOW_KAFKA_EXPANSION_PORT", 18096)


def address() -> str:
    """``127.0.0.1:<port>``: pass it as ``expansion_service``."""
    return f"{HOST}:{port()}"


def _marker() -> str:
    # A system property naming this folder: unique to this service and project folder.
    return f"-Donceflow.service={service_dir(NAME)}"


def _service() -> ManagedService:
    """The expansion service's process, marked as ours by a system property."""
    folder = service_dir(NAME)
    return ManagedService(name=NAME, label="the Kafka expansion service", folder=folder,
                          pid_file=folder / "expansion.pid", log=folder / "expansion.log",
                          marker=_marker(), address=address(), answers=_answers)


def pom_xml(name: str, coordinates: Sequence[str], exclusions: Sequence[str]) -> str:
    """A pom whose dependencies are ``coordinates``, each excluding ``exclusions``
    (:func:`onceflow_dev.devstack.maven.pom_xml`)."""
    return maven.pom_xml(name, coordinates, exclusions)


def jar_name(filename: str) -> str:
    """``kafka-clients-3.9.1.jar`` -> ``kafka-clients`` (:func:`onceflow_dev.devstack.maven.jar_name`)."""
    return maven.jar_name(filename)


def resolve_kafka_io_jars() -> pathlib.Path:
    """Beam's Java KafkaIO and kafka-clients with the runtime dependencies the Flink
    job server lacks, resolved once; returns the jars folder."""
    return maven.resolve_jars(
        cache_dir(f"beam-kafka-io-{BEAM_JAVA_VERSION}-clients-{KAFKA_CLIENTS_VERSION}-harness"),
        KAFKA_IO_ARTIFACTS,
        f"Beam {BEAM_JAVA_VERSION} Java KafkaIO",
        exclusions=EXCLUSIONS,
        already_in=job_server_jars(),
    )


def classpath() -> str:
    """The Flink job server's jars, then the Kafka IO jars: a ``java -cp`` value."""
    return maven.classpath(job_server_jars()) + os.pathsep + maven.classpath(resolve_kafka_io_jars())


# ExpansionService.DiscoverSchemaTransform; an empty request serializes to b"".
_DISCOVER = "/org.apache.beam.model.expansion.v1.ExpansionService/DiscoverSchemaTransform"


def _answers() -> bool:
    """True when a Beam expansion service answers on the port."""
    return grpc_answers(port(), _DISCOVER, timeout=5.0)


def up() -> bool:
    """Start the expansion service unless it already runs; True when this call started it."""
    service = _service()
    if service.is_up():
        return False
    require_free_ports(service.label, {"ONCEFLOW_KAFKA_EXPANSION_PORT": port()})
    command = [
        require_java(), "-Xmx512m", _marker(), *JAVA_OPENS, "-cp", classpath(), MAIN_CLASS, str(port()),
        f"--defaultEnvironmentType={ENVIRONMENT_TYPE}", *EXPERIMENTS,
    ]
    progress(f"starting the Beam {BEAM_JAVA_VERSION} Kafka expansion service on {address()}...")
    service.start(command, START_TIMEOUT)
    return True


def down() -> bool:
    """Stop the expansion service if this package started it; True when something was stopped."""
    return _service().stop()


def status() -> dict[str, Any]:
    """Whether the service runs and answers, and the address to pass as ``expansion_service``."""
    info = _service().status()
    info.update({
        "address": address(),
        "beam_java_version": BEAM_JAVA_VERSION,
        "kafka_clients_version": KAFKA_CLIENTS_VERSION,
        "environment_type": ENVIRONMENT_TYPE,
        "experiments": list(EXPERIMENTS),
    })
    return info
