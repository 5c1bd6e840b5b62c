"""Kafka client settings: the properties file, and the settings that would silently
break the reader's or writer's guarantees, refused with a one-line reason."""

import pytest

from onceflow.io.kafka.config import (GUARDED_SETTINGS, KafkaReadConfig, KafkaTopic, client_settings_from_flags,
                                      parse_kafka_url, read_properties_file)
from onceflow.pipelines import archive
from onceflow.pipelines.aggregate import main
from tests.livejob import new_topic, produce, sample_lines

REFUSED = [
    ("enable.auto.commit", "true", "auto-commit would commit records not yet aggregated"),
    ("enable.auto.offset.store", "true", "stores offsets itself"),
    ("isolation.level", "read_uncommitted", "aborted transactions"),
    ("enable.partition.eof", "true", "by offsets"),
    ("auto.offset.reset", "latest", "--from"),
    ("group.id", "other", "--kafka_group"),
    ("bootstrap.servers", "10.0.0.1:9092", "kafka://HOST:PORT/TOPIC"),
    ("enable.idempotence", "false", "neither duplicate nor reorder"),
    ("acks", "1", "every in-sync replica"),
]


@pytest.fixture(scope="module")
def sample_topic(kafka_bootstrap):
    topic = new_topic(kafka_bootstrap)
    produce(topic, [(n % 3, line, None) for n, line in enumerate(sample_lines())])
    return topic


