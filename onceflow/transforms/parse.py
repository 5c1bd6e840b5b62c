"""ParseEvents: raw records to validated events, every failure dead-lettered."""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
from apache_beam import pvalue

from onceflow import metrics
from onceflow.deadletter import DeadLetter
from onceflow.events import (
    EventContract, RecordError, SourceRecord, check_time_source, require_source_record, timed_by,
)

STAGE = "parse"
_DEAD_LETTERS = "dead_letters"


class Parsed(NamedTuple):
    """The outputs of :class:`ParseEvents` (a named tuple, so Beam sees both)."""

    events: beam.PCollection  # PCollection[Event]
    dead_letters: beam.PCollection  # PCollection[DeadLetter]


class _ParseDoFn(beam.DoFn):
    def __init__(self, contract: EventContract, time_source: str):
        self._contract = contract
        self._time_source = time_source
        self._read = metrics.counter(metrics.RECORDS_READ)
        self._parsed = metrics.counter(metrics.EVENTS_PARSED)

    def process(self, record: SourceRecord):
        require_source_record(record, "ParseEvents")
        self._read.inc()
        try:
            event = timed_by(self._contract.to_event(record), self._time_source)
        except RecordError as error:
            metrics.dead_letter_counter(error.reason).inc()
            yield pvalue.TaggedOutput(
                _DEAD_LETTERS,
                DeadLetter(record, STAGE, error.reason, error.error_class, error.message),
            )
            return
        self._parsed.inc()
        yield event


class ParseEvents(beam.PTransform):
    """Decodes raw records (JSON or Avro) into :class:`~onceflow.events.Event`.

    Input: ``PCollection[SourceRecord]``, bounded or unbounded, any windowing.
    Output: :class:`Parsed` with ``events`` and ``dead_letters``.

    Guarantees: every input record comes out exactly once, either as an event that
    matches the contract's Avro schema (non-null key fields, a valid event time,
    numeric value fields, a deterministic event ID: the producer's, or one derived
    from the content) or as a :class:`~onceflow.deadletter.DeadLetter` with stage
    ``parse`` and a stable reason (``invalid_utf8``, ``malformed_json``,
    ``nesting_too_deep``, ``non_finite_number``, ``not_an_object``,
    ``avro_decode_error``, ``schema_violation``, ``bad_timestamp``). No input can
    make it raise (an element that is not a ``SourceRecord`` is a ``TypeError``
    that says so). Element timestamps are passed through unchanged.

    ``time_source``: the event time is the contract's time field (``field``) or,
    for records read from Kafka with ``time_source="record"``, the record's Kafka
    timestamp (``record``; the time field is still checked). Give the reader's.

    Metrics (namespace ``onceflow``): ``records_read``, ``events_parsed``,
    ``dead_letters.<reason>``.
    """

    def __init__(self, contract: EventContract, time_source: str = "field"):
        super().__init__()
        if not isinstance(contract, EventContract):
            raise TypeError("ParseEvents needs an EventContract")
        check_time_source(time_source)
        self._contract = contract
        self._time_source = time_source

    def expand(self, records: beam.PCollection) -> Parsed:
        outputs = records | "DecodeAndValidate" >> beam.ParDo(_ParseDoFn(self._contract, self._time_source)).with_outputs(
            _DEAD_LETTERS, main="events"
        )
        return Parsed(events=outputs.events, dead_letters=outputs[_DEAD_LETTERS])
