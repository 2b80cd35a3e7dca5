"""``bench gateway --vary SECTION.KEY=V1,V2 --rounds N``: service variants in one run.

One key of the service's configuration takes each value in turn, each value a service of
its own (its run name, config file and logs name the value), so two settings are compared
under the same load in one sitting instead of in separate invocations minutes apart. At
each client count the responders run ``N`` rounds, the variants' order reversed every
other round: on this 2-core machine the first run of a pair is often the faster whatever
it runs, and alternating the order keeps that (and any drift) from favouring one value.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from mltasks.bench import BenchError
from mltasks.bench.service import ServiceSettings, bench_config, write_checked_config

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Vary:
    """``--vary``: one key of the service's config and the values it takes, in order."""

    section: str
    key: str
    values: tuple[Any, ...]  # as YAML reads them (what the config gets)
    texts: tuple[str, ...]  # as typed (what the runs are called)

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    def run_name(self, text: str) -> str:
        """The run's name in the report, and (spaces made dashes) its config and logs."""
        return f"service {self.name}={text}"

    def settings(self, base: ServiceSettings) -> list[ServiceSettings]:
        """One service per value, the value set on top of ``--set``'s keys (last wins)."""
        return [
            replace(base, overrides=(*base.overrides, (self.section, self.key, value)))
            for value in self.values
        ]

    def describe(self, rounds: int) -> dict[str, Any]:
        """For report.json: the key, the values as typed, the runs' names."""
        return {
            "key": self.name,
            "values": list(self.texts),
            "runs": [self.run_name(t) for t in self.texts],
            "rounds": rounds,
        }


def check_configs(vary: Vary, settings: Sequence[ServiceSettings], work: Path) -> None:
    """Every variant's configuration as the service will read it, before the first run: a
    key or value it rejects stops the benchmark at the start with one line, instead of
    failing every run of that variant minutes later."""
    path = work / "mltasks-bench-vary-check.yaml"
    for text, s in zip(vary.texts, settings, strict=True):
        try:
            write_checked_config(path, bench_config(s))
        except BenchError as exc:
            raise BenchError(f"--vary {vary.name}={text}: {exc}") from exc
    path.unlink(missing_ok=True)


def schedule(floors: Sequence[T], services: Sequence[T], rounds: int) -> list[tuple[int, T]]:
    """The runs at one client count, as (round, responder): each round the floors in their
    place, then the services, whose order is reversed in every other round (round 1: A B,
    round 2: B A), so neither is always the first of the pair."""
    out: list[tuple[int, T]] = []
    for k in range(1, rounds + 1):
        order = services if k % 2 else services[::-1]
        out += [(k, r) for r in (*floors, *order)]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _rate(run: dict[str, Any]) -> float | None:
    """Decisions/s of one run, unrounded (a round's ratio is not a ratio of roundings)."""
    if "failed" in run or not run.get("elapsed_s"):
        return None
    return float(run["decisions"]) / float(run["elapsed_s"])


