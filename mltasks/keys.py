"""Every Redis key prefix and TTL, in one place.

Our keys all start with ``mltasks:`` so a ``SCAN`` can tell them from the game's and
from Celery's. The one exception is the game's own action cache (``ml:action:``): its
spelling is fixed by the C++ gateway (shared/CONTRACT.md section 4). Every write
carries a TTL, so the cache database can never fill with keys nobody expires.
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "mltasks:"

# The eviction policy of the Redis instance the broker and the cache share (docs/redis.md,
# docs/deploy.md, docker-compose.yml say the same; tests/unit/test_docs.py checks it): only keys
# with a TTL are evicted. Every cache key has one; Celery's queues and unacked batches none.
MAXMEMORY_POLICY: Final = "volatile-lru"

# --- Cache (mltasks/cache/) ---------------------------------------------------------------

# L2: the game's action cache, shared with the map server. Key: GAME_ACTION_PREFIX + md5 hex;
# value "<action_id>:<confidence>". The game writes it with a 10 s SETEX; we use
# caching.action_ttl_s (10 s by default) for the keys we write.
GAME_ACTION_PREFIX: Final = "ml:action:"
GAME_ACTION_TTL_S: Final = 10

# L1: working memory, the last WORKING_MEMORY_LEN states of one monster (a list, newest
# first). Key: WORKING_MEMORY_PREFIX + monster_id. A monster unseen for the TTL is forgotten.
WORKING_MEMORY_PREFIX: Final = PREFIX + "wm:"
WORKING_MEMORY_LEN: Final = 10
WORKING_MEMORY_TTL_S: Final = 60

# L3: model outputs (float32 logits). Key: LOGITS_PREFIX + archetype:model_type@version:state
# hash (the version: a new model version never reads an old one's outputs).
LOGITS_PREFIX: Final = PREFIX + "logits:"
LOGITS_TTL_S: Final = 10

# Hit/miss counters: a hash {hits, misses} per layer and per STATS_BUCKET_S window.
# Key: STATS_PREFIX + layer + ":" + bucket number (unix time // STATS_BUCKET_S).
STATS_PREFIX: Final = PREFIX + "cache:stats:"
STATS_BUCKET_S: Final = 60
STATS_TTL_S: Final = 15 * 60
# A worker sends its pending counters with a cache write at most this often.
STATS_FLUSH_S: Final = 1.0

# --- Fallback ladder (mltasks/fallback/levels.py, .../recovery.py), cache db ---

# A hash {level, reason, since}: the level the whole service stands on. Its TTL is long and
# refreshed on every write; if it ever lapses, readers fall back to fallback.start_level.
LEVEL: Final = PREFIX + "fallback:level"
LEVEL_TTL_S: Final = 24 * 3600
# Consecutive failed batches reported by workers, per level.
FAILURES: Final = PREFIX + "fallback:failures:{level}"
FAILURES_TTL_S: Final = 300
# Per level: since when its probes have been healthy without a break (refreshed by every
# probe, dropped on an unhealthy one).
HEALTHY_SINCE: Final = PREFIX + "fallback:healthy_since:{level}"
# Present while recovery waits after a failed try (its TTL is the wait) ...
RECOVERY_BACKOFF: Final = PREFIX + "fallback:backoff"
# ... and the last wait, doubled at the next failure.
RECOVERY_BACKOFF_S: Final = PREFIX + "fallback:backoff_s"
RECOVERY_TTL_S: Final = 3600
# The canary in flight {id, level, from, at}, and each canary's verdict.
CANARY_PENDING: Final = PREFIX + "canary:pending"
CANARY: Final = PREFIX + "canary:{id}"
CANARY_TTL_S: Final = 60
# Last probe readings per queue, for recovery and `mltasks status`.
PROBES: Final = PREFIX + "health:{queue}"
PROBES_TTL_S: Final = 60

# One key per queue, refreshed by every live worker consuming it (fallback.heartbeat_ttl_ms):
# no key, no consumer, and the bridge skips that tier.
HEARTBEAT: Final = PREFIX + "heartbeat:{queue}"

# Live workers per queue: a sorted set {<host>:<pid>: last heartbeat, unix time}, trimmed
# to the heartbeat TTL at every beat, for `mltasks status` to count them.
WORKERS: Final = PREFIX + "workers:{queue}"

# Models each worker process loaded, per queue: a hash {<host>:<pid>: count}, written by the
# process after loading (PROBES_TTL_S, refreshed by its monitor, which drops dead processes).
MODELS: Final = PREFIX + "models:{queue}"

# The versions each worker process serves, per model level (mltasks/models/served.py): a hash
# {<host>:<pid>/<level>: JSON {at, level, versions, candidates}}, written by the process when
# it loads or swaps, its TTL refreshed by its monitor (PROBES_TTL_S), which drops dead ones.
SERVED: Final = PREFIX + "models:served"

# Why a worker does not serve a queue (it cannot reach PostgreSQL, has no model): a hash
# {<host>:<pid>: JSON {at, problem}}, refreshed while the problem lasts, for `mltasks status`.
PROBLEMS: Final = PREFIX + "problems:{queue}"

# A deployed candidate's shadow totals, shared by every worker (mltasks/models/shadow.py): a
# hash {rows, batches, errors, non_finite, agree, candidate_s, active_s}, 7 days.
# Key: DEPLOY_CANARY + "<archetype>/<type>@<version>".
DEPLOY_CANARY: Final = PREFIX + "deploy:canary:"

# Held while a beat job runs, so two beats never run it twice at once.
JOB_LOCK: Final = PREFIX + "lock:{job}"


def heartbeat(queue: str) -> str:
    return HEARTBEAT.format(queue=queue)


def workers(queue: str) -> str:
    return WORKERS.format(queue=queue)


def models(queue: str) -> str:
    return MODELS.format(queue=queue)


def failures(level: int) -> str:
    return FAILURES.format(level=level)


def healthy_since(level: int) -> str:
    return HEALTHY_SINCE.format(level=level)


def problems(queue: str) -> str:
    return PROBLEMS.format(queue=queue)


def probes(queue: str) -> str:
    return PROBES.format(queue=queue)


def canary(canary_id: str) -> str:
    return CANARY.format(id=canary_id)


def job_lock(job: str) -> str:
    return JOB_LOCK.format(job=job)


def canary_stats(model: str, version: str) -> str:
    return f"{DEPLOY_CANARY}{model}@{version}"
