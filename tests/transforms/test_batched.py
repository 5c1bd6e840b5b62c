"""AggregateBatches against the per-event transforms: the same rows and dead
letters, bit for bit, on one input full of duplicates, garbage and late events."""

import json
import math
import random

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from onceflow.aggregates import parse_aggregates
from onceflow.batches import SOURCES, RecordBatch, decode_values, high_waters
from onceflow.events import EventContract, SourceRecord
from onceflow.transforms import AggregateBatches, BatchRecords, ParseEvents, WindowedAggregate
from onceflow.windowing import WindowSpec

SPECS = parse_aggregates("count,sum:v,sum:w,min:v,max:w,mean:w,first:v,last:w")
CONTRACT = EventContract(time_field="t", key_fields=("k", "r"), value_fields=("v", "w"), id_field="id")
MINUTE = 60_000
START = 1_793_610_000_000

GARBAGE = [
    b"", b"not json", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"id": "x", "t": NaN, "k": "a", "r": 1, "v": 1, "w": 1}',
    b'{"id": "x", "t": 1e400}', b'{"id": "x"}', b'{"id": "x", "t": "yesterday", "k": "a", "r": 1, "v": 1, "w": 1}',
    b'{"id": "x", "t": 5, "k": true, "r": 1, "v": 1, "w": 1}', b'{"id": 1.5, "t": 5, "k": "a", "r": 1, "v": 1, "w": 1}',
    b'{"id": "big", "t": 5, "k": "a", "r": 1, "v": 123456789012345678901234567890, "w": 1}',
    b'{"id": "", "t": 5, "k": "a", "r": 1, "v": 1, "w": 2.5}', b'{"t": 7, "k": "a", "r": 2, "v": 3, "w": 0.1}',
    b'{"id": "\\ud800", "t": 5, "k": "a", "r": 1, "v": 1, "w": 1}', b"[" * 5000 + b"]" * 5000,
]


def stream(seed: int, events: int = 3000, partitions: int = 3):
    """Records of ``partitions`` partitions, each in log order with the high water
    a reader gives: rising event times with jitter, late and too-late events,
    re-sends, garbage, ints and floats, two key fields."""
    rng = random.Random(seed)
    per_partition = [[] for _ in range(partitions)]
    moment = START
    for n in range(events):
        moment += rng.randint(0, 300)
        partition = rng.randrange(partitions)
        roll = rng.random()
        if roll < 0.03:
            raw = rng.choice(GARBAGE)
        else:
            late = moment - rng.choice([0, 0, 0, 30_000, 90_000, 400_000]) if roll < 0.2 else moment
            body = {"id": f"e{n}", "t": late if rng.random() < 0.7 else _iso(late), "k": f"k{rng.randrange(7)}",
                    "r": rng.randrange(3), "v": rng.randint(-5, 50),
                    "w": rng.choice([rng.randint(0, 9), round(rng.uniform(-1, 1), 3), 1e-17, 1e17])}
            raw = json.dumps(body).encode()
        per_partition[partition].append(raw)
        if rng.random() < 0.05:  # an exact re-send, maybe to another partition
            per_partition[rng.randrange(partitions)].append(raw)
    return per_partition


def _iso(millis: int) -> str:
    import datetime

    moment = datetime.datetime.fromtimestamp(millis / 1000, tz=datetime.timezone(datetime.timedelta(hours=2)))
    return moment.isoformat(timespec="milliseconds")


def batches_of(per_partition, size: int):
    """Each partition cut into batches of ``size`` records, high waters carried over."""
    batches = []
    for partition, values in enumerate(per_partition):
        high = None
        for begin in range(0, len(values), size):
            chunk = values[begin:begin + size]
            verdicts = decode_values(CONTRACT, chunk)
            marks, high = high_waters(verdicts, high)
            sources = [{"partition": partition, "offset": begin + i} for i in range(len(chunk))]
            batches.append(RecordBatch((SOURCES,), chunk, list(range(len(chunk))), marks, verdicts,
                                       sources=sources))
    return batches


def records_of(batches):
    return [record for batch in batches for record in batch.records()]


