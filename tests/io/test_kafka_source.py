"""The Python Kafka reader and writer, against the real local broker."""

import datetime
import json
import sqlite3
import subprocess
import sys
import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from onceflow.deadletter import DeadLetter
from onceflow.events import EventContract, SourceRecord
from onceflow.io.dlq import parse_dlq_target, read_dead_letters_from
from onceflow.io.kafka.admin import describe_topic, read_topic_to_end
from onceflow.io.kafka.config import KafkaReadConfig, KafkaTopic, parse_position
from onceflow.io.kafka.read import (
    LIVE_END, PartitionSpan, PartitionsRestriction, ReadFromKafka, _PartitionsTracker, backlog,
)
from onceflow.io.dlq.kafka import write_dead_letters_to_kafka
from tests.livejob import (
    committed, counted_events, new_topic, produce, sample_lines, start_live_job, stop, wait_for,
)
from tests.pipelines.reference import expected_from_partitions

pytestmark = pytest.mark.kafka
CONTRACT = EventContract(time_field="t", key_fields=("k",), value_fields=("v",), id_field="id")


def event(n, t):
    return json.dumps({"id": str(n), "t": t, "k": "a", "v": 1}).encode()


def test_bounded_read_returns_exactly_what_was_produced(kafka_bootstrap):
    topic = new_topic(kafka_bootstrap)
    produced = [(n % 3, event(n, 1000 * n), None) for n in range(150)]
    produce(topic, produced)
    config = KafkaReadConfig(topic, start=parse_position("earliest"), stop=parse_position("latest"))
    expected = []
    for partition in range(3):
        values = [value for p, value, _ in produced if p == partition]
        expected += [(partition, offset, value, value[:4].decode()) for offset, value in enumerate(values)]
    with TestPipeline() as pipeline:
        records = pipeline | ReadFromKafka(config, CONTRACT)
        assert_that(records | beam.Map(lambda r: (
            r.source["partition"], r.source["offset"], r.value,
            __import__("base64").b64decode(r.source["key"]).decode())), equal_to(expected))


def test_time_range_read_returns_only_records_inside_the_range(kafka_bootstrap):
    topic = new_topic(kafka_bootstrap)
    base = 1_793_610_000_000
    produce(topic, [(n % 3, event(n, base + 1000 * n), base + 1000 * n) for n in range(60)])
    start, stop = base + 10_000, base + 40_000
    config = KafkaReadConfig(topic, start=parse_position(str(start)), stop=parse_position(
        datetime.datetime.fromtimestamp(stop / 1000, datetime.timezone.utc).isoformat()))
    with TestPipeline() as pipeline:
        records = pipeline | ReadFromKafka(config, CONTRACT)
        assert_that(records | beam.Map(lambda r: json.loads(r.value)["id"]),
                    equal_to([str(n) for n in range(10, 40)]))


def test_empty_topic_and_empty_range_are_fine(kafka_bootstrap):
    topic = new_topic(kafka_bootstrap)
    config = KafkaReadConfig(topic, start=parse_position("earliest"), stop=parse_position("latest"))
    with TestPipeline() as pipeline:
        records = pipeline | ReadFromKafka(config, CONTRACT)
        assert_that(records, equal_to([]))


def test_missing_topic_and_unreachable_broker_fail_clearly_within_a_deadline(kafka_bootstrap):
    with pytest.raises(RuntimeError, match="does not exist"):
        describe_topic(KafkaReadConfig(KafkaTopic(kafka_bootstrap, "no-such-topic-here"), start=parse_position("earliest")))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="cannot reach Kafka at 127.0.0.1:9"):
        describe_topic(KafkaReadConfig(KafkaTopic("127.0.0.1:9", "x"), start=parse_position("earliest")), timeout_s=3)
    assert time.monotonic() - started < 15


