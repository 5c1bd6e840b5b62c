"""Event-time windows as plain arithmetic, and the rule that makes an event too late.

Beam's ``FixedWindows``/``SlidingWindows`` assign the same windows as
:meth:`WindowSpec.windows_for`; the batched paths and the tests use these functions
so that every path agrees on which window an event belongs to.

Lateness rule (deterministic: it depends on the data and its order in the log, not
on timing). Each reader reports, with every record, the greatest event time it had
already seen in that record's partition or file (its watermark, ``high_water_ms``).
An event is *too late* when the earliest window it belongs to ended at least
``allowed_lateness`` before that high water::

    earliest_window_end(event_time) + allowed_lateness <= high_water_ms

A runner's watermark is never ahead of any partition's high water, so everything
Beam would drop as late is caught by this rule first and sent to the dead-letter
queue; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import re
from typing import List, Optional, Tuple

from onceflow.events import MAX_EVENT_TIME_MS, MIN_EVENT_TIME_MS, is_whole_number

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """``"250ms"``, ``"60s"``, ``"5m"``, ``"1h"``, ``"1d"`` or ``"0"`` to milliseconds.

    Raises ValueError (with the expected form in the message) for anything else.
    """
    match = _DURATION.match(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a duration; use a whole number with a unit: 250ms, 60s, 5m, 1h or 1d")
    number, unit = int(match.group(1)), match.group(2)
    if unit is None and number != 0:
        raise ValueError(f"{text!r} has no unit; write e.g. {number}s or {number}m")
    return number * _UNIT_MS[unit or "ms"]


def format_duration_ms(millis: int) -> str:
    """The shortest exact spelling of a duration: 60000 -> ``1m``."""
    for unit in ("d", "h", "m", "s"):
        if millis and millis % _UNIT_MS[unit] == 0:
            return f"{millis // _UNIT_MS[unit]}{unit}"
    return f"{millis}ms"


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """Fixed windows of ``size_ms``, or sliding ones starting every ``period_ms``.

    Windows are aligned to the epoch (offset 0), half-open ``[start, end)``.
    """

    size_ms: int
    period_ms: Optional[int] = None
    allowed_lateness_ms: int = 0

    def __post_init__(self) -> None:
        for name in ("size_ms", "period_ms", "allowed_lateness_ms"):
            value = getattr(self, name)
            if (value is not None or name != "period_ms") and not is_whole_number(value):
                raise TypeError(f"WindowSpec {name} must be a whole number of milliseconds (an int), "
                                f"not {value!r}")
        if self.size_ms <= 0:
            raise ValueError("window size must be positive")
        if self.size_ms > MAX_EVENT_TIME_MS + 1:  # windows are aligned to 1970: none would fit the calendar
            raise ValueError("window size must be at most the span from 1970 to the year 9999")
        if self.period_ms is not None and not 0 < self.period_ms <= self.size_ms:
            raise ValueError("window period must be positive and at most the window size")
        if self.allowed_lateness_ms < 0:
            raise ValueError("allowed lateness cannot be negative")

    @property
    def is_sliding(self) -> bool:
        return self.period_ms is not None and self.period_ms != self.size_ms

    @property
    def step_ms(self) -> int:
        return self.period_ms if self.period_ms is not None else self.size_ms

    @property
    def dedup_horizon_ms(self) -> int:
        """How long after its event time an event ID must be remembered: after
        ``size + allowed lateness`` every window the event belongs to has closed,
        so any later copy is rejected as too late before it reaches dedup."""
        return self.size_ms + self.allowed_lateness_ms

    def windows_for(self, event_time_ms: int) -> List[Tuple[int, int]]:
        """Every ``(start, end)`` window containing the time, earliest first."""
        first_start = self._first_start(event_time_ms)
        return [
            (start, start + self.size_ms)
            for start in range(first_start, event_time_ms + 1, self.step_ms)
        ]

    def earliest_window_end(self, event_time_ms: int) -> int:
        return self._first_start(event_time_ms) + self.size_ms

    def fits_calendar(self, event_time_ms: int) -> bool:
        """Whether every window containing the time starts and ends within the
        years 1 to 9999, as every sink stores a window's bounds. The event contract
        accepts any time in those years; a window of one near either end may reach
        past them (a 1m window of an event at 9999-12-31T23:59:30Z ends in the year
        10000), and such an event goes to the dead-letter queue."""
        last_start = event_time_ms // self.step_ms * self.step_ms
        return self._first_start(event_time_ms) >= MIN_EVENT_TIME_MS and last_start + self.size_ms <= MAX_EVENT_TIME_MS

    def _first_start(self, event_time_ms: int) -> int:
        # The smallest multiple of the step greater than event_time - size.
        return ((event_time_ms - self.size_ms) // self.step_ms + 1) * self.step_ms

    def is_too_late(self, event_time_ms: int, high_water_ms: Optional[int]) -> bool:
        """The lateness rule of this module's docstring."""
        if high_water_ms is None:
            return False
        return self.earliest_window_end(event_time_ms) + self.allowed_lateness_ms <= high_water_ms

    def describe(self) -> str:
        text = f"{format_duration_ms(self.size_ms)} windows"
        if self.is_sliding:
            text += f" every {format_duration_ms(self.step_ms)}"
        return text + f", allowed lateness {format_duration_ms(self.allowed_lateness_ms)}"
