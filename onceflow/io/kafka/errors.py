"""The errors of talking to Kafka: the exceptions every caller catches, and why a
client could not connect, in one line naming the setting to fix.

:class:`BrokerUnreachable` (the broker did not answer in time) and its subclass
:class:`BrokerRefused` (it answered and refused the client: retrying will not
help), :class:`UnknownGroupOrTopic` (the broker answered: no such topic or
consumer group) are raised by :mod:`onceflow.io.kafka.admin` and the readers;
each carries one line for people, secret values scrubbed.

librdkafka reports a refused login or an untrusted certificate only through its
error callback, and keeps retrying; the call that waited (a metadata request)
then fails with a bare "Broker transport failure". :class:`ClientErrors` is an
``error_cb`` that remembers what the client said, and
:meth:`ClientErrors.security_problem` turns it into one line such as
``SASL authentication failed (invalid credentials, SCRAM-SHA-512): check
sasl.username and sasl.password``. Secret values never appear in it.
"""

from __future__ import annotations

import logging
import re
from typing import Any, List, Mapping, Optional

# "sasl_ssl://127.0.0.1:19094/bootstrap: " before, "(after 3ms in state X)" after.
_BROKER_PREFIX = re.compile(r"^\s*[a-z_]+://[^ ]+?: ")
_AFTER_STATE = re.compile(r"\s*\(after \d+ms in state [A-Z_]+(, \d+ identical error\(s\) suppressed)?\)\s*$")
_SETTINGS_HINT = "(in --kafka_config_file or --kafka_setting)"


class BrokerUnreachable(RuntimeError):
    """The broker did not answer in time (it may be restarting)."""


class BrokerRefused(BrokerUnreachable):
    """The broker answered and refused the client (a login or certificate problem):
    trying again will not help."""


class UnknownGroupOrTopic(RuntimeError):
    """The broker answered: the topic (or the consumer group) does not exist."""


class TopicReplaced(RuntimeError):
    """The topic a live read reads was deleted and created again under it: its
    offsets started over, and reading on would skip or mix records."""


class ClientErrors:
    """An ``error_cb`` that records the client's errors and logs each at most once
    (librdkafka repeats a failing connection's error on every retry)."""

    def __init__(self, logger: Optional[logging.Logger] = None):
        self.seen: List[Any] = []
        self._logger = logger
        self._logged: set = set()

    def __call__(self, error) -> None:
        self.seen.append(error)
        if self._logger is not None:
            text = clean_error_text(error.str())
            if text not in self._logged:
                self._logged.add(text)
                self._logger.warning("Kafka client: %s", text)

    def security_problem(self, client=None, settings: Optional[Mapping[str, str]] = None) -> Optional[str]:
        """One line naming the setting to fix when the client was refused for a
        security reason (SASL, TLS), else None. ``client`` (a Consumer, Producer or
        AdminClient) is polled briefly first: librdkafka hands errors to the
        callback only when the client is polled."""
        if client is not None:
            try:
                client.poll(0.1)
            except Exception:  # a closed client, or one that cannot poll: what was seen stays
                pass
        for error in self.seen:
            line = describe_security_error(error)
            if line is not None:
                return _scrub(line, settings or {})
        return None


def clean_error_text(text: str) -> str:
    """A client error's text without the broker's name and the connection state,
    so that one failure repeated on every retry reads the same."""
    return _AFTER_STATE.sub("", _BROKER_PREFIX.sub("", str(text))).strip()


def _scrub(text: str, settings: Mapping[str, str]) -> str:
    from onceflow.io.kafka.config import scrub_secrets

    return scrub_secrets(text, settings)


def describe_security_error(error) -> Optional[str]:
    """The setting to fix for one librdkafka error, or None when it is not about
    security (a broker that is down, a timeout)."""
    name = error.name() if hasattr(error, "name") else ""
    text = clean_error_text(error.str() if hasattr(error, "str") else str(error))
    lowered = text.lower()
    if name == "_AUTHENTICATION":
        if "invalid credentials" in lowered:
            mechanism = re.search(r"mechanism (\S+)", text)
            how = f", {mechanism.group(1)}" if mechanism else ""
            return (f"SASL authentication failed (invalid credentials{how}): check sasl.username and "
                    f"sasl.password {_SETTINGS_HINT}")
        if "unsupported sasl mechanism" in lowered:
            offered = re.search(r"supported mechanisms: (.+)$", text)
            supported = f" (the broker offers {offered.group(1)})" if offered else ""
            return f"the broker does not accept this SASL mechanism{supported}: check sasl.mechanism {_SETTINGS_HINT}"
        return f"SASL authentication failed ({text}): check sasl.mechanism, sasl.username and sasl.password"
    if name == "_SSL" or "ssl handshake failed" in lowered:
        if "certificate verify failed" in lowered or "could not be verified" in lowered:
            if "hostname" in lowered or "ip address mismatch" in lowered:
                return ("the broker's TLS certificate does not name the host in the broker address: use the "
                        "address it was issued for, or check ssl.endpoint.identification.algorithm "
                        f"{_SETTINGS_HINT}")
            return ("the broker's TLS certificate is not trusted: check ssl.ca.location (it must hold the CA "
                    f"that signed the broker's certificate) {_SETTINGS_HINT}")
        return f"the TLS handshake with the broker failed ({text}): check security.protocol and the ssl.* settings"
    alert = next((alert for alert in _CLIENT_CERTIFICATE_ALERTS if alert in lowered), None)
    if alert is not None:
        return (f"the broker refused the TLS client certificate ({alert}): check ssl.certificate.location and "
                f"ssl.key.location (a certificate signed by a CA the broker trusts, not expired) {_SETTINGS_HINT}")
    return None


# The TLS alerts a broker sends about the client's certificate (RFC 8446, 6.2).
_CLIENT_CERTIFICATE_ALERTS = ("bad certificate", "certificate required", "unknown ca", "certificate unknown",
                              "certificate expired", "certificate revoked", "unsupported certificate")

# What "cannot reach the broker" may also be: a client whose security.protocol does not fit
# the listener at that address is disconnected without a reason librdkafka reports.
BROKER_UP_HINT = "is the broker up, and does security.protocol fit its listener?"


def is_broker_away(error: BaseException) -> bool:
    """Whether a client call failed because a broker or partition leader is away
    for now (a restart, a leader election): worth trying again, not a setting to
    fix."""
    try:
        from confluent_kafka import KafkaError, KafkaException
    except ImportError:
        return False
    if not isinstance(error, KafkaException) or not error.args or not isinstance(error.args[0], KafkaError):
        return False
    kafka_error = error.args[0]
    away = {KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN,
            KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError._WAIT_COORD,
            KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR, KafkaError.REQUEST_TIMED_OUT}
    return kafka_error.code() in away or bool(kafka_error.retriable())