def test_main_job_reports_a_missing_topic_in_one_line(kafka_bootstrap, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "onceflow.pipelines.aggregate", f"--input=kafka://{kafka_bootstrap}/nope-nope",
         "--from=earliest", "--to=latest", f"--sink=sqlite:///{tmp_path}/x.db", f"--dlq={tmp_path}/d.jsonl"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2  # as a missing sink or queue topic: the same command fails again
    lines = [l for l in result.stderr.splitlines() if l.strip() and "apitools" not in l]
    assert lines == [f"aggregate: error: --input: topic 'nope-nope' does not exist on {kafka_bootstrap}; "
                     "create it first (e.g. onceflow dev topic create NAME --partitions N)"]


def test_backlog_is_end_offset_minus_position():
    tracker = _PartitionsTracker(PartitionsRestriction("t", (PartitionSpan(0, 10, LIVE_END), PartitionSpan(1, 0, 50))))
    tracker.end_offsets.update({0: 25, 1: 80})
    assert tracker.try_claim((0, 10)) and tracker.try_claim((0, 11)) and tracker.try_claim((1, 0))
    assert tracker.backlog() == {0: 25 - 12, 1: 50 - 1}  # a bounded partition stops at its stop
    assert backlog(5, LIVE_END, None) == 0
    progress = tracker.current_progress()
    assert (progress.completed_work, progress.remaining_work) == (3.0, 13.0 + 49.0)


def test_tracker_checkpoints_only_at_fraction_zero_and_keeps_high_water():
    tracker = _PartitionsTracker(PartitionsRestriction("t", (PartitionSpan(0, 0, LIVE_END), PartitionSpan(1, 5, LIVE_END))))
    assert tracker.try_claim((0, 0)) and tracker.try_claim((0, 3))
    tracker.observe(0, 1234)
    assert tracker.try_split(0.5) is None
    primary, residual = tracker.try_split(0)
    assert primary.spans == (PartitionSpan(0, 0, 4), PartitionSpan(1, 5, 5))
    assert residual.spans == (PartitionSpan(0, 4, LIVE_END, 1234), PartitionSpan(1, 5, LIVE_END, None))
    tracker.check_done()


def test_dead_letters_to_a_kafka_topic_are_read_back_once(kafka_bootstrap):
    topic = new_topic(kafka_bootstrap, partitions=1)
    letters = [DeadLetter(SourceRecord(b"\xff%d" % n, {"line": n}), "parse", "invalid_utf8", "E", "m")
               for n in range(4)]
    for _ in range(2):  # a retried bundle writes again
        with TestPipeline() as pipeline:
            _ = pipeline | beam.Create(letters) | write_dead_letters_to_kafka(topic, "aggregate", "0.1.0")
    keys = [key for key, _ in read_topic_to_end(topic)]
    assert len(keys) == 8 and len(set(keys)) == 4
    envelopes = list(read_dead_letters_from(parse_dlq_target(topic.url)))
    assert sorted(e["source"]["line"] for e in envelopes) == [0, 1, 2, 3]


def test_checked_by_backfill_of_a_three_partition_topic_equals_the_reference(kafka_bootstrap, tmp_path):
    """Produce the sample to 3 partitions; --from earliest --to latest into SQLite
    gives exactly the aggregates computed independently, and the DLQ holds exactly
    the bad records."""
    topic = new_topic(kafka_bootstrap)
    lines = sample_lines()
    produce(topic, [(n % 3, line, None) for n, line in enumerate(lines)])
    partitions = [[((p, offset), line) for offset, line in enumerate(lines[p::3])] for p in range(3)]
    expected_rows, expected_dead = expected_from_partitions(partitions, 60_000, 300_000)
    db, dlq = tmp_path / "out.db", tmp_path / "dlq.jsonl"
    from onceflow.pipelines.aggregate import run

    summary = run([f"--input={topic.url}", "--from=earliest", "--to=latest", f"--sink=sqlite:///{db}",
                   f"--dlq={dlq}"])
    assert summary.count("records_read") == len(lines)
    found = {}
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        for row in connection.execute("SELECT * FROM aggregates"):
            start = datetime.datetime.fromisoformat(row["window_start"].replace("Z", "+00:00"))
            found[(row["store"], round(start.timestamp() * 1000))] = {k: row[k] for k in expected_rows[
                next(iter(expected_rows))]}
    assert found == expected_rows
    dead = {((e["source"]["partition"], e["source"]["offset"]), "too_late" if e["reason"] == "too_late" else "bad")
            for e in read_dead_letters_from(parse_dlq_target(str(dlq)))}
    assert dead == expected_dead


# -- live reads on the local streaming runner ------------------------------------------


@pytest.mark.prism
@pytest.mark.slow
def test_live_read_picks_up_records_and_resumes_from_committed_offsets(kafka_bootstrap, prism_path, tmp_path):
    """Records produced after the live job started are read; the job killed with
    SIGKILL after its offsets were committed and started again resumes from them:
    nothing lost, nothing counted twice."""
    topic = new_topic(kafka_bootstrap)
    group = f"g-{topic.topic}"
    db, dlq = tmp_path / "live.db", tmp_path / "dlq.jsonl"
    base = 1_793_610_000_000
    first = [(n % 3, event(n, base + 1000 * n), None) for n in range(300)]        # minutes 0-4
    second = [(n % 3, event(n, base + 1000 * n), None) for n in range(600, 900)]  # minutes 10-14
    flags = ("--key_fields=k", "--time_field=t", "--id_field=id", "--aggregate=count", "--window=1m",
             "--allowed_lateness=1m", "--kafka_idle_timeout=2s")
    job = start_live_job(topic, group, f"sqlite:///{db}", dlq, *flags)
    try:
        time.sleep(3)  # let the job start before anything is produced (the point of this test)
        produce(topic, first)
        wait_for(lambda: counted_events(db) == 300, "the first 300 events in the sink", 180, job)
        wait_for(lambda: committed(topic, group) == [100, 100, 100], "offsets committed to the log end", 60, job)
    finally:
        stop(job)
    produce(topic, second)
    job = start_live_job(topic, group, f"sqlite:///{db}", dlq, *flags)
    try:
        wait_for(lambda: counted_events(db) == 600, "all 600 events in the sink", 180, job)
        wait_for(lambda: committed(topic, group) == [200, 200, 200], "offsets committed to the log end", 60, job)
        time.sleep(3)  # anything read twice would now show as a higher count
        assert counted_events(db) == 600
    finally:
        stop(job)
    with sqlite3.connect(db) as connection:
        windows = connection.execute("SELECT COUNT(*), MIN(event_count), MAX(event_count) FROM aggregates").fetchone()
    assert windows == (10, 60, 60)


class _RunnerView:
    """What the SDK hands a reader's process(): claims, a deferred remainder, and a
    checkpoint the runner asks for while the reader runs (``checkpoint_after``)."""

    def __init__(self, tracker, checkpoint_after=None):
        self._restriction_tracker = tracker
        self._checkpoint_after = checkpoint_after
        self.claimed = 0
        self.residual = None

    def try_claim(self, position):
        if self.residual is None and self.claimed == self._checkpoint_after:
            self.residual = self._restriction_tracker.try_split(0)[1]  # the runner's checkpoint, mid-batch
        claimed = self._restriction_tracker.try_claim(position)
        self.claimed += claimed
        return claimed

    def defer_remainder(self, delay=None):
        if self.residual is None:
            split = self._restriction_tracker.try_split(0)
            self.residual = split[1] if split else None

    def current_restriction(self):
        return self._restriction_tracker.current_restriction()


class _Finalizer:
    """A bundle finalizer that keeps nothing (these reads have no group to commit to)."""

    def register(self, callback):
        pass


def _read_bundle(reader, restriction, checkpoint_after=None, estimator=None):
    """One bundle of a reader, as the runner runs it: the (partition, offset) of
    each record it read, and the residual (None when the runner took none)."""
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator

    view = _RunnerView(_PartitionsTracker(restriction), checkpoint_after)
    estimator = ManualWatermarkEstimator(None) if estimator is None else estimator
    offsets = [(value.value.origin[2], offset)
               for value in reader._read(_Finalizer(), view, estimator)
               for offset in value.value.positions]
    return offsets, view.residual


def test_a_checkpoint_in_the_middle_of_a_fetched_batch_loses_nothing(kafka_bootstrap):
    """The runner checkpoints the reader after the first partition's batch of a
    fetched poll, before the other's: the same reader instance (a runner may hand
    the residual straight back) reads on from exactly the residual's first offset,
    on every partition."""
    from onceflow.io.kafka.read import _ReadPartitionsDoFn

    topic = new_topic(kafka_bootstrap, partitions=2)
    produce(topic, [(n % 2, event(n, 1_000 + n), None) for n in range(400)])
    config = KafkaReadConfig(topic, start=parse_position("earliest"), group_id=None)
    reader = _ReadPartitionsDoFn(config, CONTRACT, idle_timeout_s=30.0)
    reader.setup()
    try:
        restriction = PartitionsRestriction(topic.topic, (PartitionSpan(0, 0, LIVE_END), PartitionSpan(1, 0, LIVE_END)))
        read, residual = _read_bundle(reader, restriction, checkpoint_after=1)
        assert 0 < len(read) < 400 and residual is not None
        assert len({partition for partition, _ in read}) == 1  # one partition's batch only
        deadline = time.monotonic() + 30
        while len(read) < 400 and time.monotonic() < deadline:
            more, residual = _read_bundle(reader, residual)
            read += more
        assert sorted(read) == sorted((n % 2, n // 2) for n in range(400))
    finally:
        reader.teardown()


def test_a_batch_is_timestamped_no_later_than_the_high_water_of_its_first_record(kafka_bootstrap):
    """A poll of a sparse partition spans far more event time than the allowed
    lateness. The batch's timestamp holds the watermark downstream: were it the
    high water after the batch, the watermark could pass a timely event's window
    end plus the lateness (where that window's state is dropped) before the event
    is counted. It must not be later than any record's own high water, nor than
    the partition's first event time."""
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator

    from onceflow.io.kafka.read import _ReadPartitionsDoFn
    from onceflow.windowing import WindowSpec

    topic = new_topic(kafka_bootstrap, partitions=1)
    base = 1_793_610_000_000
    produce(topic, [(0, event(n, base + 10_000 * n), None) for n in range(300)])  # 50 minutes of events
    spec = WindowSpec(60_000, allowed_lateness_ms=60_000)
    reader = _ReadPartitionsDoFn(KafkaReadConfig(topic, start=parse_position("earliest"), group_id=None), CONTRACT,
                                 idle_timeout_s=30.0)
    reader.setup()
    try:
        view = _RunnerView(_PartitionsTracker(PartitionsRestriction(topic.topic, (PartitionSpan(0, 0, LIVE_END),))))
        stamped = []
        deadline = time.monotonic() + 30
        while sum(len(batch.values) for batch, _ in stamped) < 300 and time.monotonic() < deadline:
            stamped += [(value.value, value.timestamp.micros // 1000)
                        for value in reader._read(_Finalizer(), view, ManualWatermarkEstimator(None))]
            view = _RunnerView(_PartitionsTracker(view.residual or view.current_restriction()))
        assert sum(len(batch.values) for batch, _ in stamped) == 300
        for batch, millis in stamped:
            # the first high water among its records: the partition's before the batch, or its first event time
            assert millis == min(mark for mark in batch.high_waters if mark is not None)
            # Every event here is timely (times rise), and the watermark this batch holds stays
            # below each one's window end plus the lateness.
            moments = batch.verdicts.event_times
            assert all(millis < end + spec.allowed_lateness_ms for moment in moments
                       for _, end in spec.windows_for(moment))
        first_batch, first_millis = stamped[0]
        assert first_millis == base
        assert first_batch.verdicts.event_times[-1] - base > 2 * (60_000 + 60_000), \
            "the poll must span more than a window and the lateness, or this test shows nothing"
    finally:
        reader.teardown()


def test_commits_never_move_a_partition_back(kafka_bootstrap):
    """Bundles finalized out of order, or re-read after a rewind, commit older
    offsets: the group's offset stays at the highest."""
    from onceflow.io.kafka.read import _ReadPartitionsDoFn

    topic = new_topic(kafka_bootstrap, partitions=2)
    produce(topic, [(n % 2, event(n, 1_000 + n), None) for n in range(40)])
    group = f"g-{topic.topic}"
    reader = _ReadPartitionsDoFn(KafkaReadConfig(topic, group_id=group), CONTRACT, idle_timeout_s=30.0)
    reader.setup()
    try:
        reader.commit(topic.topic, {0: 12, 1: 3})
        reader.commit(topic.topic, {0: 5, 1: 7})  # an older bundle of partition 0, finalized late
        assert committed(topic, group, partitions=2) == [12, 7]
        reader.commit(topic.topic, {0: 20, 1: 20})
        assert committed(topic, group, partitions=2) == [20, 20]
    finally:
        reader.teardown()


def test_a_caught_up_partition_of_transactions_goes_idle(kafka_bootstrap):
    """A transaction's commit marker takes an offset that is never delivered, so
    the last record's offset + 1 stays one below the partition's end. The reader
    counts a partition as caught up by how far its consumer has fetched (past the
    marker): once idle for the timeout its watermark moves to the clock, and the
    last windows close. Fails when caught-up means the last record read + 1."""
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
    from confluent_kafka import Producer

    from onceflow.io.kafka.read import _ReadPartitionsDoFn

    topic = new_topic(kafka_bootstrap, partitions=1)
    producer = Producer({"bootstrap.servers": topic.bootstrap_servers, "transactional.id": topic.topic})
    producer.init_transactions(30)
    producer.begin_transaction()
    for n in range(20):
        producer.produce(topic.topic, value=event(n, 1_000 + n), partition=0)
    producer.commit_transaction(30)
    reader = _ReadPartitionsDoFn(KafkaReadConfig(topic, start=parse_position("earliest"), group_id=None), CONTRACT,
                                 idle_timeout_s=0.5)
    reader.setup()
    try:
        restriction = PartitionsRestriction(topic.topic, (PartitionSpan(0, 0, LIVE_END),))
        read = 0
        estimator = ManualWatermarkEstimator(None)
        started_ms = int(time.time() * 1000)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            offsets, residual = _read_bundle(reader, restriction, estimator=estimator)
            read, restriction = read + len(offsets), residual or restriction
            watermark = estimator.current_watermark()
            if read == 20 and watermark is not None and watermark.micros // 1000 >= started_ms - 500:
                break
        assert read == 20
        assert estimator.current_watermark().micros // 1000 >= started_ms - 500, \
            "the partition never went idle: its watermark stayed at the last event time"
        tracker = _PartitionsTracker(restriction)
        assert tracker.current_restriction().spans[0].start == 20  # the marker (offset 20) is never claimed
    finally:
        reader.teardown()


def test_a_partition_that_gets_only_refused_records_goes_idle(kafka_bootstrap):
    """A partition that keeps getting records the contract refuses (another record
    type on the topic) moves no high water; counted as data, it never went idle,
    and the job's windows stayed open for as long (no row in 40 s of input). Its
    records still go where they go (here: read, to the dead-letter queue)."""
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator

    from onceflow.io.kafka.read import _ReadPartitionsDoFn

    topic = new_topic(kafka_bootstrap, partitions=1)
    produce(topic, [(0, event(n, 1_000 + n), None) for n in range(5)])
    reader = _ReadPartitionsDoFn(KafkaReadConfig(topic, start=parse_position("earliest"), group_id=None), CONTRACT,
                                 idle_timeout_s=1.0)
    reader.setup()
    try:
        restriction = PartitionsRestriction(topic.topic, (PartitionSpan(0, 0, LIVE_END),))
        estimator = ManualWatermarkEstimator(None)
        started_ms = int(time.time() * 1000)
        read, garbage = 0, 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            produce(topic, [(0, b'{"id": "x%d", "t": 5, "other": "record type"}' % garbage, None)])  # no key k
            garbage += 1
            offsets, residual = _read_bundle(reader, restriction, estimator=estimator)
            read, restriction = read + len(offsets), residual or restriction
            watermark = estimator.current_watermark()
            if watermark is not None and watermark.micros // 1000 >= started_ms - 1_000:
                break
            time.sleep(0.2)
        assert read > 5, "no refused record was read"
        assert estimator.current_watermark().micros // 1000 >= started_ms - 1_000, \
            "the partition never went idle: its watermark stayed at the last valid event time"
    finally:
        reader.teardown()


def test_an_empty_partition_goes_idle_while_another_keeps_getting_records(kafka_bootstrap):
    """Idle partitions were looked for only at a poll that returned nothing. With
    records every 20 ms on partition 0, no poll did, so the empty partition 1 held
    the watermark (and every window of a live job) for as long as partition 0 was
    busy. It goes idle after the timeout now, and the watermark follows the clock."""
    import threading

    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
    from confluent_kafka import Producer

    from onceflow.io.kafka.read import _ReadPartitionsDoFn

    topic = new_topic(kafka_bootstrap, partitions=2)
    busy = threading.Event()
    busy.set()

    def keep_producing():
        producer, n = Producer({"bootstrap.servers": topic.bootstrap_servers, "linger.ms": 0}), 0
        while busy.is_set():
            producer.produce(topic.topic, value=event(n, int(time.time() * 1000)), partition=0)
            producer.poll(0)
            n += 1
            time.sleep(0.02)
        producer.flush(10)

    producing = threading.Thread(target=keep_producing, daemon=True)
    producing.start()
    reader = _ReadPartitionsDoFn(KafkaReadConfig(topic, start=parse_position("earliest"), group_id=None), CONTRACT,
                                 idle_timeout_s=1.0)
    reader.setup()
    try:
        restriction = PartitionsRestriction(topic.topic, (PartitionSpan(0, 0, LIVE_END), PartitionSpan(1, 0, LIVE_END)))
        estimator = ManualWatermarkEstimator(None)
        started_ms = int(time.time() * 1000)
        read = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            offsets, residual = _read_bundle(reader, restriction, estimator=estimator)
            read, restriction = read + len(offsets), residual or restriction
            watermark = estimator.current_watermark()
            if watermark is not None and watermark.micros // 1000 >= started_ms:
                break
        assert busy.is_set() and read > 0
        watermark = estimator.current_watermark()
        assert watermark is not None and watermark.micros // 1000 >= started_ms, \
            "the empty partition never went idle while the other was busy"
    finally:
        busy.clear()
        producing.join(10)
        reader.teardown()


def test_partition_discovery_resumes_every_second_and_looks_at_the_topic_every_ten(kafka_bootstrap):
    """Discovery resumes every second (each resume moves its wall-clock watermark,
    which on Flink is what lets the readers' watermark out of their stage) but
    asks the broker for the topic's partitions only every 10 s; a partition added
    meanwhile is emitted at the next look, and handed to ``on_partitions_added``
    first."""
    from apache_beam.io.restriction_trackers import OffsetRange
    from confluent_kafka.admin import AdminClient, NewPartitions

    from onceflow.io.kafka.read import _DiscoverLivePartitionsDoFn, _PartitionNumberTracker

    class _View(_RunnerView):
        def defer_remainder(self, delay=None):
            self.delay = delay
            super().defer_remainder(delay)

    topic = new_topic(kafka_bootstrap, partitions=2)
    config = KafkaReadConfig(topic, start=parse_position("earliest"), group_id=None)
    added_reads = []  # what a live job stores before reading them
    discovery = _DiscoverLivePartitionsDoFn(config, readers=1, on_partitions_added=added_reads.extend)
    discovery.setup()
    restriction = OffsetRange(0, LIVE_END)

    high_waters = {}

    def resume():
        nonlocal restriction
        view = _View(_PartitionNumberTracker(restriction))
        elements = list(discovery.process(None, view))
        high_waters.update((read.partition, read.high_water_ms) for element in elements for read in element.reads)
        emitted = [[read.partition for read in element.reads] for element in elements]
        restriction = view.residual
        return emitted, view.delay.micros / 1e6

    assert resume() == ([[0, 1]], 1.0)
    assert high_waters == {0: None, 1: None}  # the job's start: from the data
    assert added_reads == []  # the job stored its start positions itself
    admin = AdminClient({"bootstrap.servers": topic.bootstrap_servers})
    admin.create_partitions([NewPartitions(topic.topic, 3)])[topic.topic].result(30)
    assert resume() == ([], 1.0)  # within 10 s of the last look: no request to the broker
    discovery._next_look = 0.0  # as if 10 s had passed
    deadline = time.monotonic() + 30
    emitted: list = []
    added_ms = int(time.time() * 1000)
    while not emitted and time.monotonic() < deadline:  # the broker's metadata may lag the new partition
        emitted, delay = resume()
        discovery._next_look = 0.0
    assert emitted == [[2]] and delay == 1.0
    # A partition added while the job runs starts at the wall clock (its records older than the
    # windows already final are too late, not counted in rows the sink refuses).
    assert added_ms <= high_waters[2] <= int(time.time() * 1000)
    assert [(read.partition, read.start_offset, read.high_water_ms) for read in added_reads] == [(2, 0, high_waters[2])]


def test_a_bundle_that_ends_on_data_reports_the_lag_left(kafka_bootstrap):
    """The consumer lag (end offset minus the reader's position) is what a slow
    sink shows as: a bundle that ends while records are left (here the runner
    checkpoints it after the first partition's batch) reports them, not 0."""
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator

    from onceflow.io.kafka.read import _ReadPartitionsDoFn

    topic = new_topic(kafka_bootstrap, partitions=2)
    produce(topic, [(n % 2, event(n, 1_000 + n), None) for n in range(400)])
    reader = _ReadPartitionsDoFn(KafkaReadConfig(topic, start=parse_position("earliest"), group_id=None), CONTRACT,
                                 idle_timeout_s=30.0)
    reader.setup()
    try:
        restriction = PartitionsRestriction(topic.topic, (PartitionSpan(0, 0, LIVE_END), PartitionSpan(1, 0, LIVE_END)))
        view = _RunnerView(_PartitionsTracker(restriction), checkpoint_after=1)
        read = {}
        for value in reader._read(_Finalizer(), view, ManualWatermarkEstimator(None)):
            read[value.value.origin[2]] = read.get(value.value.origin[2], 0) + len(value.value.values)
        assert view.residual is not None and len(read) == 1
        (first,) = read
        assert view._restriction_tracker.backlog() == {first: 200 - read[first], 1 - first: 200}
    finally:
        reader.teardown()


def test_an_offsets_client_that_gets_no_answer_is_replaced(monkeypatch):
    """Without the end offsets no partition counts as caught up, and idle
    partitions stop moving the watermark. A client that has had no answer for
    ``_OFFSETS_CLIENT_RENEW_S`` is replaced (here a broker that is not there, and
    no wait)."""
    from onceflow.io.kafka import read as reader_module

    monkeypatch.setattr(reader_module, "_OFFSETS_CLIENT_RENEW_S", 0.0)
    reader = reader_module._ReadPartitionsDoFn(
        KafkaReadConfig(KafkaTopic("127.0.0.1:9", "t"), start=parse_position("earliest")), CONTRACT, idle_timeout_s=2.0)
    reader.setup()
    try:
        tracker = _PartitionsTracker(PartitionsRestriction("t", (PartitionSpan(0, 0, LIVE_END),)))
        reader._refresh_end_offsets("t", tracker)
        first = reader._offsets_client
        assert first is not None and tracker.end_offsets == {}  # no answer: no end offset, kept for now
        reader._refresh_end_offsets("t", tracker)
        assert reader._offsets_client is None  # replaced: the next refresh makes a new one
        reader._refresh_end_offsets("t", tracker)
        assert reader._offsets_client is not None and reader._offsets_client is not first
    finally:
        reader.teardown()


def test_the_instances_of_a_read_share_their_idle_consumers(kafka_bootstrap):
    """Beam's Flink runner made a new DoFn instance for many bundles and kept the
    old ones: each held its own consumer and librdkafka's prefetch (36 consumers
    and 1.2 GB after a catch-up of 1,000,000 records, 8.9 GB after 7,000,000). A
    bundle now takes the partition set's idle consumer, wherever it was made."""
    import pickle

    from onceflow.io.kafka.read import _ReadPartitionsDoFn

    topic = new_topic(kafka_bootstrap, partitions=2)
    config = KafkaReadConfig(topic, start=parse_position("earliest"))
    original = _ReadPartitionsDoFn(config, None, 5.0)
    first, second, other_read = (pickle.loads(pickle.dumps(original)), pickle.loads(pickle.dumps(original)),
                                 _ReadPartitionsDoFn(config, None, 5.0))
    for instance in (first, second, other_read):
        instance.setup()
    assert first._last_data_at is second._last_data_at is not other_read._last_data_at  # one idle clock a read
    consumer, key = first._consumer_at(topic.topic, {0: 0, 1: 0})
    busy, _ = second._consumer_at(topic.topic, {0: 0, 1: 0})  # at once: a consumer of its own
    assert busy is not consumer
    first._give_back(key, ended=True)
    second._give_back(key, ended=True)  # one idle per partition set: this one is closed
    assert other_read._consumer_at(topic.topic, {0: 0, 1: 0})[0] is not consumer  # another read's
    assert second._consumer_at(topic.topic, {0: 0, 1: 0})[0] is consumer
    assert second._positions[key] == {0: 0, 1: 0}  # positioned where it stopped: not assigned again
    second._give_back(key, ended=False)  # an abandoned bundle: closed, not shared
    assert first._consumer_at(topic.topic, {0: 0, 1: 0})[0] is not consumer
    for instance in (first, second, other_read):
        instance.teardown()
