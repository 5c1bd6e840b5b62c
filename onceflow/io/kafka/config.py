"""What a Kafka read or write is pointed at: URLs, positions, consumer settings.

Pure parsing and validation, shared by the Python reader
(:mod:`onceflow.io.kafka.read`), the Java-backed reader
(:mod:`onceflow.io.kafka.java`), the writer (:mod:`onceflow.io.kafka.write`),
the broker queries (:mod:`onceflow.io.kafka.admin`) and the command line.
Nothing here connects to a broker.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from typing import Any, Dict, Mapping, Optional, Tuple

from onceflow.events import RecordError, parse_event_time_ms
from onceflow.io.urls import redact_url

KAFKA_SCHEME = "kafka"
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")

# Setting names whose values must never be logged or printed (a name containing
# any of these words; sasl.oauthbearer.config holds client secrets as text).
_SECRET_WORDS = ("password", "secret", "token", "key", "jaas", "credential", "oauthbearer")

# Settings the reader or the writer sets for its guarantees. User settings are
# applied after the defaults, so a different value would silently override them:
# it is refused instead, saying why. name -> (the only accepted values, why).
GUARDED_SETTINGS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "enable.auto.commit": (("false",), "offsets are committed only once the runner has durably taken the "
                                       "records; auto-commit would commit records not yet aggregated, "
                                       "which a crash then loses"),
    "enable.auto.offset.store": (("false",), "the reader stores offsets itself when the runner finalizes a "
                                             "bundle; an automatic store commits records not yet aggregated"),
    "isolation.level": (("read_committed",), "read_uncommitted would count records of aborted transactions"),
    "enable.partition.eof": (("false",), "the reader finds the end of a bounded read by offsets"),
    "auto.offset.reset": ((), "where partitions start is set by --from (or the group's committed offsets)"),
    "bootstrap.servers": ((), "give the brokers in the kafka://HOST:PORT/TOPIC URL"),
    "group.id": ((), "a live job takes its consumer group from --kafka_group; a backfill and the archive job "
                     "read without one"),
    "enable.idempotence": (("true",), "the writer relies on it so that its own retries neither duplicate "
                                      "nor reorder messages"),
    "acks": (("all", "-1"), "a write counts as done only once every in-sync replica has it"),
}

# librdkafka's other names for guarded settings: other name -> the name above.
_GUARDED_ALIASES = {"metadata.broker.list": "bootstrap.servers", "request.required.acks": "acks"}


@dataclasses.dataclass(frozen=True)
class KafkaTopic:
    """``kafka://HOST:PORT[,HOST:PORT...]/TOPIC``."""

    bootstrap_servers: str
    topic: str

    @property
    def url(self) -> str:
        return f"{KAFKA_SCHEME}://{self.bootstrap_servers}/{self.topic}"


def is_kafka_url(text: str) -> bool:
    """Whether ``text`` is a kafka:// URL (a URL's scheme is case-insensitive:
    KAFKA:// was taken for a file path)."""
    return str(text)[:len(KAFKA_SCHEME) + 3].lower() == f"{KAFKA_SCHEME}://"