@pytest.mark.kafka
@pytest.mark.parametrize("name,value,why", REFUSED)
def test_the_job_refuses_a_setting_that_would_override_a_guarantee(name, value, why, sample_topic, tmp_path,
                                                                     capsys):
    flags = [f"--input={sample_topic.url}", "--to=latest", f"--sink=sqlite:///{tmp_path}/out.db",
             f"--dlq={tmp_path}/dlq.jsonl", "--status=off"]
    assert main([*flags, f"--kafka_setting={name}={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"aggregate: error: --kafka_setting: {name} "), err
    assert why in err[0]
    assert not (tmp_path / "out.db").exists()  # refused before anything ran
    properties = tmp_path / "client.properties"
    properties.write_text(f"{name} = {value}\n")
    assert main([*flags, f"--kafka_config_file={properties}"]) == 2
    assert f"--kafka_config_file: {name} " in capsys.readouterr().err


@pytest.mark.kafka
def test_the_archive_job_refuses_them_too(sample_topic, tmp_path, capsys):
    assert archive.main([f"--input={sample_topic.url}", f"--output={tmp_path}/a",
                         "--kafka_setting=enable.auto.commit=true"]) == 2
    assert "enable.auto.commit must stay false" in capsys.readouterr().err


@pytest.mark.kafka
def test_a_group_given_to_a_backfill_is_noted(sample_topic, tmp_path, capsys):
    """A backfill took --kafka_group without a word, commits nothing to it, and a
    `onceflow lag` of the group then found no such group."""
    assert main([f"--input={sample_topic.url}", "--to=latest", "--kafka_group=unused", "--status=off",
                 f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl"]) == 0
    assert ("aggregate: note: --kafka_group is for live jobs: a backfill (--to) reads without a consumer group and "
            "commits no offsets to it") in capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("name", sorted(GUARDED_SETTINGS))
def test_a_read_config_refuses_them_for_library_users(name):
    with pytest.raises(ValueError, match=name):
        KafkaReadConfig(KafkaTopic("127.0.0.1:9092", "t"), group_id="g", client_settings={name: "x"})


@pytest.mark.parametrize("name, value, canonical", [("metadata.broker.list", "127.0.0.1:19092", "bootstrap.servers"),
                                                     ("request.required.acks", "0", "acks")])
def test_librdkafkas_other_names_for_them_are_refused_too(name, value, canonical):
    """A job given metadata.broker.list read another broker than its URL names;
    request.required.acks=0 started and failed at its first dead letter."""
    with pytest.raises(ValueError, match=f"{name} \\(librdkafka's other name for {canonical}\\)"):
        KafkaReadConfig(KafkaTopic("127.0.0.1:9092", "t"), group_id="g", client_settings={name: value})


@pytest.mark.parametrize("url", ["kafka://reader:SecretInUrl@127.0.0.1:19094/orders",
                                 "kafka://reader:SecretInUrl@a:1,b:2/orders"])
def test_credentials_in_a_kafka_url_are_refused_without_being_shown(url):
    """They were echoed whole: "--input: 'kafka://reader:SecretInUrl@...': the
    broker address must be HOST:PORT"."""
    with pytest.raises(ValueError, match="a kafka:// URL holds no user or password; give them in "
                                         "--kafka_config_file") as error:
        parse_kafka_url(url)
    assert "SecretInUrl" not in str(error.value) and "reader:***@" in str(error.value)


def test_a_tls_file_that_is_not_there_is_named(tmp_path):
    """librdkafka said "ssl.key.location failed: error:0A080002:SSL routines::system lib"."""
    with pytest.raises(ValueError, match=f"--kafka_setting: ssl.key.location: {tmp_path}/gone.key does not exist"):
        client_settings_from_flags((f"ssl.key.location={tmp_path}/gone.key",), None)
    (tmp_path / "ca.pem").write_text("")
    assert client_settings_from_flags((f"ssl.ca.location={tmp_path}/ca.pem", "ssl.ca.location=probe"), None)


def test_the_values_the_reader_sets_itself_are_accepted():
    settings = {"enable.auto.commit": "false", "isolation.level": "read_committed", "acks": "all",
                "enable.idempotence": "true"}
    assert client_settings_from_flags(tuple(f"{k}={v}" for k, v in settings.items()), None) == settings
    consumer = KafkaReadConfig(KafkaTopic("127.0.0.1:9092", "t"), group_id="g").consumer_settings()
    assert consumer["enable.auto.commit"] == "false" and consumer["isolation.level"] == "read_committed"


def test_a_properties_file_in_kafkas_format(tmp_path):
    path = tmp_path / "client.properties"
    path.write_text(
        "# a comment\n"
        "! another comment\n"
        "\n"
        "security.protocol=SASL_SSL\n"
        "  sasl.mechanism : PLAIN\n"
        "sasl.username reader\n"
        "sasl.password=p\\=q\\\\r\n"
        "ssl.ca.location=/etc/ssl/a\\\n"
        "    b.pem\n"
        "client.id=\n")
    assert read_properties_file(str(path)) == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": "reader",
        "sasl.password": "p=q\\r", "ssl.ca.location": "/etc/ssl/ab.pem", "client.id": ""}


def test_a_properties_file_saved_with_a_byte_order_mark(tmp_path):
    """The mark became part of the first name: 'No such configuration property:
    "security.protocol"', the mark invisible in the message."""
    path = tmp_path / "client.properties"
    path.write_bytes("security.protocol=SASL_SSL\n".encode("utf-8-sig"))
    assert read_properties_file(str(path)) == {"security.protocol": "SASL_SSL"}


@pytest.mark.parametrize("pair, message", [
    # It quoted a description as the value: "'a value with no '='' is not NAME=VALUE".
    ("s3cret-token", "--kafka_setting: a setting has no '=': write NAME=VALUE"),
    ("=s3cret-token", "--kafka_setting: a setting has no name before '=': write NAME=VALUE"),
])
def test_a_setting_that_is_not_name_value_is_said_without_its_text(pair, message):
    with pytest.raises(ValueError) as caught:
        client_settings_from_flags((pair,), None)
    assert str(caught.value).startswith(message) and "s3cret" not in str(caught.value)


def test_the_command_line_wins_over_the_file(tmp_path):
    path = tmp_path / "client.properties"
    path.write_text("client.id=from-file\nsocket.timeout.ms=1000\n")
    assert client_settings_from_flags(("client.id=from-flag",), str(path)) == {
        "client.id": "from-flag", "socket.timeout.ms": "1000"}


@pytest.mark.parametrize("content,message", [
    (None, "cannot read"),
    ("=secret-value\n", "client.properties:1: a line with no setting name"),
])
def test_a_bad_properties_file_is_one_line_without_values(tmp_path, content, message, capsys):
    path = tmp_path / "client.properties"
    if content is not None:
        path.write_text(content)
    assert main([f"--kafka_config_file={path}", "--status=off"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "secret-value" not in err[0], err


def test_a_kafka_url_scheme_in_capitals_is_a_kafka_url():
    """`--input KAFKA://...` was taken for a file path: Beam's 'Unable to get filesystem' message."""
    from onceflow.io.kafka.config import is_kafka_url, parse_kafka_url

    assert is_kafka_url("KAFKA://127.0.0.1:9092/orders") and is_kafka_url("kafka://127.0.0.1:9092/orders")
    assert not is_kafka_url("kafka:/orders") and not is_kafka_url("kafkas://h:1/t")
    assert parse_kafka_url("Kafka://127.0.0.1:9092/orders").topic == "orders"


@pytest.mark.parametrize("port", ["0", "99999"])
def test_a_broker_port_out_of_range_is_named(port):
    """It was tried: "cannot reach Kafka at 127.0.0.1:99999"."""
    from onceflow.io.kafka.config import parse_kafka_url

    with pytest.raises(ValueError, match=f"{port} is not a port \\(1 to 65535\\)"):
        parse_kafka_url(f"kafka://127.0.0.1:{port}/orders")
