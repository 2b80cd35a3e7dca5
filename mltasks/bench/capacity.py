"""What one decision costs the parts that scale out (docs/SCALING.md's inputs).

Measured around a gateway run of the service (``mltasks bench gateway``):

- CPU seconds of the bridges and of the workers, each per decision (psutil, the processes
  and their children), of the responder's PostgreSQL backends and of the run's Redis
  server, and the statements' execution time (mltasks.bench.cpucost);
- Redis commands per decision, by command (``INFO commandstats`` of the run's Redis: the
  run must have that server to itself, as the benchmark's own Redis does);
- PostgreSQL transactions and rows per decision (``pg_stat_database`` of the run's
  database: the game's statements, its inserts and 2 ms polls, and the service's).
  PostgreSQL publishes a busy backend's counters about once a second, so the last second
  of the service's own statements may be missing: a small undercount.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import psutil
import psycopg

from mltasks.bench.cpucost import BackendCpu, StatementsMeter, redis_process, total_ms

_PG_FIELDS = (
    "xact_commit",
    "xact_rollback",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "tup_returned",
    "tup_fetched",
)


def _redis_counts(redis_url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        stats: dict[str, Any] = client.info("commandstats")
    finally:
        client.close()
    return {
        name.removeprefix("cmdstat_"): int(v.get("calls", 0))
        for name, v in stats.items()
        if isinstance(v, dict)
    }


def _pg_counts(conninfo: str) -> dict[str, int]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT {', '.join(_PG_FIELDS)} FROM pg_stat_database"
            " WHERE datname = current_database()"
        ).fetchone()
    return dict(zip(_PG_FIELDS, (int(v or 0) for v in row or ()), strict=False))


def role_of(name: str) -> str:
    """``bridge`` or ``worker`` from a benchmark process name (``service-bridge2``)."""
    last = name.rsplit("-", 1)[-1]  # the label before it may say "2 bridges"
    return (
        "bridge"
        if last.startswith("bridge")
        else "worker"
        if last.startswith("worker")
        else "other"
    )


def cpu_by_role(procs: list[Any]) -> dict[str, float]:
    """CPU seconds so far of the ManagedProcesses, summed per role."""
    out: dict[str, float] = {}
    for p in procs:
        role = role_of(str(p.name))
        out[role] = out.get(role, 0.0) + float(p.cpu_seconds())
    return out


class OpsMeter:
    """Counters before a run; ``per_decision`` after it."""

    def __init__(self, conninfo: str, redis_url: str | None, procs: list[Any]) -> None:
        self.conninfo = conninfo
        self.redis_url = redis_url
        self.procs = procs
        self.cpu = cpu_by_role(procs)
        self.redis = self._redis()
        self.pg = _pg_counts(conninfo)
        self.statements = StatementsMeter(conninfo)
        self.redis_server = redis_process(redis_url)
        self.redis_cpu = self._redis_cpu()
        self.backends = BackendCpu(conninfo)

    def close(self) -> None:
        """Stop the backends' sampling (done by ``per_decision``; for a run that failed)."""
        self.backends.close()

    def _redis_cpu(self) -> float | None:
        if self.redis_server is None:
            return None
        with contextlib.suppress(psutil.Error):
            t = self.redis_server.cpu_times()
            return float(t.user + t.system)
        return None

    def _redis(self) -> dict[str, int]:
        if not self.redis_url:
            return {}
        with contextlib.suppress(Exception):
            return _redis_counts(self.redis_url)
        return {}

    def per_decision(self, decisions: int) -> dict[str, Any]:
        cpu = cpu_by_role(self.procs)
        cpu_ms = {k: (v - self.cpu.get(k, 0.0)) * 1000 for k, v in cpu.items()}
        cpu_ms.update({k: v * 1000 for k, v in self.backends.seconds().items()})
        redis_cpu = self._redis_cpu()
        if redis_cpu is not None and self.redis_cpu is not None:
            cpu_ms["redis"] = (redis_cpu - self.redis_cpu) * 1000
        statements = self.statements.per_decision(decisions)
        time.sleep(1.2)  # let PostgreSQL publish the backends' counters
        redis_now = self._redis()
        pg_now = _pg_counts(self.conninfo)
        n = max(1, decisions)
        commands = {
            k: round((v - self.redis.get(k, 0)) / n, 3)
            for k, v in redis_now.items()
            if v - self.redis.get(k, 0) > 0 and k not in ("info", "ping", "client|list")
        }
        cpu_per = {k: round(v / n, 3) for k, v in cpu_ms.items()}
        return {
            "decisions": decisions,
            "cpu_ms": cpu_per,
            "cpu_ms_total": total_ms(cpu_per),
            "statements": statements,
            "redis_commands": dict(sorted(commands.items(), key=lambda kv: -kv[1])),
            "redis_commands_total": round(sum(commands.values()), 3),
            "postgres": {k: round((pg_now[k] - self.pg.get(k, 0)) / n, 3) for k in pg_now},
        }


def cores() -> int:
    return psutil.cpu_count() or 1
