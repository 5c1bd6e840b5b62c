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
import logging
import os
import sys
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, _BeamArgumentParser

from onceflow.errors import UsageError
from onceflow.rows import DEFAULT_BATCH_ROWS

if TYPE_CHECKING:
    from onceflow.windowing import WindowSpec

SAMPLE_INPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data", "orders.jsonl")
DEFAULT_OUTPUT_DIR = "onceflow-output"


def _yes_no(text) -> bool:
    """``true``/``false`` (also yes/no, 1/0) for a switch that templates pass a value to."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


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
            "--input_format", default=None, choices=("json", "avro", "avro_registry", "json_registry"),
            help="Record format. avro_registry and json_registry: each record in a schema registry's "
                 "wire format (byte 0, a 4-byte schema ID, then an Avro datum or JSON text), its "
                 "schema fetched from --schema_registry_url. Default: avro for .avro files, json otherwise.")
        group.add_argument(
            "--schema_registry_url", default=None, metavar="URL",
            help="The schema registry (Confluent-compatible REST API; GET URL/schemas/ids/ID) of "
                 "avro_registry and json_registry records, e.g. http://127.0.0.1:8081. Default: none.")
        group.add_argument(
            "--schema_registry_setting", action="append", default=None, metavar="NAME=VALUE",
            help="A schema registry client setting (repeatable): basic.auth.user.info=USER:PASSWORD, "
                 "request.timeout.ms, max.retries. Also read from --kafka_config_file as "
                 "schema.registry.NAME=VALUE lines (or basic.auth.user.info=...); the flag wins. "
                 "Values are never logged. Default: none.")
        group.add_argument(
            "--avro_reader_schema", default=None, metavar="FILE",
            help="avro_registry: an Avro schema (.avsc JSON) to read every record as, resolved "
                 "against each record's writer schema (schema evolution). Default: the writer's.")
        group.add_argument(
            "--from", dest="read_from", default=None,
            help="Kafka: where to start: earliest, latest, an ISO-8601 timestamp or offsets:P=O,... "
                 "With --to, the start of a bounded read (default earliest); without it, where a "
                 "live job's first start on a sink begins partitions its group has no committed offset "
                 "for (default earliest); later starts resume from the positions stored with the rows.")
        group.add_argument(
            "--to", dest="read_to", default=None,
            help="Kafka: makes the read bounded (a backfill) and says where it stops: latest "
                 "(the end offsets when the read begins), an ISO-8601 timestamp or offsets:P=O,...")
        group.add_argument(
            "--allow_retention_gaps", nargs="?", const=True, default=False, type=_yes_no,
            help="Kafka, bounded reads: when retention has deleted part of the range, read what is left "
                 "and report the gap in the summary instead of failing (also =true/=false).")


class KafkaOptions(PipelineOptions):
    """Kafka consumer settings for kafka:// inputs."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("kafka")
        group.add_argument(
            "--kafka_group", default="onceflow-aggregate",
            help="Consumer group of a live read: its positions are kept with the rows under this "
                 "name, and a first start on a sink begins at its committed offsets; offsets are "
                 "committed (for lag and tools) only after the runner has durably taken the records. "
                 "Default: onceflow-aggregate.")
        group.add_argument(
            "--kafka_setting", action="append", default=None, metavar="NAME=VALUE",
            help="A consumer or producer setting passed as is (repeatable), e.g. "
                 "--kafka_setting security.protocol=SASL_SSL --kafka_setting sasl.mechanism=PLAIN. "
                 "Values of settings named like password, secret or key are never logged. Settings the "
                 "guarantees depend on (enable.auto.commit, isolation.level, group.id, ...) are refused.")
        group.add_argument(
            "--kafka_config_file", default=None, metavar="PATH",
            help="A Kafka client properties file (key=value lines, # or ! comments), as Kafka's tools "
                 "take with --command-config: keeps secrets off the command line and out of the "
                 "pipeline options. Applied before --kafka_setting, which wins. Default: none.")
        group.add_argument(
            "--kafka_time_source", default="field", choices=("field", "record"),
            help="Event time of Kafka records: the --time_field of the record (field) or the "
                 "Kafka record timestamp (record). Default: field.")
        group.add_argument(
            "--kafka_readers", default="1",
            help="How many readers the topic's partitions are dealt to (at most the partition "
                 "count; each reader owns its partitions, never sharing one). More than 1 reads "
                 "partitions in parallel on Flink or Dataflow; Prism takes a reader stage's "
                 "watermark from one reader's bundles, so Prism runs only 1. Default: 1.")
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
        group.add_argument(
            "--shards", default=None,
            help="How many shards the key space is split into for the aggregation: each batch "
                 "of records is split by (shard, window) and each shard window keeps one state "
                 "value. More shards spread the aggregation over more workers; fewer make larger "
                 "sub-batches. The rows are the same with any number. Default: 2 for a job on Prism "
                 "(a live job, or any with --runner=PrismRunner), and for a live job on Flink (there "
                 "--parallelism if that is more): fewer, larger elements catch up faster; 8 "
                 "elsewhere. A job resumed from a Flink savepoint runs with the "
                 "number its savepoint was taken with.")


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
                 "(?method=merge|cdc); file:///DIR?format=parquet|avro (one file per window); "
                 "kafka://HOST:PORT/TOPIC (?format=avro_registry: Avro in the schema registry's wire format). "
                 "SQL sinks take ?table=NAME (default: aggregates). "
                 f"Default: sqlite:///{DEFAULT_OUTPUT_DIR}/aggregates.db.")
        group.add_argument(
            "--dlq", default=f"{DEFAULT_OUTPUT_DIR}/dlq.jsonl",
            help="Dead-letter queue: a JSON-lines file path, or "
                 "postgresql://USER[:PASS]@HOST:PORT/DB?table=NAME (default table: dead_letters), or "
                 "kafka://HOST:PORT/TOPIC (?format=avro_registry: Avro in the schema registry's wire format). "
                 f"Default: {DEFAULT_OUTPUT_DIR}/dlq.jsonl.")
        group.add_argument(
            "--sink_batch_size", default=str(DEFAULT_BATCH_ROWS),
            help=f"Rows per sink transaction (bounded batches). Default: {DEFAULT_BATCH_ROWS}.")


