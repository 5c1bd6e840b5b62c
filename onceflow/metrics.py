"""Names of the Beam metrics onceflow emits, in one place.

Every counter is in the ``onceflow`` namespace, so runners (Flink, Dataflow) and
:func:`onceflow.pipelines.summary` find them the same way.
"""

from __future__ import annotations

from apache_beam.metrics import Metrics

NAMESPACE = "onceflow"

RECORDS_READ = "records_read"
KAFKA_RECORDS_READ = "kafka_records_read"
CONSUMER_LAG = "consumer_lag"  # a gauge per partition: consumer_lag.<topic>.<partition>
EVENTS_PARSED = "events_parsed"
DEAD_LETTERS = "dead_letters"  # counted per reason: dead_letters.<reason>
EVENTS_TIMELY = "events_timely"
DUPLICATES_DROPPED = "duplicates_dropped"
EVENTS_UNIQUE = "events_unique"
ROWS_EMITTED = "rows_emitted"
SINK_ROWS_WRITTEN = "sink_rows_written"
SINK_ROWS_STALE = "sink_rows_stale"  # refused by the version guard
SINK_RETRIES = "sink_retries"
DLQ_WRITTEN = "dlq_written"


def counter(name: str):
    return Metrics.counter(NAMESPACE, name)


def dead_letter_counter(reason: str):
    return Metrics.counter(NAMESPACE, f"{DEAD_LETTERS}.{reason}")
