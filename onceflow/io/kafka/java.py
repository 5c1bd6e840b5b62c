"""A Kafka reader backed by Beam's Java KafkaIO (cross-language), same interface as
:class:`onceflow.io.kafka.read.ReadFromKafka`: ``PCollection[SourceRecord]``.

For users on Flink (or Dataflow) who prefer the Java reader. See
:class:`ReadFromKafkaWithJava` for what it can and cannot do.
"""

from __future__ import annotations

import base64
import logging
import typing
from typing import Any, Dict, Iterator, Optional, Tuple

import apache_beam as beam
from apache_beam.transforms import window
from apache_beam.transforms.external import ExternalTransform, NamedTupleBasedPayloadBuilder

from onceflow.events import EventContract, SourceRecord
from onceflow.io.kafka.config import KafkaReadConfig, redact

_LOG = logging.getLogger(__name__)

URN_WITH_METADATA = "beam:transform:org.apache.beam:kafka_read_with_metadata:v1"
BYTE_ARRAY_DESERIALIZER = "org.apache.kafka.common.serialization.ByteArrayDeserializer"
CREATE_TIME = "CreateTime"

# The payload Java KafkaIO's ``External.Configuration`` accepts at 2.62 (one setter
# per field; an unknown field fails the expansion). Beam 2.77's Python
# ``apache_beam.io.kafka.ReadFromKafka`` sends fields 2.62 lacks
# (``dynamic_read_poll_interval_seconds``, ``consumer_factory_fn_*``) and so cannot
# be expanded by a 2.62 service; this payload can, and by later ones too.
KafkaReadPayload = typing.NamedTuple(
    "KafkaReadPayload",
    [
        ("consumer_config", typing.Mapping[str, str]),
        ("topics", typing.List[str]),
        ("key_deserializer", str),
        ("value_deserializer", str),
        ("start_read_time", typing.Optional[int]),
        ("commit_offset_in_finalize", bool),
        ("timestamp_policy", str),
    ],
)


def consumer_config(config: KafkaReadConfig) -> Dict[str, str]:
    """The Java consumer properties for ``config`` (secrets included: never log them
    unredacted). ``client_settings`` are passed as they are and must be Java
    consumer property names (e.g. ``sasl.jaas.config``, not librdkafka's)."""
    settings = {
        "bootstrap.servers": config.topic.bootstrap_servers,
        "enable.auto.commit": "false",
    }
    start = config.start
    if start.kind == "committed":
        # No committed offset: Kafka's auto.offset.reset decides, i.e. the fallback.
        settings["auto.offset.reset"] = config.start_fallback.kind
    elif start.kind in ("earliest", "latest"):
        settings["auto.offset.reset"] = start.kind
    else:  # timestamp: start_read_time decides; a reset is still needed for the consumer
        settings["auto.offset.reset"] = "earliest"
    if config.group_id:
        settings["group.id"] = config.group_id
    settings.update(config.client_settings)
    return settings


def check_supported(config: KafkaReadConfig) -> None:
    """ValueError, saying why and what to use instead, for what the Java reader cannot do."""
    if config.stop is not None:
        raise ValueError(
            f"the Java Kafka reader cannot do a bounded read (stop at {config.stop.describe()}): "
            "Beam's cross-language KafkaIO has no stop offset; its stop time is ignored by the "
            "legacy source Flink runs (the read would never end) and fails the pipeline when a "
            "partition has no record at or after it; max_num_records is a count, not a position. "
            "Use onceflow.io.kafka.read.ReadFromKafka for backfills"
        )
    if config.start.kind == "offsets":
        raise ValueError(
            "the Java Kafka reader cannot start at given offsets (cross-language KafkaIO takes "
            "no start offsets); use onceflow.io.kafka.read.ReadFromKafka, or start at committed, "
            "earliest, latest or a timestamp"
        )
    if config.start.kind == "committed" and config.start_fallback.kind == "timestamp":
        raise ValueError(
            "the Java Kafka reader cannot fall back to a timestamp for partitions without a "
            "committed offset (Kafka's auto.offset.reset knows only earliest and latest)"
        )
    if config.start.kind in ("earliest", "latest") and config.group_id:
        raise ValueError(
            f"the Java Kafka reader cannot start at {config.start.kind} with a consumer group: "
            "KafkaIO resumes a group from its committed offsets; start at committed (falling back "
            f"to {config.start.kind}), or read without a group"
        )