def _pooled(text: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant over all its rounds: decisions over the summed durations (a slow round
    weighs by its length, not as one vote), the median p99, the share in time."""
    ok = [r for r in runs if "failed" not in r]
    decisions = sum(int(r["decisions"]) for r in ok)
    elapsed = sum(float(r["elapsed_s"]) for r in ok)
    in_time = sum(int(r["answered_in_time"]) for r in ok)
    p99s = [r["latency_ms"]["p99"] for r in ok if r["latency_ms"].get("p99") is not None]
    return {
        "value": text,
        "runs": len(ok),
        "failed": len(runs) - len(ok),
        "decisions": decisions,
        "elapsed_s": round(elapsed, 3),
        "decisions_per_s": round(decisions / elapsed, 1) if elapsed > 0 else None,
        "in_time_share": round(in_time / decisions, 4) if decisions else None,
        "p99_median_ms": round(float(statistics.median(p99s)), 2) if p99s else None,
    }


def _against(v: dict[str, Any], first: dict[str, Any]) -> dict[str, Any]:
    """A variant against the first value: decisions/s ratio, p99 difference (ms and %)."""
    a, b = v["p99_median_ms"], first["p99_median_ms"]
    diff = round(a - b, 2) if a is not None and b is not None else None
    rate = v["decisions"] / v["elapsed_s"] if v["elapsed_s"] else None
    first_rate = first["decisions"] / first["elapsed_s"] if first["elapsed_s"] else None
    return {
        "decisions_per_s_ratio": _ratio(rate, first_rate),
        "p99_diff_ms": diff,
        "p99_diff_pct": round(100 * (a - b) / b, 1) if diff is not None and b else None,
    }


def _rounds(runs: list[dict[str, Any]], texts: Sequence[str]) -> list[dict[str, Any]]:
    """Round by round: the order the variants ran in, each one's figures, and the ratio
    of each to the first value within the round."""
    out = []
    for k in sorted({r["round"] for r in runs}):
        these = [r for r in runs if r["round"] == k]
        by = {r["variant"]: r for r in these}
        ok = {t: r for t, r in by.items() if "failed" not in r}
        out.append(
            {
                "round": k,
                "order": [r["variant"] for r in these],
                "decisions_per_s": {
                    t: (ok[t]["decisions_per_s"] if t in ok else None) for t in texts
                },
                "p99_ms": {t: ok[t]["latency_ms"]["p99"] if t in ok else None for t in texts},
                "ratio": {
                    t: _ratio(_rate(by[t]) if t in by else None, _rate(by.get(texts[0], {})))
                    for t in texts[1:]
                },
            }
        )
    return out


def compare(runs: list[dict[str, Any]], texts: Sequence[str]) -> list[dict[str, Any]]:
    """Per client count: each variant over all its rounds and against the first value,
    then round by round. ``runs`` are the report's; the variants' carry ``variant`` (the
    value as typed) and ``round``, the others are left out."""
    out = []
    mine = [r for r in runs if r.get("variant") is not None]
    for clients in sorted({r["clients"] for r in mine}):
        at = [r for r in mine if r["clients"] == clients]
        variants = [_pooled(t, [r for r in at if r["variant"] == t]) for t in texts]
        for v in variants:
            v.update(_against(v, variants[0]))
        out.append({"clients": clients, "variants": variants, "rounds": _rounds(at, texts)})
    return out


def _cell(v: Any, spec: str = "", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def markdown_lines(report: dict[str, Any]) -> list[str]:
    """The variants' section of report.md: pooled per variant, then round by round."""
    vary, comparison = report.get("vary"), report.get("variants")
    if not vary or not comparison:
        return []
    texts, key, rounds = vary["values"], vary["key"], vary["rounds"]
    first = texts[0]
    lines = [
        f"Variants of `{key}` (`--vary`), {rounds} round{'s' * (rounds != 1)} at each client "
        "count, the variants' order reversed every other round. decisions/s: the decisions "
        "of all of a variant's rounds over the sum of their durations; p99: the median of "
        f"its rounds' p99; in time: of all its decisions. Against the first value, {first}.",
        "",
        f"| clients | {key} | runs | decisions | decisions/s | in time | p99 ms (median) "
        f"| decisions/s / {first} | p99 - {first} ms | p99 - {first} |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in comparison:
        for v in c["variants"]:
            runs = str(v["runs"]) + (f" ({v['failed']} failed)" if v["failed"] else "")
            head = (
                f"| {c['clients']} | {v['value']} | {runs} | {v['decisions']} "
                f"| {_cell(v['decisions_per_s'])} | {_cell(v['in_time_share'], '.1%')} "
                f"| {_cell(v['p99_median_ms'])} "
            )
            if v["value"] == first:
                lines.append(head + "| - | - | - |")
                continue
            lines.append(
                head + f"| {_cell(v['decisions_per_s_ratio'], '.3f')} "
                f"| {_cell(v['p99_diff_ms'], '+.2f')} | {_cell(v['p99_diff_pct'], '+.1f', '%')} |"
            )
    lines += [
        "",
        "Round by round (a failed run: n/a):",
        "",
        "| clients | round | order | "
        + " | ".join(f"{t}: decisions/s | {t}: p99 ms" for t in texts)
        + " | "
        + " | ".join(f"{t} / {first}" for t in texts[1:])
        + " |",
        "| ---: | ---: | --- | " + " | ".join(["---:"] * (3 * len(texts) - 1)) + " |",
    ]
    for c in comparison:
        for r in c["rounds"]:
            cells = [f"{_cell(r['decisions_per_s'][t])} | {_cell(r['p99_ms'][t])}" for t in texts]
            ratios = [_cell(r["ratio"][t], ".3f") for t in texts[1:]]
            lines.append(
                f"| {c['clients']} | {r['round']} | {', '.join(r['order'])} | "
                + " | ".join(cells + ratios)
                + " |"
            )
    return lines
