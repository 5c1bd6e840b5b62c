"""The dev stack's Beam 2.62 Java expansion service for KafkaIO."""

from __future__ import annotations

import pytest

from onceflow_dev.devstack import kafka_expansion


def test_jar_names_drop_versions():
    assert kafka_expansion.jar_name("kafka-clients-3.9.1.jar") == "kafka-clients"
    assert kafka_expansion.jar_name("proto-google-cloud-storage-v2-2.32.1-alpha.jar") == "proto-google-cloud-storage-v2"
    assert kafka_expansion.jar_name("beam-vendor-grpc-1_60_1-0.3.jar") == "beam-vendor-grpc-1_60_1"


def test_pom_excludes_confluent_artifacts():
    pom = kafka_expansion.pom_xml("x", kafka_expansion.KAFKA_IO_ARTIFACTS, kafka_expansion.EXCLUSIONS)
    assert pom.count("<exclusion><groupId>io.confluent</groupId><artifactId>*</artifactId></exclusion>") == len(
        kafka_expansion.KAFKA_IO_ARTIFACTS)
    assert "<artifactId>beam-sdks-java-io-kafka</artifactId><version>2.62.0</version>" in pom


@pytest.mark.slow
def test_service_expands_the_kafka_read(kafka_expansion_address):
    import apache_beam as beam

    from onceflow_dev import devstack
    from onceflow.io.kafka.config import EARLIEST, KafkaReadConfig, KafkaTopic
    from onceflow.io.kafka.java import ReadFromKafkaWithJava

    assert devstack.status(["kafka-expansion"])["kafka-expansion"]["healthy"]
    pipeline = beam.Pipeline()
    config = KafkaReadConfig(KafkaTopic("127.0.0.1:1", "t"), start=EARLIEST, time_source="record")
    pipeline | ReadFromKafkaWithJava(config, None, expansion_service=kafka_expansion_address)
    proto = pipeline.to_runner_api()
    urns = {t.spec.urn for t in proto.components.transforms.values()}
    assert "beam:transform:read:v1" in urns  # use_deprecated_read: Flink reads it natively
    assert "EMBEDDED" in {env.urn for env in proto.components.environments.values()}
