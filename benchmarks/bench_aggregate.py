"""Throughput of the aggregate job over a JSON-lines file on the local runner.

    python benchmarks/bench_aggregate.py [--events 200000] [--repeat 3] [--keys 1000]

Writes a deterministic file of N orders (1,000 keys by default, 1% re-sends),
runs ``python -m onceflow.pipelines.aggregate`` on it ``--repeat`` times into a
fresh SQLite file, and prints each run's wall time, the median events/s, and the
command to reproduce. Machines are shared and noisy: quote the median.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

START_MS = 1_793_610_000_000


def write_events(path: str, events: int, keys: int) -> None:
    rng = random.Random(42)
    with open(path, "w", encoding="utf-8") as handle:
        t = START_MS
        for n in range(events):
            t += rng.randint(0, 20)
            line = json.dumps({"order_id": f"o{n}", "event_time": t, "store": f"s{rng.randrange(keys)}",
                               "qty": rng.randint(1, 5), "price": round(rng.uniform(1, 10), 2)})
            handle.write(line + "\n")
            if rng.random() < 0.01:
                handle.write(line + "\n")
            if n and n % 100_000 == 0:
                print(f"  generated {n:,} events", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "events.jsonl")
        write_events(data, args.events, args.keys)
        timings = []
        for attempt in range(args.repeat):
            db = os.path.join(tmp, f"out{attempt}.db")
            command = [sys.executable, "-m", "onceflow.pipelines.aggregate", f"--input={data}",
                       f"--sink=sqlite:///{db}", f"--dlq={tmp}/dlq.jsonl"]
            started = time.monotonic()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            elapsed = time.monotonic() - started
            timings.append(elapsed)
            print(f"run {attempt + 1}: {elapsed:.1f}s, {args.events / elapsed:,.0f} events/s")
    median = statistics.median(timings)
    print(f"median: {median:.1f}s, {args.events / median:,.0f} events/s "
          f"({args.events:,} events, {args.keys:,} keys, 1m windows, DirectRunner, {os.cpu_count()} cores)")
    print(f"reproduce: python benchmarks/bench_aggregate.py --events {args.events} --keys {args.keys} "
          f"--repeat {args.repeat}")


if __name__ == "__main__":
    main()
