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

import dataclasses
import sys
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from onceflow.aggregates import AggregateSpec, parse_aggregates, value_fields
from onceflow.errors import UsageError
from onceflow.events import EventContract
from onceflow.io.dlq import WriteDeadLettersToJsonl
from onceflow.io.files import ReadRecordsFromFiles, read_avro_writer_schema
from onceflow.io.sinks import SinkTarget, WriteRows, parse_sink_url, prepare_sink
from onceflow.options import (
    AggregateOptions, EventOptions, InputOptions, OutputOptions, WindowOptions,
    flag_error, help_text, optional_text, parse_pipeline_args, positive_int, split_fields,
)
from onceflow.pipelines.summary import RunSummary, collect_summary
from onceflow.rows import RowSchema
from onceflow.transforms import ParseEvents, WindowedAggregate
from onceflow.versions import ONCEFLOW_VERSION
from onceflow.windowing import WindowSpec, parse_duration_ms

PIPELINE_NAME = "aggregate"


@dataclasses.dataclass(frozen=True)
class AggregateJob:
    """Everything the aggregate pipeline needs, validated."""

    input_pattern: str
    contract: EventContract
    window_spec: WindowSpec
    aggregates: Tuple[AggregateSpec, ...]
    sink: SinkTarget
    dlq_path: str
    early_firing_ms: Optional[int] = None
    sink_batch_size: int = 500

    @property
    def row_schema(self) -> RowSchema:
        return RowSchema(self.contract.key_fields, self.aggregates)


class AggregateOutputs(NamedTuple):
    rows: beam.PCollection
    dead_letters: beam.PCollection


def job_from_options(options: PipelineOptions) -> AggregateJob:
    """Validates the flags into an :class:`AggregateJob`; UsageError names the flag."""
    source = options.view_as(InputOptions)
    event = options.view_as(EventOptions)
    windows = options.view_as(WindowOptions)
    output = options.view_as(OutputOptions)
    aggregate_text = options.view_as(AggregateOptions).aggregate

    try:
        aggregates = parse_aggregates(aggregate_text)
    except ValueError as error:
        raise flag_error("--aggregate", error) from None
    try:
        size_ms = parse_duration_ms(windows.window)
        if size_ms <= 0:
            raise ValueError("the window size must be more than 0")
    except ValueError as error:
        raise flag_error("--window", error) from None
    period_ms = None
    if optional_text(windows.window_period):
        try:
            period_ms = parse_duration_ms(windows.window_period)
        except ValueError as error:
            raise flag_error("--window_period", error) from None
    try:
        lateness_ms = parse_duration_ms(windows.allowed_lateness)
    except ValueError as error:
        raise flag_error("--allowed_lateness", error) from None
    early_ms = None
    if optional_text(windows.early_firing):
        try:
            early_ms = parse_duration_ms(windows.early_firing)
            if early_ms <= 0 or early_ms % 1000:
                raise ValueError("the early firing interval must be a whole number of seconds, e.g. 10s")
        except ValueError as error:
            raise flag_error("--early_firing", error) from None
    try:
        window_spec = WindowSpec(size_ms, period_ms, lateness_ms)
    except ValueError as error:
        raise flag_error("--window_period", error) from None

    input_pattern = str(source.input)
    input_format = source.input_format or ("avro" if input_pattern.endswith(".avro") else "json")
    writer_schema = None
    if input_format == "avro":
        writer_schema = _first_avro_schema(input_pattern)

    key_fields = split_fields(event.key_fields, "--key_fields")
    try:
        contract = EventContract(
            time_field=str(event.time_field).strip(),
            key_fields=key_fields,
            value_fields=value_fields(aggregates),
            id_field=optional_text(event.id_field),
            input_format=input_format,
            avro_writer_schema=writer_schema,
        )
    except ValueError as error:
        raise UsageError(f"--key_fields/--time_field/--aggregate: {error}") from None

    try:
        sink = parse_sink_url(output.sink)
    except ValueError as error:
        raise flag_error("--sink", error) from None
    try:
        RowSchema(contract.key_fields, aggregates)
    except ValueError as error:
        raise UsageError(f"--key_fields/--aggregate: {error}") from None
    dlq_path = optional_text(output.dlq)
    if dlq_path is None:
        raise UsageError("--dlq: a path is needed; dead letters are never dropped")
    return AggregateJob(
        input_pattern=input_pattern,
        contract=contract,
        window_spec=window_spec,
        aggregates=aggregates,
        sink=sink,
        dlq_path=dlq_path,
        early_firing_ms=early_ms,
        sink_batch_size=positive_int(output.sink_batch_size, "--sink_batch_size"),
    )


