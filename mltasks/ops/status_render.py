"""``mltasks status`` as a table: one line per indicator with its state (ok, FAIL or -),
what serves each level, each deployed model's versions, and a one-line summary."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from mltasks.contract import ARCHETYPES
from mltasks.fallback.ladder import (
    LEVEL_QUEUE,
    QUEUE_LEVELS,
    QUEUE_TIER,
    QUEUES,
    TIER_NAMES,
    WORST,
    rung,
    spell_levels,
)
from mltasks.ops.status_snapshot import Status


def version_rows(status: Status) -> list[tuple[str, str, str]]:
    """One line per deployed model: what serves, the candidate and its canary, the last
    rollback."""
    out: list[tuple[str, str, str]] = []
    now = status.checked_at
    for v in status.versions:
        if "error" in v:
            out.append((v["model"], v["error"], "fail"))
            continue
        a = v["active"]
        value = f"{a['version']} active since {_ago(now - float(a['since']))} ({a['via']})"
        c = v.get("candidate")
        if c:
            value += f"; candidate {c['version']} {c['state']}"
            rows_seen = (c.get("progress") or {}).get("rows")
            if c["state"] == "canary" and rows_seen is not None:
                value += f" {rows_seen:.0f}/{v['min_rows']} rows"
        rb = v.get("last_rollback")
        if rb:
            value += (
                f"; last rollback {rb['from']} -> {rb['to']} {_ago(now - float(rb['at']))}"
                f" ({rb['reason']})"
            )
        out.append((f"model {v['model']}", value, "-"))
    return out


def served_rows(status: Status) -> list[tuple[str, str, str]]:
    """One line per worker process and level: the version of each deployed model it
    answers with (and shadows), or how many plain files it serves. A process that serves
    another version than the pointer's active one is marked: it has not swapped yet."""
    deployed = {v["model"]: v["active"]["version"] for v in status.versions if v.get("active")}
    out: list[tuple[str, str, str]] = []
    for doc in status.served:
        held: dict[str, str] = doc.get("versions") or {}
        shadows: dict[str, str] = doc.get("candidates") or {}
        parts = []
        for model in sorted(set(deployed) & set(held)):
            part = f"{model}@{held[model]}"
            if model in shadows:
                part += f" (shadows {shadows[model]})"
            parts.append(part)
        value = ", ".join(parts) or f"{len(held)} models from their plain files"
        behind = any(held.get(m) not in (None, v) for m, v in deployed.items())
        label = f"worker {doc.get('worker', '?')} level {doc.get('level', '?')}"
        out.append((label, value + (" (not swapped yet)" if behind else ""), "-"))
    return out


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m ago"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def rows(status: Status) -> list[tuple[str, str, str]]:
    """(indicator, value, state) per line of the table; state is ok, warn, fail or -."""
    out: list[tuple[str, str, str]] = []
    failing = set(status.failing)

    def state(ok: bool | None) -> str:
        return "-" if ok is None else ("ok" if ok else "fail")

    for name, reach in (("PostgreSQL", status.postgres), ("Redis", status.redis)):
        value = reach.target if reach.reachable else f"{reach.target}: {reach.error}"
        out.append((name, value, state(reach.reachable)))

    m = status.models
    if m is not None:
        shown = "-" if m.loaded is None else str(m.loaded)
        ok = None if m.loaded is None else "models" not in failing
        out.append(("models loaded", f"{shown}/{m.expected} ({m.source})", state(ok)))
        if m.by_type:
            types = ", ".join(f"{t} {n}/{len(ARCHETYPES)}" for t, n in m.by_type.items())
            out.append((f"models of level {m.level}", types, "-"))
        for number, weights in sorted(m.fusion.items()):
            members = ", ".join(f"{t} {w:g}" for t, w in weights.items())
            out.append((f"fusion level {number}", members, "-"))

    lv = status.level
    if lv is None:
        out.append(("fallback level", "unknown (Redis unreachable)", "-"))
    else:
        since = (
            "no level recorded: start level"
            if lv.since is None
            else f"since {datetime.fromtimestamp(lv.since):%H:%M:%S} "
            f"({_ago(status.checked_at - lv.since)})"
        )
        value = f"{lv.level} {lv.name}; {since}; reason: {lv.reason or '-'}"
        if lv.serving != lv.level:
            value += f"; served at {lv.serving}"
        value += f"; best reachable {lv.ceiling}"
        ok = "level" not in failing
        out.append(("fallback level", value, state(ok)))

    if status.redis.reachable:
        cache = ", ".join(f"{k} {v:.0%}" for k, v in sorted(status.cache.items()))
        out.append(("cache hit rate", cache or "no lookups yet", "-"))

    lat = status.latency
    if lat is not None:
        label = f"latency ({lat.window_s // 60} min)" if lat.window_s >= 60 else "latency"
        if lat.answered:
            value = (
                f"avg {_ms(lat.avg_ms)}, p99 {_ms(lat.p99_ms)}, max {_ms(lat.max_ms)}; "
                f"{lat.answered} answers, {lat.answered_255} of them 255; "
                f"deadline {lat.deadline_ms} ms"
            )
            ok = "latency" not in failing
            out.append((label, value, state(ok)))
        else:
            out.append((label, "no answers in the window", "-"))

    g = status.gpu
    if g is not None:
        if g.present is None:
            value = "unknown (no probe report)"
        elif not g.present:
            value = f"no GPU ({g.status})" if g.status not in ("", "no GPU") else "no GPU"
        elif g.vram_used_bytes is not None and g.vram_total_bytes:
            used, total = g.vram_used_bytes, g.vram_total_bytes
            value = f"{_gib(used)} / {_gib(total)} ({used / total:.0%})"
        else:
            value = f"GPU present, VRAM unknown ({g.status})"
        out.append(("VRAM", value, "-"))

    q = status.queue
    if q is not None and (q.pending is not None or q.broker):
        parts = []
        if q.pending is not None:
            parts.append(f"{q.pending} pending, {q.processing} processing, lag {_ms(q.lag_ms)}")
        if q.broker:
            parts.append("broker " + ", ".join(f"{k} {v}" for k, v in q.broker.items()))
        ok = None if q.lag_ms is None else "queue" not in failing
        out.append(("queue", "; ".join(parts), state(ok)))

    out += serving_rows(status)
    out += version_rows(status)
    out += served_rows(status)
    return out


