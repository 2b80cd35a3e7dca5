"""PostgreSQL access: connections and the schema. Driver errors become DatabaseError here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
from psycopg import sql

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


def init_schema(
    db: DatabaseConfig,
    *,
    admin_url: str | None = None,
    owner: str | None = None,
    runtime: str | None = None,
) -> None:
    """Apply sql/schema.sql; safe to run again and from several processes at once.

    With ``owner`` (through ``admin_url``, a superuser's connection; its database is
    replaced by the configured one), the schema is applied as that role and ``runtime``
    gets only the privileges of sql/roles.sql. Without, as the configured user.
    """
    from psycopg.conninfo import make_conninfo

    target = db.conninfo
    if admin_url is not None:
        target = make_conninfo(admin_url, dbname=_dbname(db))
    try:
        conn = psycopg.connect(target, autocommit=False)
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL at {db.safe_dsn}: {exc}") from exc
    with conn, wrap_errors("applying the schema"):
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute("SET LOCAL client_min_messages = warning")
        if runtime and _superuser(conn, runtime):
            runtime = None  # needs no grants, and must keep what it owns
        if owner:
            ident = {"owner": sql.Identifier(owner)}
            if runtime and runtime != owner:
                ident["runtime"] = sql.Identifier(runtime)
                conn.execute(_roles("take_over_legacy", **ident))
            conn.execute(_roles("owner_may_create", **ident))
            conn.execute(sql.SQL("SET LOCAL ROLE {owner}").format(**ident))
        conn.execute(schema())
        if owner and runtime and runtime != owner:
            conn.execute("RESET ROLE")
            conn.execute(
                _roles(
                    "grant_runtime",
                    runtime=sql.Identifier(runtime),
                    database=sql.Identifier(_dbname(db)),
                )
            )
        conn.commit()


def _superuser(conn: psycopg.Connection[tuple[object, ...]], role: str) -> bool:
    row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return bool(row and row[0])


def _dbname(db: DatabaseConfig) -> str:
    from psycopg.conninfo import conninfo_to_dict

    return str(conninfo_to_dict(db.conninfo).get("dbname") or "")


def _roles(name: str, **identifiers: sql.Identifier) -> sql.Composed:
    """A block of sql/roles.sql with its role and database names quoted in."""
    from mltasks.sql import SQL_DIR, parse_queries

    text = parse_queries((SQL_DIR / "roles.sql").read_text())[name]
    return sql.SQL(text).format(**identifiers)


def create_database_if_missing(
    db: DatabaseConfig, admin_url: str | None = None, owner: str | None = None
) -> list[str]:
    """Create the configured role, the ``owner`` role and the database when missing.

    Goes through a superuser connection (``admin_url``; default: the same server's
    ``postgres`` database as the configured user). The database belongs to ``owner``
    (NOLOGIN) when given, else to the configured user. Returns what was created, in
    words (empty: nothing). Used by `mltasks db init --create` and `mltasks dev`.
    """
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(db.conninfo)
    name = str(params.get("dbname") or "")
    user = str(params.get("user") or "")
    if not name:
        raise DatabaseError("database.name: empty")
    if owner is None:
        # Without an owner role: nothing to do when the configured user gets in already.
        try:
            with psycopg.connect(db.conninfo, autocommit=True):
                return []
        except psycopg.OperationalError as exc:
            if "does not exist" not in str(exc):
                raise DatabaseError(
                    f"cannot connect to PostgreSQL at {db.safe_dsn}: {exc}"
                ) from exc
    admin = admin_url or make_conninfo(db.conninfo, dbname="postgres")
    created: list[str] = []
    try:
        with psycopg.connect(admin, autocommit=True) as conn:

            def role_missing(role: str) -> bool:
                found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                return found.fetchone() is None

            if owner and role_missing(owner):
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner)))
                created.append(f"role {owner} (owner, no login)")
            if user and role_missing(user):
                password = params.get("password")
                stmt = sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(user))
                if password:
                    stmt = sql.SQL("{} PASSWORD {}").format(stmt, sql.Literal(str(password)))
                conn.execute(stmt)
                created.append(f"role {user}")
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                dbowner = owner or user or str(conninfo_to_dict(admin).get("user") or "postgres")
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(name), sql.Identifier(dbowner)
                    )
                )
                created.append(f"database {name}")
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot create database {name!r} or role {user!r}: {exc}") from exc
    return created
