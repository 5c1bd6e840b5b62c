"""What the broker says about topics, offsets and consumer groups, outside a
pipeline's reader; and a topic read to its end.

The one place each of these questions is asked:

- a topic's partitions (:func:`describe_topic`), or a one-line reason a sink or a
  dead-letter topic cannot be used (:func:`require_topic`);
- a partition's log start and end offsets (:func:`log_offsets`) and a consumer
  group's committed offsets (:func:`committed_offsets`);
- where each partition's read starts and stops (:func:`resolve_partition_reads`),
  with the part of its range retention has deleted (:class:`RetentionGap`);
- every record of a topic up to its end offsets now (:func:`read_records_to_end`,
  for tools and tests);
- a consumer group's lag per partition (:class:`PartitionLag`), for given
  partitions with a long-lived consumer (:func:`partition_lags`) or for every
  topic the group has committed to (:func:`consumer_group_lag`).

Nothing here joins a consumer group or commits. A client made by a function is
closed before it returns; a consumer passed in stays the caller's. Failures are
the exceptions of :mod:`onceflow.io.kafka.errors`, each one line for people;
functions that take a consumer let the client's ``KafkaException`` through.
confluent-kafka (the ``kafka`` extra) is imported only when a function runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Tuple

from onceflow.io.kafka.config import EARLIEST, KafkaReadConfig, KafkaTopic, Position
from onceflow.io.kafka.errors import (
    BROKER_UP_HINT, BrokerRefused, BrokerUnreachable, ClientErrors, UnknownGroupOrTopic,
)

_LOGGER = logging.getLogger(__name__)

METADATA_TIMEOUT_S = 10.0  # how long one metadata or offsets request may wait for the broker


# -- clients ---------------------------------------------------------------------------


def new_consumer(config: KafkaReadConfig, purpose: str, error_cb=None, quiet: bool = False,
                 offset_reset: Optional[str] = None) -> Any:
    """A consumer with the config's settings (:meth:`KafkaReadConfig.consumer_settings`:
    it never commits by itself), ``client.id`` ``onceflow-PURPOSE`` unless the
    settings name one. Client errors go to ``error_cb`` (default:
    :func:`log_client_error`); ``quiet`` also silences librdkafka's own log, which
    repeats a refused connection on every retry (the reader's long-lived clients:
    their errors reach ``error_cb``; a short-lived client whose ``error_cb`` reports
    them once)."""
    from confluent_kafka import Consumer  # the kafka extra

    settings = config.consumer_settings()
    settings.setdefault("client.id", f"onceflow-{purpose}")
    if offset_reset is not None:
        settings["auto.offset.reset"] = offset_reset
    settings["error_cb"] = error_cb or log_client_error
    if quiet:
        settings["log_level"] = 0
    return Consumer(settings)


class _ClientErrorLog:
    """The default ``error_cb``: librdkafka retries on its own (broker restarts,
    lost connections), so its errors are logged, not raised; each distinct error
    at most once a minute, with how many like it were held back meanwhile (a
    broker away for 8 s had each of a live job's three clients log its refused
    connection 120 times)."""

    INTERVAL_S = 60.0

    def __init__(self) -> None:
        self._logged_at: Dict[str, float] = {}
        self._held: Dict[str, int] = {}

    def __call__(self, error) -> None:
        from onceflow.io.kafka.errors import clean_error_text

        text = clean_error_text(error.str() if hasattr(error, "str") else str(error))
        now = time.monotonic()
        logged_at = self._logged_at.get(text)
        if logged_at is not None and now - logged_at < self.INTERVAL_S:
            self._held[text] = self._held.get(text, 0) + 1
            return
        held = self._held.pop(text, 0)
        self._logged_at[text] = now
        _LOGGER.warning("Kafka client: %s%s", text, f" ({held} more like it since it was last logged)" if held else "")


log_client_error = _ClientErrorLog()


def _kafka_message(error) -> str:
    """The text of a ``KafkaException`` (its ``KafkaError``), or of any error."""
    inner = error.args[0] if getattr(error, "args", None) else error
    return inner.str() if hasattr(inner, "str") else str(inner)


# -- topics ------------------------------------------------------------------------------


def describe_topic(config: KafkaReadConfig, timeout_s: float = METADATA_TIMEOUT_S) -> List[int]:
    """The topic's partition numbers, sorted. :class:`BrokerUnreachable` when the
    broker cannot be reached within ``timeout_s`` (:class:`BrokerRefused` when it
    refused the login or certificate), :class:`UnknownGroupOrTopic` when the topic
    does not exist; each with a one-line message."""
    from confluent_kafka import KafkaException

    errors = ClientErrors()  # reported below, in one line, if they stop the request
    consumer = new_consumer(config, "metadata", errors, quiet=True)
    try:
        try:
            metadata = consumer.list_topics(config.topic.topic, timeout=timeout_s)
        except KafkaException as error:
            refused = errors.security_problem(consumer, config.client_settings)
            if refused:  # a login or certificate problem: retrying will not help
                raise BrokerRefused(f"Kafka at {config.topic.bootstrap_servers} refused the connection: "
                                    f"{refused}") from None
            raise BrokerUnreachable(
                f"cannot reach Kafka at {config.topic.bootstrap_servers} within {timeout_s:.0f}s "
                f"({_kafka_message(error)}); {BROKER_UP_HINT}"
            ) from None
        topic = metadata.topics.get(config.topic.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise UnknownGroupOrTopic(
                f"topic {config.topic.topic!r} does not exist on {config.topic.bootstrap_servers}; "
                "create it first (e.g. onceflow dev topic create NAME --partitions N)"
            )
        return sorted(topic.partitions)
    finally:
        consumer.close()


def require_topic(topic: KafkaTopic, settings: Mapping[str, str]) -> None:
    """Checks, before a pipeline starts, that a topic it will write (rows or dead
    letters) exists and the broker answers; ValueError with
    :func:`describe_topic`'s one line otherwise."""
    try:
        describe_topic(KafkaReadConfig(topic, start=EARLIEST, client_settings=settings))
    except RuntimeError as error:
        raise ValueError(str(error)) from None


