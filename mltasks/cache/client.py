"""The cache a worker process uses: L1, L2 and L3 behind one client and one breaker,
read for a whole batch in one round trip and written in one command."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mltasks import keys
from mltasks.cache.breaker import CircuitBreaker
from mltasks.cache.codec import (
    as_state,
    format_value,
    history_array,
    logits_keys,
    logits_value,
    parse_value,
    vector_value,
)
from mltasks.cache.stats import LAYERS, HitCounter, Layer, hit_rates, stats_key, stats_scope
from mltasks.cache.writes import STORE_SCRIPT, STORE_SHA, Writes
from mltasks.config import Config
from mltasks.contract import STATE_DIM

T = TypeVar("T")
_REDIS_ERRORS: Final = (redis.RedisError, OSError)


@dataclass(frozen=True, slots=True)
class BatchLookup:
    """What one batch found: L2 answers per row, L3 outputs per name asked, L1 histories
    (float32 [k, 64], oldest first) per monster id."""

    actions: list[tuple[int, float] | None]
    outputs: list[np.ndarray | None]
    histories: dict[int, np.ndarray]


class Cache:
    """L1, L2 and L3 on the cache db, for one worker process (thread-safe, synchronous).

    Every method returns misses / does nothing when caching is disabled or Redis is down.
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        retry_interval_s: float = 1.0,
    ) -> None:
        self.config = config
        self.scope = stats_scope(config)
        self.enabled = config.caching.enabled
        self.action_ttl_s = config.caching.action_ttl_s
        self.breaker = CircuitBreaker("cache", retry_interval_s, clock)
        self.stats: dict[Layer, HitCounter] = {layer: HitCounter() for layer in LAYERS}
        self._pending: dict[Layer, HitCounter] = {layer: HitCounter() for layer in LAYERS}
        self._wall = wall
        self._clock = clock
        self._script_loaded = False
        self._stats_sent_at = -math.inf
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------

    def client(self) -> redis.Redis:
        """The client, made on first use (after the worker's fork), failing fast."""
        with self._lock:
            if self._client is None:
                r = self.config.redis
                self._client = r.client(
                    r.cache_db,
                    socket_timeout=r.socket_timeout_s,
                    socket_connect_timeout=r.socket_timeout_s,
                    # No retries inside redis-py: the breaker decides when to try again.
                    retry=Retry(NoBackoff(), 0),
                    health_check_interval=0,
                    # One connection of its own for the single commands of the batch path
                    # (the write script, an MGET): no pool checkout and no readability
                    # poll before each (25 us of 77 a command here); pipelines use the pool.
                    single_connection_client=True,
                )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _call(self, op: Callable[[redis.Redis], T]) -> T | None:
        """``op(client)``, or None when disabled, refused by the breaker, or failed."""
        if not self.enabled or not self.breaker.allow():
            return None
        try:
            result = op(self.client())
        except _REDIS_ERRORS as exc:
            self.breaker.failure(exc)
            return None
        self.breaker.success()
        return result

    def warm(self) -> bool:
        """Connect and load the write script now (mltasks.serving.warm), so that the first
        batch's write is the usual one command; False when disabled or Redis is away."""

        def op(client: redis.Redis) -> bool:
            client.script_load(STORE_SCRIPT)
            self._script_loaded = True
            return True

        return bool(self._call(op))

    def _count(self, layer: Layer, hits: int, misses: int) -> None:
        with self._lock:
            self.stats[layer].add(hits, misses)
            self._pending[layer].add(hits, misses)

    def _write(self, writes: Writes, *, stats: bool = False) -> int:
        """One pipeline: one script call for ``writes``, and the pending hit counters.

        The counters ride along at most once per STATS_FLUSH_S (or when ``stats``): six
        commands per batch otherwise, for figures read per minute.
        """
        if not self.enabled:
            return 0
        n = len(writes)
        with self._lock:
            pending: dict[Layer, HitCounter] = {}
            if stats or self._clock() - self._stats_sent_at >= keys.STATS_FLUSH_S:
                pending = {k: v for k, v in self._pending.items() if v.lookups}
            if not (n or pending):
                return 0
            if pending:
                self._pending = {layer: HitCounter() for layer in LAYERS}
                self._stats_sent_at = self._clock()

        def op(client: redis.Redis) -> int:
            if not pending and self._script_loaded:  # the usual batch: one command
                try:
                    return writes.call(client, STORE_SHA)
                except redis.exceptions.NoScriptError:
                    self._script_loaded = False  # Redis restarted: load it in the pipeline
            pipe = client.pipeline(transaction=False)
            written = self._queue_writes(pipe, writes)
            bucket = int(self._wall() // keys.STATS_BUCKET_S)
            for layer, c in pending.items():
                key = stats_key(layer, bucket, self.scope)
                pipe.hincrby(key, "hits", c.hits)
                pipe.hincrby(key, "misses", c.misses)
                pipe.expire(key, keys.STATS_TTL_S)
            try:
                pipe.execute()
            except redis.exceptions.NoScriptError:
                # Redis restarted and lost its scripts; the counters went through.
                self._script_loaded = False
                again = client.pipeline(transaction=False)
                self._queue_writes(again, writes)
                again.execute()
            self._script_loaded = self._script_loaded or bool(writes)
            return written

        written = self._call(op)
        if written is None:
            with self._lock:  # kept for the next write that gets through
                for layer, c in pending.items():
                    self._pending[layer].add(c.hits, c.misses)
            return 0
        return written

    def _queue_writes(self, pipe: Any, writes: Writes) -> int:
        """The write script's call, after its SCRIPT LOAD in the same pipeline the first
        time (a pipelined redis-py Script would ask Redis for it on every write)."""
        if writes and not self._script_loaded:
            pipe.script_load(STORE_SCRIPT)
        return writes.call(pipe, STORE_SHA)

    def _mget(self, names: Sequence[str | None]) -> list[Any]:
        """Values for ``names`` (None names are misses) in one MGET."""
        present = [n for n in names if n is not None]
        got: list[Any] = []
        if present:
            got = self._call(lambda c: list(c.mget(present))) or []
        values = iter(got)
        return [next(values, None) if n is not None else None for n in names]

    def flush_stats(self) -> None:
        """Send the pending hit counters now (they otherwise ride on a later write)."""
        self._write(Writes(), stats=True)

    # -- L2: actions ---------------------------------------------------------------------

    def lookup_actions(self, names: Sequence[str]) -> list[tuple[int, float] | None]:
        """(action, confidence) per `action_key`, None on a miss; one MGET."""
        found = [parse_value(v) for v in self._mget(list(names))]
        hits = sum(f is not None for f in found)
        self._count("l2", hits, len(found) - hits)
        return found

    def store_actions(
        self, items: Iterable[tuple[str, int, float]], ttl_s: int | None = None
    ) -> int:
        """Write each (key, action, confidence) that `format_value` accepts; returns how many.

        255 and malformed answers are skipped: the game would read them.
        """
        return self._write(self._writes(actions=items, action_ttl_s=ttl_s))

    def _writes(
        self,
        *,
        actions: Iterable[tuple[str, int, float]] = (),
        logits: Iterable[tuple[str | None, Any]] = (),
        states: Iterable[tuple[int, Any]] = (),
        action_ttl_s: int | None = None,
        logits_ttl_s: int = keys.LOGITS_TTL_S,
    ) -> Writes:
        """The values worth writing: parseable answers, finite logits, finite states."""
        w = Writes(
            action_ttl_s=self.action_ttl_s if action_ttl_s is None else action_ttl_s,
            logits_ttl_s=logits_ttl_s,
        )
        w.actions = [(k, v) for k, a, c in actions if (v := format_value(a, c)) is not None]
        for name, out in logits:
            vec = np.asarray(out, dtype="<f4").ravel()
            if name is not None and vec.size and np.isfinite(vec).all():
                w.logits.append((name, vec.tobytes()))
        w.states = _state_values(list(states))
        return w

    # -- L1: working memory --------------------------------------------------------------

    def remember_states(self, items: Iterable[tuple[int, Any]]) -> int:
        """Push each (monster_id, state) onto that monster's last-10 list; one round trip."""
        return self._write(self._writes(states=items))

    def recent_states_many(self, monster_ids: Sequence[int]) -> list[np.ndarray]:
        """Per monster, its last states as float32 [k, 64], oldest first; one round trip."""
        names = [f"{keys.WORKING_MEMORY_PREFIX}{int(m)}" for m in monster_ids]

        def op(client: redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.lrange(name, 0, keys.WORKING_MEMORY_LEN - 1)
            return list(pipe.execute())

        lists = (self._call(op) if names else None) or [[] for _ in names]
        out = [history_array(blobs) for blobs in lists]
        hits = sum(len(a) > 0 for a in out)
        self._count("l1", hits, len(out) - hits)
        return out

    def recent_states(self, monster_id: int) -> np.ndarray:
        """The monster's last states (at most 10), float32 [k, 64], oldest first."""
        return self.recent_states_many([monster_id])[0]

    # -- L3: model outputs ---------------------------------------------------------------

    def lookup_logits(
        self, archetype: str, model_type: str, states: Sequence[Any] | np.ndarray
    ) -> list[np.ndarray | None]:
        """Cached float32 logits per state, None on a miss; one MGET."""
        names = logits_keys([(archetype, model_type, s) for s in states])
        found = [logits_value(raw) for raw in self._mget(names)]
        hits = sum(f is not None for f in found)
        self._count("l3", hits, len(found) - hits)
        return found

    def store_logits(
        self,
        archetype: str,
        model_type: str,
        states: Sequence[Any] | np.ndarray,
        logits: Sequence[Any] | np.ndarray,
        ttl_s: int = keys.LOGITS_TTL_S,
    ) -> int:
        """Write the finite logits row of each finite state, with a TTL; returns how many."""
        names = logits_keys([(archetype, model_type, s) for s in states])
        return self._write(self._writes(logits=zip(names, logits, strict=True), logits_ttl_s=ttl_s))

    # -- a whole batch -------------------------------------------------------------------

    def lookup(
        self,
        action_names: Sequence[str | None],
        output_names: Sequence[str | None],
        monsters: Sequence[int] = (),
    ) -> BatchLookup:
        """L2 answers, L3 model outputs and L1 histories for one batch in ONE round trip
        (an MGET and an LRANGE per monster, pipelined).

        ``action_names`` are per row, ``output_names`` per (row, model type) wanted: L3 is
        counted for those only. Redis away: all misses, empty histories.
        """
        present = [n for n in (*action_names, *output_names) if n is not None]
        wm = [f"{keys.WORKING_MEMORY_PREFIX}{int(m)}" for m in monsters]

        def op(client: redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            if present:
                pipe.mget(present)
            for name in wm:
                pipe.lrange(name, 0, keys.WORKING_MEMORY_LEN - 1)
            return list(pipe.execute())

        replies = (self._call(op) if (present or wm) else None) or []
        got = iter(replies[0] if present and replies else [])
        raw = [next(got, None) if n is not None else None for n in (*action_names, *output_names)]
        lists = replies[1:] if present else replies
        n = len(action_names)
        actions = [parse_value(v) for v in raw[:n]]
        outputs = [vector_value(v) for v in raw[n:]]
        l2_hits = sum(a is not None for a in actions)
        self._count("l2", l2_hits, sum(1 for k in action_names if k is not None) - l2_hits)
        asked = [o for o, k in zip(outputs, output_names, strict=True) if k is not None]
        l3_hits = sum(o is not None for o in asked)
        self._count("l3", l3_hits, len(asked) - l3_hits)
        histories = {
            int(m): history_array(blobs)
            for m, blobs in zip(monsters, lists or [[] for _ in monsters], strict=True)
        }
        l1_hits = sum(len(h) > 0 for h in histories.values())
        if monsters:
            self._count("l1", l1_hits, len(histories) - l1_hits)
        return BatchLookup(actions, outputs, histories)

    def store_batch(
        self,
        actions: Iterable[tuple[str, int, float]],
        logits: Iterable[tuple[str | None, Any]],
        states: Iterable[tuple[int, Any]],
    ) -> int:
        """L2 answers, L3 (key, model output) rows and L1 states of one batch in ONE
        command."""
        return self._write(self._writes(actions=actions, logits=logits, states=states))

    # -- reading the counters ------------------------------------------------------------

    def hit_rates(self, window_s: int = 300) -> dict[Layer, float]:
        """All workers' hit rates from Redis (after sending ours); {} when Redis is down."""
        self.flush_stats()
        return self._call(lambda c: hit_rates(c, window_s, self._wall(), scope=self.scope)) or {}


def _state_values(states: list[tuple[int, Any]]) -> list[tuple[str, bytes]]:
    """(L1 key, float32 bytes) of each finite state: a batch's states checked and encoded
    as one array (6 against 2 us a row here), one by one where they do not stack."""
    if not states:
        return []
    try:
        stacked = np.asarray([s for _, s in states], dtype="<f4")
    except (TypeError, ValueError):  # ragged or not numbers: as_state names the culprit
        stacked = np.empty(0)
    if stacked.shape != (len(states), STATE_DIM):
        stacked = np.stack([as_state(s) for _, s in states]).astype("<f4")
    finite = np.isfinite(stacked).all(axis=1).tolist()
    blob, width = stacked.tobytes(), STATE_DIM * 4
    return [
        (f"{keys.WORKING_MEMORY_PREFIX}{int(m)}", blob[i * width : (i + 1) * width])
        for i, ((m, _), ok) in enumerate(zip(states, finite, strict=True))
        if ok
    ]


_cache: Cache | None = None


def get_cache(config: Config) -> Cache:
    """This process's cache (one client per process, made after the fork)."""
    global _cache
    if _cache is None or _cache.config is not config:
        if _cache is not None:
            _cache.close()
        _cache = Cache(config)
    return _cache


def reset_cache() -> None:
    """Close this process's cache (its pending hit counters are sent first)."""
    global _cache
    if _cache is not None:
        _cache.flush_stats()
        _cache.close()
        _cache = None
