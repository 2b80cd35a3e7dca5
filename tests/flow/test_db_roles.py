"""`mltasks db init --create`: an owner role owns the schema, the runtime role only runs
its statements (issue 11, item 6). On the test server, with roles and a database made for
each test and dropped after it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

from mltasks.cli import main
from mltasks.serving.answers import write_answers
from mltasks.serving.inference import Answer
from mltasks.sql import query
from tests import game
from tests.conftest import ADMIN_URL

STATE = [0.8, 0.5] + [0.0] * 62


class Names:
    def __init__(self) -> None:
        tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.runtime = f"mlt_rt_{tag}"
        self.owner = f"mlt_own_{tag}"
        self.database = f"mltasks_roles_{tag}"
        self.password = "runtime-secret-1"

    @property
    def runtime_url(self) -> str:
        return make_conninfo(
            ADMIN_URL, user=self.runtime, password=self.password, dbname=self.database
        )


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(ADMIN_URL, autocommit=True)


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> Iterator[Names]:
    from mltasks.config import set_config

    n = Names()
    monkeypatch.setenv("MLTASKS_DATABASE_URL", n.runtime_url)
    set_config(None)
    yield n
    set_config(None)
    with _admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(n.database))
        )
        for role in (n.runtime, n.owner):
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def db_init(n: Names, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["db", "init", "--create", "--admin-url", ADMIN_URL, "--owner", n.owner])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def owners(n: Names) -> dict[str, str]:
    with psycopg.connect(make_conninfo(ADMIN_URL, dbname=n.database)) as conn:
        rows = conn.execute(
            "SELECT c.relname, r.rolname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner"
            " WHERE c.relname IN ('ai_requests', 'ai_responses', 'ai_requests_request_id_seq',"
            " 'ai_bridges_waiting')"
            " UNION ALL SELECT p.proname, r.rolname FROM pg_proc p"
            " JOIN pg_roles r ON r.oid = p.proowner WHERE p.proname LIKE 'ai_requests_%%'"
            " UNION ALL SELECT d.datname, r.rolname FROM pg_database d"
            " JOIN pg_roles r ON r.oid = d.datdba WHERE d.datname = current_database()"
        ).fetchall()
    return dict(rows)


def assert_least_rights(n: Names) -> None:
    found = owners(n)
    assert set(found) == {
        "ai_requests", "ai_responses", "ai_requests_request_id_seq",
        "ai_requests_reuse_id", "ai_requests_notify", "ai_bridges_waiting", n.database,
    }  # fmt: skip
    dbowner = found.pop(n.database)
    assert set(found.values()) == {n.owner}, found
    # a database the operator made stays theirs; ours is the owner role's
    assert dbowner in (n.owner, "postgres") and dbowner != n.runtime
    with psycopg.connect(n.runtime_url, autocommit=True) as rt:
        # the game's statements and the service's
        rid = game.insert(rt, STATE)
        token, rows = (
            "t",
            rt.execute(
                query("claim_batch"), {"limit": 32, "deadline_s": 10.0, "token": "t"}
            ).fetchall(),
        )
        assert [r[0] for r in rows] == [rid]
        assert write_answers(rt, [Answer(rid, 1, 0.9, "model", "completed")], token) == {rid}
        assert game.poll(rt, rid) == (1, 0.9)
        game.mark_timeout(rt, rid)
        rt.execute(query("delete_finished"), {"retention_s": 0, "limit": 100})
        # ... and nothing more
        for stmt in (
            "DROP TABLE ai_responses",
            "ALTER TABLE ai_responses DROP CONSTRAINT ai_responses_action_check",
            "CREATE OR REPLACE FUNCTION ai_requests_notify() RETURNS trigger"
            " LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END; $$",
            "DROP TRIGGER ai_requests_reuse_id ON ai_requests",
            "CREATE TABLE mine (x int)",
            "TRUNCATE ai_requests CASCADE",
            "ALTER SEQUENCE ai_requests_request_id_seq RESTART",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                rt.execute(stmt)


def test_db_init_create_gives_the_schema_to_an_owner_and_rows_to_the_runtime_role(
    names: Names, capsys: pytest.CaptureFixture[str]
) -> None:
    out = db_init(names, capsys)
    assert f"created role {names.owner}" in out and f"created database {names.database}" in out
    assert_least_rights(names)
    assert owners(names)[names.database] == names.owner
    assert "created" not in db_init(names, capsys)  # idempotent
    assert_least_rights(names)


def test_db_init_create_with_the_database_there_and_the_role_missing(
    names: Names, capsys: pytest.CaptureFixture[str]
) -> None:
    with _admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(names.database)))
    out = db_init(names, capsys)
    assert f"created role {names.runtime}" in out
    assert "schema applied" in out
    assert_least_rights(names)


def test_db_init_takes_a_legacy_schema_from_the_runtime_role(
    names: Names, capsys: pytest.CaptureFixture[str]
) -> None:
    """An install from before: the runtime role owned the database and the schema."""
    from mltasks.config import get_config
    from mltasks.db import create_database_if_missing, init_schema

    db = get_config().database
    create_database_if_missing(db, ADMIN_URL)  # old style: the database is the user's
    init_schema(db)
    assert set(owners(names).values()) == {names.runtime}
    db_init(names, capsys)
    assert_least_rights(names)


def test_the_runtime_role_records_and_exports_experience_and_no_more(
    names: Names, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    """The recorder and the export run as the runtime role (issue 29); it may add and drop
    transitions but not rewrite them, and owns none of the experience tables."""
    from mltasks.config import ExperienceConfig
    from mltasks.experience.export import export
    from mltasks.experience.recorder import record_round

    db_init(names, capsys)
    cfg = ExperienceConfig(enabled=True, settle_s=0.0, max_rows=1)
    with psycopg.connect(names.runtime_url, autocommit=True) as rt:
        record_round(rt, cfg)
        for i in range(3):
            rid = game.insert(rt, [i / 10] + [0.5] * 63)
            rt.execute(
                "INSERT INTO ai_responses (request_id, action_id, confidence, source)"
                " VALUES (%s, 1, 0.5, 'rules')",
                (rid,),
            )
            rt.execute("UPDATE ai_requests SET status = 'completed' WHERE request_id = %s", (rid,))
        done = record_round(rt, cfg)
        assert done.total == 2 and done.dropped["cap"] == 1
        assert export(rt, tmp_path) == {"aggressive": 1}
        rt.execute(query("delete_finished_recorded"), {"retention_s": 0, "limit": 100, "hold_s": 0})
        for stmt in (
            "UPDATE ai_experience SET action_id = 0",
            "TRUNCATE ai_experience",
            "DROP TABLE ai_experience_waiting",
            "DELETE FROM ai_experience_mark",
            "INSERT INTO ai_experience_mark DEFAULT VALUES",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                rt.execute(stmt)
    with psycopg.connect(make_conninfo(ADMIN_URL, dbname=names.database)) as conn:
        owned = conn.execute(
            "SELECT DISTINCT r.rolname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner"
            " WHERE c.relname LIKE 'ai_experience%%'"
        ).fetchall()
    assert owned == [(names.owner,)]