def payload(config: KafkaReadConfig) -> KafkaReadPayload:
    """The expansion payload for ``config`` (after :func:`check_supported`)."""
    return KafkaReadPayload(
        consumer_config=consumer_config(config),
        topics=[config.topic.topic],
        key_deserializer=BYTE_ARRAY_DESERIALIZER,
        value_deserializer=BYTE_ARRAY_DESERIALIZER,
        start_read_time=int(config.start.value) if config.start.kind == "timestamp" else None,
        commit_offset_in_finalize=bool(config.group_id),
        timestamp_policy=CREATE_TIME,
    )


def _b64(raw: Optional[bytes]) -> Optional[str]:
    return None if raw is None else base64.b64encode(bytes(raw)).decode("ascii")


def source_of(row: Any) -> Dict[str, Any]:
    """``SourceRecord.source`` from a KafkaIO metadata row, as the Python reader makes it."""
    return {
        "topic": row.topic,
        "partition": int(row.partition),
        "offset": int(row.offset),
        "timestamp_ms": int(row.timestamp),
        "key": _b64(row.key),
        "headers": [[header.key, _b64(header.value)] for header in (row.headers or [])],
    }


class HighWater:
    """Per-partition high water in the order records reach it: for each record, the
    greatest of (valid event time, Kafka timestamp) over the records seen before it."""

    def __init__(self) -> None:
        self._marks: Dict[Tuple[str, int], int] = {}

    def observe(self, topic: str, partition: int, event_time_ms: Optional[int], kafka_ms: int) -> Optional[int]:
        key = (topic, partition)
        before = self._marks.get(key)
        candidates = [kafka_ms] + ([event_time_ms] if event_time_ms is not None else [])
        if before is not None:
            candidates.append(before)
        self._marks[key] = max(candidates)
        return before


class _ToSourceRecordDoFn(beam.DoFn):
    def __init__(self, config: KafkaReadConfig, contract: Optional[EventContract]):
        self._use_field = config.time_source == "field"
        self._contract = contract
        self._high_water = HighWater()

    def process(self, row) -> Iterator[window.TimestampedValue]:
        raw = bytes(row.value) if row.value is not None else b""
        source = source_of(row)
        kafka_ms = source["timestamp_ms"]
        event_time = self._contract.peek_event_time_ms(raw) if self._use_field else kafka_ms
        high_water = self._high_water.observe(source["topic"], source["partition"], event_time, kafka_ms)
        emit_ms = event_time if event_time is not None else (high_water if high_water is not None else kafka_ms)
        yield window.TimestampedValue(SourceRecord(raw, source, high_water), emit_ms / 1000.0)


