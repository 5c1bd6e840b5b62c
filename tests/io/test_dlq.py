"""The JSONL dead-letter sink: appends, and readers see each dead letter once."""

import re

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from onceflow.deadletter import DeadLetter
from onceflow.io.dlq import kafka as kafka_dlq
from onceflow.io.dlq.envelope import from_envelope, to_envelope, to_json_line
from onceflow.events import SourceRecord
from onceflow.io.dlq.jsonl import WriteDeadLettersToJsonl, prepare_file, read_dead_letters
from onceflow.io.kafka.config import KafkaTopic

LETTERS = [DeadLetter(SourceRecord(b"\xff" + bytes([n]), {"line": n}), "parse", "invalid_utf8", "E", "m")
           for n in range(5)]


def write(path):
    with TestPipeline() as pipeline:
        _ = pipeline | beam.Create(LETTERS) | WriteDeadLettersToJsonl(str(path), "aggregate", "0.1.0")


def test_written_twice_read_once_with_exact_bytes(tmp_path):
    path = tmp_path / "dlq" / "dead.jsonl"
    write(path)
    write(path)  # a retried bundle or a second run appends again
    assert len(path.read_text().splitlines()) == 10
    envelopes = list(read_dead_letters(str(path)))
    assert sorted(from_envelope(e).value for e in envelopes) == sorted(l.record.value for l in LETTERS)
    assert {e["reason"] for e in envelopes} == {"invalid_utf8"}


def test_missing_file_reads_as_empty(tmp_path):
    assert list(read_dead_letters(str(tmp_path / "none.jsonl"))) == []


def test_prepare_creates_an_empty_queue_and_keeps_an_existing_one(tmp_path):
    path = tmp_path / "new" / "dead.jsonl"
    prepare_file(str(path))
    assert path.read_bytes() == b"" and list(read_dead_letters(str(path))) == []
    path.write_text(to_json_line(to_envelope(LETTERS[0], "aggregate", "0.1.0")) + "\n")
    prepare_file(str(path))
    assert len(list(read_dead_letters(str(path)))) == 1


def test_a_line_that_is_not_a_dead_letter_is_named_after_the_good_ones(tmp_path):
    path = tmp_path / "dead.jsonl"
    good = to_json_line(to_envelope(LETTERS[0], "aggregate", "0.1.0"))
    path.write_text(f"{good}\n\n{good.replace('failed_at', 'failed')}\n")
    letters = read_dead_letters(str(path))
    assert next(letters)["dlq_id"] == LETTERS[0].dlq_id
    with pytest.raises(ValueError, match=f"^{path} line 3 is not a dead letter: no 'failed_at' field"):
        next(letters)


def test_a_kafka_message_that_is_not_a_dead_letter_names_its_partition_and_offset(monkeypatch):
    topic = KafkaTopic("127.0.0.1:1", "dlq")
    good = to_json_line(to_envelope(LETTERS[0], "aggregate", "0.1.0")).encode()
    monkeypatch.setattr(kafka_dlq, "describe_topic", lambda config: [0])
    monkeypatch.setattr(kafka_dlq, "read_records_to_end",
                        lambda topic, settings: iter([(0, 7, b"k", good), (0, 8, b"k", b"plain text")]))
    letters = kafka_dlq.read_dead_letters(topic)
    assert next(letters)["dlq_id"] == LETTERS[0].dlq_id
    with pytest.raises(ValueError, match=r"^kafka://127.0.0.1:1/dlq partition 0 offset 8 is not a dead letter"):
        next(letters)


@pytest.mark.kafka
def test_a_dead_letter_larger_than_the_queue_topic_takes_says_what_to_raise(kafka_bootstrap, tmp_path):
    """A dead letter carries its record's bytes in base64: an 800 kB record the input
    topic took makes a 1 MB letter the queue topic refuses. The job fails in one line
    that says which limits to raise (it gave the client's MSG_SIZE_TOO_LARGE alone);
    with them raised, the letter is written."""
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

    from tests.livejob import new_topic, produce
    from tests.pipelines.test_aggregate_job import run_cli

    topic, queue = new_topic(kafka_bootstrap, partitions=1), new_topic(kafka_bootstrap, partitions=1)
    produce(topic, [(0, b'{"pad": "' + b"y" * 800_000, None)])
    flags = [f"--input={topic.url}", "--from=earliest", "--to=latest", f"--sink=sqlite:///{tmp_path}/out.db",
             f"--dlq={queue.url}", "--status=off"]
    failed = run_cli(*flags)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert re.search(f"--dlq: a write failed with an error that is not retried: cannot produce to {queue.url}: a "
                     r"message of 1,06\d,\d{3} bytes is larger than Kafka takes here: raise the topic's "
                     "max.message.bytes and the producer's message.max.bytes", failed.stderr), failed.stderr
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for done in admin.incremental_alter_configs([ConfigResource("topic", queue.topic, incremental_configs=[
            ConfigEntry("max.message.bytes", "2000000", incremental_operation=AlterConfigOpType.SET)])]).values():
        done.result(30)
    ran = run_cli(*flags, "--kafka_setting=message.max.bytes=2000000")
    assert ran.returncode == 0, ran.stderr
    assert [letter["reason"] for letter in kafka_dlq.read_dead_letters(queue)] == ["malformed_json"]
