"""Window arithmetic agrees with Beam's window functions; the lateness rule."""

import pytest
from apache_beam.transforms.window import FixedWindows, SlidingWindows
from apache_beam.utils.timestamp import Timestamp

from onceflow.events import MAX_EVENT_TIME_MS, MIN_EVENT_TIME_MS
from onceflow.windowing import WindowSpec, format_duration_ms, parse_duration_ms


@pytest.mark.parametrize("text, millis", [
    ("250ms", 250), ("60s", 60_000), ("5m", 300_000), ("1h", 3_600_000), ("2d", 172_800_000),
    ("0", 0), (" 10 s ", 10_000),
])
def test_durations(text, millis):
    assert parse_duration_ms(text) == millis


@pytest.mark.parametrize("text", ["banana", "", "5", "-5s", "1.5m", "5 minutes", "m"])
def test_bad_durations_say_the_expected_form(text):
    with pytest.raises(ValueError, match=r"\d+s"):
        parse_duration_ms(text)


def test_format_duration():
    assert [format_duration_ms(x) for x in (60_000, 90_000, 250, 86_400_000)] == ["1m", "90s", "250ms", "1d"]


class _Ctx:
    def __init__(self, millis):
        self.timestamp = Timestamp(micros=millis * 1000)


def beam_windows(window_fn, millis):
    return sorted((w.start.micros // 1000, w.end.micros // 1000) for w in window_fn.assign(_Ctx(millis)))


@pytest.mark.parametrize("millis", [0, 1, 59_999, 60_000, 123_456_789, -1, -60_001, 1793610000123])
def test_fixed_windows_match_beam(millis):
    assert WindowSpec(60_000).windows_for(millis) == beam_windows(FixedWindows(60), millis)


@pytest.mark.parametrize("size, period", [(60_000, 10_000), (10_000, 3_000), (60_000, 60_000)])
@pytest.mark.parametrize("millis", [0, 7_000, 59_999, 123_456, -1, 1793610000123])
def test_sliding_windows_match_beam(size, period, millis):
    spec = WindowSpec(size, period)
    assert spec.windows_for(millis) == beam_windows(SlidingWindows(size / 1000, period / 1000), millis)
    assert spec.earliest_window_end(millis) == spec.windows_for(millis)[0][1]


def test_lateness_rule():
    spec = WindowSpec(60_000, allowed_lateness_ms=30_000)
    # Window [0, 60s) closes at 90s of high water.
    assert not spec.is_too_late(10_000, None)
    assert not spec.is_too_late(10_000, 89_999)
    assert spec.is_too_late(10_000, 90_000)
    assert not spec.is_too_late(60_000, 90_000)


def test_sliding_lateness_uses_the_earliest_window():
    spec = WindowSpec(60_000, 20_000, allowed_lateness_ms=0)
    # 45s lies in [0,60), [20,80), [40,100): too late once [0,60) has closed.
    assert spec.is_too_late(45_000, 60_000)
    assert not spec.is_too_late(45_000, 59_999)


def test_dedup_horizon_covers_every_window_and_the_lateness():
    spec = WindowSpec(60_000, 20_000, allowed_lateness_ms=30_000)
    assert spec.dedup_horizon_ms == 90_000
    for t in range(0, 120_000, 7_000):
        last_end = spec.windows_for(t)[-1][1]
        assert t + spec.dedup_horizon_ms >= last_end + spec.allowed_lateness_ms


@pytest.mark.parametrize("kwargs", [dict(size_ms=0), dict(size_ms=10, period_ms=20), dict(size_ms=10, period_ms=0),
                                    dict(size_ms=10, allowed_lateness_ms=-1)])
def test_bad_specs(kwargs):
    with pytest.raises(ValueError):
        WindowSpec(**kwargs)


def test_windows_must_fit_the_calendar_a_sink_stores():
    minute, day = 60_000, 86_400_000
    fixed, sliding = WindowSpec(minute), WindowSpec(2 * day, day)
    assert fixed.fits_calendar(MIN_EVENT_TIME_MS)  # [0001-01-01T00:00, 00:01)
    assert not fixed.fits_calendar(MAX_EVENT_TIME_MS)  # its window ends at 10000-01-01
    assert not fixed.fits_calendar(MAX_EVENT_TIME_MS - minute + 1)
    assert fixed.fits_calendar(MAX_EVENT_TIME_MS - minute)
    assert not sliding.fits_calendar(MIN_EVENT_TIME_MS)  # one of its windows starts the day before
    assert sliding.fits_calendar(MIN_EVENT_TIME_MS + day)
    assert fixed.fits_calendar(-1) and sliding.fits_calendar(-1)  # 1969
