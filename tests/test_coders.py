"""The record batch coder: a round trip, a size estimate that does not encode, and
the steps that output batches using it."""

import pickle

import apache_beam as beam

from onceflow.batches import KAFKA, RecordBatch, decode_values
from onceflow.coders import RecordBatchCoder
from onceflow.events import EventContract
from onceflow.io.files import ReadRecordBatchesFromFiles
from onceflow.io.kafka.config import KafkaReadConfig, KafkaTopic
from onceflow.io.kafka.read import ReadBatchesFromKafka

CONTRACT = EventContract(id_field="id", time_field="t", key_fields=("k",))


def _batch(count):
    values = [b'{"id": "e%d", "t": %d, "k": "s%d"}' % (i, 1_000 + i, i % 7) for i in range(count)]
    values.append(b"not json")
    return RecordBatch((KAFKA, "orders", 2), values, list(range(len(values))), [1_000 + i for i in range(len(values))],
                       decode_values(CONTRACT, values), timestamps=[5] * len(values), keys=[None] * len(values),
                       headers=[None] * len(values))


def test_a_batch_round_trips_with_its_verdicts():
    batch = _batch(50)
    coder = RecordBatchCoder()
    again = coder.decode(coder.encode(batch))
    assert again.origin == batch.origin and again.values == batch.values and again.positions == batch.positions
    assert list(again.verdicts) == list(batch.verdicts)
    assert again.verdicts[50].reason == batch.verdicts[50].reason  # the refusal of the last record


def test_the_size_estimate_follows_the_raw_values_without_encoding(monkeypatch):
    batch = _batch(1_000)
    monkeypatch.setattr(pickle, "dumps", lambda *args, **kwargs: (_ for _ in ()).throw(AssertionError("encoded")))
    estimate = RecordBatchCoder().estimate_size(batch)
    raw = sum(map(len, batch.values))
    assert raw < estimate < 4 * raw


def test_the_readers_output_batches_with_the_batch_coder(tmp_path):
    pipeline = beam.Pipeline()
    from_kafka = pipeline | "Kafka" >> ReadBatchesFromKafka(KafkaReadConfig(KafkaTopic("127.0.0.1:9", "orders"), group_id="g"),
                                                    CONTRACT)
    from_files = pipeline | "Files" >> ReadRecordBatchesFromFiles(str(tmp_path / "*.jsonl"), CONTRACT)
    for batches in (from_kafka, from_files):
        assert isinstance(beam.coders.registry.get_coder(batches.element_type), RecordBatchCoder), batches