def parse_kafka_url(url: str) -> KafkaTopic:
    """Parses ``kafka://HOST:PORT[,HOST:PORT]/TOPIC``; ValueError says the expected
    form, with any password in the URL shown as ``***``."""
    parsed = urllib.parse.urlsplit(str(url))
    shown = redact_url(str(url))
    expected = "expected kafka://HOST:PORT/TOPIC, e.g. kafka://127.0.0.1:9092/orders"
    if parsed.scheme != KAFKA_SCHEME or not parsed.netloc:
        raise ValueError(f"{shown!r}: {expected}")
    if "@" in parsed.netloc:
        raise ValueError(f"{shown!r}: a kafka:// URL holds no user or password; give them in --kafka_config_file "
                         "(sasl.username, sasl.password)")
    servers = parsed.netloc.split(",")
    if not all(_HOST_PORT.match(server) for server in servers):
        raise ValueError(f"{shown!r}: the broker address must be HOST:PORT; {expected}")
    ports = [int(server.rsplit(":", 1)[1]) for server in servers]
    if not all(1 <= port <= 65535 for port in ports):
        raise ValueError(f"{shown!r}: {next(p for p in ports if not 1 <= p <= 65535)} is not a port (1 to 65535); "
                         f"{expected}")
    topic = parsed.path.lstrip("/")
    if not _TOPIC.match(topic):
        raise ValueError(f"{shown!r}: topic names use letters, digits, '.', '_' and '-'; {expected}")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{shown!r}: no ?query or #fragment is accepted; {expected}")
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
            if int(partition) in offsets:
                raise ValueError(f"{flag}: {text!r} names partition {int(partition)} twice; give each partition once")
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
        name: ("***" if is_secret_setting(name) else value)
        for name, value in settings.items()
    }


def is_secret_setting(name: str) -> bool:
    """Whether a setting's value must never be shown (named like a secret)."""
    return any(word in name.lower() for word in _SECRET_WORDS)


def scrub_secrets(text: str, settings: Mapping[str, str]) -> str:
    """``text`` (e.g. a client's error message) with the value of every secret
    setting replaced by ``***``."""
    for name, value in settings.items():
        if value and is_secret_setting(name):
            text = text.replace(value, "***")
    return text


def client_error_text(error: BaseException) -> str:
    """The first line of what the Kafka client said: a KafkaException's KafkaError
    text (its ``str()`` is a tuple-like repr), else the error's message."""
    text = str(error.args[0].str()) if error.args and hasattr(error.args[0], "str") else str(error)
    return (text.strip().splitlines() or [type(error).__name__])[0]


def client_error_line(error: BaseException, settings: Mapping[str, str]) -> str:
    """One line for an error the Kafka client raised where the job starts (a setting
    it does not know, a value it refuses), secret values scrubbed."""
    first = client_error_text(error)
    if "ssl.key.location failed" in first and ("PEM lib" in first or "bad decrypt" in first):
        return scrub_secrets(f"the Kafka client cannot read the key in ssl.key.location ({first}): a wrong "
                             "ssl.key.password, or not a PEM key; check --kafka_setting and --kafka_config_file",
                             settings)
    return scrub_secrets(f"the Kafka client refused the settings: {first}; check --kafka_setting and "
                         "--kafka_config_file (librdkafka names, e.g. sasl.username, not Java's sasl.jaas.config)",
                         settings)


def parse_client_settings(pairs: Optional[Tuple[str, ...]], flag: str) -> Dict[str, str]:
    """``("security.protocol=SASL_SSL", "sasl.mechanism=PLAIN")`` to a dict. The
    error for a malformed pair names the setting, never its value."""
    settings: Dict[str, str] = {}
    for pair in pairs or ():
        name, sep, value = str(pair).partition("=")
        if not sep:  # the text may be a secret given without its name: not shown
            raise ValueError(f"{flag}: a setting has no '=': write NAME=VALUE, e.g. security.protocol=SASL_SSL")
        if not name.strip():
            raise ValueError(f"{flag}: a setting has no name before '=': write NAME=VALUE, e.g. "
                             "security.protocol=SASL_SSL")
        settings[name.strip()] = value
    return settings


def check_guarded_settings(settings: Mapping[str, str], where: str) -> None:
    """ValueError (one line, saying why) for a setting that would override what the
    reader or writer depends on (:data:`GUARDED_SETTINGS`); the accepted value
    itself is allowed."""
    for name, value in settings.items():
        alias = _GUARDED_ALIASES.get(name.strip().lower())
        guard = GUARDED_SETTINGS.get(alias or name.strip().lower())
        if guard is None:
            continue
        accepted, why = guard
        if str(value).strip().lower() in accepted:
            continue
        must = f"must stay {accepted[0]}" if accepted else "cannot be set"
        other = f" (librdkafka's other name for {alias})" if alias else ""
        raise ValueError(f"{where}: {name}{other} {must}: {why}")


