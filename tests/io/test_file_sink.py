"""The file sink: one file per window, merged under the version guard, atomically
replaced, byte-identical when the same rows are written again."""

import os
import threading

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from onceflow.aggregates import parse_aggregates
from onceflow.io import file_sink
from onceflow.rows import RowSchema

SCHEMA = RowSchema(("store", "sku"), parse_aggregates("count,sum:qty,max:price"))
MINUTE = 60_000
START = 1_793_610_000_000  # 2026-11-02T09:00:00Z


def row(store, sku, start, n, qty, price=2.5):
    return {"store": store, "sku": sku, "window_start": start, "window_end": start + MINUTE, "event_count": n,
            "count": n, "sum_qty": qty, "max_price": price}


def write(directory, rows, file_format, batch_size=2):
    with TestPipeline() as pipeline:
        _ = pipeline | beam.Create(rows) | file_sink.WriteRowsToFiles(str(directory), SCHEMA, file_format, batch_size)


def files(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))
            if not name.startswith(".")}


ROWS = [row(f"s{i % 4}", f"k{i % 3}", START + (i % 3) * MINUTE, i + 1, i, 0.1 * i) for i in range(12)]


def test_file_names_are_one_per_window_and_deterministic():
    assert file_sink.window_file_name(START, START + MINUTE, "parquet") == \
        "2026-11-02T09-00-00.000Z_2026-11-02T09-01-00.000Z.parquet"
    with pytest.raises(ValueError, match="parquet or avro"):
        file_sink.window_file_name(START, START + MINUTE, "csv")


@pytest.mark.parametrize("file_format", file_sink.FORMATS)
def test_writing_the_same_rows_again_gives_byte_identical_files(tmp_path, file_format):
    first, second = tmp_path / "a", tmp_path / "b"
    write(first, ROWS, file_format)
    written = files(first)
    assert len(written) == 3 and all(name.endswith("." + file_format) for name in written)
    write(first, list(reversed(ROWS)), file_format, batch_size=5)  # a replay, bundled differently
    assert files(first) == written
    write(second, ROWS[6:] + ROWS[:6], file_format, batch_size=1)  # from scratch, in another order
    assert files(second) == written
    assert not [n for n in os.listdir(first) if n.endswith(".tmp")]


@pytest.mark.parametrize("file_format", file_sink.FORMATS)
def test_older_versions_never_overwrite_newer_ones(tmp_path, file_format):
    write(tmp_path, [row("a", "x", START, 3, 30), row("b", "x", START, 1, 5)], file_format)
    write(tmp_path, [row("a", "x", START, 2, 20), row("b", "x", START, 4, 50), row("c", "x", START, 1, 1)],
          file_format)
    rows = file_sink.read_rows(str(tmp_path), SCHEMA, file_format)
    assert [(r["store"], r["event_count"], r["sum_qty"]) for r in rows] == [("a", 3, 30.0), ("b", 4, 50.0),
                                                                            ("c", 1, 1.0)]
    assert rows[0]["window_start"] == START and rows[0]["window_end"] == START + MINUTE


def test_rows_round_trip_with_their_types(tmp_path):
    write(tmp_path, ROWS, "parquet")
    assert file_sink.read_rows(str(tmp_path), SCHEMA, "parquet") == sorted(
        ({**r, "sum_qty": float(r["sum_qty"]), "max_price": float(r["max_price"])} for r in ROWS),
        key=SCHEMA.key_of)


def test_concurrent_writers_of_one_window_keep_every_row(tmp_path):
    file_sink.prepare_directory(str(tmp_path))
    errors = []

    def writer(part):
        try:
            for i in range(5):
                with file_sink._locked(str(tmp_path)):
                    file_sink.merge_window(str(tmp_path), SCHEMA, "parquet", [row(f"w{part}", f"k{i}", START, 1, i)])
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(part,)) for part in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(file_sink.read_rows(str(tmp_path), SCHEMA, "parquet")) == 20


@pytest.mark.parametrize("file_format", file_sink.FORMATS)
def test_a_window_file_with_other_columns_is_refused(tmp_path, file_format):
    write(tmp_path, [row("a", "x", START, 1, 1)], file_format)
    other = RowSchema(("store",), parse_aggregates("count"))
    with pytest.raises(ValueError, match="has columns"):
        file_sink.read_rows(str(tmp_path), other, file_format)
    # ... and before a job starts: a job with other aggregates wrote its other windows'
    # files, then failed at the first window it shared (a folder of two shapes).
    from onceflow.io.sinks import parse_sink_url, prepare_sink
    target = parse_sink_url(f"file://{tmp_path}?format={file_format}")
    prepare_sink(target, SCHEMA)
    with pytest.raises(ValueError, match=r"but this job writes \['store', 'window_start'"):
        prepare_sink(target, other)
    (tmp_path / f"zz.{file_format}").write_bytes(b"cut")  # the first file in name order is checked
    prepare_sink(target, SCHEMA)


@pytest.mark.parametrize("file_format", ["parquet", "avro"])
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_window_files_get_the_mode_the_umask_gives_a_new_file(tmp_path, file_format, umask):
    """Not mkstemp's owner-only 0600: others the umask lets read a file can read these."""
    previous = os.umask(umask)
    try:
        write(tmp_path / "out", ROWS, file_format)
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(previous)
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    modes = {name: (tmp_path / "out" / name).stat().st_mode & 0o777 for name in files(tmp_path / "out")}
    assert len(modes) == 3 and set(modes.values()) == {expected}, modes
