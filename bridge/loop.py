"""Claim -> route -> send, woken by NOTIFY, polling only as a fallback.

Several bridges may run at once: ``FOR UPDATE SKIP LOCKED`` in ``claim_batch`` keeps
them from claiming a row twice. Whatever fails after a claim, the rows are answered
(255 with a reason) rather than left ``processing``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from celery import Celery

from bridge.routing import initial_queue
from mltasks.celery_app import INFER_TASK
from mltasks.config import Config, get_config
from mltasks.db import connect
from mltasks.errors import DatabaseError
from mltasks.responses import expire
from mltasks.sql import query

log = logging.getLogger(__name__)

HOUSEKEEPING_EVERY_S = 0.25
# A publish either goes through at once or the batch is answered 255: the game cannot wait.
PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.05, "interval_max": 0.05}


class Bridge:
    def __init__(self, config: Config | None = None, app: Celery | None = None) -> None:
        self.config = config or get_config()
        if app is None:
            from mltasks.celery_app import app as default_app

            app = default_app
        self.app = app
        self.queue = initial_queue(self.config)
        self.name = f"bridge-{os.getpid()}"
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._next_housekeeping = 0.0
        self.claimed = 0
        self.sent = 0
        self.expired = 0

    # -- connection ---------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed:
            conn = connect(self.config.database)
            conn.execute("LISTEN ai_requests")
            self._conn = conn
            log.info(
                "listening on %s, sending to queue %s",
                self.config.database.safe_dsn,
                self.queue,
                extra={"event": "bridge_connected", "queue": self.queue},
            )
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- one round ----------------------------------------------------------------------

    def claim(self) -> list[tuple[Any, ...]]:
        inf = self.config.inference
        with self._errors("claiming"):
            cur = self._connection().execute(
                query("claim_batch"),
                {"limit": inf.batch_size, "deadline_s": inf.max_latency_ms / 1000.0},
            )
            return cur.fetchall()

    def step(self) -> int:
        """Claim one batch and send it; returns how many rows were claimed."""
        rows = self.claim()
        if not rows:
            return 0
        self.claimed += len(rows)
        overdue = [r[0] for r in rows if r[4]]
        fresh = [[r[0], r[1], r[2], r[3]] for r in rows if not r[4]]
        if overdue:
            self._expire(overdue, "deadline")
        if fresh:
            self.dispatch(fresh)
        return len(rows)

    def dispatch(self, rows: Sequence[Sequence[Any]]) -> None:
        try:
            self.app.send_task(
                INFER_TASK,
                args=[rows],
                queue=self.queue,
                retry=True,
                retry_policy=PUBLISH_RETRY,
            )
        except Exception as exc:  # any broker failure: answer now, never strand the rows
            log.error(
                "cannot publish a batch of %d: %s",
                len(rows),
                exc,
                extra={"event": "publish_failed", "queue": self.queue},
            )
            self._expire([r[0] for r in rows], "broker_unavailable")
            return
        self.sent += len(rows)

    def _expire(self, request_ids: list[int], reason: str) -> None:
        with self._errors("expiring"):
            expire(self._connection(), request_ids, reason)
        self.expired += len(request_ids)
        log.info(
            "answered %d requests 255 (%s)",
            len(request_ids),
            reason,
            extra={"event": "requests_expired", "reason": reason, "rows": len(request_ids)},
        )

    def housekeeping(self) -> None:
        """Give back rows whose lease ran out; answer rows the game gave up on unclaimed."""
        with self._errors("housekeeping"):
            conn = self._connection()
            conn.execute(query("release_stale"), {"lease_s": self.config.inference.lease_ms / 1000})
            conn.execute(query("answer_game_timeouts"))

    def drain(self) -> int:
        """Claim until the table has no pending row left; returns rows claimed."""
        total = 0
        while True:
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
                self.wait(min(poll_s, max(0.0, self._next_housekeeping - time.monotonic())))
                backoff = 0.1
            except DatabaseError as exc:
                log.warning(
                    "database unavailable, retrying in %.1fs: %s",
                    backoff,
                    exc,
                    extra={"event": "bridge_db_error"},
                )
                self.close()
                stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        self.close()
        log.info(
            "stopped: %d claimed, %d sent, %d answered 255",
            self.claimed,
            self.sent,
            self.expired,
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
    Bridge(config).run(stop)
