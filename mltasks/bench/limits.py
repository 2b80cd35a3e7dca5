"""PostgreSQL's commit and NOTIFY limits on this host (docs/SCALING.md's inputs).

``python -m mltasks.bench.limits [--admin-url URL] [--seconds S] [--clients 1,4,16]``

In a database of its own (``mltasks_limits_<pid>``, created with the schema and dropped
at the end), ``pgbench`` runs, per client count:

- ``insert+notify``: the game's INSERT (64 values), as the game sends it, in autocommit,
  with the schema's NOTIFY trigger: what the map servers can insert;
- ``insert+notify async``: the same with ``synchronous_commit=off`` (a role setting the
  operator may give the game's role);
- ``insert``: the same with the NOTIFY trigger disabled: what NOTIFY costs;
- ``insert async``: the same with ``synchronous_commit=off`` (the service's own setting):
  the commit's WAL flush taken out;
- ``answer``: the service's answer write path, a batch of 32 rows answered in one
  statement (INSERT ... SELECT), with ``synchronous_commit=off``.

It prints one JSON object: transactions/s per case and client count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mltasks.config import DatabaseConfig
from mltasks.db import init_schema

STATE = ",".join(f"{0.01 * (i % 97):.6f}" for i in range(64))
INSERT = (
    "INSERT INTO ai_requests (monster_id, mob_id, archetype, state_vector, map_id, position_x,"
    f" position_y, hp_ratio, sp_ratio, status, priority) VALUES (1002, 1002, 'aggressive',"
    f" ARRAY[{STATE}]::REAL[], 0, 0, 0, 0.8, 0.5, 'pending', 5) RETURNING request_id;\n"
)
ANSWER = (
    "WITH r AS (INSERT INTO ai_requests (monster_id, mob_id, archetype, state_vector, map_id,"
    " position_x, position_y, hp_ratio, sp_ratio, status, priority)"
    f" SELECT 1002, 1002, 'tank', ARRAY[{STATE}]::REAL[], 0, 0, 0, 0.8, 0.5, 'processing', 5"
    " FROM generate_series(1, 32) RETURNING request_id)"
    " INSERT INTO ai_responses (request_id, action_id, confidence, source)"
    " SELECT request_id, 1, 0.5, 'model' FROM r;\n"
)


def _pgbench() -> str:
    found = shutil.which("pgbench") or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"))), None
    )
    if not found:
        raise SystemExit("pgbench is not installed (apt install postgresql-client)")
    return found


def run_case(url: str, script: str, clients: int, seconds: float, options: str = "") -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    params = conninfo_to_dict(url)
    env = dict(os.environ)
    if options:
        env["PGOPTIONS"] = options
    cmd = [
        _pgbench(), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 4)),
        "-T", str(int(seconds)), "-f", f.name,
        "-h", str(params.get("host", "127.0.0.1")), "-p", str(params.get("port", 5432)),
        "-U", str(params.get("user", "postgres")), str(params["dbname"]),
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"tps = ([\d.]+)", out)
    return float(m.group(1)) if m else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", default="1,4,16")
    args = ap.parse_args(argv)
    name = f"mltasks_limits_{os.getpid()}"
    url = make_conninfo(args.admin_url, dbname=name)
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    results: dict[str, Any] = {}
    try:
        init_schema(DatabaseConfig(url=url))
        for clients in (int(c) for c in args.clients.split(",")):
            row: dict[str, float] = {}
            row["insert+notify"] = run_case(url, INSERT, clients, args.seconds)
            row["insert+notify async"] = run_case(
                url, INSERT, clients, args.seconds, "-c synchronous_commit=off"
            )
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("ALTER TABLE ai_requests DISABLE TRIGGER ai_requests_notify")
            row["insert"] = run_case(url, INSERT, clients, args.seconds)
            row["insert async"] = run_case(
                url, INSERT, clients, args.seconds, "-c synchronous_commit=off"
            )
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("ALTER TABLE ai_requests ENABLE TRIGGER ai_requests_notify")
            row["answer x32 async"] = run_case(
                url, ANSWER, clients, args.seconds, "-c synchronous_commit=off"
            )
            results[str(clients)] = row
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    print(json.dumps({"tps": results, "cores": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
