"""`onceflow dlq`: count, list, and replay after a fix."""

import base64
import json
import sqlite3

import pytest

from onceflow import cli
from onceflow.cli.dlq import replay_flags, select
from onceflow.deadletter import DeadLetter
from onceflow.errors import UsageError
from onceflow.events import SourceRecord
from onceflow.io.dlq.envelope import to_envelope, to_json_line
from onceflow.io.dlq.jsonl import read_dead_letters
from onceflow.options import SAMPLE_INPUT
from onceflow.pipelines.aggregate import run
from tests.livejob import new_topic, produce, sample_lines


def oslo_counts(db):
    with sqlite3.connect(db) as connection:
        return dict(connection.execute(
            "SELECT window_start, event_count FROM aggregates WHERE store = 'oslo-01' "
            "AND window_start IN ('2026-11-02T09:03:00.000Z', '2026-11-02T09:07:00.000Z')"))


def test_replay_after_a_fix_moves_the_records_into_the_sink(tmp_path, capsys):
    db, dlq = tmp_path / "out.db", tmp_path / "dlq.jsonl"
    job = [f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--status=off"]
    run(job)
    assert cli.main(["dlq", "count", "--dlq", str(dlq)]) == 0
    assert "too_late                    2" in capsys.readouterr().out
    before = oslo_counts(db)
    # The fix: a longer allowed lateness. Replay only the too-late records.
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--reason", "too_late", "--",
                     *job, "--allowed_lateness=3h"]) == 0
    after = oslo_counts(db)
    assert {window: after[window] - before[window] for window in before} == {
        "2026-11-02T09:03:00.000Z": 1, "2026-11-02T09:07:00.000Z": 1}
    # The records that still fail (the malformed ones) are listed once, not twice.
    assert len(list(read_dead_letters(str(dlq)))) == 11


def test_replay_of_dead_letters_from_several_files_needs_the_jobs_own_input(tmp_path, capsys):
    """Each window is recomputed from every file it was computed from: with the
    dead letters in two of three files, replay takes the job's original glob and
    refuses to guess it."""
    def event(event_id, minute):
        return json.dumps({"order_id": event_id, "event_time": f"2026-11-02T{minute}:00Z", "store": "s",
                           "qty": 1, "price": 1.0})
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join([event("a1", "10:00"), event("a2", "09:00")]) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text("\n".join([event("b1", "10:00"), event("b2", "09:00")]) + "\n")
    (tmp_path / "in" / "c.jsonl").write_text(event("c1", "09:00") + "\n")  # no dead letter, same window
    db, dlq = tmp_path / "out.db", tmp_path / "dlq.jsonl"
    job = [f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--status=off", "--allowed_lateness=5m"]
    run([*job, f"--input={tmp_path}/in/*.jsonl"])
    assert len(list(read_dead_letters(str(dlq)))) == 2  # a2 and b2, each after a later event of its file
    capsys.readouterr()
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--", *job, "--allowed_lateness=3h"]) == 2
    assert "one of 2 files) is not in the job's --input" in capsys.readouterr().err  # the default input
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--", *job, f"--input={tmp_path}/in/a.jsonl",
                     "--allowed_lateness=3h"]) == 2
    assert f"in/b.jsonl (where dead letters of the selection came from, one of 2 files) is not in the job's " \
           f"--input {tmp_path}/in/a.jsonl" in capsys.readouterr().err
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--", *job, "--input_format=json",
                     f"--input={tmp_path}/in/*.jsonl", "--allowed_lateness=3h"]) == 0
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT event_count FROM aggregates WHERE window_start = "
                                  "'2026-11-02T09:00:00.000Z'").fetchall() == [(3,)]  # a2, b2 and c1


