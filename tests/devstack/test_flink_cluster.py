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


def test_an_embedded_job_servers_jobs_are_looked_for_on_the_cluster_too(tmp_path, monkeypatch):
    """A job given ``--flink_master`` runs on the cluster although the job server's
    own master is ``[local]``: cancelling by name must look there as well (a left
    job kept restarting and holding a slot)."""
    monkeypatch.setenv("ONCEFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("ONCEFLOW_FLINK_MASTER", raising=False)
    folder = tmp_path / "flink"
    folder.mkdir()
    (folder / "jobserver.master").write_text("[local]\n", encoding="utf-8")
    (folder / "jobserver.log").write_text("INFO ... Rest endpoint listening at localhost:40001\n", encoding="utf-8")
    assert flink.flink_rest_endpoints() == ["127.0.0.1:40001", flink_cluster.master()]