def _first_avro_schema(pattern: str) -> dict:
    matches = beam.io.filesystems.FileSystems.match([pattern])[0].metadata_list
    if not matches:
        raise UsageError(f"--input: nothing matches {pattern!r}")
    try:
        return read_avro_writer_schema(sorted(m.path for m in matches)[0])
    except Exception as error:  # a corrupt or non-Avro file: say so in one line
        raise UsageError(f"--input: cannot read an Avro header from {pattern!r}: {error}") from None


def aggregate_events(records: beam.PCollection, job: AggregateJob) -> AggregateOutputs:
    """The transforms of the job, from raw records to rows and dead letters.

    Shared by every source (files now; Kafka and archives use the same steps), so
    live runs, backfills and replays compute the same rows.
    """
    parsed = records | "ParseEvents" >> ParseEvents(job.contract)
    aggregated = parsed.events | "WindowedAggregate" >> WindowedAggregate(
        job.contract.key_fields, job.window_spec, job.aggregates, early_firing_ms=job.early_firing_ms,
    )
    dead_letters = (parsed.dead_letters, aggregated.dead_letters) | "AllDeadLetters" >> beam.Flatten()
    return AggregateOutputs(aggregated.rows, dead_letters)


def build(pipeline: beam.Pipeline, job: AggregateJob) -> AggregateOutputs:
    """Adds the whole job (read, transform, write) to ``pipeline``."""
    records = pipeline | "ReadFiles" >> ReadRecordsFromFiles(job.input_pattern, job.contract)
    outputs = aggregate_events(records, job)
    outputs.rows | "WriteRows" >> WriteRows(job.sink, job.row_schema, job.sink_batch_size)
    outputs.dead_letters | "WriteDeadLetters" >> WriteDeadLettersToJsonl(
        job.dlq_path, PIPELINE_NAME, ONCEFLOW_VERSION)
    return outputs


def _check_input_exists(pattern: str) -> None:
    try:
        found = beam.io.filesystems.FileSystems.match([pattern])[0].metadata_list
    except Exception as error:
        raise UsageError(f"--input: cannot list {pattern!r}: {error}") from None
    if not found:
        raise UsageError(f"--input: nothing matches {pattern!r}; give a file path or glob")


def run(argv: Optional[Sequence[str]] = None) -> RunSummary:
    """Parses flags, runs the job to completion and returns its summary."""
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    options = parse_pipeline_args(args)
    job = job_from_options(options)
    _check_input_exists(job.input_pattern)
    try:
        prepare_sink(job.sink, job.row_schema)
    except (ValueError, OSError) as error:
        raise flag_error("--sink", error) from None
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    started = time.monotonic()
    pipeline = beam.Pipeline(options=options)
    build(pipeline, job)
    result = pipeline.run()
    result.wait_until_finish()
    return collect_summary(result, runner, time.monotonic() - started, job.sink.describe(), job.dlq_path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(help_text("python -m onceflow.pipelines.aggregate", __doc__.strip().splitlines()[0]))
        return 0
    try:
        summary = run(args)
    except UsageError as error:
        print(f"aggregate: error: {error}", file=sys.stderr)
        return 2
    print(summary.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