# The tiers of the ladder: (row label, queue, levels) - what serves each level.
TIERS: Final[tuple[tuple[str, str, tuple[int, ...]], ...]] = tuple(
    (f"{spell_levels(QUEUE_LEVELS[q])} {TIER_NAMES[QUEUE_TIER[q]]}", q, QUEUE_LEVELS[q])
    for q in QUEUES
)
# The row of the level no queue serves: ``level 5 255``.
BRIDGE_TIER: Final = f"{spell_levels((WORST,))} {TIER_NAMES[rung(WORST).tier]}"


def serving_rows(status: Status) -> list[tuple[str, str, str]]:
    """What serves each level, truthfully: a worker listening on ``gpu`` without a GPU does
    not serve levels 1-2 (their batches would run on its CPU); one process listening on
    several queues is one process, and said so."""
    if not status.workers:
        return []
    out: list[tuple[str, str, str]] = []
    current = None if status.level is None else LEVEL_QUEUE.get(status.level.level)
    gpu = status.gpu
    for label, queue, _ in TIERS:
        w = status.workers.get(queue)
        ok = True
        if w is None or not w.live:
            value, ok = f"nothing: no live worker on queue {queue}", False
        else:
            n = w.count if w.count is not None else len(w.processes) or None
            who = "a worker" if n is None else f"{n} worker" + ("s" if n != 1 else "")
            shared = sorted(
                other
                for other, ow in status.workers.items()
                if other != queue and set(ow.processes) & set(w.processes)
            )
            also = ""
            if shared:
                same = "the same process" if len(w.processes) == 1 else "the same processes"
                also = f" ({same} as {' and '.join(shared)})"
            on_gpu = QUEUE_TIER[queue] == "gpu"
            if on_gpu and gpu is not None and gpu.present is False:
                ok = False
                value = f"nothing: {who} on queue {queue}{also}, but no GPU"
                if gpu.status not in ("", "no GPU"):
                    value += f" ({gpu.status})"
            else:
                value = f"{who} on queue {queue}{also}, heartbeat {_ms(w.heartbeat_age_ms)} ago"
                if on_gpu and (gpu is None or gpu.present is None):
                    value += "; GPU unknown (no probe report)"
        if w is not None and w.not_serving:
            whys = sorted(set(w.not_serving.values()))
            value += f"; {len(w.not_serving)} not serving: " + "; ".join(whys)
            ok = ok and len(w.not_serving) < (w.count or len(w.processes) or 1)
        needed = current == queue
        out.append((label, value, ("ok" if ok else "fail") if needed else "-"))
    out.append((BRIDGE_TIER, "the bridge itself (the game's traditional AI)", "-"))
    return out


def render(status: Status) -> Any:
    """The status as a rich Table (title: the verdict; a line per problem below)."""
    from rich.table import Table
    from rich.text import Text

    colours = {"healthy": "green", "degraded": "yellow", "unreachable": "red"}
    title = Text(f"mltasks status: {status.verdict}", style=f"bold {colours[status.verdict]}")
    table = Table(title=title, show_header=True, header_style="bold", expand=False)
    table.add_column("indicator", no_wrap=True)
    table.add_column("value")
    table.add_column("", no_wrap=True)
    marks = {"ok": Text("ok", "green"), "fail": Text("FAIL", "bold red"), "-": Text("")}
    for name, value, state in rows(status):
        table.add_row(name, value, marks.get(state, Text(state)))
    if status.problems:
        table.caption = "; ".join(status.problems)
        table.caption_style = "yellow"
    return table


def summary_line(status: Status) -> str:
    """One line for logs and non-terminal screens."""
    parts = [status.verdict]
    if status.level is not None:
        parts.append(f"level {status.level.level}")
    if status.models is not None and status.models.loaded is not None:
        parts.append(f"models {status.models.loaded}/{status.models.expected}")
    if status.latency is not None and status.latency.answered:
        parts.append(f"p99 {_ms(status.latency.p99_ms)} over {status.latency.answered}")
    if status.queue is not None and status.queue.pending is not None:
        parts.append(f"pending {status.queue.pending}")
    if status.problems:
        parts.append("; ".join(status.problems))
    return ", ".join(parts)
