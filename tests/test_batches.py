"""The batched decoder against the reference, on arbitrary input (property-based)."""

import json
import pickle

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onceflow.batches import Decoded, Refusal, decode_values, high_waters, reference_verdict, take, taker
from onceflow.events import REASONS, EventContract

CONTRACT = EventContract(time_field="t", key_fields=("k", "s"), value_fields=("v", "w"), id_field="id")
DERIVED = EventContract(time_field="t", key_fields=("k",), value_fields=("v",), id_field=None)

_numbers = st.one_of(
    st.integers(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False),
    st.floats(allow_nan=False, min_value=-1e20, max_value=1e20), st.sampled_from([2**63, -(2**63) - 1, 2**64, 0.0, -0.0]),
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=12),
                     st.sampled_from(["", "2026-11-02T14:30:05.140+05:30", "2026-11-02T10:00:06Z", "2026-11-02",
                                      "9999-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00", "yesterday"]))
_documents = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)), max_leaves=12)
_fields = st.fixed_dictionaries({}, optional={
    "id": _scalars, "t": _scalars, "k": _scalars, "s": _scalars, "v": _scalars, "w": _scalars, "x": _documents})


def _spellings(document):
    """The document as JSON text, spelled a few ways (spacing, escapes, duplicate keys)."""
    text = json.dumps(document, ensure_ascii=False)
    yield text.encode("utf-8", "surrogatepass")
    yield json.dumps(document, ensure_ascii=True, indent=1).encode()
    if isinstance(document, dict) and document:
        first = next(iter(document))
        yield (text[:-1] + f", {json.dumps(first)}: 1}}").encode("utf-8", "surrogatepass")  # a duplicate key


def _agree(contract, raw):
    batched = decode_values(contract, [raw])[0]
    reference = reference_verdict(contract, raw)
    assert batched == reference, (raw, batched, reference)
    assert type(batched) in (Decoded, Refusal)
    if isinstance(batched, Refusal):
        assert batched.reason in REASONS


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_fields)
def test_json_like_documents_decode_as_the_reference_decodes_them(document):
    for raw in _spellings(document):
        _agree(CONTRACT, raw)
        _agree(DERIVED, raw)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_are_one_verdict_each_never_an_exception(raw):
    _agree(CONTRACT, raw)


@settings(max_examples=200, deadline=None)
@given(st.lists(_documents, max_size=5), st.integers(min_value=1, max_value=50))
def test_deep_nesting_and_odd_top_levels_are_refused_like_the_reference(items, depth):
    raw = ("[" * depth + json.dumps(items) + "]" * depth).encode()
    _agree(CONTRACT, raw)
    _agree(CONTRACT, b'{"id": "a", "t": 1, "k": "a", "s": 1, "v": 1, "w": ' + raw + b"}")


@pytest.mark.parametrize("depth", [1, 510, 511, 512, 513, 990, 995, 1000, 1024, 1025, 5000])
def test_nesting_near_the_limit_and_near_the_parsers_own_limits_gets_the_reference_verdict(depth):
    """The contract's fixed limit (512 levels), not a parser's (orjson reads 1,024;
    Python's json stops at its recursion limit less the caller's stack)."""
    inner = b"[" * depth + b"]" * depth
    _agree(CONTRACT, inner)
    _agree(CONTRACT, b'{"id": "a", "t": 1, "k": "a", "s": 1, "v": 1, "w": 1, "x": ' + inner + b"}")
    clean = b'{"id": "b", "t": 1, "k": "a", "s": 1, "v": 1, "w": 1}'
    raws = [clean, b'{"id": "a", "t": 1, "k": "a", "s": 1, "v": 1, "w": 1, "x": ' + inner + b"}", clean]
    assert list(decode_values(CONTRACT, raws)) == [reference_verdict(CONTRACT, raw) for raw in raws]


def test_lone_surrogates_and_big_integers_take_the_reference_path():
    for raw in [b'{"id": "\\ud800", "t": 1, "k": "a", "s": 1, "v": 1, "w": 1}',
                b'{"id": "a", "t": 1, "k": "a", "s": 1, "v": 123456789012345678901234567890, "w": 1}',
                b'{"id": "a", "t": 1, "k": "a", "s": 1, "v": -9223372036854775809, "w": 1}',
                b'{"id": "a", "t": 1, "k": "a", "s": 18446744073709551615, "v": 1, "w": 1}']:
        _agree(CONTRACT, raw)
    assert decode_values(CONTRACT, [b'{"id": "\\ud800", "t": 1, "k": "a", "s": 1, "v": 1, "w": 1}'])[0].reason == \
        "malformed_json"


