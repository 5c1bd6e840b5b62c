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


# One event ID under two keys, another in two windows of one key: four events the
# job counts (dedup is per key and window), the per-event transforms two.
SHARED_IDS = [
    '{"order_id": "x1", "event_time": "2026-11-02T10:00:05Z", "store": "s1", "qty": 1, "price": 1.5}',
    '{"order_id": "x1", "event_time": "2026-11-02T10:00:05Z", "store": "s2", "qty": 2, "price": 2.5}',
    '{"order_id": "x2", "event_time": "2026-11-02T10:00:10Z", "store": "s1", "qty": 3, "price": 3.5}',
    '{"order_id": "x2", "event_time": "2026-11-02T10:03:10Z", "store": "s1", "qty": 4, "price": 4.5}',
]


@pytest.mark.parametrize("input_name", ["sample", "shared-ids"])
def test_yaml_example_matches_the_main_job(tmp_path, input_name):
    """templates/yaml/aggregate.yaml run by Beam's YAML runner gives the main job's
    rows and dead letters on the same input: the sample (duplicates, malformed
    records and too-late events), and event IDs shared by other keys and windows."""
    source = SAMPLE_INPUT
    if input_name == "shared-ids":
        source = str(tmp_path / "shared.jsonl")
        pathlib.Path(source).write_text("\n".join(SHARED_IDS) + "\n", encoding="utf-8")
    run_module("onceflow.pipelines.aggregate", "--input", source,
               "--sink", f"sqlite:///{tmp_path}/job.db", "--dlq", str(tmp_path / "job-dlq.jsonl"))
    variables = {"input": source, "sink": f"sqlite:///{tmp_path}/yaml.db",
                 "dlq": str(tmp_path / "yaml-dlq.jsonl")}
    run_module("apache_beam.yaml.main", f"--yaml_pipeline_file={EXAMPLE}",
               f"--jinja_variables={json.dumps(variables)}")

    job_rows = table_rows(tmp_path / "job.db")
    assert len(job_rows) > 100 if input_name == "sample" else len(job_rows) == 3
    assert table_rows(tmp_path / "yaml.db") == job_rows
    job_letters = dead_letters(tmp_path / "job-dlq.jsonl")
    if input_name == "sample":
        assert any('"too_late"' in letter for letter in job_letters)
    assert dead_letters(tmp_path / "yaml-dlq.jsonl") == job_letters


def test_avro_files_through_yaml_match_the_main_job(tmp_path):
    """An Avro container file through ReadRecordsFromFiles (its format and schema
    taken from the file, as the job takes them) and AggregateRecords (the schema
    from the same file), and through the per-event ParseEvents | WindowedAggregate
    (a JSON schema file): the job's rows, and its dead letter for the bad record."""
    import fastavro
    from apache_beam.yaml.yaml_transform import YamlTransform

    schema = {"type": "record", "name": "Order", "fields": [
        {"name": "order_id", "type": "string"}, {"name": "event_time", "type": "string"},
        {"name": "store", "type": "string"}, {"name": "qty", "type": "long"}]}
    records = [json.loads(line) for line in LINES[:4]]
    records.insert(2, {**records[0], "order_id": "bad", "event_time": "yesterday"})
    path = tmp_path / "orders.avro"
    with open(path, "wb") as handle:
        fastavro.writer(handle, fastavro.parse_schema(schema), [{**r, "qty": int(r["qty"])} for r in records])
    (tmp_path / "order.avsc").write_text(json.dumps(schema), encoding="utf-8")
    run_module("onceflow.pipelines.aggregate", f"--input={path}", "--aggregate=count,sum:qty",
               f"--sink=sqlite:///{tmp_path}/job.db", f"--dlq={tmp_path}/job-dlq.jsonl", "--status=off")

    spec = f"""
    type: composite
    transforms:
      - type: ReadRecordsFromFiles
        name: Read
        config: {{path: "{path}", key_fields: store, id_field: order_id, aggregates: "count,sum:qty"}}
      - type: AggregateRecords
        input: Read
        config: {{key_fields: store, id_field: order_id, window: 60s, aggregates: "count,sum:qty",
                  input_format: avro, avro_schema: "{path}"}}
      - type: WriteRows
        input: AggregateRecords.rows
        config: {{sink: "sqlite:///{tmp_path}/batched.db", key_fields: store, aggregates: "count,sum:qty"}}
      - type: WriteDeadLetters
        input: AggregateRecords.dead_letters
        config: {{dlq: "{tmp_path}/batched-dlq.jsonl", pipeline: aggregate}}
      - type: ParseEvents
        input: Read
        config: {{key_fields: store, id_field: order_id, aggregates: "count,sum:qty", input_format: avro,
                  avro_schema: "{tmp_path}/order.avsc"}}
      - type: WindowedAggregate
        input: ParseEvents.events
        config: {{key_fields: store, window: 60s, aggregates: "count,sum:qty"}}
      - type: WriteRows
        name: WritePerEvent
        input: WindowedAggregate.rows
        config: {{sink: "sqlite:///{tmp_path}/per_event.db", key_fields: store, aggregates: "count,sum:qty"}}
    """
    with beam.Pipeline() as pipeline:
        _ = pipeline | YamlTransform(spec, providers=yaml_provider.provider())

    job_rows = table_rows(tmp_path / "job.db")
    assert [(row["store"], row["event_count"], row["sum_qty"]) for row in map(dict, job_rows)] == [
        ("s1", 2, 5), ("s2", 1, 1)]
    assert table_rows(tmp_path / "batched.db") == job_rows
    assert table_rows(tmp_path / "per_event.db") == job_rows
    assert dead_letters(tmp_path / "batched-dlq.jsonl") == dead_letters(tmp_path / "job-dlq.jsonl")
    assert [e["reason"] for e in read_dead_letters(str(tmp_path / "job-dlq.jsonl"))] == ["bad_timestamp"]


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


