"""The torture stream plan: deterministic, every kind present, each kind what it claims."""

import json

import pytest

from onceflow.events import RecordError, SourceRecord
from onceflow_dev.torture.stream import (
    BAD, BAD_RECORDS, DUPLICATE, GOOD, TOO_LATE, TOO_LATE_AGE_MS, StreamMix, StreamPlan, max_event_delay_ms,
)
from tests.transforms.helpers import CONTRACT

NOW = 1_800_000_000_000


def _plan(seed=7, n=5000):
    plan = StreamPlan("run", partitions=3, mix=StreamMix(), seed=seed)
    return [plan.next(NOW + i * 5) for i in range(n)]


def test_the_same_seed_and_clock_give_the_same_stream_and_another_seed_another():
    same = [(p.kind, p.value, p.partition) for p in _plan()]
    assert same == [(p.kind, p.value, p.partition) for p in _plan()]
    assert same != [(p.kind, p.value, p.partition) for p in _plan(seed=8)]


def test_every_kind_and_every_bad_record_appears():
    planned = _plan()
    kinds = {p.kind for p in planned}
    assert kinds == {GOOD, DUPLICATE, BAD, TOO_LATE}
    assert {p.label for p in planned if p.kind == BAD} == set(BAD_RECORDS)
    assert any(p.late for p in planned)


@pytest.mark.parametrize("rate", [5, 20, 200])
def test_no_counted_record_is_further_behind_the_clock_than_the_delay_the_lateness_must_cover(rate):
    """A re-send repeats one of the recent good events, so it is later than a late
    event can be: at 20 records/s, a lateness of 20 s refused one re-send in a
    2,000-record run, which the truth counts."""
    plan = StreamPlan("run", partitions=3, mix=StreamMix(), seed=11)
    planned = [plan.next(NOW + i * 1000 // rate) for i in range(20_000)]
    delays = [p.produced_at_ms - p.event["t"] for p in planned if p.kind in (GOOD, DUPLICATE)]
    assert max(delays) <= max_event_delay_ms(StreamMix(), rate)
    assert max(delays) > StreamMix().late_max_ms  # the bound a late event alone gives is not enough


def test_a_duplicate_is_the_exact_bytes_of_an_earlier_good_event():
    planned = _plan()
    earlier_good = set()
    for p in planned:
        if p.kind == GOOD:
            earlier_good.add(p.value)
        if p.kind == DUPLICATE:
            assert p.value in earlier_good


def test_a_too_late_event_is_an_hour_old_and_follows_a_current_event_in_its_partition():
    planned = _plan()
    for i, p in enumerate(planned):
        if p.kind != TOO_LATE:
            continue
        assert p.event["t"] == p.produced_at_ms - TOO_LATE_AGE_MS == p.timestamp_ms
        previous_good = next(q for q in reversed(planned[:i]) if q.kind == GOOD)
        assert previous_good.partition == p.partition


def test_good_events_are_valid_and_late_ones_within_the_mix_bound():
    for p in _plan():
        if p.kind == GOOD:
            event = CONTRACT.to_event(SourceRecord(p.value, {}))
            assert event.event_time_ms == p.timestamp_ms == json.loads(p.value)["t"]
            assert 0 <= p.produced_at_ms - event.event_time_ms <= StreamMix().late_max_ms


@pytest.mark.parametrize("label", sorted(BAD_RECORDS))
def test_every_bad_record_is_refused_by_the_event_contract(label):
    with pytest.raises(RecordError):
        CONTRACT.to_event(SourceRecord(BAD_RECORDS[label]("run-1", NOW), {}))
