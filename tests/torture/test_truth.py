"""The truth from the ledger, and a comparison that finds every kind of discrepancy."""

from onceflow_dev.torture.stream import BAD, DUPLICATE, GOOD, TOO_LATE, Planned
from onceflow_dev.torture.truth import compare, expected_dead_letters, expected_rows


def _good(n, t, k, v, partition=0, kind=GOOD):
    event = {"id": f"e{n}", "t": t, "k": k, "v": v}
    return Planned(n, kind, repr(event).encode(), t, partition, event=event, offset=n)


LEDGER = [
    _good(0, 10_000, "a", 5),
    _good(1, 19_999, "a", 7),
    _good(2, 20_000, "a", 1),
    _good(3, 12_000, "b", 2, partition=1),
    _good(0, 10_000, "a", 5, partition=2, kind=DUPLICATE),  # a re-send: counted once
    Planned(5, BAD, b"{", 15_000, 1, label="truncated_json", offset=5),
    Planned(6, TOO_LATE, b"", 1, 0, event={"id": "e6", "t": 1, "k": "a", "v": 9}, offset=6),
]


def test_expected_rows_count_each_good_event_once_per_fixed_window():
    assert expected_rows(LEDGER, 10_000) == {("a", 10_000): (2, 12), ("a", 20_000): (1, 1), ("b", 10_000): (1, 2)}


def test_expected_rows_count_each_good_event_in_every_sliding_window_that_holds_it():
    # 20 s windows every 10 s: t=10,000 is in [0, 20,000) and [10,000, 30,000); t=19,999 too; t=20,000 in
    # [10,000, 30,000) and [20,000, 40,000); b's t=12,000 in [0, 20,000) and [10,000, 30,000).
    assert expected_rows(LEDGER, 20_000, 10_000) == {
        ("a", 0): (2, 12), ("a", 10_000): (3, 13), ("a", 20_000): (1, 1), ("b", 0): (1, 2), ("b", 10_000): (1, 2)}


def test_sliding_windows_of_one_period_are_the_fixed_windows():
    assert expected_rows(LEDGER, 10_000, 10_000) == expected_rows(LEDGER, 10_000)


def test_expected_dead_letters_are_the_bad_and_the_too_late_records():
    assert expected_dead_letters(LEDGER) == {(1, 5): BAD, (0, 6): TOO_LATE}


def test_an_equal_sink_and_dlq_compare_exact():
    rows = expected_rows(LEDGER, 10_000)
    comparison = compare(rows, dict(rows), expected_dead_letters(LEDGER),
                         {(1, 5): "malformed_json", (0, 6): "too_late"})
    assert comparison.exact
    assert comparison.examples() == []


def test_every_discrepancy_is_found():
    rows = expected_rows(LEDGER, 10_000)
    found = {("a", 10_000): (3, 17), ("b", 10_000): (1, 2), ("c", 0): (1, 1)}  # double count, loss, invention
    letters = {(0, 6): "schema_violation", (2, 9): "malformed_json"}  # wrong reason, extra; (1, 5) missing
    comparison = compare(rows, found, expected_dead_letters(LEDGER), letters)
    assert not comparison.exact
    assert comparison.wrong == [("a", 10_000)]
    assert comparison.missing == [("a", 20_000)]
    assert comparison.extra == [("c", 0)]
    assert comparison.dlq_missing == [(1, 5)]
    assert comparison.dlq_extra == [(2, 9)]
    assert comparison.dlq_wrong_reason == [(0, 6)]
    assert len(comparison.examples()) == 6


def test_the_truth_is_what_the_topic_holds():
    """A record the broker holds twice counts once as an event and twice as a dead
    letter; a planned record the topic lacks is reported."""
    from onceflow_dev.torture.truth import in_topic

    plan = [_good(0, 10_000, "a", 5), Planned(1, BAD, b"{", 15_000, 0, label="truncated_json"),
            _good(2, 11_000, "a", 1)]
    found, missing = in_topic(plan, [(0, 0, plan[0].value), (1, 0, b"{"), (1, 1, b"{"), (2, 0, plan[0].value),
                                     (2, 1, b"not ours")])
    assert missing == 1  # event e2 never reached the topic
    assert [(p.partition, p.offset, p.kind) for p in found] == [(0, 0, GOOD), (1, 0, BAD), (1, 1, BAD), (2, 0, GOOD)]
    assert expected_rows(found, 10_000) == {("a", 10_000): (1, 5)}
    assert expected_dead_letters(found) == {(1, 0): BAD, (1, 1): BAD}
