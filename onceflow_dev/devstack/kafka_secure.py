"""The dev broker's secured listeners (``onceflow dev up --secure``): TLS material,
throwaway credentials and ready-made client properties files.

Two listeners on 127.0.0.1 next to the plain one (which stays as it is):

* ``SASL_SSL`` (``ONCEFLOW_KAFKA_SASL_PORT``, default 19094): TLS, then SCRAM-SHA-512
  with user ``onceflow`` and a random password;
* ``MTLS`` (``ONCEFLOW_KAFKA_MTLS_PORT``, default 19095): TLS with a client
  certificate the broker requires (mutual TLS).

Everything lives under ``kafka/secure/`` of the project-local folder and is made on
the first secured start with Debian's ``openssl``: a throwaway CA (``ca.pem``), the
broker's key and certificate for ``IP:127.0.0.1`` and ``DNS:localhost`` signed by it
(``broker.pem``, read by the broker as a PEM key store), a client key and
certificate for mutual TLS, and the password (``credentials.json``, mode 0600). A
certificate due to expire within a day is made again. The SCRAM credential is
created through Kafka's admin API (``AlterUserScramCredentials``) once the broker
answers, over the plain listener, on every secured start (idempotent).

Client properties files, in Kafka's ``key=value`` format with librdkafka's setting
names (what ``--kafka_config_file`` reads): ``client-sasl.properties`` and
``client-mtls.properties``. These are dev credentials: never reuse the CA or the
password for anything else.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import subprocess
from typing import Any, Dict

from onceflow_dev.devstack.common import HOST, env_port, require_tool, run_logged
from onceflow.errors import ServiceError

USERNAME = "onceflow"
MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192
CERT_DAYS = 365
SASL_LISTENER = "SASL_SSL"
MTLS_LISTENER = "MTLS"


def sasl_port() -> int:
    return env_port("ONCEFLOW_KAFKA_SASL_PORT", 19094)


def mtls_port() -> int:
    return env_port("ONCEFLOW_KAFKA_MTLS_PORT", 19095)


def sasl_bootstrap_servers() -> str:
    return f"{HOST}:{sasl_port()}"


def mtls_bootstrap_servers() -> str:
    return f"{HOST}:{mtls_port()}"


class Material:
    """The files of the secured listeners, under ``folder`` (``kafka/secure``)."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder

    @property
    def ca_file(self) -> pathlib.Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> pathlib.Path:
        return self.folder / "ca.key"

    @property
    def broker_keystore(self) -> pathlib.Path:
        """The broker's private key (PKCS#8, unencrypted) then its certificate."""
        return self.folder / "broker.pem"

    @property
    def client_certificate(self) -> pathlib.Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> pathlib.Path:
        return self.folder / "client.key"

    @property
    def credentials_file(self) -> pathlib.Path:
        return self.folder / "credentials.json"

    @property
    def sasl_properties(self) -> pathlib.Path:
        return self.folder / "client-sasl.properties"

    @property
    def mtls_properties(self) -> pathlib.Path:
        return self.folder / "client-mtls.properties"

    @property
    def log(self) -> pathlib.Path:
        return self.folder / "openssl.log"

    def password(self) -> str | None:
        try:
            return json.loads(self.credentials_file.read_text(encoding="utf-8"))["password"]
        except (OSError, ValueError, KeyError):
            return None

    def complete(self) -> bool:
        return all(path.is_file() for path in (self.ca_file, self.broker_keystore, self.client_certificate,
                                               self.client_key, self.credentials_file))


