"""Source positions kept with the results (onceflow.io.progress): when a position
is safe to store, how each sink stores it, and the watermark rule on a streaming
pipeline."""

import json
import types

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from onceflow.batches import KAFKA, Decoded, RecordBatch, Refusal
from onceflow.io.bigquery import BigQueryProgress
from onceflow.io.file_sink import FileProgress
from onceflow.io.progress import KeepProgress, Mark, Position, batch_marks, final_at_ms, high_water_after
from onceflow.io.sqlite import SqliteProgress
from onceflow.windowing import WindowSpec

MINUTE = 60_000
SPEC = WindowSpec(MINUTE, None, 30_000)  # 1-minute windows, 30 s lateness


def batch(partition, offsets, times, high_before=None, topic="orders"):
    """A Kafka batch whose records have these event times (None: a refused record)."""
    verdicts, marks, high = [], [], high_before
    for moment in times:
        marks.append(high)
        if moment is None:
            verdicts.append(Refusal("malformed_json", "ValueError", "bad"))
        else:
            verdicts.append(Decoded(str(moment), moment, ("k",), {}))
            high = moment if high is None else max(high, moment)
    return RecordBatch(origin=(KAFKA, topic, partition), values=[b"x"] * len(times), positions=list(offsets),
                       high_waters=marks, verdicts=verdicts, timestamps=[0] * len(times), keys=[None] * len(times),
                       headers=[None] * len(times))


def test_a_position_is_final_once_the_last_window_of_its_high_water_and_the_lateness_have_passed():
    assert final_at_ms(SPEC, 10 * MINUTE + 5, 10 * MINUTE + 5) == 11 * MINUTE + 30_000 + 1
    sliding = WindowSpec(MINUTE, 20_000, 0)  # the windows of t end up to a minute after it
    assert final_at_ms(sliding, 10 * MINUTE + 5, 0) == 11 * MINUTE + 1
    # Refused records only: the batch's dead letters (at the batch's timestamp) must be written.
    assert final_at_ms(SPEC, None, 1234) == 1235


def test_the_high_water_after_a_batch_is_the_readers_running_maximum():
    assert high_water_after(batch(0, [7, 8, 9], [50, 20, None], high_before=40)) == 50
    assert high_water_after(batch(0, [7, 8], [None, 30], high_before=40)) == 40
    assert high_water_after(batch(0, [7], [None])) is None
    record_time = batch(0, [7, 8], [5, 6])._replace(timestamps=[100, 90])
    assert high_water_after(record_time, "record") == 90  # the last record's own, as the reader's rule
    assert high_water_after(batch(0, [7, 8], [5, 90])._replace(timestamps=[0, -1]), "record") == 5


@pytest.mark.parametrize("store_kind", ["sqlite", "file"])
def test_a_store_keeps_positions_per_job_and_never_moves_one_back(tmp_path, store_kind):
    store = SqliteProgress(str(tmp_path / "s.db"), "agg") if store_kind == "sqlite" else FileProgress(str(tmp_path))
    assert store.read("job", "orders") == {}
    store.write("job", [Position("orders", 0, 10, None), Position("orders", 1, 5, 1000, 900)])
    store.write("other", [Position("orders", 0, 99, 7)])
    store.write("job", [Position("orders", 0, 4, 3)])  # behind: refused
    store.write("job", [Position("orders", 1, 8, 2000, 1500)])
    assert store.read("job", "orders") == {0: Position("orders", 0, 10, None), 1: Position("orders", 1, 8, 2000, 1500)}
    assert store.read("other", "orders") == {0: Position("orders", 0, 99, 7)}
    assert store.read("job", "payments") == {}


def test_sqlite_positions_are_per_rows_table(tmp_path):
    path = str(tmp_path / "s.db")
    SqliteProgress(path, "a").write("job", [Position("t", 0, 10, None)])
    assert SqliteProgress(path, "b").read("job", "t") == {}


@pytest.mark.postgres
def test_postgres_keeps_positions_like_the_others(postgres_dsn):
    import uuid

    from onceflow.io.postgres import PostgresProgress

    table = f"agg_{uuid.uuid4().hex[:8]}"
    store = PostgresProgress(postgres_dsn, table)
    assert store.read("job", "orders") == {}
    store.write("job", [Position("orders", 0, 10, None), Position("orders", 1, 5, 1000, 900)])
    store.write("job", [Position("orders", 0, 4, 3)])
    assert store.read("job", "orders") == {0: Position("orders", 0, 10, None), 1: Position("orders", 1, 5, 1000, 900)}
    assert PostgresProgress(postgres_dsn, table + "x").read("job", "orders") == {}


