"""The docs say what the code does, and these checks fail when they stop agreeing: Redis's
eviction policy, the Redis dbs the tests and the benchmark use, what metrics port 0 means,
the alert expressions (against the metric names, the Prometheus jobs, the fallback levels
and the number of models a worker loads), and the README's operator steps."""

from __future__ import annotations

import argparse
import operator
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mltasks import keys
from mltasks.config import Config, ModelsConfig
from mltasks.contract import ARCHETYPES
from mltasks.fallback.ladder import Level
from mltasks.metrics import METRIC_NAMES
from mltasks.ops.status import best_reachable
from mltasks.ops.status_models import expected_models

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md"))
README = REPO / "README.md"


def text(path: Path) -> str:
    return path.read_text()


def flat(path: Path) -> str:
    """The file with line breaks and runs of spaces as one space (phrases may wrap)."""
    return " ".join(text(path).split())


# --- Redis: one eviction policy --------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(text(REPO / "docker-compose.yml"))
    return doc


def test_compose_runs_redis_with_the_documented_eviction_policy() -> None:
    command = [str(part) for part in compose()["services"]["redis"]["command"]]
    policy = command[command.index("--maxmemory-policy") + 1]
    assert policy == keys.MAXMEMORY_POLICY


POLICIES = (
    "noeviction",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
)


def test_every_doc_sets_the_same_eviction_policy() -> None:
    """Every `maxmemory-policy <name>` directive (redis.conf lines, CONFIG SET) and every
    "its policy is ..." sentence names the one policy."""
    found = 0
    for path in [*DOCS, README, REPO / "deploy" / "compose.env.example"]:
        body = flat(path)
        for m in re.finditer(rf"maxmemory-policy\s+({'|'.join(POLICIES)})\b", body):
            found += 1
            assert m[1] == keys.MAXMEMORY_POLICY, f"{path.name}: {m[0]!r}"
        for m in re.finditer(r"[Ii]ts policy is `([a-z-]+)`", body):
            found += 1
            assert m[1] == keys.MAXMEMORY_POLICY, f"{path.name}: {m[0]!r}"
    assert found >= 3  # redis.conf block, CONFIG SET, deploy.md's sentence
    # And no doc recommends another policy for the shared instance.
    for path in DOCS:
        body = flat(path)
        assert not re.search(r"(set|use) `?noeviction`? on it", body), path.name


# --- Redis dbs: the tests', the benchmark's ----------------------------------------------------


def _test_dbs() -> set[int]:
    """The Redis db numbers the test code uses."""
    from tests import world
    from tests.flow import test_status

    cfg = yaml.safe_load(text(REPO / "tests" / "config" / "test.yaml"))
    dbs = {cfg["redis"]["broker_db"], cfg["redis"]["cache_db"]}
    dbs |= {world.BROKER_DB, world.CACHE_DB, test_status.STATUS_DB}
    # The suites on the session's servers (faults/ and scale/ start servers of their own).
    suites = (REPO / "tests", REPO / "tests" / "unit", REPO / "tests" / "flow")
    for path in (p for suite in suites for p in suite.glob("*.py")):
        for m in re.finditer(r"(?:broker_db|cache_db): (\d+)", text(path)):
            dbs.add(int(m[1]))
    return dbs


def test_docs_give_the_test_dbs_the_tests_use() -> None:
    dbs = _test_dbs()
    lo, hi = min(dbs), max(dbs)
    assert dbs == set(range(lo, hi + 1)), dbs
    said = f"dbs {lo}-{hi}"
    for path in (README, REPO / "docs" / "redis.md"):
        body = flat(path)
        assert said in body, f"{path.name} does not say {said!r}"
        for m in re.finditer(r"dbs (\d+)[-/](\d+)", body):
            near = body[max(0, m.start() - 200) : m.start()]
            if "test" in near and "bench" not in near:
                assert m[0] == said, f"{path.name}: {m[0]!r} near {near[-80:]!r}"


def test_docs_give_the_bench_dbs_the_bench_uses() -> None:
    from mltasks.bench.service import BROKER_DB, CACHE_DB

    assert (BROKER_DB, CACHE_DB) == (9, 10)
    for phrase, path in (
        ("dbs 9 (broker) and 10 (cache)", REPO / "docs" / "redis.md"),
        ("(9 broker, 10 cache", REPO / "mltasks" / "bench" / "cli.py"),
    ):
        assert phrase in flat(path), f"{path.name}: {phrase!r}"


# --- metrics port 0 ----------------------------------------------------------------------------