def make_ca(folder: pathlib.Path, name: str = "onceflow dev CA", log: pathlib.Path | None = None) -> pathlib.Path:
    """A self-signed CA (``ca.pem``, ``ca.key``) in ``folder``; returns ``ca.pem``.
    Tests use it to make a CA the broker's certificate does not chain to."""
    openssl = _openssl()
    folder.mkdir(parents=True, exist_ok=True)
    log = log or folder / "openssl.log"
    run_logged([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(CERT_DAYS),
                "-subj", f"/CN={name}", "-keyout", str(folder / "ca.key"), "-out", str(folder / "ca.pem"),
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
               log, "making a throwaway CA with openssl", cwd=folder, timeout=60)
    os.chmod(folder / "ca.key", 0o600)
    return folder / "ca.pem"


def _openssl() -> str:
    return require_tool("openssl", "install OpenSSL (Debian: apt-get install -y openssl)")


def _sign(material: Material, name: str, key: pathlib.Path, certificate: pathlib.Path, extensions: str) -> None:
    """A new RSA key and a certificate for ``name`` signed by the CA."""
    openssl = _openssl()
    folder = material.folder
    csr = folder / f"{certificate.stem}.csr"
    ext = folder / f"{certificate.stem}.ext"
    ext.write_text(extensions, encoding="ascii")
    run_logged([openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(key), "-out", str(csr)],
               material.log, f"making a key for {name} with openssl", cwd=folder, timeout=60)
    os.chmod(key, 0o600)
    run_logged([openssl, "x509", "-req", "-in", str(csr), "-CA", str(material.ca_file),
                "-CAkey", str(material.ca_key), "-CAcreateserial", "-days", str(CERT_DAYS),
                "-extfile", str(ext), "-out", str(certificate)],
               material.log, f"signing the certificate of {name} with openssl", cwd=folder, timeout=60)
    csr.unlink(missing_ok=True)
    ext.unlink(missing_ok=True)


def _expires_soon(certificate: pathlib.Path) -> bool:
    completed = subprocess.run([_openssl(), "x509", "-checkend", "86400", "-noout", "-in", str(certificate)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return completed.returncode != 0


def prepare(folder: pathlib.Path) -> Material:
    """Makes (or keeps, when complete and not about to expire) the CA, the broker's
    and the client's certificates, the password and the client properties files."""
    material = Material(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if not material.complete() or _expires_soon(material.broker_keystore):
        make_ca(folder, log=material.log)
        broker_key = folder / "broker.key"
        broker_cert = folder / "broker.crt"
        _sign(material, HOST, broker_key, broker_cert,
              f"subjectAltName=IP:{HOST},DNS:localhost\nextendedKeyUsage=serverAuth\n"
              "keyUsage=critical,digitalSignature,keyEncipherment\n")
        material.broker_keystore.write_text(broker_key.read_text() + broker_cert.read_text(), encoding="ascii")
        os.chmod(material.broker_keystore, 0o600)
        broker_key.unlink()
        broker_cert.unlink()
        _sign(material, f"{USERNAME}-client", material.client_key, material.client_certificate,
              "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n")
    if material.password() is None:
        _write_private(material.credentials_file,
                       json.dumps({"username": USERNAME, "password": secrets.token_urlsafe(18)}) + "\n")
    write_client_properties(material)
    return material


def _write_private(path: pathlib.Path, text: str) -> None:
    """Writes a file only its owner can read (it holds a password or a key)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    tmp.replace(path)


def sasl_client_settings(material: Material) -> Dict[str, str]:
    """librdkafka settings for the SASL_SSL listener (no bootstrap.servers: that is
    the kafka://HOST:PORT/TOPIC URL's part)."""
    return {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": MECHANISM,
        "sasl.username": USERNAME,
        "sasl.password": material.password() or "",
        "ssl.ca.location": str(material.ca_file),
    }


def mtls_client_settings(material: Material) -> Dict[str, str]:
    """librdkafka settings for the mutual-TLS listener."""
    return {
        "security.protocol": "SSL",
        "ssl.ca.location": str(material.ca_file),
        "ssl.certificate.location": str(material.client_certificate),
        "ssl.key.location": str(material.client_key),
    }


def _properties_text(title: str, settings: Dict[str, str]) -> str:
    lines = [f"# {title}", "# Generated by onceflow dev up --secure: throwaway dev credentials.",
             "# Pass with --kafka_config_file PATH (the broker goes in kafka://HOST:PORT/TOPIC)."]
    lines += [f"{name}={_escape(value)}" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    """A properties-file value: backslashes escaped (a path never has any here)."""
    return value.replace("\\", "\\\\")


def write_client_properties(material: Material) -> None:
    _write_private(material.sasl_properties, _properties_text(
        f"onceflow dev broker, SASL_SSL listener {sasl_bootstrap_servers()} ({MECHANISM} over TLS)",
        sasl_client_settings(material)))
    _write_private(material.mtls_properties, _properties_text(
        f"onceflow dev broker, mutual-TLS listener {mtls_bootstrap_servers()}",
        mtls_client_settings(material)))


def server_properties(material: Material) -> Dict[str, str]:
    """The broker settings the secured listeners add (listeners themselves aside)."""
    jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    sasl = SASL_LISTENER.lower()
    mtls = MTLS_LISTENER.lower()
    return {
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(material.broker_keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(material.ca_file),
        f"listener.name.{sasl}.sasl.enabled.mechanisms": MECHANISM,
        f"listener.name.{sasl}.{MECHANISM.lower()}.sasl.jaas.config": jaas,
        f"listener.name.{mtls}.ssl.client.auth": "required",
        "sasl.enabled.mechanisms": MECHANISM,
    }


def create_scram_credential(plain_bootstrap: str, material: Material, timeout: float = 30.0) -> None:
    """Creates (or updates) the SCRAM-SHA-512 credential of ``onceflow`` through the
    admin API, over the plain listener."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (AdminClient, ScramCredentialInfo, ScramMechanism,
                                       UserScramCredentialUpsertion)

    password = material.password()
    if password is None:
        raise ServiceError(f"no password in {material.credentials_file}; run 'onceflow dev up --secure' again")
    admin = AdminClient({"bootstrap.servers": plain_bootstrap, "log_level": 0})
    upsert = UserScramCredentialUpsertion(
        USERNAME, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS), password.encode("utf-8"))
    try:
        admin.alter_user_scram_credentials([upsert], request_timeout=timeout)[USERNAME].result(timeout=timeout)
    except KafkaException as error:
        raise ServiceError(f"cannot create the SCRAM credential of {USERNAME!r} on {plain_bootstrap}: "
                           f"{error.args[0].str() if error.args else error}") from None


def answers(bootstrap: str, settings: Dict[str, str], timeout: float = 2.0) -> bool:
    """True when a listener answers a metadata request with ``settings``."""
    from confluent_kafka.admin import AdminClient

    client = AdminClient({**settings, "bootstrap.servers": bootstrap, "socket.timeout.ms": 1000,
                          "log_level": 0, "error_cb": lambda error: None})
    try:
        metadata = client.list_topics(timeout=timeout)
    except Exception:  # KafkaException while the listener is not ready
        return False
    return bool(metadata.brokers)


def status(material: Material, running: bool) -> Dict[str, Any]:
    """How to reach the secured listeners; ``healthy`` when both answer."""
    sasl = sasl_client_settings(material)
    mtls = mtls_client_settings(material)
    sasl_ok = running and answers(sasl_bootstrap_servers(), sasl, timeout=3.0)
    mtls_ok = running and answers(mtls_bootstrap_servers(), mtls, timeout=3.0)
    return {
        "healthy": bool(sasl_ok and mtls_ok),
        "bootstrap_servers": sasl_bootstrap_servers(),
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": MECHANISM,
        "username": USERNAME,
        "password": material.password(),
        "ca_file": str(material.ca_file),
        "client_properties": str(material.sasl_properties),
        "mtls": {
            "healthy": bool(mtls_ok),
            "bootstrap_servers": mtls_bootstrap_servers(),
            "security_protocol": "SSL",
            "ca_file": str(material.ca_file),
            "certificate_file": str(material.client_certificate),
            "key_file": str(material.client_key),
            "client_properties": str(material.mtls_properties),
        },
    }