def read_properties_file(path: str, flag: str = "--kafka_config_file") -> Dict[str, str]:
    """A Kafka client properties file, as Kafka's tools take with --command-config:
    ``key=value`` (or ``key: value``, ``key value``) lines, ``#`` and ``!``
    comments, a trailing backslash continuing a line, backslash escapes. ValueError
    names the file and line of a mistake, never a value."""
    try:
        with open(path, encoding="utf-8-sig") as handle:  # a byte-order mark (Windows editors) is not a name
            text = handle.read()
    except OSError as error:
        raise ValueError(f"{flag}: cannot read {path!r}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{flag}: {path!r} is not UTF-8 text") from None
    settings: Dict[str, str] = {}
    for number, line in _logical_lines(text):
        name, value = _split_property(line)
        if not name:
            raise ValueError(f"{flag}: {path}:{number}: a line with no setting name; write name=value")
        settings[name] = value
    return settings


def _logical_lines(text: str):
    """(first line number, logical line) of a properties file: comments and blank
    lines dropped, continuation lines joined."""
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.lstrip()
        if not pending and (not line or line[0] in "#!"):
            continue
        start = start or number
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:  # an odd number of backslashes: the line continues
            pending += line[:-1]
            continue
        yield start, pending + line
        pending, start = "", 0
    if pending:
        yield start, pending


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _split_property(line: str) -> Tuple[str, str]:
    """A logical line to (name, value): the name ends at the first unescaped ``=``,
    ``:`` or whitespace; escapes in both are resolved."""
    index, length = 0, len(line)
    while index < length and line[index] not in "=: \t\f":
        index += 2 if line[index] == "\\" else 1
    name = line[:index]
    rest = line[index:].lstrip(" \t\f")
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip(" \t\f")
    return _unescape(name), _unescape(rest)


def _unescape(text: str) -> str:
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            following = text[index + 1]
            if following == "u" and len(text) >= index + 6:
                try:
                    out.append(chr(int(text[index + 2:index + 6], 16)))
                    index += 6
                    continue
                except ValueError:
                    pass
            out.append(_ESCAPES.get(following, following))
            index += 2
            continue
        out.append(char)
        index += 1
    return "".join(out)


def client_settings_from_flags(pairs: Optional[Tuple[str, ...]], config_file: Optional[str],
                               setting_flag: str = "--kafka_setting",
                               file_flag: str = "--kafka_config_file") -> Dict[str, str]:
    """The Kafka client settings of a command: the properties file first, then the
    ``NAME=VALUE`` flags (which win). ValueError (one line, no secret value) for a
    malformed pair, an unreadable file, or a setting that would break a guarantee."""
    settings = read_properties_file(config_file, file_flag) if config_file else {}
    check_guarded_settings(settings, file_flag)
    check_files_exist(settings, file_flag)
    given = parse_client_settings(pairs, setting_flag)
    check_guarded_settings(given, setting_flag)
    check_files_exist(given, setting_flag)
    settings.update(given)
    return settings


def check_files_exist(settings: Mapping[str, str], where: str) -> None:
    """ValueError (one line) for a TLS file setting (``ssl.*.location``) naming a
    file that is not there: librdkafka said only "ssl.key.location failed:
    error:0A080002:SSL routines::system lib"."""
    for name, value in settings.items():
        if re.fullmatch(r"ssl\.[a-z.]*location", name.strip().lower()) and value.strip() not in ("", "probe"):
            if not os.path.exists(value.strip()):
                raise ValueError(f"{where}: {name}: {value.strip()} does not exist; give the path of the file")


