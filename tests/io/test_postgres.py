"""The PostgreSQL sinks against a real local PostgreSQL: guarded upserts that
survive a killed connection, hostile names refused, dead letters stored once."""

import threading
import time
import uuid

import apache_beam as beam
import psycopg
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline

from onceflow import metrics
from onceflow.aggregates import parse_aggregates
from onceflow.deadletter import DeadLetter
from onceflow.io.dlq.envelope import from_envelope
from onceflow.events import SourceRecord
from onceflow.io import postgres
from onceflow.io.dlq import WriteDeadLetters, parse_dlq_target, read_dead_letters_from
from onceflow.io.sinks import parse_sink_url, prepare_sink
from onceflow.rows import RowSchema, utc_millis, utc_now

SCHEMA = RowSchema(("store",), parse_aggregates("count,sum:qty,mean:price"))
MINUTE = 60_000


def row(store, start, n, qty, price=1.5):
    return {"store": store, "window_start": start, "window_end": start + MINUTE, "event_count": n, "count": n,
            "sum_qty": qty, "mean_price": price}


@pytest.fixture
def table():
    return f"t_{uuid.uuid4().hex[:12]}"


def read(dsn, table):
    """Every row without written_at, window bounds as epoch ms, sorted."""
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            f'SELECT store, window_start, window_end, event_count, "count", sum_qty, mean_price FROM "{table}"')
        return sorted((s, utc_millis(a), utc_millis(b), n, c, q, p) for s, a, b, n, c, q, p in rows)


def run_pipeline(dsn, table, rows, batch_size=2):
    pipeline = TestPipeline()
    _ = pipeline | beam.Create(rows) | postgres.WriteRowsToPostgres(dsn, table, SCHEMA, batch_size=batch_size)
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace(metrics.NAMESPACE))["counters"]
    return {c.key.metric.name: c.committed for c in counters}


pytestmark = pytest.mark.postgres


