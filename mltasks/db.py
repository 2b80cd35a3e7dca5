"""PostgreSQL access: connections and the schema. Driver errors become DatabaseError here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg

from mltasks.config import DatabaseConfig
from mltasks.errors import DatabaseError
from mltasks.sql import schema

# Any number that is ours alone: serialises concurrent `db init` runs.
_SCHEMA_LOCK = 0x6D6C7461


def connect(
    db: DatabaseConfig, *, autocommit: bool = True
) -> psycopg.Connection[tuple[object, ...]]:
    """A new connection; the service runs every statement in autocommit, like the game."""
    try:
        return psycopg.connect(db.conninfo, autocommit=autocommit)
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL at {db.safe_dsn}: {exc}") from exc


@contextlib.contextmanager
def wrap_errors(what: str) -> Iterator[None]:
    """Turn driver errors into DatabaseError at the boundary."""
    try:
        yield
    except psycopg.Error as exc:
        raise DatabaseError(f"{what}: {exc}") from exc


def init_schema(db: DatabaseConfig) -> None:
    """Apply sql/schema.sql; safe to run again and from several processes at once."""
    with connect(db, autocommit=False) as conn, wrap_errors("applying the schema"):
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute("SET LOCAL client_min_messages = warning")
        conn.execute(schema())
        conn.commit()


def create_database_if_missing(db: DatabaseConfig, admin_url: str | None = None) -> bool:
    """Create the configured role and database when they do not exist yet.

    Goes through a superuser connection (``admin_url``; default: the same server's
    ``postgres`` database as the configured user). Returns True when anything was
    created. Used by `mltasks db init --create` and `mltasks dev`.
    """
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(db.conninfo)
    name = str(params.get("dbname") or "")
    user = str(params.get("user") or "")
    if not name:
        raise DatabaseError("database.name: empty")
    try:
        with psycopg.connect(db.conninfo, autocommit=True):
            return False
    except psycopg.OperationalError as exc:
        missing = "does not exist" in str(exc)
        if not missing:
            raise DatabaseError(f"cannot connect to PostgreSQL at {db.safe_dsn}: {exc}") from exc
    admin = admin_url or make_conninfo(db.conninfo, dbname="postgres")
    created = False
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            if (
                user
                and not conn.execute(
                    "SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)
                ).fetchone()
            ):
                password = params.get("password")
                stmt = sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(user))
                if password:
                    stmt = sql.SQL("{} PASSWORD {}").format(stmt, sql.Literal(str(password)))
                conn.execute(stmt)
                created = True
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                owner = user or str(conninfo_to_dict(admin).get("user") or "postgres")
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(name), sql.Identifier(owner)
                    )
                )
                created = True
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot create database {name!r} or role {user!r}: {exc}") from exc
    return created
