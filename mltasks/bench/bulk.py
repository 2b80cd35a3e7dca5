"""Open-loop bulk load: requests written at a fixed rate with COPY, timed by the database.

The gateway benchmark is closed loop: a map server waits for each answer before its next
decision, so a slow responder also slows the load it is offered. Many map servers together
are an open loop: decisions arrive at their own rate whatever the responder does. Here the
requests of every ``tick_ms`` are written as one small COPY at that tick's scheduled time
(late ticks catch up in the next batch, so the offered rate holds while the loader can
keep up), nobody polls, and a request's latency is read afterwards from the database's own
clocks: ``ai_responses.created_at - ai_requests.created_at``. The client's CPU and its
Python overhead are out of the figure.

States: by default every request has a distinct state (a pool of sampled states whose
three temporal features carry a row counter, distinct at the caches' two-decimal
rounding), so no cache can hit. ``states=N`` draws every request at random from N fixed
(state, mob, archetype, monster) entries instead: repeats, as a cache would see them.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg

from mltasks.bench import BenchError
from mltasks.bench.queries import bench_query
from mltasks.contract import ARCHETYPES, TRADITIONAL_AI

DEFAULT_TICK_MS = 5.0
DISTINCT_POOL = 4096
# Rows are counted in base 50 over the three temporal slots: hundredths 0.00-0.49, the
# range of the demo states' noise slots, distinct at two decimals for 125,000 rows per
# pool entry.
_TEMPORAL = (61, 62, 63)
_DIGIT_BASE = 50
# A batch that goes out this late is counted (a sign of a disturbed machine) ...
LOADER_LATE_MS = 50.0
# ... and the loader is behind when it took longer than the duration over this share.
LOADER_MIN_SHARE = 0.97
CDF_POINTS = 201


@dataclass(frozen=True, slots=True)
class BulkSpec:
    """One open-loop load: a rate, a duration, a batch interval and the states used."""

    conninfo: str = field(repr=False)
    rate: float
    duration_s: float
    tick_ms: float = DEFAULT_TICK_MS
    states: int = 0  # 0: every request distinct; N: drawn from N entries (repeats)
    # With states: how many mob ids each state comes with (one of them drawn per request).
    # The action cache (L2) keys on the mob, the model-output cache (L3) on the archetype.
    mobs: int = 1
    seed: int = 0
    layout: str = "encoder"

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration_s <= 0 or self.tick_ms <= 0:
            raise ValueError("rate, duration and tick must be positive")
        if self.states < 0:
            raise ValueError("states must be 0 (all distinct) or a pool size")
        if self.mobs < 1:
            raise ValueError("mobs must be at least 1")


@dataclass(slots=True)
class LoadResult:
    """What the loader did: rows written, how late its batches went out."""

    target_rate: float
    duration_s: float
    rows: int = 0
    batches: int = 0
    elapsed_s: float = 0.0
    max_late_ms: float = 0.0
    late_batches: int = 0  # batches sent more than LOADER_LATE_MS after their time
    cpu_s: float = 0.0  # the loader's own CPU time (this process)
    copy_ms: list[float] = field(default_factory=list)

    @property
    def achieved_rate(self) -> float:
        return self.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def behind(self) -> bool:
        """True when the loader did not offer the rate: its last batch went out later than
        3% of the duration (at least 100 ms). Late batches alone are a burst, not less
        load. On a small machine this is also what a responder that takes every core
        does to the loader."""
        slack = max(0.1, (1.0 / LOADER_MIN_SHARE - 1.0) * self.duration_s)
        return self.elapsed_s > self.duration_s + slack

    def as_dict(self) -> dict[str, Any]:
        copy = np.asarray(self.copy_ms) if self.copy_ms else np.zeros(1)
        return {
            "target_rate": self.target_rate,
            "achieved_rate": round(self.achieved_rate, 1),
            "rows": self.rows,
            "batches": self.batches,
            "elapsed_s": round(self.elapsed_s, 3),
            "max_late_ms": round(self.max_late_ms, 2),
            "late_batches": self.late_batches,
            "cpu_s": round(self.cpu_s, 2),
            "copy_ms_p50": round(float(np.percentile(copy, 50)), 3),
            "copy_ms_p99": round(float(np.percentile(copy, 99)), 3),
            "behind": self.behind,
        }


class RowSource:
    """COPY text lines for the requests, formatted before the clock starts where possible."""

    def __init__(self, spec: BulkSpec) -> None:
        from mltasks.state import sample_states

        self.distinct = spec.states == 0
        size = DISTINCT_POOL if self.distinct else spec.states
        rng = np.random.default_rng([spec.seed, size])
        states = sample_states(rng, size, spec.layout)
        self.size = size
        self._rng = np.random.default_rng([spec.seed, size, 1])
        self._parts: list[tuple[str, str]] = []  # distinct: around the temporal values
        self._lines: list[bytes] = []  # a pool: entry i * mobs + j is state i with mob j
        self.mobs = 1 if self.distinct else spec.mobs
        for i, state in enumerate(states.tolist()):
            archetype = ARCHETYPES[i % len(ARCHETYPES)]
            hp, sp = f"{state[0]:g}", f"{state[1]:g}"
            suffix = f"}}\t0\t0\t0\t{hp}\t{sp}\tpending\t5\n"
            if self.distinct:
                prefix = f"{120_000_000 + i}\t{1002 + (i * 31) % 97}\t{archetype}\t{{"
                body = ",".join(f"{v:.6f}" for v in state[: _TEMPORAL[0]])
                self._parts.append((prefix + body + ",", suffix))
                continue
            body = ",".join(f"{v:.6f}" for v in state)
            for j in range(self.mobs):
                monster_id, mob_id = 120_000_000 + i * self.mobs + j, 1002 + (i * 31 + j * 7) % 97
                prefix = f"{monster_id}\t{mob_id}\t{archetype}\t{{"
                self._lines.append((prefix + body + suffix).encode())
        self.k = 0

    def take(self, n: int) -> bytes:
        """The next ``n`` rows as COPY text."""
        if self.distinct:
            out = []
            for k in range(self.k, self.k + n):
                head, tail = self._parts[k % self.size]
                j = k // self.size
                digits = (j % _DIGIT_BASE, (j // _DIGIT_BASE) % _DIGIT_BASE, j // _DIGIT_BASE**2)
                temporal = ",".join(f"{(d % _DIGIT_BASE) / 100:.6f}" for d in digits)
                out.append(head + temporal + tail)
            self.k += n
            return "".join(out).encode()
        picks = self._rng.integers(0, len(self._lines), n)
        self.k += n
        return b"".join(self._lines[i] for i in picks.tolist())


def offer_load(spec: BulkSpec, source: RowSource | None = None) -> LoadResult:
    """Write ``spec.rate`` requests per second for ``spec.duration_s``, open loop."""
    source = source or RowSource(spec)
    result = LoadResult(target_rate=spec.rate, duration_s=spec.duration_s)
    tick_s = spec.tick_ms / 1000.0
    ticks = max(1, math.ceil(spec.duration_s / tick_s))
    copy_sql = bench_query("bulk_copy")
    monotonic = time.monotonic
    with psycopg.connect(spec.conninfo, autocommit=True) as conn:
        cur = conn.cursor()
        cpu0 = time.process_time()
        t0 = monotonic()
        for i in range(1, ticks + 1):
            due = t0 + min(i * tick_s, spec.duration_s)
            wait = due - monotonic()
            if wait > 0:
                time.sleep(wait)
            late_ms = (monotonic() - due) * 1000.0
            result.max_late_ms = max(result.max_late_ms, late_ms)
            if late_ms > LOADER_LATE_MS:
                result.late_batches += 1
            n = round(spec.rate * (due - t0)) - result.rows
            if n <= 0:
                continue
            data = source.take(n)
            c0 = monotonic()
            with cur.copy(copy_sql) as copy:
                copy.write(data)
            result.copy_ms.append((monotonic() - c0) * 1000.0)
            result.rows += n
            result.batches += 1
        result.elapsed_s = monotonic() - t0
        result.cpu_s = time.process_time() - cpu0
    return result


def unanswered(conninfo: str) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(bench_query("bulk_unanswered")).fetchone()
    return int(row[0]) if row else 0


def drain(conninfo: str, timeout_s: float, poll_s: float = 0.05) -> tuple[float, int]:
    """Wait until every request has a response or ``timeout_s`` passed.

    Returns (seconds waited, requests still unanswered).
    """
    t0 = time.monotonic()
    left = unanswered(conninfo)
    while left and time.monotonic() - t0 < timeout_s:
        time.sleep(poll_s)  # polling the table: the condition is the database's
        left = unanswered(conninfo)
    return time.monotonic() - t0, left


@dataclass(slots=True)
class Rows:
    """The requests of a run as the database recorded them (one entry per request)."""

    created_s: np.ndarray  # float64 epoch seconds
    latency_ms: np.ndarray  # float64, NaN without a response
    action: np.ndarray  # int64, -1 without a response
    source: list[str | None]
    reason: list[str | None]


def read_rows(conninfo: str) -> Rows:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(bench_query("bulk_results")).fetchall()
    return Rows(
        created_s=np.asarray([r[0] for r in rows], dtype=np.float64),
        latency_ms=np.asarray([np.nan if r[1] is None else r[1] for r in rows], dtype=np.float64),
        action=np.asarray([-1 if r[2] is None else r[2] for r in rows], dtype=np.int64),
        source=[r[3] for r in rows],
        reason=[r[4] for r in rows],
    )


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values.size else None


def _latency(values: np.ndarray) -> dict[str, float | None]:
    return {
        "p50": _pct(values, 50),
        "p90": _pct(values, 90),
        "p99": _pct(values, 99),
        "max": round(float(values.max()), 2) if values.size else None,
        "mean": round(float(values.mean()), 2) if values.size else None,
    }


def cdf_points(values: np.ndarray, points: int = CDF_POINTS) -> list[float]:
    """Latency at ``points`` evenly spaced quantiles from 0 to 1 (for plots)."""
    if not values.size:
        return []
    qs = np.linspace(0.0, 100.0, points)
    return [round(float(v), 3) for v in np.percentile(values, qs)]


def summarize_rows(
    rows: Rows,
    *,
    accept_255_reasons: Sequence[str] = (),
    p99_limit_ms: float = 50.0,
    min_answered_share: float = 0.99,
) -> dict[str, Any]:
    """The figures of one bulk run, JSON-ready.

    Answered: a response with an action (0-9), or a 255 whose reason is in
    ``accept_255_reasons`` (level 5's own answer). A 255 for a deadline, a missing
    broker or a lost lease is a response the game gets, but not an answer. The run
    held when at least ``min_answered_share`` of the requests were answered and the
    p99 of their latency is within ``p99_limit_ms``.
    """
    n = int(rows.latency_ms.size)
    responded = ~np.isnan(rows.latency_ms)
    reasons = np.asarray([r if r is not None else "" for r in rows.reason], dtype=object)
    accepted = np.isin(reasons, list(accept_255_reasons))
    answered = responded & ((rows.action != TRADITIONAL_AI) | accepted)
    lat = rows.latency_ms[answered]
    n_answered = int(answered.sum())
    is_255 = responded & (rows.action == TRADITIONAL_AI)
    reasons_255 = Counter(str(r) for r in reasons[is_255 & ~accepted])
    sources = Counter(str(s) for s, ok in zip(rows.source, responded, strict=True) if ok)
    if n:
        first, last = float(rows.created_s.min()), float(rows.created_s.max())
        window = max(last - first, 1e-3)
        done_s = rows.created_s + np.nan_to_num(rows.latency_ms, nan=np.inf) / 1000.0
        in_window = int((answered & (done_s <= last)).sum())
    else:
        window, in_window = 0.0, 0
    answered_share = n_answered / n if n else 0.0
    p99 = _pct(lat, 99)
    held = answered_share >= min_answered_share and p99 is not None and p99 <= p99_limit_ms
    return {
        "requests": n,
        "offered_per_s": round(n / window, 1) if n else 0.0,
        "window_s": round(window, 3),
        "responded": int(responded.sum()),
        "answered": n_answered,
        "answered_share": round(answered_share, 5),
        # Answers written while requests were still arriving, per second of that window:
        # what the responder keeps up with, below the offered rate when it falls behind.
        "answered_per_s": round(in_window / window, 1) if n else 0.0,
        "latency_ms": _latency(lat),
        "response_latency_ms": _latency(rows.latency_ms[responded]),
        "share_255": round(int(is_255.sum()) / n, 5) if n else 0.0,
        "reasons_255": dict(sorted(reasons_255.items())),
        "sources": dict(sorted(sources.items())),
        "held": held,
        "cdf_ms": cdf_points(lat),
    }


def bulk_reset(conninfo: str) -> None:
    """Empty both tables (ids from 1), like before every gateway run."""
    from mltasks.bench.database import reset_tables

    try:
        reset_tables(conninfo)
    except psycopg.Error as exc:
        raise BenchError(f"cannot empty the benchmark tables: {exc}") from exc
