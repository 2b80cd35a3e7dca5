"""Three Redis cache layers for the worker, switched off by a breaker while Redis is away.

- L1, working memory: the last states of each monster, for models that want history.
- L2, actions: the game's own ``ml:action:`` cache (CONTRACT.md section 4), same key and
  value, so an answer the service caches is a hit for the map server too and never
  reaches PostgreSQL.
- L3, model outputs: logits per (archetype, model type, quantized state), shared by all
  workers, so the same situation is not run through a model twice within seconds.

Redis speeds the service up but is never required: every Redis error is caught here,
and while it is unreachable every call answers a miss at once (see `CircuitBreaker`).
Reads are one MGET per batch; writes, hit counters included, are one pipeline.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mltasks import keys
from mltasks.config import Config
from mltasks.contract import N_ACTIONS, STATE_DIM

log = logging.getLogger(__name__)

T = TypeVar("T")
Layer = Literal["l1", "l2", "l3"]
LAYERS: Final[tuple[Layer, ...]] = ("l1", "l2", "l3")
BreakerState = Literal["closed", "open", "half_open"]
_REDIS_ERRORS: Final = (redis.RedisError, OSError)

# --- L2: the game's key and value ----------------------------------------------------------


def _as_state(state: Any) -> np.ndarray:
    vec = np.asarray(state, dtype=np.float32)
    if vec.shape != (STATE_DIM,):
        raise ValueError(f"a state has {STATE_DIM} values, got shape {vec.shape}")
    return vec


def _c_fixed2(v: float) -> str:
    """glibc's ``%.2f``, including what Python spells differently: ``-nan``."""
    if math.isnan(v):
        return "-nan" if math.copysign(1.0, v) < 0 else "nan"
    return f"{v:.2f}"


def state_text(state: Any, mob_id: int) -> str:
    """The text the gateway hashes: each float32 value as C ``%.2f``, then ``:mob_id``.

    Python's ``.2f`` rounds the exact binary value half-to-even like glibc, once the
    float32 is widened exactly to a Python float (``tolist`` does that): 0.125 -> 0.12,
    float32(0.005) -> 0.00, -0.001 -> -0.00, -0.0 -> -0.00.
    """
    values = _as_state(state).tolist()
    if all(math.isfinite(v) for v in values):
        text = ",".join([f"{v:.2f}" for v in values])
    else:
        text = ",".join([_c_fixed2(v) for v in values])
    return f"{text}:{int(mob_id)}"


def action_key(state: Any, mob_id: int) -> str:
    """The game's L2 key: ``ml:action:`` + md5 hex of `state_text`."""
    return action_keys(_as_state(state)[None, :], [mob_id])[0]


# `%.2f` of every value in hundredths within +-_TEXT_LIMIT, by table: index a + (N+1) * sign.
_TEXT_LIMIT = 10_000
_TEXT_TABLE = np.array(
    [f"{a // 100}.{a % 100:02d}" for a in range(_TEXT_LIMIT + 1)]
    + [f"-{a // 100}.{a % 100:02d}" for a in range(_TEXT_LIMIT + 1)],
    dtype=object,
)


