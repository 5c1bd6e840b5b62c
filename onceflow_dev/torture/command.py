"""``onceflow torture``: produce a known stream, run the main job live while faults
are injected on a seeded schedule, and prove that nothing was lost or counted twice.

    onceflow torture --events 20000 --kills 3 --broker-restarts 1 --stalls 1

Exit status: 0 when the sink equals the truth and the DLQ is exact, live and after
a backfill, the job never exited by itself and its memory stayed within the
bound while the sink was stalled; 1 otherwise; 2 for wrong flags; 3 when a
service is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import io
import json
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from onceflow.errors import ServiceError, UsageError
from onceflow_dev.torture.faults import BROKER_RESTART, CONNECTION_KILL, KILL, STALL, Fault, fault_schedule
from onceflow_dev.torture.job import LiveJob
from onceflow_dev.torture.plot import write_plot
from onceflow_dev.torture.sinks import AGGREGATE, SINK_KINDS, TortureSink, torture_sink
from onceflow_dev.torture.stream import (
    BAD, DUPLICATE, GOOD, TOO_LATE, TOO_LATE_AGE_MS, Planned, StreamMix, StreamPlan, max_event_delay_ms,
)
from onceflow_dev.torture.timeline import FaultMark, Sample, Timeline
from onceflow_dev.torture import truth
from onceflow.windowing import parse_duration_ms

IDLE_TIMEOUT_S = 10
# The flags the torture gives the job itself, from which its truth is computed: a
# --job-flag may not give them again (the job would run under others than the truth).
OWN_FLAGS = ("--input", "--kafka_group", "--sink", "--dlq", "--key_fields", "--time_field", "--id_field",
             "--aggregate", "--window", "--window_period", "--allowed_lateness", "--early_firing",
             "--kafka_time_source", "--from", "--to")
WARM_S = 20  # a stall waits until the job has run this long, so its memory is measured warm
# How long a connection kill waits for the job to hold a sink session: while kills
# come faster than a restart re-reads its rewind, the job writes nothing for minutes
# (seen: 60 s was not enough in two 20-kill runs). Later faults wait their turn.
SESSION_WAIT_S = 600
PRODUCER_STUCK_S = 60  # no delivery this long with the broker up: the producer is replaced (_unstuck)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``torture`` to the ``onceflow`` parser."""
    parser = subparsers.add_parser(
        "torture",
        help="prove no loss and no double count: faults injected into a live run, sink compared with the truth",
        description=(
            "Produces a known stream (duplicates, malformed records, late and too-late events) into "
            "a new topic at --rate, runs the aggregate job live on --runner while killing it, "
            "restarting the broker, stalling the sink and killing its connections on a seeded "
            "schedule, then compares the sink and the DLQ with the truth from the ledger, runs a "
            "backfill into the same sink and compares again. Writes report.json, plot.png, the "
            "ledger and the job's log under --out. Needs the dev services (onceflow dev up "
            "--services kafka,postgres,prism[,flink]) unless --bootstrap-server/--postgres name others."),
    )
    parser.add_argument("--events", type=_positive_int, default=20_000, metavar="N",
                        help="records to produce, bad ones included (default 20000)")
    parser.add_argument("--rate", type=_positive_int, default=200, metavar="PER_SECOND",
                        help="records produced per second (default 200)")
    parser.add_argument("--kills", type=_count, default=3, metavar="N", help="SIGKILLs of the job (default 3)")
    parser.add_argument("--broker-restarts", type=_count, default=1, metavar="N",
                        help="stops and starts of the dev stack's broker (default 1)")
    parser.add_argument("--stalls", type=_count, default=1, metavar="N",
                        help="times the sink table is locked for --stall-seconds (default 1)")
    parser.add_argument("--connection-kills", type=_count, default=None, metavar="N",
                        help="times the sink's database sessions are terminated (default 1 with the "
                             "postgres sink; other sinks have no sessions)")
    parser.add_argument("--sink", choices=SINK_KINDS, default="postgres",
                        help="where the job writes: postgres (a table, default), sqlite (a database file), "
                             "parquet or avro (window files); the DLQ is a table with postgres, else a "
                             "JSON-lines file beside the sink")
    parser.add_argument("--early-firing", default=None, metavar="DURATION",
                        help="the job's --early_firing (default none): open windows are written every "
                             "DURATION and overwritten as they fill")
    parser.add_argument("--kill-early", action="store_true",
                        help="the first kill lands after the job has read records and before it has "
                             "stored any position past its start (before its first final row)")
    parser.add_argument("--stall-seconds", type=_positive_int, default=20, metavar="S",
                        help="how long each stall holds the lock (default 20)")
    parser.add_argument("--runner", choices=("prism", "flink"), default="prism",
                        help="prism (Beam's local streaming runner, default) or flink (the dev stack's job server)")
    parser.add_argument("--job-flag", action="append", default=[], metavar="FLAG", dest="job_flags",
                        help="a flag passed to the live job as is (repeatable), e.g. "
                             "--job-flag=--shards=4 or, on flink, --job-flag=--loopback_worker_processes=2")
    parser.add_argument("--seed", type=int, default=1, help="seed of the stream and the fault schedule (default 1)")
    parser.add_argument("--partitions", type=_positive_int, default=3, metavar="N",
                        help="partitions of the new topic (default 3)")
    parser.add_argument("--memory-bound-mib", type=_positive_int, default=256, metavar="MIB",
                        help="the most the job's memory may grow during a stall (default 256)")
    parser.add_argument("--catch-up-timeout", type=_positive_int, default=600, metavar="S",
                        help="how long to wait, after the last record and fault, for the sink to be "
                             "complete (default 600)")
    parser.add_argument("--window", default="10s", metavar="DURATION",
                        help="the job's --window (default 10s)")
    parser.add_argument("--window-period", default=None, metavar="DURATION",
                        help="the job's --window_period: sliding windows of --window starting every DURATION "
                             "(default none: fixed windows); it must divide --window")
    parser.add_argument("--allowed-lateness", default="60s", metavar="DURATION",
                        help="the job's --allowed_lateness (default 60s); it must cover how far the "
                             "stream's records are behind the clock: 23 s at the default --rate, more below it")
    parser.add_argument("--bootstrap-server", default=None, metavar="HOST:PORT",
                        help="the Kafka broker (default: the dev stack's)")
    parser.add_argument("--postgres", default=None, metavar="DSN",
                        help="the PostgreSQL database for the sink and DLQ tables (default: the dev stack's)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where the report, plot, ledger and log go (default $ONCEFLOW_HOME/torture/RUN)")
    parser.set_defaults(handler=run_torture)


