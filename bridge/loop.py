"""Claim -> route -> send, woken by NOTIFY, polling only as a fallback.

Several bridges may run at once: ``FOR UPDATE SKIP LOCKED`` in ``claim_batch`` keeps
them from claiming a row twice. Whatever fails after a claim, the rows are answered
(255 with a reason) rather than left ``processing``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from celery import Celery

from bridge.congestion import CONGESTION_RECHECK_S, Congestion, Waiting
from bridge.housekeeping import Housekeeping
from bridge.publish import Publisher
from mltasks import metrics
from mltasks.config import Config, get_config
from mltasks.db import connect
from mltasks.errors import DatabaseError
from mltasks.fallback.ladder import LEVEL_QUEUE, QUEUES, Level, route
from mltasks.fallback.levels import LEVEL_READ_TIMEOUT_S, LevelState, LevelStore
from mltasks.fallback.rules import rules_engine
from mltasks.redisurl import cache_client, client_from_url
from mltasks.serving.answers import expire, write_answers
from mltasks.serving.inference import answer_rows
from mltasks.serving.records import Claimed, Row, claimed, traditional
from mltasks.sql import query

log = logging.getLogger(__name__)

# At stop, how long the claim loop waits for a housekeeping round still running.
KEEPER_JOIN_S = 5.0
# After a failed publish, batches are answered here for this long before the next try.
PUBLISH_PAUSE_S = 1.0
# A batch still waiting in its queue at `InferenceConfig.rescue_after_s` (80% of its oldest
# row's deadline) is taken back and answered 255 here (`rescue`), at most this often.
RESCUE_EVERY_S = 0.005


class Bridge:
    """One bridge process: its database connection, its view of the level, its counters."""

    def __init__(self, config: Config | None = None, app: Celery | None = None) -> None:
        self.config = config or get_config()
        if app is None:
            from mltasks.celery import app as default_app

            app = default_app
        self.app = app
        self.store = LevelStore(self.config, cache_client(self.config, LEVEL_READ_TIMEOUT_S))
        self.state = self.store.last
        self.live: dict[str, bool] = {}
        # The level batches are served at: the shared one, or lower when its tier is empty.
        # Until Redis has been read, the configured start level.
        self.level = int(self.config.fallback.start_level)
        self._publish_blocked_until = 0.0
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self.claimed = 0
        self.sent = 0
        self.expired = 0
        self.answered_here = 0
        self.diverted = 0
        # Sent batches: (when to rescue them (monotonic), queue, message, request ids).
        self._in_flight: deque[tuple[float, str, bytes, list[int]]] = deque()
        self.rescue_after_s = self.config.inference.rescue_after_s
        self.rescued = 0
        self.topped_up = 0  # rows that joined a waiting batch
        self.left_to_workers = 0  # rows of due batches a worker had taken: not rescued
        # The broker the app's workers consume from (its URL, not ours: a test or a
        # deployment may point the app elsewhere).
        self._broker = client_from_url(
            str(self.app.conf.broker_url),
            master_name=self.config.redis.sentinel_master,
            socket_timeout=self.config.redis.socket_timeout_s,
            socket_connect_timeout=self.config.redis.socket_timeout_s,
        )
        self.publisher = Publisher(self.app, self._broker)
        self.congestion = Congestion(self.config, self._broker)
        self.refresh_level()
        self.keeper = Housekeeping(self.config, self.refresh_level)

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
        """Drop the claim loop's database connection (it is made again on the next use)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- one round ----------------------------------------------------------------------

    def claim(
        self, limit: int | None = None, token: str | None = None
    ) -> tuple[str, list[Claimed]]:
        """Claim a batch (at most ``limit`` rows, else ``inference.batch_size``) under
        ``token``, by default a fresh random one: (token, rows).

        Rows the claim itself answered `invalid` (a state that is not 64 values) come
        back without their state and with the reason in ``invalid``.
        """
        inf = self.config.inference
        token = token or secrets.token_hex(16)
        with self._errors("claiming"):
            # Binary results: each state comes as its array's bytes (array_send), passed
            # on to the worker untouched (mltasks/serving/validation.py decodes them).
            cur = self._connection().execute(
                query("claim_batch"),
                {
                    "limit": limit or inf.batch_size,
                    "deadline_s": inf.max_latency_ms / 1000.0,
                    "token": token,
                },
                binary=True,
            )
            return token, claimed(cur.fetchall())

    def step(self) -> int:
        """Claim one batch and send it; returns how many rows were claimed."""
        token, rows = self.claim()
        if not rows:
            return 0
        fresh = self._fresh(rows)
        if fresh:
            self.dispatch([r.row() for r in fresh], [r.created_epoch for r in fresh], token)
        return len(rows)

    def _fresh(self, rows: list[Claimed]) -> list[Claimed]:
        """Count what the claim answered itself (invalid and overdue rows); the rest."""
        self.claimed += len(rows)
        invalid = [r for r in rows if r.invalid is not None]
        if invalid:
            self.answered_here += len(invalid)
            metrics.observe_answers(
                {"invalid": len(invalid)}, metrics.seconds_since(r.created_epoch for r in invalid)
            )
            rows = [r for r in rows if r.invalid is None]
        overdue = [r for r in rows if r.overdue]
        if overdue:  # the claim answered them 255 `deadline` already
            self._expired(len(overdue), "deadline", [r.created_epoch for r in overdue])
            return [r for r in rows if not r.overdue]
        return rows

    def top_up(self) -> int:
        """While the tier's queue is full, pending rows join the batch still waiting in it
        (taken back with one LREM and sent again with them); returns how many were claimed.

        Without it, rows that arrive while a batch waits wait behind it in PostgreSQL. In
        bulk load at 7,000/s it held the step in 4 of 5 runs against 2 of 5 (PERFORMANCE.md).
        The rows are claimed under the waiting batch's own token, so whichever way the
        LREM goes, one message answers them; a batch a worker took meanwhile is left to
        it and the new rows go out as the next one.
        """
        queue = LEVEL_QUEUE.get(self.level)
        waiting = self.congestion.waiting.get(queue) if queue is not None else None
        if queue is None or waiting is None or waiting.level != self.level:
            return 0
        room = self.config.inference.batch_size - len(waiting.rows)
        if room <= 0:
            return 0
        _, claimed_rows = self.claim(room, waiting.token)
        if not claimed_rows:
            return 0
        fresh = self._fresh(claimed_rows)
        if not fresh:
            return len(claimed_rows)
        rows = [r.row() for r in fresh]
        created = [r.created_epoch for r in fresh]
        del self.congestion.waiting[queue]
        last = self._in_flight[-1] if self._in_flight else None
        if (
            last is not None
            and last[2] is waiting.message
            and self.publisher.withdraw([(queue, waiting.message)]) == [True]
        ):
            due = self._in_flight.pop()[0]  # sent again below, with the same rescue time
            self.sent -= len(waiting.rows)
            self.topped_up += len(rows)
            rows = [*waiting.rows, *rows]
            created = [*waiting.created, *created]
            self.dispatch(rows, created, waiting.token, due)
        else:
            self.dispatch(rows, created, waiting.token)
        return len(claimed_rows)

    def dispatch(
        self,
        rows: Sequence[Row],
        created: Sequence[float] = (),
        token: str = "",
        due: float | None = None,
    ) -> None:
        """Send a batch to the queue of the current level; level 5 is answered here.

        ``created`` holds each row's created_at (epoch s), for end-to-end latency metrics;
        ``token`` is the claim's (the answer must bring it back); ``due`` the batch's rescue
        time (monotonic), by default from its oldest row.
        """
        level = self.level
        if level >= Level.TRADITIONAL:
            self.answer_here(
                rows, rules=False, reason="fallback_level_5", created=created, token=token
            )
            return
        queue = LEVEL_QUEUE[level]
        if self.congestion.lapsed(queue):
            # Its queue has been full as long as the rows may wait: the next live tier
            # below whose queue has room, else the rule policy here. Never a timeout.
            below = self._next_tier(level)
            if below is None:
                self.diverted += len(rows)
                self.answer_here(rows, rules=True, reason="congested", created=created, token=token)
                return
            level, queue = below, LEVEL_QUEUE[below]
            self.diverted += len(rows)
        if time.monotonic() < self._publish_blocked_until:
            # The broker failed a moment ago: do not stall every batch on it.
            self.answer_here(
                rows, rules=True, reason="broker_unavailable", created=created, token=token
            )
            return
        try:
            waiting = self.publisher.publish(
                queue, [rows, level, time.time(), list(created), token], len(rows)
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
            self.answer_here(
                rows, rules=True, reason="broker_unavailable", created=created, token=token
            )
            return
        self.sent += len(rows)
        full = self.congestion.published(queue, waiting)
        if not waiting:  # taken at once by a worker in BRPOP: its (or the lease's), no LREM
            return
        if due is None:
            oldest = min(created, default=time.time())
            due = time.monotonic() + max(0.0, oldest + self.rescue_after_s - time.time())
        sent = (due, queue, self.publisher.last_message, [int(r.request_id) for r in rows])
        self._in_flight.append(sent)
        if full and self.config.inference.top_up:
            # A busy tier: the next rows join this batch while it waits (`top_up`).
            message = self.publisher.last_message
            self.congestion.waiting[queue] = Waiting(level, token, rows, created, message)

    def answer_here(
        self,
        rows: Sequence[Row],
        *,
        rules: bool,
        reason: str,
        created: Sequence[float] = (),
        token: str = "",
    ) -> None:
        """Answer in this process: the rule policy where allowed, else 255.

        A row already past its deadline gets 255 ``deadline`` instead of a rule action
        (a publish that hung until the broker's timeout, seconds): the game has given up
        on it and an action that late could only be read as an answer to a later one.
        """
        late: set[int] = set()
        if rules and len(created) == len(rows):
            limit = time.time() - self.config.inference.max_latency_ms / 1000
            late = {int(r.request_id) for r, c in zip(rows, created, strict=True) if c < limit}
        live = [r for r in rows if int(r.request_id) not in late] if late else rows
        if rules:
            answers = answer_rows(live, rules_engine(self.config.state.layout))
            answers = [a if a.reason else dataclasses.replace(a, reason=reason) for a in answers]
        else:
            answers = [traditional(int(r.request_id), reason) for r in live]
        answers += [traditional(rid, "deadline", status="expired") for rid in sorted(late)]
        with self._errors("answering"):
            write_answers(self._connection(), answers, token)
        self.answered_here += len(answers)
        metrics.observe_answers(metrics.count_outcomes(answers), metrics.seconds_since(created))

    def _expired(self, n: int, reason: str, created: Sequence[float] = ()) -> None:
        """Count ``n`` requests answered 255 (``reason``) without a worker."""
        self.expired += n
        metrics.observe_answers({"expired": n}, metrics.seconds_since(created))
        log.debug(  # per batch: the counts are in ml_requests_total{outcome="expired"}
            "answered %d requests 255 (%s)",
            n,
            reason,
            extra={"event": "requests_expired", "reason": reason, "rows": n},
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

    def rescue(self) -> int:
        """Answer 255 the due batches no worker took, taken back off their queue first
        (`Publisher.withdraw`); a worker's batch is its own, or the lease's if it dies."""
        now = time.monotonic()
        due: list[tuple[float, str, bytes, list[int]]] = []
        while self._in_flight and self._in_flight[0][0] <= now:
            due.append(self._in_flight.popleft())
        if not due:
            return 0
        back = self.publisher.withdraw([(queue, message) for _, queue, message, _ in due])
        ids: list[int] = []
        for (*_, batch), ours in zip(due, back, strict=True):
            if ours:
                ids.extend(batch)
            else:
                self.left_to_workers += len(batch)
        if not ids:
            return 0
        with self._errors("rescuing"):
            n = expire(self._connection(), ids, "lost")
        if n:
            self.rescued += n
            metrics.observe_answers({"expired": n}, [])
            log.warning(
                "answered %d requests 255: their batch was not answered in %.0f ms",
                n,
                self.rescue_after_s * 1000,
                extra={"event": "requests_rescued", "rows": n},
            )
        return n

    def _next_rescue_s(self) -> float:
        if not self._in_flight:
            return float("inf")
        return max(RESCUE_EVERY_S, self._in_flight[0][0] - time.monotonic())

    def housekeeping(self) -> None:
        """One housekeeping round now (bridge/housekeeping.py; `run` has them on a thread)."""
        self.keeper.round()

    def congested(self) -> bool:
        """True while the tier's queue is full and rows are held back (bridge.congestion)."""
        return self.congestion.congested(LEVEL_QUEUE.get(self.level))

    def _next_tier(self, level: int) -> int | None:
        """The first level below ``level`` with a live consumer and room in its queue."""
        for lower in range(level + 1, Level.TRADITIONAL):
            queue = LEVEL_QUEUE[lower]
            if (
                self.live.get(queue)
                and queue != LEVEL_QUEUE[level]
                and not self.congestion.full(queue)
            ):
                return lower
        return None

    def drain(self) -> int:
        """Claim until the table has no pending row left, or the tier is congested."""
        total = 0
        while True:
            if self.congested():
                return total + self.top_up()
            n = self.step()
            total += n
            if n < self.config.inference.batch_size:
                return total

    def wait(self, timeout_s: float) -> None:
        """Sleep until a NOTIFY arrives or ``timeout_s`` passes; swallow the backlog.

        Only a sleeping bridge is on record (ai_bridges_waiting), so the game's INSERTs
        notify only then: a NOTIFY serialises the commits of every inserting map server
        (sql/schema.sql). Going on record, the bridge waits for the inserts that looked
        before it did, then looks for pending rows once more: no row is left unnoticed.
        It goes off the record in its next claim (claim_batch), which follows at once.
        """
        with self._errors("waiting"):
            conn = self._connection()
            conn.execute(query("bridge_sleeps"))
            conn.execute(query("bridge_settles"))
            row = conn.execute(query("has_pending")).fetchone()
            if row is not None and row[0]:
                return
            for _ in conn.notifies(timeout=timeout_s, stop_after=1):
                pass
            for _ in conn.notifies(timeout=0):
                pass

    # -- the loop -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        poll_s = self.config.inference.poll_interval_ms / 1000
        backoff = 0.1
        keeper = self.keeper.start(stop)
        while not stop.is_set():
            try:
                claimed = self.drain()
                self.rescue()
                if LEVEL_QUEUE.get(self.level) in self.congestion.held:
                    # Holding rows back on purpose: nothing to be woken for (and no reason
                    # to have the game's inserts notify); look at the queue again soon.
                    stop.wait(min(CONGESTION_RECHECK_S, self._next_rescue_s()))
                    continue
                if claimed:
                    continue  # busy: claim again; sleep (and have inserts notify) when idle
                self.wait(min(poll_s, self._next_rescue_s()))
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
        keeper.join(KEEPER_JOIN_S)
        if self._conn is not None and not self._conn.closed:
            # Off the sleepers' record (a claim would have done it; else the other
            # bridges' forget_gone_bridges does once this connection is gone).
            with contextlib.suppress(psycopg.Error):
                self._conn.execute(query("bridge_wakes"))
        self.close()
        self._broker.close()
        self.store.redis.close()
        log.info(
            "stopped: %d claimed, %d sent, %d expired, %d answered in the bridge, "
            "%d diverted from a full queue, %d rescued, %d joined a waiting batch",
            self.claimed,
            self.sent,
            self.expired,
            self.answered_here,
            self.diverted,
            self.rescued,
            self.topped_up,
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
