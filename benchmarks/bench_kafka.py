"""The aggregate job against Kafka, side by side with a plain consume loop.

    python benchmarks/bench_kafka.py [--events 200000] [--repeat 1]
        [--contestants yardstick,kafka-backfill,file-backfill,prism,flink]
    python benchmarks/bench_kafka.py --live-rate 500 --live-seconds 180 [--live-runner prism]

Produces a deterministic, seeded workload (N JSON orders over 1,000 stores, 1% exact
re-sends of the same bytes, event times rising with +-2 s jitter) to a fresh
3-partition topic on the dev broker, keyed by store so a re-send lands in the
partition of its original. The truth (dedup by order_id, tumbling windows, count and
sum of qty per store and window) is computed here in plain Python from the produced
lines. Each contestant reads the same topic (or the same lines from a file) and its
result is compared row by row with the truth:

  yardstick       a plain confluent-kafka consume(10000) loop (fetch.queue.backoff.ms=10, as onceflow's
                  reader), orjson (json if absent),
                  dict dedup and dict aggregate, one process, earliest to end offsets
  kafka-backfill  python -m onceflow.pipelines.aggregate --input kafka://... --from earliest --to latest
  file-backfill   the same job over a JSON-lines file holding the same lines
  prism           the live job (no --runner: Prism from the dev stack) started on the whole
                  backlog; timed from process start until the sink equals the truth
  flink           the same on the dev stack's Flink job server

Every contestant runs as a child process and is timed from its start to its exit (or, live,
to the moment the sink is exact), so interpreter start-up, imports and pipeline construction
count. Records/s counts every produced record, re-sends included. Peak memory is the largest
sum of resident memory over the child's process tree, sampled from /proc, and never less than
the child's own ru_maxrss. The machine is shared and noisy: quote medians (--repeat).

The job is driven only through its command line (and `onceflow dev status --json` for where
the dev services are), so the benchmark does not depend on the engine's internals.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

START_MS = 1_793_610_000_000  # 2026-11-02T09:00:00Z, as in bench_aggregate.py
PARTITIONS = 3
JITTER_MS = 2_000
RESEND_FRACTION = 0.01
RESEND_MAX_DELAY = 500  # a re-send follows its original within this many events
ALLOWED_LATENESS = "5m"  # far more than jitter + re-send delay: nothing is too late
LIVE_IDLE_TIMEOUT = "2s"  # a caught-up, quiet partition lets the last window close after this
ALL_CONTESTANTS = ("yardstick", "kafka-backfill", "file-backfill", "prism", "flink")
BACKFILLS = ("yardstick", "kafka-backfill", "file-backfill")
# Copied from how the torture starts a live job on the dev stack's Flink job server:
# streaming, offsets committed at each checkpoint.
FLINK_STREAMING_FLAGS = ("--streaming", "--checkpointing_interval=20000", "--min_pause_between_checkpoints=15000")

Key = Tuple[str, int]  # (store, window_start_ms)
Table = Dict[Key, Tuple[int, int]]  # -> (count, sum_qty)

_T0 = time.monotonic()


def say(message: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- the workload and its truth ---------------------------------------------------------


def workload(events: int, keys: int, seed: int) -> Iterator[Tuple[bytes, bytes]]:
    """(key, value) pairs in production order: ``events`` distinct orders plus about
    1% exact re-sends (the same bytes), each a little after its original."""
    rng = random.Random(seed)
    pending: Dict[int, List[Tuple[bytes, bytes]]] = {}
    base = START_MS
    for n in range(events):
        base += rng.randint(0, 20)
        store = f"s{rng.randrange(keys)}"
        value = json.dumps({"order_id": f"o{n}", "event_time": base + rng.randint(-JITTER_MS, JITTER_MS),
                            "store": store, "qty": rng.randint(1, 5),
                            "price": round(rng.uniform(1, 10), 2)}).encode()
        record = (store.encode(), value)
        yield record
        if rng.random() < RESEND_FRACTION:
            pending.setdefault(n + rng.randint(1, RESEND_MAX_DELAY), []).append(record)
        yield from pending.pop(n, ())
    for n in sorted(pending):
        yield from pending[n]


@dataclasses.dataclass
class Truth:
    table: Table
    records: int  # every line, re-sends included
    distinct: int
    # How far the latest event was behind the greatest event time seen before it, in ms.
    # The job's too-late rule compares with a partition's high water, never above the
    # global one, so a maximum below the allowed lateness means nothing is too late.
    max_behind_ms: int


def truth_from_lines(lines: Iterable[bytes], window_ms: int = 60_000) -> Truth:
    """Dedup by order_id (first copy wins), tumbling windows aligned to the epoch,
    count and sum of qty per (store, window_start)."""
    table: Dict[Key, List[int]] = {}
    seen = set()
    records = 0
    high_water: Optional[int] = None
    max_behind = 0
    for line in lines:
        if not line.strip():
            continue
        records += 1
        event = json.loads(line)
        t = int(event["event_time"])
        if high_water is not None and high_water - t > max_behind:
            max_behind = high_water - t
        high_water = t if high_water is None else max(high_water, t)
        if event["order_id"] in seen:
            continue
        seen.add(event["order_id"])
        cell = table.setdefault((event["store"], t - t % window_ms), [0, 0])
        cell[0] += 1
        cell[1] += int(event["qty"])
    return Truth({k: (v[0], v[1]) for k, v in table.items()}, records, len(seen), max_behind)


@dataclasses.dataclass
class Diff:
    wrong: int
    missing: int
    extra: int

    @property
    def exact(self) -> bool:
        return not (self.wrong or self.missing or self.extra)

    def __str__(self) -> str:
        return f"wrong {self.wrong}, missing {self.missing}, extra {self.extra}"


def compare(truth: Table, got: Table) -> Diff:
    return Diff(wrong=sum(1 for k, v in got.items() if k in truth and truth[k] != v),
                missing=sum(1 for k in truth if k not in got),
                extra=sum(1 for k in got if k not in truth))


def utc_ms(text: str) -> int:
    """``2026-11-02T09:00:00.000Z`` (or any ISO-8601 with an offset) to epoch ms."""
    stamp = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return round(stamp.timestamp() * 1000)


def read_sink(db: str, table: str = "aggregates") -> Table:
    """The job's SQLite sink as a table; empty while it does not exist yet."""
    if not os.path.exists(db):
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            rows = connection.execute(f'SELECT store, window_start, "count", sum_qty FROM "{table}"').fetchall()
    except sqlite3.OperationalError:  # not created yet, or locked for longer than the timeout
        return {}
    return {(store, utc_ms(start)): (int(count), int(total)) for store, start, count, total in rows}


