"""What librdkafka says when it is refused, turned into one line naming the setting
(the messages below are librdkafka's own, as the dev broker's secured listener
makes it say them: see tests/devstack/test_kafka_secure.py)."""

import pytest

from onceflow.io.kafka.errors import ClientErrors, describe_security_error


class FakeError:
    def __init__(self, name, text):
        self._name, self._text = name, text

    def name(self):
        return self._name

    def str(self):
        return self._text


CASES = [
    ("_AUTHENTICATION", "sasl_ssl://127.0.0.1:19094/bootstrap: SASL authentication error: Authentication failed "
     "during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 321ms in state "
     "AUTH_REQ)", ["sasl.username", "sasl.password", "SCRAM-SHA-512"]),
    ("_AUTHENTICATION", "sasl_ssl://127.0.0.1:19094/bootstrap: SASL SCRAM-SHA-256 mechanism handshake failed: "
     "Broker: Unsupported SASL mechanism: broker's supported mechanisms: SCRAM-SHA-512 (after 302ms in state "
     "AUTH_HANDSHAKE)", ["sasl.mechanism", "the broker offers SCRAM-SHA-512"]),
    ("_SSL", "sasl_ssl://127.0.0.1:19094/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate "
     "verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured "
     "or root CA certificates are installed (install ca-certificates package) (after 4ms in state SSL_HANDSHAKE)",
     ["not trusted", "ssl.ca.location"]),
    ("_TRANSPORT", "ssl://127.0.0.1:19095/bootstrap: Receive failed: error:0A000412:SSL routines::ssl/tls alert bad "
     "certificate: SSL alert number 42 (after 0ms in state APIVERSION_QUERY)",
     ["client certificate", "ssl.certificate.location", "ssl.key.location"]),
    # A client certificate signed by the dev CA that expired the day before: it read "is the broker up?",
    # and a live job tried again for 120 s.
    ("_TRANSPORT", "ssl://127.0.0.1:19095/bootstrap: Receive failed: error:0A000416:SSL routines::ssl/tls alert "
     "certificate unknown: SSL alert number 46 (after 0ms in state APIVERSION_QUERY)",
     ["client certificate (certificate unknown)", "ssl.certificate.location", "not expired"]),
]


@pytest.mark.parametrize("name,text,expected", CASES)
def test_a_security_refusal_names_the_setting(name, text, expected):
    line = describe_security_error(FakeError(name, text))
    assert line is not None and "\n" not in line
    assert all(part in line for part in expected), line
    assert "after" not in line and "127.0.0.1" not in line  # retry timing and the broker's URL left out


@pytest.mark.parametrize("name,text", [("_ALL_BROKERS_DOWN", "1/1 brokers are down"),
                                       ("_TRANSPORT", "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: "
                                                      "Connection refused (after 0ms in state CONNECT)")])
def test_a_broker_that_is_down_is_not_a_security_problem(name, text):
    assert describe_security_error(FakeError(name, text)) is None


def test_the_first_security_error_wins_and_secret_values_are_scrubbed():
    errors = ClientErrors()
    errors(FakeError("_ALL_BROKERS_DOWN", "1/1 brokers are down"))
    errors(FakeError("_AUTHENTICATION", "SASL authentication failed: rejected s3cr3t-value"))
    line = errors.security_problem(settings={"sasl.password": "s3cr3t-value"})
    assert line is not None and "s3cr3t-value" not in line and "***" in line
    assert ClientErrors().security_problem() is None


def test_the_default_client_error_log_holds_repeats_back_for_a_minute(caplog):
    """A broker away for seconds: librdkafka reports the refused connection on every
    retry, every few tens of milliseconds; the log shows it once a minute."""
    import logging

    from confluent_kafka import KafkaError

    from onceflow.io.kafka.admin import _ClientErrorLog

    log = _ClientErrorLog()
    refused = "Connect to ipv4#127.0.0.1:19092 failed: Connection refused (after {}ms in state CONNECT)"
    with caplog.at_level(logging.WARNING, logger="onceflow.io.kafka.admin"):
        for attempt in range(120):
            log(KafkaError(KafkaError._TRANSPORT, refused.format(attempt)))
        log(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
        log._logged_at = {text: at - 61 for text, at in log._logged_at.items()}  # a minute later
        log(KafkaError(KafkaError._TRANSPORT, refused.format(7)))
        log(KafkaError(KafkaError._TRANSPORT, "Connect to ipv4#127.0.0.1:19092 failed: Connection refused (after "
                       "0ms in state CONNECT, 1 identical error(s) suppressed)"))  # librdkafka's own count of repeats
    assert [record.getMessage() for record in caplog.records] == [
        "Kafka client: Connect to ipv4#127.0.0.1:19092 failed: Connection refused",
        "Kafka client: 1/1 brokers are down",
        "Kafka client: Connect to ipv4#127.0.0.1:19092 failed: Connection refused (119 more like it since it was "
        "last logged)"]
