"""Unit tests of the pure parts of onceflow_dev.devstack (no services needed)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET

import pytest

from onceflow import cli
from onceflow_dev import devstack
from onceflow_dev.devstack import common, kafka, maven
from onceflow.errors import ServiceError, UsageError


@pytest.fixture()
def listening_port():
    """A port with a live listener on 127.0.0.1."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    yield server.getsockname()[1]
    server.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_port_in_use_sees_a_listener(listening_port):
    assert common.port_in_use(listening_port)


def test_port_in_use_sees_a_free_port():
    assert not common.port_in_use(_free_port())


def test_port_in_use_sees_a_wildcard_listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("0.0.0.0", 0))
    server.listen(1)
    try:
        assert common.port_in_use(server.getsockname()[1])
    finally:
        server.close()


def test_require_free_ports_names_the_variable(listening_port):
    with pytest.raises(ServiceError, match=f"port {listening_port} .*ONCEFLOW_TEST_PORT"):
        common.require_free_ports("Test", {"ONCEFLOW_TEST_PORT": listening_port})


def test_env_port(monkeypatch):
    monkeypatch.delenv("ONCEFLOW_TEST_PORT", raising=False)
    assert common.env_port("ONCEFLOW_TEST_PORT", 1234) == 1234
    monkeypatch.setenv("ONCEFLOW_TEST_PORT", "4321")
    assert common.env_port("ONCEFLOW_TEST_PORT", 1234) == 4321
    for bad in ("abc", "0", "70000"):
        monkeypatch.setenv("ONCEFLOW_TEST_PORT", bad)
        with pytest.raises(ServiceError, match="ONCEFLOW_TEST_PORT"):
            common.env_port("ONCEFLOW_TEST_PORT", 1234)


def test_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ONCEFLOW_HOME", str(tmp_path / "h"))
    assert common.home() == (tmp_path / "h").resolve()
    monkeypatch.delenv("ONCEFLOW_HOME")
    monkeypatch.chdir(tmp_path)
    assert common.home() == tmp_path.resolve() / ".onceflow"


def test_pid_file_round_trip(tmp_path):
    pid_file = tmp_path / "x" / "svc.pid"
    assert common.read_pid(pid_file) is None
    common.write_pid(pid_file, 4242)
    assert common.read_pid(pid_file) == 4242
    pid_file.write_text("garbage\n")
    assert common.read_pid(pid_file) is None


def test_running_pid_checks_the_marker_and_drops_stale_files(tmp_path):
    pid_file = tmp_path / "me.pid"
    common.write_pid(pid_file, os.getpid())
    # Our own command line contains the interpreter's path, not this marker.
    assert common.running_pid(pid_file, "no-such-marker-in-cmdline") is None
    assert not pid_file.exists(), "a pid file of someone else's process is stale"
    common.write_pid(pid_file, os.getpid())
    kept = tmp_path / "server-owned.pid"
    common.write_pid(kept, os.getpid())
    assert common.running_pid(kept, "no-such-marker", remove_stale=False) is None
    assert kept.exists()


def test_stop_process_stops_only_a_matching_process(tmp_path):
    marker = str(tmp_path / "marker-arg")
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; time.sleep(600)", marker],
        start_new_session=True,
    )
    try:
        common.wait_until(lambda: common.process_matches(process.pid, marker), 10, "exec")
        pid_file = tmp_path / "sleeper.pid"
        common.write_pid(pid_file, process.pid)
        assert common.running_pid(pid_file, marker) == process.pid
        common.stop_process(process.pid, "some-other-marker", timeout=1)
        assert process.poll() is None, "a process without our marker must not be signalled"
        common.stop_process(process.pid, marker, timeout=10)
        assert process.wait(timeout=10) != 0
        assert common.running_pid(pid_file, marker) is None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_wait_until_times_out_with_the_log_tail(tmp_path, capsys):
    log = tmp_path / "svc.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    with pytest.raises(ServiceError, match=r"timed out .* waiting for nothing.*svc\.log"):
        common.wait_until(lambda: False, 0.3, "nothing", log=log)
    err = capsys.readouterr().err
    assert "line 99" in err and "line 10\n" not in err


def test_wait_until_stops_early_when_the_process_died():
    with pytest.raises(ServiceError, match="the process exited"):
        common.wait_until(lambda: False, 60, "something", alive=lambda: False)


def test_require_tool_says_what_to_do():
    with pytest.raises(ServiceError, match="'no-such-tool-xyz' is not installed.*do this"):
        common.require_tool("no-such-tool-xyz", "do this")


def test_parse_services():
    assert devstack.parse_services(None) == ["kafka", "postgres"]
    assert devstack.parse_services("flink, kafka,flink") == ["flink", "kafka"]
    assert devstack.parse_services("", default=devstack.SERVICES) == list(devstack.SERVICES)
    with pytest.raises(UsageError, match="unknown service 'kafak'"):
        devstack.parse_services("kafak")


def test_prism_is_built_while_the_other_services_start(monkeypatch):
    """Stand-in up() functions (no service is started): Prism's build waits for
    PostgreSQL's start, so it only ends when the two run at once; the names come
    back in the order given, and a failed build is raised."""
    postgres_started = threading.Event()

    def build_prism():
        return postgres_started.wait(timeout=30)  # False, so "not built", if they ran one after the other

    def start_postgres():
        postgres_started.set()
        return True

    monkeypatch.setattr(devstack.prism, "up", build_prism)
    monkeypatch.setattr(devstack.postgres, "up", start_postgres)
    monkeypatch.setattr(devstack.kafka, "up", lambda secure=None: False)  # already up
    assert devstack.ensure_up(["prism", "kafka", "postgres"]) == ["prism", "postgres"]

    def failed_build():
        raise ServiceError("building prism failed")

    monkeypatch.setattr(devstack.prism, "up", failed_build)
    with pytest.raises(ServiceError, match="building prism failed"):
        devstack.ensure_up(["postgres", "prism"])