class MonitoringOptions(PipelineOptions):
    """Seeing into a run: the live status line, a metrics file, the health endpoint."""

    @staticmethod
    def _port(text: str) -> int:
        value = str(text).strip()
        if not value.isdigit() or int(value) > 65535:
            raise argparse.ArgumentTypeError(f"{text!r} is not a port: use 0 (off) or 1-65535")
        return int(value)

    @staticmethod
    def _max_lag(text: str) -> Optional[int]:
        value = str(text).strip().lower()
        if value in ("none", "off", ""):
            return None
        if not value.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of records (or none)")
        return int(value)

    @staticmethod
    def _max_rate(text: str) -> Optional[float]:
        value = str(text).strip().lower()
        if value in ("none", "off", ""):
            return None
        try:
            rate = float(value[:-1]) / 100 if value.endswith("%") else float(value)
        except ValueError:
            rate = -1.0
        if not 0 <= rate <= 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not a fraction from 0 to 1 (0.01 or 1%) or none")
        return rate

    @staticmethod
    def _max_age_s(text: str) -> Optional[float]:
        from onceflow.windowing import parse_duration_ms

        value = str(text).strip().lower()
        if value in ("none", "off", ""):
            return None
        try:  # a bare number is seconds: what Beam passes on when it re-parses the options on a worker
            seconds = float(value)
        except ValueError:
            seconds = None
        if seconds is not None and seconds >= 0:
            return seconds
        try:
            return parse_duration_ms(value) / 1000.0
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("monitoring")
        group.add_argument(
            "--metrics_out", default=None, metavar="PATH",
            help="Write the run's final figures (counters per stage, dead letters by reason, "
                 "duplicates, rates, consumer lag) to PATH as JSON. Default: none.")
        group.add_argument(
            "--status", default="auto", choices=("auto", "on", "off"),
            help="Live status of a local run on stderr (events/s per stage, lag, DLQ): auto "
                 "rewrites one line every second when stderr is a terminal and otherwise prints "
                 "a line every 30s; on prints a line every 5s when stderr is not a terminal; off "
                 "shows nothing but the final summary. Default: auto.")
        group.add_argument(
            "--health_port", default="0", type=cls._port,
            help="Serve /healthz (JSON; 200 healthy, 503 not) and /metrics (Prometheus text) on "
                 "127.0.0.1 at this port while the job runs. Default: 0 (off).")
        group.add_argument(
            "--health_max_lag", default="100000", type=cls._max_lag,
            help="/healthz: unhealthy above this total consumer lag (records), or none. "
                 "Default: 100000.")
        group.add_argument(
            "--health_max_dlq_rate", default="0.05", type=cls._max_rate,
            help="/healthz: unhealthy when more than this fraction of the records read in the "
                 "last minute went to the dead-letter queue (a fraction, e.g. 0.05), or none. Default: 0.05.")
        group.add_argument(
            "--health_max_watermark_age", default="15m", type=cls._max_age_s,
            help="/healthz: unhealthy when the event-time watermark is older than this (now minus "
                 "watermark; e.g. 90s, 15m), or none. Default: 15m.")
        group.add_argument(
            "--health_max_sink_lag", default="30m", type=cls._max_age_s,
            help="/healthz: unhealthy when the newest window the sink has written ended longer ago "
                 "than this (e.g. 90s, 30m), or none; unchecked until the first row is written. "
                 "Default: 30m.")


