"""Prism, built at the pinned Beam version, runs a streaming pipeline for real:
a windowed GroupByKey emits while its unbounded source still produces."""

from __future__ import annotations

import subprocess

import pytest

from onceflow_dev import devstack
from onceflow.versions import BEAM_VERSION
from tests.devstack.streaming import run_and_observe

pytestmark = [pytest.mark.prism, pytest.mark.slow]


def test_prism_binary(prism_path):
    assert prism_path == devstack.prism_location()
    assert f"prism-{BEAM_VERSION}" in prism_path
    assert subprocess.run([prism_path, "--help"], capture_output=True, timeout=30).returncode == 0


def test_streaming_window_fires_before_the_source_ends(prism_path, tmp_path):
    run_and_observe(tmp_path, ["--runner=PrismRunner", f"--prism_location={prism_path}", "--streaming"])
