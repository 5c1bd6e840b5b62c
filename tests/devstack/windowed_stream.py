"""A small streaming pipeline used by the Prism and Flink tests (run as a script).

An unbounded source (PeriodicImpulse, one element every 0.5 s for ``--duration``
seconds, starting on an even second) feeds 2-second fixed windows and a
GroupByKey; each window's result is written as ``window-<start>.json`` (written
to a temporary name, then renamed) the moment the runner emits it. Before the
pipeline runs, ``source.json`` records when the source starts and stops, so a
test can prove a window came out while the source was still producing.

    python windowed_stream.py --output_dir DIR --duration 20 -- <pipeline flags>
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms import window
from apache_beam.transforms.periodicsequence import PeriodicImpulse

WINDOW_SECONDS = 2
INTERVAL_SECONDS = 0.5


def write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle)
    os.replace(tmp, path)


class WriteWindow(beam.DoFn):
    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir

    def process(self, element, win=beam.DoFn.WindowParam):
        _key, values = element
        start = float(win.start)
        write_json(
            os.path.join(self.output_dir, f"window-{int(start)}.json"),
            {"start": start, "end": float(win.end), "count": len(list(values)), "written_at": time.time()},
        )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--duration", type=int, default=20)
    known, pipeline_args = parser.parse_known_args(argv)
    start = float(math.ceil(time.time() / WINDOW_SECONDS) * WINDOW_SECONDS)
    stop = start + known.duration
    write_json(os.path.join(known.output_dir, "source.json"), {"start": start, "stop": stop})
    options = PipelineOptions(pipeline_args)
    with beam.Pipeline(options=options) as pipeline:
        (
            pipeline
            | PeriodicImpulse(start_timestamp=start, stop_timestamp=stop, fire_interval=INTERVAL_SECONDS)
            | beam.WindowInto(window.FixedWindows(WINDOW_SECONDS))
            | beam.Map(lambda _ts: ("all", 1))
            | beam.GroupByKey()
            | beam.ParDo(WriteWindow(known.output_dir))
        )


if __name__ == "__main__":
    main(sys.argv[1:])
