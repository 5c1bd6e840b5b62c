"""The aggregate pipeline submitted to a standalone Flink cluster over its REST address.

What runs where: the dev stack's ``flink-cluster`` (a Flink 1.19 JobManager and
TaskManager, REST 127.0.0.1:18081) executes the job; a second Beam 2.62 Flink job
server, started here with its own ONCEFLOW_HOME under tmp_path (reusing the jar
cache) and ``--flink-master=<cluster REST>`` (the ``cluster_job_endpoint`` fixture
of ``tests/conftest.py``), translates it and submits it there; the shared job
server (embedded Flink) is left alone. Python SDK workers run in
the submitting process (``--environment_type=LOOPBACK``), which the TaskManager
reaches on 127.0.0.1. The rows must equal a local DirectRunner run's.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import urllib.request

import pytest

from onceflow.options import SAMPLE_INPUT

pytestmark = [pytest.mark.flink, pytest.mark.slow]

REPO = pathlib.Path(__file__).resolve().parents[2]


def _finished_jobs(master: str) -> dict:
    with urllib.request.urlopen(f"http://{master}/jobs/overview", timeout=10) as response:
        jobs = json.loads(response.read())["jobs"]
    return {job["jid"]: job for job in jobs if job["state"] == "FINISHED"}


def _run_aggregate(cwd: pathlib.Path, db: pathlib.Path, *runner_flags: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "onceflow.pipelines.aggregate", "--status=off", f"--input={cwd / 'orders.jsonl'}",
         f"--sink=sqlite:///{db}", f"--dlq={db.with_suffix('.dlq.jsonl')}", *runner_flags],
        cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def _rows(db: pathlib.Path) -> list:
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        rows = [dict(row) for row in connection.execute("SELECT * FROM aggregates")]
    for row in rows:
        row.pop("written_at", None)
    return sorted(rows, key=lambda row: json.dumps(row, sort_keys=True))


def _dead_letter_ids(path: pathlib.Path) -> list:
    return sorted(json.loads(line)["dlq_id"] for line in path.read_text().splitlines() if line.strip())


def test_aggregate_on_the_standalone_cluster_equals_a_local_run(cluster_job_endpoint, flink_cluster_master,
                                                                tmp_path):
    shutil.copy(SAMPLE_INPUT, tmp_path / "orders.jsonl")
    before = _finished_jobs(flink_cluster_master)
    _run_aggregate(tmp_path, tmp_path / "flink.db", "--runner=PortableRunner",
                   f"--job_endpoint={cluster_job_endpoint}", "--environment_type=LOOPBACK")
    after = _finished_jobs(flink_cluster_master)
    assert len(set(after) - set(before)) == 1, "the job did not finish on the standalone cluster"

    _run_aggregate(tmp_path, tmp_path / "local.db", "--runner=DirectRunner")
    on_flink, local = _rows(tmp_path / "flink.db"), _rows(tmp_path / "local.db")
    assert len(local) > 100
    assert on_flink == local
    assert _dead_letter_ids(tmp_path / "flink.dlq.jsonl") == _dead_letter_ids(tmp_path / "local.dlq.jsonl")
