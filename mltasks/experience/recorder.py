"""`mltasks experience record`: moves answered decisions into ``ai_experience``.

Why a process of its own, and not a Celery task or the bridge: a task would take a worker
(one batch at a time with ``--pool solo``) away from the game's batches for as long as it
runs, and the bridge is the answer path itself. Here the only shared resource is
PostgreSQL, and the recorder only reads the game's tables (no row locks) and writes its own.

Each round is one transaction (sql/experience.sql): the rows of a window of request times
are recorded, the bounds applied, the high-water mark moved, or none of it. A round that
fails (PostgreSQL unreachable, a full disk, the statement timeout) changes nothing, is
logged and counted, and the next round reads the same rows again.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mltasks.config import Config, ExperienceConfig
from mltasks.contract import ARCHETYPES
from mltasks.experience.metrics import ExperienceMetrics
from mltasks.sql import query

log = logging.getLogger(__name__)

Connection = psycopg.Connection[Any]


@dataclass(frozen=True, slots=True)
class Round:
    """What one round did: counts by source (recorded), by reason (rejected, dropped)."""

    outcome: Literal["recorded", "locked"]
    lo: datetime | None = None
    hi: datetime | None = None
    behind_s: float = 0.0  # the window stopped this short of now - settle_s (catching up)
    recorded: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.recorded.values())


def record_round(conn: Connection, cfg: ExperienceConfig) -> Round:
    """One round on ``conn`` (autocommit), in one transaction: all of it or nothing."""
    with conn.transaction():
        row = conn.execute(query("experience_lock")).fetchone()
        if not (row and row[0]):
            return Round("locked")
        window = conn.execute(
            query("experience_window"), {"settle_s": cfg.settle_s, "window_s": cfg.window_s}
        ).fetchone()
        if window is None:
            raise psycopg.errors.NoDataFound("ai_experience_mark has no row: run mltasks db init")
        lo, hi, behind_s = window
        counts: dict[str, dict[str, int]] = {"recorded": {}, "rejected": {}, "dropped": {}}
        for what, reason, n in conn.execute(
            query("experience_record"),
            {
                "lo": lo,
                "hi": hi,
                "archetypes": list(ARCHETYPES),
                "pair_wait_s": cfg.pair_wait_s,
            },
        ):
            if what in counts:
                counts[what][reason] = counts[what].get(reason, 0) + int(n)
        limit = {"limit": cfg.trim_limit}
        aged = conn.execute(query("experience_trim_age"), {**limit, "retention_s": cfg.retention_s})
        capped = conn.execute(query("experience_trim_cap"), {**limit, "max_rows": cfg.max_rows})
        counts["dropped"].update(retention=aged.rowcount, cap=capped.rowcount)
        conn.execute(query("experience_advance"), {"hi": hi})
    return Round(
        "recorded",
        lo,
        hi,
        float(behind_s),
        counts["recorded"],
        counts["rejected"],
        counts["dropped"],
    )


def recorder_conninfo(config: Config) -> str:
    """The configured database, with the recorder's statement timeout and a connect timeout
    (a URL may have none): an unreachable or slow server costs a round, never a hang."""
    base = config.database.conninfo
    parts = conninfo_to_dict(base)
    options = str(parts.get("options") or "")
    # No JIT: a round is a few milliseconds of work, and a JIT compile costs hundreds.
    timeout = f"-c statement_timeout={config.experience.statement_timeout_ms} -c jit=off"
    extra: dict[str, Any] = {"options": f"{options} {timeout}".strip()}
    if not parts.get("connect_timeout"):
        extra["connect_timeout"] = config.database.connect_timeout_s
    return make_conninfo(base, **extra)


class Recorder:
    """Rounds every ``experience.interval_s`` on a connection of its own, reopened after
    any failure."""

    def __init__(self, config: Config, metrics: ExperienceMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else ExperienceMetrics()
        self.conn: Connection | None = None
        self.failing = False

    def run_once(self) -> Round | None:
        """One round; None when it failed (logged, counted, nothing changed)."""
        m = self.metrics
        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(recorder_conninfo(self.config), autocommit=True)
            done = record_round(self.conn, self.config.experience)
        except Exception as exc:  # any failure costs this round only, never the process
            self._failed(exc)
            return None
        m.rounds.labels(outcome=done.outcome).inc()
        m.count(m.recorded, done.recorded, "source")
        m.count(m.rejected, done.rejected, "reason")
        m.count(m.dropped, done.dropped, "reason")
        if self.failing:
            self.failing = False
            log.info("experience recording works again", extra={"event": "experience_recovered"})
        if done.total or done.rejected or any(done.dropped.values()):
            log.debug(
                "recorded %d transitions",
                done.total,
                extra={
                    "event": "experience_round",
                    "recorded": done.recorded,
                    "rejected": done.rejected,
                    "dropped": done.dropped,
                },
            )
        self._gauges()
        return done

    def _failed(self, exc: Exception) -> None:
        self.metrics.rounds.labels(outcome="failed").inc()
        self.close()
        # The first failure of a streak is a warning; the rest would repeat it every round.
        level = logging.DEBUG if self.failing else logging.WARNING
        self.failing = True
        log.log(
            level,
            "experience round skipped: %s",
            " ".join(str(exc).split()),
            extra={"event": "experience_round_failed", "error": type(exc).__name__},
            exc_info=not isinstance(exc, psycopg.Error) and level == logging.WARNING,
        )

    def _gauges(self) -> None:
        if self.conn is None:
            return
        try:
            row = self.conn.execute(query("experience_size")).fetchone()
        except psycopg.Error:
            return  # the next round reconnects
        if row is not None:
            kept, waiting, lag_s = row
            self.metrics.rows.set(kept)
            self.metrics.waiting.set(waiting)
            self.metrics.lag.set(lag_s)

    def run(self, stop: threading.Event) -> None:
        """Rounds until ``stop`` is set; back to back while catching up after an outage."""
        interval = self.config.experience.interval_s
        while not stop.is_set():
            t0 = time.monotonic()
            done = self.run_once()
            if done is not None and done.behind_s > 0:
                continue
            stop.wait(max(0.0, interval - (time.monotonic() - t0)))

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


def main(argv: list[str] | None = None) -> int:
    """The recorder process until SIGINT or SIGTERM (``python -m mltasks.experience``)."""
    from mltasks.config import config_or_exit
    from mltasks.logs import configure_logging
    from mltasks.ops.exporter import start_metrics_server, start_or_log

    prog = "mltasks experience record"
    config = config_or_exit(prog)
    configure_logging(config.logging)
    if not config.experience.enabled:
        print(f"{prog}: experience.enabled is false: nothing to record", file=sys.stderr)
        return 0
    recorder = Recorder(config)
    host, port = config.monitoring.metrics_host, config.experience.metrics_port
    registry = recorder.metrics.registry
    server = start_or_log(lambda: start_metrics_server(host, port, registry), host, port)
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if config.experience.settle_s * 1000 <= config.inference.lease_ms:
        log.warning(
            "experience.settle_s (%g s) is not above inference.lease_ms (%d ms): rows answered "
            "after a lease ran out will not be recorded",
            config.experience.settle_s,
            config.inference.lease_ms,
            extra={"event": "experience_settle_short"},
        )
    log.info(
        "recording experience every %.1f s",
        config.experience.interval_s,
        extra={"event": "experience_started", "database": config.database.safe_dsn},
    )
    try:
        recorder.run(stop)
    finally:
        recorder.close()
        if server is not None:
            server.close()
    return 0
