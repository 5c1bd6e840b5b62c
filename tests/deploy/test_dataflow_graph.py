"""The aggregate pipeline's Dataflow job graph, built offline and never submitted.

Here (no ``apache-beam[gcp]``) the graph goes through the steps DataflowRunner
takes before it needs its client (see ``dataflow_graph.py``); ``test_sdist.py``
repeats this in a fresh virtual environment with ``[gcp]``, where DataflowRunner
itself builds the job description with ``--dry_run``.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = HERE / "dataflow_graph.py"
IMAGE = "europe-west1-docker.pkg.dev/my-project/onceflow/onceflow:test"
DATAFLOW_FLAGS = [
    "--runner=DataflowRunner", "--project=my-project", "--region=europe-west1",
    "--temp_location=gs://my-bucket/tmp", f"--sdk_container_image={IMAGE}", "--sdk_location=container",
    "--sink=bigquery://my-project.analytics.order_aggregates", "--dlq=kafka://broker-1:9092/orders-dlq",
]
EXPECTED = ["AggregateBatches", "WriteRows", "WriteDeadLetters"]


def build_graph(python: str, out: pathlib.Path, flags, cwd: pathlib.Path) -> dict:
    result = subprocess.run([python, str(SCRIPT), str(out), *flags], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


def unpickle_in_a_fresh_interpreter(python: str, proto: pathlib.Path, cwd: pathlib.Path) -> dict:
    result = subprocess.run([python, str(SCRIPT), "--unpickle", str(proto)], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_graph(summary: dict, source: str) -> None:
    assert summary["top_level"] == [source, *EXPECTED], summary["top_level"]
    assert summary["container_images"] == [IMAGE]
    assert summary["environment_urns"] == ["beam:env:docker:v1"]


def test_file_input_graph_for_dataflow(tmp_path):
    summary = build_graph(sys.executable, tmp_path / "graph", DATAFLOW_FLAGS, tmp_path)
    check_graph(summary, "ReadFiles")
    assert summary["unbounded_outputs"] == []
    assert "WriteRows/WriteToBigQuery" in summary["all"]
    counts = unpickle_in_a_fresh_interpreter(sys.executable, tmp_path / "graph" / "pipeline.pb", tmp_path)
    assert counts["dofn"] > 5


def test_kafka_input_graph_for_dataflow_is_streaming(tmp_path):
    flags = [*DATAFLOW_FLAGS, "--input=kafka://broker-1:9092/orders"]
    summary = build_graph(sys.executable, tmp_path / "graph", flags, tmp_path)
    check_graph(summary, "ReadKafka")
    assert any(name.startswith("ReadKafka/") for name in summary["unbounded_outputs"]), summary
    counts = unpickle_in_a_fresh_interpreter(sys.executable, tmp_path / "graph" / "pipeline.pb", tmp_path)
    assert counts["dofn"] > 5


def test_the_proto_round_trips(tmp_path):
    from apache_beam.portability.api import beam_runner_api_pb2

    build_graph(sys.executable, tmp_path / "graph", DATAFLOW_FLAGS, tmp_path)
    raw = (tmp_path / "graph" / "pipeline.pb").read_bytes()
    proto = beam_runner_api_pb2.Pipeline.FromString(raw)
    assert proto.SerializeToString(deterministic=True) == \
        beam_runner_api_pb2.Pipeline.FromString(proto.SerializeToString()).SerializeToString(deterministic=True)
    for transform in proto.components.transforms.values():
        assert transform.unique_name
        transform.spec.SerializeToString()


@pytest.mark.parametrize("flag", ["--window=banana", "--sink=bigquery://p.d.t"])
def test_a_bad_flag_fails_before_any_graph(tmp_path, flag):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "g"), *DATAFLOW_FLAGS, flag],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "UsageError" in result.stderr
    assert not (tmp_path / "g" / "pipeline.pb").exists()
