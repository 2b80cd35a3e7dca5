"""The fallback level's shared state in Redis.

The five levels, what serves each, and routing on them are `mltasks.fallback.ladder`'s.
The level is one hash in Redis, shared by every bridge and worker. Workers push it down
(failures, probes); beat's recovery job lifts it one step at a time after a canary. Routing
additionally skips a tier that has no live consumer (the heartbeat keys of
`mltasks.fallback.registry`), so a missing worker never leaves requests waiting for a
timeout. When Redis cannot be read, a reader keeps its last known level.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from mltasks import keys
from mltasks.config import Config
from mltasks.fallback.ladder import BEST, LEVEL_QUEUE, Level, route
from mltasks.redisurl import cache_client

__all__ = ["LEVEL_READ_TIMEOUT_S", "LevelState", "LevelStore"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LevelState:
    level: int
    reason: str
    since: float


# Lower the level (a larger number) only if it is not already as low: two workers
# reporting the same failure move it one step, not two. ``from`` is the level the reporter
# served at: the shared level itself, or a lower one when every tier between them has no
# consumer (KEYS[2..5]: the heartbeat keys of levels 1..4). So a deployment without a GPU
# worker, whose shared level reads 1 while the CPU tier serves, still moves down from 3.
_DEGRADE = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'level') or ARGV[4])
local from = tonumber(ARGV[5])
local served = (from == 0 or cur == from)
if not served and cur < from then
  served = true
  for lv = math.max(cur, 1), from - 1 do
    if redis.call('EXISTS', KEYS[lv + 1]) == 1 then served = false end
  end
end
if cur < tonumber(ARGV[1]) and served then
  redis.call('HSET', KEYS[1], 'level', ARGV[1], 'reason', ARGV[2], 'since', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  return 1
end
return 0
"""

# Lift the level only from the one the recovery job saw (compare and set).
_RAISE = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'level') or ARGV[4])
if cur == tonumber(ARGV[5]) and tonumber(ARGV[1]) < cur then
  redis.call('HSET', KEYS[1], 'level', ARGV[1], 'reason', ARGV[2], 'since', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  return 1
end
return 0
"""


# The level is read in the bridge's loop: a hung Redis may cost it this much, no more.
LEVEL_READ_TIMEOUT_S = 0.1


class LevelStore:
    """Reads and moves the shared level; remembers the last value it read."""

    def __init__(self, config: Config, client: redis.Redis | None = None) -> None:
        self.config = config
        self.redis = client or cache_client(config)
        self.default = int(config.fallback.start_level)
        self.last = LevelState(self.default, "start", time.time())
        self._degrade = self.redis.register_script(_DEGRADE)
        self._raise = self.redis.register_script(_RAISE)

    # -- reading ---------------------------------------------------------------------

    def read(self) -> LevelState:
        """The shared level; on a Redis error, the last one known."""
        try:
            raw: Any = self.redis.hgetall(keys.LEVEL)
        except (redis.RedisError, OSError):
            return self.last
        self.last = self._parse(raw)
        return self.last

    def _parse(self, raw: Mapping[bytes, bytes]) -> LevelState:
        if not raw:
            return LevelState(self.default, "start", self.last.since)
        try:
            return LevelState(
                int(raw[b"level"]), raw.get(b"reason", b"").decode(), float(raw[b"since"])
            )
        except (KeyError, ValueError):
            return LevelState(self.default, "unreadable", time.time())

    def served(self, own: Iterable[str] = ()) -> tuple[LevelState, int]:
        """The shared level and the level batches are served at (``route`` on the live
        queues; ``own``: queues the caller consumes, live whatever their keys say)."""
        state, live = self.snapshot(LEVEL_QUEUE.values())
        for q in own:
            live[q] = True
        return state, route(state.level, live)

    def snapshot(self, queues: Iterable[str]) -> tuple[LevelState, dict[str, bool]]:
        """Level and live queues in one round trip (the bridge's housekeeping)."""
        qs = list(dict.fromkeys(queues))
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.LEVEL)
        pipe.mget([keys.heartbeat(q) for q in qs])
        raw, beats = pipe.execute()  # a Redis error goes to the caller, who keeps its level
        self.last = self._parse(raw)
        return self.last, {q: b is not None for q, b in zip(qs, beats, strict=True)}

    # -- moving ----------------------------------------------------------------------

    def degrade(self, to_level: int, reason: str, from_level: int = 0) -> bool:
        """Move down to ``to_level`` (if not lower already; if ``from_level``, only from it)."""
        changed = self._move(self._degrade, to_level, reason, from_level)
        if changed:
            # The levels left behind must prove themselves healthy again before a climb.
            self.redis.delete(*(keys.healthy_since(lv) for lv in range(BEST, to_level)))
        return changed

    def lift(self, to_level: int, expected: int, reason: str) -> bool:
        """Move up to ``to_level`` if the level is still ``expected``."""
        return self._move(self._raise, to_level, reason, expected)

    def _move(self, script: Any, to_level: int, reason: str, guard: int) -> bool:
        """Run a compare-and-set script; log the change it made, if any."""
        args = [int(to_level), reason, time.time(), self.default, int(guard), keys.LEVEL_TTL_S]
        beats = [keys.heartbeat(LEVEL_QUEUE[lv]) for lv in range(BEST, Level.TRADITIONAL)]
        changed = bool(script(keys=[keys.LEVEL, *beats], args=args))
        if changed:
            log.warning(
                "fallback level -> %d (%s)",
                to_level,
                reason,
                extra={"event": "fallback_level_changed", "level": to_level, "reason": reason},
            )
        return changed

    def set(self, level: int, reason: str) -> None:
        """Force a level (operators, tests)."""
        self.redis.hset(
            keys.LEVEL, mapping={"level": int(level), "reason": reason, "since": time.time()}
        )
        self.redis.expire(keys.LEVEL, keys.LEVEL_TTL_S)

    def report_failure(self, level: int, reason: str) -> bool:
        """Count a failed batch at ``level``; N in a row move the service one level down."""
        level = int(level)
        key = keys.failures(level)
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, keys.FAILURES_TTL_S)
        count = int(pipe.execute()[0])
        if count >= self.config.fallback.failure_threshold:
            self.redis.delete(key)
            return self.degrade(level + 1, f"{reason} ({count} failed batches)", from_level=level)
        return False

    def report_success(self, level: int) -> None:
        self.redis.delete(keys.failures(level))

    def publish_health(
        self, queue: str, tiers: Mapping[int, tuple[bool, str]], readings: Mapping[str, Any]
    ) -> None:
        """Record a probe: per level healthy-since (for recovery), and the readings (status)."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for level, (healthy, _) in tiers.items():
            key = keys.healthy_since(level)
            if healthy:
                pipe.set(key, now, nx=True, ex=keys.PROBES_TTL_S)
                pipe.expire(key, keys.PROBES_TTL_S)
            else:
                pipe.delete(key)
        doc = {"at": now, "tiers": {str(k): list(v) for k, v in tiers.items()}, **readings}
        pipe.set(keys.probes(queue), json.dumps(doc, default=str), ex=keys.PROBES_TTL_S)
        pipe.execute()