class ReadFromKafkaWithJava(beam.PTransform):
    """Reads a Kafka topic with Beam's Java KafkaIO as ``PCollection[SourceRecord]``.

    Same records as :class:`onceflow.io.kafka.read.ReadFromKafka`: ``value`` is
    the raw record bytes, ``source`` is ``{"topic", "partition", "offset",
    "timestamp_ms", "key", "headers"}`` (key and header values base64, or None).

    **Where it runs** (tested in ``tests/io/test_kafka_java.py``): on Beam's Flink
    job server (``--runner=PortableRunner --job_endpoint=... --environment_type=LOOPBACK
    --streaming``, plus ``--checkpointing_interval=<ms>`` for offset commits) with
    ``expansion_service`` = a Beam 2.62 Java expansion service started with
    ``--defaultEnvironmentType=EMBEDDED --experiments=use_deprecated_read`` and the
    Kafka IO jars on the job server's classpath: the dev stack's ``kafka-expansion``
    service (:func:`onceflow_dev.devstack.kafka_expansion.address`) and ``flink``
    service. Flink then reads with KafkaIO's legacy ``UnboundedSource`` natively,
    inside the job server; the small Java conversion step runs in an in-process
    Java harness; the Python steps run in the LOOPBACK workers. KafkaIO's
    splittable-DoFn expansion is accepted by that job server but never reads a
    record. It does **not** run on the DirectRunner (cross-language transforms
    never reach Prism there, and the FnApiRunner cannot execute Java), nor on
    ``--runner=PrismRunner``: Prism rejects the legacy ``beam:transform:read:v1``
    and has no EMBEDDED environment, and a DOCKER Java environment needs Docker
    (absent here). On Dataflow it would need an expansion service of the job's
    Beam version; not tested (Dataflow cannot be reached from here).
    ``expansion_service=None`` uses Beam's default, which fetches
    ``beam-sdks-java-io-expansion-service`` at the SDK's version: not served here.
    Beam 2.77's own ``apache_beam.io.kafka.ReadFromKafka`` cannot be expanded by
    a 2.62 service (it sends fields 2.62 lacks); this class sends a payload that
    2.62 accepts.

    **Positions**: ``committed`` (``group.id`` and ``auto.offset.reset`` = the
    fallback, earliest or latest), ``earliest``/``latest`` without a group,
    ``timestamp`` (KafkaIO's ``start_read_time``; Java fails the pipeline when a
    partition has no record at or after it). Refused with ValueError: start at
    offsets, a timestamp fallback, earliest/latest with a group (KafkaIO would
    resume from the group's commits), and **every bounded read**: cross-language
    KafkaIO has no stop offset; its stop time is ignored by the legacy source that
    Flink runs here (the read would never end) and, in the splittable-DoFn form,
    fails when a partition has no record at or after it; ``max_num_records`` is a
    count, not a position.
    ``client_settings`` go to the Java consumer unchanged (Java property names).

    **Delivery**: with a group, offsets are committed when Flink completes a
    checkpoint (``commit_offset_in_finalize``; needs ``--checkpointing_interval``;
    tested). At-least-once: after a restart records since the last commit are read
    again.

    **Time**: KafkaIO's ``CreateTime`` policy for both time sources (topics must
    use CreateTime, Kafka's default). The Java reader cannot read a JSON field, so
    for ``time_source="field"`` Beam's watermark still follows Kafka timestamps;
    elements are re-stamped here with their event time (``record``: the Kafka
    timestamp), as the Python reader does.

    **Lateness (the guarantee is weaker than the Python reader's)**. A Python
    step right after the read keeps, per partition, the greatest of (valid event
    time, Kafka timestamp) over the records it saw before each record and
    attaches it as ``high_water_ms``. Including Kafka timestamps keeps it at or
    above KafkaIO's own per-partition watermark (max Kafka timestamp read so far)
    as long as a partition's records reach that step in offset order, which holds
    on Flink (each partition is read by exactly one source reader, in offset
    order, and the Python step is chained to it; tested) but is not guaranteed
    elsewhere (e.g. with a redistribute after the read). What it cannot see: when a
    partition is caught up, KafkaIO advances that partition's watermark to the
    wall clock (max delay 0 in the cross-language builder). A record that then
    arrives with an event time whose window, plus the allowed lateness, already
    closed by the wall clock can be dropped by Beam as late **without a DLQ entry**.
    So with this reader "nothing vanishes silently" holds while reading a backlog
    and for records that arrive within their window's allowed lateness, not for
    records produced later than that; use the Python reader where it must hold
    always. The high water also restarts empty with the pipeline, and lateness
    decisions depend on arrival order, not only on the log.
    """

    def __init__(
        self,
        config: KafkaReadConfig,
        contract: Optional[EventContract] = None,
        expansion_service: Optional[str] = None,
    ):
        super().__init__()
        if config.time_source == "field" and contract is None:
            raise ValueError("reading event time from a field needs the event contract")
        check_supported(config)
        self._config = config
        self._contract = contract
        self._expansion_service = expansion_service
        self._payload = payload(config)

    def describe(self) -> Dict[str, Any]:
        """The read's settings with secrets redacted: safe to log or print."""
        shown = self._payload._asdict()
        shown["consumer_config"] = redact(self._payload.consumer_config)
        shown["expansion_service"] = self._expansion_service or "Beam's default (downloads a jar)"
        return shown

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        _LOG.info("reading %s with Java KafkaIO: %s", self._config.topic.url, self.describe())
        expansion = self._expansion_service
        if expansion is None:
            from apache_beam.io.kafka import default_io_expansion_service

            expansion = default_io_expansion_service()
        rows = pbegin | "JavaKafkaIO" >> ExternalTransform(
            URN_WITH_METADATA, NamedTupleBasedPayloadBuilder(self._payload), expansion
        )
        return rows | "ToSourceRecord" >> beam.ParDo(_ToSourceRecordDoFn(self._config, self._contract))
