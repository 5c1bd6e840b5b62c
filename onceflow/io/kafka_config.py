"""What a Kafka read or write is pointed at: URLs, positions, consumer settings.

Pure parsing and validation, shared by the Python reader
(:mod:`onceflow.io.kafka_source`), the Java-backed reader
(:mod:`onceflow.io.kafka_java`), the writer and the command line. Nothing here
connects to a broker.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from typing import Any, Dict, Mapping, Optional, Tuple

from onceflow.events import RecordError, parse_event_time_ms

KAFKA_SCHEME = "kafka"
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")

# Setting names whose values must never be logged or printed.
_SECRET_WORDS = ("password", "secret", "token", "key", "jaas", "credential")


@dataclasses.dataclass(frozen=True)
class KafkaTopic:
    """``kafka://HOST:PORT[,HOST:PORT...]/TOPIC``."""

    bootstrap_servers: str
    topic: str

    @property
    def url(self) -> str:
        return f"{KAFKA_SCHEME}://{self.bootstrap_servers}/{self.topic}"


def is_kafka_url(text: str) -> bool:
    return str(text).startswith(f"{KAFKA_SCHEME}://")


def parse_kafka_url(url: str) -> KafkaTopic:
    """Parses ``kafka://HOST:PORT[,HOST:PORT]/TOPIC``; ValueError says the expected form."""
    parsed = urllib.parse.urlsplit(str(url))
    expected = "expected kafka://HOST:PORT/TOPIC, e.g. kafka://127.0.0.1:9092/orders"
    if parsed.scheme != KAFKA_SCHEME or not parsed.netloc:
        raise ValueError(f"{url!r}: {expected}")
    servers = parsed.netloc.split(",")
    if not all(_HOST_PORT.match(server) for server in servers):
        raise ValueError(f"{url!r}: the broker address must be HOST:PORT; {expected}")
    topic = parsed.path.lstrip("/")
    if not _TOPIC.match(topic):
        raise ValueError(f"{url!r}: topic names use letters, digits, '.', '_' and '-'; {expected}")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{url!r}: no ?query or #fragment is accepted; {expected}")
    return KafkaTopic(",".join(servers), topic)


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a partition's read starts or stops.

    ``kind`` is ``earliest``, ``latest`` (the end offsets when the read begins),
    ``committed`` (the consumer group's committed offset; only as a start),
    ``timestamp`` (``value``: epoch ms; the first offset whose record timestamp is
    at or after it) or ``offsets`` (``value``: partition -> offset).
    """

    kind: str
    value: Any = None

    def describe(self) -> str:
        if self.kind == "timestamp":
            from onceflow.events import format_utc_ms

            return format_utc_ms(self.value)
        if self.kind == "offsets":
            return "offsets " + ",".join(f"{p}={o}" for p, o in sorted(self.value.items()))
        return self.kind


EARLIEST = Position("earliest")
LATEST = Position("latest")
COMMITTED = Position("committed")


def parse_position(text: str, flag: str = "position") -> Position:
    """``earliest``, ``latest``, an ISO-8601 timestamp (or epoch ms), or
    ``offsets:P=O,P=O`` (partition P at offset O). ValueError says the forms."""
    value = str(text).strip()
    if value in ("earliest", "latest"):
        return Position(value)
    if value.startswith("offsets:"):
        offsets: Dict[int, int] = {}
        for item in value[len("offsets:"):].split(","):
            partition, _, offset = item.partition("=")
            if not partition.strip().isdigit() or not offset.strip().isdigit():
                raise ValueError(f"{flag}: {text!r}: write offsets:PARTITION=OFFSET,..., e.g. offsets:0=100,1=250")
            offsets[int(partition)] = int(offset)
        return Position("offsets", offsets)
    try:
        millis = parse_event_time_ms(int(value) if value.lstrip("-").isdigit() else value, flag)
    except RecordError:
        raise ValueError(
            f"{flag}: {text!r} is not earliest, latest, an ISO-8601 timestamp "
            "(e.g. 2026-11-02T09:00:00Z) or offsets:P=O,..."
        ) from None
    return Position("timestamp", millis)


def redact(settings: Mapping[str, str]) -> Dict[str, str]:
    """A copy of client settings safe to log: secret values replaced by ``***``."""
    return {
        name: ("***" if any(word in name.lower() for word in _SECRET_WORDS) else value)
        for name, value in settings.items()
    }


def parse_client_settings(pairs: Optional[Tuple[str, ...]], flag: str) -> Dict[str, str]:
    """``("security.protocol=SASL_SSL", "sasl.mechanism=PLAIN")`` to a dict."""
    settings: Dict[str, str] = {}
    for pair in pairs or ():
        name, sep, value = str(pair).partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{flag}: {pair!r} is not NAME=VALUE, e.g. security.protocol=SASL_SSL")
        settings[name.strip()] = value
    return settings


@dataclasses.dataclass(frozen=True)
class KafkaReadConfig:
    """A Kafka read: live (``stop is None``) or bounded.

    ``time_source`` is ``field`` (the event contract's time field) or ``record``
    (the Kafka record timestamp); it drives element timestamps and the watermark.
    ``client_settings`` are passed to the consumer as they are (SASL, SSL, ...);
    :func:`redact` them before logging. ``rewind_to_ms`` (live reads from committed
    offsets): start each partition no later than its first record whose Kafka
    timestamp is at or after this time, so that windows a crash left unwritten
    are read again in full.
    """

    topic: KafkaTopic
    start: Position = COMMITTED
    start_fallback: Position = EARLIEST  # where a partition with no committed offset starts
    stop: Optional[Position] = None
    group_id: Optional[str] = None
    time_source: str = "field"
    client_settings: Mapping[str, str] = dataclasses.field(default_factory=dict)
    rewind_to_ms: Optional[int] = None

    def __post_init__(self) -> None:
        if self.time_source not in ("field", "record"):
            raise ValueError("time source must be 'field' or 'record'")
        if self.start.kind == "committed" and not self.group_id:
            raise ValueError("starting from committed offsets needs a consumer group")
        if self.start_fallback.kind in ("committed", "offsets"):
            raise ValueError("the fallback start must be earliest, latest or a timestamp")
        if self.stop is not None and self.stop.kind == "committed":
            raise ValueError("a read cannot stop at committed offsets")

    @property
    def bounded(self) -> bool:
        return self.stop is not None

    def consumer_settings(self) -> Dict[str, str]:
        """librdkafka settings for a consumer that never commits by itself."""
        settings = {
            "bootstrap.servers": self.topic.bootstrap_servers,
            "enable.auto.commit": "false",
            "enable.auto.offset.store": "false",
            "enable.partition.eof": "false",
            "group.id": self.group_id or "onceflow-unused",
        }
        settings.update(self.client_settings)
        return settings