def test_pom_lists_the_dependencies():
    pom = maven.pom_xml("x", ["org.apache.kafka:kafka_2.13:4.1.1", "a.b:c:1"])
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    deps = ET.fromstring(pom).findall("m:dependencies/m:dependency", ns)
    found = [
        ":".join(dep.find(f"m:{field}", ns).text for field in ("groupId", "artifactId", "version"))
        for dep in deps
    ]
    assert found == ["org.apache.kafka:kafka_2.13:4.1.1", "a.b:c:1"]


def test_server_properties_bind_loopback_only(tmp_path):
    props = dict(
        line.split("=", 1)
        for line in kafka.server_properties(tmp_path, 1111, 2222).splitlines()
        if line and not line.startswith("#")
    )
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:1111,CONTROLLER://127.0.0.1:2222"
    assert props["process.roles"] == "broker,controller"
    assert props["log.dirs"] == str(tmp_path)


def test_status_json_shape_with_nothing_running(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ONCEFLOW_HOME", str(tmp_path))
    assert cli.main(["dev", "status", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"kafka", "postgres", "prism", "flink", "flink-cluster", "kafka-expansion"}
    assert all(service["healthy"] is False for service in info.values())
    assert info["kafka"]["bootstrap_servers"].startswith("127.0.0.1:")
    assert info["postgres"]["dsn"].startswith("postgresql://onceflow@127.0.0.1:")
    assert info["postgres"]["dsn"].endswith("/onceflow")
    assert info["prism"]["path"].startswith(str(tmp_path)) and info["prism"]["exists"] is False
    assert info["flink"]["job_endpoint"].startswith("127.0.0.1:")
    assert devstack.prism_location() is None


def test_status_exit_code_when_a_named_service_is_down(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ONCEFLOW_HOME", str(tmp_path))
    assert cli.main(["dev", "status", "--services", "kafka"]) == 1
    assert "kafka" in capsys.readouterr().out


def test_down_with_nothing_running_is_a_no_op(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ONCEFLOW_HOME", str(tmp_path))
    assert cli.main(["dev", "down"]) == 0
    assert "nothing was running" in capsys.readouterr().out
    assert not pathlib.Path(tmp_path, "kafka").exists()


def test_server_properties_with_the_secured_listeners(tmp_path, monkeypatch):
    from onceflow_dev.devstack import kafka_secure

    monkeypatch.setenv("ONCEFLOW_KAFKA_SASL_PORT", "3333")
    monkeypatch.setenv("ONCEFLOW_KAFKA_MTLS_PORT", "4444")
    material = kafka_secure.Material(tmp_path / "secure")
    props = dict(
        line.split("=", 1)
        for line in kafka.server_properties(tmp_path, 1111, 2222, material).splitlines()
        if line and not line.startswith("#")
    )
    assert props["listeners"] == ("PLAINTEXT://127.0.0.1:1111,SASL_SSL://127.0.0.1:3333,MTLS://127.0.0.1:4444,"
                                  "CONTROLLER://127.0.0.1:2222")
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:1111,SASL_SSL://127.0.0.1:3333,MTLS://127.0.0.1:4444"
    assert props["listener.security.protocol.map"] == ("CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,"
                                                       "MTLS:SSL")
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert props["listener.name.sasl_ssl.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["listener.name.mtls.ssl.client.auth"] == "required"
    assert props["ssl.keystore.location"] == str(material.broker_keystore)


def test_the_secured_material_is_made_once_with_openssl(tmp_path):
    import subprocess

    from onceflow_dev.devstack import kafka_secure

    material = kafka_secure.prepare(tmp_path / "secure")
    assert material.complete() and material.password()
    for certificate in (material.broker_keystore, material.client_certificate):
        verified = subprocess.run(["openssl", "verify", "-CAfile", str(material.ca_file), str(certificate)],
                                  capture_output=True, text=True)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    names = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                            str(material.broker_keystore)], capture_output=True, text=True).stdout
    assert "IP Address:127.0.0.1" in names and "DNS:localhost" in names
    before = (material.ca_file.read_bytes(), material.password())
    kafka_secure.prepare(tmp_path / "secure")  # kept, not made again
    assert (material.ca_file.read_bytes(), material.password()) == before
    assert f"sasl.password={material.password()}" in material.sasl_properties.read_text()


def test_status_lines_name_every_service_in_one_column():
    """kafka-expansion showed no address, and the longer names pushed their rows out of line."""
    from onceflow_dev.devstack.command import _describe

    lines = [_describe("kafka-expansion", {"healthy": True, "address": "127.0.0.1:18096", "beam_java_version": "2.62.0",
                                           "pid": 7}),
             _describe("flink-cluster", {"healthy": False, "rest_url": "http://127.0.0.1:18081",
                                         "flink_version": "1.19.0", "slots": 2}),
             _describe("prism", {"healthy": True, "exists": True, "path": "/p/prism"})]
    assert lines[0] == "kafka-expansion up         127.0.0.1:18096  (Beam 2.62.0 Kafka expansion service)  pid 7"
    assert {line.index(state) for line, state in zip(lines, ("up", "down", "ready"))} == {16}
