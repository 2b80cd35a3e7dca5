"""The smallest form of what a killed worker, a killed bridge or a Redis that lost its
queue do to the real game: a row is claimed, its batch is lost, and the game (whose
timeout, ml_max_latency_ms, is far shorter than the lease) gives up on it first.

README, Statuses: "`timeout`: set by the game when it gave up; such a row still gets
exactly one response". The lease must not forget such rows.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import psycopg
import pytest
from celery import Celery

from bridge.loop import Bridge
from mltasks.broker.celery_app import settings_for
from mltasks.config import Config
from tests import game
from tests.conftest import wait_for

pytestmark = pytest.mark.faults

STATE = [0.8, 0.5] + [0.0] * 62


def dead_broker_app(config: Config) -> Celery:
    """A Celery app whose broker is a closed port: nothing it sends arrives anywhere."""
    app = Celery("dead")
    app.conf.update(settings_for(config))
    app.conf.broker_url = "redis://127.0.0.1:1/0"
    return app


def test_a_claimed_row_the_game_gave_up_on_gets_one_answer_after_its_batch_is_lost(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    cfg = dataclasses.replace(
        config,
        inference=dataclasses.replace(config.inference, lease_ms=100, max_latency_ms=50),
    )
    rid = game.insert(pg, STATE)
    b = Bridge(cfg, dead_broker_app(cfg))
    try:
        # Claimed, and then the batch is lost (a worker killed with it, a Redis restarted
        # empty, a bridge killed before its publish): nothing will ever answer it.
        assert [r[0] for r in b.claim()[1]] == [rid]
        game.mark_timeout(pg, rid)  # the game's timeout comes long before the lease's
        started = time.monotonic()

        def answered() -> bool:
            b.housekeeping()
            b.step()
            return game.poll(pg, rid) is not None

        try:
            wait_for(answered, 3, "an answer once the lease ran out")
        except AssertionError:
            row = pg.execute(
                "SELECT status, claimed_at IS NOT NULL, attempts FROM ai_requests"
                " WHERE request_id = %s",
                (rid,),
            ).fetchone()
            raise AssertionError(
                f"request {rid} (status, claimed, attempts) = {row}: still no answer "
                f"{time.monotonic() - started:.1f}s after the game gave up, 30x the lease"
            ) from None
    finally:
        b.close()
    assert game.poll(pg, rid) == (255, 0.0)
    assert pg.execute("SELECT count(*) FROM ai_responses").fetchone() == (1,)
    assert pg.execute("SELECT status FROM ai_requests").fetchone() == ("timeout",)