class FlinkOptions(PipelineOptions):
    """A live job on Flink: its bundle time, and stopping with a savepoint and
    resuming from one.

    ``--max_bundle_time_mills``, ``--savepoint_path`` and ``--allow_non_restored_state``
    are Beam Java's FlinkPipelineOptions (maxBundleTimeMills, savepointPath,
    allowNonRestoredState): defined here for their help text, checks and defaults, they
    reach the Flink job server under the same names. Not in the Dataflow template (see
    :data:`ONCEFLOW_OPTION_CLASSES`)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("flink")
        group.add_argument(
            "--max_bundle_time_mills", type=int, default=None, metavar="MS",
            help="Flink: close a bundle after this many milliseconds (Beam's Flink runner option; its "
                 "own default is 1000). The windows' panes and the stored positions move only between "
                 "bundles, so a live job catches up faster with short ones. Default for a live job on "
                 "a portable runner or FlinkRunner: 100.")
        group.add_argument(
            "--loopback_worker_processes", type=int, default=None, metavar="N",
            help="With --environment_type=LOOPBACK: run the job's SDK workers as N processes "
                 "instead of threads of the job's own process, so its Python work can use N cores "
                 "(Beam's use_loopback_process_worker experiment and --sdk_worker_parallelism=N). "
                 "Each worker process exits when the job's process ends. Pair it with "
                 "--parallelism and --kafka_readers to spread each step over the workers. "
                 "Default: threads (1).")
        group.add_argument(
            "--flink_savepoint_dir", default=None, metavar="DIR",
            help="Live jobs on Flink: on Ctrl-C or SIGTERM, stop the job with a savepoint in DIR (an "
                 "absolute path or a URI the JobManager can write, e.g. file:///..., s3://...) instead "
                 "of cancelling it, print its path and exit 0; needs --flink_rest_url. Default: none "
                 "(the job is cancelled).")
        group.add_argument(
            "--flink_rest_url", default=None, metavar="URL",
            help="Flink's REST address (http://HOST:PORT, the JobManager's, e.g. a session "
                 "cluster's :8081) through which --flink_savepoint_dir stops the job, found there by "
                 "its --job_name; alone, Ctrl-C or SIGTERM cancels the job there too (the job "
                 "server's cancel can leave it running on Flink). Default: none.")
        group.add_argument(
            "--savepoint_path", default=None, metavar="PATH",
            help="Flink: start the job from this savepoint (the path a stop with "
                 "--flink_savepoint_dir printed), with its state: the Kafka readers' positions, open "
                 "windows, dedup state. Beam's Flink runner option. Default: none.")
        group.add_argument(
            "--allow_non_restored_state", action="store_true", default=False,
            help="Flink, with --savepoint_path: start even if the savepoint holds state of "
                 "steps the job no longer has (Beam's Flink runner option). Default: off.")


ONCEFLOW_OPTION_CLASSES = (InputOptions, KafkaOptions, EventOptions, WindowOptions, AggregateOptions, OutputOptions,
                           MonitoringOptions)


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


def help_text(prog: str, description: str, option_classes: Optional[Sequence[type]] = None,
              leave_out: Sequence[str] = (), help_overrides: Optional[Dict[str, str]] = None) -> str:
    """``--help`` of a pipeline: its option classes (default: the aggregate job's),
    without the flags ``leave_out`` names (by destination, e.g. ``kafka_group``), and
    with ``help_overrides`` replacing a flag's help text."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     epilog="Beam's own flags (--runner, --streaming, --project, ...) "
                                            "are accepted too.")
    for cls in option_classes or ONCEFLOW_OPTION_CLASSES:
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    for action in parser._actions:  # pylint: disable=protected-access
        if action.dest in leave_out:
            action.help = argparse.SUPPRESS
        elif help_overrides and action.dest in help_overrides:
            action.help = help_overrides[action.dest]
    return parser.format_help()


