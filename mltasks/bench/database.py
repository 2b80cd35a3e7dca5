"""The benchmark's own database: made fresh, emptied between runs, read after each run."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mltasks.bench.queries import bench_query
from mltasks.config import DatabaseConfig
from mltasks.db import init_schema
from mltasks.errors import DatabaseError

DEFAULT_BENCH_URL = "postgresql://postgres@127.0.0.1:5432/mltasks_bench"


def database_name(conninfo: str) -> str:
    return str(conninfo_to_dict(conninfo).get("dbname") or "")


def recreate_database(conninfo: str) -> None:
    """Drop and create the database, then apply sql/schema.sql as it is now.

    Recreated rather than reused so that a schema changed since the last run is the one
    measured.
    """
    drop_database(conninfo)
    name = database_name(conninfo)
    try:
        with psycopg.connect(make_conninfo(conninfo, dbname="postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot create database {name!r}: {exc}") from exc
    init_schema(DatabaseConfig(url=conninfo))


def drop_database(conninfo: str) -> None:
    """Remove a benchmark database, closing whatever is still connected to it.

    Only a database whose name says ``bench`` is ever dropped: a mistyped URL must not
    cost anyone their data.
    """
    name = database_name(conninfo)
    if "bench" not in name:
        raise DatabaseError(
            f"refusing to drop database {name!r}: a benchmark database's name contains 'bench'"
        )
    try:
        with psycopg.connect(make_conninfo(conninfo, dbname="postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot drop database {name!r}: {exc}") from exc


def reset_tables(conninfo: str, attempts: int = 5) -> None:
    """Empty both tables so that each run starts on a fresh table with ids from 1.

    The responder may be running (the reset after its warm-up): the TRUNCATE's table locks
    can then deadlock with its claim or answer, and PostgreSQL cancels one side; the
    responder retries its statement, and so does this.
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for attempt in range(attempts):
            try:
                conn.execute(bench_query("reset_tables"))
                return
            except psycopg.errors.DeadlockDetected:
                if attempt == attempts - 1:
                    raise


def run_stats(conninfo: str) -> dict[str, Any]:
    """Where the run's requests ended and who answered them, as the database saw it."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        statuses = {str(s): int(n) for s, n in conn.execute(bench_query("request_statuses"))}
        sources = {
            str(src): {"answers": int(n), "traditional_ai": int(n255)}
            for src, n, n255 in conn.execute(bench_query("response_sources"))
        }
    return {"request_statuses": statuses, "response_sources": sources}


def server_version(conninfo: str) -> str:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"
