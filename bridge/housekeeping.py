"""The bridge's rounds beside its claim loop: the fallback level, expired leases, gone
bridges, the game's timeouts.

They run on a thread and a database connection of their own, four times a second, so the
claim loop never waits for them. On the claim loop, the lease sweep alone held claiming up
for 2.7 ms (p50), up to 12 ms, every round at 10,000 decisions/s, and the rows that arrived
meanwhile were the p99 (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from mltasks import metrics
from mltasks.config import Config
from mltasks.db import connect
from mltasks.errors import DatabaseError
from mltasks.sql import query

log = logging.getLogger(__name__)

# A round this often.
HOUSEKEEPING_EVERY_S = 0.25
# The lease sweep (release_stale) releases at most this many rows a round. It looks back
# to where its last complete round ended, less this margin (a claim that committed later
# than that is found by the next full look back)...
RELEASE_LIMIT = 1000
SWEEP_MARGIN_S = 0.5
# ...and at start, and this often, over every claimed row. Its cost grows with the dead
# index entries left since the last vacuum (3.6 ms for 66,000); a bounded round at
# 10,000 decisions/s costs 0.2 ms.
FULL_SWEEP_EVERY_S = 10.0
# A full look back: further than any row's age.
FULL_LOOKBACK_S = 10 * 365 * 86400.0


class Housekeeping:
    """One bridge's rounds; ``refresh_level`` is the bridge's own (it routes by it)."""

    def __init__(self, config: Config, refresh_level: Callable[[], None]) -> None:
        self.config = config
        self.refresh_level = refresh_level
        self.conn: psycopg.Connection[tuple[Any, ...]] | None = None
        # When (monotonic) the lease sweep last completed, bounded and full.
        self._swept_at: float | None = None
        self._full_swept_at: float | None = None

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        """Its own connection (it never listens), made again after an error."""
        if self.conn is None or self.conn.closed:
            self.conn = connect(self.config.database)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def round(self) -> None:
        """Give back rows whose lease ran out; answer rows the game gave up on unclaimed."""
        self.refresh_level()
        try:
            conn = self._connection()
            self._release_stale(conn)
            conn.execute(query("forget_gone_bridges"))
            cur = conn.execute(
                query("answer_game_timeouts"), {"lease_s": self.config.inference.lease_ms / 1000}
            )
            if cur.rowcount > 0:
                metrics.observe_answers({"expired": cur.rowcount}, [])
        except psycopg.Error as exc:
            self.close()
            raise DatabaseError(f"housekeeping: {exc}") from exc

    def _release_stale(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        """Give back expired leases, looking back only as far as needed (release_stale)."""
        now = time.monotonic()
        lease_s = self.config.inference.lease_ms / 1000
        if (
            self._swept_at is None
            or self._full_swept_at is None
            or now - self._full_swept_at >= FULL_SWEEP_EVERY_S
        ):
            full, since_s = True, FULL_LOOKBACK_S
        else:
            full, since_s = False, lease_s + (now - self._swept_at) + SWEEP_MARGIN_S
        cur = conn.execute(
            query("release_stale"),
            {"lease_s": lease_s, "since_s": since_s, "limit": RELEASE_LIMIT},
        )
        if cur.rowcount < RELEASE_LIMIT:  # complete: the next round starts from here
            self._swept_at = now
            if full:
                self._full_swept_at = now

    def run(self, stop: threading.Event) -> None:
        """A round every HOUSEKEEPING_EVERY_S until ``stop``, then the connection closed.
        A failed round is logged and tried again, never fatal."""
        backoff = 0.1
        while not stop.is_set():
            try:
                self.round()
                backoff = 0.1
                stop.wait(HOUSEKEEPING_EVERY_S)
            except DatabaseError as exc:
                log.warning(
                    "housekeeping: database unavailable, retrying in %.1fs: %s",
                    backoff,
                    exc,
                    extra={"event": "bridge_db_error"},
                )
                stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:  # a bug here must not stop the leases for good
                log.exception("housekeeping failed", extra={"event": "housekeeping_failed"})
                stop.wait(HOUSEKEEPING_EVERY_S)
        self.close()

    def start(self, stop: threading.Event) -> threading.Thread:
        """`run` on a daemon thread of its own."""
        thread = threading.Thread(
            target=self.run, args=(stop,), name="bridge-housekeeping", daemon=True
        )
        thread.start()
        return thread
