"""The standalone Flink cluster is a real Flink 1.19 with a TaskManager and slots.

Running a pipeline on it goes through the job server started with
ONCEFLOW_FLINK_MASTER=<this master>; the session's flink_job_endpoint uses the
embedded Flink, so that combination is checked by hand, not here.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from onceflow_dev.devstack import flink, flink_cluster

pytestmark = [pytest.mark.flink, pytest.mark.slow]


def test_cluster_has_a_taskmanager_with_slots(flink_cluster_master):
    with urllib.request.urlopen(f"http://{flink_cluster_master}/overview", timeout=10) as response:
        overview = json.loads(response.read())
    assert overview["flink-version"] == flink.FLINK_VERSION
    assert overview["taskmanagers"] == 1 and overview["slots-total"] == 2
    with urllib.request.urlopen(f"http://{flink_cluster_master}/taskmanagers", timeout=10) as response:
        managers = json.loads(response.read())["taskmanagers"]
    assert managers[0]["path"].startswith("pekko.tcp://flink@127.0.0.1:")
    assert flink_cluster.status()["healthy"] is True
    assert flink_cluster.up() is False