# -- offsets -----------------------------------------------------------------------------


def log_offsets(consumer, topic: str, partitions: Iterable[int],
                timeout_s: float = METADATA_TIMEOUT_S) -> Dict[int, Tuple[int, int]]:
    """Each partition's (log start offset, log end offset), asked of the broker now
    (not the consumer's cache)."""
    from confluent_kafka import TopicPartition

    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s) for p in partitions}


def log_starts(config: KafkaReadConfig, partitions: Iterable[int]) -> Dict[int, int]:
    """Each partition's log start offset (where retention has left it), asked of the
    broker now. A broker out of reach raises the client's error (not logged: the
    caller says it in one line)."""
    consumer = new_consumer(config, "offsets", ClientErrors(), quiet=True)
    try:
        return {p: low for p, (low, _) in log_offsets(consumer, config.topic.topic, partitions).items()}
    finally:
        consumer.close()


def compacted_offsets_missing(config: KafkaReadConfig, offsets: Mapping[int, Iterable[int]],
                              timeout_s: float = METADATA_TIMEOUT_S) -> Dict[int, List[int]]:
    """Of ``offsets`` (by partition), those no record has any more because the
    topic is compacted (``cleanup.policy`` with ``compact``) and compaction removed
    them: a newer record of the same key replaced each. Empty for a topic that is
    not compacted (retention removes only a log's start: see :func:`log_starts`).
    One fetch per offset, so asked only of compacted topics. A broker out of reach
    raises the client's error."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"log_level": 0, **dict(config.client_settings),
                         "bootstrap.servers": config.topic.bootstrap_servers})
    resource = ConfigResource(ConfigResource.Type.TOPIC, config.topic.topic)
    described = admin.describe_configs([resource], request_timeout=timeout_s)[resource].result(timeout_s)
    policy = described.get("cleanup.policy")
    if policy is None or "compact" not in (policy.value or ""):
        return {}
    consumer = new_consumer(config, "offsets", ClientErrors(), quiet=True)
    missing: Dict[int, List[int]] = {}
    try:
        for partition, wanted in sorted(offsets.items()):
            for offset in sorted(set(wanted)):
                consumer.assign([TopicPartition(config.topic.topic, partition, offset)])
                found = [m for m in consumer.consume(1, timeout=timeout_s) if m.error() is None]
                if not found or found[0].offset() != offset:  # the fetch starts at the next record kept
                    missing.setdefault(partition, []).append(offset)
    finally:
        consumer.close()
    return missing


def topic_id(config: KafkaReadConfig, timeout_s: float = METADATA_TIMEOUT_S) -> Optional[str]:
    """Kafka's ID of the topic (a new one when a topic is deleted and created again
    under the same name), or None where the broker does not say (older brokers)."""
    from confluent_kafka import KafkaException, TopicCollection
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"log_level": 0, **dict(config.client_settings),
                         "bootstrap.servers": config.topic.bootstrap_servers})
    name = config.topic.topic
    try:
        found = admin.describe_topics(TopicCollection([name]), request_timeout=timeout_s)[name].result(timeout_s)
    except (KafkaException, TimeoutError, TypeError, ValueError):  # TypeError/ValueError: a client too old to ask
        return None
    return str(found.topic_id) if getattr(found, "topic_id", None) else None


def committed_offsets(consumer, topic: str, partitions: Iterable[int],
                      timeout_s: float = METADATA_TIMEOUT_S) -> Dict[int, int]:
    """The committed offsets of the consumer's group (its ``group.id``), by
    partition; a partition the group has committed nothing for is left out."""
    from confluent_kafka import TopicPartition

    found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout_s)
    return {tp.partition: tp.offset for tp in found if tp.offset >= 0}


# -- where each partition's read starts and stops -----------------------------------------


class PositionPastEnd(ValueError):
    """A live job's stored position lies past its partition's end offset."""


class RetentionGap(NamedTuple):
    """Offsets ``[first, end)`` of a partition that a read should have read but
    retention (or ``delete_records``) had deleted."""

    topic: str
    partition: int
    first: int
    end: int

    @property
    def records(self) -> int:
        return self.end - self.first


def describe_gaps(gaps: List[RetentionGap]) -> str:
    """One line: ``topic t: 1,500 records lost to retention (partition 0 offsets
    0-499: 500 records; ...)``."""
    parts = "; ".join(f"partition {g.partition} offsets {g.first}-{g.end - 1}: {g.records:,} records"
                      for g in sorted(gaps, key=lambda g: (g.partition, g.first)))
    total = sum(g.records for g in gaps)
    topics = ",".join(sorted({g.topic for g in gaps}))
    return f"topic {topics}: {total:,} records lost to retention ({parts})"


class KafkaPartitionRead(NamedTuple):
    """One partition to read, from ``start_offset`` to ``stop_offset`` (exclusive;
    ``None`` for a live read that never ends). ``high_water_ms``: the partition's
    high water at ``start_offset`` (see :func:`onceflow.io.kafka.read.seed_high_waters`);
    None reads as "nothing read before"."""

    topic: str
    partition: int
    start_offset: int
    stop_offset: Optional[int]
    high_water_ms: Optional[int] = None
    retention_gap: Optional[RetentionGap] = None


def check_named_partitions(config: KafkaReadConfig, partitions: List[int]) -> None:
    """ValueError (one line) when an ``offsets:`` position names a partition the
    topic does not have, or ``--from`` names one that an ``offsets:`` ``--to``
    does not: either would be read as nothing, silently."""
    for flag, position in (("--from", config.start), ("--to", config.stop)):
        if position is not None and position.kind == "offsets":
            unknown = sorted(set(position.value) - set(partitions))
            if unknown:
                raise ValueError(f"{flag}: topic {config.topic.topic} has no partition {unknown[0]} (its partitions: "
                                 f"{', '.join(map(str, partitions))})")
    start = config.start_fallback if config.start.kind == "committed" else config.start
    if start is not None and start.kind == "offsets" and config.stop is not None and config.stop.kind == "offsets":
        unstopped = sorted(set(start.value) - set(config.stop.value))
        if unstopped:
            p = unstopped[0]
            raise ValueError(f"--from names partition {p}, which --to offsets: does not: a partition --to leaves out "
                             f"is not read; name it there too (offsets:{p}=OFFSET), or stop at latest or a time")


def partitions_left_out_note(config: KafkaReadConfig, partitions: List[int]) -> Optional[str]:
    """What to say of the partitions an ``offsets:`` ``--to`` does not name (a
    bounded read reads only the partitions it names: for the others it is at their
    log start); None when it names them all, or is no ``offsets:``."""
    if config.stop is None or config.stop.kind != "offsets":
        return None
    left_out = sorted(set(partitions) - set(config.stop.value))
    if not left_out:
        return None
    return (f"--to offsets: does not name partition{'s' if len(left_out) > 1 else ''} "
            f"{', '.join(map(str, left_out))} of {config.topic.topic}: not read")


def offsets_past_end_notes(config: KafkaReadConfig, reads: List[KafkaPartitionRead]) -> List[str]:
    """What to say of ``offsets:`` positions past a partition's end: a ``--to``
    there reads to the end, a ``--from`` there reads nothing of the partition."""
    notes = []
    by_partition = {read.partition: read for read in reads}
    for flag, position in (("--from", config.start), ("--to", config.stop)):
        if position is None or position.kind != "offsets":
            continue
        for partition, asked in sorted(position.value.items()):
            read = by_partition.get(partition)
            end = None if read is None else (read.stop_offset if flag == "--to" else read.start_offset)
            if end is not None and asked > end:
                what = "read to its end" if flag == "--to" else "nothing of it is read"
                notes.append(f"{flag} offsets: partition {partition} of {config.topic.topic} ends at offset {end}, "
                             f"before the {asked} asked: {what}")
    return notes


def resolve_partition_reads(config: KafkaReadConfig, partitions: List[int],
                            consumer=None) -> List[KafkaPartitionRead]:
    """Start and stop offsets of each partition, from the config's positions.

    ``latest`` as a stop means the end offsets now (when the read begins). A start
    past the stop gives an empty range, which is fine. A start below the
    partition's log start (a committed offset or an ``offsets:`` start whose
    records retention has deleted) starts at the log start, and the read carries
    the deleted part of its range as ``retention_gap``. A timestamp start cannot
    tell: Kafka keeps no timestamps of deleted records.
    """
    own_consumer = consumer is None
    consumer = consumer or new_consumer(config, "offsets", quiet=True)
    try:
        topic = config.topic.topic
        bounds = log_offsets(consumer, topic, partitions)
        committed: Dict[int, int] = {}
        if config.start.kind == "committed" and config.resume is None:
            committed = committed_offsets(consumer, topic, partitions)
        resume = {p: (offset, high_water) for p, offset, high_water in config.resume or ()}
        reads = []
        for p in partitions:
            low, high = bounds[p]
            high_water = None
            if config.resume is not None:  # the job's stored positions decide, not the group's
                start, high_water = resume.get(p, (low, None))
                requested = start
                if start > high:
                    raise PositionPastEnd(
                        f"the job's stored position of partition {p} of {topic} is offset {start}, past the "
                        f"partition's end ({high}): the topic was deleted and created again, or its records "
                        "were removed; delete the job's positions to start it over (see docs/guarantees.md, "
                        "Restarts)")
            elif p in committed:
                start = requested = committed[p]
            else:
                start_position = config.start_fallback if config.start.kind == "committed" else config.start
                start = requested = _offset_at(consumer, topic, p, start_position, low, high)
                if start_position.kind == "offsets":
                    requested = int(start_position.value.get(p, low))
            stop = gap_end = None
            if config.stop is not None:
                stop = gap_end = _offset_at(consumer, topic, p, config.stop, low, high)
                if config.stop.kind == "offsets":
                    gap_end = int(config.stop.value.get(p, low))
            gap_end = low if gap_end is None else min(low, gap_end)
            gap = RetentionGap(topic, p, requested, gap_end) if requested < gap_end else None
            start = max(start, low)
            if stop is not None:
                stop = max(stop, start)
            reads.append(KafkaPartitionRead(topic, p, start, stop, high_water_ms=high_water, retention_gap=gap))
        return reads
    finally:
        if own_consumer:
            consumer.close()


def _offset_at(consumer, topic: str, partition: int, position: Position, low: int, high: int) -> int:
    from confluent_kafka import TopicPartition

    if position.kind == "earliest":
        return low
    if position.kind == "latest":
        return high
    if position.kind == "offsets":
        return min(max(int(position.value.get(partition, low)), low), high)
    if position.kind == "timestamp":
        found = consumer.offsets_for_times([TopicPartition(topic, partition, int(position.value))],
                                           timeout=METADATA_TIMEOUT_S)[0]
        return high if found.offset < 0 else found.offset
    raise ValueError(f"cannot resolve position {position.kind!r} to an offset")


# -- a topic read to its end -------------------------------------------------------------


def read_topic_to_end(topic: KafkaTopic, settings: Optional[Mapping[str, str]] = None,
                      timeout_s: float = 30.0) -> Iterator[Tuple[Optional[bytes], bytes]]:
    """Every (key, value) in the topic from the beginning to the end offsets as of
    the call. For tools and tests (dead-letter listing), not pipelines."""
    for _, _, key, value in read_records_to_end(topic, settings, timeout_s):
        yield key, value


def read_records_to_end(topic: KafkaTopic, settings: Optional[Mapping[str, str]] = None,
                        timeout_s: float = 30.0, last_only: bool = False,
                        ) -> Iterator[Tuple[int, int, Optional[bytes], Optional[bytes]]]:
    """Every (partition, offset, key, value) in the topic from the beginning (with
    ``last_only``, each partition's last record) to the end offsets as of the
    call; nothing for a topic that does not exist;
    :class:`BrokerRefused` for a refused login or certificate, RuntimeError when
    no record comes for ``timeout_s`` before the end (a read of any length runs
    while records come: a fixed deadline failed a queue of 1.8 million dead letters
    after 30 s). A partition is at its end once the consumer's position is, which
    also passes a transaction's commit marker there (no record has its offset)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    errors = ClientErrors()  # a refused login or certificate: one line below, not a log line per retry
    consumer = Consumer({"bootstrap.servers": topic.bootstrap_servers, "group.id": "onceflow-reader",
                         "enable.auto.commit": False, "log_level": 0, "error_cb": errors, **dict(settings or {})})
    try:
        try:
            metadata = consumer.list_topics(topic.topic, timeout=timeout_s).topics.get(topic.topic)
        except KafkaException:
            refused = errors.security_problem(consumer, settings)
            if refused:
                raise BrokerRefused(f"Kafka at {topic.bootstrap_servers} refused the connection: {refused}") from None
            raise
        if metadata is None or metadata.error is not None:
            return
        ends: Dict[int, int] = {}
        assignment = []
        for partition, (low, high) in log_offsets(consumer, topic.topic, metadata.partitions, timeout_s).items():
            if high > low:
                ends[partition] = high
                assignment.append(TopicPartition(topic.topic, partition, high - 1 if last_only else low))
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            messages = consumer.consume(5000, timeout=0.5)
            for message in messages:
                if message.error() is not None or message.partition() not in ends:
                    continue
                if message.offset() + 1 >= ends[message.partition()]:
                    ends.pop(message.partition())
                yield message.partition(), message.offset(), message.key(), message.value()
            if messages:
                deadline = time.monotonic() + timeout_s
            else:  # nothing more to deliver: a partition may end in a marker no record has the offset of
                for position in consumer.position([TopicPartition(topic.topic, p) for p in ends]):
                    if position.offset >= ends[position.partition]:
                        ends.pop(position.partition)
        if ends:
            raise RuntimeError(f"timed out reading {topic.url} to its end: no record for {timeout_s:g} s")
    finally:
        consumer.close()


# -- consumer-group lag ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PartitionLag:
    """One partition's committed offset, log start and end offsets, and the lag
    between them."""

    topic: str
    partition: int
    committed: Optional[int]  # None: the group has committed no offset here
    start: int  # the log start offset
    end: int  # the log end offset (high watermark)

    @property
    def lag(self) -> int:
        """Records from the group's position (the log start when it has none, or
        when its offset is below the start: retention deleted them) to the log end."""
        position = self.start if self.committed is None else max(self.committed, self.start)
        return max(0, self.end - position)


@dataclasses.dataclass(frozen=True)
class GroupLag:
    """A consumer group's lag on every partition asked about."""

    bootstrap_servers: str
    group: str
    partitions: Tuple[PartitionLag, ...]
    missing_topics: Tuple[str, ...] = ()  # committed to once, deleted since

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)


