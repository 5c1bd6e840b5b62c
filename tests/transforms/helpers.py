"""Building raw records for transform tests."""

import json

from onceflow.events import EventContract, SourceRecord

CONTRACT = EventContract(time_field="t", key_fields=("k",), value_fields=("v",), id_field="id")


def record(event_id, t_ms, v, k="a", high_water_ms=None, **extra) -> SourceRecord:
    body = {"id": event_id, "t": t_ms, "k": k, "v": v, **extra}
    return SourceRecord(json.dumps(body).encode(), {"test": event_id}, high_water_ms)
