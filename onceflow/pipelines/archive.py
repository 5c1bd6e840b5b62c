"""The archive job: raw Kafka records to files, so history outlives retention.

    python -m onceflow.pipelines.archive --input kafka://HOST:PORT/TOPIC \\
        --from 2026-11-02T09:00:00Z --to 2026-11-02T10:00:00Z --output DIR [--archive_format parquet]

A bounded read of the range (default: everything retained), written as one file
per topic, hour (of the Kafka timestamp) and partition with deterministic names
(see :mod:`onceflow.io.archive`); run it again over the same range and the files
are the same. ``python -m onceflow.pipelines.aggregate --input DIR`` then reads the
archive through the same transforms as a live or backfill run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult

from onceflow import metrics
from onceflow.errors import ServiceError, UsageError, exit_status
from onceflow.io.archive import FORMATS, WriteArchive, holes_left_by, read_manifest, write_marker
from onceflow.io.kafka.admin import (check_named_partitions, describe_gaps, describe_topic, log_starts,
                                     offsets_past_end_notes, partitions_left_out_note, resolve_partition_reads,
                                     topic_id)
from onceflow.io.kafka.config import (EARLIEST, LATEST, KafkaReadConfig, Position, client_error_line,
                                      client_settings_from_flags, parse_kafka_url, parse_position)
from onceflow.io.kafka.errors import UnknownGroupOrTopic
from onceflow.io.kafka.read import ReadFromKafka
from onceflow.observability.snapshot import snapshot_from_query
from onceflow.options import (AggregateOptions, EventOptions, FlinkOptions, InputOptions, KafkaOptions,
                              MonitoringOptions, OutputOptions, WindowOptions, flag_error, help_text,
                              parse_pipeline_args)
from onceflow.runners import local_batch_runner, prepare_runner, quiet_worker_errors_reported_in_one_line

PIPELINE_NAME = "archive"
_LOCAL_RUNNERS = ("directrunner", "direct")


class ArchiveOptions(PipelineOptions):
    """Where and how the archive job writes."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("archive")
        group.add_argument("--output", default=None, help="The archive folder (local). Required.")
        group.add_argument("--archive_format", default="avro", choices=FORMATS,
                           help="File format of the archive: avro or parquet. Default: avro.")


def config_from_options(options: PipelineOptions) -> KafkaReadConfig:
    source = options.view_as(InputOptions)
    kafka = options.view_as(KafkaOptions)
    if options.get_all_options(drop_default=True).get("input") is None:  # the main job's default is a file
        raise UsageError("--input: the archive job copies a Kafka topic: give --input=kafka://HOST:PORT/TOPIC")
    try:
        topic = parse_kafka_url(source.input)
    except ValueError as error:
        raise UsageError(f"--input: {error}") from None
    try:
        start = parse_position(source.read_from, "--from") if source.read_from else EARLIEST
        stop = parse_position(source.read_to, "--to") if source.read_to else LATEST
        settings = client_settings_from_flags(kafka.kafka_setting, kafka.kafka_config_file)
    except ValueError as error:
        raise UsageError(str(error)) from None
    # Given: a value other than the default, both parsed (Beam's drop_default compares the parsed
    # value with the unparsed default, and takes a typed flag for given when it is not).
    defaults = parse_pipeline_args([]).get_all_options()
    given = {name for name, value in options.get_all_options().items() if value != defaults.get(name)}
    unused = sorted(given & set(_AGGREGATE_ONLY_FLAGS))
    if unused:
        raise UsageError(f"--{unused[0]}: the archive job copies records as they are, with their Kafka "
                         "coordinates; give it to the aggregate job that reads the archive (or the topic)")
    running = sorted(given & set(_RUNNING_JOB_FLAGS))
    if running:  # accepted and ignored before: no port, no file, and nothing said why
        raise UsageError(f"--{running[0]}: the archive job runs to its end in this process and prints one line; it "
                         "has no status line, health endpoint, metrics file or Flink savepoint")
    try:
        return KafkaReadConfig(topic, start=start, stop=stop, time_source="record", client_settings=settings,
                               allow_retention_gaps=bool(source.allow_retention_gaps))
    except ValueError as error:
        raise UsageError(f"--from/--to: {error}") from None


