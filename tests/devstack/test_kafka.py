"""The dev Kafka broker is a real Apache Kafka of the pinned version."""

from __future__ import annotations

import pathlib
import time
import uuid
from collections import Counter

import pytest

from onceflow_dev.devstack import kafka
from onceflow.versions import KAFKA_VERSION

pytestmark = [pytest.mark.kafka]

RECORDS = 1000
PARTITIONS = 3


def test_produce_and_consume_across_partitions(kafka_bootstrap):
    from confluent_kafka import Consumer, Producer

    topic = f"devstack-{uuid.uuid4().hex[:8]}"
    assert kafka.create_topic(topic, partitions=PARTITIONS, bootstrap=kafka_bootstrap) is True
    assert kafka.create_topic(topic, partitions=PARTITIONS, bootstrap=kafka_bootstrap) is False

    delivered: Counter[int] = Counter()
    errors = []

    def on_delivery(error, message):
        if error is not None:
            errors.append(error)
        else:
            delivered[message.partition()] += 1

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(RECORDS):
        producer.produce(topic, key=f"key-{i}".encode(), value=f"value-{i}".encode(), on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert errors == []
    assert sum(delivered.values()) == RECORDS
    assert set(delivered) == set(range(PARTITIONS)), "keys should spread over every partition"

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"{topic}-reader",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    received: dict[bytes, tuple[bytes, int]] = {}
    deadline = time.monotonic() + 60
    try:
        while len(received) < RECORDS and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=1.0):
                assert message.error() is None, message.error()
                received[message.key()] = (message.value(), message.partition())
    finally:
        consumer.close()
    assert len(received) == RECORDS
    assert all(value == b"value-" + key[4:] for key, (value, _) in received.items())
    assert Counter(partition for _, partition in received.values()) == delivered


def test_the_broker_is_kafka_of_the_pinned_version(kafka_bootstrap):
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})  # keep it alive until the result
    cluster = admin.describe_cluster().result(timeout=30)
    # The broker answering is the one formatted in our data dir...
    assert cluster.cluster_id == kafka.cluster_id_on_disk()
    assert [node.port for node in cluster.nodes] == [int(kafka_bootstrap.rsplit(":", 1)[1])]
    # ...it reported the pinned version at start-up...
    assert kafka.broker_version() == KAFKA_VERSION
    # ...and it runs from the jars resolved for that version.
    status = kafka.status()
    assert status["healthy"] is True
    cmdline = pathlib.Path(f"/proc/{status['pid']}/cmdline").read_bytes().decode()
    assert f"kafka-{KAFKA_VERSION}" in cmdline and "kafka.Kafka" in cmdline
    jars = pathlib.Path(cmdline.split("-cp\0", 1)[1].split("\0", 1)[0]).parent
    assert (jars / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()


def test_up_is_idempotent(kafka_bootstrap):
    pid = kafka.status()["pid"]
    assert kafka.up() is False
    assert kafka.status()["pid"] == pid


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch):
    """The format tool reads an id that starts with "-" as a flag: Kafka's own ids
    never do, and neither do the dev stack's."""
    dashed = uuid.UUID(bytes=b"\xfb" + bytes(15))  # base64url "-wAA..."
    plain = uuid.UUID(bytes=bytes(16))
    draws = iter([dashed, dashed, plain])
    monkeypatch.setattr(kafka.uuid, "uuid4", lambda: next(draws))
    assert kafka._cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"


def test_creating_a_topic_without_a_broker_or_with_a_bad_address_is_one_line(capfd):
    """It ended in a TimeoutError's traceback after some 580 librdkafka log lines;
    an address without a port the same way."""
    from onceflow import cli
    from onceflow.errors import ServiceError

    with pytest.raises(ServiceError, match=r"cannot reach Kafka at 127.0.0.1:1 within 2s; is the broker up\?"):
        kafka.create_topic("any", bootstrap="127.0.0.1:1", timeout=2)
    assert capfd.readouterr().err == ""  # librdkafka's retries said nothing
    assert cli.main(["dev", "topic", "create", "any", "--kafka_bootstrap_servers", "nonsense"]) == 2
    assert capfd.readouterr().err.strip() == ("onceflow: error: --kafka_bootstrap_servers: 'nonsense' is not "
                                              "HOST:PORT[,HOST:PORT...], e.g. 127.0.0.1:19092")
