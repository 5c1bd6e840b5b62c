"""Aggregates: exact, order-independent, with a deterministic first/last."""

import math
import pickle
import random

import pytest

from onceflow.aggregates import Aggregation, AggregateSpec, ExactSum, parse_aggregates, value_fields


def test_parse_aggregates():
    specs = parse_aggregates("count, sum:qty,max:price,first:price")
    assert [s.column for s in specs] == ["count", "sum_qty", "max_price", "first_price"]
    assert value_fields(specs) == ("qty", "price")


@pytest.mark.parametrize("text, fragment", [
    ("", "empty item"), ("count,", "empty item"), ("median:qty", "unknown aggregate"), ("sum", "needs a field"),
    ("count:qty", "takes no field"), ("sum:qty,sum:qty", "twice"), ("sum:q-ty", "needs a field"),
])
def test_bad_aggregates(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_aggregates(text)


def test_exact_sum_does_not_depend_on_order_or_merging():
    rng = random.Random(7)
    values = [rng.choice([1e16, -1e16, 0.1, 0.2, 0.3, 1e-9, 3.0, 123456.789]) * rng.random() for _ in range(2000)]
    expected = math.fsum(values)
    for _ in range(20):
        rng.shuffle(values)
        parts = []
        size = rng.randint(1, 300)
        for chunk in range(0, len(values), size):
            total = ExactSum()
            for value in values[chunk:chunk + size]:
                total.add(value)
            parts.append(total)
        merged = ExactSum()
        for part in parts:
            merged.merge(part)
        # Split and merged differently each time: only exactness makes them all equal.
        assert merged.value() == expected


def test_integer_sums_stay_integers():
    total = ExactSum()
    for value in (1, 2, 3):
        total.add(value)
    assert total.value() == 6 and isinstance(total.value(), int)


def test_an_integer_sum_past_the_64_bit_range_is_the_nearest_double():
    total = ExactSum()
    total.add(2**62)
    total.add(2**62)
    assert total.value() == float(2**63) and isinstance(total.value(), float)  # no sink column holds 2**63
    total.add(-1)
    assert total.value() == 2**63 - 1 and isinstance(total.value(), int)


def test_integers_and_floats_are_summed_exactly_and_rounded_once():
    total = ExactSum()
    for value in (9007199254740993, 0.5):  # 2**53 + 1: float() alone would round it first
        total.add(value)
    assert total.value() == 9007199254740994.0
    assert total.mean(2) == 4503599627370497.0


@pytest.mark.parametrize("values, expected_sum, expected_mean", [
    ([1e308, 1e308], math.inf, 1e308),
    ([-1e308, -1e308, -1e308], -math.inf, -1e308),
    ([1e308, 1e308, -1e308], 1e308, 1e308 / 3),  # past the largest double on the way, back within it
    ([1.7976931348623157e308, 1e292, -1e292], 1.7976931348623157e308, 1.7976931348623157e308 / 3),
])
def test_float_sums_past_the_largest_double(values, expected_sum, expected_mean):
    for order in (values, values[::-1]):
        total = ExactSum()
        for value in order:
            total.add(value)
        assert total.value() == expected_sum
        assert total.mean(len(values)) == expected_mean
        merged = ExactSum()
        for value in order:  # one value per accumulator, merged: as panes and bundles combine
            part = ExactSum()
            part.add(value)
            merged.merge(part)
        assert merged.value() == expected_sum
        assert pickle.loads(pickle.dumps(merged)).value() == expected_sum


def run_aggregation(specs, events, split_every=None):
    aggregation = Aggregation(specs)
    if split_every is None:
        acc = aggregation.create()
        for t, event_id, values in events:
            aggregation.add(acc, t, event_id, values)
        return aggregation.extract(acc)
    accs = []
    for start in range(0, len(events), split_every):
        acc = aggregation.create()
        for t, event_id, values in events[start:start + split_every]:
            aggregation.add(acc, t, event_id, values)
        accs.append(acc)
    return aggregation.extract(aggregation.merge(accs))


def test_every_function_and_independence_of_order():
    specs = parse_aggregates("count,sum:v,min:v,max:v,mean:v,first:v,last:v")
    events = [(1000, "b", {"v": 2}), (1000, "a", {"v": 7}), (3000, "c", {"v": -1.5}), (3000, "d", {"v": 4})]
    expected = {"event_count": 4, "count": 4, "sum_v": 11.5, "min_v": -1.5, "max_v": 7, "mean_v": 11.5 / 4,
                "first_v": 7, "last_v": 4}  # ties in time broken by event ID
    rng = random.Random(3)
    for split in (None, 1, 2, 3):
        for _ in range(5):
            rng.shuffle(events)
            assert run_aggregation(specs, events, split) == expected


def test_merge_of_empty_accumulators():
    aggregation = Aggregation([AggregateSpec("count"), AggregateSpec("sum", "v")])
    assert aggregation.extract(aggregation.merge([aggregation.create(), aggregation.create()])) == {
        "event_count": 0, "count": 0, "sum_v": 0}


def test_add_many_equals_adding_one_at_a_time():
    """The batched path adds a key's events of a sub-batch at once: same result,
    bit for bit, as adding them one by one (ints stay ints, ties keep the first)."""
    import pickle

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from onceflow.aggregates import Aggregation, parse_aggregates

    aggregation = Aggregation(parse_aggregates("count,sum:v,mean:v,min:v,max:v,first:v,last:v"))
    numbers = st.one_of(st.integers(-10, 10), st.floats(-1e6, 1e6), st.sampled_from([1, 1.0, -0.0, 0, 1e-17, 2**53 + 1]))
    event = st.tuples(st.text(max_size=2), st.integers(0, 5), numbers)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.lists(event, max_size=6), max_size=4))
    def check(chunks):
        one_by_one, at_once = aggregation.create(), aggregation.create()
        seen = set()
        for chunk in chunks:
            fresh = []
            for event_id, moment, value in chunk:
                if event_id in seen:
                    continue  # (event time, ID) is unique per key once dedup has run
                seen.add(event_id)
                aggregation.add(one_by_one, moment, event_id, {"v": value})
                fresh.append((event_id, moment, {"v": value}))
            aggregation.add_many(at_once, fresh)
        assert pickle.dumps(aggregation.extract(one_by_one)) == pickle.dumps(aggregation.extract(at_once))

    check()


def test_add_rows_is_adding_the_rows_taken_one_by_one():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    aggregation = Aggregation(parse_aggregates("count,sum:v,mean:v,min:v,max:v,first:v,last:v"))
    numbers = st.one_of(st.integers(-10, 10), st.floats(-1e6, 1e6), st.sampled_from([1, 1.0, -0.0, 0, 2**53 + 1]))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 5), numbers), min_size=1, max_size=12), st.data())
    def check(events, data):
        event_ids = [f"e{index}" for index in range(len(events))]
        times, values = [moment for moment, _ in events], [value for _, value in events]
        rows = data.draw(st.lists(st.sampled_from(range(len(events))), unique=True))
        by_rows, by_columns = aggregation.create(), aggregation.create()
        aggregation.add_rows(by_rows, rows, event_ids, times, [values])
        for row in rows:  # the reference: one event at a time
            aggregation.add(by_columns, times[row], event_ids[row], {"v": values[row]})
        assert pickle.dumps(aggregation.extract(by_rows)) == pickle.dumps(aggregation.extract(by_columns))

    check()
