"""Who answers a batch the bridge sent: the worker that starts it, or the bridge's rescue.

The bridge answers 255 (`lost`) the rows of a batch still unanswered at its rescue point.
A batch that is merely late was then paid for twice, and under load that was most of the
work: the worker inferred rows the bridge had just expired, and its answers were refused
(docs/PERFORMANCE.md). Each side now takes the batch, by its claim token, with one SET NX
before working on it; the side that finds it taken leaves it alone. The rescue is then for
batches no worker has started: lost in the broker, or waiting behind a stuck worker.

When Redis does not answer, each side goes on as before: PostgreSQL still takes one answer
per row, so the worst case is the old double work, never a second answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis

from mltasks import keys

log = logging.getLogger(__name__)

WORKER = "worker"
BRIDGE = "bridge"


def take(client: redis.Redis, token: str, who: str) -> bool:
    """Whether ``who`` now owns the batch of ``token`` (True also when Redis is away)."""
    return take_all(client, [token], who)[0]


def take_all(client: redis.Redis, tokens: Sequence[str], who: str) -> list[bool]:
    """``take`` for several batches in one round trip."""
    if not tokens:
        return []
    try:
        pipe = client.pipeline(transaction=False)
        for token in tokens:
            pipe.set(keys.batch_owner(token), who, nx=True, ex=keys.BATCH_OWNER_TTL_S)
        return [bool(won) for won in pipe.execute()]
    except (redis.RedisError, OSError) as exc:
        log.debug("cannot take %d batches: %s", len(tokens), exc, extra={"event": "owner_unknown"})
        return [True] * len(tokens)