def sink_totals(db: str, table: str = "aggregates") -> Tuple[int, int]:
    """(rows, summed count): a cheap look before comparing every row."""
    if not os.path.exists(db):
        return 0, 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            rows, total = connection.execute(f'SELECT COUNT(*), COALESCE(SUM("count"), 0) FROM "{table}"').fetchone()
    except sqlite3.OperationalError:
        return 0, 0
    return int(rows), int(total)


def last_write(db: str, table: str = "aggregates") -> Optional[float]:
    """The sink's latest ``written_at`` as epoch seconds: when the job wrote its
    last row (the harness looks only every few seconds), None when empty."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
        (latest,) = connection.execute(f'SELECT MAX(written_at) FROM "{table}"').fetchone()
    return None if latest is None else utc_ms(latest) / 1000


def dlq_count(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


# -- Kafka ------------------------------------------------------------------------------


def create_topic(bootstrap: str, name: str, partitions: int = PARTITIONS) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[name].result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        topic = admin.list_topics(topic=name, timeout=5).topics.get(name)
        if topic is not None and topic.error is None and len(topic.partitions) == partitions:
            return
        time.sleep(0.2)
    raise RuntimeError(f"topic {name} did not appear on {bootstrap}")


def delete_topic(bootstrap: str, name: str) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the result arrives
    try:
        admin.delete_topics([name])[name].result(30)
    except Exception as error:  # noqa: BLE001 - cleanup only
        say(f"could not delete topic {name}: {error}")


def new_producer(bootstrap: str):
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20,
                     "batch.num.messages": 10000, "compression.type": "none"})


def produce_one(producer, topic: str, key: bytes, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=key)
            return
        except BufferError:
            producer.poll(0.1)


def end_offsets(bootstrap: str, topic: str, group: Optional[str] = None) -> Dict[int, Tuple[int, int, int]]:
    """partition -> (low, high, committed offset of ``group`` or -1)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group or f"bench-probe-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False})
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)} if group else {}
        result = {}
        for tp in parts:
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            result[tp.partition] = (low, high, committed.get(tp.partition, -1))
        return result
    finally:
        consumer.close()


# -- the yardstick (runs as a child process: python bench_kafka.py --yardstick-worker ...) --


def yardstick_worker(bootstrap: str, topic: str, out: str, window_ms: int) -> None:
    from confluent_kafka import Consumer, TopicPartition

    try:
        import orjson

        loads = orjson.loads
        parser = "orjson"
    except ImportError:
        loads = json.loads
        parser = "json"
    # fetch.queue.backoff.ms as onceflow's reader sets it (KafkaReadConfig.consumer_settings):
    # with librdkafka's default (1,000 ms) both would mostly wait for the broker.
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-yardstick-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "enable.partition.eof": False,
                         "fetch.queue.backoff.ms": 10})
    ends: Dict[int, int] = {}
    assignment = []
    for p in range(PARTITIONS):
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        if high > low:
            ends[p] = high
            assignment.append(TopicPartition(topic, p, low))
    consumer.assign(assignment)
    seen: Dict[str, None] = {}
    aggregates: Dict[Tuple[str, int], List[int]] = {}
    records = 0
    while ends:
        for message in consumer.consume(10000, timeout=1.0):
            if message.error():
                raise RuntimeError(str(message.error()))
            partition, offset = message.partition(), message.offset()
            end = ends.get(partition)
            if end is None or offset >= end:
                continue
            if offset == end - 1:
                del ends[partition]
            records += 1
            event = loads(message.value())
            order_id = event["order_id"]
            if order_id in seen:
                continue
            seen[order_id] = None
            t = event["event_time"]
            key = (event["store"], t - t % window_ms)
            cell = aggregates.get(key)
            if cell is None:
                aggregates[key] = [1, event["qty"]]
            else:
                cell[0] += 1
                cell[1] += event["qty"]
    consumer.close()
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"records": records, "parser": parser,
                   "rows": [[store, start, c, s] for (store, start), (c, s) in aggregates.items()]}, handle)


