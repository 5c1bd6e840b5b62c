"""Pipeline flags: the single source of every onceflow pipeline option.

Each concern is a small :class:`PipelineOptions` subclass, read with ``view_as``;
the same flags drive DirectRunner, Prism, Flink and Dataflow (and the Flex Template
metadata is generated from these classes). Flags Beam already defines are never
redefined; the project's own are prefixed where a name could collide.

Flag values are checked by :func:`parse_pipeline_args`, which turns any mistake
into a :class:`~onceflow.errors.UsageError`: one line naming the flag and the
expected form.
"""

from __future__ import annotations

import argparse
import difflib
import os
from typing import List, Optional, Sequence, Tuple

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from onceflow.errors import UsageError

SAMPLE_INPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data", "orders.jsonl")
DEFAULT_OUTPUT_DIR = "onceflow-output"


class InputOptions(PipelineOptions):
    """Where raw events come from."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("input")
        group.add_argument(
            "--input", default=SAMPLE_INPUT,
            help="What to read: a path or glob of JSON-lines or Avro files (.gz/.bz2 read "
                 "transparently), or kafka://HOST:PORT/TOPIC. Default: the bundled sample of orders.")
        group.add_argument(
            "--input_format", default=None, choices=("json", "avro"),
            help="Record format. Default: avro for .avro files, json otherwise.")
        group.add_argument(
            "--from", dest="read_from", default=None,
            help="Kafka: where to start: earliest, latest, an ISO-8601 timestamp or offsets:P=O,... "
                 "With --to, the start of a bounded read (default earliest); without it, where a "
                 "live read starts partitions that have no committed offset (default earliest).")
        group.add_argument(
            "--to", dest="read_to", default=None,
            help="Kafka: makes the read bounded (a backfill) and says where it stops: latest "
                 "(the end offsets when the read begins), an ISO-8601 timestamp or offsets:P=O,...")


class KafkaOptions(PipelineOptions):
    """Kafka consumer settings for kafka:// inputs."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("kafka")
        group.add_argument(
            "--kafka_group", default="onceflow-aggregate",
            help="Consumer group whose committed offsets a live read resumes from; offsets are "
                 "committed only after the runner has durably taken the records. Default: "
                 "onceflow-aggregate.")
        group.add_argument(
            "--kafka_setting", action="append", default=None, metavar="NAME=VALUE",
            help="A consumer or producer setting passed as is (repeatable), e.g. "
                 "--kafka_setting security.protocol=SASL_SSL --kafka_setting sasl.mechanism=PLAIN. "
                 "Values of settings named like password, secret or key are never logged.")
        group.add_argument(
            "--kafka_time_source", default="field", choices=("field", "record"),
            help="Event time of Kafka records: the --time_field of the record (field) or the "
                 "Kafka record timestamp (record). Default: field.")
        group.add_argument(
            "--kafka_idle_timeout", default="30s",
            help="Live reads: a caught-up partition with no records for this long stops holding "
                 "back the watermark. Default: 30s.")


class EventOptions(PipelineOptions):
    """Which fields of a record are the event's ID, time, and key."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("event contract")
        group.add_argument(
            "--key_fields", default="store",
            help="Comma-separated fields that key the aggregates, e.g. store,sku. Default: store.")
        group.add_argument(
            "--time_field", default="event_time",
            help="Field with the event time: ISO-8601 text (any offset; none means UTC) or "
                 "epoch milliseconds. Default: event_time.")
        group.add_argument(
            "--id_field", default="order_id",
            help="Field with the producer's stable event ID; where absent, an ID is derived "
                 "from the record's content. Pass '' to always derive. Default: order_id.")


class WindowOptions(PipelineOptions):
    """Event-time windowing and lateness."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("windows")
        group.add_argument(
            "--window", default="1m",
            help="Window size: a whole number with a unit (ms, s, m, h, d), e.g. 60s or 5m. Default: 1m.")
        group.add_argument(
            "--window_period", default=None,
            help="For sliding windows: how often a window starts, e.g. --window 10m "
                 "--window_period 1m. Default: fixed (tumbling) windows.")
        group.add_argument(
            "--allowed_lateness", default="5m",
            help="How long after a window ends late events are still counted; later ones go to "
                 "the dead-letter queue as too_late. Default: 5m.")
        group.add_argument(
            "--early_firing", default=None,
            help="When streaming, also emit a window's running result this often "
                 "(processing time), e.g. 10s. Default: none.")


