"""Claim -> route -> send, woken by NOTIFY, polling only as a fallback.

Several bridges may run at once: ``FOR UPDATE SKIP LOCKED`` in ``claim_batch`` keeps
them from claiming a row twice. Whatever fails after a claim, the rows are answered
(255 with a reason) rather than left ``processing``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import redis
from celery import Celery

from bridge.publish import Publisher
from mltasks import metrics
from mltasks.celery_app import QUEUES
from mltasks.config import Config, get_config
from mltasks.db import connect
from mltasks.errors import DatabaseError
from mltasks.fallback import (
    LEVEL_QUEUE,
    LEVEL_READ_TIMEOUT_S,
    Level,
    LevelState,
    LevelStore,
    cache_client,
    route,
)
from mltasks.inference import answer_rows, traditional
from mltasks.redisurl import client_from_url
from mltasks.responses import expire, write_answers
from mltasks.rules import rules_engine
from mltasks.sql import query

log = logging.getLogger(__name__)

# Lease release, game timeouts and the fallback level are looked at this often.
HOUSEKEEPING_EVERY_S = 0.25
# While the tier's queue is full, it is looked at again (LLEN) this often. Not sooner on a
# NOTIFY: at the game's insert rate that would be a Redis round trip per insert. (A NOTIFY
# from the workers' answers would be exact, but PostgreSQL serialises the commits of every
# notifying transaction: it cut the bridge's own throughput by more than a third.)
CONGESTION_RECHECK_S = 0.002
# After a failed publish, batches are answered here for this long before the next try.
PUBLISH_PAUSE_S = 1.0


class Bridge:
    """One bridge process: its database connection, its view of the level, its counters."""

    def __init__(self, config: Config | None = None, app: Celery | None = None) -> None:
        self.config = config or get_config()
        if app is None:
            from mltasks.celery_app import app as default_app

            app = default_app
        self.app = app
        self.store = LevelStore(
            self.config, cache_client(self.config, timeout_s=LEVEL_READ_TIMEOUT_S)
        )
        self.state = self.store.last
        self.live: dict[str, bool] = {}
        # The level batches are served at: the shared one, or lower when its tier is empty.
        # Until Redis has been read, the configured start level.
        self.level = int(self.config.fallback.start_level)
        self._publish_blocked_until = 0.0
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._next_housekeeping = 0.0
        self.claimed = 0
        self.sent = 0
        self.expired = 0
        self.answered_here = 0
        # The queue a publish found full (None: not congested), and when it was looked at.
        self._congested_on: str | None = None
        self._congested_at = 0.0
        # The broker the app's workers consume from (its URL, not ours: a test or a
        # deployment may point the app elsewhere).
        self._broker = client_from_url(
            str(self.app.conf.broker_url),
            master_name=self.config.redis.sentinel_master,
            socket_timeout=self.config.redis.socket_timeout_s,
            socket_connect_timeout=self.config.redis.socket_timeout_s,
        )
        self.publisher = Publisher(self.app, self._broker)
        self.refresh_level()

    # -- connection ---------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed:
            conn = connect(self.config.database)
            conn.execute("LISTEN ai_requests")
            self._conn = conn
            metrics.set_service_up(True)
            log.info(
                "listening on %s",
                self.config.database.safe_dsn,
                extra={"event": "bridge_connected"},
            )
        return self._conn

    def close(self) -> None:
        """Drop the database connection (it is made again on the next use)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- one round ----------------------------------------------------------------------

    def claim(self) -> list[tuple[Any, ...]]:
        inf = self.config.inference
        with self._errors("claiming"):
            # Binary results: the 64 state values per row load 4x cheaper than from text
            # (0.26 against 1.0 ms of CPU for 64 rows here), and the same Python floats.
            cur = self._connection().execute(
                query("claim_batch"),
                {"limit": inf.batch_size, "deadline_s": inf.max_latency_ms / 1000.0},
                binary=True,
            )
            return cur.fetchall()

    def step(self) -> int:
        """Claim one batch and send it; returns how many rows were claimed."""
        rows = self.claim()
        if not rows:
            return 0
        self.claimed += len(rows)
        # A row travels as [request_id, archetype, mob_id, state_vector, monster_id].
        overdue = [r for r in rows if r[5]]
        fresh = [r for r in rows if not r[5]]
        if overdue:
            self._expire([r[0] for r in overdue], "deadline", [r[6] for r in overdue])
        if fresh:
            self.dispatch([list(r[:5]) for r in fresh], [r[6] for r in fresh])
        return len(rows)

    def dispatch(self, rows: Sequence[Sequence[Any]], created: Sequence[float] = ()) -> None:
        """Send a batch to the queue of the current level; level 5 is answered here.

        ``created`` holds each row's created_at (epoch s), for end-to-end latency metrics.
        """
        level = self.level
        if level >= Level.TRADITIONAL:
            self.answer_here(rows, rules=False, reason="fallback_level_5", created=created)
            return
        queue = LEVEL_QUEUE[level]
        if time.monotonic() < self._publish_blocked_until:
            # The broker failed a moment ago: do not stall every batch on it.
            self.answer_here(rows, rules=True, reason="broker_unavailable", created=created)
            return
        try:
            waiting = self.publisher.publish(
                queue, [rows, level, time.time(), list(created)], len(rows)
            )
        except Exception as exc:  # any broker failure: answer now, never strand the rows
            log.error(
                "cannot publish a batch of %d to %s: %s",
                len(rows),
                queue,
                exc,
                extra={"event": "publish_failed", "queue": queue},
            )
            self._publish_blocked_until = time.monotonic() + PUBLISH_PAUSE_S
            self.answer_here(rows, rules=True, reason="broker_unavailable", created=created)
            return
        self.sent += len(rows)
        if waiting >= self.config.inference.max_waiting_batches:
            # The tier is busy: let rows gather until the queue has room again.
            self._congested_on = queue
            self._congested_at = time.monotonic()

    def answer_here(
        self,
        rows: Sequence[Sequence[Any]],
        *,
        rules: bool,
        reason: str,
        created: Sequence[float] = (),
    ) -> None:
        """Answer in this process: the rule policy where allowed, else 255."""
        if rules:
            answers = answer_rows(rows, rules_engine(self.config.state.layout))
            answers = [a if a.reason else dataclasses.replace(a, reason=reason) for a in answers]
        else:
            answers = [traditional(int(r[0]), reason) for r in rows]
        with self._errors("answering"):
            write_answers(self._connection(), answers)
        self.answered_here += len(answers)
        metrics.observe_answers(metrics.count_outcomes(answers), metrics.seconds_since(created))

    def _expire(self, request_ids: list[int], reason: str, created: Sequence[float] = ()) -> None:
        with self._errors("expiring"):
            expire(self._connection(), request_ids, reason)
        self.expired += len(request_ids)
        metrics.observe_answers({"expired": len(request_ids)}, metrics.seconds_since(created))
        log.debug(  # per batch: the counts are in ml_requests_total{outcome="expired"}
            "answered %d requests 255 (%s)",
            len(request_ids),
            reason,
            extra={"event": "requests_expired", "reason": reason, "rows": len(request_ids)},
        )

    def refresh_level(self) -> None:
        """Read the shared level and the live queues; on a Redis error keep the last ones."""
        try:
            state, live = self.store.snapshot(QUEUES)
        except Exception as exc:  # Redis down: route on what we knew
            if self.live:
                log.warning(
                    "cannot read the fallback level, keeping level %d: %s",
                    self.level,
                    exc,
                    extra={"event": "level_unreadable", "level": self.level},
                )
                self.live = {}
            return
        self.live = live
        self._set_route(state, route(state.level, live))
        metrics.set_fallback_level(state.level)

    def _set_route(self, state: LevelState, level: int) -> None:
        if (state.level, state.reason, level) != (self.state.level, self.state.reason, self.level):
            log.warning(
                "fallback level %d (%s), serving at level %d",
                state.level,
                state.reason,
                level,
                extra={
                    "event": "route_changed",
                    "level": state.level,
                    "reason": state.reason,
                    "serving_level": level,
                    "live_queues": sorted(q for q, up in self.live.items() if up),
                },
            )
        self.state = state
        self.level = level

    def housekeeping(self) -> None:
        """Give back rows whose lease ran out; answer rows the game gave up on unclaimed."""
        self.refresh_level()
        with self._errors("housekeeping"):
            conn = self._connection()
            conn.execute(query("release_stale"), {"lease_s": self.config.inference.lease_ms / 1000})
            cur = conn.execute(
                query("answer_game_timeouts"), {"lease_s": self.config.inference.lease_ms / 1000}
            )
            if cur.rowcount > 0:
                metrics.observe_answers({"expired": cur.rowcount}, [])

    def congested(self) -> bool:
        """True while the tier's queue holds ``max_waiting_batches`` batches or more.

        Then the bridge stops claiming and lets rows gather in PostgreSQL: when the queue
        has room again they leave as one larger batch instead of many one-row batches, so
        the per-batch cost (broker, acks, one database write) is shared by more decisions.
        Each publish tells how many batches wait (bridge.publish); a full queue is looked
        at again every CONGESTION_RECHECK_S.
        """
        queue = self._congested_on
        if queue is None:
            return False
        if queue != LEVEL_QUEUE.get(self.level):
            # The route moved (a tier went away, or level 5): its old queue does not count.
            self._congested_on = None
            return False
        now = time.monotonic()
        if now - self._congested_at < CONGESTION_RECHECK_S:
            return True
        self._congested_at = now
        try:
            waiting = int(self._broker.llen(queue))
        except (redis.RedisError, OSError):
            waiting = 0  # the publish will find out, and answer with the rules
        if waiting < self.config.inference.max_waiting_batches:
            self._congested_on = None
        return self._congested_on is not None

    def drain(self) -> int:
        """Claim until the table has no pending row left, or the tier is congested."""
        total = 0
        while True:
            if self.congested():
                return total
            n = self.step()
            total += n
            if n < self.config.inference.batch_size:
                return total

    def wait(self, timeout_s: float) -> None:
        """Sleep until a NOTIFY arrives or the poll interval passes; swallow the backlog."""
        with self._errors("waiting"):
            conn = self._connection()
            for _ in conn.notifies(timeout=timeout_s, stop_after=1):
                pass
            for _ in conn.notifies(timeout=0):
                pass

    # -- the loop -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        poll_s = self.config.inference.poll_interval_ms / 1000
        backoff = 0.1
        while not stop.is_set():
            try:
                now = time.monotonic()
                if now >= self._next_housekeeping:
                    self.housekeeping()
                    self._next_housekeeping = now + HOUSEKEEPING_EVERY_S
                self.drain()
                timeout = CONGESTION_RECHECK_S if self._congested_on else poll_s
                self.wait(min(timeout, max(0.0, self._next_housekeeping - time.monotonic())))
                backoff = 0.1
            except DatabaseError as exc:
                log.warning(
                    "database unavailable, retrying in %.1fs: %s",
                    backoff,
                    exc,
                    extra={"event": "bridge_db_error"},
                )
                metrics.set_service_up(False)
                self.close()
                stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        self.close()
        self._broker.close()
        self.store.redis.close()
        log.info(
            "stopped: %d claimed, %d sent, %d expired, %d answered in the bridge",
            self.claimed,
            self.sent,
            self.expired,
            self.answered_here,
            extra={"event": "bridge_stopped"},
        )

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Driver errors become DatabaseError; the broken connection is dropped."""
        try:
            yield
        except psycopg.Error as exc:
            self.close()
            raise DatabaseError(f"{what}: {exc}") from exc


def main() -> None:
    from mltasks.logs import configure_logging

    config = get_config()
    configure_logging(config.logging)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    m = config.monitoring
    server = metrics.start_bridge_metrics(config, m.metrics_host, m.bridge_metrics_port)
    try:
        Bridge(config).run(stop)
    finally:
        if server is not None:
            server.close()