def test_replaying_the_same_rows_changes_nothing_but_written_at(postgres_dsn, table):
    rows = [row(f"s{i % 3}", (i // 3) * MINUTE, i + 1, i * 10, 0.1 * i) for i in range(11)]
    run_pipeline(postgres_dsn, table, rows)
    first = read(postgres_dsn, table)
    counters = run_pipeline(postgres_dsn, table, list(reversed(rows)), batch_size=3)
    assert read(postgres_dsn, table) == first and len(first) == 11
    assert counters[metrics.SINK_ROWS_WRITTEN] == 11 and counters.get(metrics.SINK_ROWS_STALE, 0) == 0
    assert [r[6] for r in first if r[0] == "s1" and r[1] == 0] == [0.1]  # floats round-trip exactly


def test_an_older_version_never_overwrites_a_newer_one(postgres_dsn, table):
    run_pipeline(postgres_dsn, table, [row("a", 0, 3, 30), row("b", 0, 1, 5), row("a", MINUTE, 2, 7)])
    counters = run_pipeline(postgres_dsn, table, [row("a", 0, 2, 20), row("b", 0, 4, 50)])
    assert read(postgres_dsn, table) == [
        ("a", 0, MINUTE, 3, 3, 30.0, 1.5),
        ("a", MINUTE, 2 * MINUTE, 2, 2, 7.0, 1.5),
        ("b", 0, MINUTE, 4, 4, 50.0, 1.5),
    ]
    assert counters[metrics.SINK_ROWS_STALE] == 1 and counters[metrics.SINK_ROWS_WRITTEN] == 1


def test_the_table_is_keyed_window_first(postgres_dsn, table):
    """Rows come window after window: a window-first index grows at its end."""
    run_pipeline(postgres_dsn, table, [row("a", 0, 1, 1)])
    with psycopg.connect(postgres_dsn) as connection:
        columns = [name for (name,) in connection.execute(
            "SELECT a.attname FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY k.n", (f'"{table}"',))]
    assert columns == ["window_start", "window_end", "store"]


def test_a_table_keyed_key_first_by_an_earlier_version_still_takes_guarded_upserts(postgres_dsn, table):
    with psycopg.connect(postgres_dsn) as connection:
        connection.execute(
            f'CREATE TABLE "{table}" (store TEXT, window_start TIMESTAMPTZ, window_end TIMESTAMPTZ, '
            'event_count BIGINT, "count" BIGINT, sum_qty DOUBLE PRECISION, mean_price DOUBLE PRECISION, '
            'written_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (store, window_start, window_end))')
    run_pipeline(postgres_dsn, table, [row("a", 0, 3, 30), row("b", 0, 1, 5)])
    counters = run_pipeline(postgres_dsn, table, [row("a", 0, 2, 20), row("b", 0, 4, 50)])
    assert read(postgres_dsn, table) == [("a", 0, MINUTE, 3, 3, 30.0, 1.5), ("b", 0, MINUTE, 4, 4, 50.0, 1.5)]
    assert counters[metrics.SINK_ROWS_STALE] == 1 and counters[metrics.SINK_ROWS_WRITTEN] == 1


def test_two_versions_in_one_batch_keep_the_newer(postgres_dsn, table):
    run_pipeline(postgres_dsn, table, [row("a", 0, 5, 50), row("a", 0, 2, 20)], batch_size=10)
    assert read(postgres_dsn, table) == [("a", 0, MINUTE, 5, 5, 50.0, 1.5)]


class _BackendKiller(threading.Thread):
    """Holds a lock the sink will need (``lock_sql``, by default a row lock on
    ``store``), waits until the sink's session is blocked on it (inside a batch's
    transaction), terminates that session with pg_terminate_backend, then releases
    the lock."""

    def __init__(self, dsn, table, store=None, lock_sql=None, lock_params=()):
        super().__init__(daemon=True)
        self.dsn, self.table = dsn, table
        self.lock_sql = lock_sql or f'SELECT 1 FROM "{table}" WHERE store = %s FOR UPDATE'
        self.lock_params = lock_params if lock_sql else (store,)
        self.locked = threading.Event()
        self.killed = []
        self.error = None

    def run(self):
        try:
            with psycopg.connect(self.dsn) as holder, psycopg.connect(self.dsn, autocommit=True) as admin:
                holder.execute(self.lock_sql, self.lock_params)
                self.locked.set()
                deadline = time.monotonic() + 120
                while not self.killed:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the sink never blocked on the locked row")
                    pids = [pid for (pid,) in admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
                        (postgres.application_name(self.table),))]
                    for pid in pids:
                        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                        self.killed.append(pid)
                    time.sleep(0.05)  # polling a condition with a deadline
                holder.rollback()
        except BaseException as error:  # reported by the test
            self.error = error
            self.locked.set()


def _killed_once(postgres_dsn, table, action, lock_sql, lock_params=()):
    """``action()`` while a session of the sink's, blocked on ``lock_sql``'s lock,
    is terminated once; its result."""
    killer = _BackendKiller(postgres_dsn, table, lock_sql=lock_sql, lock_params=lock_params)
    killer.start()
    assert killer.locked.wait(timeout=60) and killer.error is None, killer.error
    result = action()
    killer.join(timeout=60)
    assert killer.error is None, killer.error
    assert killer.killed, "no sink session was terminated"
    return result


def test_a_session_killed_while_a_job_starts_is_retried(postgres_dsn, table):
    """A torture's connection kill landed on the job's start-up (reading its
    positions): the live job exited with "cannot read or store the job's
    positions: terminating connection due to administrator command". Creating the
    tables, reading the latest window and reading positions are retried as the
    writes are."""
    from onceflow.io.progress import PROGRESS_TABLE, Position

    creating = 'SELECT pg_advisory_xact_lock(hashtext(%s))'
    _killed_once(postgres_dsn, table, lambda: postgres.ensure_table(postgres_dsn, table, SCHEMA), creating,
                 (postgres.application_name(table),))
    run_pipeline(postgres_dsn, table, [row("a", 0, 2, 5), row("a", MINUTE, 1, 1)], batch_size=10)
    latest = _killed_once(postgres_dsn, table, lambda: postgres.latest_window_ms(postgres_dsn, table),
                          f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
    assert latest == (MINUTE, 2 * MINUTE)
    progress = postgres.PostgresProgress(postgres_dsn, table)
    progress.write("g", [Position("orders", 0, 42, 7, 3)])
    stored = _killed_once(postgres_dsn, table, lambda: progress.read("g", "orders"), creating, (PROGRESS_TABLE,))
    assert stored == {0: Position("orders", 0, 42, 7, 3)}


def test_a_connection_killed_mid_batch_loses_and_doubles_nothing(postgres_dsn, table):
    postgres.ensure_table(postgres_dsn, table, SCHEMA)
    victim = "s_victim"
    with psycopg.connect(postgres_dsn) as connection:  # an old version the sink will overwrite
        connection.execute(postgres.upsert_sql(table, SCHEMA),
                           postgres.to_pg_values(row(victim, 0, 1, 0), SCHEMA, utc_now()))
    rows = [row(f"s{i:03d}", (i % 7) * MINUTE, i % 5 + 2, i, i / 8) for i in range(120)]
    rows.insert(15, row(victim, 0, 9, 99))  # the 6th row of the 2nd batch of 10
    killer = _BackendKiller(postgres_dsn, table, victim)
    killer.start()
    assert killer.locked.wait(timeout=60) and killer.error is None, killer.error
    counters = run_pipeline(postgres_dsn, table, rows, batch_size=10)
    killer.join(timeout=60)
    assert killer.error is None, killer.error
    assert killer.killed, "no sink session was terminated"
    assert counters[metrics.SINK_RETRIES] >= 1
    expected = sorted((r["store"], r["window_start"], r["window_end"], r["event_count"], r["count"],
                       float(r["sum_qty"]), r["mean_price"]) for r in rows)
    assert read(postgres_dsn, table) == expected  # every row once: none lost, none doubled
    assert counters[metrics.SINK_ROWS_WRITTEN] == len(rows)


def test_a_permanent_error_is_raised_at_once(postgres_dsn, table):
    postgres.ensure_table(postgres_dsn, table, SCHEMA)
    with psycopg.connect(postgres_dsn) as connection:
        connection.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT small CHECK (sum_qty < 100)')
    sink = postgres._PostgresUpsertDoFn(postgres_dsn, table, SCHEMA, batch_size=10)
    sink.setup()
    sink.start_bundle()
    sink.process(row("a", 0, 1, 1000))
    retried = []
    sink.recover = retried.append
    with pytest.raises(psycopg.errors.CheckViolation):
        sink.finish_bundle()
    sink.teardown()
    assert read(postgres_dsn, table) == [] and retried == []  # raised at once, never retried


@pytest.mark.parametrize("name", ['agg"; DROP TABLE x; --', "a'b", "t;", 'a"b', "a b"])
def test_hostile_table_names_are_refused(postgres_dsn, name):
    with pytest.raises(ValueError, match="not allowed"):
        postgres.create_table_sql(name, SCHEMA)
    with pytest.raises(ValueError, match="not allowed"):
        postgres.WriteRowsToPostgres(postgres_dsn, name, SCHEMA)
    with pytest.raises(ValueError, match="not allowed"):
        parse_sink_url(f"{postgres_dsn}?table={name}")
    with pytest.raises(ValueError, match="not allowed"):
        parse_dlq_target(f"{postgres_dsn}?table={name}")


@pytest.mark.parametrize("column", ['qty"; DROP TABLE x; --', "a;b", "it's"])
def test_hostile_column_names_are_refused(column):
    with pytest.raises(ValueError, match="not allowed"):
        RowSchema((column,), parse_aggregates("count"))


def test_an_existing_table_with_other_columns_gets_one_line(postgres_dsn, table):
    target = parse_sink_url(f"{postgres_dsn}?table={table}")
    prepare_sink(target, SCHEMA)
    prepare_sink(target, SCHEMA)  # idempotent
    with pytest.raises(ValueError, match="has columns") as caught:
        prepare_sink(target, RowSchema(("store",), parse_aggregates("count")))
    assert "\n" not in str(caught.value)


def test_column_types(postgres_dsn, table):
    postgres.ensure_table(postgres_dsn, table, SCHEMA)
    with psycopg.connect(postgres_dsn) as connection:
        types = dict(connection.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s", (table,)))
    assert types == {"store": "text", "window_start": "timestamp with time zone",
                     "window_end": "timestamp with time zone", "event_count": "bigint", "count": "bigint",
                     "sum_qty": "double precision", "mean_price": "double precision",
                     "written_at": "timestamp with time zone"}


@pytest.mark.parametrize("error, transient", [
    (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), True),
    (psycopg.errors.SerializationFailure("x"), True),
    (psycopg.errors.DeadlockDetected("x"), True),
    (psycopg.errors.LockNotAvailable("x"), True),
    (psycopg.OperationalError("server closed the connection unexpectedly"), True),
    (psycopg.OperationalError('connection failed: connection to server at "h", port 5432 failed: FATAL:  the '
                              'database system is starting up'), True),
    (psycopg.OperationalError('connection failed: connection to server at "h", port 5432 failed: FATAL:  sorry, '
                              'too many clients already'), True),
    (psycopg.OperationalError('connection failed: connection to server at "h", port 5432 failed: FATAL:  password '
                              'authentication failed for user "app"'), False),
    (psycopg.OperationalError('connection failed: connection to server at "h", port 5432 failed: FATAL:  no '
                              'pg_hba.conf entry for host "10.0.0.1", user "app", database "m", no encryption'), False),
    (psycopg.errors.UniqueViolation("x"), False),
    (psycopg.errors.CheckViolation("x"), False),
    (psycopg.errors.UndefinedColumn("x"), False),
    (psycopg.errors.ProgramLimitExceeded("x"), False),
    (ValueError("x"), False),
])
def test_transient_errors_are_told_from_permanent_ones(error, transient):
    assert postgres.is_transient(error) is transient


@pytest.mark.parametrize("change, said", [
    (lambda dsn: dsn.rsplit("/", 1)[0] + "/onceflow_no_such_db", 'database "onceflow_no_such_db" does not exist'),
    (lambda dsn: dsn.replace("//onceflow@", "//onceflow_no_such_role@"), 'role "onceflow_no_such_role" does not exist'),
    (lambda dsn: dsn + "?sslmode=bogus", 'invalid sslmode value: "bogus"'),
])
def test_a_connection_refused_for_good_is_not_retried(postgres_dsn, change, said):
    """A database or role that does not exist, or a connection string libpq cannot
    use, was retried for about 13 s and ended as a service down (exit 1); it is a
    wrong flag (exit 2), said at once."""
    from onceflow.io.retry import DatabaseUnreachable
    from onceflow.io.sinks import parse_sink_url, prepare_sink

    assert "//onceflow@" in postgres_dsn and "?" not in postgres_dsn
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(change(postgres_dsn), connect_timeout=5)
    assert said in str(caught.value)
    assert not postgres.is_transient(caught.value)
    started = time.monotonic()
    with pytest.raises(ValueError) as refused:
        prepare_sink(parse_sink_url(f"{change(postgres_dsn)}{'&' if '?' in change(postgres_dsn) else '?'}table=t"),
                     SCHEMA)
    assert not isinstance(refused.value, DatabaseUnreachable) and said in str(refused.value)
    assert time.monotonic() - started < 5  # no retry


LETTERS = [DeadLetter(SourceRecord(b"\x00\xff" + bytes([n]), {"topic": "orders", "partition": 0, "offset": n}),
                      "parse", "invalid_utf8", "UnicodeDecodeError", f"bad byte {n}", event_time_ms=n * 1000)
           for n in range(5)]


def write_letters(target):
    with TestPipeline() as pipeline:
        _ = pipeline | beam.Create(LETTERS) | WriteDeadLetters(target, "aggregate", "0.1.0")


def test_dead_letters_written_twice_are_stored_and_read_once(postgres_dsn, table):
    target = parse_dlq_target(f"{postgres_dsn}?table={table}")
    write_letters(target)
    write_letters(target)  # a retried bundle or a second run
    envelopes = list(read_dead_letters_from(target))
    assert len(envelopes) == 5
    assert sorted(from_envelope(e).value for e in envelopes) == sorted(l.record.value for l in LETTERS)
    by_offset = {e["source"]["offset"]: e for e in envelopes}
    assert by_offset[3]["event_time"] == "1970-01-01T00:00:03.000Z"
    assert by_offset[3]["dlq_id"] == LETTERS[3].dlq_id and by_offset[3]["message"] == "bad byte 3"
    assert set(envelopes[0]) == {"dlq_id", "reason", "error_class", "message", "stage", "source", "raw_base64",
                                 "raw_preview", "event_id", "event_time", "failed_at", "pipeline",
                                 "pipeline_version"}
    with psycopg.connect(postgres_dsn) as connection:
        assert connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] == 5


def test_a_write_the_database_refuses_for_good_ends_the_job_in_one_line(postgres_dsn, table, tmp_path):
    """A constraint the rows break (a DBA's CHECK, say) is not retried: the job ends
    with one line naming --sink and the database's reason, no traceback."""
    import subprocess
    import sys

    sink = f"--sink={postgres_dsn}?table={table}"
    job = [sys.executable, "-m", "onceflow.pipelines.aggregate", sink, f"--dlq={tmp_path}/dlq.jsonl", "--status=off"]
    assert subprocess.run(job, capture_output=True, text=True, timeout=300).returncode == 0
    with psycopg.connect(postgres_dsn) as connection:
        connection.execute(f'DELETE FROM "{table}"')
        connection.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT few CHECK (event_count > 100000)')
    result = subprocess.run(job, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f'aggregate: --sink: a write failed with an error that is not retried: new row for relation "{table}" '
        'violates check constraint "few"')


def test_a_login_that_may_not_read_the_positions_table_gets_one_line(postgres_dsn, table, tmp_path, capsys):
    """The start's window-size check reads the positions table: a login with no
    right on it ended the job with psycopg's traceback (41 lines)."""
    import urllib.parse

    from onceflow.pipelines.aggregate import main

    role = f"onceflow_test_{uuid.uuid4().hex[:8]}"
    postgres.PostgresProgress(postgres_dsn, table)._create()  # the shared table exists, owned by the dev login
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {role} LOGIN")
        connection.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
    parts = urllib.parse.urlsplit(postgres_dsn)
    as_role = parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}").geturl()
    try:
        status = main([f"--sink={as_role}?table={table}", f"--dlq={tmp_path}/dlq.jsonl", "--status=off"])
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as connection:
            connection.execute(f"DROP OWNED BY {role}")
            connection.execute(f"DROP ROLE {role}")
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"aggregate: error: --sink: cannot use postgresql {as_role} (table {table}): permission denied for table "
        "onceflow_progress")
