"""`mltasks bench inserts`: the NOTIFY trigger's cost, measured in its three modes."""

from __future__ import annotations

from psycopg.conninfo import make_conninfo

from mltasks.bench import inserts
from tests import conftest


def test_the_three_modes_each_insert_and_notify_as_they_say() -> None:
    url = make_conninfo(conftest.ADMIN_URL, dbname=f"mltasks_bench_inserts_{id(inserts)}")
    try:
        rows = inserts.run(url, [2], 0.5, 1)
    finally:
        from mltasks.bench.database import drop_database

        drop_database(url)
    assert [r["mode"] for r in rows] == ["notify", "quiet", "off"]
    assert all(r["inserts_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert "| 2 | quiet |" in inserts.markdown(rows, "mltasks bench inserts")