def letter_key(letter):
    return (json.dumps(dict(letter.record.source), sort_keys=True), letter.record.value, letter.record.high_water_ms,
            letter.stage, letter.reason, letter.error_class, letter.message, letter.event_id, letter.event_time_ms)


def run_both(batches, spec):
    with TestPipeline() as pipeline:
        per_event = pipeline | "Records" >> beam.Create(records_of(batches))
        parsed = per_event | ParseEvents(CONTRACT)
        aggregated = parsed.events | WindowedAggregate(("k", "r"), spec, SPECS)
        batched = (pipeline | "Batches" >> beam.Create(batches)
                   | "Batched" >> AggregateBatches(("k", "r"), spec, SPECS, shards=3))
        expected_rows = aggregated.rows | "SortRowsA" >> beam.combiners.ToList()
        expected_letters = ((parsed.dead_letters, aggregated.dead_letters) | "AllA" >> beam.Flatten()
                            | "KeyA" >> beam.Map(letter_key) | "ListA" >> beam.combiners.ToList())
        rows = batched.rows | "SortRowsB" >> beam.combiners.ToList()
        letters = batched.dead_letters | "KeyB" >> beam.Map(letter_key) | "ListB" >> beam.combiners.ToList()
        both = ((expected_rows | "TagA" >> beam.Map(lambda r: ("rows", 0, r)),
                 rows | "TagB" >> beam.Map(lambda r: ("rows", 1, r)),
                 expected_letters | "TagC" >> beam.Map(lambda r: ("letters", 0, r)),
                 letters | "TagD" >> beam.Map(lambda r: ("letters", 1, r))) | beam.Flatten()
                | beam.Map(lambda t: (t[0], (t[1], t[2]))) | beam.GroupByKey() | beam.Map(_same))
        assert_that(both, equal_to([("letters", True), ("rows", True)]))


def _row_key(row):
    return json.dumps(row, sort_keys=True)  # ints and floats spell differently: bit for bit


def _same(element):
    name, sides = element
    by_side = dict(sides)
    first = sorted(map(_row_key, by_side[0])) if name == "rows" else sorted(by_side[0], key=repr)
    second = sorted(map(_row_key, by_side[1])) if name == "rows" else sorted(by_side[1], key=repr)
    if first != second:
        print(f"{name} differ: {len(first)} vs {len(second)}; first only: {[x for x in first if x not in second][:3]}; "
              f"second only: {[x for x in second if x not in first][:3]}")
    assert first, f"no {name}: the comparison would prove nothing"
    return name, first == second


@pytest.mark.parametrize("seed,spec,size", [
    (1, WindowSpec(MINUTE, None, 120_000), 250),
    (2, WindowSpec(MINUTE, None, 0), 1000),
    (3, WindowSpec(5 * MINUTE, MINUTE, 60_000), 97),
    (4, WindowSpec(MINUTE, None, 300_000), 1),
])
def test_batched_and_per_event_paths_agree_bit_for_bit(seed, spec, size):
    run_both(batches_of(stream(seed), size), spec)


def _edge_partitions():
    """Events at both ends of the calendar, before 1970, and values whose sums
    pass the 64-bit range and the largest double; each end in its own partition
    (a time in the year 9999 makes every later event of its partition too late)."""
    def raw(event_id, moment, key, v, w):
        return json.dumps({"id": event_id, "t": moment, "k": key, "r": 0, "v": v, "w": w}).encode()
    return [
        [raw("y1", "0001-01-01T00:00:30Z", "first", 1, 1.5), raw("y2", "0001-01-02T00:00:30Z", "first", 2, 2.5)],
        [raw("m1", "1969-07-20T20:17:00Z", "moon", 2**62, 1e308), raw("m2", "1969-07-20T20:17:01Z", "moon", 2**62, 1e308),
         raw("m3", "1969-07-20T20:17:02Z", "moon", 5, -1e308), raw("m1", "1969-07-20T20:17:00Z", "moon", 2**62, 1e308),
         raw("n1", "1969-07-20T20:17:03Z", "sea", 1, 1e308), raw("n2", "1969-07-20T20:17:04Z", "sea", 1, 1e308)],
        [raw("z1", "9999-12-31T23:58:30Z", "last", 3, 0.5), raw("z2", "9999-12-31T23:59:30Z", "last", 4, 0.25)],
    ]