def _positive_int(text: str) -> int:
    if not str(text).strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def _count(text: str) -> int:
    if not str(text).strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0 or more)")
    return int(text)


@dataclasses.dataclass
class _Setup:
    run_id: str
    bootstrap: str
    dsn: str
    topic: str
    table: str
    group: str
    out: pathlib.Path
    sink: TortureSink
    runner_flags: List[str]
    job_endpoint: Optional[str]


def _setup(args: argparse.Namespace) -> _Setup:
    from onceflow_dev import devstack
    from onceflow_dev.devstack import kafka
    from onceflow_dev.devstack.common import home
    from onceflow_dev.devstack.prism import prism_location

    for flag, value in (("--window", args.window), ("--window-period", args.window_period),
                        ("--allowed-lateness", args.allowed_lateness), ("--early-firing", args.early_firing)):
        try:
            if value is not None:
                parse_duration_ms(value)
        except ValueError as error:
            raise UsageError(f"{flag}: {error}") from None
    _check_windows(args)
    if args.connection_kills is None:
        args.connection_kills = 1 if args.sink == "postgres" else 0
    elif args.connection_kills and args.sink != "postgres":
        raise UsageError(f"--connection-kills: a {args.sink} sink has no database sessions to kill; "
                         "pass 0 or use --sink postgres")
    for flag in args.job_flags:
        if not flag.startswith("--"):
            raise UsageError(f"--job-flag: {flag!r} is not a flag; write it as --job-flag=--name=value")
        name = flag.split("=")[0]
        if name in OWN_FLAGS:
            raise UsageError(f"--job-flag: the torture gives the job {name} itself and computes its truth under "
                             "it; the torture's --window, --window-period, --allowed-lateness, --early-firing "
                             "and --sink set the ones it can vary")
    if args.kill_early and not args.kills:
        raise UsageError("--kill-early: it moves the first of --kills; pass --kills 1 or more")
    _check_job_flags(args)
    dev_bootstrap = devstack.kafka_bootstrap_servers()
    bootstrap = args.bootstrap_server or dev_bootstrap
    if args.broker_restarts and bootstrap != dev_bootstrap:
        raise UsageError("--broker-restarts stops and starts the dev stack's broker only; "
                         "pass --broker-restarts 0 with --bootstrap-server")
    if args.broker_restarts and not kafka.status()["healthy"]:
        raise ServiceError("the dev stack's Kafka is not up: run `onceflow dev up --services kafka,postgres,prism`")
    if args.runner == "prism":
        location = prism_location()
        if location is None:
            raise ServiceError("Prism is not built: run `onceflow dev up --services prism`")
        runner_flags, endpoint = [f"--prism_location={location}"], None
    else:
        from onceflow_dev.devstack import flink

        endpoint = devstack.flink_job_endpoint()
        if not flink.status()["healthy"]:
            raise ServiceError(f"no Flink job server answers on {endpoint}: run `onceflow dev up --services flink`")
        runner_flags = flink.streaming_job_flags(endpoint)
    run_id = f"{time.strftime('%Y%m%d_%H%M%S')}_s{args.seed}"
    out = pathlib.Path(args.out) if args.out else home() / "torture" / run_id
    out.mkdir(parents=True, exist_ok=True)
    dsn = args.postgres or devstack.postgres_dsn()
    table = f"torture_{run_id}"
    return _Setup(run_id, bootstrap, dsn, f"torture-{run_id}".replace("_", "-"), table,
                  f"onceflow-torture-{run_id}", out, torture_sink(args.sink, out, dsn, table), runner_flags, endpoint)


