"""``onceflow lag`` against the real local broker, at known committed offsets."""

import json
import subprocess
import sys
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


def test_a_setting_naming_other_brokers_or_another_group_is_refused(capsys, tmp_path):
    """It was overridden quietly by the flag; the same value is fine (a properties
    file shared with the job may hold it). Nothing reaches the broker."""
    status, out, err = lag(capsys, "--bootstrap-server", "127.0.0.1:9", "--group", "g",
                           "--kafka_setting", "bootstrap.servers=10.0.0.1:9092")
    assert (status, out) == (2, "")
    assert err.strip() == ("onceflow lag: error: the client setting bootstrap.servers=10.0.0.1:9092 is not "
                           "--bootstrap-server 127.0.0.1:9: give it with --bootstrap-server alone")
    properties = tmp_path / "client.properties"
    properties.write_text("group.id=other\n")
    status, out, err = lag(capsys, "--bootstrap-server", "127.0.0.1:9", "--group", "g",
                           "--kafka_config_file", str(properties))
    assert (status, out) == (2, "") and "the client setting group.id=other is not --group g" in err
    status, out, err = lag(capsys, "--bootstrap-server", "127.0.0.1:9", "--group", "g", "--timeout", "1",
                           "--kafka_setting", "bootstrap.servers=127.0.0.1:9")
    assert status == 3 and "127.0.0.1:9" in err  # the same broker: on to the broker, which is not there


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


# -- wrong flags: one line and status 2, before any broker is asked (no broker needed) --------


def _lag_process(*args: str) -> subprocess.CompletedProcess:
    """``onceflow lag`` in its own process: a hang fails the test instead of stopping it."""
    return subprocess.run([sys.executable, "-m", "onceflow.cli", "lag", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("value, message", [
    ("-1", "'-1' must be a number of seconds above 0, e.g. --timeout=10"),  # the client waited forever
    ("0", "'0' must be a number of seconds above 0, e.g. --timeout=10"),
    ("nan", "'nan' must be a number of seconds above 0, e.g. --timeout=10"),
    ("inf", "'inf' must be a number of seconds above 0, e.g. --timeout=10"),
    ("1e9", "'1e9' is more than 3600 seconds (an hour); give at most --timeout=3600"),
    ("soon", "'soon' is not a number of seconds; e.g. --timeout=10 or --timeout=500ms"),
])
def test_a_timeout_that_is_not_a_positive_duration_is_refused_in_one_line(value, message):
    result = _lag_process("--bootstrap-server=127.0.0.1:1", "--group=g", f"--timeout={value}")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"onceflow lag: error: argument --timeout: {message}; see onceflow lag --help"]
    assert "Traceback" not in result.stderr


def test_a_timeout_takes_seconds_or_a_duration_up_to_an_hour():
    from onceflow.cli.lag import _timeout_seconds

    assert [_timeout_seconds(text) for text in ("10", "2.5", "500ms", "2m", "3600")] == [10, 2.5, 0.5, 120, 3600]


def test_a_setting_the_kafka_client_refuses_is_one_line_as_the_job_says_it(capsys):
    status, out, err = lag(capsys, "--bootstrap-server", "127.0.0.1:1", "--group", "g", "--kafka_setting", "bogus=1")
    assert (status, out) == (2, "") and len(err.strip().splitlines()) == 1
    assert err.startswith('onceflow lag: error: the Kafka client refused the settings: No such configuration '
                          'property: "bogus"; check --kafka_setting and --kafka_config_file')
    # the job's helper: a secret's value is scrubbed even where the client repeats it
    status, out, err = lag(capsys, "--bootstrap-server", "127.0.0.1:1", "--group", "g",
                           "--kafka_setting", "sasl.password=hunter2", "--kafka_setting", "security.protocol=hunter2")
    assert status == 2 and "hunter2" not in err and 'Invalid value "***"' in err


@pytest.mark.parametrize("servers", ["127.0.0.1", "", "broker-1:9092,broker-2", "127.0.0.1:9092/orders"])
def test_a_bootstrap_server_without_a_port_is_refused_before_connecting(servers, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["lag", f"--bootstrap-server={servers}", "--group", "g"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    assert err.splitlines() == [f"onceflow lag: error: argument --bootstrap-server: {servers!r} is not HOST:PORT "
                                "(comma-separated for several brokers), e.g. 127.0.0.1:9092; see onceflow lag --help"]


def test_the_bootstrap_servers_are_checked_as_the_jobs_kafka_urls():
    from onceflow.cli.lag import _bootstrap_servers

    for servers in ("127.0.0.1:9092", "broker-1:9092,broker-2:9093", "[::1]:9092"):
        assert _bootstrap_servers(servers) == servers


def test_an_empty_group_is_refused_in_one_line():
    result = _lag_process("--bootstrap-server=127.0.0.1:1", "--group=")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == ["onceflow lag: error: argument --group: is empty; give the job's "
                                          "consumer group, e.g. --group=onceflow-aggregate; see onceflow lag --help"]