def test_metrics_port_0_picks_a_free_port_as_documented() -> None:
    from mltasks.ops.exporter import start_metrics_server

    server = start_metrics_server("127.0.0.1", 0)
    try:
        assert server.port != 0
    finally:
        server.close()
    for path in (REPO / "config" / "mltasks.yaml", REPO / "docs" / "deploy.md"):
        body = flat(path)
        assert "0 picks a free port" in body, path.name
    for path in [*DOCS, REPO / "config" / "mltasks.yaml", REPO / "mltasks" / "config.py"]:
        body = flat(path)
        assert not re.search(r"\b0 (switches|turns) (it|an endpoint|them) off", body), path.name
        assert not re.search(r"\b0 disables", body), path.name


# --- alerts ------------------------------------------------------------------------------------

Series = dict[str, list[tuple[dict[str, str], float]]]
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
}


def alerts() -> list[str]:
    """The PromQL expressions of observability.md's alerting section."""
    body = text(REPO / "docs" / "observability.md")
    section = body[body.index("## Queries worth alerting on") :]
    block = section[section.index("```promql") + len("```promql") : section.index("```\n", 10)]
    exprs: list[str] = []
    current: list[str] = []
    for line in [*block.splitlines(), ""]:
        if not line.strip() or line.lstrip().startswith("#"):
            if current:
                exprs.append(" ".join(" ".join(current).split()))
                current = []
            continue
        current.append(line)
    return exprs


def fires(expr: str, series: Series) -> bool:
    """Whether ``expr`` returns anything on ``series``, for the forms the level and model
    alerts use; any other form is an error (write the alert in one of these, or extend)."""
    m = re.fullmatch(r'(.+) and on\(\) count\(up\{job="([\w-]+)"\} == 1\) > 0', expr)
    if m:
        up = [v for labels, v in series.get("up", []) if labels.get("job") == m[2] and v == 1]
        return bool(up) and fires(m[1], series)
    m = re.fullmatch(r"max\((\w+)\) (>=|>|<=|<|==) ([\d.]+)", expr)
    if m:
        values = [v for _, v in series.get(m[1], [])]
        return bool(values) and OPS[m[2]](max(values), float(m[3]))
    m = re.fullmatch(r"min by \(([\w, ]+)\) \((\w+)\) (>=|>|<=|<|==) ([\d.]+)", expr)
    if m:
        by = [k.strip() for k in m[1].split(",")]
        groups: dict[tuple[str, ...], list[float]] = {}
        for labels, v in series.get(m[2], []):
            groups.setdefault(tuple(labels.get(k, "") for k in by), []).append(v)
        return any(OPS[m[3]](min(vs), float(m[4])) for vs in groups.values())
    raise AssertionError(f"an alert in a form this check cannot evaluate: {expr}")


def prometheus_jobs() -> set[str]:
    doc = yaml.safe_load(text(REPO / "deploy" / "prometheus" / "prometheus.yml"))
    return {job["job_name"] for job in doc["scrape_configs"]}


def test_alerts_use_our_metrics_and_jobs() -> None:
    exprs = alerts()
    assert len(exprs) >= 6, exprs
    jobs = prometheus_jobs()
    for expr in exprs:
        names = set(re.findall(r"\b(ml_[a-z_]+?)(?:_bucket|_count|_sum)?\b(?!\()", expr))
        assert names <= METRIC_NAMES, f"{expr}: {names - METRIC_NAMES}"
        for m in re.finditer(r'job(=~?)"([^"]+)"', expr):
            if m[1] == "=":
                assert m[2] in jobs, f"{expr}: no job {m[2]!r} in prometheus.yml"
            else:
                assert any(re.fullmatch(m[2], j) for j in jobs), f"{expr}: {m[2]!r} matches no job"


def _level_alerts() -> list[str]:
    found = [e for e in alerts() if "ml_fallback_level" in e]
    assert found, "no alert on the fallback level"
    return found


def _host(level: int, gpu_worker_up: bool) -> Series:
    series: Series = {
        "ml_fallback_level": [({"job": "mltasks-bridge"}, level), ({"job": "w"}, level)],
        "up": [({"job": "mltasks-worker-cpu"}, 1.0)],
    }
    if gpu_worker_up:
        series["up"].append(({"job": "mltasks-worker-gpu"}, 1.0))
    return series


def test_level_alerts_stay_quiet_on_healthy_hosts() -> None:
    # The best each host reaches (mltasks.ops.status.best_reachable) is healthy.
    cpu_only = best_reachable({"cpu": True, "rules": True}, gpu_present=False)
    gpu_host = best_reachable({"gpu": True, "cpu": True, "rules": True}, gpu_present=True)
    assert (cpu_only, gpu_host) == (Level.CPU, Level.GPU_FP16)
    for expr in _level_alerts():
        assert not fires(expr, _host(cpu_only, gpu_worker_up=False)), expr
        assert not fires(expr, _host(gpu_host, gpu_worker_up=True)), expr
        assert not fires(expr, _host(Level.GPU_INT8, gpu_worker_up=True)), expr


