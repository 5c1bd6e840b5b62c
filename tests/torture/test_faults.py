"""The seeded fault schedule, and how a run's progress lines name faults."""

from onceflow_dev.torture.faults import BROKER_RESTART, CONNECTION_KILL, KILL, STALL, fault_schedule

COUNTS = {KILL: 3, BROKER_RESTART: 1, STALL: 1, CONNECTION_KILL: 1}


def test_every_fault_once_in_order_inside_the_production_window():
    schedule = fault_schedule(COUNTS, production_s=100, seed=3)
    assert sorted(f.kind for f in schedule) == sorted([KILL] * 3 + [BROKER_RESTART, STALL, CONNECTION_KILL])
    times = [f.at_s for f in schedule]
    assert times == sorted(times)
    assert 10 <= times[0] and times[-1] <= 85


def test_the_seed_decides_the_schedule():
    assert fault_schedule(COUNTS, 100, seed=3) == fault_schedule(COUNTS, 100, seed=3)
    assert fault_schedule(COUNTS, 100, seed=3) != fault_schedule(COUNTS, 100, seed=4)


def test_no_faults_no_schedule():
    assert fault_schedule({}, 100, seed=1) == []


def test_a_progress_line_says_when_the_broker_or_the_job_is_away():
    """It read "lag None" while the broker restarted and "job RSS 0 MiB" between a kill and the restart."""
    from onceflow_dev.torture.command import _progress
    from onceflow_dev.torture.timeline import Sample

    running = Sample(at_s=5, produced=10, consumed=4, lag=12_345, rss_bytes=300 * 2**20, in_sink=3, backlog=1)
    assert _progress(running) == " | lag 12,345 | job RSS 300 MiB"
    away = Sample(at_s=6, produced=10, consumed=None, lag=None, rss_bytes=0, in_sink=None, backlog=None)
    assert _progress(away) == " | lag unknown (the broker does not answer) | no job process running"