def action_keys(states: np.ndarray, mob_ids: Sequence[int]) -> list[str]:
    """`action_key` for a batch (float32 [n, 64]): the text of typical states by table.

    float32 x 100 is exact in float64 (24 + 7 bits), so ``rint`` of it is C's round-half-
    even of the exact value, which `state_text` gets from Python's formatting. Rows with a
    value beyond +-100.00 or not finite take `state_text` itself.
    """
    states = np.asarray(states, dtype=np.float32)
    if states.ndim != 2 or states.shape[1] != STATE_DIM:
        raise ValueError(f"states must be [n, {STATE_DIM}], got shape {states.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        hundredths = np.rint(states.astype(np.float64) * 100.0)
        finite_rows = np.all(np.isfinite(hundredths), axis=1)
        within = np.all(np.abs(hundredths) <= _TEXT_LIMIT, axis=1)
    small: list[bool] = np.logical_and(finite_rows, within).tolist()
    index = np.where(np.isfinite(hundredths), np.abs(hundredths), 0).astype(np.int64)
    index += np.signbit(states) * (_TEXT_LIMIT + 1)
    out = []
    for i, mob_id in enumerate(mob_ids):
        if small[i]:
            text = f"{','.join(_TEXT_TABLE[index[i]])}:{int(mob_id)}"
        else:
            text = state_text(states[i], mob_id)
        digest = hashlib.md5(text.encode("ascii"), usedforsecurity=False)
        out.append(keys.GAME_ACTION_PREFIX + digest.hexdigest())
    return out


def format_value(action: int | np.integer[Any], confidence: float | np.floating[Any]) -> str | None:
    """``"<action>:<confidence %.3f>"``, or None for anything the game must not read.

    The map server parses the value with std::stoi/std::stof and crashes on a throw, so
    only a real action (never 255, the traditional-AI fallback) and a finite confidence
    in [0, 1] are ever formatted.
    """
    if isinstance(action, bool) or not isinstance(action, (int, np.integer)):
        return None
    if not 0 <= int(action) < N_ACTIONS:
        return None
    try:
        conf = float(confidence)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(conf) and 0.0 <= conf <= 1.0):
        return None
    return f"{int(action)}:{conf + 0.0:.3f}"  # + 0.0: no "-0.000"


_VALUE = re.compile(rb"\s*(\d{1,3}):(\d+(?:\.\d*)?|\.\d+)\s*")


def parse_value(raw: bytes | str | None) -> tuple[int, float] | None:
    """(action, confidence) from an L2 value, or None for anything else (never raises)."""
    if raw is None:
        return None
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    if not isinstance(data, bytes):
        return None
    m = _VALUE.fullmatch(data)
    if m is None:
        return None
    action, conf = int(m.group(1)), float(m.group(2))
    if not (0 <= action < N_ACTIONS and 0.0 <= conf <= 1.0):
        return None
    return action, conf


# --- L3: our key for model outputs ----------------------------------------------------------


def logits_key(archetype: str, model_type: str, state: Any) -> str | None:
    """L3 key: the state rounded to 2 decimals (as int32 hundredths), hashed; None if not finite.

    Rounding lets states the game would call the same (its own key uses 2 decimals) share
    one model run.
    """
    return logits_keys([(archetype, model_type, state)])[0]


def logits_keys(where: Sequence[tuple[str, str, Any]]) -> list[str | None]:
    """`logits_key` for a whole batch: the rounding done once, as one array."""
    if not where:
        return []
    digests = state_digests(np.stack([_as_state(s) for _, _, s in where]))
    return [
        output_key(archetype, model_type, d)
        for (archetype, model_type, _), d in zip(where, digests, strict=True)
    ]


def state_digests(states: np.ndarray) -> list[str | None]:
    """Per state of float32 [n, 64]: the hash of its values rounded to 2 decimals (as int32
    hundredths), None when not finite. Computed once per row, shared by every model type."""
    if not len(states):
        return []
    finite = np.isfinite(states).all(axis=1)
    wide = np.where(finite[:, None], states, 0).astype(np.float64) * 100.0
    hundredths = np.clip(np.rint(wide), -(2**31), 2**31 - 1).astype("<i4")
    return [
        hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() if ok else None
        for ok, row in zip(finite.tolist(), hundredths, strict=True)
    ]


def output_key(
    archetype: str, model_type: str, digest: str | None, version: str = ""
) -> str | None:
    """L3 key of one model type's output for a state digest (`state_digests`); with the
    model's version (``<type>@<version>``), so a new version never reads an old one's."""
    if digest is None:
        return None
    typed = f"{model_type}@{version}" if version else model_type
    return f"{keys.LOGITS_PREFIX}{archetype}:{typed}:{digest}"


# One command writes a batch: L2 and L3 values with their TTLs, L1 pushes trimmed and
# expired. Per-key SET/LPUSH/LTRIM/EXPIRE cost the worker more CPU (redis-py packs each
# command in Python) than the model does.
# ARGV: n_l2, n_l3, n_l1, ttl_l2, ttl_l3, ttl_l1, l1_len, then one value per key.
_STORE_SCRIPT = """
local n2, n3, n1 = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl2, ttl3, ttl1, keep = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
for i = 1, n2 do
  redis.call('SET', KEYS[i], ARGV[7 + i], 'EX', ttl2)
end
for i = n2 + 1, n2 + n3 do
  redis.call('SET', KEYS[i], ARGV[7 + i], 'EX', ttl3)
end
for i = n2 + n3 + 1, n2 + n3 + n1 do
  redis.call('LPUSH', KEYS[i], ARGV[7 + i])
end
for i = n2 + n3 + 1, n2 + n3 + n1 do
  redis.call('LTRIM', KEYS[i], 0, keep - 1)
  redis.call('EXPIRE', KEYS[i], ttl1)
end
return n2 + n3 + n1
"""


