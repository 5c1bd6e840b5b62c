"""CPU time of onceflow's own per-batch code, stage by stage, without Beam.

    python benchmarks/bench_stages.py [--events 1000000] [--repeat 5] [--keys 1000]

Writes the workload of bench_aggregate.py (N orders, 1% exact re-sends) to a
JSON-lines file, then runs, in this process and in order, what the file
backfill's steps run per batch: splitting the file into lines, decoding them
with the event contract (and the high water per record), screening and
splitting each batch by (shard, window), deduplicating and aggregating each
shard window's sub-batches into rows, and upserting the rows into SQLite. No Beam runner is involved: the figures are the floor of the
job's own work, and their sum against the job's run time is what Beam costs
(bench_kafka.py measures the whole job).

Each stage is timed in CPU seconds (time.process_time), the least of
``--repeat`` runs (these machines are shared and noisy: the least is the work,
the rest is noise); records/s is events in the file over that time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_aggregate import write_events  # noqa: E402

from onceflow.aggregates import parse_aggregates, value_fields  # noqa: E402
from onceflow.batches import FILE_LINES, RecordBatch, decode_values, high_waters  # noqa: E402
from onceflow.events import EventContract  # noqa: E402
from onceflow.io.files import BATCH_RECORDS, _json_line_slices  # noqa: E402
from onceflow.io.sqlite import _SqliteUpsertDoFn  # noqa: E402
from onceflow.rows import RowSchema  # noqa: E402
from onceflow.transforms.batched import (  # noqa: E402
    DEFAULT_SHARDS, _AggregateShardWindowDoFn, _ScreenAndSplitDoFn,
)
from onceflow.windowing import WindowSpec  # noqa: E402

AGGREGATES = parse_aggregates("count,sum:qty")
SPEC = WindowSpec(60_000, allowed_lateness_ms=300_000)


def stages(path: str, shards: int, db: str) -> List[Tuple[str, float, int]]:
    """(stage, CPU seconds, items out) for each stage, run once over the file."""
    contract = EventContract(id_field="order_id", time_field="event_time", key_fields=("store",),
                             value_fields=value_fields(AGGREGATES))
    timings: List[Tuple[str, float, int]] = []

    def timed(name: str, work: Callable[[], Any], count: Callable[[Any], int]) -> Any:
        start = time.process_time()
        result = work()
        timings.append((name, time.process_time() - start, count(result)))
        return result

    with open(path, "rb") as handle:
        slices = timed("split into lines", lambda: list(_json_line_slices(handle, BATCH_RECORDS)),
                       lambda out: sum(len(values) for _, values in out))

    def decode() -> List[RecordBatch]:
        batches, high_water = [], None
        for positions, values in slices:
            verdicts = decode_values(contract, values)
            marks, high_water = high_waters(verdicts, high_water)
            batches.append(RecordBatch((FILE_LINES, path), values, positions, marks, verdicts))
        return batches

    batches = timed("decode", decode, len)
    screen = _ScreenAndSplitDoFn(SPEC, shards, value_fields(AGGREGATES))
    screen.setup()

    def split() -> Dict[Any, list]:
        grouped: Dict[Any, list] = defaultdict(list)
        for batch in batches:
            groups, _, _, _ = screen._split(batch)
            for shard_window, sub_batch in groups.items():
                grouped[shard_window].append(sub_batch)
        return grouped

    grouped = timed("screen and split", split, lambda out: sum(len(each) for each in out.values()))
    aggregate = _AggregateShardWindowDoFn(("store",), AGGREGATES, SPEC)
    aggregate.setup()
    rows = timed("aggregate into rows",
                 lambda: [row for element in sorted(grouped.items()) for row in aggregate.process(element)], len)
    sink = _SqliteUpsertDoFn(db, "aggregates", RowSchema(("store",), AGGREGATES), batch_size=5000)
    sink.setup()
    try:
        def write() -> int:
            sink.start_bundle()
            for row in rows:
                sink.process(row)
            sink.finish_bundle()
            return sink._connection.execute("SELECT COUNT(*) FROM aggregates").fetchone()[0]
        timed("upsert into SQLite", write, int)
    finally:
        sink.teardown()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS)
    args = parser.parse_args()
    for name, value in (("--events", args.events), ("--keys", args.keys), ("--repeat", args.repeat),
                        ("--shards", args.shards)):
        if value < 1:
            parser.error(f"{name} must be at least 1")
    with tempfile.TemporaryDirectory(prefix="onceflow-stages-") as tmp:
        path = os.path.join(tmp, "events.jsonl")
        write_events(path, args.events, args.keys)
        runs = []
        for run in range(args.repeat):
            db = os.path.join(tmp, f"run{run}.db")
            runs.append(stages(path, args.shards, db))
            print(f"  run {run + 1}/{args.repeat}: {sum(seconds for _, seconds, _ in runs[-1]):.2f} CPU s",
                  file=sys.stderr)
    records = runs[0][0][2]
    print(f"{records:,} records ({args.events:,} orders, {args.keys:,} keys), {args.shards} shards, "
          f"least CPU time of {args.repeat} runs per stage")
    print(f"{'stage':22} {'CPU s':>7} {'records/s':>12} {'share':>6}  out")
    least = [min(run[index][1] for run in runs) for index in range(len(runs[0]))]
    total = sum(least)
    for (name, _, out), seconds in zip(runs[0], least):
        print(f"{name:22} {seconds:7.3f} {records / seconds:12,.0f} {seconds / total:6.1%}  {out:,}")
    print(f"{'all stages':22} {total:7.3f} {records / total:12,.0f}")
    print(f"reproduce: python benchmarks/bench_stages.py --events={args.events} --keys={args.keys} "
          f"--repeat={args.repeat} --shards={args.shards}")


if __name__ == "__main__":
    main()