def test_replay_of_a_fixed_record_in_one_of_several_files_reads_them_all(tmp_path, capsys):
    """A dead letter from one file of a glob, fixed in place: its window also holds
    an event of another file. A replay of that one file alone made the row of the
    other file's event and the fixed one's of the same size, and the guarded upsert
    took it: the row lost the other event. Replay reads the job's own input, and
    refuses one that does not hold the dead letter's file."""
    def event(event_id, qty):
        return json.dumps({"order_id": event_id, "event_time": "2026-11-02T10:00:00Z", "store": "s", "qty": qty,
                           "price": 1.0})
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(event("a1", 1) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text(event("b1", 100)[:-1] + "\n")  # no closing brace: malformed
    db, dlq = tmp_path / "out.db", tmp_path / "dlq.jsonl"
    job = [f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--status=off"]
    run([*job, f"--input={tmp_path}/in/*.jsonl"])
    (tmp_path / "in" / "b.jsonl").write_text(event("b1", 100) + "\n")  # the fix
    capsys.readouterr()
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--", *job]) == 2  # the default input
    assert f"{tmp_path}/in/b.jsonl (where dead letters of the selection came from) is not in the job's --input" \
        in capsys.readouterr().err
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--", *job, f"--input={tmp_path}/in/*.jsonl"]) == 0
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT event_count, sum_qty FROM aggregates").fetchall() == [(2, 101)]


def test_replay_refuses_a_range_and_an_unknown_reason(tmp_path, capsys):
    dlq = tmp_path / "dlq.jsonl"
    run([f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={dlq}", "--status=off"])
    capsys.readouterr()
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--", "--from=earliest", "--allowed_lateness=3h"]) == 2
    assert "--from after --: replay reads the range itself" in capsys.readouterr().err
    # It said "unknown flag --margin".
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--", "--margin", "2h", "--allowed_lateness=3h"]) == 2
    assert "--margin after --: it is a flag of dlq replay, not of the job; put it before --" in capsys.readouterr().err
    assert cli.main(["dlq", "count", "--dlq", str(dlq), "--reason", "too_lat"]) == 2
    assert ("--reason: 'too_lat' is not a reason onceflow gives, nor one of a dead letter in the queue; "
            "onceflow's: invalid_utf8,") in capsys.readouterr().err


def test_replay_without_the_jobs_sink_is_refused_when_the_default_one_does_not_exist(tmp_path, capsys,
                                                                                       monkeypatch):
    """The documented `-- --allowed_lateness=3h` without the job's --sink wrote the
    replayed rows into a new onceflow-output/aggregates.db, beside nothing."""
    dlq = tmp_path / "dlq.jsonl"
    run([f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={dlq}", "--status=off"])
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--reason", "too_late", "--", "--allowed_lateness=3h"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "onceflow: error: no --sink after --: the job's default sink onceflow-output/aggregates.db does not exist "
        "here, so the replayed rows would go to a new database, not beside the rows they belong with; give the "
        "--sink the job wrote to after --"]
    assert not (tmp_path / "onceflow-output").exists()


def test_a_reason_of_a_users_own_job_is_selected(tmp_path, capsys):
    """A queue written by a user's own job (say a YAML pipeline) can hold reasons
    onceflow never gives: --reason selects them, even where other filters leave
    none, and refuses only a name no dead letter of the queue has."""
    dlq = tmp_path / "dlq.jsonl"
    run([f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={dlq}", "--status=off"])
    envelopes = [json.loads(line) for line in dlq.read_text().splitlines()]
    envelopes[0]["reason"] = "price_out_of_range"
    dlq.write_text("".join(json.dumps(envelope) + "\n" for envelope in envelopes))
    capsys.readouterr()
    assert cli.main(["dlq", "count", "--dlq", str(dlq), "--reason", "price_out_of_range"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{'price_out_of_range':<20} {1:>8,}", f"{'total':<20} {1:>8,}"]
    assert cli.main(["dlq", "count", "--dlq", str(dlq), "--reason", "price_out_of_range",
                     "--until", "2000-01-01T00:00:00Z"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{'total':<20} {0:>8,}"]
    assert cli.main(["dlq", "count", "--dlq", str(dlq), "--reason", "price_out_of_rang"]) == 2
    assert "--reason: 'price_out_of_rang' is not a reason onceflow gives" in capsys.readouterr().err


def test_list_filters_by_reason(tmp_path, capsys):
    dlq = tmp_path / "dlq.jsonl"
    run([f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={dlq}", "--status=off"])
    capsys.readouterr()
    assert cli.main(["dlq", "list", "--dlq", str(dlq), "--reason", "schema_violation", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and {json.loads(line)["reason"] for line in lines} == {"schema_violation"}


def test_replay_range_of_kafka_records_starts_a_margin_early_and_reads_to_the_end():
    """To the end: records of the selected records' windows may be stamped later in
    other partitions (a producer sending late)."""
    envelopes = [{"source": {"topic": "orders", "partition": 0, "offset": 5, "timestamp_ms": 1_000_000}},
                 {"source": {"topic": "orders", "partition": 2, "offset": 9, "timestamp_ms": 4_000_000}}]
    assert replay_flags(envelopes, 60_000) == ["--from=1970-01-01T00:15:40.000Z", "--to=latest"]
    with pytest.raises(UsageError, match="one topic at a time"):
        replay_flags([*envelopes, {"source": {"topic": "other", "partition": 0, "offset": 1, "timestamp_ms": 1}}], 0)


def test_select_by_time_of_failure():
    envelopes = [{"reason": "too_late", "failed_at": "2026-11-02T09:00:00.000000Z"},
                 {"reason": "too_late", "failed_at": "2026-11-02T10:00:00.000000Z"}]
    since = (1793613600000 - 1) * 1000  # just before 10:00
    assert select(envelopes, ["too_late"], since_us=since) == envelopes[1:]


def test_a_failure_time_pasted_from_the_list_selects_to_the_microsecond(tmp_path, capsys):
    """--since/--until compared whole milliseconds: records that failed within one
    millisecond of a `failed_at` pasted from `dlq list` were all in or all out."""
    dlq = tmp_path / "dlq.jsonl"
    times = ["2026-12-05T04:50:46.073223Z", "2026-12-05T04:50:46.073435Z", "2026-12-05T04:50:46.073900Z"]
    good = json.loads(GOOD_LINE)
    dlq.write_text("".join(json.dumps({**good, "dlq_id": f"id-{n}", "failed_at": failed_at}) + "\n"
                           for n, failed_at in enumerate(times)))  # a dead letter written twice counts once
    assert cli.main(["dlq", "count", "--dlq", str(dlq), "--since", times[1]]) == 0
    assert capsys.readouterr().out.split()[-2:] == ["total", "2"]
    assert cli.main(["dlq", "count", "--dlq", str(dlq), "--until", times[1]]) == 0
    assert capsys.readouterr().out.split()[-2:] == ["total", "1"]
    assert cli.main(["dlq", "count", "--dlq", str(dlq), "--since", "2026-12-05T05:50:46.0735+01:00"]) == 0
    assert capsys.readouterr().out.split()[-2:] == ["total", "1"]
    assert cli.main(["dlq", "count", "--dlq", str(dlq), "--since", times[2], "--until", times[0]]) == 2
    assert f"--since {times[2]} is not before --until {times[0]}: no record can match" in capsys.readouterr().err


@pytest.mark.kafka
def test_replay_of_kafka_dead_letters_through_a_kafka_queue_with_a_client_properties_file(
        kafka_bootstrap, tmp_path, capsys):
    """The job reads a topic and dead-letters to a Kafka topic; `onceflow dlq` reads
    that queue with the client settings of a properties file (as a secured cluster
    needs) and replays the too-late records into the sink."""
    topic, queue = new_topic(kafka_bootstrap), new_topic(kafka_bootstrap, partitions=1)
    produce(topic, [(n % 3, line, None) for n, line in enumerate(sample_lines())])
    db = tmp_path / "out.db"
    job = [f"--input={topic.url}", f"--sink=sqlite:///{db}", f"--dlq={queue.url}", "--status=off"]
    run([*job, "--from=earliest", "--to=latest"])
    before = oslo_counts(db)
    properties = tmp_path / "client.properties"
    properties.write_text("# the queue's cluster\nclient.id=onceflow-dlq-test\nsocket.timeout.ms=30000\n")
    with_settings = ["--dlq", queue.url, "--kafka_config_file", str(properties)]

    capsys.readouterr()
    assert cli.main(["dlq", "count", *with_settings]) == 0
    counted = capsys.readouterr().out
    assert "too_late                    2" in counted and "total                      11" in counted

    assert cli.main(["dlq", "replay", *with_settings, "--reason", "too_late", "--", *job,
                     "--allowed_lateness=3h"]) == 0
    after = oslo_counts(db)
    assert {window: after[window] - before[window] for window in before} == {
        "2026-11-02T09:03:00.000Z": 1, "2026-11-02T09:07:00.000Z": 1}
    capsys.readouterr()
    assert cli.main(["dlq", "list", *with_settings, "--limit", "0", "--json"]) == 0
    letters = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(letters) == 11 and all(letter["source"]["topic"] == topic.topic for letter in letters)


@pytest.mark.kafka
def test_replay_of_a_too_late_kafka_record_reads_its_window_from_its_start(kafka_bootstrap, tmp_path, capsys):
    """A record two hours late in the log: its window's other record is two hours
    before it, out of a one-hour margin around it. The replay's range starts at its
    window's start (less the margin), so the row counts both, not the late one alone.
    It reads to the topic's end: a third record of the window, in another partition,
    was sent four hours late; a range that stopped an hour after the late record
    missed it, and the replayed row (as many events as the stored one) replaced the
    stored row without it."""
    topic = new_topic(kafka_bootstrap, partitions=2)
    t0 = 1_793_613_600_000  # 2026-11-02T10:00:00Z

    def event(event_id, minutes, qty):
        return json.dumps({"order_id": event_id, "event_time": t0 + minutes * 60_000, "store": "s",
                           "qty": qty, "price": 1.0}).encode()
    produce(topic, [(0, event("e1", 0, 1), t0), (0, event("hi", 120, 1), t0 + 60_000),
                    (0, event("e4", 0, 100), t0 + 7_200_000), (1, event("p1", 0, 1000), t0 + 14_400_000)])
    db, dlq = tmp_path / "out.db", tmp_path / "dlq.jsonl"
    job = [f"--input={topic.url}", f"--sink=sqlite:///{db}", f"--dlq={dlq}", "--status=off"]
    run([*job, "--from=earliest", "--to=latest"])
    assert [letter["reason"] for letter in read_dead_letters(str(dlq))] == ["too_late"]
    capsys.readouterr()
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--reason", "too_late", "--", *job,
                     "--allowed_lateness=3h"]) == 0
    assert "--from=2026-11-02T09:00:00.000Z --to=latest" in capsys.readouterr().err
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT event_count, sum_qty FROM aggregates WHERE window_start = "
                                  "'2026-11-02T10:00:00.000Z'").fetchall() == [(3, 1101)]


@pytest.mark.kafka
def test_the_dlq_command_passes_its_kafka_settings_to_the_client(kafka_bootstrap, tmp_path, capsys):
    queue = new_topic(kafka_bootstrap, partitions=1)
    properties = tmp_path / "client.properties"
    properties.write_text("sasl.password=planted-s3cr3t\nno.such.setting=1\n")
    status = cli.main(["dlq", "count", "--dlq", queue.url, "--kafka_config_file", str(properties)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "no.such.setting" in err[0], err
    assert "planted-s3cr3t" not in err[0]
    assert cli.main(["dlq", "count", "--dlq", queue.url, "--kafka_setting", "enable.auto.commit=true"]) == 2
    assert "enable.auto.commit must stay false" in capsys.readouterr().err
    assert cli.main(["dlq", "count", "--dlq", str(tmp_path / "dlq.jsonl"), "--kafka_setting", "client.id=x"]) == 2
    assert "only a kafka:// queue" in capsys.readouterr().err


# -- bad input: one line on stderr and a non-zero status, never a traceback ----------

GOOD_LINE = to_json_line(to_envelope(DeadLetter(SourceRecord(b"x", {"file": "in.jsonl", "line": 1}), "parse",
                                                "malformed_json", "E", "m"), "aggregate", "0.1.0"))
COMMANDS = [["count"], ["list"], ["replay", "--", "--sink=sqlite:///unused.db"]]


def one_error_line(capsys) -> str:
    """The one line the command wrote to stderr (and that it is one, without a traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command[0])
@pytest.mark.parametrize("content, expected", [
    (f"{GOOD_LINE}\n{{not json\n".encode(), "line 2 is not a dead letter: not JSON"),
    (b"hello, world\nnot a queue\n", "line 1 is not a dead letter: not JSON"),
    (f"{GOOD_LINE}\n{{\"text\": \"cut".encode(), "line 2 is not a dead letter: not JSON"),  # not a dead letter's
    (b'{\n  "a": 1\n}\n', "line 1 is not a dead letter: not JSON"),  # pretty-printed JSON: never appended to
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01", "line 1 is not a dead letter: it is not UTF-8 text"),
    (b'{"dlq_id": "a"}\n', "line 1 is not a dead letter: no 'reason' field"),
    # A field of the wrong type was said to be missing.
    (GOOD_LINE.replace('"reason":"malformed_json"', '"reason":5').encode() + b"\n",
     "line 1 is not a dead letter: its 'reason' is a number, not text"),
    (b"[1, 2]\n", "line 1 is not a dead letter: a JSON list"),
], ids=["corrupt", "text", "truncated-other-json", "pretty-json", "binary", "other-json", "wrong-type",
        "not-an-object"])
def test_a_file_that_is_not_a_queue_is_one_line_naming_the_file_and_line(tmp_path, capsys, command, content,
                                                                          expected):
    path = tmp_path / "dlq.jsonl"
    path.write_bytes(content)
    assert cli.main(["dlq", command[0], f"--dlq={path}", *command[1:]]) == 2
    assert f"--dlq: {path} {expected}" in one_error_line(capsys)


@pytest.mark.parametrize("cut_at", [40, 20, 2], ids=["in-a-value", "in-a-string", "in-the-first-key"])
def test_a_dead_letter_cut_off_mid_record_is_skipped_and_a_job_appends_after_it(tmp_path, capsys, cut_at):
    """A writer stopped mid-record (killed while appending) left a cut last line:
    every command refused the whole queue, and the next run appended its first
    dead letter to the cut line, losing it, after which the queue was not JSON.
    The cut record is skipped with a warning (its bundle did not complete: the job
    writes it again), and a writer starts on a new line."""
    dlq = tmp_path / "dlq.jsonl"
    dlq.write_bytes(f"{GOOD_LINE}\n{GOOD_LINE[:cut_at]}".encode())
    assert cli.main(["dlq", "count", f"--dlq={dlq}"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split()[-2:] == ["total", "1"]
    assert "line 2: a dead letter cut off mid-record" in captured.err and "Traceback" not in captured.err
    run([f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={dlq}", "--status=off"])  # the sample: 11 dead letters
    capsys.readouterr()
    assert cli.main(["dlq", "count", f"--dlq={dlq}"]) == 0
    assert capsys.readouterr().out.split()[-2:] == ["total", "12"]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command[0])
def test_a_directory_or_a_missing_file_is_not_an_empty_queue(tmp_path, capsys, command):
    assert cli.main(["dlq", command[0], f"--dlq={tmp_path}", *command[1:]]) == 2
    assert f"--dlq: cannot read {tmp_path}: Is a directory" in one_error_line(capsys)
    missing = tmp_path / "missing.jsonl"
    assert cli.main(["dlq", command[0], f"--dlq={missing}", *command[1:]]) == 2
    assert f"--dlq: {missing} does not exist" in one_error_line(capsys)


def test_a_job_that_dead_letters_nothing_leaves_an_empty_queue(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(json.dumps({"order_id": "a", "event_time": "2026-11-02T10:00:00Z",
                                                   "store": "s", "qty": 1, "price": 1.0}) + "\n")
    dlq = tmp_path / "dlq.jsonl"
    run([f"--input={tmp_path}/in.jsonl", f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={dlq}", "--status=off"])
    capsys.readouterr()
    assert cli.main(["dlq", "count", f"--dlq={dlq}"]) == 0
    assert capsys.readouterr().out.split() == ["total", "0"]


def test_a_negative_limit_is_refused(tmp_path, capsys):
    path = tmp_path / "dlq.jsonl"
    path.write_text(GOOD_LINE + "\n")
    assert cli.main(["dlq", "list", f"--dlq={path}", "--limit=-5"]) == 2
    assert "--limit: -5 is negative" in one_error_line(capsys)


def test_a_postgresql_server_out_of_reach_is_one_line(capsys, few_database_retries):
    assert cli.main(["dlq", "count", "--dlq=postgresql://onceflow:s3cret@127.0.0.1:1/onceflow"]) == 1
    line = one_error_line(capsys)
    assert "--dlq: cannot read postgresql postgresql://onceflow:***@127.0.0.1:1/onceflow" in line
    assert "Connection refused" in line and "s3cret" not in line


@pytest.mark.postgres
def test_a_missing_database_or_dead_letter_table_is_one_line(postgres_dsn, capsys):
    other_database = postgres_dsn.rpartition("/")[0] + "/nosuchdb"
    assert cli.main(["dlq", "count", f"--dlq={other_database}"]) == 2  # as the job refuses it: the user's to fix
    assert 'database "nosuchdb" does not exist' in one_error_line(capsys)
    assert cli.main(["dlq", "list", f"--dlq={postgres_dsn}?table=test_nosuch_table_xyz"]) == 2
    assert (f"--dlq: no dead-letter table 'test_nosuch_table_xyz' exists in {postgres_dsn}: check ?table="
            in one_error_line(capsys))
    import psycopg  # a rows table given as the queue: a usage error, not the server's (exit 1)

    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS test_rows_not_letters (store TEXT, event_count BIGINT)")
    assert cli.main(["dlq", "count", f"--dlq={postgres_dsn}?table=test_rows_not_letters"]) == 2
    assert "table 'test_rows_not_letters' in" in one_error_line(capsys)


def test_an_unreachable_broker_is_one_line_naming_it(capsys):
    """The client's own wait (the metadata request's), then what failed: no
    KafkaError{...} repr. Needs no broker: nothing listens on port 1."""
    assert cli.main(["dlq", "count", "--dlq=kafka://127.0.0.1:1/dlq"]) == 1
    line = one_error_line(capsys)
    assert "--dlq: cannot read kafka://127.0.0.1:1/dlq: cannot reach Kafka at 127.0.0.1:1 within 10s" in line
    assert "KafkaError{" not in line


@pytest.mark.kafka
def test_a_missing_queue_topic_is_a_usage_error_as_a_missing_file(kafka_bootstrap, capsys):
    """A misspelt topic is the user's to fix (exit 2, as a missing file or table),
    not a broker failing (exit 1); nor is it to be created, as the job's inputs are."""
    for command in ("count", "list"):
        assert cli.main(["dlq", command, f"--dlq=kafka://{kafka_bootstrap}/no-such-queue-topic"]) == 2
        line = one_error_line(capsys)
        queue = f"kafka://{kafka_bootstrap}/no-such-queue-topic"
        assert f"--dlq: {queue} does not exist: give the job's --dlq topic" in line
        assert "create it" not in line


def test_a_replay_whose_input_broker_is_out_of_reach_is_one_line(tmp_path, capsys):
    """The replay's look at the topic's log starts logged the client's errors and
    ended in a KafkaError{...} repr. Needs no broker: nothing listens on port 1."""
    record = SourceRecord(b"{}", {"topic": "orders", "partition": 0, "offset": 5, "timestamp_ms": 1_793_613_600_000})
    dlq = tmp_path / "dlq.jsonl"
    dlq.write_text(to_json_line(to_envelope(DeadLetter(record, "window", "too_late", "E", "m"), "aggregate", "0.1.0"))
                   + "\n")
    (tmp_path / "out.db").touch()
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--", "--input=kafka://127.0.0.1:1/orders",
                     f"--sink=sqlite:///{tmp_path}/out.db"]) == 1
    line = one_error_line(capsys)
    assert "--input: cannot read the offsets of kafka://127.0.0.1:1/orders: " in line
    assert "is the broker up, and does security.protocol fit its listener?" in line
    assert "KafkaError{" not in line


def test_a_client_setting_the_kafka_client_refuses_is_a_usage_error(capsys):
    assert cli.main(["dlq", "count", "--dlq=kafka://127.0.0.1:1/dlq", "--kafka_setting", "no.such.setting=1",
                     "--kafka_setting", "sasl.password=planted-s3cr3t"]) == 2
    line = one_error_line(capsys)
    assert "the Kafka client refused the settings" in line and "no.such.setting" in line
    assert "planted-s3cr3t" not in line


def test_a_dead_letters_id_does_not_depend_on_how_its_files_path_was_spelled(tmp_path, capsys, monkeypatch):
    """The source of a file record held the path as the glob spelled it, and the
    dead letter's ID hashes the source: a replay (or a rerun) with --input
    ./in/*.jsonl or an absolute path appended every dead letter again under a new
    ID (27 dead letters for 18). Sources hold the absolute path now, so a replay
    from another folder finds the files too."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(open(SAMPLE_INPUT, "rb").read())
    job = ["--sink=sqlite:///out.db", "--dlq=dlq.jsonl", "--status=off"]
    for spelled in ("in/*.jsonl", "./in/*.jsonl", f"{tmp_path}/in/../in/a.jsonl"):
        run([*job, f"--input={spelled}"])
        assert len(list(read_dead_letters("dlq.jsonl"))) == 11
    assert {letter["source"]["file"] for letter in read_dead_letters("dlq.jsonl")} == {f"{tmp_path}/in/a.jsonl"}
    monkeypatch.chdir(tmp_path / "in")
    capsys.readouterr()
    assert cli.main(["dlq", "replay", "--dlq", "../dlq.jsonl", "--reason", "too_late", "--", "--input=*.jsonl",
                     "--sink=sqlite:///../out.db", "--dlq=../dlq.jsonl", "--allowed_lateness=3h"]) == 0
    assert len(list(read_dead_letters(str(tmp_path / "dlq.jsonl")))) == 11


@pytest.mark.kafka
def test_replay_of_kafka_records_is_a_backfill_of_their_own_topic_while_it_holds_them(
        kafka_bootstrap, tmp_path, capsys):
    """Four replays the queue's records could not come back from, each reported
    done (exit 0): the job reading another topic (it backfilled that one), a
    kafka:// sink (refused as a live job's), records retention had deleted (read
    0, rows 0), and, without --dlq after --, records that still failed went to the
    job's default queue while the summary said they were in the replayed one."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    from onceflow.io.kafka.admin import read_records_to_end

    topic, other, rows = (new_topic(kafka_bootstrap), new_topic(kafka_bootstrap),
                          new_topic(kafka_bootstrap, partitions=1))
    produce(topic, [(n % 3, line, None) for n, line in enumerate(sample_lines())])
    dlq = tmp_path / "dlq.jsonl"
    run([f"--input={topic.url}", f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={dlq}", "--status=off",
         "--from=earliest", "--to=latest"])
    replay = ["dlq", "replay", "--dlq", str(dlq), "--reason", "too_late", "--", f"--sink={rows.url}",
              "--allowed_lateness=3h"]
    capsys.readouterr()
    assert cli.main([*replay, f"--input={other.url}"]) == 2
    assert f"came from Kafka topic {topic.topic}; the job's --input is {other.url}" in one_error_line(capsys)
    assert cli.main([*replay, f"--input={SAMPLE_INPUT}"]) == 2
    assert f"came from Kafka topic {topic.topic}; the job's --input is {SAMPLE_INPUT}" in one_error_line(capsys)

    assert cli.main([*replay, f"--input={topic.url}"]) == 0  # into a kafka:// sink; no --dlq: the queue replayed
    assert f"still fail are in {dlq} under their old dlq_id" in capsys.readouterr().out
    assert len(list(read_records_to_end(rows))) > 0
    assert len(list(read_dead_letters(str(dlq)))) == 11

    letters = [letter for letter in read_dead_letters(str(dlq)) if letter["reason"] == "too_late"]
    partition = letters[0]["source"]["partition"]
    admin = AdminClient({"bootstrap.servers": topic.bootstrap_servers})
    for future in admin.delete_records([TopicPartition(topic.topic, partition,
                                                       letters[0]["source"]["offset"] + 1)]).values():
        future.result(30)
    capsys.readouterr()
    assert cli.main([*replay, f"--input={topic.url}"]) == 2
    assert f"no longer in {topic.topic} (partition {partition} starts at offset" in one_error_line(capsys)


def test_select_by_source_topic_or_files():
    envelopes = [{"reason": "too_late", "failed_at": "2026-11-02T09:00:00.000000Z", "source": source}
                 for source in ({"topic": "a", "partition": 0, "offset": 1}, {"topic": "b", "partition": 0, "offset": 1},
                                {"file": "/data/in/x.jsonl", "line": 3}, {"file": "/data/other/y.jsonl", "line": 1})]
    assert select(envelopes, source="a") == envelopes[:1]
    assert select(envelopes, source="/data/in/*.jsonl") == envelopes[2:3]
    assert select(envelopes, source="/data/*/*.jsonl") == envelopes[2:]


def test_a_source_no_dead_letter_came_from_is_noted(tmp_path, capsys):
    """A misspelt topic or path selected nothing and counted 0 as if the queue held
    none from it: the count stays 0 (a source may have had no failure yet) and a
    note names the queue's sources; a source some dead letters came from, though
    other filters leave none of them, and an empty queue, count 0 without a note."""
    dlq = tmp_path / "dlq.jsonl"
    run([f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={dlq}", "--status=off"])
    files = {json.loads(line)["source"]["file"] for line in dlq.read_text().splitlines()}
    assert len(files) == 1
    capsys.readouterr()
    assert cli.main(["dlq", "count", "--dlq", str(dlq), "--source", "ordrs"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{'total':<20} {0:>8,}"]
    assert err.strip() == f"onceflow: note: --source: no dead letter in {dlq} came from 'ordrs'; they came from " \
                          f"{next(iter(files))}"
    assert cli.main(["dlq", "count", "--dlq", str(dlq), "--source", files.pop(), "--reason", "too_late"]) == 0
    assert capsys.readouterr() == (f"{'too_late':<20} {2:>8,}\n{'total':<20} {2:>8,}\n", "")
    assert cli.main(["dlq", "count", "--dlq", str(dlq), "--source", "/*", "--until", "2000-01-01T00:00:00Z"]) == 0
    assert capsys.readouterr() == (f"{'total':<20} {0:>8,}\n", "")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(["dlq", "count", "--dlq", str(empty), "--source", "orders"]) == 0
    assert capsys.readouterr() == (f"{'total':<20} {0:>8,}\n", "")


def test_replay_of_kafka_records_without_kafka_timestamps_reads_their_windows():
    """A record with no Kafka timestamp (-1, or none kept) failed the replay with a
    TypeError; its window's bounds give the range instead."""
    class Job:  # what replay_flags reads of the job
        kafka = type("Kafka", (), {"topic": type("Topic", (), {"topic": "orders"})()})()
        from_archive, time_source = False, "field"
        from onceflow.events import EventContract
        from onceflow.windowing import WindowSpec
        contract = EventContract(time_field="t", key_fields=("k",), value_fields=(), id_field="id")
        window_spec = WindowSpec(size_ms=60_000, allowed_lateness_ms=0)

    raw = json.dumps({"id": "1", "t": 1_793_613_600_000, "k": "s"}).encode()
    envelopes = [{"source": {"topic": "orders", "partition": 0, "offset": 5, "timestamp_ms": stamp},
                  "raw_base64": base64.b64encode(raw).decode()} for stamp in (-1, None)]
    assert replay_flags(envelopes, 0, Job()) == ["--from=2026-11-02T10:00:00.000Z", "--to=latest"]
    with pytest.raises(UsageError, match="carry no Kafka timestamp"):
        replay_flags(envelopes, 0)


@pytest.mark.kafka
@pytest.mark.parametrize("message, expected", [
    (b'{"dlq_id": "x"}', "offset 0 is not a dead letter: no 'reason' field of an envelope"),
    (GOOD_LINE.replace('"failed_at":"', '"failed_at":"yesterday').encode(), "failed_at 'yesterday"),
], ids=["no-reason", "a-bad-time"])  # GOOD_LINE holds the time of import: an ID of it differs between workers
def test_a_kafka_queue_message_that_is_not_an_envelope_is_one_line(kafka_bootstrap, capsys, message, expected):
    """A JSON message without an envelope's fields failed in a KeyError traceback
    (files were checked, topics were not)."""
    queue = new_topic(kafka_bootstrap, partitions=1)
    produce(queue, [(0, message, None)])
    assert cli.main(["dlq", "count", "--dlq", queue.url]) == 2
    assert expected in one_error_line(capsys)


@pytest.mark.kafka
def test_a_replay_of_records_compaction_removed_is_refused(kafka_bootstrap, tmp_path, capsys):
    """A too_late record replaced by a newer record of its Kafka key and removed
    by compaction: the replay read nothing of it and said done (exit 0), the
    event counted nowhere while its letter stayed in the queue."""
    import time
    import uuid

    from confluent_kafka import Producer

    from onceflow.io.kafka.admin import read_records_to_end
    from onceflow.io.kafka.config import KafkaTopic
    from onceflow_dev import devstack

    topic = KafkaTopic(kafka_bootstrap, f"t-{uuid.uuid4().hex[:10]}")
    devstack.create_topic(topic.topic, partitions=1, config={
        "cleanup.policy": "compact", "segment.ms": "500", "min.cleanable.dirty.ratio": "0.001",
        "delete.retention.ms": "500", "min.compaction.lag.ms": "0", "retention.ms": "-1"})
    producer = Producer({"bootstrap.servers": kafka_bootstrap})

    def send(key, order, minute):
        line = json.dumps({"order_id": order, "event_time": 1_790_300_000_000 + minute * 60_000, "store": "s",
                           "qty": 1, "price": 2.5}).encode()
        producer.produce(topic.topic, key=key.encode(), value=line)
        producer.flush(30)

    for minute in range(20):
        send(f"k{minute}", f"e{minute}", minute)
    send("late", "late-1", 0)  # 19 minutes behind: too late under the default 5 minutes
    dlq = tmp_path / "dlq.jsonl"
    run([f"--input={topic.url}", "--from=earliest", "--to=latest", f"--sink=sqlite:///{tmp_path}/out.db",
         f"--dlq={dlq}", "--status=off"])
    letters = list(read_dead_letters(str(dlq)))
    assert [letter["reason"] for letter in letters] == ["too_late"], letters
    send("late", "late-2", 25)  # the key's newer record: compaction removes the refused one
    deadline = time.monotonic() + 120
    while letters[0]["source"]["offset"] in {offset for _, offset, _, _ in read_records_to_end(topic)}:
        assert time.monotonic() < deadline, "the broker did not compact the topic in 120 s"
        send("roll", "roll", 26)  # closes the active segment, which is never compacted
        time.sleep(2)
    capsys.readouterr()
    assert cli.main(["dlq", "replay", "--dlq", str(dlq), "--reason", "too_late", "--", f"--input={topic.url}",
                     f"--sink=sqlite:///{tmp_path}/out.db", f"--dlq={dlq}", "--allowed_lateness=1h"]) == 2
    assert (f"1 of the 1 selected records are no longer in {topic.topic} (the compacted topic keeps a newer record "
            f"of the same key in place of the record at partition 0 offset 20)") in one_error_line(capsys)