def test_positions_are_stored_only_once_the_written_outputs_watermark_passes_their_windows(tmp_path):
    """On a streaming pipeline: the reader's batches and a writer's output (the
    watermark of what has been written) flow into KeepProgress; a position is
    stored only after the watermark passes its last window's end plus lateness,
    and the furthest final one wins. Probes (batches of no Kafka partition) look at
    the store as the watermark moves."""
    store = SqliteProgress(str(tmp_path / "s.db"), "agg")
    t0 = 100 * MINUTE
    first_final = t0 + MINUTE + 30_000  # the first window's end + lateness

    def probe(name, millis):
        return TimestampedValue(RecordBatch(origin=("probe", name), values=[], positions=[], high_waters=[],
                                            verdicts=[]), millis / 1000)

    stream = (TestStream()
              .add_elements([TimestampedValue(batch(0, [0, 1], [t0 + 1, t0 + 2]), (t0 + 2) / 1000)])
              .add_elements([TimestampedValue(batch(0, [2], [t0 + MINUTE + 5], t0 + 2), (t0 + MINUTE + 5) / 1000)])
              .advance_watermark_to(first_final / 1000)
              .advance_processing_time(1)
              .add_elements([probe("at the first window's end + lateness", first_final)])
              .advance_watermark_to((first_final + 2) / 1000)
              .advance_processing_time(1)
              .add_elements([probe("past it", first_final + 2)])
              .advance_processing_time(1)
              .advance_watermark_to_infinity())
    looks = tmp_path / "looks.jsonl"

    class Look(beam.DoFn):  # the store as each probe is written (a side effect, for the test)
        def process(self, element):
            if element.origin[0] == "probe":
                offsets = {p: s.next_offset for p, s in store.read("job", "orders").items()}
                with open(looks, "a") as handle:
                    handle.write(json.dumps([element.origin[1], offsets]) + "\n")
            yield element

    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=options) as pipeline:
        batches = pipeline | stream
        written = batches | "Write" >> beam.ParDo(Look())
        _ = (batches, written) | KeepProgress(store, "job", SPEC)
    seen = dict(json.loads(line) for line in looks.read_text().splitlines())
    assert seen["at the first window's end + lateness"] == {}
    assert seen["past it"] == {"0": 2}
    stored = store.read("job", "orders")
    assert stored == {0: Position("orders", 0, 3, t0 + MINUTE + 5, stored[0].final_through_ms)}
    assert stored[0].final_through_ms == t0 + 2 * MINUTE  # the end of the last window of offset 2's event


class _FakeBigQuery:
    """A stand-in BigQuery client (no BigQuery runs here): records the calls, keeps
    loaded rows per table and applies the progress MERGE's guard, to check the
    sequence the store sends and that it reads back what it wrote."""

    def __init__(self, project):
        self.calls, self.tables = [], {}

    def query(self, sql):
        self.calls.append(sql.split(" ", 1)[0] + " " + sql.split("`")[1])
        if sql.startswith("MERGE"):
            target, staging = sql.split("`")[1], sql.split("`")[3]
            assert "WHEN MATCHED AND S.`next_offset` >= T.`next_offset`" in sql
            stored = {tuple(r[c] for c in ("job", "rows_table", "topic", "kafka_partition")): r
                      for r in self.tables.get(target, [])}
            for row in self.tables[staging]:
                key = tuple(row[c] for c in ("job", "rows_table", "topic", "kafka_partition"))
                if key not in stored or row["next_offset"] >= stored[key]["next_offset"]:
                    stored[key] = row
            self.tables[target] = list(stored.values())
        return types.SimpleNamespace(result=lambda: None)

    def load_table_from_json(self, rows, destination):
        self.calls.append(f"LOAD {destination}")
        self.tables[destination] = list(rows)
        return types.SimpleNamespace(result=lambda: None)

    def delete_table(self, table, not_found_ok=False):
        self.calls.append(f"DELETE {table}")
        self.tables.pop(table, None)

    def list_rows(self, table):
        return list(self.tables.get(table, []))


def test_bigquery_keeps_positions_through_a_staging_load_and_a_guarded_merge():
    client = _FakeBigQuery("my-project")
    store = BigQueryProgress("my-project", "d", "agg", client_factory=lambda project: client)
    assert store.read("job", "orders") == {}
    store.write("job", [Position("orders", 0, 10, None), Position("orders", 1, 5, 1000, 900)])
    store.write("job", [Position("orders", 0, 4, 3)])  # behind: the MERGE's guard keeps 10
    assert store.read("job", "orders") == {0: Position("orders", 0, 10, None), 1: Position("orders", 1, 5, 1000, 900)}
    assert BigQueryProgress("my-project", "d", "other", client_factory=lambda project: client).read("job", "orders") \
        == {}
    create, create_staging, load, merge, delete = client.calls[:5]
    assert create == "CREATE my-project.d.onceflow_progress"
    assert create_staging.startswith("CREATE my-project.d.onceflow_progress__staging_")
    assert load == "LOAD " + create_staging.split(" ")[1] and merge == "MERGE my-project.d.onceflow_progress"
    assert delete == "DELETE " + create_staging.split(" ")[1]


def test_a_batch_spanning_windows_passes_a_position_per_window_step():
    """A catch-up batch over three windows: the positions before the first record of
    each later window step, and after the batch, each final once its own window is."""
    t0 = 100 * MINUTE
    times = [t0 + 1, t0 + 2, t0 + MINUTE + 1, None, t0 + MINUTE + 3, t0 + 2 * MINUTE + 1]
    marks = batch_marks(batch(0, range(10, 16), times), SPEC, "field", t0 + 2 * MINUTE + 1)
    after = t0 + 2 * MINUTE + 1
    assert marks == [
        Mark(final_at_ms(SPEC, t0 + 2, after), 12, t0 + 2),  # offsets 10-11: the first window
        Mark(final_at_ms(SPEC, t0 + MINUTE + 3, after), 15, t0 + MINUTE + 3),  # 12-14: the second
        Mark(final_at_ms(SPEC, after, after), 16, after),  # the whole batch
    ]
    # The batch's dead letters carry its timestamp (after), so nothing is final before that has passed;
    # but the first positions are not held until the batch's last window + lateness.
    assert [m.final_at_ms for m in marks] == [after + 1, t0 + 2 * MINUTE + 30_001, t0 + 3 * MINUTE + 30_001]
