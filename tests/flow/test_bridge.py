"""The bridge's promises that need no model: deadlines, leases, game timeouts, no broker."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery

from bridge import housekeeping
from bridge.housekeeping import SWEEP_MARGIN_S
from bridge.loop import Bridge
from mltasks.config import Config
from tests import game
from tests.conftest import app_with_broker, wait_for

STATE = [0.8, 0.5] + [0.0] * 62


def response(pg: psycopg.Connection[Any], rid: int) -> tuple[Any, ...] | None:
    return pg.execute(
        "SELECT s.action_id, s.confidence, s.reason, r.status "
        "FROM ai_requests r LEFT JOIN ai_responses s USING (request_id) WHERE request_id = %s",
        (rid,),
    ).fetchone()


def dead_broker_app(config: Config) -> Celery:
    """A Celery app whose broker is a closed port: every publish fails at once."""
    return app_with_broker(config, "redis://127.0.0.1:1/0", "dead")


@contextlib.contextmanager
def bridge_on_dead_broker(config: Config) -> Iterator[Bridge]:
    """A Bridge on `config` whose every publish fails, closed however the block ends."""
    b = Bridge(config, dead_broker_app(config))
    try:
        yield b
    finally:
        b.close()
        b.keeper.close()


def test_overdue_rows_are_answered_255_without_a_worker(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    old = game.insert(pg, STATE)
    pg.execute(
        "UPDATE ai_requests SET created_at = created_at - interval '1 minute' "
        "WHERE request_id = %s",
        (old,),
    )
    with bridge_on_dead_broker(config) as b:
        assert b.step() == 1
    assert response(pg, old) == (255, 0.0, "deadline", "expired")
    assert game.poll(pg, old) == (255, 0.0)


def test_the_claim_itself_closes_overdue_rows_and_sends_on_the_rest(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    """An overdue row is answered by the claim's own statement: status and answer in one
    go, no state shipped; the fresh row beside it is claimed as usual, unanswered."""
    old, fresh = game.insert(pg, STATE), game.insert(pg, STATE)
    pg.execute(
        "UPDATE ai_requests SET created_at = created_at - interval '1 minute' "
        "WHERE request_id = %s",
        (old,),
    )
    b = Bridge(config, dead_broker_app(config))
    try:
        _, rows = b.claim()
    finally:
        b.close()
        b.keeper.close()
    by_id = {r.request_id: r for r in rows}
    assert by_id[old].overdue and by_id[old].state_vector is None
    assert not by_id[fresh].overdue and by_id[fresh].state_vector is not None
    assert response(pg, old) == (255, 0.0, "deadline", "expired")
    assert response(pg, fresh) == (None, None, None, "processing")
    answered = dict(
        pg.execute(
            "SELECT request_id, answered_at IS NOT NULL FROM ai_requests "
            "WHERE request_id = ANY(%s)",
            ([old, fresh],),
        ).fetchall()
    )
    assert answered == {old: True, fresh: False}


def test_unpublishable_batch_is_answered_by_the_rules_in_the_bridge(
    config: Config, pg: psycopg.Connection[Any], worker: Any
) -> None:
    rids = [game.insert(pg, STATE, archetype=a) for a in ("tank", "mage", "support")]
    bad = game.insert(pg, STATE[:10])
    with bridge_on_dead_broker(config) as b:
        assert b.level == 3  # the cpu worker is alive: the bridge means to publish
        assert b.step() == 4
    for rid in rids:
        action, confidence, reason, status = response(pg, rid) or ()
        assert 0 <= action <= 9 and 0.5 <= confidence <= 1
        assert (reason, status) == ("broker_unavailable", "completed")
    assert response(pg, bad) == (255, 0.0, "state_length_10", "invalid")
    sources = {r[0] for r in pg.execute("SELECT source FROM ai_responses")}
    assert sources == {"rules", "bridge"}


def test_rows_past_their_deadline_when_the_publish_gives_up_get_255_not_a_rule_action(
    config: Config, pg: psycopg.Connection[Any], worker: Any
) -> None:
    """A publish that hangs (a broker cut off: seconds, until the socket's timeout) must
    not end in rule actions for rows the game gave up on meanwhile."""
    rids = [game.insert(pg, STATE, archetype=a) for a in ("tank", "mage")]
    with bridge_on_dead_broker(config) as b:
        token, claimed = b.claim()
        assert sorted(c.request_id for c in claimed) == sorted(rids)
        hung = config.inference.max_latency_ms / 1000 + 1  # how long the publish hung
        created = [c.created_epoch - (hung if c.request_id == rids[0] else 0) for c in claimed]
        b.answer_here(
            [c.row() for c in claimed],
            rules=True,
            reason="broker_unavailable",
            created=created,
            token=token,
        )
    assert response(pg, rids[0]) == (255, 0.0, "deadline", "expired")
    action, confidence, reason, status = response(pg, rids[1]) or ()
    assert 0 <= action <= 9 and 0.5 <= confidence <= 1
    assert (reason, status) == ("broker_unavailable", "completed")


def test_expired_lease_is_claimed_again(config: Config, pg: psycopg.Connection[Any]) -> None:
    rid = game.insert(pg, STATE)
    pg.execute(
        "UPDATE ai_requests SET status = 'processing', attempts = 1, "
        "claimed_at = clock_timestamp() - interval '1 hour', "
        "created_at = created_at - interval '1 hour' WHERE request_id = %s",
        (rid,),
    )
    with bridge_on_dead_broker(config) as b:
        assert b.step() == 0  # still leased as far as the claim is concerned
        b.housekeeping()
        assert b.step() == 1
    assert response(pg, rid) == (255, 0.0, "deadline", "expired")
    assert pg.execute("SELECT attempts FROM ai_requests").fetchone() == (2,)


def set_claimed(pg: psycopg.Connection[Any], rid: int, age_s: float) -> None:
    """The row 'processing', claimed ``age_s`` ago."""
    pg.execute(
        "UPDATE ai_requests SET status = 'processing', attempts = 1,"
        " claimed_at = clock_timestamp() - make_interval(secs => %s) WHERE request_id = %s",
        (age_s, rid),
    )


def test_a_lease_that_ran_out_since_the_last_round_is_released(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    # The bounded rounds' windows join up: a lease that runs out between two rounds is
    # in the next one's window.
    lease_s = config.inference.lease_ms / 1000
    rid = game.insert(pg, STATE)
    with bridge_on_dead_broker(config) as b:
        b.housekeeping()  # the first round looks back over everything
        set_claimed(pg, rid, lease_s + SWEEP_MARGIN_S / 2)
        b.housekeeping()
    assert response(pg, rid) == (None, None, None, "pending")


def test_a_claim_older_than_the_window_is_released_by_the_next_full_round(
    config: Config, pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A claim that became visible only after the rounds had passed its claimed_at (a
    # claim that committed late): the bounded rounds miss it, the full one does not.
    rid = game.insert(pg, STATE)
    with bridge_on_dead_broker(config) as b:
        b.housekeeping()
        set_claimed(pg, rid, 3600)
        b.housekeeping()
        assert response(pg, rid) == (None, None, None, "processing")
        monkeypatch.setattr(housekeeping, "FULL_SWEEP_EVERY_S", 0.0)
        b.housekeeping()
    assert response(pg, rid) == (None, None, None, "pending")


def test_the_housekeeping_thread_releases_leases_while_the_loop_runs(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    rid = game.insert(pg, STATE)
    set_claimed(pg, rid, 3600)
    pg.execute(
        "UPDATE ai_requests SET created_at = claimed_at WHERE request_id = %s", (rid,)
    )  # past its deadline: once released, the claim answers it 255 itself
    stop = threading.Event()
    b = Bridge(config, dead_broker_app(config))
    runner = threading.Thread(target=b.run, args=(stop,))
    runner.start()
    try:
        wait_for(
            lambda: response(pg, rid) == (255, 0.0, "deadline", "expired"),
            10,
            "the released row to be expired",
        )
    finally:
        stop.set()
        runner.join(15)
    assert not runner.is_alive()
    assert b.keeper.conn is None  # the thread closed its connection on the way out


def test_live_lease_is_left_alone(config: Config, pg: psycopg.Connection[Any]) -> None:
    rid = game.insert(pg, STATE)
    pg.execute(
        "UPDATE ai_requests SET status = 'processing', claimed_at = clock_timestamp() "
        "WHERE request_id = %s",
        (rid,),
    )
    with bridge_on_dead_broker(config) as b:
        b.housekeeping()
        assert b.step() == 0
    assert response(pg, rid) == (None, None, None, "processing")


def test_rows_the_game_gave_up_on_get_one_255(config: Config, pg: psycopg.Connection[Any]) -> None:
    rid = game.insert(pg, STATE)
    game.mark_timeout(pg, rid)
    with bridge_on_dead_broker(config) as b:
        b.housekeeping()
        b.housekeeping()
        assert b.step() == 0
    assert response(pg, rid) == (255, 0.0, "game_timeout", "timeout")
    assert pg.execute("SELECT count(*) FROM ai_responses").fetchone() == (1,)


def test_highest_priority_is_claimed_first(config: Config, pg: psycopg.Connection[Any]) -> None:
    low = [game.insert(pg, STATE, priority=1) for _ in range(40)]
    high = game.insert(pg, STATE, priority=9)
    cfg = dataclasses.replace(
        config, inference=dataclasses.replace(config.inference, batch_size=32)
    )
    with bridge_on_dead_broker(cfg) as b:
        _, rows = b.claim()
    assert rows[0][0] == high
    assert [r[0] for r in rows[1:]] == low[:31]


def test_a_lost_batch_the_game_gave_up_on_still_gets_its_one_answer(
    config: Config, pg: psycopg.Connection[Any]
) -> None:
    # Claimed, its worker died, then the game marked it 'timeout': no lease release
    # would see it ('processing' no more), yet it must end with one answer.
    rid = game.insert(pg, STATE)
    pg.execute(
        "UPDATE ai_requests SET status = 'processing', attempts = 1, "
        "claimed_at = clock_timestamp() - interval '1 hour' WHERE request_id = %s",
        (rid,),
    )
    game.mark_timeout(pg, rid)
    fresh = game.insert(pg, STATE)
    pg.execute(
        "UPDATE ai_requests SET status = 'processing', claimed_at = clock_timestamp() "
        "WHERE request_id = %s",
        (fresh,),
    )
    game.mark_timeout(pg, fresh)  # still within its lease: its worker may yet answer
    with bridge_on_dead_broker(config) as b:
        b.housekeeping()
    assert response(pg, rid) == (255, 0.0, "game_timeout", "timeout")
    assert response(pg, fresh) == (None, None, None, "timeout")
