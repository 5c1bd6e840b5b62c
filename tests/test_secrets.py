"""No secret given on the command line, in a Kafka properties file or in a URL shows
up in a log line, an error, the summary or the metrics; PostgreSQL passwords can
come from libpq's environment instead of the URL."""

import json
import os
import subprocess
import sys

import pytest

from onceflow.io.kafka.config import redact
from onceflow.io.postgres import connect
from onceflow.io.sinks import parse_sink_url
from onceflow.pipelines.aggregate import main
from tests.livejob import new_topic, produce, sample_lines

PLANTED = "planted-s3cr3t"


def run_job_logging_everything(argv, cwd):
    """The main job in a fresh process with every logger at DEBUG; (status, output)."""
    code = ("import logging, sys; logging.basicConfig(level=logging.DEBUG); "
            "from onceflow.pipelines.aggregate import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_a_run_with_planted_secrets_shows_none_of_them(kafka_bootstrap, postgres_dsn, tmp_path):
    topic, dlq_topic = new_topic(kafka_bootstrap), new_topic(kafka_bootstrap, partitions=1)
    produce(topic, [(n % 3, line, None) for n, line in enumerate(sample_lines())])
    properties = tmp_path / "client.properties"
    properties.write_text(f"# secured cluster\nsasl.username=reader\nsasl.password={PLANTED}-file\n")
    sink = postgres_dsn.replace("postgresql://onceflow@", f"postgresql://onceflow:{PLANTED}-url@")
    metrics_out = tmp_path / "metrics.json"
    status, output = run_job_logging_everything([
        f"--input={topic.url}", "--from=earliest", "--to=latest",
        f"--kafka_setting=sasl.oauthbearer.config=principal={PLANTED}-flag",
        f"--kafka_config_file={properties}", f"--sink={sink}?table=secrets_{dlq_topic.topic.replace('-', '_')}",
        f"--dlq={dlq_topic.url}", f"--metrics_out={metrics_out}", "--status=on"], tmp_path)
    assert status == 0, output[-2000:]
    # The paths that show settings ran (logged redacted), and nothing shows a secret.
    assert "'sasl.oauthbearer.config': '***'" in output and "'sasl.password': '***'" in output
    assert "onceflow:***@" in output
    assert PLANTED not in output
    assert PLANTED not in metrics_out.read_text()


# A wrong flag exits 2 ("aggregate: error: ..."); a server that does not answer is a
# service down and exits 1 ("aggregate: --sink: ...").
WRONG, DOWN = (2, "aggregate: error: "), (1, "aggregate: --")


@pytest.mark.parametrize("flag, expected", [
    ("--sink=postgresql://onceflow@127.0.0.1:15432/onceflow?password=" + PLANTED, WRONG),
    ("--sink=postgresql://onceflow@127.0.0.1:15432/onceflow?sslpassword=" + PLANTED, WRONG),
    ("--sink=postgresql://onceflow:" + PLANTED + "@127.0.0.1:1/onceflow", DOWN),
    ("--dlq=postgresql://onceflow:" + PLANTED + "@127.0.0.1:1/onceflow", DOWN),
    ("--dlq=postgresql://onceflow@127.0.0.1:1/onceflow?table=t&passfile=" + PLANTED, WRONG),  # no such file
    ("--kafka_setting=" + PLANTED, WRONG),
])
def test_an_error_is_one_line_without_the_secret(flag, expected, capsys, few_database_retries):
    status, prefix = expected
    assert main([flag, "--status=off"]) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err
    assert PLANTED not in err[0]


@pytest.mark.kafka
def test_a_setting_the_kafka_client_refuses_is_one_line_without_the_secret(kafka_bootstrap, capsys):
    topic = new_topic(kafka_bootstrap, partitions=1)
    assert main([f"--input={topic.url}", "--to=latest", f"--kafka_setting=ssl.key.password={PLANTED}",
                 "--kafka_setting=no.such.setting=1", "--status=off"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no.such.setting" in err[0], err
    assert PLANTED not in err[0]


def test_settings_holding_secrets_are_redacted():
    settings = {"sasl.oauthbearer.config": f"principal={PLANTED}", "sasl.oauthbearer.client.secret": PLANTED,
                "ssl.key.password": PLANTED, "sasl.password": PLANTED, "security.protocol": "SASL_SSL"}
    shown = redact(settings)
    assert PLANTED not in json.dumps(shown)
    assert shown["security.protocol"] == "SASL_SSL"


@pytest.mark.postgres
@pytest.mark.parametrize("source", ["PGPASSWORD", "PGPASSFILE", "PGSERVICEFILE"])
def test_a_postgres_password_from_libpq_environment_reaches_the_connection(source, postgres_dsn, tmp_path,
                                                                            monkeypatch):
    """The sink URL holds no password; libpq's environment gives it. (The dev
    cluster trusts local connections, so the check is the password the client
    resolved and would send, not a rejected login.)"""
    target = parse_sink_url(postgres_dsn + "?table=anything")
    if source == "PGPASSWORD":
        monkeypatch.setenv("PGPASSWORD", PLANTED)
    elif source == "PGPASSFILE":
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"127.0.0.1:*:onceflow:onceflow:{PLANTED}\n")
        passfile.chmod(0o600)
        monkeypatch.setenv("PGPASSFILE", str(passfile))
    else:
        services = tmp_path / "pg_service.conf"
        services.write_text(f"[onceflow-sink]\npassword={PLANTED}\n")
        monkeypatch.setenv("PGSERVICEFILE", str(services))
        monkeypatch.setenv("PGSERVICE", "onceflow-sink")
    with connect(target.location, "onceflow-secrets-test") as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
        assert connection.info.password == PLANTED
