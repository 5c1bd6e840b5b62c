"""What a torture run observed over time: a sample a second (records produced and
consumed, consumer lag, the job's memory) and the faults with when they began and
ended."""

from __future__ import annotations

import dataclasses
import threading
from typing import List, Optional


@dataclasses.dataclass(frozen=True)
class Sample:
    at_s: float
    produced: int
    consumed: Optional[int]  # records the group has committed; None while the broker is away
    lag: Optional[int]
    rss_bytes: int
    in_sink: Optional[int]  # events the sink's rows count; None while it cannot be read
    backlog: Optional[int]  # distinct good events produced and delivered, not yet counted in the sink


@dataclasses.dataclass
class FaultMark:
    kind: str
    start_s: float
    end_s: Optional[float] = None
    note: str = ""
    # A kill: how many records the restarted job reads again (the group's committed
    # offsets minus the positions stored with the rows, at the kill).
    re_read: Optional[int] = None


class Timeline:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samples: List[Sample] = []
        self.faults: List[FaultMark] = []

    def add_sample(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)

    def begin(self, kind: str, at_s: float) -> FaultMark:
        mark = FaultMark(kind, at_s)
        with self._lock:
            self.faults.append(mark)
        return mark

    def samples_between(self, start_s: float, end_s: float) -> List[Sample]:
        with self._lock:
            return [s for s in self.samples if start_s <= s.at_s <= end_s]

    def last_sample_before(self, at_s: float) -> Optional[Sample]:
        with self._lock:
            earlier = [s for s in self.samples if s.at_s < at_s]
        return earlier[-1] if earlier else None

    def max_lag(self) -> int:
        with self._lock:
            return max((s.lag for s in self.samples if s.lag is not None), default=0)

    def max_backlog(self) -> int:
        with self._lock:
            return max((s.backlog for s in self.samples if s.backlog is not None), default=0)
