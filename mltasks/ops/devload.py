"""``mltasks dev --load``: the emulated game load, as threads in dev's own process."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

from mltasks.contract import TRADITIONAL_AI


@dataclass(slots=True)
class LoadFigures:
    decisions: int = 0
    answered: int = 0
    in_time: int = 0
    answered_255: int = 0
    errors: int = 0
    rate_per_s: float = 0.0  # of the last round
    p50_ms: float | None = None  # of the last round
    p99_ms: float | None = None
    last_error: str = ""


class LoadRunner:
    """The map servers' statements (mltasks.game) in rounds of ``round_s``.

    Short rounds make a stop take effect within one round plus the game's timeout, with
    no process to kill: the clients run as threads here.
    """

    def __init__(self, conninfo: str, clients: int, timeout_ms: int, round_s: float = 2.0) -> None:
        self.conninfo = conninfo
        self.clients = clients
        self.timeout_ms = timeout_ms
        self.round_s = round_s
        self.figures = LoadFigures()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="mltasks-dev-load", daemon=True)

    def start(self) -> LoadRunner:
        self.thread.start()
        return self

    def _run(self) -> None:
        from mltasks.game import GatewaySpec, run_gateway

        n = 0
        while not self._stop.is_set():
            spec = GatewaySpec(
                conninfo=self.conninfo,
                clients=self.clients,
                duration_s=self.round_s,
                timeout_ms=self.timeout_ms,
                processes=0,
                seed=n,
                pool_size=256,
            )
            n += 1
            try:
                self._add(run_gateway(spec))
            except Exception as exc:  # the database went away: try again shortly
                with self._lock:
                    self.figures.errors += 1
                    self.figures.last_error = f"{type(exc).__name__}: {exc}"
                self._stop.wait(1.0)

    def _add(self, result: Any) -> None:
        import numpy as np

        from mltasks.game import ANSWERED

        lat = np.asarray(result.latencies_ms, dtype=float)
        answered = [o == ANSWERED for o in result.outcomes]
        with self._lock:
            f = self.figures
            f.decisions += len(result.outcomes)
            f.answered += sum(answered)
            f.in_time += int(
                sum(a and ms <= self.timeout_ms for a, ms in zip(answered, lat, strict=True))
            )
            f.answered_255 += sum(a == TRADITIONAL_AI for a in result.actions)
            f.errors += result.error_count
            if result.errors:
                f.last_error = result.errors[-1]
            f.rate_per_s = len(result.outcomes) / result.elapsed_s if result.elapsed_s else 0.0
            if lat.size:
                f.p50_ms, f.p99_ms = (float(v) for v in np.percentile(lat, [50, 99]))

    def summary(self) -> str:
        with self._lock:
            f = dataclasses.replace(self.figures)
        if not f.decisions:
            return f"load: {self.clients} clients starting ..."
        line = (
            f"load: {self.clients} clients, {f.rate_per_s:.0f} decisions/s, "
            f"{f.decisions} so far, {f.in_time / f.decisions:.1%} answered in "
            f"{self.timeout_ms} ms, 255 {f.answered_255 / f.decisions:.1%}"
        )
        if f.p50_ms is not None and f.p99_ms is not None:
            line += f", p50 {f.p50_ms:.1f} ms, p99 {f.p99_ms:.1f} ms"
        if f.errors:
            line += f", {f.errors} errors (last: {f.last_error[:80]})"
        return line

    def stop(self) -> None:
        """Ends after the round in flight (bounded: the round, the timeout, a margin)."""
        self._stop.set()
        self.thread.join(self.round_s + self.timeout_ms / 1000 + 35.0)
