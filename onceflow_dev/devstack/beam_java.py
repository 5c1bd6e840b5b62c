"""The Beam Java release the Java dev services run from, its jars and JVM flags.

The Flink job server (:mod:`onceflow_dev.devstack.flink`), the standalone Flink
cluster (:mod:`onceflow_dev.devstack.flink_cluster`) and the Kafka expansion service
(:mod:`onceflow_dev.devstack.kafka_expansion`) all run from the job server's jars,
so they are defined here, once, and none of those modules imports another for them.

Versions, and why. The project pins Beam 2.77.0, but this machine's Maven
mirror serves no ``beam-runners-flink-<flink>-job-server`` jar for any version
(2.43-2.77, Flink 1.15-2.0), no Beam Java artifact at 2.77 at all, and
``beam-runners-java-job-service`` (which the Flink runner needs) only up to
2.65.0. ``beam-runners-flink-1.19`` is served at 2.62.0 and 2.70.0; 2.70.0
depends on ``beam-runners-java-job-service:2.70.0``, which is missing. So the
newest complete set is:

* ``org.apache.beam:beam-runners-flink-1.19:2.62.0`` with its runtime
  dependencies (which bring Flink 1.19.0 and ``beam-runners-java-job-service``
  2.62.0), resolved by ``mvn`` into ``cache/flink-jobserver-2.62.0-flink1.19``;
* ``org.slf4j:slf4j-simple:1.7.30`` so the job server's log is not silent.
"""

from __future__ import annotations

import pathlib

from onceflow_dev.devstack import maven
from onceflow_dev.devstack.common import cache_dir

JOB_SERVER_BEAM_VERSION = "2.62.0"
FLINK_MINOR = "1.19"
FLINK_VERSION = "1.19.0"  # what beam-runners-flink-1.19:2.62.0 depends on
JOB_SERVER_ARTIFACTS = (
    f"org.apache.beam:beam-runners-flink-{FLINK_MINOR}:{JOB_SERVER_BEAM_VERSION}",
    "org.slf4j:slf4j-simple:1.7.30",
)
# Flink 1.19 on Java 17 needs these opened, as Flink's own scripts do.
JAVA_OPENS = [
    f"--add-opens=java.base/{package}=ALL-UNNAMED"
    for package in (
        "java.lang",
        "java.util",
        "java.lang.reflect",
        "java.io",
        "java.net",
        "java.nio",
        "java.time",
        "java.util.concurrent",
    )
]


def job_server_jars() -> pathlib.Path:
    """The job server's jars (Beam runner, Flink 1.19 runtime, ...), resolved once;
    returns the jars folder."""
    return maven.resolve_jars(
        cache_dir(f"flink-jobserver-{JOB_SERVER_BEAM_VERSION}-flink{FLINK_MINOR}"),
        JOB_SERVER_ARTIFACTS,
        f"Beam {JOB_SERVER_BEAM_VERSION} Flink {FLINK_MINOR} job server",
    )