@pytest.mark.parametrize(
    ("level", "gpu_worker_up"),
    [(Level.RULES, False), (Level.TRADITIONAL, False), (Level.CPU, True), (Level.RULES, True)],
)
def test_a_level_alert_fires_when_degraded(level: int, gpu_worker_up: bool) -> None:
    host = _host(level, gpu_worker_up)
    assert any(fires(expr, host) for expr in _level_alerts()), (level, gpu_worker_up)


def test_the_models_alert_fires_on_a_partial_load() -> None:
    found = [e for e in alerts() if "ml_models_loaded" in e]
    assert len(found) == 1, found
    expr = found[0]
    per_type = len(ARCHETYPES)
    assert f"(ml_models_loaded_by_type) < {per_type}" in expr
    # Whatever a level's fusion holds, every type it serves is loaded for every archetype.
    assert expected_models(Config()) == per_type * len(Config().models.fusion.level3)
    assert expected_models(Config(models=ModelsConfig(preload="all"))) == 54

    def workers(*by_type: dict[str, int]) -> Series:
        return {
            "ml_models_loaded_by_type": [
                ({"job": "mltasks-worker-cpu", "instance": f"w{i}", "model_type": t}, n)
                for i, counts in enumerate(by_type)
                for t, n in counts.items()
            ]
        }

    level3 = dict.fromkeys(Config().models.fusion.level3, per_type)
    assert not fires(expr, workers(level3, level3))
    assert fires(expr, workers(level3, {**level3, "skill_dqn": per_type - 1}))  # one missing
    assert fires(expr, workers(dict.fromkeys(level3, 0)))


# --- the README: an operator's first hour ------------------------------------------------------


def readme_blocks(lang: str) -> Iterator[str]:
    body = text(README)
    yield from re.findall(rf"```{lang}\n(.*?)```", body, flags=re.S)


def test_readme_opens_with_its_two_commands() -> None:
    first = next(readme_blocks("sh"))
    lines = [ln for ln in first.splitlines() if ln.strip()]
    # Both install from the lock (uv.lock), never whatever the registry serves today.
    assert " uv run --locked mltasks dev " in lines[0], lines
    assert " uv run --locked --extra test python -m pytest " in lines[1], lines


def test_ci_runs_the_readmes_test_command_on_the_lock() -> None:
    first = next(readme_blocks("sh"))
    test_command = first.splitlines()[1].split("#")[0].split("&&")[-1].strip()
    assert test_command.startswith("python3 -m uv run --locked"), test_command
    ci = text(REPO / ".ci" / "run")
    assert test_command.removeprefix("python3 -m uv ") in ci, test_command
    assert '"$UV" sync --locked --extra dev' in ci
    assert "pip install -e" not in ci  # no install that resolves afresh


def test_readme_manual_test_connects_and_waits_for_its_answer() -> None:
    body = text(README)
    section = body[body.index("## Trying it by hand") :]
    section = section[: section.index("\n## ", 5)]
    assert "request_id = 1" not in section
    assert "psql" in section  # how to connect
    sql_blocks = re.findall(r"```(?:sql|sh)\n(.*?)```", section, flags=re.S)
    assert sql_blocks, "no statements"
    assert "\\gset" in section and ":request_id" in section  # the id the insert returned
    assert "\\watch" in section or "pg_sleep" in section  # it waits for the answer


def test_readme_introduces_every_operator_command() -> None:
    from mltasks.cli import build_parser

    body = flat(README)
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("bridge", "worker", "beat", "dev", "status", "flower", "db", "bench"):
        assert name in commands, name
        assert f"mltasks {name}" in body, f"README does not introduce mltasks {name}"


def test_readme_compose_needs_env_and_models_first() -> None:
    body = text(README)
    section = body[body.index("## Docker Compose") :]
    section = section[: section.index("\n## ", 5)]
    assert ".env" in section[: section.index("```")] and "models" in section[: section.index("```")]
    section = re.findall(r"```sh\n(.*?)```", section, flags=re.S)[0]
    steps = [
        "cp deploy/compose.env.example .env",
        "docker compose --profile demo run --rm models-init",
        "docker compose up",
    ]
    where = [section.find(step) for step in steps]
    assert -1 not in where and where == sorted(where), dict(zip(steps, where, strict=True))
    assert ".env" in text(REPO / ".gitignore").split()
    # ... and git ignores a real .env.
    run = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=REPO, capture_output=True, check=False
    )
    assert run.returncode == 0, "git does not ignore .env"


def test_readme_says_bench_flushes_its_redis_dbs() -> None:
    body = flat(README)
    section = body[body.index("## Benchmark") :]
    assert "flushes" in section and "dbs 9 and 10" in section
