"""The dead-letter envelope: lossless raw bytes, deterministic IDs."""

import datetime
import json

from onceflow.deadletter import DeadLetter
from onceflow.io.dlq.envelope import from_envelope, to_envelope, to_json_line
from onceflow.events import SourceRecord

RAW = b'{"broken": \xff\xfe'
RECORD = SourceRecord(RAW, {"topic": "orders", "partition": 2, "offset": 41}, 1000)


def test_envelope_keeps_raw_bytes_and_source_and_round_trips():
    letter = DeadLetter(RECORD, "parse", "invalid_utf8", "UnicodeDecodeError", "not valid UTF-8")
    envelope = json.loads(to_json_line(to_envelope(letter, "aggregate", "0.1.0")))
    assert envelope["reason"] == "invalid_utf8"
    assert envelope["stage"] == "parse"
    assert envelope["source"] == {"topic": "orders", "partition": 2, "offset": 41}
    assert envelope["pipeline"] == "aggregate" and envelope["pipeline_version"] == "0.1.0"
    assert envelope["failed_at"].endswith("Z")
    replayed = from_envelope(envelope)
    assert replayed.value == RAW
    assert replayed.source == RECORD.source


def test_dlq_id_is_deterministic_and_ignores_wall_clock():
    letter = DeadLetter(RECORD, "parse", "invalid_utf8", "UnicodeDecodeError", "m")
    early = to_envelope(letter, "aggregate", "0.1.0", datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
    late = to_envelope(letter, "aggregate", "0.1.0")
    assert early["dlq_id"] == late["dlq_id"]
    other_offset = DeadLetter(RECORD._replace(source={**RECORD.source, "offset": 42}), "parse", "invalid_utf8", "U", "m")
    other_reason = DeadLetter(RECORD, "parse", "malformed_json", "U", "m")
    assert len({letter.dlq_id, other_offset.dlq_id, other_reason.dlq_id}) == 3
