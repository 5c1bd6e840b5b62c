"""onceflow: Apache Beam pipelines and PTransforms for event streams that must be
neither lost nor double-counted.

Delivery is at-least-once, processing is idempotent, the effect is exactly-once.
Reusable transforms live in :mod:`onceflow.transforms`, I/O in :mod:`onceflow.io`,
runnable pipelines in :mod:`onceflow.pipelines`.
"""

from onceflow.versions import ONCEFLOW_VERSION as __version__

__all__ = ["__version__"]
