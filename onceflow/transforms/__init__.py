"""Reusable PTransforms. No I/O and no connection strings inside: each takes and
returns PCollections and drops into any Beam job::

    from onceflow.transforms import ParseEvents, WindowedAggregate

:class:`AggregateEvents` (with the event contract) and :class:`AggregateBatches`
(with key fields) are the batched path the jobs run: record batches in, the same
rows and dead letters out, at a fraction of the per-record cost.
"""

from onceflow.transforms.aggregate import Aggregated, WindowedAggregate
from onceflow.transforms.batched import AggregateBatches, AggregateEvents, BatchRecords
from onceflow.transforms.dedup import DedupByEventId
from onceflow.transforms.parse import ParseEvents, Parsed

__all__ = [
    "AggregateBatches",
    "AggregateEvents",
    "Aggregated",
    "BatchRecords",
    "DedupByEventId",
    "ParseEvents",
    "Parsed",
    "WindowedAggregate",
]