_STORE_SHA = hashlib.sha1(_STORE_SCRIPT.encode(), usedforsecurity=False).hexdigest()


@dataclass(slots=True)
class Writes:
    """What one cache write sends: (key, value) per layer, with the TTLs to use."""

    actions: list[tuple[str, str]] = field(default_factory=list)
    logits: list[tuple[str, bytes]] = field(default_factory=list)
    states: list[tuple[str, bytes]] = field(default_factory=list)
    action_ttl_s: int = 10
    logits_ttl_s: int = keys.LOGITS_TTL_S

    def __len__(self) -> int:
        return len(self.actions) + len(self.logits) + len(self.states)

    def queue(self, pipe: Any, sha: str) -> int:
        """Add the one script call (EVALSHA ``sha``) to ``pipe``; returns how many values."""
        n = len(self)
        if not n:
            return 0
        pairs = [*self.actions, *self.logits, *self.states]
        pipe.evalsha(
            sha,
            n,
            *(k for k, _ in pairs),
            *(
                len(self.actions),
                len(self.logits),
                len(self.states),
                self.action_ttl_s,
                self.logits_ttl_s,
                keys.WORKING_MEMORY_TTL_S,
                keys.WORKING_MEMORY_LEN,
            ),
            *(v for _, v in pairs),
        )
        return n


# --- hit counters -------------------------------------------------------------------------


