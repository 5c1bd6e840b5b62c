"""The seeded fault schedule of a torture run."""

from __future__ import annotations

import dataclasses
import random
from typing import Dict, List

KILL, BROKER_RESTART, STALL, CONNECTION_KILL = "kill", "broker_restart", "stall", "connection_kill"
FAULT_KINDS = (KILL, BROKER_RESTART, STALL, CONNECTION_KILL)


@dataclasses.dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after production starts; a fault never starts before the previous one ended
    kind: str


def fault_schedule(counts: Dict[str, int], production_s: float, seed: int) -> List[Fault]:
    """The faults in ``counts`` (kind -> how many), at seeded random moments spread
    over 10%..85% of the production time: one per slot of equal width, in a
    shuffled order, at a random point of the slot's middle half."""
    kinds = [kind for kind in FAULT_KINDS for _ in range(counts.get(kind, 0))]
    rng = random.Random(seed)
    rng.shuffle(kinds)
    if not kinds:
        return []
    start, width = 0.10 * production_s, 0.75 * production_s / len(kinds)
    return [Fault(round(start + width * (slot + rng.uniform(0.25, 0.75)), 1), kind)
            for slot, kind in enumerate(kinds)]