@pytest.mark.parametrize("spec", [WindowSpec(MINUTE), WindowSpec(2 * 86_400_000, 86_400_000)])
def test_the_ends_of_the_calendar_and_sums_past_a_double(spec):
    batches = batches_of(_edge_partitions(), 4)
    run_both(batches, spec)
    with TestPipeline() as pipeline:
        aggregated = pipeline | beam.Create(batches) | AggregateBatches(("k", "r"), spec, SPECS, shards=3)
        rows = aggregated.rows | "Rows" >> beam.Map(lambda row: (row["k"], row["window_start"], row))
        letters = aggregated.dead_letters | "Letters" >> beam.Map(lambda letter: (letter.event_id, letter.reason))
        if spec.is_sliding:  # the first events' windows start before the year 1, the last ones' end after 9999
            assert_that(letters, equal_to([("y1", "bad_timestamp"), ("z1", "bad_timestamp"),
                                           ("z2", "bad_timestamp")]), label="Refused")
        else:
            assert_that(letters, equal_to([("z2", "bad_timestamp")]), label="Refused")
        assert_that(rows | beam.Filter(lambda item: item[0] == "moon" and item[1] < 0)
                    | beam.Map(lambda item: (item[2]["event_count"], item[2]["sum_v"], item[2]["sum_w"],
                                             item[2]["mean_w"], item[2]["max_w"])),
                    equal_to([(3, 2**63 + 5.0, 1e308, 1e308 / 3, 1e308)] if not spec.is_sliding else
                             [(3, 2**63 + 5.0, 1e308, 1e308 / 3, 1e308)] * 2), label="Moon")
        assert_that(rows | "Sea" >> beam.Filter(lambda item: item[0] == "sea")
                    | "SeaSums" >> beam.Map(lambda item: (item[2]["sum_w"], item[2]["mean_w"])),
                    equal_to([(math.inf, 1e308)] * (2 if spec.is_sliding else 1)), label="SeaSums")


def test_exact_resends_are_counted_once_across_batches_and_partitions():
    raw = json.dumps({"id": "e1", "t": START, "k": "a", "r": 1, "v": 5, "w": 0.5}).encode()
    other = json.dumps({"id": "e2", "t": START + 1, "k": "a", "r": 1, "v": 1, "w": 0.25}).encode()
    batches = batches_of([[raw, other, raw], [raw], [raw, raw]], size=1)
    with TestPipeline() as pipeline:
        out = pipeline | beam.Create(batches) | AggregateBatches(("k", "r"), WindowSpec(MINUTE), SPECS)
        window = START - START % MINUTE
        assert_that(out.rows, equal_to([{
            "k": "a", "r": "1", "window_start": window, "window_end": window + MINUTE, "event_count": 2,
            "count": 2, "sum_v": 6, "sum_w": 0.75, "min_v": 1, "max_w": 0.5, "mean_w": 0.375, "first_v": 5,
            "last_w": 0.25}]))


def test_unbounded_panes_end_at_the_per_event_rows(tmp_path):
    """Streaming: on-time and late panes from state and timers; the last pane of
    each key and window equals the per-event path's row."""
    batches = batches_of(stream(5, events=600, partitions=1), 50)
    spec = WindowSpec(MINUTE, None, 120_000)
    test_stream = TestStream()
    for batch in batches:
        known = [m for m in batch.high_waters if m is not None]
        stamp = max(known) if known else START
        test_stream = test_stream.add_elements([batch], event_timestamp=Timestamp(micros=stamp * 1000))
        test_stream = test_stream.advance_watermark_to(Timestamp(micros=(stamp - 1) * 1000))
    # Past every window end + lateness, then the end of input (the direct runner
    # fires no event-time timer on the jump to infinity alone).
    test_stream = test_stream.advance_watermark_to(Timestamp(micros=(stamp + 3_600_000) * 1000))
    test_stream = test_stream.advance_watermark_to_infinity()
    with TestPipeline(options=PipelineOptions(streaming=True)) as pipeline:
        out = pipeline | test_stream | AggregateBatches(("k", "r"), spec, SPECS, shards=2)
        expected = sorted(_per_event_rows(batches, spec, tmp_path))

        def last_panes_match(rows):
            last = {}
            for row in rows:
                key = (row["k"], row["r"], row["window_start"])
                if key not in last or row["event_count"] > last[key]["event_count"]:
                    last[key] = row
            assert sorted(map(_row_key, last.values())) == expected

        assert_that(out.rows, last_panes_match)


