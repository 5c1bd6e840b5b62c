"""Choosing a sink by URL, and the one transform that writes rows to it."""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Dict

import apache_beam as beam

from onceflow.io.sqlite import WriteRowsToSqlite, ensure_table
from onceflow.rows import RowSchema, check_identifier

DEFAULT_TABLE = "aggregates"
SINK_SCHEMES = ("sqlite",)


@dataclasses.dataclass(frozen=True)
class SinkTarget:
    """A parsed ``--sink`` URL."""

    scheme: str
    location: str  # a file path for sqlite
    table: str

    def describe(self) -> str:
        return f"{self.scheme} {self.location} (table {self.table})"


def parse_sink_url(url: str) -> SinkTarget:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db``, optional ``?table=NAME``.

    Raises ValueError whose message says what is wrong and the expected form.
    """
    parsed = urllib.parse.urlsplit(str(url))
    if parsed.scheme not in SINK_SCHEMES:
        raise ValueError(f"{url!r} has an unknown scheme; use one of: "
                         + ", ".join(f"{s}://..." for s in SINK_SCHEMES))
    query: Dict[str, list] = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    unknown = set(query) - {"table"}
    if unknown:
        raise ValueError(f"{url!r}: unknown parameter {sorted(unknown)[0]!r}; only ?table=NAME is accepted")
    table = query.get("table", [DEFAULT_TABLE])[-1]
    check_identifier(table, "table name")
    if parsed.netloc:
        raise ValueError(f"{url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db (three or four slashes)")
    path = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
    if not path or path.endswith("/"):
        raise ValueError(f"{url!r} names no database file; e.g. sqlite:///out/aggregates.db")
    return SinkTarget(parsed.scheme, path, table)


def prepare_sink(target: SinkTarget, schema: RowSchema) -> None:
    """Checks the sink is usable before the pipeline starts (creates the table)."""
    ensure_table(target.location, target.table, schema)


class WriteRows(beam.PTransform):
    """Writes aggregate rows to the sink a :class:`SinkTarget` names, as an
    idempotent upsert guarded by ``event_count`` (see each sink's docstring)."""

    def __init__(self, target: SinkTarget, schema: RowSchema, batch_size: int = 500):
        super().__init__()
        check_identifier(target.table, "table name")
        self._target = target
        self._schema = schema
        self._batch_size = batch_size

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return rows | "WriteToSqlite" >> WriteRowsToSqlite(
            self._target.location, self._target.table, self._schema, self._batch_size)
