"""An independent reference for the aggregate job, used only by tests.

It shares no code with onceflow: plain json, datetime and math.fsum, written from
the contract in DESIGN.md, so that a bug in the pipeline cannot hide in the
expected values.
"""

import datetime
import json
import math
from collections import defaultdict


def _reject(_):
    raise ValueError("non-finite")


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _millis(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return round(moment.timestamp() * 1000)


def _depth(value):
    """How many arrays and objects are open at the deepest point of a decoded value."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            pending.extend((child, level + 1) for child in children)
    return deepest


def parse_line(raw, id_field, time_field, key_field, value_fields):
    """(event id, time ms, key, values) or None for a record the DLQ must get."""
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_reject)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or _depth(obj) > 512:  # the contract refuses JSON nested deeper than 512
        return None
    t = _millis(obj.get(time_field))
    key = obj.get(key_field)
    if t is None or not isinstance(key, (str, int)) or isinstance(key, bool):
        return None
    if not all(_number(obj.get(f)) for f in value_fields):
        return None
    event_id = obj.get(id_field)
    identity = ("id", str(event_id)) if event_id not in (None, "") else ("content", json.dumps(obj, sort_keys=True))
    return identity, t, str(key), {f: obj[f] for f in value_fields}


def expected_job(path, window_ms, lateness_ms, id_field="order_id", time_field="event_time", key_field="store"):
    """Rows {(store, window_start): {...}} and the set of (line, 'bad'|'too_late') for the DLQ."""
    with open(path, "rb") as handle:
        data = handle.read()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a byte order mark at the start is no record's
    lines = list(enumerate(data.split(b"\n"), start=1))
    return expected_from_partitions([lines], window_ms, lateness_ms, id_field, time_field, key_field)


def expected_from_partitions(partitions, window_ms, lateness_ms, id_field="order_id", time_field="event_time",
                             key_field="store"):
    """The same for records read from several partitions: each partition is a list
    of (label, raw line) in log order, with its own high water. Labels name the
    records in the returned dead set."""
    seen = set()
    groups = defaultdict(list)
    dead = set()
    for lines in partitions:
        high_water = None
        for label, line in lines:
            if not line.strip():
                continue
            parsed = parse_line(line, id_field, time_field, key_field, ("qty", "price"))
            if parsed is None:
                dead.add((label, "bad"))
                continue
            identity, t, key, values = parsed
            start = t - t % window_ms
            if high_water is not None and start + window_ms + lateness_ms <= high_water:
                dead.add((label, "too_late"))
            elif identity not in seen:
                seen.add(identity)
                groups[(key, start)].append((t, values))
            high_water = t if high_water is None else max(high_water, t)
    rows = {}
    for (key, start), items in groups.items():
        prices = [v["price"] for _, v in items]
        rows[(key, start)] = {
            "count": len(items),
            "sum_qty": sum(v["qty"] for _, v in items),
            "min_price": min(prices),
            "max_price": max(prices),
            "mean_price": math.fsum(prices) / len(items),
            "last_price": max(items, key=lambda item: item[0])[1]["price"],
        }
    return rows, dead
