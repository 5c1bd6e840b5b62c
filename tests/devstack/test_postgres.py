"""The dev PostgreSQL cluster is a real PostgreSQL, reachable on loopback."""

from __future__ import annotations

import uuid

import pytest

from onceflow_dev.devstack import postgres

pytestmark = [pytest.mark.postgres]


def test_round_trip(postgres_dsn):
    import psycopg

    table = f"devstack_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, name text NOT NULL)")
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} (id, name) VALUES (%s, %s)", [(i, f"n{i}") for i in range(100)]
            )
        conn.commit()
        conn.execute(
            f"INSERT INTO {table} (id, name) VALUES (7, 'seven') "
            "ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name"
        )
        rows = conn.execute(f"SELECT id, name FROM {table} ORDER BY id").fetchall()
        conn.execute(f"DROP TABLE {table}")
    assert len(rows) == 100
    assert rows[7] == (7, "seven") and rows[8] == (8, "n8")


def test_server_identity(postgres_dsn):
    import psycopg

    with psycopg.connect(postgres_dsn) as conn:
        version = conn.info.server_version  # e.g. 150018
        assert conn.execute("SELECT current_database(), current_user").fetchone() == ("onceflow", "onceflow")
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        data_dir = conn.execute("SHOW data_directory").fetchone()[0]
    assert version >= 130000
    bindir = postgres.find_bindir()
    assert bindir is not None
    assert data_dir == postgres.status()["data_dir"], "the server answering is the cluster started here"
    assert postgres.status()["server_version"].startswith(f"{version // 10000}.")


def test_up_is_idempotent(postgres_dsn):
    pid = postgres.status()["pid"]
    assert postgres.up() is False
    assert postgres.status()["pid"] == pid
