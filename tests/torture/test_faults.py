"""The seeded fault schedule."""

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
