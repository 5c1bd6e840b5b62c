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
EXPECTED = ["AggregateEvents", "WriteRows", "WriteDeadLetters"]


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
    # A live read also stores its positions in the sink once what they cover is written.
    live = ["KeepPositions"] if source == "ReadKafka" else []
    assert summary["top_level"] == [source, *EXPECTED, *live], summary["top_level"]
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


def read_graph(graph: pathlib.Path):
    """The pipeline proto in ``graph``, its transforms by label, and the leaf
    transform (label, output tag) that produces each PCollection."""
    from apache_beam.portability.api import beam_runner_api_pb2

    proto = beam_runner_api_pb2.Pipeline.FromString((graph / "pipeline.pb").read_bytes())
    transforms = {t.unique_name: t for t in proto.components.transforms.values()}
    producers = {pcollection: (t.unique_name, tag) for t in transforms.values() if not t.subtransforms
                 for tag, pcollection in t.outputs.items()}
    return proto, transforms, producers


def only_input(transform):
    (pcollection,) = transform.inputs.values()
    return pcollection


@pytest.mark.parametrize("live", [False, True], ids=["file_backfill", "kafka_live"])
def test_the_graph_wires_onceflows_steps(tmp_path, live):
    """The steps of the main job, under their labels, wired as the job needs: a
    file backfill groups each shard window and aggregates it once, statelessly; a
    live Kafka read is unbounded all the way and aggregates with the per-shard-window
    state and timers; rows come from AggregatePerShardWindow, dead letters from
    ScreenAndSplit."""
    from apache_beam.portability.api import beam_runner_api_pb2

    flags = [*DATAFLOW_FLAGS, "--input=kafka://broker-1:9092/orders", "--kafka_group=g"] if live \
        else DATAFLOW_FLAGS
    build_graph(sys.executable, tmp_path / "graph", flags, tmp_path)
    proto, transforms, producers = read_graph(tmp_path / "graph")
    pcollections = proto.components.pcollections
    read = "ReadKafka/" if live else "ReadFiles/"
    bounded = beam_runner_api_pb2.IsBounded.UNBOUNDED if live else beam_runner_api_pb2.IsBounded.BOUNDED

    split = producers[only_input(transforms["AggregateEvents/AggregatePerShardWindow"])]
    if live:
        assert split == ("AggregateEvents/ScreenAndSplit/ParDo(_ScreenAndSplitDoFn)", "None")
        assert "AggregateEvents/GroupPerShardWindow" not in transforms
    else:
        assert split == ("AggregateEvents/GroupPerShardWindow", "None")
        assert producers[only_input(transforms["AggregateEvents/GroupPerShardWindow"])][0] == \
            "AggregateEvents/ScreenAndSplit/ParDo(_ScreenAndSplitDoFn)"
    assert producers[only_input(transforms["AggregateEvents"])][0].startswith(read)
    assert producers[only_input(transforms["WriteRows"])][0] == "AggregateEvents/AggregatePerShardWindow"
    assert producers[only_input(transforms["WriteDeadLetters"])] == \
        ("AggregateEvents/ScreenAndSplit/ParDo(_ScreenAndSplitDoFn)", "dead_letters")
    for step in ("AggregateEvents", "AggregateEvents/AggregatePerShardWindow", "WriteRows", "WriteDeadLetters"):
        assert pcollections[only_input(transforms[step])].is_bounded == bounded, step

    aggregate = transforms["AggregateEvents/AggregatePerShardWindow"]
    assert aggregate.spec.urn == "beam:transform:pardo:v1"
    payload = beam_runner_api_pb2.ParDoPayload.FromString(aggregate.spec.payload)
    timers = {name.removeprefix("ts-"): spec.time_domain for name, spec in payload.timer_family_specs.items()}
    if live:
        assert set(payload.state_specs) == {"pending", "panes"}
        assert timers == {"window": beam_runner_api_pb2.TimeDomain.EVENT_TIME,
                          "early": beam_runner_api_pb2.TimeDomain.PROCESSING_TIME}
        assert "beam:requirement:pardo:stateful:v1" in proto.requirements
    else:
        assert not payload.state_specs and not timers


@pytest.mark.parametrize("flag", ["--window=banana", "--sink=bigquery://p.d.t"])
def test_a_bad_flag_fails_before_any_graph(tmp_path, flag):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "g"), *DATAFLOW_FLAGS, flag],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "UsageError" in result.stderr
    assert not (tmp_path / "g" / "pipeline.pb").exists()