def _flags_of(*option_classes) -> Tuple[str, ...]:
    parser = argparse.ArgumentParser()
    for option_class in option_classes:
        option_class._add_argparse_args(parser)
    return tuple(action.dest for action in parser._actions if action.dest != "help")


# The aggregate job's flags that mean nothing to the archive job (it takes --input,
# --from, --to, --allow_retention_gaps and the Kafka client settings).
_AGGREGATE_ONLY_FLAGS = (
    "input_format", "schema_registry_url", "schema_registry_setting", "avro_reader_schema", "kafka_group",
    "kafka_readers", "kafka_idle_timeout", "kafka_time_source",
    *_flags_of(EventOptions, WindowOptions, AggregateOptions, OutputOptions),
)
# The aggregate job's flags for watching and stopping a running job.
_RUNNING_JOB_FLAGS = _flags_of(MonitoringOptions, FlinkOptions)


def build(pipeline: beam.Pipeline, config: KafkaReadConfig, output: str, archive_format: str,
          ranges: Optional[Dict[int, Tuple[int, int]]] = None, gaps: Sequence[str] = ()) -> beam.PCollection:
    return (pipeline
            | "ReadKafka" >> ReadFromKafka(config)
            | "WriteArchive" >> WriteArchive(output, archive_format, ranges, gaps))


