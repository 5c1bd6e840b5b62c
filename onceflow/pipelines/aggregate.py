"""The main job: raw events to windowed aggregates, upserted idempotently.

    python -m onceflow.pipelines.aggregate [--flags]

With no flags it aggregates the bundled sample of orders into
``onceflow-output/aggregates.db`` (SQLite) on the DirectRunner and prints a
summary. ``--help`` lists the flags.

    read ──► ParseEvents ──► WindowedAggregate ──► WriteRows (guarded upsert)
                  │            (too-late, dedup)
                  └──────────────────┴──► dead-letter queue
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import fastavro
from apache_beam.io.filesystem import FileSystem
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from onceflow.aggregates import AggregateSpec, parse_aggregates, value_fields
from onceflow.errors import ServiceError, UsageError, exit_status, is_interruption
from onceflow.events import REGISTRY_FORMATS, EventContract, format_utc_ms
from onceflow.io.archive import ReadArchive, check_archive, is_archive
from onceflow.io.dlq import WriteDeadLetters, parse_dlq_target, prepare_dlq
from onceflow.io.file_sink import PROGRESS_MANIFEST, window_file_name
from onceflow.io.files import (
    ReadRecordBatchesFromFiles, UnreadableInputFile, absolute_local_path, first_avro_writer_schema, format_by_name,
    missing_filesystem,
)
from onceflow.io.flink_rest import FlinkRestError
from onceflow.io.kafka.config import (
    COMMITTED, EARLIEST, KafkaReadConfig, client_error_line, client_error_text, client_settings_from_flags,
    is_kafka_url, parse_kafka_url, parse_position,
)
from onceflow.io.kafka.admin import (
    PositionPastEnd, check_named_partitions, describe_gaps, describe_topic, offsets_past_end_notes,
    partitions_left_out_note, resolve_partition_reads, topic_id,
)
from onceflow.io.kafka.errors import (
    BROKER_UP_HINT, BrokerRefused, BrokerUnreachable, TopicReplaced, UnknownGroupOrTopic, is_broker_away,
)
from onceflow.io.kafka.read import ReadBatchesFromKafka, RetentionGapError
from onceflow.io.retry import DatabaseUnreachable
from onceflow.io.schema_registry import (
    RegistryConfig, RegistryUnavailable, kafka_settings_without_registry, registry_settings,
)
from onceflow.io.progress import (
    SETTINGS_SUFFIX, JobSettings, KeepProgress, Position, StoreAddedPartitions, changed_settings, kept_topics,
    settings_positions, start_position, topic_replaced,
)
from onceflow.io.sinks import (
    WriteRows, check_window_size, database_client, holds_no_rows, parse_sink_url, position_sinks, prepare_sink,
    progress_store,
)
from onceflow.io.targets import Target
from onceflow.io.urls import first_line
from onceflow.observability.monitor import Monitor
from onceflow.options import (
    ONCEFLOW_OPTION_CLASSES, AggregateOptions, EventOptions, FlinkOptions, InputOptions, KafkaOptions, MonitoringOptions,
    OutputOptions, WindowOptions, flag_error, help_text, optional_text, parse_flag, parse_optional_flag,
    parse_pipeline_args, positive_duration_ms, positive_int, split_fields, whole_seconds_ms, window_spec_of,
)
from onceflow.pipelines import flink_savepoint
from onceflow.pipelines.flink_savepoint import SavepointStop
from onceflow.pipelines.summary import RunSummary, collect_summary
from onceflow.runners import (
    default_shards, is_hang_up, local_batch_runner, prepare_runner, quiet_worker_errors_reported_in_one_line,
    quiet_worker_teardown, runs_on_flink, runs_on_prism, silence_worker_threads,
)
from onceflow.rows import DEFAULT_BATCH_ROWS, RowSchema
from onceflow.transforms import AggregateEvents, Aggregated, BatchRecords
from onceflow.transforms.batched import DEFAULT_SHARDS
from onceflow.versions import ONCEFLOW_VERSION
from onceflow.windowing import WindowSpec

PIPELINE_NAME = "aggregate"


@dataclasses.dataclass(frozen=True)
class AggregateJob:
    """Everything the aggregate pipeline needs, validated."""

    input_pattern: str
    contract: EventContract
    window_spec: WindowSpec
    aggregates: Tuple[AggregateSpec, ...]
    sink: Target
    dlq: Target
    early_firing_ms: Optional[int] = None
    sink_batch_size: int = DEFAULT_BATCH_ROWS
    kafka: Optional[KafkaReadConfig] = None  # set when --input is kafka://...
    from_archive: bool = False  # --input is an archive folder (onceflow.pipelines.archive)
    kafka_idle_timeout_ms: int = 30_000
    shards: int = DEFAULT_SHARDS
    kafka_readers: int = 1
    time_source: str = "field"  # --kafka_time_source, for a Kafka or archive input

    @property
    def row_schema(self) -> RowSchema:
        return RowSchema(self.contract.key_fields, self.aggregates)

    @property
    def is_live(self) -> bool:
        """A live (unbounded) Kafka read: the job runs until stopped."""
        return self.kafka is not None and not self.kafka.bounded


def job_from_options(options: PipelineOptions) -> AggregateJob:
    """Validates the flags into an :class:`AggregateJob`; UsageError names the flag."""
    source = options.view_as(InputOptions)
    event = options.view_as(EventOptions)
    windows = options.view_as(WindowOptions)
    output = options.view_as(OutputOptions)
    aggregate_text = options.view_as(AggregateOptions).aggregate

    aggregates = parse_flag("--aggregate", parse_aggregates, aggregate_text)
    window_spec = window_spec_of(windows.window, windows.window_period, windows.allowed_lateness)
    early_ms = parse_optional_flag("--early_firing", whole_seconds_ms, windows.early_firing)

    input_pattern = str(source.input)
    if not input_pattern.strip():  # it named the working directory
        raise UsageError("--input: empty; give a file or glob, an archive folder or kafka://HOST:PORT/TOPIC "
                         "(leave the flag out for the bundled sample)")
    kafka_topic = None
    archived = False  # an archive folder: a topic's records, with their Kafka timestamps
    if is_kafka_url(input_pattern):
        kafka_topic = parse_flag("--input", parse_kafka_url, input_pattern)
    elif source.read_from or source.read_to:
        raise UsageError("--from/--to: only a kafka://HOST:PORT/TOPIC input reads a range")
    else:
        # Absolute: Beam matches a bare local glob (*.jsonl) to nothing, and records' sources name their files.
        input_pattern = absolute_local_path(input_pattern)
        missing = missing_filesystem(input_pattern)
        if missing:
            raise UsageError(f"--input: {missing}")
        given = options.get_all_options(drop_default=True)
        archived = _is_archive(input_pattern)
        misplaced = [name for name in _KAFKA_INPUT_FLAGS if given.get(name) is not None
                     and not (archived and name == "kafka_time_source")]
        if misplaced:
            raise UsageError(f"--{misplaced[0]}: only a kafka://HOST:PORT/TOPIC input reads with it; remove it")
    input_format = source.input_format or format_by_name(input_pattern)
    writer_schema = None
    if input_format == "avro":
        if kafka_topic is not None:
            raise UsageError("--input_format: plain Avro from Kafka has no writer schema; produce records in the "
                             "schema registry's wire format and use --input_format avro_registry")
        writer_schema = parse_flag("--input", first_avro_writer_schema, input_pattern)
    kafka_options = options.view_as(KafkaOptions)
    try:
        kafka_settings = client_settings_from_flags(kafka_options.kafka_setting, kafka_options.kafka_config_file)
    except ValueError as error:
        raise UsageError(str(error)) from None
    sink = parse_flag("--sink", parse_sink_url, output.sink)
    dlq = parse_flag("--dlq", parse_dlq_target, optional_text(output.dlq) or "")
    sink_avro = sink.scheme == "kafka" and sink.option("format") == "avro_registry"
    dlq_avro = dlq.scheme == "kafka" and dlq.option("format") == "avro_registry"
    registry, reader_schema = _registry_options(source, input_format, kafka_settings, sink_avro or dlq_avro)
    if sink_avro:
        sink = dataclasses.replace(sink, registry=registry)
    if dlq_avro:
        dlq = dataclasses.replace(dlq, registry=registry)
    _check_sink_and_dlq_apart(sink, dlq)
    if input_format in REGISTRY_FORMATS and kafka_topic is None and not archived:
        raise UsageError(f"--input_format {input_format}: registry-framed records are read from a "
                         "kafka://HOST:PORT/TOPIC input (or an archive of one)")
    on_kafka = kafka_topic is not None or sink.scheme == "kafka" or dlq.scheme == "kafka" or registry is not None
    if not on_kafka and (kafka_options.kafka_setting or kafka_options.kafka_config_file):
        flag = "--kafka_setting" if kafka_options.kafka_setting else "--kafka_config_file"
        raise UsageError(f"{flag}: nothing in this job is on Kafka (--input, --sink and --dlq are not kafka://, "
                         "no schema registry): the setting would be ignored; remove it")
    kafka_settings = tuple(kafka_settings_without_registry(kafka_settings).items())

    key_fields = split_fields(event.key_fields, "--key_fields")
    if not str(event.time_field or "").strip():
        raise UsageError("--time_field: empty; give the name of the field that holds each event's time")
    try:
        contract = EventContract(
            time_field=str(event.time_field).strip(),
            key_fields=key_fields,
            value_fields=value_fields(aggregates),
            id_field=optional_text(event.id_field),
            input_format=input_format,
            avro_writer_schema=writer_schema,
            registry=registry if input_format in REGISTRY_FORMATS else None,
            avro_reader_schema=reader_schema,
        )
    except ValueError as error:
        raise UsageError(f"--key_fields/--time_field/--aggregate: {error}") from None

    try:
        row_schema = RowSchema(contract.key_fields, aggregates)
    except ValueError as error:
        raise UsageError(f"--key_fields/--aggregate: {error}") from None
    if sink_avro:
        from onceflow.io.kafka.write import row_avro_schema

        try:
            fastavro.parse_schema(row_avro_schema(row_schema), named_schemas={})
        except Exception as error:  # a column name Avro does not allow
            raise UsageError(f"--sink: ?format=avro_registry: the rows have no valid Avro schema: {error}") from None
    if sink.scheme == "kafka":
        sink = dataclasses.replace(sink, client_settings=kafka_settings)
    if dlq.scheme == "kafka":
        dlq = dataclasses.replace(dlq, client_settings=kafka_settings)
    kafka = None
    if kafka_topic is not None:
        kafka = _kafka_read_config(kafka_topic, source, kafka_options, dict(kafka_settings))
    idle_ms = parse_flag("--kafka_idle_timeout", positive_duration_ms, kafka_options.kafka_idle_timeout)
    if kafka is not None and not kafka.bounded and progress_store(sink) is None:
        which = "bigquery:// sinks with ?method=cdc" if sink.scheme == "bigquery" else f"{sink.scheme}:// sinks"
        raise UsageError(f"--sink: a live job keeps its Kafka positions with its rows, and {which} cannot hold "
                         f"them; write to one that can ({position_sinks()}), or backfill into it with --from/--to")
    return AggregateJob(
        kafka=kafka,
        from_archive=archived,
        kafka_idle_timeout_ms=idle_ms,
        input_pattern=input_pattern,
        contract=contract,
        window_spec=window_spec,
        aggregates=aggregates,
        sink=sink,
        dlq=dlq,
        early_firing_ms=early_ms,
        sink_batch_size=positive_int(output.sink_batch_size, "--sink_batch_size"),
        shards=_shards(options, live=kafka is not None and not kafka.bounded),
        kafka_readers=positive_int(kafka_options.kafka_readers, "--kafka_readers"),
        time_source=kafka_options.kafka_time_source,
    )


# The flags of reading a topic, refused with any other input (not silently ignored).
_KAFKA_INPUT_FLAGS = ("kafka_group", "kafka_readers", "kafka_idle_timeout", "kafka_time_source",
                      "allow_retention_gaps")


def _shards(options: PipelineOptions, live: bool) -> int:
    text = options.view_as(AggregateOptions).shards
    given = None if text is None else positive_int(text, "--shards")
    savepoint = optional_text(options.view_as(FlinkOptions).savepoint_path)
    if live and savepoint is not None and runs_on_flink(options):  # elsewhere the flag is refused later
        return flink_savepoint.shards_to_restore(savepoint, given)
    return default_shards(options, live) if given is None else given


def _kafka_read_config(topic, source: InputOptions, kafka_options: KafkaOptions,
                       settings: Dict[str, str]) -> KafkaReadConfig:
    try:
        start = parse_position(source.read_from, "--from") if source.read_from else EARLIEST
        stop = parse_position(source.read_to, "--to") if source.read_to else None
    except ValueError as error:
        raise UsageError(str(error)) from None
    if stop is None and start.kind == "offsets":
        raise UsageError("--from: offsets:... is for bounded reads (with --to); a live job resumes from the "
                         "positions stored with its rows, and its first start on a sink from the group's "
                         "committed offsets, else --from earliest, latest or a time")
    group = optional_text(kafka_options.kafka_group)
    if stop is None and group is None:
        raise UsageError("--kafka_group: a live read needs a consumer group to commit offsets to")
    try:
        if stop is None:  # live: committed offsets first, --from where there are none
            return KafkaReadConfig(topic, start=COMMITTED, start_fallback=start, group_id=group,
                                   time_source=kafka_options.kafka_time_source, client_settings=settings)
        return KafkaReadConfig(topic, start=start, stop=stop, group_id=None,
                               time_source=kafka_options.kafka_time_source, client_settings=settings,
                               allow_retention_gaps=bool(source.allow_retention_gaps))
    except ValueError as error:
        raise UsageError(f"--from/--to: {error}") from None


def _registry_options(source: InputOptions, input_format: str, kafka_settings: Dict[str, str],
                      sink_avro: bool = False):
    """The schema registry (of --input_format avro_registry or json_registry, or of
    a kafka:// sink or DLQ with ?format=avro_registry) and the reader schema;
    refused when nothing uses them. UsageError never shows a credential."""
    url = optional_text(source.schema_registry_url)
    reader_path = optional_text(source.avro_reader_schema)
    if input_format not in REGISTRY_FORMATS:
        if reader_path:
            raise UsageError("--avro_reader_schema: only --input_format avro_registry takes a reader schema")
        if not sink_avro:
            if url or source.schema_registry_setting:
                flag = "--schema_registry_url" if url else "--schema_registry_setting"
                raise UsageError(f"{flag}: only --input_format avro_registry or json_registry, or a kafka:// sink "
                                 "or DLQ with ?format=avro_registry, uses a schema registry")
            return None, None
    if not url:
        needer = f"--input_format {input_format}" if input_format in REGISTRY_FORMATS else \
            "a kafka:// sink or DLQ with ?format=avro_registry"
        raise UsageError(f"--schema_registry_url: {needer} needs the registry's URL, e.g. http://127.0.0.1:8081")
    try:
        settings = registry_settings(source.schema_registry_setting, kafka_settings)
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        registry = RegistryConfig(url, settings)
    except ValueError as error:
        raise flag_error("--schema_registry_url", error) from None
    reader_schema = None
    if reader_path:
        if input_format != "avro_registry":
            raise UsageError("--avro_reader_schema: only --input_format avro_registry takes a reader schema")
        try:
            with open(reader_path, encoding="utf-8") as handle:
                reader_schema = json.load(handle)
            fastavro.parse_schema(reader_schema, named_schemas={})
        except (OSError, ValueError, fastavro.schema.SchemaParseException) as error:
            raise UsageError(f"--avro_reader_schema: {reader_path!r} is not a readable Avro schema: "
                             f"{error}"[:300]) from None
    return registry, reader_schema


def build(pipeline: beam.Pipeline, job: AggregateJob) -> Aggregated:
    """Adds the whole job (read, transform, write) to ``pipeline``."""
    if job.kafka is not None:
        # A live job stores a partition added while it runs before reading it (StoreAddedPartitions).
        store_added = StoreAddedPartitions(progress_store(job.sink), job.kafka.group_id) if job.is_live else None
        batches = pipeline | "ReadKafka" >> ReadBatchesFromKafka(
            job.kafka, job.contract, idle_timeout_s=job.kafka_idle_timeout_ms / 1000, readers=job.kafka_readers,
            finalize_every_bundle=runs_on_prism(pipeline.options), on_partitions_added=store_added)
    elif job.from_archive:
        batches = (pipeline
                   | "ReadArchive" >> ReadArchive(job.input_pattern, job.contract, job.time_source)
                   | "BatchRecords" >> BatchRecords(job.contract, time_source=job.time_source))
    else:
        batches = pipeline | "ReadFiles" >> ReadRecordBatchesFromFiles(job.input_pattern, job.contract)
    # One composite for every source (files, Kafka, archives): live runs, backfills and replays compute the same rows.
    outputs = batches | "AggregateEvents" >> AggregateEvents(
        job.contract, job.window_spec, job.aggregates, early_firing_ms=job.early_firing_ms, shards=job.shards)
    written_rows = outputs.rows | "WriteRows" >> WriteRows(job.sink, job.row_schema, job.sink_batch_size)
    written_letters = outputs.dead_letters | "WriteDeadLetters" >> WriteDeadLetters(
        job.dlq, PIPELINE_NAME, ONCEFLOW_VERSION)
    if job.is_live:  # positions stored once the rows and dead letters before them are written
        (batches, written_rows, written_letters) | "KeepPositions" >> KeepProgress(
            progress_store(job.sink), job.kafka.group_id, job.window_spec, job.kafka.time_source)
    return outputs


def _same_path(one: str, other: str) -> bool:
    """Whether two local paths name the same file (or would, once created)."""
    if os.path.realpath(one) == os.path.realpath(other):
        return True
    try:
        return os.path.samefile(one, other)
    except OSError:  # one of them does not exist yet
        return False


def _inside(path: str, folder: str) -> bool:
    """Whether local ``path`` lies in ``folder`` or below it."""
    folder = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


def _check_sink_and_dlq_apart(sink: Target, dlq: Target) -> None:
    """Refuses a sink and a dead-letter queue in one place: rows and dead letters
    mixed in one topic, file or table make the queue unreadable to ``onceflow dlq``
    (and a row consumer reads dead letters), or fail the run once it writes both."""
    if sink.scheme == "kafka" and dlq.scheme == "kafka":
        same = sink.table == dlq.table and set(sink.location.split(",")) == set(dlq.location.split(","))
    elif sink.scheme == "postgresql" and dlq.scheme == "postgresql":
        same = sink.table == dlq.table and sink.location == dlq.location
    elif sink.scheme == "sqlite" and dlq.scheme == "jsonl":
        same = _same_path(sink.location, dlq.location)
    else:
        same = False
    if same:
        where = {"kafka": "topic", "postgresql": "table"}.get(sink.scheme, "database file")
        raise UsageError(f"--dlq: {dlq.describe()} is the sink's {where}: rows and dead letters cannot share one; "
                         "give the queue its own")


def _local_output_files(job: "AggregateJob") -> List[Tuple[str, str]]:
    """(flag, path) of the local files the run writes: its JSON-lines queue and its
    SQLite sink."""
    outputs = [("--dlq", job.dlq.location)] if job.dlq.scheme == "jsonl" else []
    if job.sink.scheme == "sqlite":
        outputs.append(("--sink", job.sink.location))
    return outputs


def _check_metrics_out(path: Optional[str], job: "AggregateJob", input_files: Sequence[str]) -> None:
    """Refuses a ``--metrics_out`` the summary could not be written to, or that
    would overwrite the run's input (``input_files``), queue or sink, before the
    job runs rather than after."""
    if not path:
        return
    others = _local_output_files(job) + [("--input", name) for name in input_files if "://" not in name]
    for flag, other in others:
        if _same_path(path, other):
            raise UsageError(f"--metrics_out: {path} is this run's {flag} file; the summary would replace it: "
                             "name another file")
    if job.from_archive and "://" not in job.input_pattern and _inside(path, job.input_pattern):
        raise UsageError(f"--metrics_out: {path} is in the archive folder {job.input_pattern}, which holds the "
                         "archive's own files only; name a file outside it")
    if os.path.isdir(path):
        raise UsageError(f"--metrics_out: {path} is a directory; name a file in it, e.g. "
                         f"--metrics_out={os.path.join(path, 'metrics.json')}")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise flag_error("--metrics_out", error) from None
    try:  # as the summary will be written: a file beside it, then renamed
        handle, probe = tempfile.mkstemp(prefix=".metrics-", suffix=".json", dir=directory)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"--metrics_out: cannot write in {directory} ({error.strerror or error}); name a file in "
                         "a folder you can write") from None
    try:
        longest = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):  # a system that does not say
        return
    name = os.fsencode(os.path.basename(path))
    if len(name) > longest:  # the summary's file could not be created once the job had run
        raise UsageError(f"--metrics_out: the file name is {len(name)} bytes long, and {directory} takes names of "
                         f"at most {longest}; give a shorter one")


def _check_outputs_not_read(job: "AggregateJob", metrics_out: Optional[str]) -> None:
    """Refuses a file input whose pattern takes a file this run writes (its
    ``--dlq`` file, SQLite sink or ``--metrics_out``), matched as Beam matches the
    pattern: whether it exists yet or not. With ``--input 'd/*.jsonl' --dlq
    d/dlq.jsonl`` each run read the last run's dead letters as input and
    dead-lettered them again, the queue doubling run after run."""
    if job.kafka is not None or job.from_archive or "://" in job.input_pattern:
        return
    outputs = _local_output_files(job)
    if metrics_out:
        outputs.append(("--metrics_out", metrics_out))
    if job.sink.scheme == "file":  # the folder's window files and positions, as the sink names them
        for name in (window_file_name(0, 60_000, job.sink.option("format")), PROGRESS_MANIFEST):
            outputs.append(("--sink", os.path.join(job.sink.location, name)))
    matches = re.compile(FileSystem.translate_pattern(os.path.abspath(job.input_pattern))).match
    for flag, path in outputs:
        if matches(os.path.abspath(path)):
            what = f"sink folder {job.sink.location}" if flag == "--sink" and job.sink.scheme == "file" else \
                f"{flag} file {path}"
            raise UsageError(f"--input: {job.input_pattern!r} takes this run's {what}, so the job would "
                             f"read what it writes; put the {flag} elsewhere or narrow the pattern")


def _check_input_exists(pattern: str) -> List[str]:
    """The files ``pattern`` matches; UsageError when none, or a directory or an
    archive's files."""
    if os.path.isdir(pattern):  # before Beam's match, which lists the files of "/" itself
        _refuse_directory(pattern)
    try:
        found = beam.io.filesystems.FileSystems.match([pattern])[0].metadata_list
    except Exception as error:
        raise UsageError(f"--input: cannot list {pattern!r}: {error}") from None
    if not found:
        raise UsageError(f"--input: nothing matches {pattern!r}; give a file path or glob")
    archive = _archive_holding(match.path for match in found)
    if archive:
        raise UsageError(f"--input: {pattern!r} matches files of the onceflow archive {archive}; give the "
                         f"folder itself (--input={archive}) so the archive is checked and read whole")
    folders = [match.path for match in found if os.path.isdir(match.path)]  # local paths; others are objects
    if folders:
        _refuse_directory(folders[0])
    return [match.path for match in found]


def _refuse_directory(path: str) -> None:
    raise UsageError(f"--input: {path} is a directory; give its files, e.g. --input={os.path.join(path, '*.jsonl')}")


def _is_archive(path: str) -> bool:
    """:func:`is_archive`, with a file system that refuses or cannot be reached
    (no access, no network: the cloud client's own retries have ended) as one line."""
    try:
        return is_archive(path)
    except Exception as error:  # noqa: BLE001 - any client's error, said in one line
        raise ServiceError(f"--input: cannot look at {path!r} ({first_line(error)}); check the path, the "
                           "network and your access to it") from None


def _archive_holding(paths: Iterable[str]) -> Optional[str]:
    """The archive folder any of ``paths`` lies in (an archive's files are two
    folders below its root: ``topic=T/hour=H/``), if any."""
    folders = set()
    for path in paths:
        for _ in range(3):
            path = os.path.dirname(path.rstrip("/"))
            folders.add(path)
    return next((folder for folder in sorted(folders) if folder and _is_archive(folder)), None)


def with_stored_positions(job: AggregateJob, partitions: List[int], savepoint: Optional[str] = None) -> AggregateJob:
    """A live job resumes from the positions stored with its rows (see
    :mod:`onceflow.io.progress`), keyed by its consumer group: never later than a
    record whose window is not final in the sink, with the high water the lateness
    rule had there. A job's first start on a sink resolves its start as before
    (the group's committed offsets, else ``--from``) and stores it before it reads
    anything, so a kill before the first row loses nothing either. Started from
    a Flink ``savepoint``, the job reads on from the savepoint's positions; the
    stored ones are then only used if Flink starts it without that state."""
    store = progress_store(job.sink)
    config = job.kafka
    topic = config.topic.topic
    flags = JobSettings(job.window_spec, config.time_source, job.contract.time_field, job.contract.id_field or "")
    kafka_topic_id = topic_id(config)
    settings = settings_positions(topic, flags, kafka_topic_id)
    try:
        others = sorted(kept_topics(store) - {topic})
        if others:
            raise UsageError(
                f"--input: {job.sink.describe()} holds the rows of a live job on topic {others[0]} (its positions "
                f"are kept with them), and rows of two topics in one table cannot be told apart; write topic "
                f"{topic}'s rows to another table or sink")
        stored = store.read(config.group_id, topic)
        kept = store.read(config.group_id + SETTINGS_SUFFIX, topic)
        changed = changed_settings(kept, flags) if stored else []
        if changed:
            raise UsageError(
                f"the positions of job {config.group_id!r} in {job.sink.describe()} were kept under other flags: "
                f"this run has {', '.join(changed)}. Resuming under others would rebuild windows from part of "
                "their events: restart with the same flags, or write the new ones to another table with a "
                "backfill (--from/--to) and then a live job there")
        if stored and topic_replaced(kept, kafka_topic_id):
            raise UsageError(
                f"--input: topic {topic} was deleted and created again since job {config.group_id!r} stored its "
                f"positions in {job.sink.describe()} (Kafka's topic ID differs): they name the old topic's "
                "records, and resuming would skip the new one's. Start the job over on the new topic: delete its "
                "positions, backfill the topic (--from/--to), then restart (docs/guarantees.md, Restarts)")
        if stored and _rows_deleted(job, stored.values()):
            raise UsageError(
                f"--sink: {job.sink.describe()} holds no rows, but the positions job {config.group_id!r} stored "
                "there say windows with events are final in it: its rows were deleted (the table dropped or "
                "emptied), and resuming would not rebuild them. Backfill them into it (--from earliest "
                "--to latest), then restart; or start the job over (docs/guarantees.md, Restarts)")
        if savepoint is not None and not stored:
            raise UsageError(
                f"--savepoint_path: job {config.group_id!r} has never run on {job.sink.describe()}, so the "
                "savepoint is another run's (another sink or group): restoring its windows and positions here "
                "would mix them into these rows; start without --savepoint_path")
        # A topic ID the broker did not give (None) replaces a kept one only at a first start.
        store.write(config.group_id + SETTINGS_SUFFIX,
                    [entry for entry in settings if entry.high_water_ms is not None or not stored])
        if not stored:
            reads = resolve_partition_reads(config, partitions)
            # A committed offset retention has deleted is stored as it is: the read reports the gap.
            stored = {r.partition: start_position(r) for r in reads}
            store.write(config.group_id, list(stored.values()))
            where = "first start on this sink: stored its start positions"
        else:
            where = "resuming from the positions stored with the rows"
            gone = sorted(set(stored) - set(partitions))
            if gone:
                raise ServiceError(
                    f"--sink: the job's positions stored in {job.sink.describe()} name partitions {gone} that "
                    f"{topic} no longer has: the topic was deleted and created again with fewer; delete the "
                    "job's positions to start it over (see docs/guarantees.md, Restarts)")
            added = sorted(set(partitions) - set(stored))
            if added:
                found = positions_of_added_partitions(config, added, stored.values(), job.window_spec)
                store.write(config.group_id, list(found.values()))
                stored = {**stored, **found}
                where += (f"; partitions {added} are new since the last run: read from their log start, "
                          f"{_added_partitions_rule(found, job.window_spec)}")
    except Exception as error:  # the sink's own client errors too (psycopg, sqlite3, google): one line
        if not (database_client(error) or isinstance(error, (OSError, ValueError))):
            raise
        raise ServiceError(f"--sink: cannot read or store the job's positions in {job.sink.describe()}: "
                           f"{(str(error).splitlines() or [type(error).__name__])[0]}") from None
    offsets = ", ".join(f"{p}@{stored[p].next_offset}" for p in sorted(stored))
    if savepoint is not None:
        where = (f"starting from the savepoint {savepoint}; the positions stored with the rows count only if "
                 "Flink starts it without that state")
    print(f"aggregate: job {config.group_id!r}, {where} (partition@offset: {offsets})", file=sys.stderr)
    resume = tuple((p, stored[p].next_offset, stored[p].high_water_ms) for p in sorted(stored))
    return dataclasses.replace(job, kafka=dataclasses.replace(config, resume=resume, topic_id=kafka_topic_id))


def _rows_deleted(job: AggregateJob, stored: Iterable[Position]) -> bool:
    """Whether the sink has lost rows its job's stored positions say it holds: a
    position with a high water and a final point was stored after the windows of
    the event that set that high water were final, so their rows were written. With
    Kafka timestamps as event times refused records move the high water too, and
    nothing can be said."""
    if job.kafka.time_source == "record":
        return False
    if not any(p.high_water_ms is not None and p.final_through_ms is not None for p in stored):
        return False
    return holds_no_rows(job.sink)


def positions_of_added_partitions(config: KafkaReadConfig, added: List[int], stored: Iterable[Position],
                                  spec: WindowSpec) -> Dict[int, Position]:
    """Where partitions added to the topic while the job was stopped start: at
    their log start, with the high water that makes the lateness rule refuse
    exactly their records whose windows are already final in the sink.

    The stored positions say which windows are final (``final_through_ms``: every
    window ending by then). The restart does not rebuild those windows, so a new
    partition's records for them were counted in rows the sink then refused as
    older versions (counted nowhere), or, where they outnumbered the part
    re-read, written into a row short of the other partitions' events. A high
    water of the latest final point plus the allowed lateness makes them
    ``too_late`` dead letters instead (:meth:`WindowSpec.is_too_late`: too late when
    the earliest window's end is at or before that final point); records of any
    later window are counted, and those windows are rebuilt in full from every
    partition. With no final point stored (nothing final yet) there is no high
    water, as at a first start. The caller stores these positions before reading,
    so a kill before they move gives the next restart the same verdicts."""
    finals = [position.final_through_ms for position in stored if position.final_through_ms is not None]
    high_water = max(finals) + spec.allowed_lateness_ms if finals else None
    reads = resolve_partition_reads(dataclasses.replace(config, resume=()), added)
    return {read.partition: Position(read.topic, read.partition, read.start_offset, high_water) for read in reads}


def _added_partitions_rule(found: Dict[int, Position], spec: WindowSpec) -> str:
    high_water = next(iter(found.values())).high_water_ms
    if high_water is None:
        return "every record counted (no window is final in the sink yet)"
    final_through = format_utc_ms(high_water - spec.allowed_lateness_ms)
    return f"their records for windows ending by {final_through} (final in the sink) go to the DLQ as too_late"


def run(argv: Optional[Sequence[str]] = None) -> RunSummary:
    """Parses flags, runs the job to completion and returns its summary."""
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    options = parse_pipeline_args(args)
    job = job_from_options(options)
    identity = None if job.kafka is None or not job.is_live else flink_savepoint.job_identity(
        job.kafka.group_id, job.kafka.topic.url, job.sink.describe())
    savepoints = flink_savepoint.savepoint_stop_from_options(options, job.is_live, job.shards, identity)
    if savepoints is not None:
        flink_savepoint.check_reachable(savepoints)
    expected_records = None
    # A live job (kept running by a supervisor) waits out a broker restart; a backfill fails at once.
    broker_wait_s = BROKER_WAIT_S if job.is_live else 0
    # Every check that creates nothing first: a refused run leaves no table behind (a sink
    # table created with this run's columns refused the corrected run's other aggregates).
    input_files: List[str] = []  # a file input's files, listed once
    if job.kafka is not None:  # the input first: a refused login is about it, before any output
        partitions = _retrying_while_broker_away(lambda: _describe_input(job), broker_wait_s)
        try:
            check_named_partitions(job.kafka, partitions)
        except ValueError as error:
            raise UsageError(str(error)) from None
        note = partitions_left_out_note(job.kafka, partitions)
        if note:
            print(f"aggregate: note: {note}", file=sys.stderr)
    elif job.from_archive:
        try:
            holes = check_archive(job.input_pattern)
        except ValueError as error:
            raise UsageError(f"--input: {error}") from None
        for hole in holes:
            print(f"aggregate: warning: the archive {job.input_pattern} lacks records: {hole}", file=sys.stderr)
    else:
        input_files = _check_input_exists(job.input_pattern)
    _check_metrics_out(options.view_as(MonitoringOptions).metrics_out, job, input_files)
    _check_outputs_not_read(job, options.view_as(MonitoringOptions).metrics_out)
    if job.early_firing_ms is not None and not job.is_live:
        print("aggregate: note: --early_firing is for live jobs: a backfill writes each window once it is complete",
              file=sys.stderr)
    if job.kafka is not None and not job.is_live and options.get_all_options(drop_default=True).get("kafka_group"):
        print("aggregate: note: --kafka_group is for live jobs: a backfill (--to) reads without a consumer group "
              "and commits no offsets to it", file=sys.stderr)
    # The runner before the positions: a job refused here must not have stored a start
    # (a later run with other flags would resume from it and skip what it asked for).
    prepare_runner(options, job.is_live, job.kafka is not None, job.kafka_readers)
    # Then the outputs: the queue (its table or folder has one shape for every job) before the sink.
    try:
        prepare_dlq(job.dlq)
    except DatabaseUnreachable as error:  # a service down: the same run may work later
        raise ServiceError(f"--dlq: {error}") from None
    except (ValueError, OSError) as error:
        raise flag_error("--dlq", error) from None
    try:
        prepare_sink(job.sink, job.row_schema)
        check_window_size(job.sink, job.window_spec.size_ms)
    except DatabaseUnreachable as error:
        raise ServiceError(f"--sink: {error}") from None
    except (ValueError, OSError) as error:
        raise flag_error("--sink", error) from None
    if job.kafka is not None:  # then the positions, kept in the prepared sink
        savepoint = optional_text(options.view_as(FlinkOptions).savepoint_path)
        job, reads = _retrying_while_broker_away(lambda: _resolve_kafka_start(job, partitions, savepoint),
                                                 broker_wait_s)
        if savepoint is not None and savepoints is None:
            print("aggregate: warning: without --flink_rest_url nothing checks that Flink restores the savepoint "
                  "(Beam's embedded Flink ignores it); if it does not, the job resumes from the positions stored "
                  "with the rows", file=sys.stderr)
        for note in offsets_past_end_notes(job.kafka, reads):
            print(f"aggregate: note: {note}", file=sys.stderr)
        gaps = [read.retention_gap for read in reads if read.retention_gap is not None]
        if gaps and job.kafka.bounded and not job.kafka.allow_retention_gaps:
            raise ServiceError(f"--from/--to: {describe_gaps(gaps)}; pass --allow_retention_gaps to read what is "
                               "left, or start later")
        if gaps:
            print(f"aggregate: warning: {describe_gaps(gaps)}" + (
                "; reading what is left" if job.kafka.bounded else
                "; the job's stored positions point at deleted records: resuming from the log start (at most "
                "that many lost: what the last run read after its stored positions was counted then)"),
                file=sys.stderr)
        if gaps and job.is_live:  # said once: the next restart would report the same gap again
            progress_store(job.sink).write(job.kafka.group_id, [
                Position(read.topic, read.partition, read.start_offset, read.high_water_ms)
                for read in reads if read.retention_gap is not None])
        if job.kafka.bounded:  # the backfill's size, for its progress line
            expected_records = sum(read.stop_offset - read.start_offset for read in reads)
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    started = time.monotonic()
    pipeline = beam.Pipeline(runner=local_batch_runner(options, job.is_live), options=options)
    build(pipeline, job)
    quiet_worker_errors_reported_in_one_line((UnreadableInputFile, RetentionGapError, RegistryUnavailable,
                                              UnknownGroupOrTopic, TopicReplaced, KeyboardInterrupt), _OUTPUT_STEPS)
    with Monitor(options, runner, expected_records=expected_records, live=job.is_live) as monitor, \
            _stop_signals_as_interrupt(job.is_live, signal.SIGTERM) as stop:
        try:
            result = pipeline.run()
            monitor.watch(result)
            quiet_worker_teardown()  # the runner's hang-up is reported once, below, not by each worker thread
            # After run(): Beam's Prism job server sets a SIGINT handler there that stops Prism first.
            with _stop_signals_as_interrupt(job.is_live, signal.SIGINT, stop):
                runner_answers = _wait_or_stop(result, savepoints, stop, runner, runs_on_flink(options))
            if not runner_answers:  # nothing is left to cancel or to ask: Monitor.finish fills in its figures
                return monitor.finish(RunSummary(runner, time.monotonic() - started, {}, job.sink.describe(),
                                                 job.dlq.describe()))
        except Exception as error:  # a worker's error comes back wrapped by the runner
            silence_worker_threads()  # the job reports it, below: its worker threads' teardown is noise
            if is_interruption(error):  # Ctrl-C while a step ran: not that step's failure
                raise KeyboardInterrupt from None
            gap = _retention_gap_line(error)  # retention deleted part of the range while it was read
            if gap is not None:
                raise ServiceError(f"--from/--to: {gap}") from None
            prism = _line_in_error(error, r"(Unable to fetch remote prism binary at \S+: [^\n]*)")
            if prism is not None:  # no --prism_location, and no Prism built by `onceflow dev up` in this folder
                raise ServiceError(f"--runner: {prism}; build Prism here with `onceflow dev up --services prism`, "
                                   "or give --prism_location=PATH of a Prism binary") from None
            jar = _line_in_error(error, r"(Unable to fetch remote job server jar at \S+: [^\n]*?)\. ")
            if jar is not None:  # Beam downloads the job server of the Flink it is told, or of its default
                raise ServiceError(f"--runner: {jar}; give --flink_version (of the Flink at --flink_master), or "
                                   "--flink_job_server_jar, or --runner=PortableRunner --job_endpoint=HOST:PORT "
                                   "of a running job server") from None
            failed_write = _output_step_failure(error)
            if failed_write is not None:
                raise ServiceError(failed_write) from None
            if _line_in_error(error, r"failed in state (CANCELLED)") is not None:  # not by this process: it waits
                raise ServiceError("--runner: the job was cancelled on the runner (from outside this process: the "
                                   "job server, Flink's web UI or REST API); rows written stay in the sink: run it "
                                   "again (a live job resumes from the positions stored with its rows)") from None
            deleted = _worker_error_line(error, UnknownGroupOrTopic)
            if deleted is not None:  # the start found the topic: it was deleted while the job read it
                raise ServiceError(f"--input: {deleted.split(';')[0]} any more: it was deleted while the job read "
                                   "it; if it was created again, see docs/guarantees.md, Restarts") from None
            replaced = _worker_error_line(error, TopicReplaced)
            if replaced is not None:
                raise ServiceError(f"--input: {replaced}: the job stopped before reading the new topic at the old "
                                   "one's offsets; a restart refuses its stored positions (see "
                                   "docs/guarantees.md, Restarts)") from None
            unreadable = _worker_error_line(error, UnreadableInputFile)
            if unreadable is not None:
                raise UsageError(f"--input: {unreadable}") from None
            failure = _registry_failure(error)
            if failure:  # transient or setup, never a bad record: one line, status 1
                raise ServiceError(f"{failure}; no record was dead-lettered for it: rerun when it answers") from None
            restore = _savepoint_restore_failure(error)
            if restore is not None and options.view_as(FlinkOptions).savepoint_path:
                raise UsageError(f"--savepoint_path: {restore}; give the path the stop printed with the flags it "
                                 "ran with, or start without --savepoint_path: the job then resumes from the "
                                 "positions stored in the sink") from None
            lost = _runner_failure(error)
            if lost is not None:
                raise ServiceError(f"--runner: the runner failed the job: {lost}; rows written stay in the sink: "
                                   "run it again (a live job resumes from the positions stored with its rows)"
                                   ) from None
            raise
        return monitor.finish(collect_summary(result, runner, time.monotonic() - started, job.sink.describe(),
                                              job.dlq.describe(), mirror=monitor.mirror()),
                              counted_elsewhere=(options.view_as(FlinkOptions).loopback_worker_processes or 1) > 1)


def _describe_input(job: AggregateJob) -> List[int]:
    """The input topic's partitions; UsageError naming --input when it is missing
    (as a sink or queue topic that is: running the same command again fails again)."""
    try:
        return describe_topic(job.kafka)
    except UnknownGroupOrTopic as error:
        raise UsageError(f"--input: {error}") from None
    except BrokerRefused as error:  # a login or certificate problem: one line, no waiting
        raise ServiceError(f"--input: {error}") from None
    except BrokerUnreachable:
        raise  # maybe restarting: the caller waits for it
    except RuntimeError as error:
        raise ServiceError(f"--input: {error}") from None


def _resolve_kafka_start(job: AggregateJob, partitions: List[int], savepoint: Optional[str] = None):
    """The job with its stored positions (live) and where each partition's read
    starts and stops (``savepoint``: the one Flink starts it from, if any)."""
    if job.is_live:
        job = with_stored_positions(job, partitions, savepoint)
    try:
        return job, resolve_partition_reads(job.kafka, partitions)
    except PositionPastEnd as error:
        raise ServiceError(f"--sink: {error}") from None


BROKER_WAIT_S = 120


def _retrying_while_broker_away(action, wait_s: float = BROKER_WAIT_S):
    """``action()``, tried again every few seconds for up to ``wait_s`` while the
    broker or a partition leader is away (a restart, a leader election), so a job
    started during a broker restart starts once it is back instead of exiting."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return action()
        except Exception as error:  # the client's KafkaException, or our BrokerUnreachable
            away = isinstance(error, BrokerUnreachable) and not isinstance(error, BrokerRefused)
            if not (away or is_broker_away(error)):
                raise
            if time.monotonic() > deadline:
                if isinstance(error, BrokerUnreachable):
                    waited = f"still no answer after {wait_s:.0f}s of tries: " if wait_s else ""
                    raise ServiceError(f"--input: {waited}{error}") from None
                raise ServiceError(f"--input: Kafka did not answer for {wait_s:.0f}s: "
                                   f"{client_error_text(error)}") from None
            print(f"aggregate: waiting for Kafka (up to {wait_s:.0f}s): {client_error_text(error)}", file=sys.stderr)
            time.sleep(3)


def _retention_gap_line(error: BaseException) -> Optional[str]:
    """The reader's :class:`RetentionGapError` line, from an exception the runner
    raised (it arrives as text inside the runner's own error)."""
    if isinstance(error, RetentionGapError):
        return str(error)
    return _line_in_error(error, RetentionGapError.__name__ + r": ([^\n]*lost to retention[^\n]*)")


def _registry_failure(error: BaseException) -> Optional[str]:
    """The line of a :class:`RegistryUnavailable` inside a runner's error, if any."""
    return _line_in_error(error, r"(schema registry \S+ did not give schema \d+ after [^\n]*)")


def _savepoint_restore_failure(error: BaseException) -> Optional[str]:
    """What Flink said when it could not start the job from ``--savepoint_path``."""
    missing = _line_in_error(error, r"FileNotFoundException: Cannot find checkpoint or savepoint file/directory "
                                    r"('[^'\n]*')")
    if missing is not None:
        return f"Flink finds no savepoint at {missing}"
    if _line_in_error(error, r"(Unexpected magic number)") is not None:
        return "Flink read no savepoint there (not a savepoint, or a corrupt one)"
    if _line_in_error(error, r"(Cannot find meta data file '_metadata')") is not None:
        return "Flink finds no savepoint there (the directory holds no _metadata)"
    if _line_in_error(error, r"(java\.io\.EOFException)") is not None:  # a _metadata cut off
        return "Flink could not read the savepoint to its end (a cut-off or corrupt _metadata)"
    operator = _line_in_error(error, r"Cannot map checkpoint/savepoint state for operator (\S+) to the new program")
    if operator is not None:
        # --allow_non_restored_state is no way out: it drops the readers' starting state too, and a second
        # set of readers then reads every record again.
        return (f"the savepoint does not fit this job (Flink cannot map the state of its operator {operator}: "
                "another --parallelism, other steps or another onceflow version)")
    return None


# The steps that write the job's output, and the flag that names each output.
_OUTPUT_STEPS = ("WriteRows", "WriteDeadLetters")


def _output_step_failure(error: BaseException) -> Optional[str]:
    """One line for an error a sink or DLQ writer raised: a permanent error (a
    transient one is retried before it gets here), which fails the bundle. The
    DirectRunner raises the writer's error itself, with the step in its message;
    the other runners send its traceback as text."""
    import re

    texts = (str(cause) for cause in _error_chain(error))
    text = next((text for text in texts if any(f"[while running '{step}/" in text for step in _OUTPUT_STEPS)), None)
    if text is None:
        return None
    if "Traceback (most recent call last)" in text:  # a worker's traceback as text: its last exception line
        match = re.search(r"^[\w.]+: ([^\n]*)(?:\n[^\n]*){0,20}?\[while running '(?:WriteRows|WriteDeadLetters)/",
                          text, re.MULTILINE)
        message = match.group(1) if match else text.strip().splitlines()[-1]
    else:
        message = text.split("\n")[0]
    flag = "--dlq" if "[while running 'WriteDeadLetters/" in text else "--sink"
    return (f"{flag}: a write failed with an error that is not retried: {message.split(' [while running ')[0]}; "
            "what was written before it stays (every write is an upsert or keyed by dlq_id): fix the cause and "
            "run again")


def _worker_error_line(error: BaseException, kind: type) -> Optional[str]:
    """The message of a ``kind`` error a worker raised, found in the runner's
    error: as the error itself or one it was raised from (the DirectRunner's
    workers run in this process), or as text in its message (the others)."""
    import re

    raised = next((cause for cause in _error_chain(error) if isinstance(cause, kind)), None)
    found = str(raised).strip() if raised is not None else _line_in_error(error, kind.__name__ + r": ([^\n]*)")
    return None if found is None else re.sub(r"\s*\[while running [^\]]*\]$", "", found)


def _runner_failure(error: BaseException) -> Optional[str]:
    """The runner's reason for a job it failed with no Python error of a step
    (Prism losing its SDK worker after a hang: "SDK worker disconnected"); None
    when a step raised (its traceback is the report) or the runner said nothing."""
    reason = _line_in_error(error, r"failed in state FAILED: ([^\n]+)")
    if reason is None or any("Traceback (most recent call last)" in str(cause) for cause in _error_chain(error)):
        return None
    return reason


def _line_in_error(error: Optional[BaseException], pattern: str) -> Optional[str]:
    """The first group of ``pattern`` in the text of ``error`` or of the errors it
    was raised from (a worker's error comes back wrapped by the runner)."""
    import re

    for cause in _error_chain(error):
        found = re.search(pattern, str(cause))
        if found:
            return found.group(1).strip()
    return None


def _error_chain(error: Optional[BaseException], limit: int = 10) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from, at most ``limit``."""
    for _ in range(limit):
        if error is None:
            return
        yield error
        error = error.__cause__ or error.__context__


class _StopAsked:
    """Whether a stop signal has reached the live job."""

    def __init__(self) -> None:
        self.asked = False


@contextlib.contextmanager
def _stop_signals_as_interrupt(live: bool, signum: int, stop: Optional[_StopAsked] = None):
    """While a live job runs, ``signum`` stops it the way Ctrl-C does: with a
    savepoint or cancelled, then the summary. For SIGTERM (what supervisors send);
    for SIGINT once ``pipeline.run()`` has returned, in place of the handler Beam's
    Prism job server sets there, which stops Prism before the job can cancel its
    pipeline. The handler records the stop in the yielded :class:`_StopAsked`.
    Elsewhere, and off the main thread (where no handler can be set), the signal
    is left alone."""
    stop = stop if stop is not None else _StopAsked()
    if not live or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def interrupt(_signum, _frame):
        stop.asked = True
        raise KeyboardInterrupt

    previous = signal.signal(signum, interrupt)
    try:
        yield stop
    finally:
        signal.signal(signum, previous)


def _wait_or_stop(result: beam.runners.runner.PipelineResult, savepoints: Optional[SavepointStop],
                  stop: _StopAsked, runner: str, on_flink: bool = False) -> bool:
    """Waits until the job ends, or until a stop signal stops it (with a savepoint
    or cancelled; on Flink also through its REST API when ``--flink_rest_url`` is
    given, else with a warning that the job may still run there). False when the
    runner went away with the stop signal, so that nothing is left to cancel or to
    ask for figures; a runner gone without one is a one-line ServiceError. A
    worker's error comes back from the runner as a failed job and is raised as it
    is."""
    try:
        if savepoints is not None:
            _attach_to_flink(savepoints, result)
        result.wait_until_finish()
        return True
    except KeyboardInterrupt:  # a live job runs until stopped: stop it, then summarise
        with_savepoint = savepoints is not None and savepoints.savepoint_dir is not None
        print("aggregate: stopping" + (" with a savepoint..." if with_savepoint else "..."), file=sys.stderr)
        if with_savepoint:
            _stop_with_savepoint(savepoints, result)
            return True
        answered = _cancel(result)
        if savepoints is not None:
            flink_savepoint.cancel_on_flink(savepoints)
        elif on_flink:
            print("aggregate: warning: cancelled through the job server, which can leave the job running (or "
                  "restarting) on Flink: check Flink's web UI, or run with --flink_rest_url=http://HOST:PORT so "
                  "that a stop cancels it there too", file=sys.stderr)
        return answered
    except Exception as error:
        if not is_hang_up(error):  # the job service's stream broke: the runner has gone
            raise
        if not stop.asked:
            raise ServiceError(f"{runner} stopped answering ({error.code().name}: {error.details()}): the job ended "
                               "there; rows written stay in the sink; run it again (a live job resumes from its "
                               "stored positions, a backfill rewrites the same rows)") from None
        print("aggregate: stopping...", file=sys.stderr)
        return False


def _attach_to_flink(savepoints: SavepointStop, result: beam.runners.runner.PipelineResult) -> None:
    """Waits until Flink runs the job (see :func:`flink_savepoint.attach`); when
    its REST API cannot show it, cancels the job and raises the one-line error."""
    try:
        flink_savepoint.attach(savepoints, lambda: _has_ended(result))
    except ServiceError:
        _cancel(result)
        flink_savepoint.cancel_on_flink(savepoints)
        raise


def _stop_with_savepoint(savepoints: SavepointStop, result: beam.runners.runner.PipelineResult) -> None:
    """Stops the job with a savepoint and prints where it is and how to resume,
    then waits for the runner to see the job end. When Flink cannot take the
    savepoint, or a second interrupt comes first, the job is cancelled as
    without the flag and a one-line error (status 1) or the interrupt (130) follows."""
    try:
        location = flink_savepoint.stop_with_savepoint(savepoints)
    except FlinkRestError as error:
        _cancel(result)
        unlisted = isinstance(error, flink_savepoint.JobNotListed)  # maybe still being submitted: wait for it
        wait_s = flink_savepoint.NOT_YET_LISTED_WAIT_S if unlisted else 0.0
        if flink_savepoint.cancel_on_flink(savepoints, wait_s) or not unlisted:
            instead = "the job was cancelled instead"
        else:
            instead = (f"no job of that name appeared on Flink within {wait_s:.0f}s, so none was cancelled there "
                       "(check Flink's web UI)")
        raise ServiceError(f"--flink_savepoint_dir: could not stop with a savepoint: {error}; {instead} (a restart "
                           "resumes from the positions stored with its rows)") from None
    except KeyboardInterrupt:
        _cancel(result)
        flink_savepoint.cancel_on_flink(savepoints)
        raise KeyboardInterrupt from None
    print(flink_savepoint.resume_hint(location), file=sys.stderr)
    _wait_for_the_end(result, timeout_s=60.0)


def _wait_for_the_end(result: beam.runners.runner.PipelineResult, timeout_s: float) -> None:
    """Waits (at most ``timeout_s``) until the runner reports the job ended, so
    the summary has its last counters."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not _has_ended(result):
        time.sleep(0.5)


def _has_ended(result: beam.runners.runner.PipelineResult) -> bool:
    """Whether the runner reports the job in a final state (or no longer answers)."""
    from apache_beam.runners.runner import PipelineState

    try:
        return PipelineState.is_terminal(result.state)
    except Exception:  # the job service went away: nothing more to wait for
        return True


def _cancel(result: beam.runners.runner.PipelineResult) -> bool:
    """Cancels the pipeline; False when the runner is gone already (a Ctrl-C in a
    terminal reaches Prism too, and Beam stops the Prism it started), so there is
    nothing left to cancel or to ask for a summary."""
    import grpc

    try:
        result.cancel()
        return True
    except (ValueError, grpc.RpcError):  # "Cannot invoke RPC on closed channel", or UNAVAILABLE
        return False


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m onceflow.pipelines.aggregate") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(help_text(prog, __doc__.strip().splitlines()[0],
                        (*ONCEFLOW_OPTION_CLASSES, FlinkOptions)))
        return 0
    _stacks_on_sigusr1()
    return exit_status("aggregate", lambda: print(_refusing_client_errors(run, args).render()))


