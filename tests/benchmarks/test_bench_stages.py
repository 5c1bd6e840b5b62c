"""The stage benchmark computes the right rows (no services needed): its figures
are only worth something if the stages it times do the job's work."""

import importlib.util
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, _ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_stages_write_the_truth_to_sqlite(tmp_path):
    stages, kafka = _load("bench_stages"), _load("bench_kafka")
    path, db = tmp_path / "events.jsonl", tmp_path / "out.db"
    stages.write_events(str(path), 3000, 20)
    timings = stages.stages(str(path), shards=3, db=str(db))
    with open(path, "rb") as handle:
        truth = kafka.truth_from_lines(handle)
    assert [name for name, _, _ in timings] == [
        "split into lines", "decode", "screen and split", "aggregate into rows", "upsert into SQLite"]
    assert timings[0][2] == truth.records > 3000  # every line, re-sends included
    assert timings[-1][2] == len(truth.table)
    assert kafka.compare(truth.table, kafka.read_sink(str(db))).exact
