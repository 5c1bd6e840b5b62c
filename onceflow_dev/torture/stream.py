"""The torture stream: a seeded plan of the records to produce, and the ledger of
what was produced where.

Every record is one of four kinds:

* ``good``: a valid event ``{"id", "t", "k", "v"}``; ``t`` is the wall clock when
  it is produced, or (for a fraction ``late_rate``) up to ``late_max_ms`` earlier,
  so events arrive late and out of order across partitions, within the lateness;
* ``duplicate``: the exact bytes of a good event produced a moment before, re-sent
  (to any partition);
* ``bad``: malformed or schema-violating bytes, of the kinds in ``BAD_RECORDS``;
* ``too_late``: a valid event an hour old, produced into the partition that just
  received a current event, so it is beyond the allowed lateness however the
  partition is read.

The Kafka timestamp of each record is its event time (the wall clock for bad
records): a restarted job rewinds by timestamp.
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Callable, Dict, List, Optional

GOOD, DUPLICATE, BAD, TOO_LATE = "good", "duplicate", "bad", "too_late"
TOO_LATE_AGE_MS = 3_600_000
_RECENT_GOOD = 200  # duplicates re-send one of the last this-many good events


def _event(event_id: str, t: int, key: str, value: int) -> Dict:
    return {"id": event_id, "t": t, "k": key, "v": value}


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# name -> bytes of a record the pipeline must dead-letter, from (event id, now ms).
BAD_RECORDS: Dict[str, Callable[[str, int], bytes]] = {
    "invalid_utf8": lambda i, t: b'{"id":"' + i.encode() + b'","k":"\xff\xfe"}',
    "truncated_json": lambda i, t: _json(_event(i, t, "k1", 1))[:-7],
    "array": lambda i, t: _json([_event(i, t, "k1", 1)]),
    "bare_string": lambda i, t: _json(i),
    "nan": lambda i, t: _json(_event(i, t, "k1", 1)).replace(b'"v":1', b'"v":NaN'),
    "infinity": lambda i, t: _json(_event(i, t, "k1", 1)).replace(b'"v":1', b'"v":-Infinity'),
    "deep_nesting": lambda i, t: b'{"id":"' + i.encode() + b'","x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "empty": lambda i, t: b"",
    "missing_key": lambda i, t: _json({"id": i, "t": t, "v": 1}),
    "null_time": lambda i, t: _json({"id": i, "t": None, "k": "k1", "v": 1}),
    "value_not_a_number": lambda i, t: _json({"id": i, "t": t, "k": "k1", "v": "seven"}),
    "time_not_a_time": lambda i, t: _json({"id": i, "t": True, "k": "k1", "v": 1}),
    "key_is_an_object": lambda i, t: _json({"id": i, "t": t, "k": {"a": 1}, "v": 1}),
}


@dataclasses.dataclass
class Planned:
    """One record to produce; ``partition``/``offset`` are filled in on delivery."""

    n: int
    kind: str
    value: bytes
    timestamp_ms: int
    partition: int
    label: str = ""  # the bad-record kind
    event: Optional[Dict] = None  # good, duplicate, too_late
    offset: Optional[int] = None
    produced_at_ms: int = 0  # the wall clock when it was planned

    @property
    def late(self) -> bool:
        """A good event whose event time is before the moment it was produced."""
        return self.kind == GOOD and self.event["t"] < self.produced_at_ms

    def to_ledger(self) -> Dict:
        line = {"n": self.n, "kind": self.kind, "partition": self.partition, "offset": self.offset,
                "timestamp_ms": self.timestamp_ms, "produced_at_ms": self.produced_at_ms}
        if self.label:
            line["label"] = self.label
        if self.event is not None:
            line["event"] = self.event
        return line


@dataclasses.dataclass(frozen=True)
class StreamMix:
    """Fractions of the records produced that are of each unusual kind."""

    duplicate_rate: float = 0.05
    bad_rate: float = 0.02
    too_late_rate: float = 0.005
    late_rate: float = 0.1
    late_max_ms: int = 20_000
    keys: int = 20


def max_event_delay_ms(mix: StreamMix, rate: int) -> int:
    """The most a good event or a re-send can be behind the wall clock when it is
    produced at ``rate`` records/s: a late event's ``late_max_ms``, plus, for a
    re-send, the time the last ``_RECENT_GOOD`` good events take to produce (twice
    over, for a producer running behind). A lateness under it would refuse records
    the truth counts."""
    good_share = 1 - mix.duplicate_rate - mix.bad_rate - mix.too_late_rate
    return mix.late_max_ms + int(2 * _RECENT_GOOD / (good_share * rate) * 1000)


class StreamPlan:
    """Draws the records one at a time from a seeded generator; the same seed and
    clock give the same stream."""

    def __init__(self, run_id: str, partitions: int, mix: StreamMix, seed: int):
        self._run_id = run_id
        self._partitions = partitions
        self._mix = mix
        self._rng = random.Random(seed)
        self._n = 0
        self._recent_good: List[Planned] = []
        self._bad_kinds = sorted(BAD_RECORDS)

    def next(self, now_ms: int) -> Planned:
        planned = self._draw(now_ms)
        planned.produced_at_ms = now_ms
        return planned

    def _draw(self, now_ms: int) -> Planned:
        rng, mix = self._rng, self._mix
        n = self._n
        self._n += 1
        draw = rng.random()
        if draw < mix.duplicate_rate and self._recent_good:
            original = rng.choice(self._recent_good)
            return Planned(n, DUPLICATE, original.value, original.timestamp_ms, rng.randrange(self._partitions),
                           event=original.event)
        draw -= mix.duplicate_rate
        event_id = f"{self._run_id}-{n}"
        if draw < mix.bad_rate:
            label = self._bad_kinds[n % len(self._bad_kinds)]
            return Planned(n, BAD, BAD_RECORDS[label](event_id, now_ms), now_ms, rng.randrange(self._partitions),
                           label=label)
        draw -= mix.bad_rate
        if draw < mix.too_late_rate and self._recent_good:
            t = now_ms - TOO_LATE_AGE_MS
            event = _event(event_id, t, self._key(), rng.randint(1, 1000))
            return Planned(n, TOO_LATE, _json(event), t, self._recent_good[-1].partition, event=event)
        t = now_ms - (rng.randint(1, mix.late_max_ms) if rng.random() < mix.late_rate else 0)
        event = _event(event_id, t, self._key(), rng.randint(1, 1000))
        planned = Planned(n, GOOD, _json(event), t, rng.randrange(self._partitions), event=event)
        self._recent_good = (self._recent_good + [planned])[-_RECENT_GOOD:]
        return planned

    def _key(self) -> str:
        return f"key-{self._rng.randrange(self._mix.keys):02d}"