def partition_lags(consumer, topic: str, partitions: Iterable[int],
                   timeout_s: float = METADATA_TIMEOUT_S) -> Tuple[PartitionLag, ...]:
    """The lag of the consumer's group on the given partitions, asked with a
    consumer the caller keeps (one that samples every second reuses its
    connections); the client's ``KafkaException`` passes through while the broker
    does not answer."""
    partitions = list(partitions)
    committed = committed_offsets(consumer, topic, partitions, timeout_s)
    bounds = log_offsets(consumer, topic, partitions, timeout_s)
    return tuple(PartitionLag(topic, p, committed.get(p), *bounds[p]) for p in partitions)


def consumer_group_lag(bootstrap_servers: str, group: str, topic: Optional[str] = None,
                       timeout_s: float = 10.0, settings: Optional[Mapping[str, str]] = None) -> GroupLag:
    """The lag of ``group`` on ``topic`` (every partition of it), or on every topic
    the group has committed offsets for (which only the admin API can list).
    Raises :class:`BrokerUnreachable` (:class:`BrokerRefused` for a refused login
    or certificate) or :class:`UnknownGroupOrTopic`."""
    from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec

    # librdkafka logs each failed connection attempt; the one-line error below says it once.
    errors = ClientErrors()
    quiet = {"log_level": 0, "error_cb": errors}
    admin = AdminClient({**quiet, **dict(settings or {}), "bootstrap.servers": bootstrap_servers})
    try:
        metadata = admin.list_topics(timeout=timeout_s)  # all topics: never auto-creates one
    except KafkaException as error:
        refused = errors.security_problem(admin, settings)
        if refused:
            raise BrokerRefused(f"Kafka at {bootstrap_servers} refused the connection: {refused}") from None
        raise BrokerUnreachable(f"cannot reach Kafka at {bootstrap_servers} within {timeout_s:g}s "
                                f"({_kafka_message(error)}); {BROKER_UP_HINT}") from None
    existing = {name: t for name, t in metadata.topics.items() if t.error is None}
    if topic is not None and topic not in existing:
        raise UnknownGroupOrTopic(f"topic {topic!r} does not exist on {bootstrap_servers}")
    try:
        offsets = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=timeout_s)[group].result()
        committed: Dict[Tuple[str, int], int] = {
            (tp.topic, tp.partition): tp.offset for tp in offsets.topic_partitions if tp.offset >= 0}
        if not committed:
            state = admin.describe_consumer_groups([group], request_timeout=timeout_s)[group].result().state
            if state.name in ("DEAD", "UNKNOWN"):
                raise UnknownGroupOrTopic(f"consumer group {group!r} is not known to {bootstrap_servers}")
    except KafkaException as error:
        raise BrokerUnreachable(f"Kafka at {bootstrap_servers} refused the group's offsets "
                                f"({_kafka_message(error)})") from None

    missing: List[str] = []
    if topic is not None:
        topics = [topic]
    else:
        named = sorted({t for t, _ in committed})
        if not named:
            raise UnknownGroupOrTopic(f"consumer group {group!r} has committed no offsets; give --topic "
                                      "to count a topic's lag from the log start")
        topics = [t for t in named if t in existing]
        missing = [t for t in named if t not in existing]
    wanted = [TopicPartition(t, p) for t in topics for p in sorted(existing[t].partitions)]
    try:
        ends = _list_offsets(admin, wanted, OffsetSpec.latest(), timeout_s)
        starts = _list_offsets(admin, wanted, OffsetSpec.earliest(), timeout_s)
    except KafkaException as error:
        raise BrokerUnreachable(f"Kafka at {bootstrap_servers} did not give the offsets of "
                                f"{', '.join(topics)} ({_kafka_message(error)})") from None
    partitions = tuple(
        PartitionLag(tp.topic, tp.partition, committed.get((tp.topic, tp.partition)),
                     starts[(tp.topic, tp.partition)], ends[(tp.topic, tp.partition)])
        for tp in wanted)
    return GroupLag(bootstrap_servers, group, partitions, tuple(missing))


def _list_offsets(admin, partitions, spec, timeout_s: float) -> Dict[Tuple[str, int], int]:
    if not partitions:
        return {}
    futures = admin.list_offsets({tp: spec for tp in partitions}, request_timeout=timeout_s)
    return {(tp.topic, tp.partition): future.result().offset for tp, future in futures.items()}
