"""Climbing back up the fallback ladder, one level at a time.

Beat's ``mltasks.recover`` job calls `attempt`: when the tier one level up has a live
consumer and its probes have been healthy for ``fallback.recovery_hysteresis_s``, it
sends a canary batch there. The canary task (`run_canary`) answers synthetic states at
that level and lifts the level if every answer came from the tier itself, or starts a
back-off (doubling up to ``recovery_backoff_max_s``) if not. A canary that never
reports is counted as failed once its timeout has passed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mltasks import keys
from mltasks.config import Config
from mltasks.contract import TRADITIONAL_AI
from mltasks.fallback.ladder import BEST, LEVEL_QUEUE
from mltasks.fallback.levels import LevelStore
from mltasks.serving.inference import Outcome

log = logging.getLogger(__name__)

CANARY_ROWS = 16

# (canary id, level, queue) -> sends the canary task
SendCanary = Callable[[str, int, str], None]


@dataclass(frozen=True, slots=True)
class Attempt:
    outcome: str  # at_best | backing_off | no_consumer | not_healthy_long_enough | canary_sent
    target: int | None = None  # | canary_pending | canary_lost
    canary_id: str | None = None


def canary_rows(layout: str = "encoder") -> list[list[object]]:
    """Plausible states (in the configured layout) for every archetype, fixed so that a
    canary is reproducible."""
    from mltasks.contract import ARCHETYPES
    from mltasks.state import sample_states

    states = sample_states(np.random.default_rng(12345), CANARY_ROWS, layout)
    return [
        [-(i + 1), ARCHETYPES[i % len(ARCHETYPES)], 0, states[i].tolist()]
        for i in range(CANARY_ROWS)
    ]


def attempt(
    config: Config, store: LevelStore, send: SendCanary, now: float | None = None
) -> Attempt:
    """One recovery step, if the time has come."""
    now = time.time() if now is None else now
    fb = config.fallback
    r = store.redis
    state = store.read()
    if state.level <= BEST:
        return Attempt("at_best")
    if r.exists(keys.RECOVERY_BACKOFF):
        return Attempt("backing_off")
    target = state.level - 1
    pending = r.hgetall(keys.CANARY_PENDING)
    if pending:
        started = float(pending.get(b"at", b"0"))
        if now - started < fb.canary_timeout_s:
            return Attempt("canary_pending", target)
        # Never reported: the tier above does not answer.
        r.delete(keys.CANARY_PENDING)
        back_off(config, store, int(pending.get(b"level", b"0")), "canary lost")
        return Attempt("canary_lost", target)
    queue = LEVEL_QUEUE[target]
    if not r.exists(keys.heartbeat(queue)):
        return Attempt("no_consumer", target)
    since = r.get(keys.healthy_since(target))
    if since is None or now - float(since) < fb.recovery_hysteresis_s:
        return Attempt("not_healthy_long_enough", target)
    canary_id = uuid.uuid4().hex
    pipe = r.pipeline(transaction=False)
    pipe.hset(
        keys.CANARY_PENDING,
        mapping={"id": canary_id, "level": target, "from": state.level, "at": now},
    )
    pipe.expire(keys.CANARY_PENDING, keys.CANARY_TTL_S)
    pipe.execute()
    send(canary_id, target, queue)
    log.info(
        "canary %s sent to level %d (%s)",
        canary_id,
        target,
        queue,
        extra={"event": "canary_sent", "level": target, "canary": canary_id},
    )
    return Attempt("canary_sent", target, canary_id)


def canary_passed(outcome: Outcome, level: int) -> tuple[bool, str]:
    """A canary passes when every row was answered by the tier itself, none 255."""
    if outcome.failures:
        return False, f"model failure: {outcome.failures[0]}"
    bad = [a for a in outcome.answers if a.action_id == TRADITIONAL_AI]
    if bad:
        return False, f"{len(bad)} of {len(outcome.answers)} rows answered 255 ({bad[0].reason})"
    return True, "ok"


def finish_canary(
    config: Config, store: LevelStore, canary_id: str, level: int, passed: bool, reason: str
) -> bool:
    """Record the canary's verdict: lift the level, or back off. Returns True if lifted."""
    r = store.redis
    pending = r.hgetall(keys.CANARY_PENDING)
    r.set(keys.canary(canary_id), "ok" if passed else f"fail: {reason}", ex=keys.CANARY_TTL_S)
    pending_id = pending.get(b"id", b"")
    if (pending_id.decode() if isinstance(pending_id, bytes) else pending_id) != canary_id:
        return False  # a stale canary: its attempt was already written off
    r.delete(keys.CANARY_PENDING)
    if not passed:
        back_off(config, store, level, reason)
        return False
    expected = int(pending.get(b"from", b"0"))
    lifted = store.lift(level, expected, f"recovered: canary passed at level {level}")
    if lifted:
        r.delete(keys.RECOVERY_BACKOFF_S)
    return lifted


def back_off(config: Config, store: LevelStore, level: int, reason: str) -> float:
    """Wait before the next try; the wait doubles after every failed try."""
    fb = config.fallback
    r = store.redis
    previous = r.get(keys.RECOVERY_BACKOFF_S)
    wait = fb.recovery_backoff_s if previous is None else float(previous) * 2
    wait = min(wait, fb.recovery_backoff_max_s)
    pipe = r.pipeline(transaction=False)
    pipe.set(keys.RECOVERY_BACKOFF, reason, px=max(1, int(wait * 1000)))
    pipe.set(keys.RECOVERY_BACKOFF_S, wait, ex=keys.RECOVERY_TTL_S)
    pipe.execute()
    log.warning(
        "recovery to level %d failed (%s); next try in %.0fs",
        level,
        reason,
        wait,
        extra={"event": "recovery_failed", "level": level, "reason": reason, "backoff_s": wait},
    )
    return wait
