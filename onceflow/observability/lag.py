"""A consumer group's lag, from the broker: per partition, committed offset, log
end offset and the records in between.

A partition the group has no committed offset for counts from the log start
offset (``lag = end - start``): a reader that resumes from committed offsets
starts such a partition at ``earliest`` by default, so all of it is still to
read. A committed offset below the log start (records removed by retention)
also counts from the log start.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Tuple

EXIT_OK = 0
EXIT_OVER_MAX_LAG = 1
EXIT_UNREACHABLE = 3  # the broker cannot be reached, or it refused a request
EXIT_UNKNOWN = 4  # no such consumer group or topic


class LagError(Exception):
    """One line for people, and the exit status it gets."""

    exit_code = EXIT_UNREACHABLE


class BrokerUnreachable(LagError):
    exit_code = EXIT_UNREACHABLE


class UnknownGroupOrTopic(LagError):
    exit_code = EXIT_UNKNOWN


@dataclasses.dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: Optional[int]  # None: the group has committed no offset here
    start: int  # the log start offset
    end: int  # the log end offset (high watermark)

    @property
    def lag(self) -> int:
        """Records from the group's position (the log start when it has none, or
        when its offset is below the start) to the log end."""
        position = self.start if self.committed is None else max(self.committed, self.start)
        return max(0, self.end - position)


@dataclasses.dataclass(frozen=True)
class GroupLag:
    bootstrap_servers: str
    group: str
    partitions: Tuple[PartitionLag, ...]
    missing_topics: Tuple[str, ...] = ()  # committed to once, deleted since

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)

    def to_json(self, max_lag: Optional[int] = None) -> Dict:
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "group": self.group,
            "partitions": [
                {"topic": p.topic, "partition": p.partition, "committed": p.committed, "start": p.start,
                 "end": p.end, "lag": p.lag} for p in self.partitions
            ],
            "total_lag": self.total,
            "missing_topics": list(self.missing_topics),
            "max_lag": max_lag,
            "over_max_lag": None if max_lag is None else self.total > max_lag,
        }


def render(lag: GroupLag, max_lag: Optional[int] = None) -> str:
    """A table per partition and the total."""
    header = ("TOPIC", "PARTITION", "COMMITTED", "START", "END", "LAG")
    rows = [(p.topic, str(p.partition), "-" if p.committed is None else str(p.committed), str(p.start),
             str(p.end), str(p.lag)) for p in lag.partitions]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"consumer group {lag.group} on {lag.bootstrap_servers}"]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    if any(p.committed is None for p in lag.partitions):
        lines.append("(-: no committed offset; its lag counts from the log start: END - START)")
    for topic in lag.missing_topics:
        lines.append(f"(topic {topic} has committed offsets but no longer exists; not counted)")
    verdict = ""
    if max_lag is not None:
        verdict = f" (above --max-lag {max_lag:,})" if lag.total > max_lag else f" (within --max-lag {max_lag:,})"
    lines.append(f"total lag: {lag.total}{verdict}")
    return "\n".join(lines)


def exit_status(lag: GroupLag, max_lag: Optional[int]) -> int:
    return EXIT_OVER_MAX_LAG if max_lag is not None and lag.total > max_lag else EXIT_OK


def _kafka_message(error) -> str:
    inner = error.args[0] if getattr(error, "args", None) else error
    return inner.str() if hasattr(inner, "str") else str(inner)


def consumer_group_lag(bootstrap_servers: str, group: str, topic: Optional[str] = None,
                       timeout_s: float = 10.0, settings: Optional[Mapping[str, str]] = None) -> GroupLag:
    """The lag of ``group`` on ``topic`` (every partition of it), or on every topic
    the group has committed offsets for. Raises :class:`BrokerUnreachable` or
    :class:`UnknownGroupOrTopic`."""
    from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec

    from onceflow.io.kafka_errors import ClientErrors

    # librdkafka logs each failed connection attempt; the one-line error below says it once.
    errors = ClientErrors()
    quiet = {"log_level": 0, "error_cb": errors}
    admin = AdminClient({**quiet, **dict(settings or {}), "bootstrap.servers": bootstrap_servers})
    try:
        metadata = admin.list_topics(timeout=timeout_s)  # all topics: never auto-creates one
    except KafkaException as error:
        refused = errors.security_problem(admin, settings)
        if refused:
            raise BrokerUnreachable(f"Kafka at {bootstrap_servers} refused the connection: {refused}") from None
        raise BrokerUnreachable(f"cannot reach Kafka at {bootstrap_servers} within {timeout_s:g}s "
                                f"({_kafka_message(error)})") from None
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
