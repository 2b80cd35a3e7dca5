"""The floor: the least work that answers the game, to compare the service against.

One statement claims, closes and answers up to a batch of pending requests with a fixed
action (sql/bench.sql ``floor_answer``); it is woken by the schema's NOTIFY, with a 50 ms
polling fallback, exactly like the bridge. Whatever the service costs above this is the
price of routing, batching and inference.

The model floor (``--model``) claims with the service's own statement, runs the same
fusion as a worker of the level (same files, precisions, sessions, fusion rule; no cache)
and writes with the service's own answer statement: the service minus its broker, its
bridge and its process hops. Service / model floor is the cost of the architecture with
real work in it.

``python -m mltasks.bench.floor [--database-url URL] [--model [--level 3]]`` runs it until
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

import psycopg

from mltasks.bench.queries import bench_query
from mltasks.sql import query

log = logging.getLogger(__name__)

FLOOR_ACTION = 1  # ATTACK: a valid, fixed answer
BATCH = 128
POLL_S = 0.05


class Floor:
    """A responder that answers every pending request at once, nothing else."""

    def __init__(
        self,
        conninfo: str,
        *,
        action_id: int = FLOOR_ACTION,
        batch: int = BATCH,
        poll_s: float = POLL_S,
    ) -> None:
        self.conninfo = conninfo
        self.action_id = action_id
        self.batch = batch
        self.poll_s = poll_s
        self.answered = 0

    def drain(self, conn: psycopg.Connection[tuple[Any, ...]]) -> int:
        """Answer batches until one comes back short: the table has nothing pending."""
        total = 0
        params = {"limit": self.batch, "action_id": self.action_id}
        while True:
            cur = conn.execute(bench_query("floor_answer"), params, prepare=True)
            n = max(cur.rowcount, 0)
            total += n
            if n < self.batch:
                self.answered += total
                return total

    def run(self, stop: threading.Event) -> None:
        """Answer until ``stop`` is set (checked at least every poll interval)."""
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute("LISTEN ai_requests")
            while not stop.is_set():
                if self.drain(conn):
                    continue  # busy: claim again before sleeping
                # Asleep on record, as a bridge sleeps (the game's INSERTs notify only then):
                # until an insert notifies or the poll interval passes; the backlog of
                # notifications is swallowed: one drain answers all of them.
                conn.execute(query("bridge_sleeps"))
                conn.execute(query("bridge_settles"))
                row = conn.execute(query("has_pending")).fetchone()
                if not (row and row[0]):
                    for _ in conn.notifies(timeout=self.poll_s, stop_after=1):
                        pass
                    for _ in conn.notifies(timeout=0):
                        pass
                # Off the record in the next claim's own statement (floor_answer,
                # claim_batch), as the bridge does.


class ModelFloor(Floor):
    """Claim a batch, infer it in this process as a worker would, answer it: no broker."""

    def __init__(self, conninfo: str, *, level: int = 3, batch: int = 64) -> None:
        from mltasks.config import get_config
        from mltasks.models.engine import get_engine
        from mltasks.models.fusion import rule_of

        super().__init__(conninfo, batch=batch)
        self.config = get_config()
        self.engine = get_engine(self.config, level)
        self.rule = rule_of(self.config)

    def drain(self, conn: psycopg.Connection[tuple[Any, ...]]) -> int:
        import secrets

        from mltasks.serving.answers import write_answers
        from mltasks.serving.inference import answer_batch
        from mltasks.sql import query

        total = 0
        while True:
            token = secrets.token_hex(16)
            params = {"limit": self.batch, "deadline_s": 3600.0, "token": token}
            rows = conn.execute(query("claim_batch"), params, prepare=True).fetchall()
            batch = [[r[0], r[1], r[2], r[3], r[4]] for r in rows if r[7] is None and not r[5]]
            if batch:  # rows the claim answered itself (invalid, overdue) have no state
                answers = answer_batch(batch, self.engine, None, self.rule).answers
                write_answers(conn, answers, token)
            total += len(rows)
            if len(rows) < self.batch:
                self.answered += total
                return total


def main(argv: Sequence[str] | None = None) -> None:
    """Run the floor on the configured database (or ``--database-url``) until a signal."""
    p = argparse.ArgumentParser(prog="python -m mltasks.bench.floor", description=__doc__)
    p.add_argument("--database-url", help="libpq URL (default: the mltasks config's database)")
    p.add_argument("--action-id", type=int, default=FLOOR_ACTION)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--model", action="store_true", help="run the models (the model floor)")
    p.add_argument("--level", type=int, default=3, help="with --model: whose fusion (1-3)")
    args = p.parse_args(argv)
    if args.database_url:
        conninfo = args.database_url
    else:
        from mltasks.config import get_config

        conninfo = get_config().database.conninfo
    floor: Floor
    if args.model:
        floor = ModelFloor(conninfo, level=args.level, batch=min(args.batch, 128))
    else:
        floor = Floor(conninfo, action_id=args.action_id, batch=args.batch)
    run_until_signalled(floor)


def run_until_signalled(floor: Floor) -> None:
    """Run a floor (or the broker floor's bridge) until SIGINT or SIGTERM; log its count."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    floor.run(stop)
    log.info(
        "%s stopped: %d requests handled",
        type(floor).__name__,
        floor.answered,
        extra={"event": "floor_stopped"},
    )


if __name__ == "__main__":
    main()
