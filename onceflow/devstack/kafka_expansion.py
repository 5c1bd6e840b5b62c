"""A Java expansion service for Beam's KafkaIO, matched to the Flink job server.

Used by :class:`onceflow.io.kafka_java.ReadFromKafkaWithJava`: a Python pipeline
asks it (at construction) to expand the Java Kafka read, then runs it on the
``flink`` service, where the Java part executes inside the job server.

Versions, and why. The stock expansion service jar
(``beam-sdks-java-io-expansion-service``) is served here only up to 2.43, far
older than the 2.77 SDK; and no Beam 2.77 Java artifact is served at all. So this
service is assembled from Maven like the Flink job server, at the job server's
Beam version (2.62.0), so that the expanded transform and the runner executing
it are the same Java release:

* the Flink job server's own jars (``flink.resolve_jars()``: Beam 2.62.0 core,
  ``beam-sdks-java-expansion-service``, the Java SDK harness, ...);
* ``org.apache.beam:beam-sdks-java-io-kafka:2.62.0`` with its runtime
  dependencies, excluding ``io.confluent:*`` (the Confluent Avro serializer and
  schema-registry client, which only ``packages.confluent.io`` serves and the
  byte-array reader never loads), and ``org.apache.kafka:kafka-clients:3.9.1``
  (a ``provided`` dependency of KafkaIO; 3.9.1 is the newest 3.x, which talks to
  the Kafka 4.x dev broker). Jars the job server already has are dropped from
  this folder, so the job server's versions are the only ones on its classpath.

The same Kafka IO jars are put on the ``flink`` job server's classpath (see
:func:`onceflow.devstack.flink.up`): with the ``EMBEDDED`` environment the Java
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
import re
import shutil
from typing import Any, Sequence
from xml.sax.saxutils import escape

from onceflow.devstack import flink, maven
from onceflow.devstack.common import (
    HOST,
    cache_dir,
    can_connect,
    env_port,
    grpc_answers,
    progress,
    require_free_ports,
    require_tool,
    run_logged,
    running_pid,
    service_dir,
    start_and_wait,
    stop_managed,
)
from onceflow.errors import ServiceError

NAME = "kafka-expansion"
BEAM_JAVA_VERSION = flink.JOB_SERVER_BEAM_VERSION  # 2.62.0: the runner's release
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

_COMPLETE = ".complete"
_JAR = re.compile(r"^(?P<name>.+?)-(?P<version>\d+(?:\.\d+)+[^/]*)\.jar$")


def port() -> int:
    return env_port("ONCEFLOW_KAFKA_EXPANSION_PORT", 18096)


def address() -> str:
    """``127.0.0.1:<port>``: pass it as ``expansion_service``."""
    return f"{HOST}:{port()}"


def _dir() -> pathlib.Path:
    return service_dir(NAME)


def _pid_file() -> pathlib.Path:
    return _dir() / "expansion.pid"


def _log() -> pathlib.Path:
    return _dir() / "expansion.log"


def _marker() -> str:
    # A system property naming this folder: unique to this service and project folder.
    return f"-Donceflow.service={_dir()}"


def _jars_folder() -> pathlib.Path:
    return cache_dir(f"beam-kafka-io-{BEAM_JAVA_VERSION}-clients-{KAFKA_CLIENTS_VERSION}-harness")


def pom_xml(name: str, coordinates: Sequence[str], exclusions: Sequence[str]) -> str:
    """A pom whose dependencies are ``coordinates``, each excluding ``exclusions``."""
    excluded = "".join(
        f"<exclusion><groupId>{escape(group)}</groupId><artifactId>{escape(artifact)}</artifactId></exclusion>"
        for group, artifact in (pattern.split(":") for pattern in exclusions)
    )
    entries = []
    for coordinate in coordinates:
        group, artifact, version = coordinate.split(":")
        entries.append(
            f"    <dependency><groupId>{escape(group)}</groupId><artifactId>{escape(artifact)}</artifactId>"
            f"<version>{escape(version)}</version><exclusions>{excluded}</exclusions></dependency>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<!-- Generated by onceflow.devstack.kafka_expansion: only used to fetch the jars below. -->\n"
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        "  <groupId>onceflow.devstack</groupId>\n"
        f"  <artifactId>{escape(name)}</artifactId>\n"
        "  <version>1</version>\n"
        "  <packaging>pom</packaging>\n"
        "  <dependencies>\n" + "\n".join(entries) + "\n  </dependencies>\n</project>\n"
    )


def jar_name(filename: str) -> str:
    """``kafka-clients-3.9.1.jar`` -> ``kafka-clients`` (the file name without its version)."""
    match = _JAR.match(filename)
    return match.group("name") if match else filename


def resolve_kafka_io_jars() -> pathlib.Path:
    """Beam's Java KafkaIO and kafka-clients with the runtime dependencies the Flink
    job server lacks, resolved once; returns the jars folder."""
    folder = _jars_folder()
    jars = folder / "jars"
    if (folder / _COMPLETE).exists():
        return jars
    base = flink.resolve_jars()
    mvn = require_tool("mvn", "install Apache Maven 3.8+ (Debian: apt-get install -y maven)")
    progress(f"resolving Beam {BEAM_JAVA_VERSION} Java KafkaIO jars from Maven (first time only)...")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(jars, ignore_errors=True)
    (folder / "pom.xml").write_text(pom_xml(folder.name, KAFKA_IO_ARTIFACTS, EXCLUSIONS), encoding="utf-8")
    run_logged(
        [mvn, "-B", "-f", str(folder / "pom.xml"), "dependency:copy-dependencies",
         f"-DoutputDirectory={jars}", "-DincludeScope=runtime"],
        folder / "maven.log",
        f"resolving Beam {BEAM_JAVA_VERSION} KafkaIO with mvn",
        cwd=folder,
    )
    present = {jar_name(path.name) for path in base.glob("*.jar")}
    for path in jars.glob("*.jar"):
        if jar_name(path.name) in present:
            path.unlink()
    (folder / _COMPLETE).write_text("\n".join(KAFKA_IO_ARTIFACTS) + "\n", encoding="utf-8")
    return jars


def classpath() -> str:
    """The Flink job server's jars, then the Kafka IO jars: a ``java -cp`` value."""
    return maven.classpath(flink.resolve_jars()) + os.pathsep + maven.classpath(resolve_kafka_io_jars())