def _holes_this_run_leaves(manifest: Dict, reads: Sequence, lows: Dict[int, int],
                           config: KafkaReadConfig) -> List[str]:
    """Refuses, in one line, a run that would leave offsets between the archive's
    ranges and its own that no run read (a reader of the archive would take it for
    the whole topic): records still in the topic are for this run to start at; records
    retention has deleted are a gap, archived past only with
    ``--allow_retention_gaps``. Returns the gaps allowed, as the manifest keeps them."""
    allowed = []
    for read in reads:
        for first, stop in holes_left_by(manifest, read.partition, read.start_offset, read.stop_offset):
            still = stop > lows[read.partition]  # some of them are still in the topic
            if still or not config.allow_retention_gaps:
                if not still:
                    remedy = ("they were deleted by retention before an archive run read them: pass "
                              "--allow_retention_gaps to archive what is left (a job reading the archive then says so)")
                elif first == read.stop_offset:
                    remedy = f"stop where the archive begins (--to offsets:{read.partition}={stop}), or give the run " \
                             "its own folder"
                else:
                    remedy = f"start where the archive ends (--from offsets:{read.partition}={first}) or earlier, " \
                             "or give the run its own folder"
                raise UsageError(
                    f"--from/--to: this run reads offsets {read.start_offset}-{read.stop_offset - 1} of partition "
                    f"{read.partition}, and with the ranges archived before it leaves offsets {first}-{stop - 1} "
                    f"out of the archive, which a job reading it would take for the whole topic; {remedy}")
            allowed.append(f"topic {config.topic.topic} partition {read.partition} offsets {first}-{stop - 1} were "
                           "deleted by retention before an archive run read them")
    for line in allowed:
        print(f"archive: warning: {line}", file=sys.stderr)
    return allowed


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Archives the range; returns the number of files written."""
    options = parse_pipeline_args(list(sys.argv[1:] if argv is None else argv))
    config = config_from_options(options)
    archive = options.view_as(ArchiveOptions)
    if not archive.output:
        raise UsageError("--output: the archive folder is required, e.g. --output archive/orders")
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    if runner.lower() not in _LOCAL_RUNNERS:
        raise UsageError(f"--runner={runner}: the archive job writes a local folder, so it runs here, on the "
                         "DirectRunner: leave --runner out")
    prepare_runner(options, live=False, reads_kafka=True, kafka_readers=1)
    try:
        partitions = describe_topic(config)
    except UnknownGroupOrTopic as error:  # as for the main job: a wrong name, not a service failing
        raise UsageError(f"--input: {error}") from None
    except RuntimeError as error:
        raise ServiceError(f"--input: {error}") from None
    try:
        check_named_partitions(config, partitions)
    except ValueError as error:
        raise UsageError(str(error)) from None
    note = partitions_left_out_note(config, partitions)
    if note:
        print(f"archive: note: {note}", file=sys.stderr)
    try:
        reads = resolve_partition_reads(config, partitions)
        lows = log_starts(config, partitions)
    except RuntimeError as error:
        raise ServiceError(f"--input: {error}") from None
    for note in offsets_past_end_notes(config, reads):
        print(f"archive: note: {note}", file=sys.stderr)
    gaps = [read.retention_gap for read in reads if read.retention_gap is not None]
    if gaps and not config.allow_retention_gaps:
        raise ServiceError(f"--from/--to: {describe_gaps(gaps)}; pass --allow_retention_gaps to archive what is "
                           "left, or start later")
    if gaps:
        print(f"archive: warning: {describe_gaps(gaps)}; archiving what is left", file=sys.stderr)
    try:
        manifest = read_manifest(archive.output)
    except ValueError as error:
        raise flag_error("--output", error) from None
    lost = _holes_this_run_leaves(manifest, reads, lows, config)
    try:
        write_marker(archive.output, archive.archive_format, config.topic.topic, topic_id(config))
    except (ValueError, OSError) as error:
        raise flag_error("--output", error) from None
    started = time.monotonic()
    quiet_worker_errors_reported_in_one_line((KeyboardInterrupt,))  # Ctrl-C: "archive: interrupted"
    pipeline = beam.Pipeline(runner=local_batch_runner(options, live=False), options=options)
    # The ranges resolved here, read exactly: the manifest records what the run covered.
    exact = dataclasses.replace(config, start=Position("offsets", {r.partition: r.start_offset for r in reads}),
                                stop=Position("offsets", {r.partition: r.stop_offset for r in reads}))
    ranges = {r.partition: (r.start_offset, r.stop_offset) for r in reads}
    build(pipeline, exact, archive.output, archive.archive_format, ranges,
          [*(describe_gaps([gap]) for gap in gaps), *lost])
    result = pipeline.run()
    result.wait_until_finish()
    files = files_written(result)
    print(f"onceflow archive: {config.topic.url} ({config.start.describe()} to {config.stop.describe()}) "
          f"archived to {archive.output} in {files} files in {time.monotonic() - started:.1f}s")
    return files


def files_written(result: PipelineResult) -> int:
    """The number of archive files the finished run wrote (the runner's committed
    counter where it reports one, the attempted one otherwise)."""
    query = result.metrics().query(MetricsFilter().with_namespace(metrics.NAMESPACE)
                                   .with_name(metrics.ARCHIVE_FILES_WRITTEN))
    snapshot = snapshot_from_query(query, 0.0, prefer_committed=True)
    return int(snapshot.counters.get(metrics.ARCHIVE_FILES_WRITTEN, 0))


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m onceflow.pipelines.archive") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(help_text(prog, __doc__.strip().splitlines()[0], (InputOptions, KafkaOptions, ArchiveOptions),
                        leave_out=_AGGREGATE_ONLY_FLAGS,
                        help_overrides={
                            "input": "The topic to archive: kafka://HOST:PORT/TOPIC. Required.",
                            "read_from": "Where the archived range starts: earliest (default), latest, an "
                                         "ISO-8601 timestamp or offsets:P=O,...; to top an archive up, where "
                                         "it ends (its last offsets plus one), or the range it holds is "
                                         "written again.",
                            "read_to": "Where it stops: latest (default: the end offsets when the job "
                                       "starts), an ISO-8601 timestamp or offsets:P=O,...",
                        }))
        return 0
    return exit_status("archive", lambda: _succeeded(_refusing_client_errors(args)))


def _refusing_client_errors(args: Sequence[str]) -> int:
    """``run(args)``, a Kafka client's refusal of the settings as a one-line
    UsageError (secrets scrubbed) instead of a traceback."""
    from confluent_kafka import KafkaException

    try:
        return run(args)
    except KafkaException as error:
        kafka = parse_pipeline_args(list(args)).view_as(KafkaOptions)
        settings = client_settings_from_flags(kafka.kafka_setting, kafka.kafka_config_file)
        raise UsageError(client_error_line(error, settings)) from None


def _succeeded(files: int) -> int:
    """The exit status of a finished run: 0, whatever number of files it wrote."""
    del files
    return 0


if __name__ == "__main__":
    sys.exit(main())
