"""PostgreSQL given as several hosts (`host=a,b target_session_attrs=read-write`): the
service's connections (the bridge's, the workers' pool, `mltasks db init`) land on the one
that takes writes, as after a failover where the old primary came back as a standby.

Two throwaway clusters: the first only accepts read-only sessions
(`default_transaction_read_only=on`, which is what libpq asks a server about, as it asks a
hot standby), the second is the primary.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from mltasks.config import DatabaseConfig
from mltasks.db import connect
from tests.faults.support import REPO
from tests.scale.servers import NetnsPostgres

pytestmark = pytest.mark.scale


class ReadOnlyPostgres(NetnsPostgres):
    def start(self) -> None:
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("default_transaction_read_only = on\n")
        super().start()


@pytest.fixture
def clusters() -> Iterator[tuple[NetnsPostgres, NetnsPostgres]]:
    standby, primary = ReadOnlyPostgres(), NetnsPostgres()
    try:
        for server in (standby, primary):
            server.init()
            server.start()
        yield standby, primary
    finally:
        standby.close()
        primary.close()


def test_a_multi_host_conninfo_reaches_the_read_write_server(
    clusters: tuple[NetnsPostgres, NetnsPostgres],
) -> None:
    standby, primary = clusters
    url = (
        f"host=127.0.0.1,127.0.0.1 port={standby.port},{primary.port} dbname=ragnarok_ml"
        " user=postgres target_session_attrs=read-write connect_timeout=2"
    )
    db = DatabaseConfig(url=url)
    assert db.safe_dsn.startswith("127.0.0.1,127.0.0.1:")
    env = {"MLTASKS_DATABASE_URL": url, "PATH": "/usr/bin:/bin"}
    init = subprocess.run(
        [sys.executable, "-m", "mltasks.cli", "db", "init", "--create"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert init.returncode == 0, init.stdout + init.stderr
    with connect(db) as conn:
        row = conn.execute("SELECT current_setting('port')").fetchone()
        assert row is not None and int(str(row[0])) == primary.port
        # the service's own statements, e.g. a claim, run there
        conn.execute("SELECT count(*) FROM ai_requests").fetchone()
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(db.conninfo, min_size=1, max_size=1, open=True)
    try:
        with pool.connection() as conn:
            row = conn.execute("SELECT current_setting('port')").fetchone()
            assert row is not None and int(str(row[0])) == primary.port
    finally:
        pool.close()
