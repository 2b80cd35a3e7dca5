"""``mltasks bench inserts``: the game's INSERT with and without the NOTIFY trigger.

PostgreSQL serialises the commits of every transaction that issued a NOTIFY (a database-
wide lock held through the WAL flush), and each of the game's INSERTs notifies through the
schema's statement trigger ``ai_requests_notify``. This measures what that costs the game:
N map-server connections inserting as fast as they can (the C++ statement, autocommit,
nothing answers), for a few seconds, on a benchmark database of its own, in three modes in
turn: ``notify`` (a bridge is on record as sleeping: every INSERT notifies, as every INSERT
did before the trigger became conditional), ``quiet`` (no bridge sleeps: the trigger runs
and notifies nobody, the service's state under load) and ``off`` (no trigger at all).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from mltasks.bench.database import recreate_database

_INSERT = (
    "INSERT INTO ai_requests (monster_id, mob_id, archetype, state_vector, map_id, position_x, "
    "position_y, hp_ratio, sp_ratio, status, priority) VALUES (1002, 1002, 'aggressive', "
    "ARRAY[{state}]::REAL[], 0, 0, 0, 0.8, 0.5, 'pending', 5) RETURNING request_id"
)


def _client(conninfo: str, duration_s: float, start_at: float, out: Any) -> None:
    state = ",".join(f"{v:.6f}" for v in np.random.default_rng(os.getpid()).random(64))
    sql = _INSERT.format(state=state)
    latencies: list[float] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        while time.time() < start_at:
            time.sleep(0.001)
        stop = time.perf_counter() + duration_s
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            conn.execute(sql).fetchone()
            latencies.append(time.perf_counter() - t0)
    out.put(latencies)


MODES = ("notify", "quiet", "off")


def run_once(conninfo: str, clients: int, duration_s: float, mode: str) -> dict[str, Any]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("TRUNCATE ai_responses, ai_requests, ai_bridges_waiting RESTART IDENTITY")
        state = "DISABLE" if mode == "off" else "ENABLE"
        conn.execute(f"ALTER TABLE ai_requests {state} TRIGGER ai_requests_notify")
        if mode == "notify":  # a bridge that sleeps for the whole run
            conn.execute("INSERT INTO ai_bridges_waiting (pid) VALUES (-1)")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 1.0 + clients * 0.05
    procs = [
        ctx.Process(target=_client, args=(conninfo, duration_s, start_at, queue))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    samples = np.concatenate([np.asarray(queue.get(timeout=duration_s + 120)) for _ in procs])
    for p in procs:
        p.join(30)
    ms = samples * 1000
    return {
        "clients": clients,
        "mode": mode,
        "inserts_per_s": round(len(samples) / duration_s, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def run(conninfo: str, clients: list[int], duration_s: float, rounds: int) -> list[dict[str, Any]]:
    """The three modes in turn, ``rounds`` times per client count."""
    recreate_database(conninfo)
    out = []
    for n in clients:
        for _ in range(rounds):
            for mode in MODES:
                out.append(run_once(conninfo, n, duration_s, mode))
    return out


def write(report: dict[str, Any], out: Path) -> str:
    """report.json and report.md into ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report["runs"], report["command"])
    (out / "report.md").write_text(md)
    return md


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# The game's INSERT: NOTIFY on every insert, only while a bridge sleeps, no trigger",
        "",
        f"`{command}`",
        "",
        "| clients | mode | inserts/s | p50 ms | p99 ms |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['mode']} | {r['inserts_per_s']:,.0f} "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"