@dataclass(slots=True)
class HitCounter:
    hits: int = 0
    misses: int = 0

    def add(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def rate(self) -> float:
        """Hits per lookup; 0.0 before the first lookup."""
        return self.hits / self.lookups if self.lookups else 0.0


def stats_scope(config: Config) -> str:
    """The deployment a worker's hit counters belong to: its database and broker db.

    The cache db is the game's, which more than one deployment may write (another service,
    a ``mltasks dev --use-configured``); ``mltasks status`` and the metrics count only the
    lookups of their own deployment. Two deployments on one Redis never share a broker db
    (they would take each other's batches), so (database, broker db) tells them apart.
    """
    from psycopg.conninfo import conninfo_to_dict

    try:
        name = str(conninfo_to_dict(config.database.conninfo).get("dbname") or "")
    except Exception:  # an unparsable URL fails elsewhere, loudly; the scope needs a name
        name = ""
    return f"{name or config.database.name}/{config.redis.broker_db}"


def stats_key(layer: Layer, bucket: int, scope: str) -> str:
    return f"{keys.STATS_PREFIX}{scope}:{layer}:{bucket}"


def read_stats(
    client: redis.Redis, window_s: int = 300, now: float | None = None, *, scope: str
) -> dict[Layer, HitCounter]:
    """Hits and misses of a deployment's workers over the last ``window_s`` (one round trip).

    Raises redis.RedisError or OSError: the callers (metrics, ``mltasks status``) report it.
    """
    last = int((time.time() if now is None else now) // keys.STATS_BUCKET_S)
    n = max(
        1, min(math.ceil(window_s / keys.STATS_BUCKET_S), keys.STATS_TTL_S // keys.STATS_BUCKET_S)
    )
    pipe = client.pipeline(transaction=False)
    for layer in LAYERS:
        for bucket in range(last - n + 1, last + 1):
            pipe.hgetall(stats_key(layer, bucket, scope))
    replies: list[Any] = pipe.execute()
    out: dict[Layer, HitCounter] = {}
    for i, layer in enumerate(LAYERS):
        counter = HitCounter()
        for h in replies[i * n : (i + 1) * n]:
            counter.add(_int(h.get(b"hits")), _int(h.get(b"misses")))
        out[layer] = counter
    return out


def hit_rates(
    client: redis.Redis, window_s: int = 300, now: float | None = None, *, scope: str
) -> dict[Layer, float]:
    """Hit rate per layer over the last ``window_s``, for layers that had lookups."""
    return {
        k: v.rate for k, v in read_stats(client, window_s, now, scope=scope).items() if v.lookups
    }


def _int(raw: Any) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0


# --- the breaker --------------------------------------------------------------------------


class CircuitBreaker:
    """Stops calling Redis after a connection error; probes again at a bounded rate.

    closed: calls go through. open: calls are refused (the cache answers misses) until
    ``retry_interval_s`` has passed; then one call goes through (half-open): success closes
    the breaker, failure opens it for another interval. So a dead Redis costs at most one
    connection attempt per interval, not one per request, and one log line per change.
    """

    def __init__(
        self,
        name: str = "cache",
        retry_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.retry_interval_s = retry_interval_s
        self.clock = clock
        self.state: BreakerState = "closed"
        self.probes = 0  # calls let through while not closed
        self._next_probe = 0.0
        self._down_since = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            if self.state == "closed":
                return True
            now = self.clock()
            if now < self._next_probe:
                return False
            self.state = "half_open"
            self._next_probe = now + self.retry_interval_s
            self.probes += 1
            return True

    def success(self) -> None:
        with self._lock:
            if self.state == "closed":
                return
            self.state = "closed"
            down_s = round(self.clock() - self._down_since, 3)
        log.info(
            "%s: redis is back after %.1f s, caching resumes",
            self.name,
            down_s,
            extra={"event": f"{self.name}_up", "down_s": down_s},
        )

    def failure(self, exc: BaseException) -> None:
        with self._lock:
            now = self.clock()
            was = self.state
            self.state = "open"
            self._next_probe = now + self.retry_interval_s
            if was != "closed":
                return
            self._down_since = now
        log.warning(
            "%s: redis unavailable (%s: %s), caching off; retrying every %.1f s",
            self.name,
            type(exc).__name__,
            exc,
            self.retry_interval_s,
            extra={"event": f"{self.name}_down", "error": type(exc).__name__},
        )


# --- the cache ----------------------------------------------------------------------------


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
            pipe.script_load(_STORE_SCRIPT)
        return writes.queue(pipe, _STORE_SHA)

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
        for monster_id, state in states:
            vec = _as_state(state)
            if np.isfinite(vec).all():
                w.states.append(
                    (f"{keys.WORKING_MEMORY_PREFIX}{int(monster_id)}", vec.astype("<f4").tobytes())
                )
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
        out = [_states(blobs) for blobs in lists]
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
        found = [_logits_value(raw) for raw in self._mget(names)]
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
        outputs = [_vector_value(v) for v in raw[n:]]
        l2_hits = sum(a is not None for a in actions)
        self._count("l2", l2_hits, sum(1 for k in action_names if k is not None) - l2_hits)
        asked = [o for o, k in zip(outputs, output_names, strict=True) if k is not None]
        l3_hits = sum(o is not None for o in asked)
        self._count("l3", l3_hits, len(asked) - l3_hits)
        histories = {
            int(m): _states(blobs)
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


_cache: Cache | None = None


def _vector_value(raw: Any) -> np.ndarray | None:
    """A stored model output (finite float32, at most 64 values), or None for a miss or
    anything malformed. Its length is the model's to check (`LoadedModel.packed_width`)."""
    if not isinstance(raw, bytes) or not raw or len(raw) % 4 or len(raw) > 4 * STATE_DIM:
        return None
    arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return arr if np.isfinite(arr).all() else None


def _logits_value(raw: Any) -> np.ndarray | None:
    """A stored row of 10 action scores, or None."""
    arr = _vector_value(raw)
    return arr if arr is not None and arr.shape == (N_ACTIONS,) else None


def _states(blobs: Sequence[Any]) -> np.ndarray:
    """An L1 list (newest first) as float32 [k, 64], oldest first; malformed entries dropped."""
    good = [b for b in reversed(blobs) if isinstance(b, bytes) and len(b) == 4 * STATE_DIM]
    return (
        np.frombuffer(b"".join(good), dtype="<f4").reshape(len(good), STATE_DIM).astype(np.float32)
    )


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
