"""The dev broker's secured listeners (``onceflow dev up --secure``) against the real
broker: SASL_SSL with SCRAM-SHA-512, mutual TLS, and the job, ``onceflow lag`` and
``onceflow dlq`` pointed at them with the ready-made properties file; a wrong
password or an untrusted CA is one line naming the setting, in bounded time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from onceflow import cli
from onceflow_dev.devstack import kafka_secure as secure_listeners
from onceflow.io.kafka.admin import read_topic_to_end
from onceflow.io.kafka.config import KafkaTopic, read_properties_file
from onceflow.io.kafka.errors import ClientErrors
from onceflow.pipelines.aggregate import main as aggregate_main
from tests.livejob import new_topic, sample_lines, table_rows

pytestmark = [pytest.mark.kafka]

# The bundled sample's dead letters, by reason (as the plain-listener tests find them).
SAMPLE_DEAD_LETTERS = 11
ERROR_DEADLINE_S = 45  # the job and lag wait 10 s for metadata, the dlq command 30 s


def settings_of(info):
    """The client settings of the ready-made properties file."""
    return read_properties_file(info["client_properties"])


def secure_topic(info, topic):
    return KafkaTopic(info["bootstrap_servers"], topic.topic)


def produce_secure(info, topic, lines):
    producer = Producer({**settings_of(info), "bootstrap.servers": info["bootstrap_servers"],
                         "enable.idempotence": True})
    for n, line in enumerate(lines):
        producer.produce(topic.topic, value=line, key=line[:4], partition=n % 3)
    assert producer.flush(30) == 0


def test_status_json_names_the_secured_listener_and_its_ready_made_properties(kafka_secure, kafka_bootstrap,
                                                                               capsys):
    assert cli.main(["dev", "status", "--services", "kafka", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["kafka"]
    secure = info["secure"]
    assert info["bootstrap_servers"] == kafka_bootstrap  # the plain listener is unchanged
    assert secure["bootstrap_servers"] == kafka_secure["bootstrap_servers"] != kafka_bootstrap
    assert secure["security_protocol"] == "SASL_SSL" and secure["sasl_mechanism"] == "SCRAM-SHA-512"
    assert secure["username"] and secure["password"] and os.path.isfile(secure["ca_file"])
    assert "BEGIN CERTIFICATE" in open(secure["ca_file"], encoding="ascii").read()
    assert settings_of(secure) == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": secure["username"],
        "sasl.password": secure["password"], "ssl.ca.location": secure["ca_file"]}
    assert os.stat(secure["client_properties"]).st_mode & 0o077 == 0  # it holds the password

    # The properties file alone (with the address) reaches the broker the plain listener reaches.
    admin = AdminClient({**settings_of(secure), "bootstrap.servers": secure["bootstrap_servers"]})
    cluster = admin.describe_cluster().result(timeout=30)
    plain_admin = AdminClient({"bootstrap.servers": kafka_bootstrap})  # alive until the result
    assert cluster.cluster_id == plain_admin.describe_cluster().result(timeout=30).cluster_id


def test_the_secured_listener_refuses_plaintext_and_a_wrong_password(kafka_secure):
    address = kafka_secure["bootstrap_servers"]
    for settings in ({}, {**settings_of(kafka_secure), "sasl.password": "not-the-password"}):
        errors = ClientErrors()
        client = AdminClient({**settings, "bootstrap.servers": address, "log_level": 0, "error_cb": errors})
        with pytest.raises(Exception):
            client.list_topics(timeout=3)


def test_mutual_tls_listener_takes_the_client_certificate_and_refuses_a_client_without_one(kafka_secure):
    mtls = kafka_secure["mtls"]
    settings = read_properties_file(mtls["client_properties"])
    assert settings["security.protocol"] == "SSL" and settings["ssl.certificate.location"] == mtls["certificate_file"]
    admin = AdminClient({**settings, "bootstrap.servers": mtls["bootstrap_servers"]})
    assert admin.list_topics(timeout=30).brokers

    without = {"security.protocol": "SSL", "ssl.ca.location": mtls["ca_file"]}
    errors = ClientErrors()
    client = AdminClient({**without, "bootstrap.servers": mtls["bootstrap_servers"], "log_level": 0,
                          "error_cb": errors})
    with pytest.raises(Exception):
        client.list_topics(timeout=3)
    assert "ssl.certificate.location" in (errors.security_problem(client) or "")


@pytest.mark.slow
def test_a_backfill_over_sasl_ssl_reads_everything_and_writes_the_dlq_topic(kafka_secure, kafka_bootstrap,
                                                                          tmp_path, capsys):
    """Produced over SASL_SSL, read back by a bounded job with --kafka_config_file, dead
    letters written to a topic over SASL_SSL: the rows equal those of the same backfill
    over the plain listener, and `onceflow dlq` reads the secured queue."""
    topic, queue = new_topic(kafka_bootstrap), new_topic(kafka_bootstrap, partitions=1)
    produce_secure(kafka_secure, topic, sample_lines())
    props = kafka_secure["client_properties"]
    secured_db, plain_db = tmp_path / "secured.db", tmp_path / "plain.db"
    assert aggregate_main([f"--input=kafka://{kafka_secure['bootstrap_servers']}/{topic.topic}",
                           "--from=earliest", "--to=latest", f"--kafka_config_file={props}",
                           f"--sink=sqlite:///{secured_db}",
                           f"--dlq=kafka://{kafka_secure['bootstrap_servers']}/{queue.topic}", "--status=off"]) == 0
    summary = capsys.readouterr().out
    assert f"records read            {len(sample_lines()):,}" in summary, summary
    assert aggregate_main([f"--input={topic.url}", "--from=earliest", "--to=latest",
                           f"--sink=sqlite:///{plain_db}", f"--dlq={tmp_path}/plain-dlq.jsonl",
                           "--status=off"]) == 0
    capsys.readouterr()
    assert table_rows(secured_db) == table_rows(plain_db) and table_rows(secured_db)

    letters = [json.loads(value) for _, value in
               read_topic_to_end(secure_topic(kafka_secure, queue), settings_of(kafka_secure))]
    assert len(letters) == SAMPLE_DEAD_LETTERS
    assert {letter["source"]["topic"] for letter in letters} == {topic.topic}
    plain_letters = [json.loads(line) for line in open(tmp_path / "plain-dlq.jsonl", encoding="utf-8")]
    assert sorted(letter["dlq_id"] for letter in letters) == sorted(letter["dlq_id"] for letter in plain_letters)

    assert cli.main(["dlq", "count", "--dlq", f"kafka://{kafka_secure['bootstrap_servers']}/{queue.topic}",
                     "--kafka_config_file", props]) == 0
    assert f"total                      {SAMPLE_DEAD_LETTERS}" in capsys.readouterr().out


def test_lag_reads_the_group_over_sasl_ssl_with_the_properties_file(kafka_secure, kafka_bootstrap, capsys):
    topic = new_topic(kafka_bootstrap)
    produce_secure(kafka_secure, topic, [f"record {n}".encode() for n in range(30)])  # 10 a partition
    group = f"secure-lag-{uuid.uuid4().hex[:8]}"
    consumer = Consumer({**settings_of(kafka_secure), "bootstrap.servers": kafka_secure["bootstrap_servers"],
                         "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic.topic, 0, 4), TopicPartition(topic.topic, 1, 10)],
                        asynchronous=False)
    finally:
        consumer.close()
    assert cli.main(["lag", "--bootstrap-server", kafka_secure["bootstrap_servers"], "--group", group,
                     "--topic", topic.topic, "--kafka_config_file", kafka_secure["client_properties"], "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [(p["partition"], p["committed"], p["lag"]) for p in found["partitions"]] == [
        (0, 4, 6), (1, 10, 0), (2, None, 10)]
    assert found["total_lag"] == 16


def _wrong_settings(kafka_secure, tmp_path, what):
    """A copy of the ready-made properties file with a wrong password or another CA,
    or the mutual-TLS one without the client certificate; and the listener."""
    settings = settings_of(kafka_secure)
    address = kafka_secure["bootstrap_servers"]
    if what == "password":
        settings["sasl.password"] = "wrong-" + uuid.uuid4().hex
        named = ("sasl.password",)
    elif what == "ca":
        settings["ssl.ca.location"] = str(kafka_secure_ca_elsewhere(tmp_path))
        named = ("ssl.ca.location",)
    else:
        settings = {"security.protocol": "SSL", "ssl.ca.location": kafka_secure["mtls"]["ca_file"]}
        address = kafka_secure["mtls"]["bootstrap_servers"]
        named = ("ssl.certificate.location", "ssl.key.location")
    path = tmp_path / f"wrong-{what}.properties"
    path.write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    return path, settings, named, address


def kafka_secure_ca_elsewhere(tmp_path):
    """A throwaway CA that did not sign the broker's certificate."""
    return secure_listeners.make_ca(tmp_path / "other-ca", name="some other CA")


