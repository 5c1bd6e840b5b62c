"""``onceflow dlq``: list, count and replay dead letters.

    onceflow dlq count  --dlq TARGET [--kafka_config_file PATH] [--kafka_setting NAME=VALUE ...]
    onceflow dlq list   --dlq TARGET [--reason R] [--since T] [--until T] [--limit N] [--json]
    onceflow dlq replay --dlq TARGET [--reason R] [--since T] [--until T] [--margin 1h] -- JOB FLAGS

TARGET is what the job's ``--dlq`` was: a JSON-lines file, ``postgresql://...``
or ``kafka://HOST:PORT/TOPIC``. ``--since``/``--until`` select by the time the
record failed. A Kafka queue on a secured cluster is read with the client
settings of ``--kafka_config_file`` (a Kafka client properties file) and
``--kafka_setting NAME=VALUE`` (which wins), as the main job takes them; for
``replay`` they read the queue only: the job's own Kafka flags go after ``--``.

Replay recomputes history through the (fixed) job instead of pushing single
records: aggregates are whole rows, so a record that now passes must be counted
together with the rest of its window. ``replay`` runs the aggregate job, with the
flags after ``--``, as a bounded read of every record of the windows the selected
records belong to: for Kafka records, from the start of the earliest of those
windows (under the job's flags after ``--``; a record they still refuse counts with
its Kafka timestamp), less ``--margin``, which must cover how much earlier than its
event time a record may carry its Kafka timestamp (producers' clocks running
ahead), to the end of the topic as the replay starts (a record of those windows may
carry any later Kafka timestamp: a producer sending late); for file records, and
for Kafka records read from an archive, the job's own ``--input`` (the path or glob
it ran with, after ``--``; without one the job's default input), which must match
every file the records came from. A record that now passes reaches the sink exactly
as in a live run (the guarded upsert replaces each affected row by its more complete
version); one that still fails is written to the queue again under the same
``dlq_id``, so it is listed once.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import fnmatch
import glob
import json
import os
import sys
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from onceflow.errors import ServiceError, UsageError
from onceflow.io.kafka.config import scrub_secrets
from onceflow.io.urls import first_line
from onceflow.events import REASONS, RecordError, format_utc_ms, parse_iso_time_us, timed_by
from onceflow.windowing import parse_duration_ms


def register(subparsers) -> None:
    parser = subparsers.add_parser("dlq", help="list, count and replay dead letters",
                                   description=__doc__.split("\n\n")[0].replace("``", ""))
    commands = parser.add_subparsers(dest="dlq_command", metavar="COMMAND")
    commands.required = True

    def selection(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--dlq", required=True, help="the queue: a JSON-lines file, postgresql://... or kafka://...")
        sub.add_argument("--reason", action="append", help="only this reason (repeatable)")
        sub.add_argument("--source", metavar="TOPIC|GLOB",
                         help="only records read from this Kafka topic, or from files matching this path or glob")
        sub.add_argument("--since", help="only records that failed at or after this ISO-8601 time")
        sub.add_argument("--until", help="only records that failed before this ISO-8601 time")
        sub.add_argument("--kafka_setting", action="append",
                         metavar="NAME=VALUE", help="a Kafka client setting for a kafka:// queue (repeatable)")
        sub.add_argument("--kafka_config_file", metavar="PATH",
                         help="a Kafka client properties file (key=value lines) for a kafka:// queue")
        sub.add_argument("--schema-registry-url", "--schema_registry_url", dest="schema_registry_url",
                         metavar="URL", help="the schema registry of a kafka://...?format=avro_registry queue")
        sub.add_argument("--schema-registry-setting", "--schema_registry_setting", dest="schema_registry_setting",
                         action="append", metavar="NAME=VALUE",
                         help="a schema registry client setting, e.g. basic.auth.user.info=USER:PASSWORD")

    count = commands.add_parser("count", help="dead letters by reason")
    selection(count)
    count.set_defaults(handler=_count)

    listing = commands.add_parser("list", help="the dead letters, one a line")
    selection(listing)
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50; 0: all)")
    listing.add_argument("--json", action="store_true", help="the full envelopes as JSON lines")
    listing.set_defaults(handler=_list)

    replay = commands.add_parser("replay", help="re-run the job over the selected records' sources")
    selection(replay)
    replay.add_argument("--margin", default="1h",
                        help="start the Kafka read this much before the earliest window of the selected records "
                             "(default 1h)")
    replay.add_argument("job_flags", nargs=argparse.REMAINDER,
                        help="after --: the aggregate job's flags (its --input, --sink, --dlq, ...)")
    replay.set_defaults(handler=_replay)


def select(envelopes: Iterable[Dict[str, Any]], reasons: Optional[Sequence[str]] = None,
           since_us: Optional[int] = None, until_us: Optional[int] = None,
           source: Optional[str] = None) -> List[Dict[str, Any]]:
    """The envelopes matching every given filter (by reason, by time of failure in
    epoch microseconds, as ``failed_at`` keeps it, by source: a Kafka topic's name,
    or a path or glob of the files records came from)."""
    chosen = []
    for envelope in envelopes:
        if reasons and envelope["reason"] not in reasons:
            continue
        if source is not None and not _from_source(envelope["source"], source):
            continue
        failed = parse_iso_time_us(envelope["failed_at"], "failed_at")
        if since_us is not None and failed < since_us:
            continue
        if until_us is not None and failed >= until_us:
            continue
        chosen.append(envelope)
    return chosen


def _from_source(where: Dict[str, Any], source: str) -> bool:
    if "topic" in where:
        return where["topic"] == source
    if "file" in where:
        return fnmatch.fnmatchcase(os.path.abspath(where["file"]), os.path.abspath(source))
    return False


def _time_flag(text: Optional[str], flag: str) -> Optional[int]:
    if text is None:
        return None
    try:
        return parse_iso_time_us(text, flag)
    except RecordError:
        raise UsageError(f"{flag}: {text!r} is not an ISO-8601 time, e.g. 2026-11-02T09:00:00Z") from None


def _target(args):
    """The queue ``--dlq`` names, with the Kafka client settings of the flags."""
    from onceflow.io.dlq import parse_dlq_target
    from onceflow.io.kafka.config import client_settings_from_flags

    try:
        target = parse_dlq_target(args.dlq)
    except ValueError as error:
        raise UsageError(f"--dlq: {error}") from None
    try:
        settings = client_settings_from_flags(args.kafka_setting, args.kafka_config_file)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if settings and target.scheme != "kafka":
        raise UsageError("--kafka_setting/--kafka_config_file: only a kafka:// queue takes Kafka settings")
    registry = None
    if target.scheme == "kafka" and target.option("format") == "avro_registry":
        from onceflow.io.schema_registry import RegistryConfig, kafka_settings_without_registry, registry_settings

        if not args.schema_registry_url:
            raise UsageError("--schema-registry-url: a ?format=avro_registry queue is read through its schema registry")
        try:
            registry = RegistryConfig(args.schema_registry_url,
                                      registry_settings(args.schema_registry_setting, settings))
        except ValueError as error:  # the setting's own errors name their flag
            raise UsageError(str(error) if str(error).startswith("--") else f"--schema-registry-url: {error}") from None
        settings = kafka_settings_without_registry(settings)
    elif args.schema_registry_url or args.schema_registry_setting:
        raise UsageError("--schema-registry-url: only a kafka://...?format=avro_registry queue is read through a "
                         "schema registry")
    return dataclasses.replace(target, client_settings=tuple(settings.items()), registry=registry)


def _selected(args) -> List[Dict[str, Any]]:
    """The selected envelopes of the queue ``--dlq`` names. A file that does not
    exist or does not hold dead letters, a table that does not exist or a Kafka
    setting the client refuses is a UsageError; a server or broker that cannot be
    reached or refuses the login a ServiceError; each one line, secrets scrubbed.
    A ``--reason`` that neither onceflow nor any dead letter of the queue gives is
    a typo (UsageError); a ``--source`` none came from gets a note naming the
    queue's sources (it may have had no failure yet)."""
    from onceflow.io.dlq import JSONL, read_dead_letters_from
    from onceflow.io.kafka.errors import UnknownGroupOrTopic
    from onceflow.io.schema_registry import UnknownSchema

    target = _target(args)
    since, until = _time_flag(args.since, "--since"), _time_flag(args.until, "--until")
    if since is not None and until is not None and since >= until:  # selected nothing, as if the queue were empty
        raise UsageError(f"--since {args.since} is not before --until {args.until}: no record can match")
    if target.scheme == JSONL and not os.path.exists(target.location):
        raise UsageError(f"--dlq: {target.location} does not exist: give the path of the job's --dlq file "
                         "(a job creates it when it starts)")
    reasons: set[str] = set()  # the queue's reasons, whatever the filters
    sources: Dict[str, bool] = {}  # the queue's topics and files, whatever the filters: from --source?

    def noting(envelopes: Iterable[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        for envelope in envelopes:
            reasons.add(envelope["reason"])
            where = envelope["source"]
            name = where.get("topic", where.get("file"))
            if args.source is not None and name is not None and name not in sources:
                sources[name] = _from_source(where, args.source)
            yield envelope

    try:
        chosen = select(noting(read_dead_letters_from(target)), args.reason, since, until, args.source)
    except (ValueError, UnknownSchema) as error:  # not a dead letter, no such table, a schema ID not there
        raise UsageError(f"--dlq: {first_line(error)}") from None
    except OSError as error:  # a directory, a file without read permission
        raise UsageError(f"--dlq: cannot read {target.location}: {error.strerror or first_line(error)}") from None
    except UnknownGroupOrTopic:  # as a file that does not exist: a wrong name, not a service failing
        raise UsageError(f"--dlq: {target.describe()} does not exist: give the job's --dlq topic") from None
    except Exception as error:  # the Kafka client refusing a setting, a broker or server out of reach
        if target.scheme == "kafka" and _is_kafka_error(error):
            raise _kafka_error(error, target) from None
        if type(error).__module__.split(".")[0] == "psycopg":  # libpq's line says what failed
            from onceflow.io.postgres import is_transient

            # As the job judges it: a server out of reach is a service error; a database or
            # role that does not exist, a login refused, the user's to fix (exit 2).
            kind = ServiceError if is_transient(error) else UsageError
            raise kind(f"--dlq: cannot read {target.describe()}: {first_line(error)}") from None
        raise
    typos = [reason for reason in args.reason or () if reason not in REASONS and reason not in reasons]
    if typos:  # would select nothing and say so as if the queue held none; a job's own reason is in the queue
        raise UsageError(f"--reason: {typos[0]!r} is not a reason onceflow gives, nor one of a dead letter in the "
                         f"queue; onceflow's: {', '.join(REASONS)}")
    if sources and not any(sources.values()):  # a misspelt topic or path selects nothing: say what is there
        shown = ", ".join(sorted(sources)[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
        print(f"onceflow: note: --source: no dead letter in {target.describe()} came from {args.source!r}; they "
              f"came from {shown}", file=sys.stderr)
    return chosen


def _is_kafka_error(error: BaseException) -> bool:
    from confluent_kafka import KafkaException

    return isinstance(error, (KafkaException, RuntimeError))


def _kafka_error(error: BaseException, target) -> Exception:
    """The one-line error for a Kafka client's failure, as the aggregate job reports
    it: a refused setting is a UsageError, a broker out of reach a ServiceError."""
    from confluent_kafka import KafkaException

    from onceflow.io.kafka.config import client_error_line, client_error_text
    from onceflow.io.kafka.errors import is_broker_away

    settings = dict(target.client_settings)
    if isinstance(error, KafkaException) and not is_broker_away(error):
        return UsageError(client_error_line(error, settings))
    return ServiceError(f"--dlq: cannot read {target.describe()}: {scrub_secrets(client_error_text(error), settings)}")


def _describe_source(source: Dict[str, Any]) -> str:
    if "topic" in source:
        return f"{source['topic']}[{source['partition']}]@{source['offset']}"
    if "file" in source:
        where = source.get("line", source.get("record"))
        return f"{source['file']}:{where}"
    return json.dumps(source, sort_keys=True)


def _count(args) -> int:
    counts = collections.Counter(envelope["reason"] for envelope in _selected(args))
    for reason, number in sorted(counts.items()):
        print(f"{reason:<20} {number:>8,}")
    print(f"{'total':<20} {sum(counts.values()):>8,}")
    return 0


def _list(args) -> int:
    if args.limit < 0:
        raise UsageError(f"--limit: {args.limit} is negative; give how many to show, or 0 for all")
    envelopes = _selected(args)
    shown = envelopes if args.limit == 0 else envelopes[:args.limit]
    for envelope in shown:
        if args.json:
            print(json.dumps(envelope, sort_keys=True))
        else:
            print(f"{envelope['failed_at']}  {envelope['reason']:<18} {_describe_source(envelope['source'])}  "
                  f"{envelope['message'][:100]}")
    if not args.json and len(shown) < len(envelopes):
        print(f"... {len(envelopes) - len(shown)} more (--limit 0 for all)")
    return 0


def replay_flags(envelopes: Sequence[Dict[str, Any]], margin_ms: int, job=None) -> List[str]:
    """The input flags that make ``job`` (what the flags after ``--`` make of the
    aggregate job, an :class:`~onceflow.pipelines.aggregate.AggregateJob`) re-read
    every selected record and every other record of the windows they belong to:
    for Kafka records a time range (see the module's docstring; without ``job``
    from their earliest Kafka timestamp less the margin) to the topic's end; for file
    records, or an archive input, none: the job's own input, checked to hold every
    file the records came from. A job whose input cannot hold the records (another
    topic, files for Kafka records) is refused in one line: it would recompute other
    records and report the replay done."""
    sources = [envelope["source"] for envelope in envelopes]
    kafka = [source for source in sources if "topic" in source]
    files = sorted({source["file"] for source in sources if "file" in source})
    if kafka and files:
        raise UsageError("the selection mixes Kafka and file records: replay them separately (--source TOPIC, "
                         "--source GLOB)")
    if files:
        if job is not None and job.kafka is not None:
            raise UsageError(f"the selected dead letters came from files ({files[0]}, ...), not from Kafka: give "
                             "the job's --input (the path or glob it ran with) after --")
        _check_job_input_holds(job, files)
        return []
    topics = {source["topic"] for source in kafka}
    if len(topics) != 1:
        raise UsageError(f"the selection spans topics {sorted(topics)}: replay one topic at a time (--source TOPIC)")
    (topic,) = topics
    if job is not None and job.from_archive:
        _check_archive_holds(job.input_pattern, topic, kafka)
        return []  # an archive is read whole: every record of every window
    if job is not None and (job.kafka is None or job.kafka.topic.topic != topic):
        given = job.input_pattern if job.kafka is None else job.kafka.topic.url
        raise UsageError(f"the selected dead letters came from Kafka topic {topic}; the job's --input is {given}: "
                         f"give --input=kafka://HOST:PORT/{topic} (or an archive of it) after --")
    stamps = [source.get("timestamp_ms") for source in kafka]
    stamps = [stamp for stamp in stamps if isinstance(stamp, int) and stamp >= 0]
    windows = [] if job is None else [_earliest_window(job, envelope) for envelope in envelopes]
    windows = [window for window in windows if window is not None]
    if len(stamps) < len(kafka):  # a record without a Kafka timestamp: its window's end bounds it
        stamps += [end for _, end in windows]
    if not stamps:
        raise UsageError("the selected records carry no Kafka timestamp and the job places none of them in a "
                         "window, so no time range holds them: backfill the topic with --from/--to instead")
    first = min([*stamps, *(start for start, _ in windows)])
    # To the end: a range that stopped at the latest selected record's timestamp (plus the margin)
    # missed records of its window stamped later in other partitions, and made a row of part of
    # the window, which the sink's guard refused: the replayed record was counted nowhere.
    return [f"--from={format_utc_ms(max(first - margin_ms, 0))}", "--to=latest"]


def check_records_retained(job, envelopes: Sequence[Dict[str, Any]], queue_has_settings: bool = False) -> None:
    """Refuses, in one line, a replay of Kafka records retention or compaction has
    deleted since they failed: the replay re-reads them from the topic, so it would
    count none of them and report itself done. ``queue_has_settings``: the
    replay's own Kafka settings were given (for its queue), but maybe not the job's."""
    from onceflow.io.kafka.admin import compacted_offsets_missing, log_starts

    offsets: Dict[int, List[int]] = collections.defaultdict(list)
    for envelope in envelopes:
        offsets[envelope["source"]["partition"]].append(envelope["source"]["offset"])
    try:
        lows = log_starts(job.kafka, sorted(offsets))
    except Exception as error:  # the Kafka client's: a broker out of reach
        if not _is_kafka_error(error):
            raise
        from onceflow.io.kafka.config import client_error_text
        from onceflow.io.kafka.errors import BROKER_UP_HINT

        flags = "" if job.kafka.client_settings or not queue_has_settings else (
            " (the job after -- has no Kafka settings: give it --kafka_config_file or --kafka_setting there too)")
        raise ServiceError(f"--input: cannot read the offsets of {job.kafka.topic.url}: {client_error_text(error)}; "
                           f"{BROKER_UP_HINT}{flags}") from None
    gone = {p: [o for o in found if o < lows[p]] for p, found in offsets.items()}
    gone = {p: found for p, found in gone.items() if found}
    if gone:
        partition = min(gone)
        raise _records_gone(job, len(envelopes), gone, f"partition {partition} starts at offset {lows[partition]}, "
                                                       f"the record at {min(gone[partition])} was deleted by retention")
    try:
        compacted = compacted_offsets_missing(job.kafka, offsets)
    except Exception as error:  # the Kafka client's: a broker out of reach
        if not _is_kafka_error(error):
            raise
        compacted = {}  # the job says so in one line when it reads the topic
    if compacted:
        partition = min(compacted)
        raise _records_gone(job, len(envelopes), compacted, "the compacted topic keeps a newer record of the same "
                            f"key in place of the record at partition {partition} offset {min(compacted[partition])}")


def _records_gone(job, selected: int, gone: Dict[int, List[int]], why: str) -> UsageError:
    return UsageError(
        f"{sum(map(len, gone.values()))} of the {selected} selected records are no longer in {job.kafka.topic.topic} "
        f"({why}): a replay re-reads records from the topic, so it cannot count them; replay the others (--since, "
        "--until, --reason) or from an archive of the topic (their bytes are in the queue: onceflow dlq list --json)")


def _check_archive_holds(directory: str, topic: str, sources: Sequence[Dict[str, Any]]) -> None:
    """The archive the replay reads must hold every selected record: an archive of
    another topic, or of another range, recomputed other records (another topic's
    rows written into the job's table) and the replay said it was done."""
    from onceflow.io.archive import archived_spans

    try:
        spans = archived_spans(directory)
    except ValueError as error:
        raise UsageError(f"--input: {first_line(error)}") from None
    topics = sorted({name for name, _ in spans})
    if topics and topic not in topics:
        raise UsageError(f"the selected dead letters came from Kafka topic {topic}; the job's --input {directory} is "
                         f"an archive of {topics[0]}: give an archive of {topic} (or "
                         f"--input=kafka://HOST:PORT/{topic}) after --")
    missed = [source for source in sources if not any(
        first <= source["offset"] <= last for first, last in spans.get((topic, source["partition"]), ()))]
    if missed:
        raise UsageError(f"{len(missed)} of the {len(sources)} selected records are not in the archive {directory} "
                         f"(partition {missed[0]['partition']} offset {missed[0]['offset']}): archive their range "
                         f"first, or replay from the topic (--input=kafka://HOST:PORT/{topic})")


def _check_job_input_holds(job, files: Sequence[str]) -> None:
    """A window's row is recomputed from every event of it, so the replay reads the
    job's whole input (``--input`` after ``--``, or its default): it must hold every
    file the selected records came from."""
    pattern = None if job is None else job.input_pattern
    matched = {os.path.abspath(path) for path in glob.glob(pattern, recursive=True)} if pattern else set()
    missed = [path for path in files if os.path.abspath(path) not in matched]
    if not missed:
        return
    many = f", one of {len(files)} files" if len(files) > 1 else ""
    raise UsageError(f"{missed[0]} (where dead letters of the selection came from{many}) is not in the job's "
                     f"--input {pattern}: give the job's original --input after -- (the path or glob it ran with), "
                     "so that each window is recomputed from all of its events")


def _earliest_window(job, envelope: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    """The earliest window the dead letter's event belongs to under ``job``'s
    contract and windows, or None for a record the job refuses."""
    from onceflow.io.dlq.envelope import from_envelope
    from onceflow.io.schema_registry import RegistryUnavailable

    try:
        event = job.contract.to_event(from_envelope(envelope))
    except (RecordError, ValueError, RegistryUnavailable):  # the run itself says what the registry answered
        return None
    return job.window_spec.windows_for(timed_by(event, job.time_source).event_time_ms)[0]


# dlq replay's own flags, which the job after -- does not take (--dlq is both).
_REPLAY_OWN_FLAGS = ("--reason", "--source", "--since", "--until", "--margin")


def _replay(args) -> int:
    from onceflow.io.kafka.config import is_kafka_url
    from onceflow.options import InputOptions, parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options, run

    flags = [flag for flag in args.job_flags if flag != "--"]
    if not flags:
        raise UsageError("give the aggregate job's flags after --, e.g. -- --input=kafka://... --sink=...")
    own = [flag.split("=")[0] for flag in flags if flag.split("=")[0] in _REPLAY_OWN_FLAGS]
    if own:
        raise UsageError(f"{own[0]} after --: it is a flag of dlq replay, not of the job; put it before --")
    ranged = [flag for flag in flags if flag.split("=")[0] in ("--from", "--to")]
    if ranged:
        raise UsageError(f"{ranged[0].split('=')[0]} after --: replay reads the range itself (from the earliest "
                         "window of the selected records, less --margin, to the topic's end); select records with "
                         "--reason, --since, --until")
    try:
        margin_ms = parse_duration_ms(args.margin)
    except ValueError as error:
        raise UsageError(f"--margin: {error}") from None
    if not any(flag == "--dlq" or flag.startswith("--dlq=") for flag in flags):
        flags.append(f"--dlq={args.dlq}")  # records that still fail go back to the queue they came from
    chosen = _selected(args)
    if not chosen:
        print("no dead letters match: nothing to replay")
        return 0
    # A replay is a backfill: judged as one (a kafka:// sink, which a live job refuses, is fine).
    reads_kafka = is_kafka_url(str(parse_pipeline_args(flags).view_as(InputOptions).input))
    job = job_from_options(parse_pipeline_args([*flags, "--from=earliest", "--to=latest"] if reads_kafka else flags))
    if (not any(flag == "--sink" or flag.startswith("--sink=") for flag in flags) and job.sink.scheme == "sqlite"
            and not os.path.exists(job.sink.location)):
        raise UsageError(f"no --sink after --: the job's default sink {job.sink.location} does not exist here, so "
                         "the replayed rows would go to a new database, not beside the rows they belong with; give "
                         "the --sink the job wrote to after --")
    input_flags = replay_flags(chosen, margin_ms, job)
    if job.kafka is not None:
        check_records_retained(job, chosen, bool(args.kafka_config_file or args.kafka_setting))
    reading = " ".join(input_flags) if input_flags else f"its own --input {job.input_pattern}"
    print(f"replaying {len(chosen)} dead letters into {job.sink.describe()}: re-running the job with {reading}",
          file=sys.stderr)
    summary = run([*flags, *input_flags])
    print(summary.render())
    print(f"records of this span that still fail are in {job.dlq.describe()}"
          + (" under their old dlq_id (listed once)" if job.dlq.describe() == _target(args).describe() else ""))
    return 0
