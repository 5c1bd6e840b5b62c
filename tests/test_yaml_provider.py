"""onceflow's transforms in Beam YAML: the example pipeline against the main job,
and the transforms by name from Python."""

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("jinja2", reason="Beam YAML needs the yaml extra: pip install -e .[yaml]")

import apache_beam as beam  # noqa: E402

from onceflow.io.dlq.jsonl import read_dead_letters  # noqa: E402
from onceflow.options import SAMPLE_INPUT  # noqa: E402
from onceflow import yaml_provider  # noqa: E402
from tests.pipelines.test_aggregate_job import table_rows  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "templates" / "yaml" / "aggregate.yaml"


def dead_letters(path):
    """Each envelope once, without the wall-clock failed_at."""
    return sorted(json.dumps({k: v for k, v in envelope.items() if k != "failed_at"}, sort_keys=True)
                  for envelope in read_dead_letters(str(path)))


def run_module(*args):
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_yaml_example_matches_the_main_job(tmp_path):
    """templates/yaml/aggregate.yaml run by Beam's YAML runner gives the main job's
    rows and dead letters on the same input (the sample has duplicates, malformed
    records and too-late events)."""
    run_module("onceflow.pipelines.aggregate", "--input", SAMPLE_INPUT,
               "--sink", f"sqlite:///{tmp_path}/job.db", "--dlq", str(tmp_path / "job-dlq.jsonl"))
    variables = {"input": SAMPLE_INPUT, "sink": f"sqlite:///{tmp_path}/yaml.db",
                 "dlq": str(tmp_path / "yaml-dlq.jsonl")}
    run_module("apache_beam.yaml.main", f"--yaml_pipeline_file={EXAMPLE}",
               f"--jinja_variables={json.dumps(variables)}")

    job_rows = table_rows(tmp_path / "job.db")
    assert len(job_rows) > 100
    assert table_rows(tmp_path / "yaml.db") == job_rows
    job_letters = dead_letters(tmp_path / "job-dlq.jsonl")
    assert any('"too_late"' in letter for letter in job_letters)
    assert dead_letters(tmp_path / "yaml-dlq.jsonl") == job_letters


LINES = [
    '{"order_id": "a", "event_time": "2026-11-02T10:00:05Z", "store": "s1", "qty": 2}',
    '{"order_id": "a", "event_time": "2026-11-02T10:00:05Z", "store": "s1", "qty": 2}',
    '{"order_id": "b", "event_time": "2026-11-02T10:00:50Z", "store": "s1", "qty": 3}',
    '{"order_id": "c", "event_time": "2026-11-02T10:01:10Z", "store": "s2", "qty": 1.5}',
    'not json',
]
START = 1_793_613_600_000  # 2026-11-02T10:00:00Z


def test_transforms_by_name_from_python(tmp_path):
    """Lines as Beam YAML's Create gives them (rows with a `line` field), through
    the per-event transforms by name and through the batched AggregateRecords:
    the same rows, and the malformed line dead-lettered."""
    from apache_beam.yaml.yaml_transform import YamlTransform

    elements = "\n".join(f"          - line: {json.dumps(line)}" for line in LINES)
    spec = f"""
    type: composite
    transforms:
      - type: Create
        name: Lines
        config:
          elements:
{elements}
      - type: ParseEvents
        input: Lines
        config: {{key_fields: store, id_field: order_id, aggregates: "count,sum:qty"}}
      - type: DedupByEventId
        input: ParseEvents.events
        config: {{horizon: 6m}}
      - type: WindowedAggregate
        input: DedupByEventId
        config: {{key_fields: store, window: 60s, aggregates: "count,sum:qty", dedup: false}}
      - type: WriteRows
        input: WindowedAggregate.rows
        config: {{sink: "sqlite:///{tmp_path}/per_event.db", key_fields: store, aggregates: "count,sum:qty"}}
      - type: AggregateRecords
        input: Lines
        config: {{key_fields: store, id_field: order_id, window: 60s, aggregates: "count,sum:qty"}}
      - type: WriteRows
        name: WriteBatched
        input: AggregateRecords.rows
        config: {{sink: "sqlite:///{tmp_path}/batched.db", key_fields: store, aggregates: "count,sum:qty"}}
      - type: WriteDeadLetters
        input: [ParseEvents.dead_letters, WindowedAggregate.dead_letters]
        config: {{dlq: "{tmp_path}/dlq.jsonl"}}
    """
    with beam.Pipeline() as pipeline:
        _ = pipeline | YamlTransform(spec, providers=yaml_provider.provider())

    rows = table_rows(tmp_path / "per_event.db")
    assert [dict(row) for row in rows] == [
        {"store": "s1", "window_start": "2026-11-02T10:00:00.000Z", "window_end": "2026-11-02T10:01:00.000Z",
         "event_count": 2, "count": 2, "sum_qty": 5},
        {"store": "s2", "window_start": "2026-11-02T10:01:00.000Z", "window_end": "2026-11-02T10:02:00.000Z",
         "event_count": 1, "count": 1, "sum_qty": 1.5},
    ]
    assert table_rows(tmp_path / "batched.db") == rows
    letters = list(read_dead_letters(str(tmp_path / "dlq.jsonl")))
    assert [(e["reason"], e["stage"], e["raw_preview"], e["pipeline"]) for e in letters] == [
        ("malformed_json", "parse", "not json", "yaml")]


@pytest.mark.parametrize("transform, config, words", [
    ("WindowedAggregate", {"key_fields": "store", "window": "60", "aggregates": "count"}, "window"),
    ("WindowedAggregate", {"key_fields": "store", "window": "60s", "aggregates": "total:qty"}, "unknown aggregate"),
    ("DedupByEventId", {"horizon": "0"}, "horizon"),
    ("WriteRows", {"sink": "mysql://x/y", "key_fields": "store", "aggregates": "count"}, "unknown scheme"),
    ("WindowedAggregate", {"key_fields": "store", "window": "60s", "aggregates": "count", "dedup": "maybe"},
     "dedup: 'maybe' is not true or false"),
    ("ReadRecordsFromFiles", {"path": "/nonexistent/orders-*.jsonl", "key_fields": "store"},
     "path: nothing matches '/nonexistent/orders-\\*.jsonl'"),
])
def test_plain_yaml_configuration_is_checked(transform, config, words):
    with pytest.raises(ValueError, match=words):
        yaml_provider.TRANSFORMS[transform](**config)


def test_a_quoted_false_turns_dedup_off():
    """dedup: "false" (quoted in YAML) left dedup on: bool("false") is true."""
    for text, on in (("false", False), ("False", False), ("no", False), ("true", True), (False, False)):
        aggregate = yaml_provider.TRANSFORMS["WindowedAggregate"](key_fields="store", window="60s",
                                                                  aggregates="count", dedup=text)
        assert aggregate._dedup is on


def test_the_example_registers_every_transform():
    import yaml

    spec = yaml.safe_load(EXAMPLE.read_text())
    assert spec["providers"] == [yaml_provider.provider_spec()]
