"""The end-of-run summary of a pipeline, read from its Beam metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Dict, List, Optional

from apache_beam.metrics.metric import MetricsFilter

from onceflow import metrics
from onceflow.observability.figures import STAGES, consumer_lag, dead_letters_by_reason, total
from onceflow.observability.snapshot import COMMITTED, LOCAL, NO_FIGURES, MetricsSnapshot, snapshot_from_query

JSON_FORMAT = "onceflow-run-summary/1"
# The share of records read that went to the DLQ as too_late from which the
# summary explains how lateness is measured and which flag changes it.
TOO_LATE_NOTE_SHARE = 0.10
# The share that went there as schema_violation from which it says which flags
# name the fields: a misspelled --time_field refuses every record.
SCHEMA_NOTE_SHARE = 0.50
# The share of records read that lacked --id_field from which it says that their
# IDs were derived from their content: a misspelled --id_field lacks in every one.
NO_ID_NOTE_SHARE = 0.50


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """Counters of one run (namespace ``onceflow``), its gauges' last values, and
    where the output is. ``values`` is ``committed`` when every counter is the
    runner's committed value, ``attempted`` otherwise, ``local`` when the runner
    gave none at the end and they were counted in this process (see
    :meth:`onceflow.observability.monitor.Monitor.finish`)."""

    runner: str
    seconds: float
    counters: Dict[str, int]
    sink: str
    dlq: str
    gauges: Dict[str, int] = dataclasses.field(default_factory=dict)
    values: str = COMMITTED
    pipeline: str = "aggregate"

    def count(self, name: str) -> int:
        return self.counters.get(name, 0)

    @property
    def dead_letters_by_reason(self) -> Dict[str, int]:
        return dead_letters_by_reason(self.counters)

    def per_second(self, count: int) -> float:
        return count / self.seconds if self.seconds > 0 else 0.0

    def stages(self) -> Dict[str, Dict[str, Any]]:
        """Per stage: its step, elements in and out, and in/s over the whole run."""
        found = {}
        for stage in STAGES:
            count_in, count_out = total(self.counters, stage.inputs), total(self.counters, stage.outputs)
            if stage.name in ("read", "dlq") and not count_in and not count_out:
                continue
            found[stage.name] = {
                "step": stage.step, "unit": stage.unit, "in": count_in if stage.inputs else None,
                "out": count_out, "per_s": round(self.per_second(count_in if stage.inputs else count_out), 3),
            }
        return found

    def consumer_lag(self) -> Dict[str, Dict[str, int]]:
        """The readers' last reported lag: ``{topic: {partition: lag}}``."""
        found: Dict[str, Dict[str, int]] = {}
        for (topic, partition), lag in consumer_lag({k: (v, 0.0) for k, v in self.gauges.items()}).items():
            found.setdefault(topic, {})[str(partition)] = lag
        return found

    def render(self) -> str:
        by_reason = self.dead_letters_by_reason
        reasons = ", ".join(f"{reason} {count}" for reason, count in by_reason.items()) or "none"
        read = self.count(metrics.RECORDS_READ)
        rate = f"{read / self.seconds:,.0f} records/s" if self.seconds > 0 else ""
        lines = [
            f"onceflow {self.pipeline}: done in {self.seconds:.1f}s on {self.runner} ({rate})",
            f"  records read        {read:>9,}",
            f"  events parsed       {self.count(metrics.EVENTS_PARSED):>9,}",
            f"  duplicates dropped  {self.count(metrics.DUPLICATES_DROPPED):>9,}",
            f"  dead letters        {sum(by_reason.values()):>9,}   by reason: {reasons}",
            f"  rows emitted        {self.count(metrics.ROWS_EMITTED):>9,}",
            f"  rows written        {self.count(metrics.SINK_ROWS_WRITTEN):>9,}   "
            f"(kept newer stored versions: {self.count(metrics.SINK_ROWS_STALE):,})",
        ]
        gap = self.count(metrics.RETENTION_GAP_RECORDS)
        if gap:
            lines.append(f"  lost to retention   {gap:>9,}   (records in the range that retention had deleted)")
        lag = self.consumer_lag()
        if lag:
            partitions = sum(len(p) for p in lag.values())
            lines.append(f"  consumer lag        {sum(sum(p.values()) for p in lag.values()):>9,}   "
                         f"(at the end, over {partitions} partition{'s' if partitions != 1 else ''})")
        lines += [
            f"  output:       {self.sink}",
            f"  dead letters: {self.dlq}",
        ]
        lines += [f"  note: {note}" for note in self.notes()]
        return "\n".join(lines)

    def notes(self) -> List[str]:
        """Where the figures came from when not from the runner, and hints for a run
        whose figures suggest a flag is wrong for the input: when too-late records are
        at least :data:`TOO_LATE_NOTE_SHARE` of the records read, or records refused
        by the schema :data:`SCHEMA_NOTE_SHARE`, or records without ``--id_field``
        :data:`NO_ID_NOTE_SHARE`."""
        found = []
        if self.values == LOCAL:
            found.append("the runner gave no figures once the job stopped: these were counted in this process "
                         "while it ran")
        if self.values == NO_FIGURES:
            found.append("the runner gave no figures once the job stopped, and its worker processes "
                         "(--loopback_worker_processes) counted in their own: the zeros above are not the job's "
                         "(the runner's web UI has its figures; the rows are in the sink)")
        read = self.count(metrics.RECORDS_READ)
        refused = self.dead_letters_by_reason.get("schema_violation", 0)
        if read > 0 and refused >= SCHEMA_NOTE_SHARE * read:
            found.append(f"{refused:,} of {read:,} records ({refused / read:.0%}) went to the dead-letter queue as "
                         "schema_violation: if --time_field, --key_fields or --aggregate names a field the records "
                         "do not have (a misspelling), every record is refused; their messages say which field "
                         f"(onceflow dlq list --dlq={self.dlq_flag()} --reason schema_violation), and a replay with "
                         f"the flag fixed counts them (onceflow dlq replay --dlq={self.dlq_flag()} --reason "
                         "schema_violation -- <the job's flags>)")
        undecoded = self.dead_letters_by_reason.get("avro_decode_error", 0)
        if read > 0 and undecoded >= SCHEMA_NOTE_SHARE * read:
            found.append(f"{undecoded:,} of {read:,} records ({undecoded / read:.0%}) went to the dead-letter queue "
                         "as avro_decode_error: if --avro_reader_schema does not match the writers' schemas (another "
                         "record name or namespace, a field without a default), every record is refused; their "
                         f"messages say why (onceflow dlq list --dlq={self.dlq_flag()} --reason avro_decode_error)")
        without_id = self.count(metrics.RECORDS_WITHOUT_ID)
        if read > 0 and without_id >= NO_ID_NOTE_SHARE * read:
            found.append(f"{without_id:,} of {read:,} records ({without_id / read:.0%}) have no --id_field field: "
                         "their event IDs were derived from their content, so copies that differ in any field "
                         "(a re-send with a new timestamp) count twice; if --id_field is misspelled, fix it and "
                         "run again (the rows are overwritten), or give --id_field='' to derive IDs on purpose")
        too_late = self.dead_letters_by_reason.get("too_late", 0)
        if read <= 0 or too_late < TOO_LATE_NOTE_SHARE * read:
            return found
        return found + [f"{too_late:,} of {read:,} records ({too_late / read:.0%}) went to the dead-letter queue as "
                        "too_late. Lateness is measured against the newest event time before a record in its file "
                        "or Kafka partition, so out-of-order input looks late; if the input is out of order by more "
                        f"than --allowed_lateness, replay them with a larger one: onceflow dlq replay "
                        f"--dlq={self.dlq_flag()} --reason too_late -- <the job's flags> --allowed_lateness=1h (a "
                        "live job keeps its own: its stored positions were taken under it)."]

    def dlq_flag(self) -> str:
        """The queue as ``--dlq`` takes it, where :attr:`dlq` is that already (a
        file, a Kafka topic); else a placeholder (a table's URL may hold a password)."""
        usable = " " not in self.dlq and ("://" not in self.dlq or self.dlq.startswith("kafka://"))
        return self.dlq if usable else "<this run's --dlq>"

    def to_json(self) -> Dict[str, Any]:
        """Everything above as JSON-ready data (what ``--metrics_out`` writes)."""
        by_reason = self.dead_letters_by_reason
        lag = self.consumer_lag()
        watermark = self.gauges.get(metrics.WATERMARK_MS)
        return {
            "format": JSON_FORMAT,
            "pipeline": self.pipeline,
            "runner": self.runner,
            "seconds": round(self.seconds, 3),
            "values": self.values,
            "records_read": self.count(metrics.RECORDS_READ),
            "events_parsed": self.count(metrics.EVENTS_PARSED),
            "records_without_id": self.count(metrics.RECORDS_WITHOUT_ID),
            "duplicates_dropped": self.count(metrics.DUPLICATES_DROPPED),
            "too_late": by_reason.get("too_late", 0),
            "dead_letters": {"total": sum(by_reason.values()), "by_reason": by_reason},
            "rows_emitted": self.count(metrics.ROWS_EMITTED),
            "sink_rows_written": self.count(metrics.SINK_ROWS_WRITTEN),
            "sink_rows_stale": self.count(metrics.SINK_ROWS_STALE),
            "sink_retries": self.count(metrics.SINK_RETRIES),
            "dlq_written": self.count(metrics.DLQ_WRITTEN),
            "retention_gap_records": self.count(metrics.RETENTION_GAP_RECORDS),
            "notes": self.notes(),
            "stages": self.stages(),
            "consumer_lag": lag,
            "consumer_lag_total": sum(sum(p.values()) for p in lag.values()) if lag else None,
            "watermark_ms": watermark,
            "counters": dict(sorted(self.counters.items())),
            "gauges": dict(sorted(self.gauges.items())),
            "sink": self.sink,
            "dlq": self.dlq,
        }

    def write_json(self, path: str) -> None:
        """Writes :meth:`to_json` to ``path`` (replaced atomically)."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".metrics-", suffix=".json", dir=directory)
        try:
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's file is the owner's alone; a report is for all
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(self.to_json(), out, indent=2, sort_keys=False)
                out.write("\n")
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def collect_summary(result, runner: str, seconds: float, sink: str, dlq: str,
                    mirror: Optional[MetricsSnapshot] = None) -> RunSummary:
    """Sums each ``onceflow`` counter over steps (committed values where the runner
    reports them, attempted otherwise) and keeps each gauge's latest value. A run
    with no job to ask (e.g. Dataflow only writing a template) has no counters.

    ``mirror``: the gauges this process saw set (its in-process workers'). A gauge
    is the newer of the runner's value and the mirror's: Beam's FnApiRunner
    reports each gauge as the first bundle of a step set it, so a backfill read in
    several bundles ended with the consumer lag of its first bundle."""
    if getattr(result, "has_job", True) is False:
        return RunSummary(runner, seconds, {}, sink, dlq)
    query = result.metrics().query(MetricsFilter().with_namespace(metrics.NAMESPACE))
    snapshot = snapshot_from_query(query, 0.0, prefer_committed=True)
    gauges = dict(snapshot.gauges)
    for name, (value, stamp) in (mirror.gauges.items() if mirror is not None else ()):
        if name not in gauges or stamp > gauges[name][1]:
            gauges[name] = (value, stamp)
    return RunSummary(runner, seconds, dict(snapshot.counters), sink, dlq,
                      gauges={name: value for name, (value, _) in sorted(gauges.items())},
                      values=snapshot.values)