def test_dedup_keeps_the_first_copy_in_the_file(tmp_path):
    """Two copies of one order that differ (a producer's mistake): DedupByEventId
    kept the one with the least raw bytes (it dropped the rows' sources), not the
    first in the file as the Python transform and the job keep."""
    from apache_beam.yaml.yaml_transform import YamlTransform

    first = {"order_id": "o1", "event_time": START + 1_000, "store": "s1", "qty": 9}
    (tmp_path / "in.jsonl").write_text(json.dumps(first) + "\n" + json.dumps({**first, "qty": 1}) + "\n")
    spec = f"""
    type: composite
    transforms:
      - type: ReadRecordsFromFiles
        config: {{path: "{tmp_path}/in.jsonl", key_fields: store, id_field: order_id, aggregates: "count,sum:qty"}}
      - type: ParseEvents
        input: ReadRecordsFromFiles
        config: {{key_fields: store, id_field: order_id, aggregates: "count,sum:qty"}}
      - type: DedupByEventId
        input: ParseEvents.events
        config: {{horizon: 6m}}
      - type: WindowedAggregate
        input: DedupByEventId
        config: {{key_fields: store, window: 60s, aggregates: "count,sum:qty", dedup: false}}
      - type: WriteRows
        input: WindowedAggregate.rows
        config: {{sink: "sqlite:///{tmp_path}/out.db", key_fields: store, aggregates: "count,sum:qty"}}
    """
    with beam.Pipeline() as pipeline:
        _ = pipeline | YamlTransform(spec, providers=yaml_provider.provider())
    assert [(dict(row)["event_count"], dict(row)["sum_qty"]) for row in table_rows(tmp_path / "out.db")] == [(1, 9)]


@pytest.mark.parametrize("second, words", [
    # other key fields than ParseEvents'
    ({"type": "WindowedAggregate", "input": "Parse.events",
      "config": {"key_fields": "sku", "window": "60s", "aggregates": "count"}},
     "WindowedAggregate: its input rows have no 'sku' .*give it ParseEvents' events, with the same key_fields"),
    # raw lines where events are wanted
    ({"type": "WindowedAggregate", "input": "Lines", "config": {"key_fields": "store", "window": "60s",
                                                                "aggregates": "count"}},
     "WindowedAggregate: its input rows have no 'event_id'"),
    ({"type": "DedupByEventId", "input": "Lines", "config": {"horizon": "6m"}},
     "DedupByEventId: its input rows have no 'event_id'"),
    ({"type": "WriteDeadLetters", "input": "Lines", "config": {"dlq": "{tmp}/dlq.jsonl"}},
     "WriteDeadLetters: its input rows have no 'reason', 'stage', 'raw'"),
    # aggregates the rows do not hold
    ({"type": "WriteRows", "input": "Aggregate.rows",
      "config": {"sink": "sqlite:///{tmp}/x.db", "key_fields": "store", "aggregates": "count,max:price"}},
     "WriteRows: its input rows have no 'max_price'"),
    # a field: the rows do not have
    ({"type": "ParseEvents", "input": "Lines", "config": {"key_fields": "store", "field": "text"}},
     "ParseEvents: its input rows have no 'text'"),
])
def test_transforms_chained_with_other_settings_are_refused_when_built(tmp_path, second, words):
    """Settings that do not fit the transform before failed in every worker with a
    KeyError or AttributeError; the rows' schema is known when the pipeline is
    built, so each is one error there."""
    import yaml
    from apache_beam.yaml.yaml_transform import YamlTransform

    spec = {"type": "composite", "transforms": [
        {"type": "Create", "name": "Lines", "config": {"elements": [{"line": line} for line in LINES]}},
        {"type": "ParseEvents", "name": "Parse", "input": "Lines",
         "config": {"key_fields": "store", "id_field": "order_id", "aggregates": "count,sum:qty"}},
        {"type": "WindowedAggregate", "name": "Aggregate", "input": "Parse.events",
         "config": {"key_fields": "store", "window": "60s", "aggregates": "count,sum:qty"}},
        json.loads(json.dumps(second).replace("{tmp}", str(tmp_path))),
    ]}
    with pytest.raises(Exception, match=words):
        with beam.Pipeline() as pipeline:
            _ = pipeline | YamlTransform(yaml.safe_dump(spec), providers=yaml_provider.provider())