class AggregateOptions(PipelineOptions):
    """What to compute per key and window."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("aggregates")
        group.add_argument(
            "--aggregate", default="count,sum:qty,min:price,max:price,mean:price,last:price",
            help="Comma-separated aggregates: count, sum:F, min:F, max:F, mean:F, first:F, "
                 "last:F; column names are count and FUNCTION_F (e.g. sum_qty). "
                 "Default: count,sum:qty,min:price,max:price,mean:price,last:price.")


class OutputOptions(PipelineOptions):
    """Where results and dead letters go."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("output")
        group.add_argument(
            "--sink", default=f"sqlite:///{DEFAULT_OUTPUT_DIR}/aggregates.db",
            help="Where aggregate rows are upserted (on their key, never replacing a newer "
                 "version): sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db; "
                 "postgresql://USER[:PASS]@HOST:PORT/DB; bigquery://PROJECT.DATASET.TABLE "
                 "(?method=merge|cdc); file:///DIR?format=parquet|avro (one file per window). "
                 "SQL sinks take ?table=NAME (default: aggregates). "
                 f"Default: sqlite:///{DEFAULT_OUTPUT_DIR}/aggregates.db.")
        group.add_argument(
            "--dlq", default=f"{DEFAULT_OUTPUT_DIR}/dlq.jsonl",
            help="Dead-letter queue: a JSON-lines file path, or "
                 "postgresql://USER[:PASS]@HOST:PORT/DB?table=NAME (default table: dead_letters). "
                 f"Default: {DEFAULT_OUTPUT_DIR}/dlq.jsonl.")
        group.add_argument(
            "--sink_batch_size", default="500",
            help="Rows per sink transaction (bounded batches). Default: 500.")


ONCEFLOW_OPTION_CLASSES = (InputOptions, KafkaOptions, EventOptions, WindowOptions, AggregateOptions, OutputOptions)


class _Parser(_BeamArgumentParser):
    """Beam's argument parser, raising UsageError instead of printing usage."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _all_options_parser() -> argparse.ArgumentParser:
    # Every PipelineOptions subclass, as Beam's own get_all_options gathers them.
    parser = _Parser(allow_abbrev=False, add_help=False)
    seen = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser


def help_text(prog: str, description: str) -> str:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     epilog="Beam's own flags (--runner, --streaming, --project, ...) "
                                            "are accepted too.")
    for cls in ONCEFLOW_OPTION_CLASSES:
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser.format_help()


def parse_pipeline_args(argv: Sequence[str]) -> PipelineOptions:
    """PipelineOptions from the command line, refusing unknown or malformed flags.

    Beam itself only logs a warning for a flag it does not know, so a typo would
    silently run with a default; here it is an error with a suggestion.
    """
    parser = _all_options_parser()
    _, unknown = parser.parse_known_args(list(argv))
    if unknown:
        first = unknown[0]
        name = first.split("=", 1)[0]
        known = [opt for action in parser._actions for opt in action.option_strings]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else "; see --help"
        if name.startswith("-"):
            raise UsageError(f"unknown flag {name}{hint}")
        raise UsageError(f"unexpected argument {first!r}; flags look like --name=value{hint}")
    return PipelineOptions(list(argv))


def split_fields(text: str, flag: str) -> Tuple[str, ...]:
    fields = tuple(part.strip() for part in str(text).split(","))
    if not all(fields):
        raise UsageError(f"{flag}: {text!r} is not a comma-separated list of field names, e.g. store,sku")
    return fields


def flag_error(flag: str, error: Exception) -> UsageError:
    return UsageError(f"{flag}: {error}")


def optional_text(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def positive_int(text: str, flag: str) -> int:
    try:
        number = int(str(text))
    except ValueError:
        number = 0
    if number <= 0:
        raise UsageError(f"{flag}: {text!r} is not a positive whole number")
    return number


__all__: List[str] = [
    "AggregateOptions",
    "EventOptions",
    "InputOptions",
    "KafkaOptions",
    "OutputOptions",
    "WindowOptions",
    "parse_pipeline_args",
    "help_text",
]