def _per_event_rows(batches, spec, folder):
    with TestPipeline() as pipeline:
        parsed = pipeline | beam.Create(records_of(batches)) | ParseEvents(CONTRACT)
        rows = (parsed.events | WindowedAggregate(("k", "r"), spec, SPECS)).rows
        rows | beam.Map(_row_key) | beam.io.WriteToText(str(folder / "rows"))
    collected = [line.rstrip("\n") for path in folder.glob("rows*") for line in path.open()]
    assert collected, "the per-event path gave no rows"
    return collected


def test_batch_records_turns_records_into_decoded_batches():
    records = [SourceRecord(b'{"id": "1", "t": 5, "k": "a", "r": 1, "v": 1, "w": 1}', {"line": 1}, None),
               SourceRecord(b"garbage", {"line": 2}, 5)]
    with TestPipeline() as pipeline:
        batches = pipeline | beam.Create(records) | BatchRecords(CONTRACT)
        assert_that(batches | beam.FlatMap(lambda b: [(r, type(v).__name__) for r, v in zip(b.records(), b.verdicts)]),
                    equal_to([(records[0], "Decoded"), (records[1], "Refusal")]))


def test_batch_records_stamps_each_batch_with_its_earliest_record():
    """A batch stamped later than its records (Beam's BatchElements stamps the end of
    the global window) let the watermark drop a window's state before a timely
    late event of the batch was counted: a live job on Prism lost it."""
    records = [TimestampedValue(SourceRecord(json.dumps({"id": str(n), "t": START + n, "k": "a", "r": 1, "v": 1,
                                                          "w": 1}).encode(), {"line": n}, None), (START + n) / 1000)
               for n in (5, 3, 9)]
    with TestPipeline() as pipeline:
        stamps = (pipeline | beam.Create(records) | beam.Map(lambda r: r)  # keeps each record's timestamp
                  | BatchRecords(CONTRACT, max_records=2)
                  | beam.Map(lambda batch, stamp=beam.DoFn.TimestampParam: (len(batch.values), stamp.micros // 1000)))
        assert_that(stamps | beam.combiners.ToList() | beam.Map(sorted), equal_to([[(1, START + 9), (2, START + 3)]]))


def test_a_windowing_set_upstream_does_not_split_rows():
    """The docstrings say any windowing: 1-minute windows set before 5-minute
    aggregates split each row into five rows with one primary key (the sink kept one)."""
    lines = [json.dumps({"id": str(n), "t": START + n * MINUTE, "k": "a", "r": 1, "v": n, "w": 1}).encode()
             for n in range(5)]
    records = [TimestampedValue(SourceRecord(line, {"line": n}, None), (START + n * MINUTE) / 1000)
               for n, line in enumerate(lines)]
    spec, specs = WindowSpec(5 * MINUTE), parse_aggregates("count,sum:v")
    with TestPipeline() as pipeline:
        windowed = pipeline | beam.Create(records) | beam.WindowInto(beam.window.FixedWindows(60))
        batched = windowed | BatchRecords(CONTRACT) | AggregateBatches(CONTRACT.key_fields, spec, specs)
        per_event = (windowed | "Parse" >> ParseEvents(CONTRACT)).events | WindowedAggregate(
            CONTRACT.key_fields, spec, specs)
        for label, aggregated in (("batched", batched), ("per_event", per_event)):
            assert_that(aggregated.rows | f"{label}Counts" >> beam.Map(lambda row: (row["count"], row["sum_v"])),
                        equal_to([(5, 10)]), label=label)


def _absorb_one_by_one(aggregation, by_key, sub_batch):
    """The rule ``absorb`` must keep, an event at a time: a key counts an ID once."""
    key_texts, event_ids, event_times, value_columns = sub_batch
    changed, dropped = set(), []
    for index, (key_text, event_id) in enumerate(zip(key_texts, event_ids)):
        entry = by_key.setdefault(key_text, [aggregation.create(), 0, set()])
        if event_id in entry[2]:
            dropped.append(index)
            continue
        entry[2].add(event_id)
        aggregation.add(entry[0], event_times[index], event_id,
                        {name: column[index] for name, column in zip(aggregation.fields, value_columns)})
        changed.add(key_text)
    return changed, dropped


def test_absorb_is_adding_each_new_id_of_a_key_one_by_one():
    """Sub-batches absorbed one after another into the same state (as a live shard
    window's panes are), with IDs repeated within a sub-batch, across sub-batches
    and across keys: the same accumulators (bit for bit), counted IDs, changed
    keys and duplicates as adding event by event."""
    import pickle

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from onceflow.aggregates import Aggregation
    from onceflow.transforms.batched import absorb

    aggregation = Aggregation(SPECS)
    numbers = st.one_of(st.integers(-10, 10), st.floats(-1e6, 1e6), st.sampled_from([1, 1.0, -0.0, 0, 2**53 + 1]))
    event = st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["e1", "e2", "e3", "e4"]),
                      st.integers(0, 5), numbers, numbers)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.lists(event, max_size=10), max_size=4))
    def check(sub_batches):
        batched, one_by_one = {}, {}
        for events in sub_batches:
            columns = [list(column) for column in zip(*events)] if events else [[], [], [], [], []]
            sub_batch = (columns[0], columns[1], columns[2], (columns[3], columns[4]))
            assert absorb(aggregation, batched, sub_batch) == _absorb_one_by_one(aggregation, one_by_one, sub_batch)
        assert list(batched) == list(one_by_one)
        for key_text, (accumulator, _, counted) in batched.items():
            assert counted == one_by_one[key_text][2]
            assert (pickle.dumps(aggregation.extract(accumulator))
                    == pickle.dumps(aggregation.extract(one_by_one[key_text][0])))

    check()


