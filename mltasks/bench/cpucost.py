"""CPU per decision of the processes that serve a run, beyond the responder's own.

- PostgreSQL backends of the run's database (``pg_stat_activity``), told apart by
  ``application_name``: every responder process connects with ``PGAPPNAME`` set to
  ``mltasks-bench <its name>`` (ManagedProcess.start), so its backends count as
  ``postgres``; every other backend of the database (the load generator's inserts and
  polls, the bench's own reads) as ``postgres_load``, reported but outside the total.
  Backends are sampled in a thread, so one that ends during the run still counts.
- The ``redis-server`` of the run's ``--redis-url``, found by its port.
- The statements' cost, from ``pg_stat_statements`` where the server preloads it
  (``CREATE EXTENSION`` in the bench database works without the preload; reading the
  view does not: then "unavailable").

The bench runs on the database's host (root reads every process's CPU time); a remote
PostgreSQL or Redis shows as missing, never as someone else's processes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg

from mltasks.bench.queries import bench_query

APP_PREFIX = "mltasks-bench "
RESPONDER_KINDS = ("bridge", "worker", "other", "postgres", "redis")
TOP_STATEMENTS = 5


def app_name(process: str) -> str:
    """The application_name of a responder process's connections (63 bytes at most)."""
    return (APP_PREFIX + process)[:63]


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


class BackendCpu:
    """CPU seconds of the run database's backends since construction, responder's and
    load's apart."""

    def __init__(self, conninfo: str, interval_s: float = 0.5) -> None:
        self.conninfo = conninfo
        self._t0 = time.time()
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._kind: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conn = psycopg.connect(conninfo, autocommit=True)
        self._sample()
        self._thread = threading.Thread(
            target=self._loop, args=(interval_s,), name="backend-cpu", daemon=True
        )
        self._thread.start()

    def _sample(self) -> None:
        rows = self._conn.execute(bench_query("run_backends")).fetchall()
        for pid, app in rows:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(int(pid))
                if "postgres" not in proc.name():  # not this host's backend
                    continue
                now = _cpu(proc)
                with self._lock:
                    if pid not in self._base:  # a backend born during the run: all of it
                        born = proc.create_time() >= self._t0
                        self._base[pid] = 0.0 if born else now
                        ours = str(app or "").startswith(APP_PREFIX)
                        self._kind[pid] = "postgres" if ours else "postgres_load"
                    self._last[pid] = now

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with contextlib.suppress(psycopg.Error):
                self._sample()

    def close(self) -> None:
        """Stop sampling (a last sample first); idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(psycopg.Error):
            self._sample()
        self._conn.close()

    def seconds(self) -> dict[str, float]:
        """Stop sampling; CPU seconds per kind (``postgres``, ``postgres_load``)."""
        self.close()
        out = {"postgres": 0.0, "postgres_load": 0.0}
        with self._lock:
            for pid, last in self._last.items():
                out[self._kind[pid]] += max(0.0, last - self._base[pid])
        return out


def redis_process(redis_url: str | None) -> psutil.Process | None:
    """The local redis-server listening on the URL's port (None: not found, or remote)."""
    if not redis_url:
        return None
    parts = urlsplit(redis_url)
    port = parts.port or 6379
    if parts.hostname not in (None, "", "127.0.0.1", "localhost", "::1"):
        return None
    for p in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or ())
            if "redis-server" in (p.info["name"] or "") + cmd and cmd.endswith(f":{port}"):
                return p
    with contextlib.suppress(psutil.Error):
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return psutil.Process(c.pid)
    return None


