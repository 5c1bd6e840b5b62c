"""onceflow: Apache Beam pipelines and PTransforms for event streams that must be
neither lost nor double-counted.

Delivery is at-least-once, processing is idempotent, the effect is exactly-once.
Reusable transforms live in :mod:`onceflow.transforms`, I/O in :mod:`onceflow.io`,
runnable pipelines in :mod:`onceflow.pipelines`.
"""

import logging

from onceflow.runners import exit_with_job_process
from onceflow.versions import ONCEFLOW_VERSION as __version__


class _QuietOptionalGcp(logging.Filter):
    """Beam logs a warning on import when its Google Cloud extra is absent; onceflow
    needs that extra only for BigQuery and Dataflow, so the line is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


logging.getLogger().addFilter(_QuietOptionalGcp())

# A LOOPBACK worker process of --loopback_worker_processes imports onceflow to run the
# job's steps: it ends with the job's process (see onceflow.runners); anywhere else
# this does nothing.
exit_with_job_process()

__all__ = ["__version__"]
