"""Reusable PTransforms. No I/O and no connection strings inside: each takes and
returns PCollections and drops into any Beam job::

    from onceflow.transforms import ParseEvents, WindowedAggregate

:class:`AggregateBatches` is the batched path the jobs run: record batches in,
the same rows and dead letters out, at a fraction of the per-record cost.
"""

from onceflow.transforms.aggregate import Aggregated, WindowedAggregate
from onceflow.transforms.batched import AggregateBatches, BatchRecords
from onceflow.transforms.dedup import DedupByEventId
from onceflow.transforms.parse import ParseEvents, Parsed

__all__ = [
    "AggregateBatches",
    "Aggregated",
    "BatchRecords",
    "DedupByEventId",
    "ParseEvents",
    "Parsed",
    "WindowedAggregate",
]
