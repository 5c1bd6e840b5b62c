"""Beam's Flink job server (embedded Flink) runs Python 2.77 pipelines, batch and
streaming, through the portable protocol."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.devstack.streaming import run_and_observe

pytestmark = [pytest.mark.flink, pytest.mark.slow]

BATCH = """
import sys
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
out = sys.argv[1]
with beam.Pipeline(options=PipelineOptions(sys.argv[2:])) as p:
    (p | beam.Create(range(1000)) | beam.Map(lambda x: (x % 3, x)) | beam.CombinePerKey(sum)
       | beam.Map(lambda kv: f"{kv[0]} {kv[1]}") | beam.io.WriteToText(out, shard_name_template=""))
"""


def _args(endpoint: str) -> list[str]:
    return ["--runner=PortableRunner", f"--job_endpoint={endpoint}", "--environment_type=LOOPBACK"]


def test_batch_pipeline(flink_job_endpoint, tmp_path):
    out = tmp_path / "sums.txt"
    result = subprocess.run(
        [sys.executable, "-c", BATCH, str(out), *_args(flink_job_endpoint)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sums = dict(line.split() for line in out.read_text().splitlines())
    assert sums == {str(k): str(sum(x for x in range(1000) if x % 3 == k)) for k in range(3)}


def test_streaming_window_fires_before_the_source_ends(flink_job_endpoint, tmp_path):
    run_and_observe(tmp_path, [*_args(flink_job_endpoint), "--streaming"])