@dataclasses.dataclass(frozen=True)
class KafkaReadConfig:
    """A Kafka read: live (``stop is None``) or bounded.

    ``time_source`` is ``field`` (the event contract's time field) or ``record``
    (the Kafka record timestamp); it drives element timestamps and the watermark.
    ``client_settings`` are passed to the consumer as they are (SASL, SSL, ...);
    :func:`redact` them before logging. ``resume`` (live reads): the positions the
    job stored with its results (``(partition, next offset, high water)``, see
    :mod:`onceflow.io.progress`); when set, each partition starts there with that
    high water, and a partition with no stored position (added to the topic
    since) starts at its log start, whatever the group has committed.
    ``allow_retention_gaps`` (bounded reads): read what
    is left of a range that retention has partly deleted, reporting the gap,
    instead of failing (a live read always goes on and reports it). ``topic_id``
    (live reads): Kafka's ID of the topic when the job started; a live read that
    finds another (the topic deleted and created again under it) fails.
    """

    topic: KafkaTopic
    start: Position = COMMITTED
    start_fallback: Position = EARLIEST  # where a partition with no committed offset starts
    stop: Optional[Position] = None
    group_id: Optional[str] = None
    time_source: str = "field"
    client_settings: Mapping[str, str] = dataclasses.field(default_factory=dict)
    resume: Optional[Tuple[Tuple[int, int, Optional[int]], ...]] = None
    allow_retention_gaps: bool = False
    topic_id: Optional[str] = None

    def __post_init__(self) -> None:
        if self.time_source not in ("field", "record"):
            raise ValueError("time source must be 'field' or 'record'")
        if self.start.kind == "committed" and not self.group_id:
            raise ValueError("starting from committed offsets needs a consumer group")
        if self.start_fallback.kind in ("committed", "offsets"):
            raise ValueError("the fallback start must be earliest, latest or a timestamp")
        if self.stop is not None and self.stop.kind == "committed":
            raise ValueError("a read cannot stop at committed offsets")
        same_kind = self.stop is not None and self.start.kind == self.stop.kind
        reversed_ends = self.stop is not None and (self.start.kind, self.stop.kind) == ("latest", "earliest")
        if reversed_ends or (same_kind and self.start.kind == "timestamp" and self.start.value > self.stop.value):
            raise ValueError("the start is after the stop: nothing would be read; swap them")
        if same_kind and self.start.kind == "offsets":
            reversed_ = [p for p, offset in self.start.value.items() if offset > self.stop.value.get(p, offset)]
            if reversed_:
                raise ValueError(f"partition {reversed_[0]} starts after its stop: nothing would be read there; "
                                 "swap them")
        check_guarded_settings(self.client_settings, "client settings")

    @property
    def bounded(self) -> bool:
        return self.stop is not None

    def consumer_settings(self) -> Dict[str, str]:
        """librdkafka settings for a consumer that never commits by itself and reads
        only committed transactions. ``client_settings`` come last but cannot change
        those: :data:`GUARDED_SETTINGS` are refused when the config is made."""
        settings = {
            "bootstrap.servers": self.topic.bootstrap_servers,
            "enable.auto.commit": "false",
            "enable.auto.offset.store": "false",
            "enable.partition.eof": "false",
            "isolation.level": "read_committed",  # librdkafka's default, stated: aborted records are not read
            "group.id": self.group_id or "onceflow-unused",
            # When its prefetch queue is full librdkafka waits this long before the
            # next fetch (default 1,000 ms): a reader that drains the queue faster
            # than that then sits idle. Measured on a 1,000,000-record topic (3
            # partitions, one local broker): a plain consume loop took 5.6 s with the
            # default and 1.6 s with 10 ms, at the same CPU time. The queue's bounds
            # (queued.min.messages, queued.max.messages.kbytes) are unchanged.
            "fetch.queue.backoff.ms": "10",
        }
        settings.update(self.client_settings)
        return settings
