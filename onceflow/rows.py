"""The aggregate row contract shared by every sink.

A row (as :class:`~onceflow.transforms.WindowedAggregate` emits it) is a dict of
the key fields, ``window_start`` and ``window_end`` (epoch milliseconds, UTC), one
column per aggregate, and ``event_count``. Its primary key is
``(key fields..., window_start, window_end)``; ``event_count`` is its version: a
sink keeps the stored row unless the incoming one covers at least as many events.
Sinks store window bounds as UTC timestamps (text ``YYYY-MM-DDTHH:MM:SS.mmmZ``
where the store has no timestamp type) and add ``written_at``, a wall-clock column
that every equality check ignores.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import re
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

from onceflow.aggregates import AggregateSpec, check_aggregate_specs
from onceflow.events import check_field_names, is_whole_number

# Rows per sink transaction unless --sink_batch_size says otherwise. Each commit
# costs far more than a row: measured on the 1,000,000-record file backfill into
# SQLite (166,597 rows), 500 rows a batch took 7.5 s, 5,000 took 6.0 s, 20,000
# took 5.4 s. A batch never outlives its bundle, so this bounds memory, not latency.
DEFAULT_BATCH_ROWS = 5000

WINDOW_START = "window_start"
WINDOW_END = "window_end"
EVENT_COUNT = "event_count"
WRITTEN_AT = "written_at"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def check_identifier(name: str, what: str) -> str:
    """A table or column name made of letters, digits and underscores (at most 63,
    not starting with a digit); anything else raises ValueError. Sinks also quote
    every identifier, so nothing from a flag can reach SQL as syntax."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(
            f"{what} {name!r} is not allowed: use letters, digits and _ (not first), at most 63 characters"
        )
    return name


@dataclasses.dataclass(frozen=True)
class RowSchema:
    """Column names and kinds of the aggregate table."""

    key_fields: Tuple[str, ...]
    aggregates: Tuple[AggregateSpec, ...]

    def __post_init__(self) -> None:
        check_field_names(self.key_fields, "RowSchema key_fields")
        check_aggregate_specs(self.aggregates, "RowSchema")
        for name in self.columns:
            check_identifier(name, "column name")
        taken = [name for name in self.columns if name == WRITTEN_AT or self.columns.count(name) > 1]
        if taken:
            raise ValueError(f"{taken[0]!r} names two columns (a key field and a window, aggregate or the sinks' "
                             f"{WRITTEN_AT} column): rename the field in --key_fields or --aggregate")

    @functools.cached_property  # read per row by the sinks
    def primary_key(self) -> Tuple[str, ...]:
        return (*self.key_fields, WINDOW_START, WINDOW_END)

    @property
    def table_key(self) -> Tuple[str, ...]:
        """The primary key in the order a SQL table indexes it: the window first.
        A sink's rows come window after window, so a window-first index grows at
        its end; key-first, each transaction dirtied pages all over it (a backfill's
        166,597 rows: 0.80-0.85 s into SQLite, 0.30 s window first; PostgreSQL 1.59 s,
        1.40 s). An upsert's conflict target is the same columns in any order."""
        return (WINDOW_START, WINDOW_END, *self.key_fields)

    @functools.cached_property  # read per row by the sinks
    def value_columns(self) -> Tuple[str, ...]:
        return (EVENT_COUNT, *(spec.column for spec in self.aggregates))

    @functools.cached_property  # read per row by the sinks
    def columns(self) -> Tuple[str, ...]:
        return (*self.primary_key, *self.value_columns)

    def column_kind(self, column: str) -> str:
        """``key``, ``timestamp``, ``integer`` or ``number``."""
        if column in self.key_fields:
            return "key"
        if column in (WINDOW_START, WINDOW_END):
            return "timestamp"
        if column in (EVENT_COUNT, "count"):
            return "integer"
        return "number"

    def key_of(self, row: Dict[str, Any]) -> Tuple[Any, ...]:
        return tuple(row[name] for name in self.primary_key)


def check_sink_arguments(transform: str, schema: Any, batch_size: Any) -> None:
    """ValueError unless ``schema`` is a :class:`RowSchema` and ``batch_size`` a
    positive int: what every sink transform takes."""
    if not isinstance(schema, RowSchema):
        raise ValueError(f"{transform} takes a RowSchema, e.g. RowSchema(('store',), parse_aggregates('count')), "
                         f"not {schema!r}")
    if not is_whole_number(batch_size) or batch_size <= 0:
        raise ValueError(f"batch size must be a positive int, not {batch_size!r}")


def row_key(row: Dict[str, Any], key_fields: Sequence[str]) -> Tuple[Any, ...]:
    """The deterministic primary key of an aggregate row."""
    return (*(row[name] for name in key_fields), row[WINDOW_START], row[WINDOW_END])


def row_values(row: Dict[str, Any], schema: RowSchema, timestamp: Callable[[int], Any]) -> List[Any]:
    """The row's values in ``schema.columns`` order, window bounds converted by
    ``timestamp`` (epoch ms to whatever the store takes)."""
    return [timestamp(row[column]) if column in _WINDOW_BOUNDS else row[column] for column in schema.columns]


_WINDOW_BOUNDS = frozenset((WINDOW_START, WINDOW_END))  # the timestamp columns (see RowSchema.column_kind)


@functools.lru_cache(maxsize=4096)  # window bounds repeat across every key of a window
def utc_datetime(millis: int) -> datetime.datetime:
    """Epoch milliseconds as an aware UTC datetime (exact: ms fit in microseconds)."""
    return _EPOCH + datetime.timedelta(milliseconds=millis)


def utc_millis(moment: datetime.datetime) -> int:
    """An aware datetime back to epoch milliseconds (the inverse of :func:`utc_datetime`)."""
    return (moment - _EPOCH) // datetime.timedelta(milliseconds=1)


def utc_now() -> datetime.datetime:
    """The wall clock for ``written_at`` (excluded from every equality check)."""
    return datetime.datetime.now(datetime.timezone.utc)


def newest_per_key(rows: Iterable[Dict[str, Any]], schema: RowSchema) -> Tuple[List[Dict[str, Any]], int]:
    """One row per primary key, the one with the greatest ``event_count`` (on a tie
    the later one, as a sequence of guarded upserts would keep), sorted by key; and
    how many rows were superseded. Lets a sink write a batch as one set-based
    statement or one file without changing what the guard would have kept."""
    newest: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
    total = 0
    for row in rows:
        total += 1
        key = schema.key_of(row)
        kept = newest.get(key)
        if kept is None or row[EVENT_COUNT] >= kept[EVENT_COUNT]:
            newest[key] = row
    return [newest[key] for key in sorted(newest)], total - len(newest)


def check_distinct_ignoring_case(columns: Sequence[str], store: str) -> None:
    """ValueError (one line) when two columns differ only in case, for a store whose
    column names ignore case (SQLite, BigQuery): it took them for one and blamed the
    database file."""
    seen: Dict[str, str] = {}
    for column in columns:
        other = seen.setdefault(column.lower(), column)
        if other != column:
            raise ValueError(f"columns {other!r} and {column!r} differ only in case, and {store} takes them for "
                             "one; use other fields, or write to PostgreSQL or files")


def check_columns(found: Sequence[str], expected: Sequence[str], table: str, where: str,
                  hint: str = "use another table (?table=NAME)") -> None:
    """ValueError (one line) when an existing table has other columns than this job
    writes (a table from another aggregate spec)."""
    if list(found) != list(expected):
        raise ValueError(
            f"table {table!r} in {where} has columns {list(found)}, but this job writes {list(expected)}; {hint}")


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
