"""What a library user's mistaken arguments get: a ValueError or TypeError that
says what to give, when the transform is made (or at the first element), not an
AttributeError deep inside a running pipeline, nor a result that is quietly wrong."""

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from onceflow.aggregates import AggregateSpec, parse_aggregates
from onceflow.events import EventContract, SourceRecord
from onceflow.io.file_sink import WriteRowsToFiles
from onceflow.io.files import ReadRecordBatchesFromFiles, ReadRecordsFromFiles
from onceflow.io.sqlite import WriteRowsToSqlite
from onceflow.rows import RowSchema
from onceflow.transforms import AggregateBatches, AggregateEvents, BatchRecords, ParseEvents, WindowedAggregate
from onceflow.windowing import WindowSpec

CONTRACT = EventContract(time_field="t", key_fields=("store",), value_fields=("qty",), id_field="id")
SPEC = WindowSpec(60_000)
AGGREGATES = parse_aggregates("count,sum:qty")


@pytest.mark.parametrize("make, error, fragment", [
    # A string was taken for its characters: every record dead-lettered ("field 's' is missing"),
    # or rows keyed by a column 's'.
    (lambda: EventContract(time_field="t", key_fields="store"), ValueError,
     "key_fields is a sequence of field names, e.g. ('store',), not one text"),
    (lambda: EventContract(time_field="t", key_fields=("store",), value_fields="qty"), ValueError,
     "value_fields is a sequence of field names"),
    (lambda: WindowedAggregate("store", SPEC, AGGREGATES), ValueError, "WindowedAggregate key_fields is a sequence"),
    (lambda: AggregateBatches("store", SPEC, AGGREGATES), ValueError, "AggregateBatches key_fields is a sequence"),
    (lambda: RowSchema("store", AGGREGATES), ValueError, "RowSchema key_fields is a sequence"),
    # An unknown function ran, and its column was missing from every row.
    (lambda: AggregateSpec("median", "qty"), ValueError, "unknown aggregate 'median'"),
    (lambda: AggregateSpec("sum"), ValueError, "sum needs a field name"),
    (lambda: AggregateSpec("count", "qty"), ValueError, "count takes no field"),
    # Failed at run time with an AttributeError inside Beam.
    (lambda: AggregateEvents(CONTRACT, 60_000, AGGREGATES), ValueError, "AggregateBatches takes a WindowSpec"),
    (lambda: WindowedAggregate(("store",), 60_000, AGGREGATES), ValueError, "WindowedAggregate takes a WindowSpec"),
    (lambda: WindowedAggregate(("store",), SPEC, "count,sum:qty"), ValueError,
     "WindowedAggregate takes AggregateSpec values, e.g. parse_aggregates('count,sum:qty')"),
    (lambda: AggregateEvents(CONTRACT, SPEC, "count,sum:qty"), ValueError, "AggregateEvents takes AggregateSpec"),
    (lambda: AggregateEvents(None, SPEC, AGGREGATES), ValueError, "AggregateEvents takes an EventContract"),
    (lambda: BatchRecords(None), ValueError, "BatchRecords takes an EventContract"),
    (lambda: ReadRecordBatchesFromFiles("x.jsonl", None), ValueError, "ReadRecordBatchesFromFiles takes an "
                                                                       "EventContract"),
    (lambda: ReadRecordsFromFiles("x.jsonl", None), ValueError, "ReadRecordsFromFiles takes an EventContract"),
    (lambda: WriteRowsToSqlite("x.db", "t", None), ValueError, "WriteRowsToSqlite takes a RowSchema"),
    (lambda: WriteRowsToFiles("out", None), ValueError, "WriteRowsToFiles takes a RowSchema"),
    # A TypeError from a comparison ('<' not supported ...).
    (lambda: BatchRecords(CONTRACT, max_records="10"), ValueError, "max_records is a positive int, not '10'"),
    (lambda: WindowedAggregate(("store",), SPEC, AGGREGATES, early_firing_ms="5s"), ValueError,
     "the early firing interval must be a whole number of seconds, in milliseconds (an int)"),
    (lambda: WindowSpec(60_000, allowed_lateness_ms=None), TypeError,
     "WindowSpec allowed_lateness_ms must be a whole number of milliseconds"),
    # Accepted, and every event then a bad_timestamp dead letter.
    (lambda: WindowSpec(10**20), ValueError, "window size must be at most the span from 1970 to the year 9999"),
])
def test_a_wrong_argument_is_refused_when_the_transform_is_made(make, error, fragment):
    with pytest.raises(error) as caught:
        make()
    assert fragment in str(caught.value)


def test_the_arguments_the_docs_show_are_accepted():
    WindowedAggregate(("store",), WindowSpec(60_000, allowed_lateness_ms=0), AGGREGATES, early_firing_ms=10_000)
    AggregateEvents(CONTRACT, SPEC, AGGREGATES, shards=2)
    BatchRecords(CONTRACT, max_records=10)
    RowSchema(("store",), (AggregateSpec("count"), AggregateSpec("max", "qty")))


@pytest.mark.parametrize("record, fragment", [
    # beam.Create of text lines, or ReadFromText: an AttributeError ('str' object has no attribute 'decode').
    (SourceRecord('{"id": "1"}', {}), "a SourceRecord's value is the raw record as bytes, got str: encode text "
                                      "first"),
    # A TypeError ('NoneType' object is not iterable) from the dead letter's ID.
    (SourceRecord(b"not json", None), "a SourceRecord's source is a dict saying where the record came from"),
])
@pytest.mark.parametrize("path", ["per-event", "batched"])
def test_a_source_record_with_fields_of_the_wrong_type_is_named(record, fragment, path):
    transform = ParseEvents(CONTRACT) if path == "per-event" else BatchRecords(CONTRACT)
    with pytest.raises(Exception) as caught:
        with TestPipeline() as pipeline:
            _ = pipeline | beam.Create([record]) | transform
    assert fragment in str(caught.value)


@pytest.mark.parametrize("key_fields, aggregates, fragment", [
    # A bare KeyError: 'price' inside Beam.
    (("store",), "count,sum:price", "WindowedAggregate's aggregates read price, which the events do not hold: add "
                                    "it to the EventContract's value_fields"),
    # Rows came out without the second key column (zip stopped at the shorter).
    (("store", "region"), "count", "WindowedAggregate names 2 key field(s) ['store', 'region'], and the events are "
                                   "keyed by 1"),
])
def test_a_windowed_aggregate_that_does_not_fit_its_events_says_so(key_fields, aggregates, fragment):
    from onceflow.events import Event

    event = Event("1", 1_793_610_000_000, ("s1",), {"qty": 2}, SourceRecord(b"{}", {}))
    with pytest.raises(Exception) as caught:
        with TestPipeline() as pipeline:
            _ = pipeline | beam.Create([event]) | WindowedAggregate(key_fields, SPEC, parse_aggregates(aggregates))
    assert fragment in str(caught.value)
