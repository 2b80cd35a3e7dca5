"""A tier's full queue: while a batch waits there for a worker, the bridge holds rows back.

Each publish tells how many batches wait in the queue (bridge.publish: the LPUSH's
pipelined LLEN). From ``inference.max_waiting_batches`` on, the tier is busy: rows gather
instead of leaving as many one-row batches, so the per-batch cost (broker, acks, one
database write) is shared by more decisions. They gather in the batch still waiting
(`bridge.loop.Bridge.top_up`, ``inference.top_up``) or, without the top-up, in
PostgreSQL until the queue has room.

A hold-back lasts at most ``HOLD_BACK_SHARE`` of the deadline from when the queue was
found full; then the bridge claims again and sends the rows elsewhere (the next live tier
with room, else the rule policy): a stuck worker (a huge batch, a worker that does not
read yet) never keeps rows past their deadline.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import redis

from mltasks.config import Config
from mltasks.serving.records import Row

# While the tier's queue is full, it is looked at again (LLEN) this often. Not sooner on a
# NOTIFY: at the game's insert rate that would be a Redis round trip per insert. (A NOTIFY
# from the workers' answers would be exact, but PostgreSQL serialises the commits of every
# notifying transaction: it cut the bridge's own throughput by more than a third.)
CONGESTION_RECHECK_S = 0.002
# A full queue holds rows back for at most this share of their deadline
# (inference.max_latency_ms); past it the rows go to the next live tier below, or are
# answered in the bridge with the rule policy. (Rows held back are about as old as the
# hold-back: the ones before it were claimed.)
HOLD_BACK_SHARE = 0.5


@dataclasses.dataclass(frozen=True, slots=True)
class Waiting:
    """A batch sent to a full queue: what the top-up needs to send it again."""

    level: int
    token: str
    rows: Sequence[Row]
    created: Sequence[float]
    message: bytes


class Congestion:
    """Which queues were found full, since when, and the batch waiting in each."""

    def __init__(self, config: Config, broker: redis.Redis) -> None:
        self.max_waiting = config.inference.max_waiting_batches
        self.hold_back_s = config.inference.max_latency_ms / 1000 * HOLD_BACK_SHARE
        self._broker = broker
        self.held: dict[str, float] = {}  # queue -> found full since (monotonic)
        self._looked: dict[str, float] = {}  # queue -> last LLEN (monotonic)
        self.waiting: dict[str, Waiting] = {}

    def published(self, queue: str, waiting: int) -> bool:
        """A publish to ``queue`` found ``waiting`` batches there after its own: whether
        the queue is now held full (the caller may record the batch in ``waiting``)."""
        if waiting >= self.max_waiting:
            now = time.monotonic()
            self.held.setdefault(queue, now)
            self._looked[queue] = now
            return True
        self.held.pop(queue, None)
        self.waiting.pop(queue, None)
        return False

    def congested(self, queue: str | None) -> bool:
        """Full, for at most ``hold_back_s`` since it was found full."""
        if queue is None or not self.full(queue):
            return False
        return not self.lapsed(queue)

    def full(self, queue: str) -> bool:
        """Whether ``queue`` was found full and still is (LLEN at most every 2 ms)."""
        if queue not in self.held:
            return False
        now = time.monotonic()
        if now - self._looked.get(queue, 0.0) < CONGESTION_RECHECK_S:
            return True
        self._looked[queue] = now
        try:
            waiting = int(self._broker.llen(queue))
        except (redis.RedisError, OSError):
            waiting = 0  # the publish will find out, and answer with the rules
        if waiting < self.max_waiting:
            self.held.pop(queue, None)
            self.waiting.pop(queue, None)
            return False
        return True

    def lapsed(self, queue: str) -> bool:
        """Full for longer than rows may be held back."""
        since = self.held.get(queue)
        return (
            since is not None and time.monotonic() - since >= self.hold_back_s and self.full(queue)
        )
