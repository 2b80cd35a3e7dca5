"""The worker's task: answer one claimed batch."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from celery import Task
from celery.signals import setup_logging, worker_process_init, worker_process_shutdown
from psycopg_pool import ConnectionPool

from beat.schedule import CLEANUP_TASK
from mltasks.celery_app import INFER_TASK, app
from mltasks.config import get_config
from mltasks.engine import get_engine, reset_engine
from mltasks.errors import DatabaseError
from mltasks.inference import Row, answer_rows
from mltasks.logs import configure_logging
from mltasks.responses import write_answers
from mltasks.sql import query

log = logging.getLogger(__name__)

_pool: ConnectionPool | None = None


def _db_pool() -> ConnectionPool:
    """This process's connections, opened after the fork."""
    global _pool
    if _pool is None:
        _pool = ConnectionPool(
            get_config().database.conninfo,
            min_size=1,
            max_size=2,
            kwargs={"autocommit": True},
            open=True,
            name="mltasks-worker",
        )
    return _pool


def close_pool() -> None:
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Sessions and connections are per process: make them now, not on the first batch.
    reset_engine()
    get_engine(get_config())


@worker_process_shutdown.connect
def _before_exit(**_: Any) -> None:
    close_pool()


@setup_logging.connect
def _logging(**_: Any) -> None:
    configure_logging(get_config().logging)


@app.task(
    name=INFER_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=2,
)
def infer_batch(self: Task, rows: list[Row]) -> int:
    """Validate, infer and answer every row of a batch; returns how many were answered."""
    cfg = get_config()
    answers = answer_rows(rows, get_engine(cfg))
    try:
        with _db_pool().connection() as conn:
            write_answers(conn, answers)
    except (DatabaseError, psycopg.Error) as exc:
        log.warning(
            "writing %d answers failed: %s",
            len(answers),
            exc,
            extra={"event": "answer_write_failed", "task_id": self.request.id},
        )
        # Unanswered rows are expired by the bridge once their lease runs out.
        raise self.retry(exc=exc, countdown=0.05) from exc
    log.debug(
        "answered %d rows",
        len(answers),
        extra={"event": "batch_answered", "task_id": self.request.id, "rows": len(answers)},
    )
    return len(answers)


@app.task(name=CLEANUP_TASK, ignore_result=True, acks_late=True)
def cleanup() -> int:
    """Delete finished rows past the retention, batch by batch; returns rows deleted."""
    cfg = get_config().cleanup
    total = 0
    with _db_pool().connection() as conn:
        while True:
            cur = conn.execute(
                query("delete_finished"),
                {"retention_s": cfg.retention_s, "limit": cfg.batch_limit},
            )
            total += cur.rowcount
            if cur.rowcount < cfg.batch_limit:
                break
    if total:
        log.info("deleted %d finished requests", total, extra={"event": "cleanup", "rows": total})
    return total