def test_a_batch_with_every_record_refused_gives_its_dead_letters_on_every_decoder():
    """A batch with no valid record crashed the split (it looked for the value
    columns among decoded records: avro, registry formats, JSON without an ID field,
    a partition of tombstones), and its records never reached the dead-letter queue."""
    derived = EventContract(time_field="t", key_fields=("k", "r"), value_fields=("v", "w"))  # the reference decoder
    garbage = [b"not json", b"[1, 2]", b'{"t": 5}']
    good = json.dumps({"t": START, "k": "a", "r": 1, "v": 1, "w": 1}).encode()

    def batch(values, verdicts, first):
        return RecordBatch((SOURCES,), values, list(range(len(values))), [None] * len(values), verdicts,
                           sources=[{"offset": first + i} for i in range(len(values))])
    batches = [batch(garbage, decode_values(derived, garbage), 0),
               batch(garbage, list(decode_values(derived, garbage)), 3),  # per-record verdicts, as a user's source
               batch([good], decode_values(derived, [good]), 6)]
    with TestPipeline() as pipeline:
        out = pipeline | beam.Create(batches) | AggregateBatches(("k", "r"), WindowSpec(MINUTE), SPECS)
        assert_that(out.dead_letters | beam.Map(lambda letter: (letter.record.source["offset"], letter.reason)),
                    equal_to([(0, "malformed_json"), (1, "not_an_object"), (2, "schema_violation"),
                              (3, "malformed_json"), (4, "not_an_object"), (5, "schema_violation")]),
                    label="Letters")
        assert_that(out.rows | beam.Map(lambda row: row["event_count"]), equal_to([1]), label="Rows")