# -- child processes: timing and memory -------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants, from /proc."""
    parents: Dict[int, int] = {}
    rss: Dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * _PAGE  # rss in pages (field 24 of stat)
        except (OSError, IndexError, ValueError):
            continue
    members = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in members and pid not in members:
                members.add(pid)
                grew = True
    return sum(rss.get(pid, 0) for pid in members)


class Child:
    """A child process in its own session, its output in a log file, its process tree's
    peak resident memory sampled in the background."""

    def __init__(self, argv: Sequence[str], log_path: str, env: Optional[Dict[str, str]] = None):
        self.argv = list(argv)
        self.log_path = log_path
        self.peak_rss = 0
        self.maxrss_self = 0
        self.returncode: Optional[int] = None
        with open(log_path, "ab") as log:
            self.started = time.monotonic()
            self.started_at = time.time()  # the wall clock, to compare with a sink's written_at
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        self.ended: Optional[float] = None
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, tree_rss_bytes(self.process.pid))
            self._stop.wait(0.25)

    def poll(self) -> Optional[int]:
        """Reaps the child with wait4 (for its ru_maxrss) once it has exited."""
        if self.returncode is None:
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                self.ended = time.monotonic()
                self.returncode = os.waitstatus_to_exitcode(status)
                self.process.returncode = self.returncode
                self.maxrss_self = usage.ru_maxrss * 1024
                self._stop.set()
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        return self.returncode

    def stop(self) -> None:
        """SIGTERM to the whole process group (the job stops its pipeline, as on
        Ctrl-C), SIGKILL after 60 s. Not SIGINT: a shell without job control starts
        a background command with SIGINT ignored, and its children inherit that (a
        benchmark run with `&` waited 60 s for each live job)."""
        for sig, grace in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            if self.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            if self.wait(grace) is not None:
                break
        try:  # anything left in the group (a runner the job started)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @property
    def peak_bytes(self) -> int:
        return max(self.peak_rss, self.maxrss_self)

    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as log:
                return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def reported_runner(self) -> str:
        """The runner the job says it ran on (its final 'done in ... on RUNNER' line)."""
        try:
            with open(self.log_path, "rb") as log:
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        for line in reversed(text.splitlines()):
            if " done in " in line and " on " in line:
                return line.split(" on ", 1)[1].split(" (", 1)[0].strip()
        return ""


class ServiceSampler:
    """Peak resident memory of a long-running service's process tree while a job runs."""

    def __init__(self, pid: Optional[int]):
        self.peak = 0
        self._done = threading.Event()
        if pid:
            threading.Thread(target=self._sample, args=(int(pid),), daemon=True).start()

    def _sample(self, pid: int) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_rss_bytes(pid))
            self._done.wait(1.0)

    def stop(self) -> None:
        self._done.set()


# -- results ----------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    name: str
    seconds: List[float] = dataclasses.field(default_factory=list)
    peak_bytes: List[int] = dataclasses.field(default_factory=list)
    diff: Optional[Diff] = None
    dead_letters: int = 0
    note: str = ""
    skipped: str = ""
    failed: str = ""

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def exact(self) -> bool:
        return self.diff is not None and self.diff.exact and self.dead_letters == 0 and not self.failed


# -- the bench --------------------------------------------------------------------------


def dev_status() -> Dict[str, dict]:
    try:
        out = subprocess.run([sys.executable, "-m", "onceflow.cli", "dev", "status", "--json"], capture_output=True,
                             text=True, timeout=120)
        return json.loads(out.stdout)
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        say(f"`onceflow dev status --json` failed ({error}); assuming only the given broker")
        return {}


# The interpreter that runs the onceflow contestants (--job-python): this one unless told.
JOB_PYTHON = sys.executable


