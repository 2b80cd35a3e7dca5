"""The cache's circuit breaker: a dead Redis costs one connection attempt per interval,
not one per request."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

# The logger of the module this came from: log filters and the tests know this name.
log = logging.getLogger("mltasks.cache")

BreakerState = Literal["closed", "open", "half_open"]


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