def test_values_the_events_do_not_hold_are_named(tmp_path):
    """ParseEvents decodes only its own aggregates' value fields: a WindowedAggregate
    summing another field failed with KeyError 'qty' in a worker."""
    import yaml
    from apache_beam.yaml.yaml_transform import YamlTransform

    spec = {"type": "composite", "transforms": [
        {"type": "Create", "name": "Lines", "config": {"elements": [{"line": line} for line in LINES]}},
        {"type": "ParseEvents", "name": "Parse", "input": "Lines",
         "config": {"key_fields": "store", "id_field": "order_id"}},
        {"type": "WindowedAggregate", "name": "Aggregate", "input": "Parse.events",
         "config": {"key_fields": "store", "window": "60s", "aggregates": "count,sum:qty"}},
    ]}
    with pytest.raises(Exception, match="WindowedAggregate: an event row holds no value 'qty': give ParseEvents"):
        with beam.Pipeline() as pipeline:
            _ = pipeline | YamlTransform(yaml.safe_dump(spec), providers=yaml_provider.provider())


@pytest.mark.parametrize("transform, config, words", [
    ("WindowedAggregate", {"key_fields": "store", "window": "60", "aggregates": "count"}, "window"),
    ("WindowedAggregate", {"key_fields": "store", "window": "60s", "aggregates": "total:qty"}, "unknown aggregate"),
    ("DedupByEventId", {"horizon": "0"}, "horizon"),
    ("WriteRows", {"sink": "mysql://x/y", "key_fields": "store", "aggregates": "count"}, "unknown scheme"),
    ("WindowedAggregate", {"key_fields": "store", "window": "60s", "aggregates": "count", "dedup": "maybe"},
     "dedup: 'maybe' is not true or false"),
    ("ReadRecordsFromFiles", {"path": "/nonexistent/orders-*.jsonl", "key_fields": "store"},
     "path: nothing matches '/nonexistent/orders-\\*.jsonl'"),
    ("ReadRecordsFromFiles", {"path": SAMPLE_INPUT, "key_fields": "store", "input_format": "avro"},
     "is not an Avro container file .*; for JSON lines give input_format=json"),
    ("AggregateRecords", {"key_fields": "store", "window": "60s", "aggregates": "count", "input_format": "avro"},
     "input_format avro: give avro_schema"),
    ("ParseEvents", {"key_fields": "store", "avro_schema": SAMPLE_INPUT}, "neither an Avro container file nor"),
    ("AggregateRecords", {"key_fields": "store", "window": "60s", "aggregates": "count", "allowed_lateness": ""},
     "allowed_lateness: '' is not a duration"),
    ("WindowedAggregate", {"key_fields": "store", "window": "4000000d", "aggregates": "count"},
     "window: 4000000d is longer than the span from 1970, where windows are aligned, to the year 9999"),
    ("AggregateRecords", {"key_fields": "store", "window": "60s", "aggregates": "count", "shards": "many"},
     "shards: 'many' is not a positive whole number"),
    ("WriteRows", {"sink": "kafka://127.0.0.1:9/rows?format=avro_registry", "key_fields": "store",
                   "aggregates": "count"}, "sink: \\?format=avro_registry needs a schema registry"),
    ("WriteDeadLetters", {"dlq": "kafka://127.0.0.1:9/dlq?format=avro_registry"},
     "dlq: \\?format=avro_registry needs a schema registry"),
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
