"""Reusable PTransforms. No I/O and no connection strings inside: each takes and
returns PCollections and drops into any Beam job::

    from onceflow.transforms import ParseEvents, WindowedAggregate
"""

from onceflow.transforms.aggregate import Aggregated, WindowedAggregate
from onceflow.transforms.dedup import DedupByEventId
from onceflow.transforms.parse import ParseEvents, Parsed

__all__ = [
    "Aggregated",
    "DedupByEventId",
    "ParseEvents",
    "Parsed",
    "WindowedAggregate",
]
