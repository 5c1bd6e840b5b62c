"""Writes onceflow/sample_data/orders.jsonl: the bundled sample the main job runs on.

Deterministic (seeded): running it again writes the same bytes. Two hours of orders
from six stores, with what real streams carry: timestamps in several ISO-8601
offsets and as epoch milliseconds, a few records without an order_id (their ID is
derived from content), exact re-sends, events out of order within the allowed
lateness, two events far too late, and a handful of malformed and schema-violating
records.

    python scripts/make_sample_data.py
"""

import datetime
import json
import pathlib
import random

OUT = pathlib.Path(__file__).resolve().parent.parent / "onceflow" / "sample_data" / "orders.jsonl"
START = datetime.datetime(2026, 11, 2, 9, 0, tzinfo=datetime.timezone.utc)
STORES = ["berlin-01", "berlin-02", "lisbon-01", "oslo-01", "paris-01", "paris-02"]
SKUS = ["espresso", "latte", "croissant", "bagel", "tea", "juice", "muffin"]
PRICES = {"espresso": 2.2, "latte": 3.4, "croissant": 2.75, "bagel": 3.1, "tea": 2.05, "juice": 4.5, "muffin": 2.95}
OFFSETS = [datetime.timezone.utc, datetime.timezone(datetime.timedelta(hours=1)),
           datetime.timezone(datetime.timedelta(hours=-5)), datetime.timezone(datetime.timedelta(hours=5, minutes=30))]


def render_time(rng: random.Random, moment: datetime.datetime):
    choice = rng.random()
    if choice < 0.15:
        return int(moment.timestamp() * 1000)
    zone = rng.choice(OFFSETS)
    text = moment.astimezone(zone).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z") if zone is datetime.timezone.utc else text


def main() -> None:
    rng = random.Random(20261102)
    lines = []
    moment = START
    number = 0
    while moment < START + datetime.timedelta(hours=2):
        moment += datetime.timedelta(milliseconds=rng.randint(500, 5500))
        number += 1
        sku = rng.choice(SKUS)
        order = {
            "order_id": f"o-{number:06d}",
            "event_time": render_time(rng, moment),
            "store": rng.choice(STORES),
            "sku": sku,
            "qty": rng.choice([1, 1, 1, 2, 2, 3, 4]),
            "price": round(PRICES[sku] * rng.choice([1, 1, 1, 0.9, 1.1]), 2),
        }
        if rng.random() < 0.03:
            del order["order_id"]  # the producer sent no ID: derived from content
        lines.append(json.dumps(order).encode())
    # Out of order within the allowed lateness: swap some neighbours a few apart.
    for _ in range(60):
        i = rng.randrange(10, len(lines) - 10)
        j = i + rng.randint(1, 8)
        lines[i], lines[j] = lines[j], lines[i]
    # Exact re-sends, a little later in the stream.
    for _ in range(45):
        i = rng.randrange(0, len(lines) - 30)
        lines.insert(i + rng.randint(1, 25), lines[i])
    # Far too late: two orders from the first minutes, arriving at the very end.
    for n, minutes in ((1, 3), (2, 7)):
        late = {"order_id": f"late-{n}", "event_time": (START + datetime.timedelta(minutes=minutes)).isoformat(),
                "store": "oslo-01", "sku": "tea", "qty": 1, "price": 2.05}
        lines.append(json.dumps(late).encode())
    bad = [
        b'{"order_id": "bad-1", "event_time": "2026-11-02T09:30:00Z", "store": "oslo-01", "sku": "tea", "qty": 1, "pri',
        b'{"order_id": "bad-2", "event_time": "2026-11-02T09:31:00Z", "store": "oslo-01", "sku": "tea", "qty": "three", "price": 2.05}',
        b'{"order_id": "bad-3", "event_time": "2026-11-02T09:32:00Z", "store": "oslo-01", "sku": "tea", "price": 2.05}',
        b'{"order_id": "bad-4", "event_time": "2026-11-02T09:33:00Z", "store": "oslo-01", "sku": "tea", "qty": 1, "price": NaN}',
        b'{"order_id": "bad-5", "event_time": "yesterday at noon", "store": "oslo-01", "sku": "tea", "qty": 1, "price": 2.05}',
        b'{"order_id": "bad-6", "event_time": "2026-11-02T09:35:00Z", "store": null, "sku": "tea", "qty": 1, "price": 2.05}',
        b'["not", "an", "object"]',
        b'"just a string"',
        b'{"order_id": "bad-9", "event_time": "2026-11-02T09:36:00Z", "store": "caf\xe9-01", "sku": "tea", "qty": 1, "price": 2.05}',
    ]
    for record in bad:
        lines.insert(rng.randrange(100, len(lines) - 100), record)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(b"\n".join(lines) + b"\n")
    print(f"wrote {len(lines)} lines to {OUT}")


if __name__ == "__main__":
    main()
