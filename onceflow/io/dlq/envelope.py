"""The dead-letter envelope: what every queue stores for a :class:`DeadLetter`.

Writers turn dead letters into the envelope with :func:`to_envelope` (adding the
pipeline's name and version); readers return envelopes, and a replay takes the
record back with :func:`from_envelope`. Every backend stores and returns the same
fields:

``dlq_id``        deterministic: the same record refused at the same stage for the
                  same reason always has the same ID, so a retried bundle or a
                  replay that fails again is recognised as the same dead letter
``reason``        one of :data:`onceflow.events.REASONS`
``error_class``   the class of the error, as text
``message``       a human sentence
``stage``         the transform that refused it (``parse``, ``aggregate``, ...)
``source``        where the raw bytes came from (topic/partition/offset, file/line)
``raw_base64``    the raw bytes exactly as read, base64: never re-encoded lossily
``raw_preview``   the first bytes as text, for people (never used to replay)
``event_id``, ``event_time``  when known (e.g. for ``too_late``)
``failed_at``     wall-clock time (excluded from every equality check)
``pipeline``, ``pipeline_version``
"""

from __future__ import annotations

import base64
import datetime
import json
from typing import Any, Dict, Mapping, Optional

from onceflow.deadletter import DeadLetter
from onceflow.events import SourceRecord, format_utc_ms

_PREVIEW_BYTES = 200
ENVELOPE_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # failed_at, as text


def to_envelope(letter: DeadLetter, pipeline: str, pipeline_version: str,
                failed_at: Optional[datetime.datetime] = None) -> Dict[str, Any]:
    """The JSON-ready envelope of a dead letter."""
    moment = failed_at or datetime.datetime.now(datetime.timezone.utc)
    return {
        "dlq_id": letter.dlq_id,
        "reason": letter.reason,
        "error_class": letter.error_class,
        "message": letter.message,
        "stage": letter.stage,
        "source": dict(letter.record.source),
        "raw_base64": base64.b64encode(letter.record.value).decode("ascii"),
        "raw_preview": letter.record.value[:_PREVIEW_BYTES].decode("utf-8", errors="replace"),
        "event_id": letter.event_id,
        "event_time": None if letter.event_time_ms is None else format_utc_ms(letter.event_time_ms),
        "failed_at": moment.strftime(ENVELOPE_TIME),
        "pipeline": pipeline,
        "pipeline_version": pipeline_version,
    }


# The envelope's fields a reader relies on, with their JSON types.
_ENVELOPE_TYPES = (("dlq_id", str), ("reason", str), ("message", str), ("stage", str), ("source", dict),
                   ("raw_base64", str), ("failed_at", str))


def checked_envelope(envelope: Any, where: str) -> Dict[str, Any]:
    """``envelope`` (parsed JSON) when it holds an envelope's fields, each of its
    type, and a ``failed_at`` time; otherwise ValueError, one line naming ``where``
    (a file's line, a topic's partition and offset)."""
    if not isinstance(envelope, dict):
        raise ValueError(f"{where} is not a dead letter: a JSON {type(envelope).__name__}, not an envelope object")
    for name, kind in _ENVELOPE_TYPES:
        if name not in envelope:
            raise ValueError(f"{where} is not a dead letter: no {name!r} field of an envelope")
        if not isinstance(envelope[name], kind):
            expected = "an object" if kind is dict else "text"
            raise ValueError(f"{where} is not a dead letter: its {name!r} is {_json_kind(envelope[name])}, not "
                             f"{expected}")
    try:
        datetime.datetime.strptime(envelope["failed_at"], ENVELOPE_TIME)
    except ValueError:
        raise ValueError(f"{where} is not a dead letter: failed_at {envelope['failed_at']!r} is not a time "
                         "like 2026-11-02T09:00:00.000000Z") from None
    return envelope


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def to_json_line(envelope: Mapping[str, Any]) -> str:
    """The envelope as one line of JSON (keys sorted, ASCII only)."""
    return json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def from_envelope(envelope: Mapping[str, Any]) -> SourceRecord:
    """The source record of an envelope, as it was read: what a replay feeds back."""
    return SourceRecord(
        value=base64.b64decode(envelope["raw_base64"]),
        source=dict(envelope["source"]),
        high_water_ms=None,
    )
