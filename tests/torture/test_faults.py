"""The seeded fault schedule, and how a run's progress lines name faults."""

import pytest

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


@pytest.mark.kafka
def test_a_producer_that_delivers_nothing_while_the_broker_is_up_is_replaced(kafka_bootstrap):
    """After a broker restart the torture's producer once kept its records queued
    for the 15 minutes of its flush while other clients wrote to the same topic;
    the run failed on records never produced. Here a producer whose broker never
    answers stands for it: once quiet for PRODUCER_STUCK_S with the broker up, its
    records are purged and sent again, in order, through a new producer."""
    import time
    import types

    from onceflow_dev.torture.command import PRODUCER_STUCK_S, TortureRun
    from onceflow_dev.torture.stream import StreamMix, StreamPlan
    from tests.livejob import new_topic

    topic = new_topic(kafka_bootstrap, partitions=1)
    run = TortureRun.__new__(TortureRun)  # only the producing side: no job, no sink
    run.setup = types.SimpleNamespace(bootstrap="127.0.0.1:1", topic=topic.topic)
    run.delivery_failures, run.good_delivered, run._purged, run._retired = [], 0, [], []
    run._broker_away, run._broker_back_at, run._last_delivery_at = False, 0.0, time.monotonic()
    said = []
    run.say = said.append
    stuck = run._new_producer()
    plan = StreamPlan("stuck", 1, StreamMix(), seed=4)
    planned = [plan.next(int(time.time() * 1000)) for _ in range(5)]
    for each in planned:
        run._send(stuck, each)
    assert run._unstuck(stuck) is stuck  # not quiet for long yet
    run._last_delivery_at -= PRODUCER_STUCK_S + 1
    run._broker_away = True
    assert run._unstuck(stuck) is stuck  # the broker restarting: it may be waiting for it
    run._broker_away = False
    run.setup.bootstrap = kafka_bootstrap
    fresh = run._unstuck(stuck)
    assert fresh is not stuck and fresh.flush(30) == 0
    assert [each.offset for each in planned] == [0, 1, 2, 3, 4] and run.delivery_failures == []
    assert said == [f"the producer delivered nothing for {PRODUCER_STUCK_S}s with the broker up: its 5 queued "
                    "record(s) sent again through a new one"]
