"""The event contract: every kind of bad input is refused with the right reason."""

import dataclasses
import json

import fastavro
import io
import pytest

from onceflow.events import (
    EventContract, RecordError, SourceRecord, derive_event_id, format_utc_ms, json_nests_too_deep, parse_event_time_ms,
)

from onceflow.batches import decode_values

CONTRACT = EventContract(time_field="ts", key_fields=("store",), value_fields=("qty", "price"), id_field="id")


def to_event(raw: bytes):
    return CONTRACT.to_event(SourceRecord(raw, {"file": "f", "line": 1}))


def reason_of(raw: bytes) -> str:
    with pytest.raises(RecordError) as caught:
        to_event(raw)
    return caught.value.reason


GOOD = {"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": "s1", "qty": 2, "price": 2.5}


def test_a_valid_record_becomes_an_event():
    event = to_event(json.dumps(GOOD).encode())
    assert event.event_id == "e1"
    assert event.event_time_ms == 1793610000000
    assert event.key == ("s1",)
    assert event.values == {"qty": 2, "price": 2.5}


@pytest.mark.parametrize("raw, reason", [
    (b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": "caf\xe9", "qty": 1, "price": 1}', "invalid_utf8"),
    (b"\xff\xfe\x00", "invalid_utf8"),
    (b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": "s1", "qty": 1, "pri', "malformed_json"),
    (b"", "malformed_json"),
    (b"{}}", "malformed_json"),
    (b'{"a": 1} {"b": 2}', "malformed_json"),
    (b"1" * 5000, "malformed_json"),  # more digits than Python converts
    (b"[1, 2, 3]", "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b"null", "not_an_object"),
    (b"true", "not_an_object"),
    (b"42", "not_an_object"),
    (b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": "s1", "qty": 1, "price": NaN}', "non_finite_number"),
    (b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": "s1", "qty": 1, "price": Infinity}', "non_finite_number"),
    (b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": "s1", "qty": 1, "price": -Infinity}', "non_finite_number"),
    (b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": "s1", "qty": 1, "price": 1e400}', "non_finite_number"),
    (b"[" * 100000 + b"]" * 100000, "nesting_too_deep"),
    (b'{"a": ' * 50000 + b"1" + b"}" * 50000, "nesting_too_deep"),
    (b'{"id": "e1", "ts": 1, "store": "s1", "qty": 1, "price": 1, "x": ' + b"[" * 512 + b"]" * 512 + b"}",
     "nesting_too_deep"),  # 513 levels with the record itself
    (b"[" * 600, "nesting_too_deep"),  # the depth is decided before the syntax
    (b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "qty": 1, "price": 1}', "schema_violation"),
    (b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": null, "qty": 1, "price": 1}', "schema_violation"),
    (b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": "s1", "qty": "three", "price": 1}', "schema_violation"),
    (b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": "s1", "qty": true, "price": 1}', "schema_violation"),
    (b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": "s1", "qty": null, "price": 1}', "schema_violation"),
    (b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": {"n": 1}, "qty": 1, "price": 1}', "schema_violation"),
    (b'{"id": ["e1"], "ts": "2026-11-02T09:00:00Z", "store": "s1", "qty": 1, "price": 1}', "schema_violation"),
    (b'{"id": "e1", "store": "s1", "qty": 1, "price": 1}', "schema_violation"),
    (b'{"id": "e1", "ts": null, "store": "s1", "qty": 1, "price": 1}', "schema_violation"),
    (b'{"id": "e1", "ts": 1.5, "store": "s1", "qty": 1, "price": 1}', "schema_violation"),
    (b'{"id": "e1", "ts": "yesterday", "store": "s1", "qty": 1, "price": 1}', "bad_timestamp"),
    (b'{"id": "e1", "ts": "2026-13-40T99:00:00Z", "store": "s1", "qty": 1, "price": 1}', "bad_timestamp"),
    (b'{"id": "e1", "ts": 99999999999999999, "store": "s1", "qty": 1, "price": 1}', "bad_timestamp"),
])
def test_bad_input_is_refused_with_its_reason(raw, reason):
    assert reason_of(raw) == reason


@pytest.mark.parametrize("qty, accepted", [
    (9223372036854775807, True), (-9223372036854775808, True), (9223372036854775808, False),
    (-9223372036854775809, False), (10**400, False), (9.3e18, True), (1e308, True),
])
def test_integer_values_must_be_64_bit_as_avro_long_says(qty, accepted):
    raw = b'{"id": "e1", "ts": 5, "store": "s1", "qty": %s, "price": 1}' % str(qty).encode()
    if accepted:
        assert CONTRACT.to_event(SourceRecord(raw, {})).values["qty"] == qty
    else:
        with pytest.raises(RecordError, match="integer outside the 64-bit range") as refused:
            CONTRACT.to_event(SourceRecord(raw, {}))
        assert refused.value.reason == "schema_violation"
    # the batched decoder gives the same verdict
    assert (type(decode_values(CONTRACT, [raw])[0]).__name__ == "Decoded") == accepted


def test_nesting_up_to_the_limit_is_accepted_wherever_the_decoder_is_called_from():
    """512 levels (the record and 511 inside it) decode, also from deep in a caller's
    stack; brackets inside strings do not count."""
    deep = b'{"id": "e1", "ts": 1, "store": "s1", "qty": 1, "price": 1, "x": ' + b"[" * 511 + b"]" * 511 + b"}"
    quoted = b'{"id": "e1", "ts": 1, "store": "s1", "qty": 1, "price": 1, "x": "' + b"[{" * 2000 + b'\\\\"}'

    def nested_call(levels):
        return nested_call(levels - 1) if levels else (to_event(deep), to_event(quoted))

    for event in nested_call(300):
        assert event.event_id == "e1"


@pytest.mark.parametrize("raw, deep", [
    (b"[" * 513, True),
    (b"[" * 512, False),
    (b'{"x": "' + b"[" * 2000 + b'"}', False),  # brackets in a string
    (b'{"x": "\\"' + b"[" * 2000 + b'"}', False),  # an escaped quote does not end the string
    (b'{"x": "\\\\"' + b"[" * 600 + b"}", True),  # an escaped backslash does not escape the quote
    (b'{"x": ' + b"[]" * 2000 + b"}", False),  # many brackets, never deep
    (b'{"x": "' + b"[" * 600 + b'", "y": "' + b'\\"' * 50000 + b'"}', False),
])
def test_the_nesting_check_counts_brackets_outside_strings(raw, deep):
    assert json_nests_too_deep(raw) is deep


def test_refusals_carry_a_message_and_class():
    with pytest.raises(RecordError) as caught:
        to_event(b'{"id": "e1", "ts": "2026-11-02T09:00:00Z", "store": "s1", "qty": "x", "price": 1}')
    assert "'qty'" in caught.value.message and "str" in caught.value.message
    assert caught.value.error_class == "WrongType"


@pytest.mark.parametrize("text, expected", [
    ("2026-11-02T09:00:00Z", "2026-11-02T09:00:00.000Z"),
    ("2026-11-02T09:00:00+00:00", "2026-11-02T09:00:00.000Z"),
    ("2026-11-02T10:00:00+01:00", "2026-11-02T09:00:00.000Z"),
    ("2026-11-02T04:00:00-05:00", "2026-11-02T09:00:00.000Z"),
    ("2026-11-02T14:30:00.250+05:30", "2026-11-02T09:00:00.250Z"),
    ("2026-11-02T09:00:00", "2026-11-02T09:00:00.000Z"),  # no offset: UTC
    ("2026-11-02 09:00:00z", "2026-11-02T09:00:00.000Z"),
    ("2026-11-02T09:00:00.123456Z", "2026-11-02T09:00:00.123Z"),
    (1793610000000, "2026-11-02T09:00:00.000Z"),
    (0, "1970-01-01T00:00:00.000Z"),
    (-1000, "1969-12-31T23:59:59.000Z"),
])
def test_event_time_in_any_offset_or_epoch_millis(text, expected):
    assert format_utc_ms(parse_event_time_ms(text)) == expected


def test_missing_or_null_id_is_derived_from_content_deterministically():
    without_id = {k: v for k, v in GOOD.items() if k != "id"}
    first = to_event(json.dumps(without_id).encode())
    reordered = to_event(json.dumps(dict(reversed(list(without_id.items())))).encode())
    with_null = to_event(json.dumps({**without_id, "id": None}).encode())
    assert first.event_id.startswith("sha256:")
    assert first.event_id == reordered.event_id
    other = to_event(json.dumps({**without_id, "qty": 3}).encode())
    assert other.event_id != first.event_id
    assert with_null.event_id == derive_event_id({**without_id, "id": None})
    assert with_null.event_id.startswith("sha256:")


def test_integer_keys_and_ids_are_keyed_as_text():
    event = to_event(json.dumps({**GOOD, "store": 42, "id": 7}).encode())
    assert event.key == ("42",)
    assert event.event_id == "7"


def test_extra_fields_are_allowed():
    assert to_event(json.dumps({**GOOD, "note": [1, {"x": None}]}).encode()).event_id == "e1"


AVRO_SCHEMA = {
    "type": "record", "name": "Order",
    "fields": [
        {"name": "id", "type": ["null", "string"]},
        {"name": "ts", "type": "long"},
        {"name": "store", "type": "string"},
        {"name": "qty", "type": "long"},
        {"name": "price", "type": "double"},
    ],
}
AVRO_CONTRACT = EventContract(time_field="ts", key_fields=("store",), value_fields=("qty", "price"),
                              id_field="id", input_format="avro", avro_writer_schema=AVRO_SCHEMA)


def avro_bytes(record) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(AVRO_SCHEMA), record)
    return buffer.getvalue()


def test_avro_records_decode_and_validate():
    raw = avro_bytes({"id": "a1", "ts": 1793610000000, "store": "s1", "qty": 3, "price": 1.25})
    event = AVRO_CONTRACT.to_event(SourceRecord(raw, {}))
    assert (event.event_id, event.event_time_ms, event.key, event.values) == (
        "a1", 1793610000000, ("s1",), {"qty": 3, "price": 1.25})


def test_avro_timestamps_and_uuids_read_as_the_contract_reads_times_and_ids():
    """fastavro gives a datetime for a timestamp logical type and a UUID for a uuid:
    both were refused as schema violations."""
    schema = {"type": "record", "name": "Order", "fields": [
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "seen", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "store", "type": "string"}, {"name": "qty", "type": "long"}]}
    contract = EventContract(time_field="ts", key_fields=("store",), value_fields=("qty",), id_field="id",
                             input_format="avro", avro_writer_schema=schema)
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), {
        "id": "9f1c2a4e-0b6d-4c55-8a8e-2f3b6c1d7e90", "ts": 1793610000123, "seen": 1793610000123456,
        "store": "s1", "qty": 2})
    event = contract.to_event(SourceRecord(buffer.getvalue(), {}))
    assert (event.event_id, event.event_time_ms) == ("9f1c2a4e-0b6d-4c55-8a8e-2f3b6c1d7e90", 1793610000123)
    contract_on_micros = dataclasses.replace(contract, time_field="seen")
    assert contract_on_micros.to_event(SourceRecord(buffer.getvalue(), {})).event_time_ms == 1793610000123


@pytest.mark.parametrize("mutate, reason", [
    (lambda raw: raw[:-3], "avro_decode_error"),
    (lambda raw: raw + b"\x00", "avro_decode_error"),
    (lambda raw: b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", "avro_decode_error"),
    (lambda raw: b"", "avro_decode_error"),
])
def test_corrupt_avro_is_refused(mutate, reason):
    raw = avro_bytes({"id": "a1", "ts": 1793610000000, "store": "s1", "qty": 3, "price": 1.25})
    with pytest.raises(RecordError) as caught:
        AVRO_CONTRACT.to_event(SourceRecord(mutate(raw), {}))
    assert caught.value.reason == reason


def test_avro_nan_is_refused():
    raw = avro_bytes({"id": "a1", "ts": 1793610000000, "store": "s1", "qty": 3, "price": float("nan")})
    with pytest.raises(RecordError) as caught:
        AVRO_CONTRACT.to_event(SourceRecord(raw, {}))
    assert caught.value.reason == "non_finite_number"


def test_peek_gives_the_time_of_valid_events_only():
    assert CONTRACT.peek_event_time_ms(json.dumps(GOOD).encode()) == 1793610000000
    assert CONTRACT.peek_event_time_ms(json.dumps({**GOOD, "qty": "x"}).encode()) is None
    assert CONTRACT.peek_event_time_ms(b"garbage") is None


@pytest.mark.parametrize("kwargs", [
    dict(time_field="ts", key_fields=()),
    dict(time_field="ts", key_fields=("a", "a")),
    dict(time_field="ts", key_fields=("ts",)),
    dict(time_field="ts", key_fields=("a",), input_format="xml"),
    dict(time_field="ts", key_fields=("a",), input_format="avro"),
])
def test_contract_refuses_inconsistent_configuration(kwargs):
    with pytest.raises(ValueError):
        EventContract(**kwargs)


@pytest.mark.parametrize("raw, field", [
    (b'{"id": "e1", "ts": 5, "store": "a\\u0000b", "qty": 1, "price": 1}', "store"),
    (b'{"id": "e\\u0000", "ts": 5, "store": "s1", "qty": 1, "price": 1}', "id"),
])
def test_a_nul_character_in_a_key_or_id_is_refused(raw, field):
    """No text column of PostgreSQL holds one; every sink stores keys as text."""
    with pytest.raises(RecordError, match=f"field '{field}' holds a NUL character") as refused:
        CONTRACT.to_event(SourceRecord(raw, {}))
    assert refused.value.reason == "schema_violation"
    good = b'{"id": "e2", "ts": 5, "store": "s1", "qty": 1, "price": 1}'
    verdicts = decode_values(CONTRACT, [good, raw, good])  # the column decoder, one bad record among good ones
    assert [type(verdict).__name__ for verdict in verdicts] == ["Decoded", "Refusal", "Decoded"]
    assert verdicts[1].message == refused.value.message


@pytest.mark.parametrize("store, accepted", [
    ("s" * 300, True),  # past what the column decoder takes as surely short: checked exactly, accepted
    ("s" * 2000, True), ("s" * 2001, False), ("\u00e9" * 1000, True), ("\u00e9" * 1001, False),  # bytes, not characters
])
def test_a_key_may_have_at_most_2000_bytes_of_text(store, accepted):
    """Every sink indexes it: PostgreSQL refused a 9,000-byte key's row and failed the job."""
    raw = json.dumps({"id": "e1", "ts": 5, "store": store, "qty": 1, "price": 1}).encode()
    good = b'{"id": "e2", "ts": 5, "store": "s1", "qty": 1, "price": 1}'
    verdicts = decode_values(CONTRACT, [good, raw, good])
    if accepted:
        assert CONTRACT.to_event(SourceRecord(raw, {})).key == (store,)
        assert verdicts[1].key == (store,)
    else:
        with pytest.raises(RecordError, match="a key may have at most 2000") as refused:
            CONTRACT.to_event(SourceRecord(raw, {}))
        assert verdicts[1].message == refused.value.message and verdicts[1].reason == "schema_violation"
    assert [type(verdict).__name__ for verdict in (verdicts[0], verdicts[2])] == ["Decoded", "Decoded"]


def test_an_avro_decode_error_reads_the_same_in_every_run(monkeypatch):
    """fastavro names its stream in some errors (<_io.BytesIO object at 0x7f...>):
    the dead letter's message differed between a Kafka and an archive backfill."""
    import fastavro

    from onceflow.events import _decode_avro

    def failing(stream, *schemas):
        raise ValueError(f"cannot read from {stream!r}")
    monkeypatch.setattr(fastavro, "schemaless_reader", failing)
    with pytest.raises(RecordError) as refused:
        _decode_avro(b"\x02", {"type": "record", "name": "r", "fields": []})
    assert refused.value.message == "cannot decode Avro datum: ValueError: cannot read from <_io.BytesIO>"