def test_high_waters_move_only_on_valid_events():
    verdicts = decode_values(CONTRACT, [b'{"id": "a", "t": 5, "k": "a", "s": 1, "v": 1, "w": 1}', b"bad",
                                        b'{"id": "b", "t": 3, "k": "a", "s": 1, "v": 1, "w": 1}',
                                        b'{"id": "c", "t": 9, "k": "a", "s": true, "v": 1, "w": 1}',
                                        b'{"id": "d", "t": 7, "k": "a", "s": 1, "v": 1, "w": 1}'])
    assert high_waters(verdicts, None) == ([None, 5, 5, 5, 5], 7)
    assert high_waters(verdicts, 6) == ([6, 6, 6, 6, 6], 7)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_fields, min_size=1, max_size=8), st.lists(st.binary(max_size=16), max_size=2))
def test_a_batch_decodes_as_the_reference_decodes_each_record(documents, garbage):
    # The column checks run over the whole batch: one odd record (a missing field,
    # an integer ID, a float time, bytes that are not JSON) must not change the
    # verdict on the others, nor escape the reference's verdict itself.
    raws = [raw for document in documents for raw in _spellings(document)] + garbage
    for contract in (CONTRACT, DERIVED):
        batched = decode_values(contract, raws)
        assert list(batched) == [reference_verdict(contract, raw) for raw in raws]
        assert pickle.loads(pickle.dumps(batched)) == batched


def test_clean_columns_of_each_accepted_type_decode_as_the_reference():
    raws = [json.dumps({"id": i, "t": 1_000 + i, "k": f"k{i % 3}", "s": i, "v": i * 2, "w": i / 4}).encode()
            for i in range(50)]
    verdicts = decode_values(CONTRACT, raws)
    assert list(verdicts) == [reference_verdict(CONTRACT, raw) for raw in raws]
    assert verdicts.event_ids[:2] == ["0", "1"] and verdicts.key_columns[1][:2] == ["0", "1"]
    assert not verdicts.refusals


_ODD_VALUES = ["", 0, -1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 1.5, -0.0, 1e300, True, False, None, [], {},
               "2026-11-02T10:00:06Z", "yesterday", float(2**63), -float(2**63), 253402300799999, 253402300800000,
               -62135596800000, -62135596800001]


def test_one_odd_field_in_a_clean_batch_gets_the_reference_verdict():
    # A clean batch passes each column's check at once; one odd value must send
    # its record (and only it) down the per-record path, to the reference's verdict.
    clean = [{"id": f"e{i}", "t": 1_000 + i, "k": "a", "s": "b", "v": i, "w": 0.5} for i in range(5)]
    for field in ("id", "t", "k", "s", "v", "w"):
        for odd in _ODD_VALUES:
            documents = [dict(document) for document in clean]
            documents[2][field] = odd
            raws = [json.dumps(document).encode() for document in documents]
            for contract in (CONTRACT, DERIVED):
                assert list(decode_values(contract, raws)) == [reference_verdict(contract, raw) for raw in raws], \
                    (field, odd)


@pytest.mark.parametrize("indices", [[], [2], [0, 3, 1], [4, 4], range(1, 4)])
def test_take_and_taker_give_a_list_of_the_items_at_the_indices_in_order(indices):
    column = ["a", "b", "c", "d", "e"]
    want = [column[index] for index in indices]
    assert take(column, indices) == want
    assert taker(indices)(column) == want and type(taker(indices)(column)) is list
    assert take(range(10, 15), indices) == [10 + index for index in indices]


