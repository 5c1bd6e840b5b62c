"""Aggregate functions as plain Python: parse a spec, accumulate, merge, extract.

:class:`Aggregation` has the shape of a Beam ``CombineFn`` (create, add, merge,
extract) but no Beam in it, so the per-element pipeline, any batched path and the
tests compute aggregates with the same code.

Results do not depend on the order events are added or accumulators merged:

* sums are exact (integers stay integers within the 64-bit range; floats, and
  integer sums past that range, are summed with Shewchuk's error-free partials and
  rounded once at the end, like ``math.fsum``, to an infinity past the largest
  double), so a live run that merges panes and a backfill that adds events in file
  order agree to the last bit;
* ``first``/``last`` pick the value of the event with the smallest / greatest
  ``(event_time, event_id)``: ties in event time are broken by event ID.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from operator import itemgetter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from onceflow.events import LONG_MAX, LONG_MIN

FUNCTIONS = ("count", "sum", "min", "max", "mean", "first", "last")


@dataclasses.dataclass(frozen=True)
class AggregateSpec:
    """One output column: ``count``, or ``function`` over a numeric ``field``."""

    function: str
    field: Optional[str] = None

    def __post_init__(self) -> None:
        if self.function not in FUNCTIONS:
            raise ValueError(f"unknown aggregate {self.function!r}; use {', '.join(FUNCTIONS)} (or parse_aggregates("
                             "'count,sum:qty'))")
        if self.function == "count":
            if self.field is not None:
                raise ValueError("count takes no field: AggregateSpec('count')")
        elif not isinstance(self.field, str) or not self.field:
            raise ValueError(f"{self.function} needs a field name, e.g. AggregateSpec({self.function!r}, 'qty')")

    @property
    def column(self) -> str:
        return "count" if self.function == "count" else f"{self.function}_{self.field}"


def parse_aggregates(text: str) -> Tuple[AggregateSpec, ...]:
    """``"count,sum:qty,max:price"`` to specs; ValueError says what is wrong."""
    specs: List[AggregateSpec] = []
    for part in (piece.strip() for piece in str(text).split(",")):
        if not part:
            raise ValueError(f"{text!r} has an empty item; write e.g. count,sum:qty,max:price")
        function, _, field = part.partition(":")
        function, field = function.strip(), field.strip()
        if function not in FUNCTIONS:
            raise ValueError(f"unknown aggregate {function!r}; use {', '.join(FUNCTIONS)}")
        if function == "count":
            if field:
                raise ValueError("count takes no field; write count")
            spec = AggregateSpec("count")
        else:
            if not field or not field.replace("_", "a").isalnum():
                raise ValueError(f"{part!r} needs a field name (letters, digits, _), e.g. {function}:qty")
            spec = AggregateSpec(function, field)
        if spec in specs:
            raise ValueError(f"{part!r} is listed twice")
        specs.append(spec)
    return tuple(specs)


def check_aggregate_specs(aggregates: Any, what: str) -> None:
    """ValueError unless ``aggregates`` is a sequence of :class:`AggregateSpec`
    (a text like ``"count,sum:qty"`` is for :func:`parse_aggregates`)."""
    if isinstance(aggregates, str) or not all(isinstance(spec, AggregateSpec) for spec in aggregates):
        raise ValueError(f"{what} takes AggregateSpec values, e.g. parse_aggregates('count,sum:qty'), "
                         f"not {aggregates!r}")


def value_fields(specs: Sequence[AggregateSpec]) -> Tuple[str, ...]:
    """The fields the specs read, in first-use order."""
    seen: Dict[str, None] = {}
    for spec in specs:
        if spec.field:
            seen.setdefault(spec.field, None)
    return tuple(seen)


# -- exact summation -------------------------------------------------------------


def _add_to_partials(partials: List[float], value: float) -> int:
    """Shewchuk's algorithm (as in ``math.fsum``): keeps ``partials`` a list of
    non-overlapping finite floats whose exact sum, plus the integer returned, is
    the exact sum of every value added. The integer is 0 unless two floats summed
    past the largest double: both are then whole numbers (a float that large has no
    fraction, and only one that large can round the sum past it), carried exactly."""
    carry = 0
    kept = 0
    for partial in partials:
        if abs(value) < abs(partial):
            value, partial = partial, value
        high = value + partial
        if high == _INF or high == -_INF:
            carry += int(value) + int(partial)
            value = 0.0
            continue
        low = partial - (high - value)
        if low:
            partials[kept] = low
            kept += 1
        value = high
    partials[kept:] = [value]
    return carry


_INF = math.inf


def _nearest_float(exact: Fraction) -> float:
    """The double nearest ``exact`` (ties to even), or an infinity past the largest."""
    try:
        return float(exact)
    except OverflowError:
        return _INF if exact > 0 else -_INF


class ExactSum:
    """A sum that is exact whatever the order of additions and merges.

    Its :meth:`value` is the exact sum of integers while it stays within the
    64-bit range (a ``long``, as every sink stores one); otherwise, and as soon as
    a float was added, the double nearest the exact sum, rounded once (ties to
    even, as ``math.fsum``), or an infinity when the exact sum is past the largest
    double."""

    __slots__ = ("integer", "partials", "has_float")

    def __init__(self) -> None:
        self.integer = 0
        self.partials: List[float] = []
        self.has_float = False

    def add(self, value: Any) -> None:
        if isinstance(value, int):
            self.integer += value
        else:
            self.has_float = True
            self.integer += _add_to_partials(self.partials, float(value))

    def add_many(self, values: Sequence[Any]) -> None:
        """The same as :meth:`add` for each value, integers summed at once."""
        if set(map(type, values)) == {int}:
            self.integer += sum(values)
            return
        integers = [value for value in values if isinstance(value, int)]
        self.integer += sum(integers)
        if len(integers) != len(values):
            self.has_float = True
            partials = self.partials
            for value in values:
                if not isinstance(value, int):
                    self.integer += _add_to_partials(partials, float(value))

    def merge(self, other: "ExactSum") -> None:
        self.integer += other.integer
        self.has_float = self.has_float or other.has_float
        for partial in other.partials:
            self.integer += _add_to_partials(self.partials, partial)

    def value(self) -> Any:
        if not self.has_float and LONG_MIN <= self.integer <= LONG_MAX:
            return self.integer
        pieces = list(self.partials)
        rest = self.integer
        try:
            while rest:  # the integer part as floats that add up to it exactly
                head = float(rest)
                pieces.append(head)
                rest -= int(head)
            return math.fsum(pieces)
        except OverflowError:  # a part or a partial sum past the largest double: decide exactly
            return _nearest_float(self._exact())

    def mean(self, count: int) -> Any:
        """``value() / count``; when the sum is past the largest double, the
        double nearest the exact mean (which may well be within it)."""
        total = self.value()
        if total == _INF or total == -_INF:
            return _nearest_float(self._exact() / count)
        return total / count

    def _exact(self) -> Fraction:
        return sum(map(Fraction, self.partials), Fraction(self.integer))

    def __getstate__(self) -> Tuple[int, List[float], bool]:
        return self.integer, self.partials, self.has_float

    def __setstate__(self, state: Tuple[int, List[float], bool]) -> None:
        self.integer, self.partials, self.has_float = state


# -- the accumulator ---------------------------------------------------------------

_Stamp = Tuple[int, str]  # (event_time_ms, event_id): orders events totally


class Accumulator:
    """Everything needed for every spec of one key and window."""

    __slots__ = ("count", "sums", "mins", "maxs", "firsts", "lasts")

    def __init__(self) -> None:
        self.count = 0
        self.sums: Dict[str, ExactSum] = {}
        self.mins: Dict[str, Any] = {}
        self.maxs: Dict[str, Any] = {}
        self.firsts: Dict[str, Tuple[_Stamp, Any]] = {}
        self.lasts: Dict[str, Tuple[_Stamp, Any]] = {}

    def __getstate__(self) -> Tuple[Any, ...]:
        return self.count, self.sums, self.mins, self.maxs, self.firsts, self.lasts

    def __setstate__(self, state: Tuple[Any, ...]) -> None:
        self.count, self.sums, self.mins, self.maxs, self.firsts, self.lasts = state


class Aggregation:
    """Computes the columns of ``specs`` for a group of events.

    The extracted ``count`` of events also serves as the row's version: with
    duplicates removed upstream, a row covering more events is more complete.
    """

    def __init__(self, specs: Sequence[AggregateSpec]):
        self.specs = tuple(specs)
        self.fields = value_fields(specs)  # the value columns :meth:`add_columns` takes, in order
        self._sum_fields = tuple({s.field: None for s in specs if s.function in ("sum", "mean")})
        self._min_fields = tuple({s.field: None for s in specs if s.function == "min"})
        self._max_fields = tuple({s.field: None for s in specs if s.function == "max"})
        self._first_fields = tuple({s.field: None for s in specs if s.function == "first"})
        self._last_fields = tuple({s.field: None for s in specs if s.function == "last"})

    def create(self) -> Accumulator:
        return Accumulator()

    def add(self, acc: Accumulator, event_time_ms: int, event_id: str, values: Mapping[str, Any]) -> Accumulator:
        acc.count += 1
        for name in self._sum_fields:
            total = acc.sums.get(name)
            if total is None:
                total = acc.sums[name] = ExactSum()
            total.add(values[name])
        for name in self._min_fields:
            value = values[name]
            if name not in acc.mins or value < acc.mins[name]:
                acc.mins[name] = value
        for name in self._max_fields:
            value = values[name]
            if name not in acc.maxs or value > acc.maxs[name]:
                acc.maxs[name] = value
        stamp = (event_time_ms, event_id)
        for name in self._first_fields:
            held = acc.firsts.get(name)
            if held is None or stamp < held[0]:
                acc.firsts[name] = (stamp, values[name])
        for name in self._last_fields:
            held = acc.lasts.get(name)
            if held is None or stamp > held[0]:
                acc.lasts[name] = (stamp, values[name])
        return acc

    def add_many(self, acc: Accumulator, events: Sequence[Tuple[str, int, Mapping[str, Any]]]) -> Accumulator:
        """:meth:`add` for each ``(event_id, event_time_ms, values)`` in order, with
        the same result (see :meth:`add_columns`)."""
        if not events:
            return acc
        event_ids, event_times, values = zip(*events)
        return self.add_columns(acc, event_ids, event_times,
                                tuple([each[name] for each in values] for name in self.fields))

    def add_columns(self, acc: Accumulator, event_ids: Sequence[str], event_times: Sequence[int],
                    columns: Sequence[Sequence[Any]]) -> Accumulator:
        """:meth:`add` for each event of a column batch, in order, with the same
        result, a column at a time: ``columns`` holds one sequence per name in
        :attr:`fields`, in that order."""
        return self.add_rows(acc, range(len(event_ids)), event_ids, event_times, columns)

    def add_rows(self, acc: Accumulator, rows: Sequence[int], event_ids: Sequence[str], event_times: Sequence[int],
                 columns: Sequence[Sequence[Any]]) -> Accumulator:
        """:meth:`add_columns` for the events at indices ``rows`` (in that order)
        of the columns only: no column is copied that no aggregate reads."""
        self.add_groups(((acc, rows),), event_ids, event_times, columns)
        return acc

    def add_groups(self, groups: Iterable[Tuple[Accumulator, Sequence[int]]], event_ids: Sequence[str],
                   event_times: Sequence[int], columns: Sequence[Sequence[Any]]) -> None:
        """:meth:`add_rows` for each ``(accumulator, rows)`` of ``groups`` (many keys'
        events in one set of columns), with the same result; what concerns a whole
        column (which columns a sum reads, whether they hold only integers) is
        worked out once for all the groups, not once per key."""
        by_name = dict(zip(self.fields, columns))
        # (field, column, only integers): a column of integers is summed by sum() in C
        sums = [(name, by_name[name], set(map(type, by_name[name])) == {int}) for name in self._sum_fields]
        ordered = bool(self._min_fields or self._max_fields or self._first_fields or self._last_fields)
        for acc, rows in groups:
            if not rows:
                continue
            acc.count += len(rows)
            pick = itemgetter(*rows) if len(rows) > 1 else None
            for name, column, integers in sums:
                total = acc.sums.get(name)
                if total is None:
                    total = acc.sums[name] = ExactSum()
                if pick is None:
                    total.add(column[rows[0]])
                elif integers:
                    total.integer += sum(pick(column))
                else:
                    total.add_many(pick(column))
            if ordered:
                self._add_order_statistics(acc, rows, event_ids, event_times, by_name)

    def _add_order_statistics(self, acc: Accumulator, rows: Sequence[int], event_ids: Sequence[str],
                              event_times: Sequence[int], by_name: Mapping[str, Sequence[Any]]) -> None:
        """min, max, first and last of the events at ``rows``."""
        for name in self._min_fields:
            value = min(map(by_name[name].__getitem__, rows))  # the first of equal minima
            if name not in acc.mins or value < acc.mins[name]:
                acc.mins[name] = value
        for name in self._max_fields:
            value = max(map(by_name[name].__getitem__, rows))  # the first of equal maxima
            if name not in acc.maxs or value > acc.maxs[name]:
                acc.maxs[name] = value
        if self._first_fields or self._last_fields:
            stamps = {row: (event_times[row], event_ids[row]) for row in rows}
            earliest = min(rows, key=stamps.__getitem__)
            latest = max(rows, key=stamps.__getitem__)
            for name in self._first_fields:
                held = acc.firsts.get(name)
                if held is None or stamps[earliest] < held[0]:
                    acc.firsts[name] = (stamps[earliest], by_name[name][earliest])
            for name in self._last_fields:
                held = acc.lasts.get(name)
                if held is None or stamps[latest] > held[0]:
                    acc.lasts[name] = (stamps[latest], by_name[name][latest])

    def merge(self, accs: Iterable[Accumulator]) -> Accumulator:
        merged = Accumulator()
        for acc in accs:
            merged.count += acc.count
            for name, total in acc.sums.items():
                mine = merged.sums.get(name)
                if mine is None:
                    mine = merged.sums[name] = ExactSum()
                mine.merge(total)
            for name, value in acc.mins.items():
                if name not in merged.mins or value < merged.mins[name]:
                    merged.mins[name] = value
            for name, value in acc.maxs.items():
                if name not in merged.maxs or value > merged.maxs[name]:
                    merged.maxs[name] = value
            for name, held in acc.firsts.items():
                if name not in merged.firsts or held[0] < merged.firsts[name][0]:
                    merged.firsts[name] = held
            for name, held in acc.lasts.items():
                if name not in merged.lasts or held[0] > merged.lasts[name][0]:
                    merged.lasts[name] = held
        return merged

    def extract(self, acc: Accumulator) -> Dict[str, Any]:
        """Column name to value, plus ``event_count``."""
        out: Dict[str, Any] = {"event_count": acc.count}
        for spec in self.specs:
            if spec.function == "count":
                out[spec.column] = acc.count
            elif spec.function == "sum":
                out[spec.column] = acc.sums[spec.field].value() if acc.count else 0
            elif spec.function == "mean":
                out[spec.column] = acc.sums[spec.field].mean(acc.count) if acc.count else None
            elif spec.function == "min":
                out[spec.column] = acc.mins.get(spec.field)
            elif spec.function == "max":
                out[spec.column] = acc.maxs.get(spec.field)
            elif spec.function == "first":
                held = acc.firsts.get(spec.field)
                out[spec.column] = held[1] if held else None
            elif spec.function == "last":
                held = acc.lasts.get(spec.field)
                out[spec.column] = held[1] if held else None
        return out

    def columns(self) -> Tuple[str, ...]:
        return tuple(spec.column for spec in self.specs)