def _command(address, which, props, queue):
    if which == "job":
        return [sys.executable, "-m", "onceflow.pipelines.aggregate", f"--input=kafka://{address}/{queue}",
                "--from=earliest", "--to=latest", f"--kafka_config_file={props}", "--sink=sqlite:///unused.db",
                f"--dlq=kafka://{address}/{queue}", "--status=off"]
    if which == "lag":
        return [sys.executable, "-m", "onceflow.cli", "lag", "--bootstrap-server", address, "--group", "g",
                "--kafka_config_file", str(props)]
    return [sys.executable, "-m", "onceflow.cli", "dlq", "count", "--dlq", f"kafka://{address}/{queue}",
            "--kafka_config_file", str(props)]


@pytest.mark.slow
@pytest.mark.parametrize("which,what", [("job", "password"), ("job", "ca"), ("job", "client-certificate"),
                                        ("lag", "password"), ("lag", "ca"), ("dlq", "password")])
def test_a_wrong_password_or_an_untrusted_ca_is_one_line_naming_the_setting(kafka_secure, kafka_bootstrap,
                                                                            tmp_path, which, what):
    queue = new_topic(kafka_bootstrap, partitions=1)
    props, settings, named, address = _wrong_settings(kafka_secure, tmp_path, what)
    started = time.monotonic()
    done = subprocess.run(_command(address, which, props, queue.topic), cwd=tmp_path, capture_output=True,
                          text=True, timeout=ERROR_DEADLINE_S + 30, env=dict(os.environ), stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == {"job": 1, "lag": 3, "dlq": 1}[which], done.stderr  # a broker problem
    assert len(lines) == 1, done.stderr  # no traceback, no librdkafka log line per retry
    assert "Traceback" not in done.stderr
    assert all(name in lines[0] for name in named), lines[0]
    assert "refused the connection" in lines[0]
    assert kafka_secure["password"] not in done.stderr + done.stdout
    assert settings.get("sasl.password", kafka_secure["password"]) not in done.stderr + done.stdout
    assert elapsed < ERROR_DEADLINE_S, f"took {elapsed:.0f}s: {lines}"
    assert not (tmp_path / "unused.db").exists()


@pytest.mark.slow
@pytest.mark.prism
def test_a_live_job_on_prism_reads_and_commits_over_sasl_ssl(kafka_secure, kafka_bootstrap, prism_path, tmp_path):
    """The main job live on Prism against the secured listener, dead letters to a topic
    over SASL_SSL: it catches up with the backfill's table, commits every offset of
    its group, and `onceflow dlq` reads the secured queue."""
    import signal

    from tests.livejob import committed, counted_events, job_output, start_live_job, stop, wait_for

    topic, queue = new_topic(kafka_bootstrap), new_topic(kafka_bootstrap, partitions=1)
    lines = sample_lines()
    produce_secure(kafka_secure, topic, lines)
    backfill_db, live_db = tmp_path / "backfill.db", tmp_path / "live.db"
    assert aggregate_main([f"--input={topic.url}", "--from=earliest", "--to=latest", "--status=off",
                           f"--sink=sqlite:///{backfill_db}", f"--dlq={tmp_path}/backfill-dlq.jsonl"]) == 0
    expected_events = counted_events(backfill_db)
    group = f"g-{topic.topic}"
    secured = secure_topic(kafka_secure, topic)
    job = start_live_job(secured, group, f"sqlite:///{live_db}",
                         f"kafka://{kafka_secure['bootstrap_servers']}/{queue.topic}",
                         f"--kafka_config_file={kafka_secure['client_properties']}", "--kafka_idle_timeout=3s",
                         log_dir=tmp_path)
    try:
        wait_for(lambda: counted_events(live_db) == expected_events, "the live table to catch up", 300, job)
        # Committed through the secured listener; read back through the plain one.
        wait_for(lambda: sum(committed(topic, group)) == len(lines), "offsets committed", 120, job)
    finally:
        stop(job, signal.SIGINT)
    assert table_rows(live_db) == table_rows(backfill_db), job_output(job)
    letters = [json.loads(value) for _, value in
               read_topic_to_end(secure_topic(kafka_secure, queue), settings_of(kafka_secure))]
    assert len({letter["dlq_id"] for letter in letters}) == SAMPLE_DEAD_LETTERS
    assert kafka_secure["password"] not in job_output(job, limit=10**7)


def test_a_wrong_key_password_is_named(kafka_secure, tmp_path, capsys):
    """An encrypted client key with a wrong ssl.key.password read "ssl.key.location
    failed: error:0A080009:SSL routines::PEM lib", as if the file were wrong."""
    mtls = kafka_secure["mtls"]
    key = tmp_path / "client-encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", mtls["key_file"], "-aes256", "-passout", "pass:right-pass",
                    "-out", str(key)], check=True, capture_output=True, timeout=60)
    props = tmp_path / "mtls.properties"
    props.write_text(f"security.protocol=SSL\nssl.ca.location={mtls['ca_file']}\n"
                     f"ssl.certificate.location={mtls['certificate_file']}\nssl.key.location={key}\n"
                     "ssl.key.password=wrong-pass\n")
    assert aggregate_main([f"--input=kafka://{mtls['bootstrap_servers']}/any", "--from=earliest", "--to=latest",
                           f"--kafka_config_file={props}", f"--sink=sqlite:///{tmp_path}/unused.db",
                           "--status=off"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "wrong-pass" not in line, line
    assert "cannot read the key in ssl.key.location" in line and "a wrong ssl.key.password" in line, line
