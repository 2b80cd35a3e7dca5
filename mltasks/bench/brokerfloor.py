"""The broker floor: the design's path (claim, Celery task through Redis, worker, one
write) with nothing else in it.

A minimal bridge claims pending rows (sql/bench.sql ``broker_floor_claim``, states as
``array_send`` bytes: no Python floats) and sends each batch as one msgpack Celery task to
its own queue, holding back while a batch already waits there (LLEN >= 1 after a
publish, re-checked every 0.5 ms). Its sessions are the service's (synchronous_commit
off). Solo workers
(``celery -A mltasks.bench.brokerfloor -b URL worker -Q bench_broker_floor --pool solo``)
decode the states with numpy, run a fixed 64x10 matmul, take the argmax and answer the
whole batch in one statement (``broker_floor_answer``). No cache, fusion, ladder, leases
or metrics: service / broker floor is what those cost above the architecture itself.

``python -m mltasks.bench.brokerfloor --database-url URL --broker-url URL`` runs the
bridge until SIGINT or SIGTERM; the workers read ``MLTASKS_BROKER_FLOOR_DATABASE_URL``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
import redis
from celery import Celery

from mltasks.bench.floor import Floor, run_until_signalled
from mltasks.bench.queries import bench_query
from mltasks.config import DatabaseConfig
from mltasks.contract import TRADITIONAL_AI
from mltasks.serving.validation import WIRE_BYTES

QUEUE = "bench_broker_floor"
TASK = "mltasks.bench.broker_floor_answer"
SOURCE = "floor-broker"
DATABASE_ENV = "MLTASKS_BROKER_FLOOR_DATABASE_URL"
BATCH = 64
HOLD_S = 0.0005  # re-check of a queue that still holds a batch
STATE_BYTES = WIRE_BYTES  # array_send of a 1-D real[64], as the service's claim sends it

app = Celery("mltasks.bench.brokerfloor", set_as_current=False)
app.conf.update(
    task_serializer="msgpack",
    accept_content=["msgpack"],
    result_backend=None,
    task_ignore_result=True,
    # One batch at a time per solo worker, as the service's: a solo worker's concurrency
    # defaults to the cores, and it would then take a second batch while the other idles.
    worker_concurrency=1,
    worker_prefetch_multiplier=1,
    worker_disable_rate_limits=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    # The service's transport, minus kombu's unacked bookkeeping for this task, as for
    # infer_batch: the floor pays what the service pays for a message, no more.
    broker_transport="mltasks.broker.transport:Transport",
    broker_transport_options={"untracked_tasks": (TASK,)},
)

WEIGHTS = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
_conn: psycopg.Connection[tuple[Any, ...]] | None = None


def sessions(url: str) -> str:
    """The URL with the service's session settings (synchronous_commit off), as its own."""
    return DatabaseConfig(url=url).conninfo


def decide(states: Sequence[bytes | None]) -> tuple[list[int], list[float]]:
    """Actions and confidences of the fixed tiny model; 255 for a state that is not 64 values."""
    ok = [i for i, s in enumerate(states) if s is not None and len(s) == STATE_BYTES]
    actions = [TRADITIONAL_AI] * len(states)
    confidences = [0.0] * len(states)
    if ok:
        words = np.frombuffer(b"".join(states[i] or b"" for i in ok), dtype=">f4")
        x = np.nan_to_num(words.reshape(len(ok), STATE_BYTES // 4)[:, 6::2].astype(np.float32))
        logits = x @ WEIGHTS
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        best = e.argmax(axis=1)
        conf = e[np.arange(len(ok)), best] / e.sum(axis=1)
        for j, i in enumerate(ok):
            actions[i], confidences[i] = int(best[j]), float(conf[j])
    return actions, confidences


@app.task(name=TASK)  # type: ignore[untyped-decorator]  # Celery is unannotated
def answer(request_ids: list[int], states: list[bytes | None]) -> int:
    """Answer a batch and close its rows in one statement; the number answered."""
    global _conn
    if _conn is None or _conn.closed:
        _conn = psycopg.connect(sessions(os.environ[DATABASE_ENV]), autocommit=True)
    actions, confidences = decide(states)
    params = {"ids": request_ids, "actions": actions, "confs": confidences, "source": SOURCE}
    cur = _conn.execute(bench_query("broker_floor_answer"), params, prepare=True)
    return max(cur.rowcount, 0)


class BrokerFloorBridge(Floor):
    """Claims and publishes; sleeps on the schema's NOTIFY like the floor (Floor.run)."""

    def __init__(self, conninfo: str, broker_url: str, *, batch: int = BATCH) -> None:
        super().__init__(sessions(conninfo), batch=batch)
        app.conf.broker_url = broker_url
        self.queue = redis.Redis.from_url(broker_url, socket_timeout=5)
        self.held = False  # the last look (LLEN after a publish) found a batch waiting

    def drain(self, conn: psycopg.Connection[tuple[Any, ...]]) -> int:
        """Claim and send batches until one comes back short, holding back while a batch
        waits in the queue. LLEN is asked after each publish (a worker blocked in BRPOP
        has taken the batch by then), and again while held: not before every claim."""
        total = 0
        while True:
            if self.held and int(self.queue.llen(QUEUE)) >= 1:
                time.sleep(HOLD_S)  # don't claim yet
                self.answered += total
                return total or 1  # busy: Floor.run comes back without sleeping
            self.held = False
            params = {"limit": self.batch}
            rows = conn.execute(bench_query("broker_floor_claim"), params, prepare=True).fetchall()
            if rows:
                ids = [int(r[0]) for r in rows]
                app.send_task(TASK, args=(ids, [r[1] for r in rows]), queue=QUEUE)
                self.held = int(self.queue.llen(QUEUE)) >= 1
            total += len(rows)
            if len(rows) < self.batch:
                self.answered += total
                return total


def main(argv: Sequence[str] | None = None) -> None:
    """Run the broker floor's bridge until a signal."""
    p = argparse.ArgumentParser(prog="python -m mltasks.bench.brokerfloor", description=__doc__)
    p.add_argument("--database-url", required=True, help="libpq URL of the bench database")
    p.add_argument("--broker-url", required=True, help="redis://host:port/db of the broker")
    p.add_argument("--batch", type=int, default=BATCH)
    args = p.parse_args(argv)
    run_until_signalled(BrokerFloorBridge(args.database_url, args.broker_url, batch=args.batch))


if __name__ == "__main__":
    main()