class StatementsMeter:
    """Calls and execution time per statement of the run's database (pg_stat_statements)."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.unavailable: str | None = None
        self._before = self._snapshot(create=True)

    def _snapshot(self, *, create: bool = False) -> dict[int, tuple[int, float, str]]:
        if self.unavailable:
            return {}
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                if create:
                    conn.execute(bench_query("statements_enable"))
                rows = conn.execute(bench_query("statements_snapshot")).fetchall()
        except psycopg.Error as exc:
            text = str(exc)
            self.unavailable = (
                "pg_stat_statements not preloaded"
                if "shared_preload_libraries" in text
                else (text.strip().splitlines() or ["?"])[0]
            )
            return {}
        return {int(q): (int(c), float(ms), str(t)) for q, c, ms, t in rows if q is not None}

    def per_decision(self, decisions: int) -> dict[str, Any]:
        """Execution ms and calls per decision: in all, and the costliest statements."""
        after = self._snapshot()
        if self.unavailable:
            return {"available": False, "reason": self.unavailable}
        n = max(1, decisions)
        # One statement can have several queryids: its parameters' types are part of the
        # id, and psycopg sends a list of ids as int2[] until one passes 32767, then as
        # int4[]. Summed by text, or a statement shows at a fraction of its calls.
        by_text: dict[str, tuple[float, int]] = {}
        for qid, (calls, ms, text) in after.items():
            c0, ms0, _ = self._before.get(qid, (0, 0.0, ""))
            if calls > c0:
                key = _statement(text)
                had_ms, had_calls = by_text.get(key, (0.0, 0))
                by_text[key] = (had_ms + ms - ms0, had_calls + calls - c0)
        rows = sorted(((ms, c, q) for q, (ms, c) in by_text.items()), reverse=True)
        return {
            "available": True,
            "ms_per_decision": round(sum(r[0] for r in rows) / n, 4),
            "top": [
                {
                    "query": q,
                    "ms_per_decision": round(ms / n, 4),
                    "calls_per_decision": round(c / n, 3),
                }
                for ms, c, q in rows[:TOP_STATEMENTS]
            ],
        }


def _statement(text: str) -> str:
    """A statement on one line, without the comment lines of its sql/ block, cut short."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    return " ".join(" ".join(lines).split())[:100]


def total_ms(cpu_ms: dict[str, float]) -> float:
    """The responder's CPU per decision: its processes, its backends and Redis."""
    return round(sum(v for k, v in cpu_ms.items() if k in RESPONDER_KINDS), 3)


def cpu_cells(per_decision: dict[str, Any] | None) -> list[str]:
    """bridge, workers, other, postgres, redis, total, postgres (load), statements: cells."""
    if not per_decision:
        return ["n/a"] * 8
    cpu = per_decision.get("cpu_ms", {})
    stm = per_decision.get("statements") or {}
    cells = [cpu.get(k) for k in ("bridge", "worker", "other", "postgres", "redis")]
    return [
        *("n/a" if v is None else f"{v:.3f}" for v in cells),
        f"**{total_ms(cpu):.3f}**",
        "n/a" if cpu.get("postgres_load") is None else f"{cpu['postgres_load']:.3f}",
        f"{stm['ms_per_decision']:.3f}" if stm.get("available") else "n/a",
    ]


def cpu_lines(runs: list[dict[str, Any]], *, key: str, key_label: str) -> list[str]:
    """The CPU-per-decision table of the runs that measured it (Markdown lines)."""
    measured = [r for r in runs if r.get("per_decision")]
    if not measured:
        return []
    lines = [
        "CPU per decision (ms of CPU per request): the responder's processes (bridge, "
        "workers; other: a floor's single process), its PostgreSQL backends, the run's "
        "Redis; total: their sum. postgres "
        "(load): the load generator's backends (its inserts and polls), outside the total. "
        "statements: execution ms per decision, every statement of the run's database "
        "(pg_stat_statements).",
        "",
        f"| responder | {key_label} | bridge | workers | other | postgres | redis | total "
        "| postgres (load) | statements |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in measured:
        value = r[key]
        shown = f"{value:.0f}" if isinstance(value, float) else str(value)
        lines.append(f"| {r['responder']} | {shown} | {' | '.join(cpu_cells(r['per_decision']))} |")
    reasons = {
        r["per_decision"]["statements"].get("reason")
        for r in measured
        if not (r["per_decision"].get("statements") or {}).get("available", True)
    }
    lines += [f"\nstatements: unavailable ({reason})" for reason in sorted(map(str, reasons))]
    return lines + _statement_lines(measured)


def _statement_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The costliest statements of each responder's first run, where they were measured."""
    firsts: dict[str, dict[str, Any]] = {}
    for r in runs:
        if (r["per_decision"].get("statements") or {}).get("available"):
            firsts.setdefault(r["responder"], r)
    out = []
    for name, r in firsts.items():
        out += ["", f"Costliest statements of {name} (ms and calls per decision):", ""]
        out += [
            f"- {s['ms_per_decision']:.4f} ms, {s['calls_per_decision']} calls: `{s['query']}`"
            for s in r["per_decision"]["statements"]["top"][:3]
        ]
    return out