def engine_commit() -> str:
    """The git commit of the onceflow package that the jobs' interpreter imports,
    and whether pandas is importable there (Beam imports it when present: about
    0.35 s of every job's start; a plain install of onceflow does not bring it)."""
    probe = ("import importlib.util, os; spec = importlib.util.find_spec('onceflow'); "
             "print(os.path.dirname(spec.origin) if spec and spec.origin else ''); "
             "print('yes' if importlib.util.find_spec('pandas') else 'no')")
    try:
        package, pandas = subprocess.run([JOB_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60,
                                         check=True).stdout.split("\n")[:2]
    except (OSError, subprocess.SubprocessError, ValueError):
        return f"onceflow not found by {JOB_PYTHON}"
    if not package:
        return f"onceflow not found by {JOB_PYTHON}"
    folder = os.path.dirname(package)
    where = f"({folder}; jobs run by {JOB_PYTHON}, pandas installed there: {pandas})"

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:  # the last commit that changed the package, and whether it has uncommitted changes
        commit = git("log", "-1", "--format=%h", "--", package)
        dirty = " with uncommitted changes" if git("status", "--porcelain", "--", package) else ""
        return f"onceflow at {commit}{dirty} {where}"
    except (OSError, subprocess.SubprocessError):
        return f"onceflow from {folder}, not a git checkout {where}"


def job_argv(*flags: str) -> List[str]:
    return [JOB_PYTHON, "-m", "onceflow.pipelines.aggregate", *flags]


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.window_ms = int(args.window_seconds) * 1000
        self.run_id = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:4]}"
        self.tmp = tempfile.mkdtemp(prefix=f"onceflow-bench-{self.run_id}-")
        self.status = dev_status()
        self.bootstrap = args.bootstrap or self.status.get("kafka", {}).get("bootstrap_servers") or "127.0.0.1:19092"
        self.topic = f"bench-{self.run_id}"
        self.contract = ["--id_field=order_id", "--time_field=event_time", "--key_fields=store",
                         "--aggregate=count,sum:qty", f"--window={args.window_seconds}s",
                         f"--allowed_lateness={ALLOWED_LATENESS}", *args.job_flag]
        self.truth: Optional[Truth] = None

    # -- setup --

    def produce_backlog(self) -> str:
        args = self.args
        create_topic(self.bootstrap, self.topic)
        path = os.path.join(self.tmp, "events.jsonl")
        producer = new_producer(self.bootstrap)
        started = time.monotonic()
        count = 0
        with open(path, "wb") as handle:
            for key, value in workload(args.events, args.keys, args.seed):
                handle.write(value + b"\n")
                produce_one(producer, self.topic, key, value)
                count += 1
                if count % 10000 == 0:
                    producer.poll(0)
                if count % 200_000 == 0:
                    say(f"produced {count:,} records")
        if producer.flush(120) != 0:
            raise RuntimeError("the producer could not deliver every record")
        offsets = end_offsets(self.bootstrap, self.topic)
        on_topic = sum(high - low for low, high, _ in offsets.values())
        if on_topic != count:
            raise RuntimeError(f"produced {count} records but the topic holds {on_topic}")
        say(f"produced {count:,} records ({args.events:,} orders + {count - args.events:,} re-sends) to "
            f"{self.topic} in {time.monotonic() - started:.1f}s; per partition "
            + ", ".join(f"{p}:{high - low:,}" for p, (low, high, _) in sorted(offsets.items())))
        with open(path, "rb") as handle:
            self.truth = truth_from_lines(handle, self.window_ms)
        if self.truth.records != count:
            raise RuntimeError("the file and the topic disagree")
        if self.truth.max_behind_ms >= 60_000 * 5:
            raise RuntimeError("the workload has events that could be too late; raise ALLOWED_LATENESS")
        say(f"truth: {len(self.truth.table):,} rows, {self.truth.distinct:,} distinct orders "
            f"(latest event at most {self.truth.max_behind_ms / 1000:.1f}s behind, lateness {ALLOWED_LATENESS}: "
            "none too late)")
        return path

    # -- contestants --

    def _run_to_exit(self, name: str, argv: List[str], log: str, timeout: float) -> Child:
        child = Child(argv, log)
        last = time.monotonic()
        while child.poll() is None:
            if child.seconds() > timeout:
                child.stop()
                raise RuntimeError(f"{name} did not finish within {timeout:.0f}s")
            if time.monotonic() - last >= 15:
                last = time.monotonic()
                say(f"  {name}: running {child.seconds():.0f}s, peak memory {child.peak_bytes / 2**20:,.0f} MB")
            time.sleep(0.1)
        if child.returncode != 0:
            raise RuntimeError(f"{name} exited with status {child.returncode}:\n{child.tail()}")
        return child

    def yardstick(self, result: Result, attempt: int) -> None:
        out = os.path.join(self.tmp, f"yardstick{attempt}.json")
        argv = [sys.executable, os.path.abspath(__file__), "--yardstick-worker", self.bootstrap, self.topic, out,
                str(self.window_ms)]
        child = self._run_to_exit("yardstick", argv, os.path.join(self.tmp, f"yardstick{attempt}.log"),
                                  self.args.timeout)
        with open(out, encoding="utf-8") as handle:
            data = json.load(handle)
        got = {(store, start): (c, s) for store, start, c, s in data["rows"]}
        self._record(result, child, compare(self.truth.table, got), 0)
        result.note = f"confluent-kafka consume(10000) + {data['parser']} + dicts, {data['records']:,} records read"

    def backfill(self, result: Result, attempt: int, source: List[str]) -> None:
        tag = f"{result.name}{attempt}"
        db, dlq = os.path.join(self.tmp, f"{tag}.db"), os.path.join(self.tmp, f"{tag}-dlq.jsonl")
        argv = job_argv(*source, *self.contract, f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--status=off")
        child = self._run_to_exit(result.name, argv, os.path.join(self.tmp, f"{tag}.log"), self.args.timeout)
        self._record(result, child, compare(self.truth.table, read_sink(db)), dlq_count(dlq))
        runner = child.reported_runner()
        result.note = f"job reports runner {runner}" if runner else "job's default runner"

    def live(self, result: Result, attempt: int, runner_flags: List[str], job_name: Optional[str] = None) -> None:
        tag = result.name if attempt == 0 else f"{result.name}-{attempt + 1}"  # a fresh group and sink per run
        job_name = f"{job_name}-{attempt + 1}" if job_name else None
        db, dlq = os.path.join(self.tmp, f"{tag}.db"), os.path.join(self.tmp, f"{tag}-dlq.jsonl")
        group = f"bench-{self.run_id}-{tag}"
        argv = job_argv(f"--input=kafka://{self.bootstrap}/{self.topic}", f"--kafka_group={group}",
                        f"--kafka_idle_timeout={LIVE_IDLE_TIMEOUT}", *self.contract,
                        f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--status=on", *runner_flags,
                        *([f"--job_name={job_name}"] if job_name else []))
        child = Child(argv, os.path.join(self.tmp, f"{tag}.log"))
        server = ServiceSampler(self.status.get("flink", {}).get("pid") if job_name else None)
        truth = self.truth.table
        want_rows, want_count = len(truth), sum(c for c, _ in truth.values())
        elapsed: Optional[float] = None
        last_note = time.monotonic()
        diff: Optional[Diff] = None
        try:
            while child.seconds() < self.args.timeout:
                if child.poll() is not None:
                    result.failed = f"the live job exited with status {child.returncode}"
                    say(f"  {tag}: {result.failed}:\n{child.tail()}")
                    break
                rows, counted = sink_totals(db)
                if rows == want_rows and counted == want_count:
                    diff = compare(truth, read_sink(db))
                    if diff.exact:
                        # The job's last write, not this look (up to 3 s later).
                        written = last_write(db)
                        elapsed = child.seconds() if written is None else min(
                            child.seconds(), written - child.started_at)
                        break
                if time.monotonic() - last_note >= 15:
                    last_note = time.monotonic()
                    say(f"  {tag}: {child.seconds():.0f}s, sink {rows:,}/{want_rows:,} rows, "
                        f"{counted:,}/{want_count:,} orders counted, peak memory {child.peak_bytes / 2**20:,.0f} MB")
                # Far from the end, look rarely (a look reads the whole table, CPU the job
                # would use); once 95 % of the orders are counted, four times a second.
                if counted >= 0.95 * want_count:
                    time.sleep(0.25)
                else:
                    time.sleep(1.0 if want_rows < 50_000 else 3.0)
            else:
                result.failed = f"the sink did not equal the truth within --timeout {self.args.timeout:.0f}s"
        finally:
            server.stop()
            child.stop()
            if job_name:
                cancel_flink_job(self.status.get("flink", {}).get("job_endpoint", ""), job_name)
        diff = compare(truth, read_sink(db))
        if result.diff is None or not diff.exact:  # keep the worst run's difference
            result.diff = diff
        result.dead_letters = max(result.dead_letters, dlq_count(dlq))
        result.peak_bytes.append(child.peak_bytes)
        if elapsed is not None:
            result.seconds.append(elapsed)
        result.note = (f"live, group {group} (the last run's), idle timeout {LIVE_IDLE_TIMEOUT}; timed until the "
                       "job's last write to the sink, once the sink equals the truth")
        if server.peak:
            result.note += (f"; peak memory is the job process tree only, the job server (a shared JVM, already "
                            f"running) peaked at {server.peak / 2**20:,.0f} MB")

    def _record(self, result: Result, child: Child, diff: Diff, dead_letters: int) -> None:
        result.seconds.append(child.seconds())
        result.peak_bytes.append(child.peak_bytes)
        if result.diff is None or not diff.exact:  # keep the worst attempt's difference
            result.diff = diff
        result.dead_letters = max(result.dead_letters, dead_letters)

    # -- the run --

    def chosen(self) -> List[str]:
        names = [n.strip() for n in self.args.contestants.split(",") if n.strip()]
        unknown = [n for n in names if n not in ALL_CONTESTANTS]
        if unknown:
            raise SystemExit(f"--contestants: unknown {', '.join(unknown)}; choose from {', '.join(ALL_CONTESTANTS)}")
        return names

    def run(self) -> List[Result]:
        names = self.chosen()
        say(f"workload: {self.args.events:,} orders, {self.args.keys:,} keys, seed {self.args.seed}, "
            f"topic {self.topic} on {self.bootstrap}, scratch {self.tmp}")
        data = self.produce_backlog()
        results = []
        for name in names:
            result = Result(name)
            results.append(result)
            try:
                self._run_contestant(name, result, data)
            except Exception as error:  # noqa: BLE001 - report it and go on with the others
                result.failed = str(error).splitlines()[0]
                say(f"{name}: FAILED: {error}")
            if not result.skipped:
                self._progress_line(result)
        return results

    def _run_contestant(self, name: str, result: Result, data: str) -> None:
        repeat = max(1, self.args.repeat)
        if name in BACKFILLS:
            for attempt in range(repeat):
                say(f"{name}: run {attempt + 1}/{repeat}")
                if name == "yardstick":
                    self.yardstick(result, attempt)
                elif name == "kafka-backfill":
                    self.backfill(result, attempt, [f"--input=kafka://{self.bootstrap}/{self.topic}",
                                                    "--from=earliest", "--to=latest"])
                else:
                    self.backfill(result, attempt, [f"--input={data}"])
                say(f"  {name}: {result.seconds[-1]:.1f}s, exact {'yes' if result.diff.exact else 'no'}")
            return
        for attempt in range(repeat):
            if result.skipped or result.failed:
                return
            say(f"{name}: run {attempt + 1}/{repeat}")
            self._run_live(name, result, attempt)

    def _run_live(self, name: str, result: Result, attempt: int) -> None:
        if name == "prism":
            prism = self.status.get("prism", {})
            if self.status and not prism.get("healthy"):
                result.skipped = f"Prism is not built ({prism.get('path', '?')}): onceflow dev up --services prism"
                say(f"prism: skipped: {result.skipped}")
                return
            say("prism: live job on the whole backlog (no --runner: Prism from the dev stack)")
            self.live(result, attempt, [])
            return
        flink = self.status.get("flink", {})
        if not flink.get("healthy"):
            result.skipped = (f"no Flink job server answers on {flink.get('job_endpoint', '?')}: "
                              "onceflow dev up --services flink")
            say(f"flink: skipped: {result.skipped}")
            return
        say(f"flink: live job on the whole backlog, job server {flink['job_endpoint']}")
        self.live(result, attempt, [*flink.get("pipeline_args", []), *FLINK_STREAMING_FLAGS],
                  job_name=f"onceflow-bench-{self.run_id}")

    def _progress_line(self, result: Result) -> None:
        if result.failed and not result.seconds:
            return
        say(f"{result.name}: median {result.median:.1f}s, exact {'yes' if result.exact else 'no'}"
            if result.seconds else f"{result.name}: not exact ({result.failed})")

    def cleanup(self) -> None:
        if not self.args.keep:
            delete_topic(self.bootstrap, self.topic)
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            say(f"kept topic {self.topic} and {self.tmp}")


def cancel_flink_job(job_endpoint: str, job_name: str) -> None:
    """A job server may keep a stopped client's job running: cancel it (dev tooling,
    as the torture does)."""
    if not job_endpoint:
        return
    try:
        from onceflow_dev.devstack.flink import cancel_running_jobs

        cancel_running_jobs(job_endpoint, name_prefix=job_name)
    except Exception as error:  # noqa: BLE001
        say(f"could not cancel {job_name} on {job_endpoint}: {error}")


def report(bench: Bench, results: List[Result]) -> None:
    args = bench.args
    records = bench.truth.records if bench.truth else 0
    yard = next((r for r in results if r.name == "yardstick" and r.seconds), None)
    yard_rate = records / yard.median if yard else None
    print()
    print(f"{records:,} records ({args.events:,} orders, {records - args.events:,} exact re-sends), "
          f"{args.keys:,} keys, {args.window_seconds}s tumbling windows, count + sum:qty, "
          f"{len(bench.truth.table) if bench.truth else 0:,} truth rows; median of {max(1, args.repeat)} runs each")
    header = f"{'contestant':<15} {'seconds':>9} {'records/s':>11} {'x yardstick':>12} {'peak MB':>8}  exact  wrong/missing/extra  DLQ"
    print(header)
    print("-" * len(header))
    for r in results:
        if r.skipped:
            print(f"{r.name:<15} skipped: {r.skipped}")
            continue
        seconds = r.median
        rate = records / seconds if seconds else None
        ratio = f"{rate / yard_rate:.3f}" if rate and yard_rate else "-"
        peak = f"{max(r.peak_bytes) / 2**20:,.0f}" if r.peak_bytes else "-"
        diff = f"{r.diff.wrong}/{r.diff.missing}/{r.diff.extra}" if r.diff else "-"
        print(f"{r.name:<15} {f'{seconds:.1f}' if seconds else '-':>9} {f'{rate:,.0f}' if rate else '-':>11} "
              f"{ratio:>12} {peak:>8}  {'yes' if r.exact else 'no':<5}  {diff:<19}  {r.dead_letters}")
    for r in results:
        details = []
        if len(r.seconds) > 1:
            details.append("runs " + ", ".join(f"{s:.1f}s" for s in r.seconds))
        if r.note:
            details.append(r.note)
        if r.failed:
            details.append(f"FAILED: {r.failed}")
        if details and not r.skipped:
            print(f"  {r.name}: {'; '.join(details)}")
    print_footer(args)


def print_footer(args: argparse.Namespace) -> None:
    command = ["python", "benchmarks/bench_kafka.py"]
    if args.live_rate:
        command += [f"--live-rate={args.live_rate:g}", f"--live-seconds={args.live_seconds:g}",
                    f"--live-runner={args.live_runner}"]
    else:
        command += [f"--events={args.events}", f"--repeat={args.repeat}", f"--contestants={args.contestants}"]
    command += [f"--keys={args.keys}", f"--seed={args.seed}", f"--window-seconds={args.window_seconds}"]
    if args.bootstrap:
        command.append(f"--bootstrap={args.bootstrap}")
    command += [f"--job-flag={flag}" for flag in args.job_flag]
    if args.job_python:
        command.append(f"--job-python={args.job_python}")
    print(f"reproduce: {shlex.join(command)}")
    try:
        from importlib.metadata import version

        beam = version("apache-beam")
    except Exception:  # noqa: BLE001
        beam = "?"
    print(f"machine: nproc {os.cpu_count()}, Python {platform.python_version()}, apache-beam {beam}, "
          f"{platform.machine()}; {engine_commit()}")


# -- live mode: a steady rate while the job runs ---------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def live_rate(bench: Bench) -> int:
    args = bench.args
    window_ms = bench.window_ms
    create_topic(bench.bootstrap, bench.topic)
    tag = f"live-{args.live_runner}"
    db, dlq = os.path.join(bench.tmp, f"{tag}.db"), os.path.join(bench.tmp, f"{tag}-dlq.jsonl")
    group = f"bench-{bench.run_id}-{tag}"
    runner_flags: List[str] = []
    job_name = None
    if args.live_runner == "flink":
        flink = bench.status.get("flink", {})
        if not flink.get("healthy"):
            print(f"live: no Flink job server answers on {flink.get('job_endpoint', '?')}: "
                  "onceflow dev up --services flink", file=sys.stderr)
            return 2
        job_name = f"onceflow-bench-{bench.run_id}"
        runner_flags = [*flink.get("pipeline_args", []), *FLINK_STREAMING_FLAGS, f"--job_name={job_name}"]
    elif bench.status and not bench.status.get("prism", {}).get("healthy"):
        print("live: Prism is not built: onceflow dev up --services prism", file=sys.stderr)
        return 2
    argv = job_argv(f"--input=kafka://{bench.bootstrap}/{bench.topic}", f"--kafka_group={group}",
                    f"--kafka_idle_timeout={LIVE_IDLE_TIMEOUT}", *bench.contract,
                    f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--status=on", *runner_flags)
    say(f"live: {args.live_rate:g} orders/s for {args.live_seconds:g}s on {args.live_runner}, topic {bench.topic}")
    child = Child(argv, os.path.join(bench.tmp, f"{tag}.log"))
    first_seen: Dict[Key, Dict[Tuple[int, int], float]] = {}  # row -> value -> wall time first seen
    lags: List[int] = []
    done = threading.Event()

    def watch_sink() -> None:
        while not done.is_set():
            now = time.time()
            for key, value in read_sink(db).items():
                first_seen.setdefault(key, {}).setdefault(value, now)
            done.wait(0.5)

    def watch_lag() -> None:
        while not done.is_set():
            try:
                offsets = end_offsets(bench.bootstrap, bench.topic, group)
                lags.append(sum(high - (committed if committed >= 0 else low)
                                for low, high, committed in offsets.values()))
            except Exception as error:  # noqa: BLE001
                say(f"  lag probe failed: {error}")
            done.wait(args.lag_every)

    watchers = [threading.Thread(target=watch_sink, daemon=True), threading.Thread(target=watch_lag, daemon=True)]
    for thread in watchers:
        thread.start()
    rng = random.Random(args.seed)
    producer = new_producer(bench.bootstrap)
    lines: List[bytes] = []
    pending: Dict[int, List[Tuple[bytes, bytes]]] = {}
    started = time.time()
    produce_end = started + args.live_seconds
    n = 0
    last_note = time.monotonic()
    try:
        while time.time() < produce_end:
            if child.poll() is not None:
                raise RuntimeError(f"the live job exited with status {child.returncode}:\n{child.tail()}")
            due = int((time.time() - started) * args.live_rate)
            while n < due:
                store = f"s{rng.randrange(args.keys)}"
                now_ms = int(time.time() * 1000)
                value = json.dumps({"order_id": f"o{n}", "event_time": now_ms + rng.randint(-JITTER_MS, JITTER_MS),
                                    "store": store, "qty": rng.randint(1, 5),
                                    "price": round(rng.uniform(1, 10), 2)}).encode()
                batch = [(store.encode(), value)]
                if rng.random() < RESEND_FRACTION:
                    pending.setdefault(n + rng.randint(1, RESEND_MAX_DELAY), []).append(batch[0])
                batch.extend(pending.pop(n, ()))
                for key, val in batch:
                    produce_one(producer, bench.topic, key, val)
                    lines.append(val)
                n += 1
            producer.poll(0)
            if time.monotonic() - last_note >= 15:
                last_note = time.monotonic()
                say(f"  live: {n:,} orders produced, lag {lags[-1] if lags else '?'}, "
                    f"sink {len(first_seen):,} rows, job memory {child.peak_bytes / 2**20:,.0f} MB peak")
            time.sleep(0.01)
        for key_n in sorted(pending):
            for key, val in pending[key_n]:
                produce_one(producer, bench.topic, key, val)
                lines.append(val)
        producer.flush(60)
        produced_until = time.time()
        truth = truth_from_lines(lines, window_ms)
        bench.truth = truth
        say(f"live: produced {truth.records:,} records; waiting for the sink to equal the truth "
            f"({len(truth.table):,} rows)")
        deadline = time.monotonic() + args.timeout
        diff = compare(truth.table, read_sink(db))
        while not diff.exact and time.monotonic() < deadline and child.poll() is None:
            time.sleep(2)
            diff = compare(truth.table, read_sink(db))
        time.sleep(1)  # one more sink sample
    finally:
        done.set()
        child.stop()
        if job_name:
            cancel_flink_job(bench.status.get("flink", {}).get("job_endpoint", ""), job_name)
        for thread in watchers:
            thread.join(10)
    diff = compare(truth.table, read_sink(db))
    # Latency per window that ended while production ran: the wall time the last of its
    # rows first showed its final value, minus the window's end.
    windows: Dict[int, List[Key]] = {}
    for key in truth.table:
        windows.setdefault(key[1], []).append(key)
    latencies = []
    never = 0
    for start, keys in sorted(windows.items()):
        end_s = (start + window_ms) / 1000
        if end_s > produced_until:
            continue
        times = [first_seen.get(k, {}).get(truth.table[k]) for k in keys]
        if any(t is None for t in times):
            never += 1
            continue
        latencies.append(max(times) - end_s)
    print()
    print(f"live on {args.live_runner}: {args.live_rate:g} orders/s for {args.live_seconds:g}s, "
          f"{truth.records:,} records, {args.keys:,} keys, {args.window_seconds}s windows; "
          f"exact {'yes' if diff.exact and not dlq_count(dlq) else 'no'} ({diff}, DLQ {dlq_count(dlq)}); "
          f"peak memory {child.peak_bytes / 2**20:,.0f} MB")
    if lags:
        print(f"consumer lag of group {group} (records, every {args.lag_every:g}s, committed vs end offsets): "
              f"min {min(lags):,}, median {statistics.median(lags):,.0f}, max {max(lags):,} over {len(lags)} samples")
    if latencies:
        print(f"event-to-sink latency (window end -> its final rows in the sink), {len(latencies)} windows: "
              f"p50 {percentile(latencies, 50):.1f}s, p99 {percentile(latencies, 99):.1f}s, "
              f"max {max(latencies):.1f}s" + (f"; {never} windows never final" if never else ""))
    else:
        print(f"event-to-sink latency: no window ended and became final during the run ({never} never final); "
              "run longer than two windows")
    print_footer(args)
    return 0 if diff.exact else 1


# -- command line -----------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--yardstick-worker":
        yardstick_worker(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--events", type=int, default=200_000, help="distinct orders (re-sends come on top)")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--window-seconds", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each contestant; the median is reported")
    parser.add_argument("--contestants", default=",".join(ALL_CONTESTANTS),
                        help=f"comma-separated subset of {','.join(ALL_CONTESTANTS)} (default: all that can run)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per contestant run")
    parser.add_argument("--bootstrap", default="", help="broker (default: the dev stack's)")
    parser.add_argument("--keep", action="store_true", help="keep the topic and the scratch folder")
    parser.add_argument("--live-rate", type=float, default=0, help="live mode: orders per second")
    parser.add_argument("--live-seconds", type=float, default=180, help="live mode: how long to produce")
    parser.add_argument("--live-runner", choices=("prism", "flink"), default="prism")
    parser.add_argument("--job-flag", action="append", default=[], metavar="FLAG",
                        help="a flag passed to every onceflow job as is (repeatable), e.g. --job-flag=--shards=4")
    parser.add_argument("--lag-every", type=float, default=3, help="live mode: seconds between lag samples")
    parser.add_argument("--job-python", default="", metavar="PYTHON",
                        help="the interpreter that runs the onceflow jobs (default: this one), e.g. a virtualenv "
                             "with only `pip install .[kafka]`, as a user has it")
    args = parser.parse_args(argv)
    if args.job_python:
        global JOB_PYTHON
        found = shutil.which(args.job_python)
        if found is None:
            parser.error(f"--job-python: {args.job_python!r} is not an interpreter found on this machine")
        if subprocess.run([found, "-c", "import onceflow.pipelines.aggregate"], capture_output=True).returncode:
            parser.error(f"--job-python: {found} cannot import onceflow; install it there first, e.g. "
                         f"{found} -m pip install '.[kafka]'")
        JOB_PYTHON = found
    bench = Bench(args)
    try:
        if args.live_rate:
            return live_rate(bench)
        results = bench.run()
        report(bench, results)
        return 0 if all(r.exact for r in results if not r.skipped) else 1
    finally:
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
