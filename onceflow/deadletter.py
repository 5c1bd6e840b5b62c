"""The dead-letter record: what a transform emits for a record it refuses.

Transforms emit :class:`DeadLetter` values and import nothing else of the queue;
the queues, their envelope (:mod:`onceflow.io.dlq.envelope`), writers and readers
are :mod:`onceflow.io.dlq`.
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple, Optional

from onceflow.events import SourceRecord


class DeadLetter(NamedTuple):
    """A record a stage refused, with why and where it came from."""

    record: SourceRecord
    stage: str
    reason: str
    error_class: str
    message: str
    event_id: Optional[str] = None
    event_time_ms: Optional[int] = None

    @property
    def dlq_id(self) -> str:
        """Deterministic: the same record refused at the same stage for the same
        reason always has the same ID (32 hex digits), whenever it is refused."""
        identity = json.dumps(
            [dict(self.record.source), self.stage, self.reason],
            sort_keys=True, separators=(",", ":"), default=str,
        )
        digest = hashlib.sha256(identity.encode("utf-8"))
        digest.update(self.record.value)
        return digest.hexdigest()[:32]
