"""``mltasks bench inserts``: the game's INSERT with and without the NOTIFY trigger.

PostgreSQL serialises the commits of every transaction that issued a NOTIFY (a database-
wide lock held through the WAL flush), and each of the game's INSERTs notifies through the
schema's statement trigger ``ai_requests_notify``. This measures what that costs the game:
N map-server connections inserting as fast as they can (the C++ statement, autocommit,
nothing answers), for a few seconds, with the trigger enabled and disabled in turn, on a
benchmark database of its own.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
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


def run_once(conninfo: str, clients: int, duration_s: float, trigger: bool) -> dict[str, Any]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("TRUNCATE ai_responses, ai_requests RESTART IDENTITY")
        state = "ENABLE" if trigger else "DISABLE"
        conn.execute(f"ALTER TABLE ai_requests {state} TRIGGER ai_requests_notify")
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
        "trigger": trigger,
        "inserts_per_s": round(len(samples) / duration_s, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def run(conninfo: str, clients: list[int], duration_s: float, rounds: int) -> list[dict[str, Any]]:
    """Alternating trigger on and off, ``rounds`` times per client count."""
    recreate_database(conninfo)
    out = []
    for n in clients:
        for _ in range(rounds):
            for trigger in (True, False):
                out.append(run_once(conninfo, n, duration_s, trigger))
    return out


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# The game's INSERT with and without the NOTIFY trigger",
        "",
        f"`{command}`",
        "",
        "| clients | trigger | inserts/s | p50 ms | p99 ms |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {'on' if r['trigger'] else 'off'} | {r['inserts_per_s']:,.0f} "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"