def _stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints the stack of every thread of the job's process to
    stderr and the job goes on: what a job that makes no progress is waiting for
    (with LOOPBACK, the SDK worker's threads are among them).

    A Python handler, run by the main thread between two steps of its own, holding
    the interpreter's lock: ``faulthandler``'s all-thread dump reads the other
    threads' frames while they run, and killed a live job once in a CI run
    (SIGSEGV while dumping)."""
    if not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGUSR1, _print_stacks)


def _print_stacks(_signum, _frame) -> None:
    import traceback

    try:
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        current = threading.get_ident()
        lines = []
        for ident, frame in sys._current_frames().items():  # pylint: disable=protected-access
            which = "Current thread" if ident == current else "Thread"
            lines.append(f"{which} 0x{ident:016x} ({names.get(ident, '?')}, most recent call first):")
            lines.extend(f'  File "{entry.filename}", line {entry.lineno} in {entry.name}'
                         for entry in reversed(traceback.extract_stack(frame)))
            lines.append("")
        stream = sys.__stderr__ or sys.stderr
        stream.write("\n".join(lines) + "\n")
        stream.flush()
    except Exception:  # pylint: disable=broad-except  # never the job's failure: a diagnostic only
        pass


def _refusing_client_errors(action, args):
    """``action(args)``, a Kafka client's refusal of the settings as a one-line
    UsageError (secrets scrubbed) instead of a traceback. Without the kafka extra
    installed there is no Kafka client to refuse anything."""
    try:
        from confluent_kafka import KafkaException
    except ImportError:
        return action(args)
    try:
        return action(args)
    except KafkaException as error:
        if is_broker_away(error):  # not a setting: the broker or a partition leader is away
            raise ServiceError(f"Kafka did not answer: {client_error_text(error)}; {BROKER_UP_HINT}") from None
        options = parse_pipeline_args(args).view_as(KafkaOptions)
        settings = client_settings_from_flags(options.kafka_setting, options.kafka_config_file)
        raise UsageError(client_error_line(error, settings)) from None


if __name__ == "__main__":
    sys.exit(main())
