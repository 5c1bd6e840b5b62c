"""The truth, from the ledger alone, and its comparison with what the pipeline wrote.

Nothing here uses the pipeline's own parsing, windowing or aggregation: the
expected rows come straight from the events the ledger says were produced, so a
bug in the pipeline cannot hide in the expected values.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from onceflow_dev.torture.stream import BAD, DUPLICATE, GOOD, TOO_LATE, Planned

RowKey = Tuple[str, int]  # (key, window start ms)
Aggregates = Tuple[int, int]  # (count, sum of v)


def expected_rows(records: Iterable[Planned], window_ms: int,
                  period_ms: Optional[int] = None) -> Dict[RowKey, Aggregates]:
    """Count and sum of ``v`` per key and window, over each distinct good event
    (by ID: a re-send or a record the broker holds twice counts once). Windows are
    aligned to the epoch: fixed ones of ``window_ms``, or, with ``period_ms``,
    sliding ones of ``window_ms`` starting every ``period_ms``; an event counts in
    every window that holds it."""
    step = period_ms or window_ms
    rows: Dict[RowKey, Aggregates] = {}
    seen = set()
    for planned in records:
        if planned.kind not in (GOOD, DUPLICATE) or planned.event["id"] in seen:
            continue
        seen.add(planned.event["id"])
        event = planned.event
        start = event["t"] - event["t"] % step  # the latest window holding t; earlier ones every step before
        while start > event["t"] - window_ms:
            key = (event["k"], start)
            count, total = rows.get(key, (0, 0))
            rows[key] = (count + 1, total + event["v"])
            start -= step
    return rows


def in_topic(plan: Iterable[Planned], records: Iterable[Tuple[int, int, bytes]]) -> Tuple[List[Planned], int]:
    """What the topic really holds, as ledger entries: each (partition, offset,
    value) read back, with the kind and event of the planned record of the same
    bytes; and how many planned records are not in the topic at all."""
    planned_by_value: Dict[bytes, Planned] = {}
    wanted: Dict[bytes, int] = {}
    for planned in plan:
        planned_by_value.setdefault(planned.value, planned)
        wanted[planned.value] = wanted.get(planned.value, 0) + 1
    found: List[Planned] = []
    for partition, offset, value in records:
        planned = planned_by_value.get(value)
        if planned is None:
            continue  # not ours: nothing else writes to a torture topic
        found.append(dataclasses.replace(planned, partition=partition, offset=offset))
        wanted[value] -= 1
    return found, sum(n for n in wanted.values() if n > 0)


def expected_dead_letters(ledger: Iterable[Planned]) -> Dict[Tuple[int, int], str]:
    """(partition, offset) -> ``too_late`` or ``bad`` for every record the DLQ must hold."""
    return {(p.partition, p.offset): p.kind for p in ledger if p.kind in (BAD, TOO_LATE)}


@dataclasses.dataclass
class Comparison:
    rows_expected: int
    rows_found: int
    wrong: List[RowKey]
    missing: List[RowKey]
    extra: List[RowKey]
    dlq_expected: int
    dlq_found: int
    dlq_missing: List[Tuple[int, int]]
    dlq_extra: List[Tuple[int, int]]
    dlq_wrong_reason: List[Tuple[int, int]]

    @property
    def exact(self) -> bool:
        return not (self.wrong or self.missing or self.extra or self.dlq_missing or self.dlq_extra
                    or self.dlq_wrong_reason)

    def lines(self) -> List[str]:
        return [
            f"rows          expected {self.rows_expected}, found {self.rows_found}: wrong {len(self.wrong)}, "
            f"missing {len(self.missing)}, extra {len(self.extra)}",
            f"dead letters  expected {self.dlq_expected}, found {self.dlq_found}: missing {len(self.dlq_missing)}, "
            f"extra {len(self.dlq_extra)}, wrong reason {len(self.dlq_wrong_reason)}",
        ]

    def examples(self, limit: int = 5) -> List[str]:
        """A few of each discrepancy, for the report."""
        named = [("wrong row", self.wrong), ("missing row", self.missing), ("extra row", self.extra),
                 ("missing dead letter at (partition, offset)", self.dlq_missing),
                 ("extra dead letter at (partition, offset)", self.dlq_extra),
                 ("dead letter with the wrong reason at (partition, offset)", self.dlq_wrong_reason)]
        return [f"{name}: {item}" for name, items in named for item in sorted(items)[:limit]]


def compare(expected: Mapping[RowKey, Aggregates], found: Mapping[RowKey, Aggregates],
            expected_dlq: Mapping[Tuple[int, int], str], found_dlq: Mapping[Tuple[int, int], str]) -> Comparison:
    """Row by row and dead letter by dead letter. A found dead letter's reason is
    ``too_late`` or anything else (compared as ``bad``)."""
    found_kinds = {coordinates: TOO_LATE if reason == "too_late" else BAD for coordinates, reason in found_dlq.items()}
    return Comparison(
        rows_expected=len(expected), rows_found=len(found),
        wrong=[k for k in expected if k in found and found[k] != expected[k]],
        missing=[k for k in expected if k not in found],
        extra=[k for k in found if k not in expected],
        dlq_expected=len(expected_dlq), dlq_found=len(found_kinds),
        dlq_missing=[c for c in expected_dlq if c not in found_kinds],
        dlq_extra=[c for c in found_kinds if c not in expected_dlq],
        dlq_wrong_reason=[c for c in expected_dlq if c in found_kinds and found_kinds[c] != expected_dlq[c]],
    )
