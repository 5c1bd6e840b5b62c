"""Backfills of part of a topic, on the real broker: the lateness rule's high water
at the start of a range, and ranges that retention has deleted."""

import json

import pytest

from onceflow.io.dlq import parse_dlq_target, read_dead_letters_from
from tests.livejob import new_topic, produce

pytestmark = pytest.mark.kafka

BASE = 1_793_610_000_000  # event times and Kafka timestamps start here
FLAGS = ["--key_fields=k", "--time_field=t", "--id_field=id", "--aggregate=count,sum:v", "--window=1m",
         "--allowed_lateness=5m"]


def _event(partition, n, t):
    return json.dumps({"id": f"{partition}-{n}", "t": t, "k": f"k{n % 4}", "v": n}).encode()


def _stream_with_late_events():
    """Per partition, 60 records 30 s of event time apart; records 20, 21, 22 and
    45 carry an event time 10 minutes behind the records before them (more than a
    1 m window + 5 m lateness): too late for a reader that saw those records. Kafka
    timestamps rise by 1 s a record, so a timestamp start lands on an offset."""
    records = []
    for partition in range(3):
        for n in range(60):
            t = BASE + 30_000 * n
            if n in (20, 21, 22, 45):
                t -= 600_000
            records.append((partition, _event(partition, n, t), BASE + 1000 * n))
    return records


def _dead_letters(dlq):
    return {(e["source"]["partition"], e["source"]["offset"], e["reason"])
            for e in read_dead_letters_from(parse_dlq_target(str(dlq)))}


def _backfill(topic, tmp_path, name, *flags):
    from onceflow.pipelines.aggregate import run

    dlq = tmp_path / f"{name}.jsonl"
    summary = run([f"--input={topic.url}", f"--sink=sqlite:///{tmp_path}/{name}.db", f"--dlq={dlq}",
                   "--status=off", *FLAGS, *flags])
    return summary, _dead_letters(dlq)


@pytest.mark.slow
def test_a_backfill_of_a_middle_range_refuses_exactly_what_the_whole_read_refused(kafka_bootstrap, tmp_path):
    topic = new_topic(kafka_bootstrap)
    produce(topic, _stream_with_late_events())
    _, whole = _backfill(topic, tmp_path, "whole", "--from=earliest", "--to=latest")
    assert {(p, o) for p, o, reason in whole if reason == "too_late"} == {
        (p, o) for p in range(3) for o in (20, 21, 22, 45)}

    by_offsets, middle = _backfill(topic, tmp_path, "offsets", "--from=offsets:0=20,1=20,2=20",
                                   "--to=offsets:0=50,1=50,2=50")
    assert by_offsets.count("records_read") == 90  # the records before the start are neither emitted nor counted
    assert middle == {letter for letter in whole if 20 <= letter[1] < 50}

    by_time, from_time = _backfill(topic, tmp_path, "timestamp", f"--from={BASE + 20_000}", "--to=latest")
    assert by_time.count("records_read") == 120
    assert from_time == {letter for letter in whole if letter[1] >= 20}
