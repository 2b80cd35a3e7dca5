"""The fault and scale suites' audit: every row as the database has it (its clocks, not
ours), and everything wrong with the table, one line per problem."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import psycopg

from mltasks.contract import N_ACTIONS, TRADITIONAL_AI
from tests import game

if TYPE_CHECKING:
    from tests.faults.support import Service


@dataclasses.dataclass(frozen=True)
class Decision:
    """A decision of an emulated map server: what it read; None: it gave up."""

    rid: int
    client: str
    answer: tuple[int, float] | None  # what the map server read; None: it gave up


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One request as the database has it, and its answer (text, as libpq returns it)."""

    rid: int
    status: str
    attempts: int
    claimed: bool
    created: float  # epoch s, database clock
    action: str | None
    confidence: str | None
    source: str | None
    reason: str | None
    answered: float | None  # epoch s, database clock

    @property
    def latency_s(self) -> float | None:
        return None if self.answered is None else self.answered - self.created

    @property
    def parsed(self) -> tuple[int, float] | None:
        if self.action is None or self.confidence is None:
            return None
        return game.stoi(self.action), game.stof(self.confidence)


def outcomes(conn: psycopg.Connection[Any]) -> dict[int, Outcome]:
    rows = conn.execute(
        "SELECT r.request_id, r.status, r.attempts, r.claimed_at IS NOT NULL,"
        " extract(epoch FROM r.created_at)::float8,"
        " s.action_id::text, s.confidence::text, s.source, s.reason,"
        " extract(epoch FROM s.created_at)::float8"
        " FROM ai_requests r LEFT JOIN ai_responses s USING (request_id)"
        " ORDER BY r.request_id"
    ).fetchall()
    return {r[0]: Outcome(*r) for r in rows}


def first_worker_answer(pg: psycopg.Connection[Any], since: float) -> float | None:
    """When (database clock) the first worker answer to a request made after `since` came."""
    row = pg.execute(
        "SELECT min(extract(epoch FROM s.created_at))::float8"
        " FROM ai_requests r JOIN ai_responses s USING (request_id)"
        " WHERE s.source IN ('model', 'cache') AND r.created_at > to_timestamp(%s)",
        (since,),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def db_now(conn: psycopg.Connection[Any]) -> float:
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert row is not None
    return float(row[0])


def unsettled(conn: psycopg.Connection[Any]) -> int:
    """Rows still pending or processing, or without their one answer."""
    row = conn.execute(
        "SELECT count(*) FROM ai_requests r WHERE r.status IN ('pending', 'processing')"
        " OR NOT EXISTS (SELECT 1 FROM ai_responses s WHERE s.request_id = r.request_id)"
    ).fetchone()
    return int(row[0]) if row else 0


def settle(conn: psycopg.Connection[Any], timeout: float) -> bool:
    """Wait (bounded) until every row is finished and answered; False if some never are
    (the audit then says which)."""
    deadline = time.monotonic() + timeout
    while unsettled(conn):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def audit(
    conn: psycopg.Connection[Any],
    *,
    bound_s: float | None,
    decisions: Iterable[Decision] = (),
    inserted: Iterable[int] = (),
    bound_from: float = 0.0,
) -> tuple[list[str], dict[int, Outcome]]:
    """Everything wrong with the table, one line per problem: rows left pending or
    processing, rows without exactly one answer, answers the map server could not parse
    or that are out of range, answers later than `bound_s` after their request (for
    requests created after `bound_from`), and answers that differ from what the game read.
    """
    rows = outcomes(conn)
    problems: list[str] = []
    dup = conn.execute(
        "SELECT request_id, count(*) FROM ai_responses GROUP BY 1 HAVING count(*) > 1"
    ).fetchall()
    problems += [f"request {rid}: {n} answers" for rid, n in dup]
    for o in rows.values():
        where = f"request {o.rid} ({o.status}, attempts {o.attempts})"
        if o.status in ("pending", "processing"):
            problems.append(f"{where}: left {o.status}")
        if o.action is None:
            claimed = "claimed" if o.claimed else "never claimed"
            problems.append(f"{where}: no answer ({claimed})")
            continue
        try:
            parsed = o.parsed
        except ValueError as exc:
            problems.append(f"{where}: the map server would crash: {exc}")
            continue
        assert parsed is not None
        action, conf = parsed
        if not (0 <= action < N_ACTIONS or action == TRADITIONAL_AI):
            problems.append(f"{where}: action {action}")
        if not 0.0 <= conf <= 1.0:
            problems.append(f"{where}: confidence {conf}")
        lat = o.latency_s
        if bound_s is not None and o.created >= bound_from and lat is not None and lat > bound_s:
            problems.append(
                f"{where}: answered {lat:.2f}s after its insert (> {bound_s:.2f}s), "
                f"{o.source}/{o.reason}"
            )
    for d in decisions:
        got = rows.get(d.rid)
        if got is None:
            problems.append(f"request {d.rid}: the game inserted it, it is gone")
        elif d.answer is not None and got.parsed != d.answer:
            problems.append(f"request {d.rid}: the game read {d.answer}, stored {o.parsed}")
    problems += [f"request {rid}: inserted, now missing" for rid in inserted if rid not in rows]
    return problems, rows


def summary(rows: dict[int, Outcome]) -> str:
    by = Counter((o.status, o.source, o.reason) for o in rows.values())
    lat = [o.latency_s for o in rows.values() if o.latency_s is not None]
    worst = f", slowest answer {max(lat):.3f}s" if lat else ""
    parts = ", ".join(f"{s}/{src}/{r}: {n}" for (s, src, r), n in by.most_common())
    return f"{len(rows)} requests{worst}; {parts}"


def report(problems: list[str], rows: dict[int, Outcome], service: Service | None = None) -> str:
    text = f"{len(problems)} problems; {summary(rows)}\n" + "\n".join(problems[:30])
    if service is not None:
        text += "\n" + service.tails(15)
    return text