# Flags of earlier versions, and what to do instead.
RETIRED_FLAGS = {
    "--kafka_rewind_margin": "no longer used: a live job resumes from the positions it stores with its rows "
                             "(onceflow.io.progress), not by rewinding; remove the flag",
}


def parse_pipeline_args(argv: Sequence[str]) -> PipelineOptions:
    """PipelineOptions from the command line, refusing mistyped or malformed flags.

    Beam itself only logs a warning for a flag it does not know, so a typo would
    silently run with a default. Here an unknown flag close to a known one is an
    error with a suggestion; any other unknown flag is passed on, with a one-line
    notice, to a runner that reads its own (Flink's ``--checkpointing_interval``,
    Dataflow's service options), and is an error on the others, which would drop
    it. An unknown ``--runner`` is an error too.
    """
    parser = _all_options_parser()
    _, unknown = parser.parse_known_args(list(argv))
    known = [opt for action in parser._actions for opt in action.option_strings]
    passed_on = []
    for item in unknown:
        name = item.split("=", 1)[0]
        if name in RETIRED_FLAGS:
            raise UsageError(f"{name}: {RETIRED_FLAGS[name]}")
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if not name.startswith("--"):
            if passed_on and "=" not in passed_on[-1]:
                continue  # the value of a passed-on flag written as --flag value
            raise UsageError(f"unexpected argument {item!r}; flags look like --name=value; see --help")
        if close:
            raise UsageError(f"unknown flag {name}; did you mean {close[0]}?")
        passed_on.append(item)
    options = PipelineOptions(list(argv))
    runner = options.view_as(StandardOptions).runner
    if runner is not None:
        _check_runner(runner)
    if passed_on:
        names = [flag.split("=", 1)[0] for flag in passed_on]
        if not any(kind in (runner or "").lower() for kind in _RUNNERS_WITH_OWN_FLAGS):
            raise UsageError(f"unknown flag {names[0]}; see --help (a flag Beam's Python SDK does not know is passed "
                             "on only to a runner that reads its own: --runner=FlinkRunner, DataflowRunner or "
                             "PortableRunner)")
        print("onceflow: passing flags unknown to Beam's Python SDK on to the runner: " + " ".join(names),
              file=sys.stderr)
        _quiet_beams_discarding_notice()
    return options