def test_records_with_fields_the_field_reader_has_not_seen_decode_as_the_reference():
    """msgspec reads a record only into the fields learned so far; a record with
    another field is read by orjson and teaches the reader; past MAX_FIELDS
    (free-form keys) orjson reads every record. The verdicts never change."""
    from onceflow import batches

    contract = EventContract(time_field="t", key_fields=("k",), value_fields=("v",), id_field="id")
    reader = batches._JsonFieldReader(("id", "t", "k", "v"))
    assert reader._decoder is not None, "msgspec is a core dependency: the fast reader must be on"

    def record(n, extra):
        return json.dumps({"id": f"e{n}", "t": n, "k": "a", "v": n / 2, **extra}).encode()

    def check(raws):
        fields = reader.read(raws)
        want = [reference_verdict(contract, raw) for raw in raws]
        for index, verdict in enumerate(want):
            if isinstance(verdict, Decoded):
                assert fields.columns["id"][index] == verdict.event_id
                assert fields.columns["v"][index] == verdict.values["v"]
            else:
                assert index in fields.others or fields.columns["id"][index] is None

    first = [record(n, {"x": n}) for n in range(5)] + [b"[1]", b"not json"]
    check(first)
    assert "x" in reader._names
    check([record(n, {"x": n, "y": [n]}) for n in range(5)] + [record(9, {})])
    assert reader._names[-1] == "y"
    check([record(n, {f"free{n}": n}) for n in range(batches._JsonFieldReader.MAX_FIELDS)])
    assert reader._decoder is None, "past MAX_FIELDS fields orjson reads every record"
    check([record(n, {"x": n}) for n in range(5)] + [b"{"])
    # and the whole decoder, with and without msgspec, on the same mixed batch
    mixed = first + [record(n, {f"other{n}": None}) for n in range(3)]
    assert list(decode_values(contract, mixed)) == [reference_verdict(contract, raw) for raw in mixed]


@pytest.mark.parametrize("name", ['a"b', "a\\b", "a\tb", "x\ny", "\u0000", "\u001f"])
def test_a_field_name_msgspec_cannot_take_is_read_with_orjson(name, monkeypatch):
    """Valid JSON with a field name holding a quote, a backslash or a control
    character failed its whole batch (msgspec refuses such a name for a struct):
    the reader learns the other names and reads those records with orjson. A
    contract field with such a name leaves every record to orjson."""
    from onceflow import batches

    monkeypatch.setattr(batches, "_FIELD_READERS", {})
    raws = [json.dumps({"id": f"e{n}", "t": n, "k": "a", "s": n, "v": n, "w": 1.5, name: n, "z": n}).encode()
            for n in range(3)] + [json.dumps({"id": "e9", "t": 9, "k": "a", "s": 1, "v": 1, "w": 1}).encode()]
    for _ in range(2):  # the second batch after the reader learned
        assert list(decode_values(CONTRACT, raws)) == [reference_verdict(CONTRACT, raw) for raw in raws]
    contract = EventContract(time_field="t", key_fields=("k",), value_fields=(name,), id_field="id")
    assert list(decode_values(contract, raws)) == [reference_verdict(contract, raw) for raw in raws]
    assert [isinstance(verdict, Decoded) for verdict in decode_values(contract, raws)] == [True, True, True, False]


def test_the_decoder_without_msgspec_gives_the_same_verdicts(monkeypatch):
    from onceflow import batches

    raws = [json.dumps({"id": f"e{n}", "t": n, "k": "a", "s": n, "v": n, "w": 1.5, "x": [n]}).encode()
            for n in range(20)] + [b'{"id": "", "t": 1, "k": "a", "s": 1, "v": 1, "w": 1}', b"\xff", b"[]"]
    with_msgspec = list(decode_values(CONTRACT, raws))
    monkeypatch.setattr(batches, "_msgspec", None)
    monkeypatch.setattr(batches, "_FIELD_READERS", {})
    assert list(decode_values(CONTRACT, raws)) == with_msgspec == [reference_verdict(CONTRACT, raw) for raw in raws]


@pytest.mark.parametrize("odd", [b'"price": 1e400', b'"price": -1e309', b'"z": "\xff"', b'"z": "\xed\xa0\x80"',
                                 b'"big": ' + b"9" * 5000, b'"deep": ' + b"[" * 600 + b"]" * 600, b'"c": "\x01"',
                                 b'"n": NaN', b'"s": "\\udc00"'])
def test_a_field_the_contract_does_not_read_is_checked_like_every_other(odd):
    """A record is refused for what any of its fields holds; the fast reader must not
    skip a field it has not learned (msgspec skips unknown fields unchecked)."""
    clean = [b'{"id": "a%d", "t": 1, "k": "a", "s": 1, "v": 1, "w": 1, "price": 2.5}' % n for n in range(3)]
    raws = clean + [b'{"id": "b", "t": 1, "k": "a", "s": 1, "v": 1, "w": 1, ' + odd + b"}"] + clean
    for _ in range(2):  # before and after the reader learned the clean records' fields
        got = list(decode_values(CONTRACT, raws))
        assert got == [reference_verdict(CONTRACT, raw) for raw in raws]
        assert isinstance(got[3], Refusal)
