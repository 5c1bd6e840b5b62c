"""The sdist that ``--setup_file ./setup.py`` builds holds the whole package and
installs into a clean virtual environment, where the main job runs.

The sdist is built the way Beam's stager falls back to when ``build`` is absent
(``python setup.py sdist``), with the egg-info redirected under tmp_path so the
source tree is not touched. uv installs it and its dependencies (the same
versions pip resolves) into a fresh venv from uv's cache in a few seconds, where
pip took 40 s to 2 min on a 2-core machine (mostly unpacking and compiling); the
``[gcp]`` extra is added for the last test.
"""

from __future__ import annotations

import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import tarfile

import pytest

from onceflow.versions import BEAM_VERSION, ONCEFLOW_VERSION
from tests.deploy.test_dataflow_graph import DATAFLOW_FLAGS, IMAGE, SCRIPT, check_graph

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[2]
UV = pathlib.Path(sys.executable).parent / "uv"  # the dev extra installs it


def _run(command, cwd, timeout=900):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-4000:])
    return result


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("sdist")
    (out / "egg").mkdir()
    _run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", out / "egg", "sdist", "--dist-dir", out],
         cwd=REPO)
    (archive,) = out.glob("onceflow-*.tar.gz")
    assert archive.name == f"onceflow-{ONCEFLOW_VERSION}.tar.gz"
    return archive


@pytest.fixture(scope="module")
def venv(tmp_path_factory, sdist) -> pathlib.Path:
    """A fresh venv with the sdist installed."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", root / "env"], cwd=root)
    python = root / "env" / "bin" / "python"
    _install(python, str(sdist))
    return python


def _install(python: pathlib.Path, requirement: str) -> None:
    assert UV.exists(), f"{UV} is missing: bash scripts/bootstrap.sh dev installs it"
    _run([UV, "pip", "install", "--quiet", "--python", python, requirement], cwd=python.parent)


def test_sdist_contains_every_module_and_the_sample(sdist):
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "onceflow").rglob("*.py") if "__pycache__" not in path.parts
    }
    assert expected, "no modules found"
    missing = sorted(expected - names)
    assert not missing, f"not in the sdist: {missing}"
    assert "onceflow/sample_data/orders.jsonl" in names
    assert "setup.py" in names and "onceflow/versions.py" in names


def test_the_worker_package_leaves_the_development_tools_out(sdist, venv, tmp_path):
    """The sdist (what --setup_file ships to workers) has no onceflow_dev; installed,
    the main job imports nothing of it, and `onceflow dev` says in one line where
    the tools come from."""
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert not [name for name in names if "onceflow_dev" in name or "/devstack/" in name or "/torture/" in name]
    imported = _run([venv, "-c", "import sys, onceflow.pipelines.aggregate, onceflow.cli; "
                                 "print(sorted(m for m in sys.modules if m.startswith('onceflow_dev')))"],
                    cwd=tmp_path).stdout.strip()
    assert imported == "[]"
    refused = subprocess.run([str(venv.parent / "onceflow"), "dev", "status"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("onceflow dev: the development tools (package onceflow_dev) are not installed "
                                      "here; they come with a source checkout: pip install -e .")


def test_installed_package_is_the_sdist_not_the_source_tree(venv, tmp_path):
    shown = _run([venv, "-c", "import onceflow, apache_beam; print(onceflow.__file__); "
                              "print(apache_beam.__version__)"], cwd=tmp_path).stdout.split()
    assert str(REPO) not in shown[0] and "site-packages" in shown[0]
    assert shown[1] == BEAM_VERSION


def test_main_job_help_works_in_the_fresh_venv(venv, tmp_path):
    result = _run([venv, "-m", "onceflow.pipelines.aggregate", "--help"], cwd=tmp_path)
    assert result.stdout.startswith("usage: python -m onceflow.pipelines.aggregate")
    for flag in ("--input", "--window", "--aggregate", "--sink", "--dlq"):
        assert flag in result.stdout


def test_main_job_runs_on_the_bundled_sample_in_the_fresh_venv(venv, tmp_path):
    _run([venv, "-m", "onceflow.pipelines.aggregate", "--status=off",
          f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={tmp_path}/dlq.jsonl"], cwd=tmp_path)
    with sqlite3.connect(tmp_path / "out.db") as connection:
        (rows,) = connection.execute("SELECT COUNT(*) FROM aggregates").fetchone()
    assert rows > 0
    assert (tmp_path / "dlq.jsonl").read_text().count("\n") > 0


@pytest.fixture(scope="module")
def gcp_venv(venv, sdist) -> pathlib.Path:
    """The same venv with the [gcp] extra, as the image installs it."""
    _install(venv, f"{sdist}[gcp]")
    return venv


def test_dataflow_runner_builds_the_job_offline_with_gcp_installed(gcp_venv, tmp_path):
    """DataflowRunner itself (``--dry_run``) builds the job; nothing is submitted."""
    graph = tmp_path / "graph"
    result = subprocess.run([str(gcp_venv), str(SCRIPT), str(graph), *DATAFLOW_FLAGS], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((graph / "summary.json").read_text())
    assert summary["mode"] == "dataflow_job"
    check_graph(summary, "ReadFiles")
    job = json.loads((graph / "job.json").read_text())
    assert job["type"] == "JOB_TYPE_BATCH"
    (pool,) = job["environment"]["workerPools"]
    assert pool["workerHarnessContainerImage"] == IMAGE
    assert [image["containerImage"] for image in pool["sdkHarnessContainerImages"]] == [IMAGE]
    options = job["environment"]["sdkPipelineOptions"]["options"]
    assert options["sink"] == "bigquery://my-project.analytics.order_aggregates"
    assert options["window"] == "1m"
