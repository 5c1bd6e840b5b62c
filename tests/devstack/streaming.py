"""Run windowed_stream.py under a runner and watch its output (shared by the
Prism and Flink tests)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

from onceflow_dev.devstack.common import wait_until

SCRIPT = pathlib.Path(__file__).with_name("windowed_stream.py")
DURATION = 20  # seconds the source produces
WINDOW = 2
PER_WINDOW = 4  # one element every 0.5 s


def windows(output: pathlib.Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(output.glob("window-*.json"))]


def run_and_observe(output: pathlib.Path, pipeline_args: list[str], startup_timeout: float = 90) -> None:
    """Run the pipeline; assert a window's result appears while the source still
    produces and the pipeline still runs, then that every window is complete."""
    log = output / "pipeline.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--output_dir", str(output), "--duration", str(DURATION),
             *pipeline_args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: bool(windows(output)),
            startup_timeout,
            "the first window's result",
            alive=lambda: process.poll() is None,
            log=log,
        )
        observed_at = time.time()
        still_running = process.poll() is None
        source = json.loads((output / "source.json").read_text())
        first = windows(output)[0]
        assert still_running, "the pipeline had already finished"
        assert observed_at < source["stop"] - WINDOW, "the source had already stopped producing"
        assert first["written_at"] < source["stop"] - WINDOW
        assert first["count"] == PER_WINDOW
        assert process.wait(timeout=DURATION + 120) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    results = windows(output)
    assert [w["start"] for w in results] == [source["start"] + WINDOW * i for i in range(DURATION // WINDOW)]
    assert all(w["count"] == PER_WINDOW for w in results), results