# ExpansionService.DiscoverSchemaTransform; an empty request serializes to b"".
_DISCOVER = "/org.apache.beam.model.expansion.v1.ExpansionService/DiscoverSchemaTransform"


def _answers(timeout: float = 5.0) -> bool:
    """True when a Beam expansion service answers on the port."""
    if not can_connect(port()):
        return False
    return grpc_answers(address(), _DISCOVER, timeout)


def up() -> bool:
    """Start the expansion service unless it already runs; True when this call started it."""
    if running_pid(_pid_file(), _marker()) is not None:
        if _answers():
            return False
        raise ServiceError(
            f"the Kafka expansion service is running (pid file {_pid_file()}) but does not answer "
            f"on {address()}; run 'onceflow dev down --services {NAME}' and retry"
        )
    require_free_ports("the Kafka expansion service", {"ONCEFLOW_KAFKA_EXPANSION_PORT": port()})
    cp = classpath()
    java = require_tool("java", "install a Java 17+ runtime (Debian: apt-get install -y openjdk-17-jre-headless)")
    _dir().mkdir(parents=True, exist_ok=True)
    command = [
        java, "-Xmx512m", _marker(), *flink.JAVA_OPENS, "-cp", cp, MAIN_CLASS, str(port()),
        f"--defaultEnvironmentType={ENVIRONMENT_TYPE}", *EXPERIMENTS,
    ]
    progress(f"starting the Beam {BEAM_JAVA_VERSION} Kafka expansion service on {address()}...")
    start_and_wait(command, _log(), _dir(), _pid_file(), _answers, START_TIMEOUT,
                   f"the Kafka expansion service to answer on {address()}")
    return True


def down() -> bool:
    """Stop the expansion service if this package started it; True when something was stopped."""
    return stop_managed(_pid_file(), _marker(), "the Kafka expansion service")


def status() -> dict[str, Any]:
    """Whether the service runs and answers, and the address to pass as ``expansion_service``."""
    pid = running_pid(_pid_file(), _marker())
    return {
        "healthy": pid is not None and _answers(),
        "pid": pid,
        "address": address(),
        "beam_java_version": BEAM_JAVA_VERSION,
        "kafka_clients_version": KAFKA_CLIENTS_VERSION,
        "environment_type": ENVIRONMENT_TYPE,
        "experiments": list(EXPERIMENTS),
        "log": str(_log()),
    }