def _check_windows(args: argparse.Namespace) -> None:
    """The window flags the stream's truth holds for: every late event (at most
    ``late_max_ms`` late) within the lateness, every too-late one (an hour old)
    beyond it, and a whole number of windows per event."""
    (window_ms, period_ms), lateness_ms = _windows(args), parse_duration_ms(args.allowed_lateness)
    if window_ms <= 0:
        raise UsageError(f"--window: {args.window!r} is not above 0")
    if period_ms is not None and period_ms <= 0:
        raise UsageError(f"--window-period: {args.window_period!r} is not above 0")
    if period_ms is not None and window_ms % period_ms:
        raise UsageError(f"--window-period: {args.window_period!r} does not divide --window {args.window} "
                         "(the torture counts each event in --window / --window-period windows)")
    delay_s = -(-max_event_delay_ms(StreamMix(), args.rate) // 1000)
    if lateness_ms < delay_s * 1000:
        raise UsageError(f"--allowed-lateness: at --rate {args.rate} the stream's events are up to {delay_s} s "
                         f"behind the clock (late events {StreamMix().late_max_ms // 1000} s, re-sends of recent "
                         f"events more), so a lateness under {delay_s}s would refuse some the truth counts; give "
                         f"{delay_s}s or more, or a higher --rate")
    if window_ms + lateness_ms > TOO_LATE_AGE_MS // 2:
        raise UsageError("--window plus --allowed-lateness must be at most 30m: the stream's too-late events are "
                         "an hour old and must stay beyond the lateness")


def contract_flags(args: argparse.Namespace) -> List[str]:
    """The job's flags the truth is computed under (the live job's and the backfill's)."""
    return ["--key_fields=k", "--time_field=t", "--id_field=id", f"--aggregate={AGGREGATE}",
            f"--window={args.window}", f"--allowed_lateness={args.allowed_lateness}",
            *([f"--window_period={args.window_period}"] if args.window_period else [])]


def live_job_flags(args: argparse.Namespace, input_url: str, group: str, output_flags: List[str],
                   runner_flags: List[str]) -> List[str]:
    """Every flag the live job runs with."""
    early = [f"--early_firing={args.early_firing}"] if args.early_firing else []
    return [f"--input={input_url}", f"--kafka_group={group}", f"--kafka_idle_timeout={IDLE_TIMEOUT_S}s", *early,
            *contract_flags(args), *output_flags, *runner_flags, *args.job_flags]


def _check_job_flags(args: argparse.Namespace) -> None:
    """The job's own check of its flags, with stand-ins for what the run sets up
    (topic, group, sink), before anything starts: a flag it refuses (a --job-flag
    mistyped, or with a wrong value) made every start exit at once, and the torture
    restarted it until the catch-up timeout."""
    from onceflow.options import parse_pipeline_args
    from onceflow.pipelines.aggregate import job_from_options

    runner = ["--runner=PortableRunner"] if args.runner == "flink" else []  # Flink takes flags Beam does not know
    flags = live_job_flags(args, "kafka://127.0.0.1:9092/torture", "torture",
                           ["--sink=sqlite:///torture.db", "--dlq=torture-dlq.jsonl"], runner)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the job's notices: it prints them when it starts
            job_from_options(parse_pipeline_args(flags))
    except UsageError as error:
        raise UsageError(f"--job-flag: the job refuses its flags: {error}") from None


def _windows(args: argparse.Namespace) -> Tuple[int, Optional[int]]:
    """The window's size and period in ms (None: fixed windows)."""
    return parse_duration_ms(args.window), parse_duration_ms(args.window_period) if args.window_period else None


def _describe_windows(args: argparse.Namespace) -> str:
    """``10s windows``, or ``20s windows every 5s``."""
    return f"{args.window} windows" + (f" every {args.window_period}" if _windows_per_event(args) > 1 else "")


def _windows_per_event(args: argparse.Namespace) -> int:
    window_ms, period_ms = _windows(args)
    return window_ms // period_ms if period_ms else 1


def run_torture(args: argparse.Namespace) -> int:
    setup = _setup(args)
    # SIGTERM (a `timeout`, a supervisor) stops the run as Ctrl-C does: the job is stopped, not left running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return TortureRun(args, setup).run()


class TortureRun:
    def __init__(self, args: argparse.Namespace, setup: _Setup):
        self.args = args
        self.setup = setup
        self.timeline = Timeline()
        self.ledger: List[Planned] = []
        self.delivery_failures: List[str] = []
        self.produced = 0
        self.unexpected_exits: List[str] = []
        self.good_delivered = 0
        self.in_topic: List[Planned] = []
        self.missing_from_topic = 0
        self.expected_rows: Dict[truth.RowKey, truth.Aggregates] = {}
        self.expected_dead_letters: Dict[Tuple[int, int], str] = {}
        self._started_at_s = 0.0
        self._produced_at_s: Optional[float] = None  # when the last record was produced
        self._t0 = time.monotonic()
        # The producer's progress, and the broker's restarts, for _unstuck.
        self._last_delivery_at = time.monotonic()
        self._broker_away = False
        self._broker_back_at = 0.0
        self._purged: List[Planned] = []  # records a purge took back from a stuck producer
        self._retired: List = []  # stuck producers replaced, until every purged record is reported
        self._done = threading.Event()
        self._job_lock = threading.Lock()
        self._latest: Optional[Sample] = None
        self.contract_flags = contract_flags(args)
        self.sink = setup.sink
        self.output_flags = [f"--sink={self.sink.sink_url()}", f"--dlq={self.sink.dlq_url()}"]
        self.input_url = f"kafka://{setup.bootstrap}/{setup.topic}"
        self.job = LiveJob(live_job_flags(args, self.input_url, setup.group, self.output_flags, setup.runner_flags),
                           setup.out / "job.log", setup.job_endpoint, job_name=f"onceflow-torture-{setup.run_id}")

    def now_s(self) -> float:
        return round(time.monotonic() - self._t0, 2)

    def say(self, message: str) -> None:
        print(f"torture {self.now_s():7.1f}s  {message}", flush=True)

    # -- the run -------------------------------------------------------------------

    def run(self) -> int:
        from onceflow_dev import devstack

        faulthandler.enable()  # a crash in a native client library still says where
        args, setup = self.args, self.setup
        devstack.create_topic(setup.topic, partitions=args.partitions, bootstrap=setup.bootstrap)
        production_s = args.events / args.rate
        counts = {KILL: args.kills, BROKER_RESTART: args.broker_restarts, STALL: args.stalls,
                  CONNECTION_KILL: args.connection_kills}
        if args.kill_early:
            counts[KILL] -= 1  # the first kill: see _kill_early
        schedule = fault_schedule(counts, production_s, args.seed)
        self.say(f"topic {setup.topic} ({args.partitions} partitions), {args.sink} sink {self.sink.sink_url()}, "
                 f"runner {args.runner}, {args.events} records at {args.rate}/s (~{production_s:.0f}s), "
                 f"faults: {'kill before the first position past the start, ' if args.kill_early else ''}"
                 f"{', '.join(f'{f.kind} at {f.at_s}s' for f in schedule) or 'none'}; output in {setup.out}")
        self._t0 = time.monotonic()
        sampler = threading.Thread(target=self._sample_loop, name="torture-sampler", daemon=True)
        faults = threading.Thread(target=self._inject, args=(schedule, args.kill_early), name="torture-faults",
                                  daemon=True)
        try:
            self._start_job()
            sampler.start()
            faults.start()
            self._produce()
            self._produced_at_s = self.now_s()
            faults.join()
            after = self._faults_after_production()
            self.say(f"all {self.produced} records produced and every fault injected"
                     + (f" ({after} of {len(self.timeline.faults)} began after the last record was produced: each "
                        "fault waits for the one before it)" if after else "")
                     + "; waiting for the sink to catch up")
            live = self._wait_caught_up()
        finally:  # never leave the job running, even on Ctrl-C
            self._done.set()
            self._stop_job()
        sampler.join(10)
        self.say("live: " + "; ".join(live.lines()))
        self.say("backfill over the whole topic into the same sink...")
        backfill_ok = self._backfill()
        after_backfill = self._compare()
        self.say("after the backfill: " + "; ".join(after_backfill.lines()))
        return self._report(live, after_backfill, backfill_ok, production_s)

    def _faults_after_production(self) -> int:
        if self._produced_at_s is None:
            return 0
        return sum(1 for mark in self.timeline.faults if mark.start_s > self._produced_at_s)

    def _start_job(self) -> None:
        self.job.start()
        self._started_at_s = self.now_s()

    def _stop_job(self) -> None:
        with self._job_lock:
            try:
                self.job.stop()
            except KeyboardInterrupt:  # a second Ctrl-C: no more patience, but never leave it running
                self.job.kill()
                raise

    # -- producing -----------------------------------------------------------------

    def _produce(self) -> None:
        args = self.args
        plan = StreamPlan(self.setup.run_id, args.partitions, StreamMix(), args.seed)
        producer = self._new_producer()
        with open(self.setup.out / "ledger.jsonl", "w", encoding="utf-8") as ledger_file:
            started = time.monotonic()
            last_progress = started
            while self.produced < args.events:
                due = min(args.events, int((time.monotonic() - started) * args.rate) + 1)
                while self.produced < due:
                    planned = plan.next(int(time.time() * 1000))
                    self._send(producer, planned)
                    self.ledger.append(planned)
                    self.produced += 1
                producer.poll(0)
                producer = self._unstuck(producer)
                if time.monotonic() - last_progress >= 10:
                    last_progress = time.monotonic()
                    sample = self._latest
                    self.say(f"produced {self.produced}/{args.events}" + (_progress(sample) if sample else ""))
                time.sleep(0.02)
            deadline = time.monotonic() + 900
            while (producer.flush(10) or self._retired) and time.monotonic() < deadline:
                producer = self._unstuck(producer)
            remaining = len(producer)
            if remaining:
                self.delivery_failures.append(f"{remaining} records still undelivered after 15 minutes")
            for planned in self.ledger:
                ledger_file.write(json.dumps(planned.to_ledger()) + "\n")
        self._read_topic_back()

    def _new_producer(self):
        from confluent_kafka import Producer

        # Not idempotent: after a broker restart an idempotent producer can wait for its
        # in-flight batches to time out (15 minutes here) before it sends again. A retry
        # may then store a record twice; the truth is taken from what the topic holds.
        # log_level 0: the broker restarts on purpose; its connection errors are not news.
        return Producer({"bootstrap.servers": self.setup.bootstrap, "enable.idempotence": False, "acks": "all",
                         "max.in.flight.requests.per.connection": 1, "linger.ms": 5,
                         "message.timeout.ms": 900_000, "log_level": 0, "error_cb": lambda error: None})

    def _send(self, producer, planned: Planned) -> None:
        """Produces ``planned``; its delivery fills in where it was stored (a purge
        by :meth:`_unstuck` hands it back)."""
        from confluent_kafka import KafkaError

        def callback(error, message):
            if error is not None and error.code() in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT):
                self._purged.append(planned)
            elif error is not None:
                self.delivery_failures.append(f"record {planned.n}: {error}")
            else:
                self._last_delivery_at = time.monotonic()
                planned.partition, planned.offset = message.partition(), message.offset()
                if planned.kind == GOOD:
                    self.good_delivered += 1

        producer.produce(self.setup.topic, value=planned.value, partition=planned.partition,
                         timestamp=planned.timestamp_ms, on_delivery=callback)

    def _unstuck(self, producer):
        """``producer``, or a new one when it has delivered nothing for
        PRODUCER_STUCK_S while the broker was up. A producer sending while the
        broker restarted once kept its records queued for the rest of the run (the
        15 minutes of its flush; librdkafka 2.16) while new clients wrote to the
        same partitions. Its queue is purged and sent again through a new producer:
        a record in flight at the purge may be stored twice, which the job must
        count once (the truth is read from the topic)."""
        quiet_since = max(self._last_delivery_at, self._broker_back_at)
        stuck = len(producer) and not self._broker_away and time.monotonic() - quiet_since >= PRODUCER_STUCK_S
        for retired in self._retired:  # the purge of a record in flight is reported when its request ends
            retired.poll(0)
        self._retired = [retired for retired in self._retired if len(retired)]
        if stuck:
            producer.purge()
            producer.flush(5)  # serves the purged records' callbacks
            self._retired.append(producer)
            producer = self._new_producer()
            self._last_delivery_at = time.monotonic()
            self.say(f"the producer delivered nothing for {PRODUCER_STUCK_S}s with the broker up: its "
                     f"{len(self._purged)} queued record(s) sent again through a new one")
        # Purged records go out again, those reported late by a retired producer too.
        purged, self._purged = sorted(self._purged, key=lambda planned: planned.n), []
        for planned in purged:
            self._send(producer, planned)
        return producer

    def _read_topic_back(self) -> None:
        from onceflow.io.kafka.admin import read_records_to_end
        from onceflow.io.kafka.config import KafkaTopic

        records = [(partition, offset, value or b"") for partition, offset, _, value in
                   read_records_to_end(KafkaTopic(self.setup.bootstrap, self.setup.topic), timeout_s=600)]
        self.in_topic, self.missing_from_topic = truth.in_topic(self.ledger, records)
        # Computed once: the catch-up loop compares every few seconds, and recomputing
        # the truth over a million records each time took CPU from the job under test.
        self.expected_rows = truth.expected_rows(self.in_topic, *_windows(self.args))
        self.expected_dead_letters = truth.expected_dead_letters(self.in_topic)
        self.say(f"the topic holds {len(self.in_topic)} records; planned but not in it: {self.missing_from_topic}")

    # -- faults ----------------------------------------------------------------------

    def _inject(self, schedule: List[Fault], kill_early: bool) -> None:
        if kill_early:
            self._kill_early()
        for fault in schedule:
            while self.now_s() < fault.at_s:
                time.sleep(0.2)
            if fault.kind == STALL:
                while self.now_s() - self._started_at_s < WARM_S:
                    time.sleep(0.2)
            mark = self.timeline.begin(fault.kind, self.now_s())
            try:
                mark.note = self._apply(fault.kind, mark)
            except Exception as error:  # a fault that could not be injected is reported, not fatal
                mark.note = f"could not be injected: {error}"
            mark.end_s = self.now_s()
            self.say(f"{fault.kind.replace('_', ' ')}: {mark.note} ({mark.end_s - mark.start_s:.1f}s)")

    def _kill_early(self) -> None:
        """SIGKILLs the job once it has read records (its group has committed an
        offset, or the sink holds a row) and before any position past the start
        is stored: the window in which a restart can only resume from the start
        positions the first start stored. If a position moves first, the fault
        could not be injected and the run fails.

        The sink's first rows may come before the first offset commit (a late
        event's window is already closed, and a reader's bundle is finalized after
        the stages it feeds): a row, too, shows that records were read. A position
        moves only once a whole window step is final, a window plus the lateness
        after the first records: the window to kill in is wide."""
        from onceflow.io.sinks import parse_sink_url, progress_store

        probe = _LagProbe(self.setup.bootstrap, self.setup.group, self.setup.topic, self.args.partitions)
        store = progress_store(parse_sink_url(self.sink.sink_url()))
        start = None
        mark = None
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    stored = store.read(self.setup.group, self.setup.topic)
                except Exception:  # not created yet
                    stored = {}
                offsets = {p: position.next_offset for p, position in stored.items()}
                if start is None and offsets:
                    start = offsets  # the first start stores its start positions before it reads
                if start is not None and offsets != start:
                    break
                consumed, _ = probe.read()
                rows = self.sink.counted_events()
                if start is not None and (consumed or rows):
                    mark = self.timeline.begin(KILL, self.now_s())
                    mark.re_read = self._records_to_re_read()
                    with self._job_lock:
                        self.job.kill()
                        time.sleep(2)
                        self._start_job()
                    mark.note = (f"before the first position past the start ({consumed} records read, "
                                 f"{rows} events in rows): job killed with SIGKILL and started again "
                                 f"(start {self.job.starts})")
                    break
                time.sleep(0.1)
        finally:
            probe.close()
        if mark is None:
            mark = self.timeline.begin(KILL, self.now_s())
            mark.note = "could not be injected: a position past the start was stored before the kill"
        mark.end_s = self.now_s()
        self.say(f"kill: {mark.note}")

    def _records_to_re_read(self) -> Optional[int]:
        """What a restart now would read again: the group's committed offsets (what
        the job has read) minus the positions stored with the rows (where it would
        resume); None when either cannot be read."""
        from onceflow.io.sinks import parse_sink_url, progress_store

        probe = _LagProbe(self.setup.bootstrap, self.setup.group, self.setup.topic, self.args.partitions)
        try:
            offsets = probe.committed_offsets()
        finally:
            probe.close()
        try:
            stored = progress_store(parse_sink_url(self.sink.sink_url())).read(self.setup.group, self.setup.topic)
        except Exception:  # the sink is away (a stall, a restart): unknown
            return None
        if offsets is None:
            return None
        return sum(max(0, offset - (stored[p].next_offset if p in stored else 0)) for p, offset in enumerate(offsets))

    def _apply(self, kind: str, mark: FaultMark) -> str:
        if kind == KILL:
            re_read = mark.re_read = self._records_to_re_read()
            with self._job_lock:
                self.job.kill()
                time.sleep(2)
                self._start_job()
            return (f"job killed with SIGKILL and started again (start {self.job.starts}); it reads "
                    f"{'?' if re_read is None else f'{re_read:,}'} records again")
        if kind == BROKER_RESTART:
            from onceflow_dev.devstack import kafka

            self._broker_away = True
            try:
                kafka.down()
                time.sleep(2)
                kafka.up()
            finally:
                self._broker_back_at, self._broker_away = time.monotonic(), False
            return "broker stopped and started"
        if kind == STALL:
            return self.sink.stall(self.args.stall_seconds)
        if kind == CONNECTION_KILL:
            # Right after a restart the job may hold no session yet: wait for one.
            deadline = time.monotonic() + SESSION_WAIT_S
            while True:
                killed = self.sink.kill_sessions()
                if killed:
                    return f"{killed} sink session(s) terminated"
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the job held no sink session for {SESSION_WAIT_S}s")
                time.sleep(0.5)
        raise ValueError(kind)

    # -- watching --------------------------------------------------------------------

    def _sample_loop(self) -> None:
        probe = _LagProbe(self.setup.bootstrap, self.setup.group, self.setup.topic, self.args.partitions)
        try:
            while not self._done.is_set():
                consumed, lag = probe.read()
                in_sink = self.sink.counted_events()  # each event counts in every window that holds it
                in_sink = None if in_sink is None else in_sink // _windows_per_event(self.args)
                backlog = None if in_sink is None else max(0, self.good_delivered - in_sink)
                self._latest = Sample(self.now_s(), self.produced, consumed, lag, self.job.rss_bytes(), in_sink,
                                      backlog)
                self.timeline.add_sample(self._latest)
                self._watch_job()
                self._done.wait(1.0)
        finally:
            probe.close()

    def _watch_job(self) -> None:
        """Restarts a job that exited by itself, as a supervisor would; each such exit
        is recorded and fails the run."""
        if not self._job_lock.acquire(blocking=False):
            return
        try:
            if self._done.is_set():
                return
            if not self.job.running():
                self.unexpected_exits.append(f"start {self.job.starts} exited with {self.job.exit_code()}")
                self.say(f"the job exited by itself (code {self.job.exit_code()}): {self.job.log_tail(5)}")
                self._start_job()
        finally:
            self._job_lock.release()

    def _found(self):
        return self.sink.rows(), self.sink.dead_letters()

    def _compare(self) -> truth.Comparison:
        rows, letters = self._found()
        return truth.compare(self.expected_rows, rows, self.expected_dead_letters, letters)

    def _wait_caught_up(self) -> truth.Comparison:
        deadline = time.monotonic() + self.args.catch_up_timeout
        comparison = None
        last_report = 0.0
        while time.monotonic() < deadline:
            try:
                comparison = self._compare()
            except Exception as error:  # tables not created yet, or a session killed a moment ago
                self.say(f"sink not readable yet: {str(error).splitlines()[0]}")
                time.sleep(3)
                continue
            sample = self._latest
            if comparison.exact and sample is not None and sample.lag == 0:
                time.sleep(5)  # anything counted twice would show now
                comparison = self._compare()
                if comparison.exact:
                    self.say("caught up: sink and DLQ equal the truth, lag 0")
                    return comparison
            if time.monotonic() - last_report >= 15:
                last_report = time.monotonic()
                self.say("catching up: " + "; ".join(comparison.lines())
                         + (f"; lag {_lag(sample)}" if sample else ""))
            time.sleep(2)
        self.say(f"not caught up after {self.args.catch_up_timeout}s")
        return comparison if comparison is not None else self._compare()

    # -- backfill ----------------------------------------------------------------------

    def _backfill(self) -> bool:
        argv = [sys.executable, "-m", "onceflow.pipelines.aggregate", f"--input={self.input_url}",
                "--from=earliest", "--to=latest", "--status=off", *self.contract_flags, *self.output_flags]
        with open(self.setup.out / "backfill.log", "wb") as log:
            code = subprocess.call(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            self.say(f"the backfill exited with {code}; see {self.setup.out / 'backfill.log'}")
        return code == 0

    # -- the report ----------------------------------------------------------------------

    def _stall_memory(self) -> List[Dict]:
        figures = []
        for mark in self.timeline.faults:
            if mark.kind != STALL or mark.end_s is None:
                continue
            before = self.timeline.last_sample_before(mark.start_s)
            during = self.timeline.samples_between(mark.start_s, mark.end_s)
            if before is None or not during:
                continue
            lags = [s.lag for s in during if s.lag is not None]
            backlogs = [s.backlog for s in during if s.backlog is not None]
            peak = max(s.rss_bytes for s in during)
            figures.append({
                "start_s": mark.start_s, "end_s": mark.end_s,
                "rss_before_mib": round(before.rss_bytes / 2**20, 1), "rss_peak_mib": round(peak / 2**20, 1),
                "rss_growth_mib": round((peak - before.rss_bytes) / 2**20, 1),
                "lag_before": before.lag, "lag_peak": max(lags) if lags else None,
                "sink_backlog_before": before.backlog, "sink_backlog_peak": max(backlogs) if backlogs else None,
            })
        return figures

    def _report(self, live: truth.Comparison, after_backfill: truth.Comparison, backfill_ok: bool,
                production_s: float) -> int:
        args, setup = self.args, self.setup
        kinds: Dict[str, int] = {}
        for planned in self.ledger:
            kinds[planned.kind] = kinds.get(planned.kind, 0) + 1
        late = sum(1 for p in self.ledger if p.late)
        faults_done: Dict[str, int] = {}
        for mark in self.timeline.faults:
            if not mark.note.startswith("could not"):
                faults_done[mark.kind] = faults_done.get(mark.kind, 0) + 1
        stalls = self._stall_memory()
        memory_ok = all(s["rss_growth_mib"] <= args.memory_bound_mib for s in stalls)
        failures = []
        if not live.exact:
            failures.append("the live sink or DLQ differs from the truth")
        if not after_backfill.exact:
            failures.append("after the backfill the sink or DLQ differs from the truth")
        if not backfill_ok:
            failures.append("the backfill failed")
        if self.unexpected_exits:
            failures.append(f"the job exited by itself {len(self.unexpected_exits)} time(s)")
        if self.delivery_failures or self.missing_from_topic:
            failures.append(f"{len(self.delivery_failures)} record(s) could not be produced, "
                            f"{self.missing_from_topic} missing from the topic")
        if not memory_ok:
            failures.append(f"the job's memory grew by more than {args.memory_bound_mib} MiB during a stall")
        missed = [f"{k} x{n - faults_done.get(k, 0)}" for k, n in
                  ((KILL, args.kills), (BROKER_RESTART, args.broker_restarts), (STALL, args.stalls),
                   (CONNECTION_KILL, args.connection_kills)) if faults_done.get(k, 0) < n]
        if missed:
            failures.append("faults not injected: " + ", ".join(missed))
        report = {
            "runner": args.runner, "seed": args.seed, "topic": setup.topic, "sink": args.sink,
            "sink_url": self.sink.sink_url(), "window": args.window, "window_period": args.window_period,
            "allowed_lateness": args.allowed_lateness, "early_firing": args.early_firing, "kill_early": args.kill_early,
            "job_flags": args.job_flags,
            "records_produced": len(self.ledger), "records_in_topic": len(self.in_topic),
            "missing_from_topic": self.missing_from_topic, "good_events": kinds.get(GOOD, 0),
            "duplicates": kinds.get(DUPLICATE, 0), "malformed": kinds.get(BAD, 0),
            "too_late": kinds.get(TOO_LATE, 0), "late_within_lateness": late,
            "rate_per_s": args.rate, "production_s": round(production_s, 1),
            "kills": faults_done.get(KILL, 0), "broker_restarts": faults_done.get(BROKER_RESTART, 0),
            "stalls": faults_done.get(STALL, 0), "connection_kills": faults_done.get(CONNECTION_KILL, 0),
            "job_starts": self.job.starts,
            "unexpected_exits": self.unexpected_exits,
            "live": dataclasses.asdict(live) | {"exact": live.exact},
            "after_backfill": dataclasses.asdict(after_backfill) | {"exact": after_backfill.exact},
            "max_consumer_lag": self.timeline.max_lag(), "max_sink_backlog": self.timeline.max_backlog(),
            "stall_memory": stalls, "memory_bound_mib": args.memory_bound_mib,
            "re_read_at_kills": [m.re_read for m in self.timeline.faults if m.kind == KILL],
            "re_read_bound_records": self._re_read_bound(),
            "faults": [dataclasses.asdict(m) for m in self.timeline.faults],
            # Faults late in a crowded schedule land after production: restarts of a job catching up, not of one
            # reading a live stream.
            "last_record_produced_s": self._produced_at_s,
            "faults_after_production": self._faults_after_production(),
            "failures": failures, "ok": not failures,
        }
        (setup.out / "report.json").write_text(json.dumps(report, indent=2, default=list), encoding="utf-8")
        (setup.out / "timeline.json").write_text(json.dumps([dataclasses.asdict(s) for s in self.timeline.samples]),
                                                 encoding="utf-8")
        plot_note = self._plot()
        re_reads = ", ".join("?" if m.re_read is None else f"{m.re_read:,}" for m in self.timeline.faults
                             if m.kind == KILL)
        lines = [
            "",
            f"onceflow torture: {'PASS' if not failures else 'FAIL'} on {args.runner}, {args.sink} sink, "
            f"{_describe_windows(args)}"
            f"{f', early firing {args.early_firing}' if args.early_firing else ''}"
            f"{''.join(f', {flag}' for flag in args.job_flags)} (seed {args.seed})",
            f"  records produced   {len(self.ledger)}: {kinds.get(GOOD, 0)} good events ({late} late within the "
            f"lateness), {kinds.get(DUPLICATE, 0)} duplicates, {kinds.get(BAD, 0)} malformed or schema-violating, "
            f"{kinds.get(TOO_LATE, 0)} too late",
            f"  faults             {faults_done.get(KILL, 0)} kills, {faults_done.get(BROKER_RESTART, 0)} broker "
            f"restarts, {faults_done.get(STALL, 0)} stalls, {faults_done.get(CONNECTION_KILL, 0)} sink "
            f"connection kills; job started {self.job.starts} times",
            *(f"  live               {line}" for line in live.lines()),
            *(f"  after backfill     {line}" for line in after_backfill.lines()),
            f"  restarts re-read   {re_reads or '-'} records (a window + the lateness + a 30 s margin at "
            f"{args.rate}/s: {self._re_read_bound():,})",
            f"  max consumer lag   {self.timeline.max_lag()} records; max sink backlog "
            f"{self.timeline.max_backlog()} events (produced, not yet counted in the sink)",
            *(f"  stall {i + 1}            {s['end_s'] - s['start_s']:.0f}s: job RSS {s['rss_before_mib']} MiB "
              f"before, peak {s['rss_peak_mib']} MiB ({s['rss_growth_mib']:+}, bound {args.memory_bound_mib}); "
              f"consumer lag {s['lag_before']} before, peak {s['lag_peak']}; sink backlog "
              f"{s['sink_backlog_before']} before, peak {s['sink_backlog_peak']}" for i, s in enumerate(stalls)),
            f"  report             {setup.out / 'report.json'}",
            f"  plot               {plot_note}",
            *(f"  FAILED: {failure}" for failure in failures),
            *(f"    {example}" for example in (live.examples() + after_backfill.examples())[:20]),
        ]
        print("\n".join(lines), flush=True)
        return 0 if not failures else 1

    def _re_read_bound(self) -> int:
        """Records in a window, the allowed lateness and a 30 s margin of stream: the
        most a restart should read again (the margin covers the stream's 20 s
        event-time jitter, a reader bundle and the writes in flight)."""
        seconds = (_windows(self.args)[0] + parse_duration_ms(self.args.allowed_lateness)) / 1000 + 30
        return int(seconds * self.args.rate)

    def _plot(self) -> str:
        path = self.setup.out / "plot.png"
        try:
            write_plot(self.timeline, path, f"onceflow torture on {self.args.runner}, {self.args.sink} sink, "
                       f"{_describe_windows(self.args)}, seed {self.args.seed}", self._re_read_bound())
        except ImportError:
            return "not written: matplotlib is missing (pip install 'onceflow[dev]')"
        return str(path)


def _lag(sample: Sample) -> str:
    """The consumer lag for a progress line ("unknown" while the broker does not answer)."""
    return "unknown (the broker does not answer)" if sample.lag is None else f"{sample.lag:,}"


def _progress(sample: Sample) -> str:
    """The lag and the job's memory for a progress line (no memory while no job
    process runs: killed, not yet restarted)."""
    job = f"job RSS {sample.rss_bytes / 2**20:.0f} MiB" if sample.rss_bytes else "no job process running"
    return f" | lag {_lag(sample)} | {job}"


class _LagProbe:
    """The group's committed offsets and lag, asked of
    :mod:`onceflow.io.kafka.admin` with one consumer kept for the whole run (it
    samples every second; it never joins the group: it only asks)."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int):
        from onceflow.io.kafka.admin import new_consumer
        from onceflow.io.kafka.config import KafkaReadConfig, KafkaTopic

        # quiet, errors ignored: the broker restarts on purpose; its connection errors are not news.
        self._consumer = new_consumer(KafkaReadConfig(KafkaTopic(bootstrap, topic), group_id=group), "torture-lag",
                                      error_cb=lambda error: None, quiet=True)
        self._topic = topic
        self._partitions = list(range(partitions))

    def committed_offsets(self) -> Optional[List[int]]:
        """Each partition's committed offset (0 for none), None while the broker does not answer."""
        from confluent_kafka import KafkaException

        from onceflow.io.kafka.admin import committed_offsets

        try:
            found = committed_offsets(self._consumer, self._topic, self._partitions, timeout_s=2)
        except KafkaException:
            return None
        return [found.get(p, 0) for p in self._partitions]

    def read(self):
        """(records committed, lag) or (None, None) while the broker does not answer."""
        from confluent_kafka import KafkaException

        from onceflow.io.kafka.admin import partition_lags

        try:
            lags = partition_lags(self._consumer, self._topic, self._partitions, timeout_s=2)
        except KafkaException:
            return None, None
        return sum(p.committed or 0 for p in lags), sum(p.lag for p in lags)

    def close(self) -> None:
        self._consumer.close()
