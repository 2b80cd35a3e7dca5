"""The cache's hit counters: kept per worker, summed in Redis per deployment and time
bucket, read back as hit rates by the metrics, ``mltasks status`` and the benchmarks."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis

from mltasks import keys
from mltasks.config import Config

Layer = Literal["l1", "l2", "l3"]
LAYERS: Final[tuple[Layer, ...]] = ("l1", "l2", "l3")


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
