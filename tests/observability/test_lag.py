"""``onceflow lag`` against the real local broker, at known committed offsets."""

import json
import uuid

import pytest

from onceflow import cli

pytestmark = pytest.mark.kafka


@pytest.fixture()
def group_at_known_position(kafka_bootstrap):
    """100 records over 3 partitions (34, 33, 33); the group has committed 20 on
    partitions 0 and 1 and nothing on 2: lag 14 + 13 + 33 = 60."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    from onceflow_dev.devstack import create_topic

    topic = f"obs-lag-{uuid.uuid4().hex[:10]}"
    group = f"obs-lag-group-{uuid.uuid4().hex[:10]}"
    create_topic(topic, partitions=3, bootstrap=kafka_bootstrap)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for n in range(100):
        producer.produce(topic, f"record {n}".encode(), partition=n % 3)
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, 20), TopicPartition(topic, 1, 20)], asynchronous=False)
    finally:
        consumer.close()
    return kafka_bootstrap, topic, group


def lag(capsys, *args):
    status = cli.main(["lag", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_lag_reports_the_exact_lag_and_the_exit_status_flips_at_the_threshold(group_at_known_position, capsys):
    bootstrap, topic, group = group_at_known_position
    status, out, _ = lag(capsys, "--bootstrap-server", bootstrap, "--group", group)
    assert status == 0
    assert out.splitlines()[-1] == "total lag: 60"
    table = [line.split() for line in out.splitlines()[2:5]]
    assert table == [[topic, "0", "20", "0", "34", "14"], [topic, "1", "20", "0", "33", "13"],
                     [topic, "2", "-", "0", "33", "33"]]

    for max_lag, expected in ((100, 0), (60, 0), (59, 1), (10, 1)):
        status, out, _ = lag(capsys, "--bootstrap-server", bootstrap, "--group", group, "--topic", topic,
                             "--max-lag", str(max_lag))
        assert status == expected, (max_lag, out)
        assert "total lag: 60 " in out


def test_lag_as_json(group_at_known_position, capsys):
    bootstrap, topic, group = group_at_known_position
    status, out, _ = lag(capsys, "--bootstrap-server", bootstrap, "--group", group, "--max-lag", "10", "--json")
    assert status == 1
    found = json.loads(out)
    assert found["total_lag"] == 60 and found["over_max_lag"] is True and found["max_lag"] == 10
    assert [(p["partition"], p["committed"], p["end"], p["lag"]) for p in found["partitions"]] == [
        (0, 20, 34, 14), (1, 20, 33, 13), (2, None, 33, 33)]


def test_unknown_group_or_topic_and_unreachable_broker_get_one_line_and_their_own_status(kafka_bootstrap, capsys):
    status, out, err = lag(capsys, "--bootstrap-server", kafka_bootstrap, "--group", f"no-such-{uuid.uuid4().hex}")
    assert (status, out) == (4, "") and len(err.strip().splitlines()) == 1 and "is not known" in err
    status, out, err = lag(capsys, "--bootstrap-server", kafka_bootstrap, "--group", "g",
                           "--topic", f"no-such-{uuid.uuid4().hex}")
    assert (status, out) == (4, "") and "does not exist" in err
    status, out, err = lag(capsys, "--bootstrap-server", "127.0.0.1:9", "--group", "g", "--timeout", "2")
    assert (status, out) == (3, "") and err.startswith("onceflow lag: cannot reach Kafka at 127.0.0.1:9")


def test_the_kafka_flags_are_spelled_as_the_job_spells_them(capsys):
    """--kafka_setting and --kafka_config_file, as the job takes them; the dashed
    spellings are not flags (nothing reaches the broker in either case)."""
    status, out, err = lag(capsys, "--bootstrap-server", "127.0.0.1:9", "--group", "g",
                           "--kafka_setting", "no-equals-sign")
    assert (status, out) == (2, "") and "--kafka_setting:" in err
    status, out, err = lag(capsys, "--bootstrap-server", "127.0.0.1:9", "--group", "g",
                           "--kafka_config_file", "/no/such/client.properties")
    assert (status, out) == (2, "") and "--kafka_config_file" in err
    for dashed in ("--kafka-setting", "--kafka-config-file"):
        with pytest.raises(SystemExit) as exit:
            cli.main(["lag", "--bootstrap-server", "127.0.0.1:9", "--group", "g", dashed, "x"])
        assert exit.value.code == 2 and f"unrecognized arguments: {dashed}" in capsys.readouterr().err


def test_the_tortures_probe_counts_the_same_lag_with_one_consumer_kept(group_at_known_position):
    from onceflow_dev.torture.command import _LagProbe

    bootstrap, topic, group = group_at_known_position
    probe = _LagProbe(bootstrap, group, topic, 3)
    try:
        assert probe.committed_offsets() == [20, 20, 0]
        assert probe.read() == (40, 60)
        assert probe.read() == (40, 60)  # sampled again with the same consumer
    finally:
        probe.close()