class _DiscardingNoticeFilter(logging.Filter):
    """Drops Beam's "Discarding unparseable args" warning: it is about the Python
    SDK's own view of the flags, which the runner gets all the same (onceflow has
    said so in its own line); beside that line it read as a contradiction."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Discarding unparseable args")


def _quiet_beams_discarding_notice() -> None:
    logger = logging.getLogger("apache_beam.options.pipeline_options")
    if not any(isinstance(each, _DiscardingNoticeFilter) for each in logger.filters):
        logger.addFilter(_DiscardingNoticeFilter())


_RUNNERS_WITH_OWN_FLAGS = ("flink", "dataflow", "portable")


def _check_runner(name: str) -> None:
    """Refuses a ``--runner`` Beam would not find (a class's dotted path is taken as is)."""
    known = {path.rsplit(".", 1)[1].lower(): path.rsplit(".", 1)[1] for path in StandardOptions.ALL_KNOWN_RUNNERS}
    if "." in name or name.lower() in known or name.lower() + "runner" in known:
        return
    raise UsageError(f"--runner: unknown runner {name!r}; use DirectRunner, PrismRunner, FlinkRunner or "
                     "DataflowRunner (or a runner class's dotted path)")


def split_fields(text: str, flag: str) -> Tuple[str, ...]:
    fields = tuple(part.strip() for part in str(text).split(","))
    if not all(fields):
        raise UsageError(f"{flag}: {text!r} is not a comma-separated list of field names, e.g. store,sku")
    return fields


def flag_error(flag: str, error: Exception) -> UsageError:
    if isinstance(error, OSError) and error.strerror and error.filename:  # not "[Errno 21] Is a directory: 'x'"
        return UsageError(f"{flag}: {error.filename}: {error.strerror.lower()}")
    return UsageError(f"{flag}: {error}")


def optional_text(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    value = str(value).strip()
    return value or None


# -- parsers: flag text to a value, ValueError saying what is wrong ------------------

T = TypeVar("T")


def parse_flag(flag: str, parser: Callable[[str], T], text: Optional[str]) -> T:
    """``parser(text)``, its ValueError as a one-line UsageError naming ``flag``."""
    try:
        return parser(text)
    except ValueError as error:
        raise flag_error(flag, error) from None


def parse_optional_flag(flag: str, parser: Callable[[str], T], text: Optional[str]) -> Optional[T]:
    """:func:`parse_flag`, or None when the flag is empty or unset."""
    return parse_flag(flag, parser, text) if optional_text(text) else None


def duration_ms(text: str) -> int:
    """``90s``, ``5m``, ``0``... in milliseconds (0 or more)."""
    from onceflow.windowing import parse_duration_ms

    return parse_duration_ms(text)


def positive_duration_ms(text: str) -> int:
    """A duration above 0."""
    millis = duration_ms(text)
    if millis <= 0:
        raise ValueError(f"{text!r} must be more than 0")
    return millis


# Sliding windows copy each event into every window it falls in: a 1-minute window
# starting every millisecond made 60,000 copies and grew without bound.
MAX_WINDOWS_PER_EVENT = 10_000


def window_spec_of(window: Optional[str], window_period: Optional[str], allowed_lateness: Optional[str],
                   dashes: str = "--") -> "WindowSpec":
    """The window settings as a WindowSpec, checked as the job checks its flags; a
    UsageError naming the setting (``--window``, or ``window`` with ``dashes=""``
    for plain YAML) for a bad one. An empty or unset lateness is refused: 0s says
    no lateness."""
    from onceflow.events import MAX_EVENT_TIME_MS
    from onceflow.windowing import WindowSpec

    size_ms = parse_flag(f"{dashes}window", positive_duration_ms, window)
    # Windows are aligned to the epoch: none longer than 1970 to the year 9999 fits the years windows are
    # stored in, and every event would be refused.
    if size_ms > MAX_EVENT_TIME_MS + 1:
        raise UsageError(f"{dashes}window: {window} is longer than the span from 1970, where "
                         "windows are aligned, to the year 9999, so no window of it can be stored")
    period_ms = parse_optional_flag(f"{dashes}window_period", duration_ms, window_period)
    if period_ms == size_ms:  # tumbling windows, said another way: one spec, so a restart is not refused
        period_ms = None
    if period_ms is not None and 0 < period_ms < size_ms and size_ms // period_ms > MAX_WINDOWS_PER_EVENT:
        raise UsageError(f"{dashes}window_period: {window_period} puts each event in {size_ms // period_ms:,} "
                         f"windows of {window}; at most {MAX_WINDOWS_PER_EVENT:,}: give a longer period")
    lateness_ms = parse_flag(f"{dashes}allowed_lateness", duration_ms, allowed_lateness)
    try:
        return WindowSpec(size_ms, period_ms, lateness_ms)
    except ValueError as error:  # the period does not divide the size, or is larger
        raise flag_error(f"{dashes}window_period", error) from None


def whole_seconds_ms(text: str) -> int:
    """A duration above 0 that is a whole number of seconds (processing-time grids)."""
    millis = positive_duration_ms(text)
    if millis % 1000:
        raise ValueError(f"{text!r} must be a whole number of seconds, e.g. 10s")
    return millis


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
    "FlinkOptions",
    "InputOptions",
    "KafkaOptions",
    "MonitoringOptions",
    "OutputOptions",
    "WindowOptions",
    "parse_pipeline_args",
    "help_text",
]
