"""The ``mltasks bench`` options several commands share, and their argument types."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mltasks.bench.database import DEFAULT_BENCH_URL
from mltasks.bench.service import LEVELS, POOLS, Pool, default_pool
from mltasks.bench.vary import Vary
from mltasks.state import DEFAULT_LAYOUT, LAYOUT_NAMES

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"


def counts_arg(text: str) -> list[int]:
    """``1,8,32``: positive counts."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,8,32, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("the numbers must be positive")
    return counts


def rates_arg(text: str) -> list[float]:
    """``500,1000``: positive rates."""
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rates like 500,1000, got {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive")
    return rates


FLOORS = ("plain", "model", "broker", "plumbing")
FLOOR_HELP = (
    "also run floors, alternating with the service: plain (a fixed answer in one "
    "statement; the default), model (the same models and fusion in one process, no "
    "broker), broker (a minimal bridge, Celery through the same Redis, 2 solo workers, "
    "a tiny model), plumbing (the service itself, its workers answering with the broker "
    "floor's tiny model: no models, fusion or cache); several as plain,broker; both: "
    "plain,model"
)


def floors_arg(text: str) -> tuple[str, ...]:
    """``plain``, ``model``, ``broker``, several as ``plain,broker``; ``both`` is
    ``plain,model`` (its meaning before the broker floor)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    out: list[str] = []
    for name in names:
        for floor in ("plain", "model") if name == "both" else (name,):
            if floor not in FLOORS:
                raise argparse.ArgumentTypeError(
                    f"a floor is one of {', '.join(FLOORS)} or both, got {name!r}"
                )
            if floor not in out:
                out.append(floor)
    if not out:
        raise argparse.ArgumentTypeError("name at least one floor")
    return tuple(out)


def floor_option(p: argparse.ArgumentParser) -> None:
    """``--floor [KINDS]`` of gateway and bulk."""
    p.add_argument(
        "--floor", nargs="?", type=floors_arg, const=("plain",), default=(), help=FLOOR_HELP
    )


def _level(text: str) -> int:
    levels = _levels(text)
    if len(levels) != 1:
        raise argparse.ArgumentTypeError(f"one level, got {text!r}")
    return levels[0]


def _levels(text: str) -> list[int]:
    levels = counts_arg(text)
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise argparse.ArgumentTypeError(f"levels must be among {LEVELS}, got {bad}")
    return levels


def _pool(text: str) -> Pool:
    for pool in POOLS:
        if text == pool:
            return pool
    raise argparse.ArgumentTypeError(f"a pool is one of {POOLS}, got {text!r}")


def _pools(text: str) -> list[Pool]:
    return [_pool(x.strip()) for x in text.split(",") if x.strip()]


def common_options(p: argparse.ArgumentParser) -> None:
    """Where a run reports, and the database, Redis and layout it uses."""
    where_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layout",
        choices=LAYOUT_NAMES,
        default=DEFAULT_LAYOUT,
        help="state layout the emulated game sends and the service reads (default: %(default)s)",
    )


def where_options(p: argparse.ArgumentParser) -> None:
    """Where a run reports, its models, and the database and Redis it uses."""
    p.add_argument("--out", type=Path, help="report directory (default bench-results/<time>)")
    p.add_argument("--models-dir", type=Path, help="demo models are written here if missing")
    p.add_argument(
        "--database-url",
        default=DEFAULT_BENCH_URL,
        help="benchmark database (dropped and recreated; its name must say bench)",
    )
    p.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="Redis server; every run flushes (empties) its db 9 (broker) and 10 (cache): "
        "never the game's Redis",
    )


def game_options(p: argparse.ArgumentParser, *, timeout_ms: int) -> None:
    """The emulated map servers of the service-wide runs (chaos, shadow)."""
    p.add_argument("--clients", type=int, default=4, help="emulated map servers")
    p.add_argument(
        "--timeout-ms",
        type=int,
        default=timeout_ms,
        help="the game's timeout (ml_max_latency_ms), the bridge's deadline",
    )


def _key_and_value(text: str, expected: str) -> tuple[str, str, str]:
    """``section.key=rest`` -> (section, key, rest); else one line naming ``text``."""
    name, sep, value = text.partition("=")
    section, dot, key = name.partition(".")
    if not (sep and dot and section and key):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    return section, key, value


def _yaml_value(text: str, whole: str) -> Any:
    """A value as YAML reads it (``false``, ``2``, ``{a: 1}``); a malformed one is an
    argument error naming the option's text, not a traceback."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise argparse.ArgumentTypeError(f"{whole!r}: {text!r} is not YAML ({problem})") from None


def _override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, the value as YAML reads it)."""
    section, key, value = _key_and_value(text, "SECTION.KEY=VALUE")
    return section, key, _yaml_value(value, text)


def vary_arg(text: str) -> Vary:
    """``section.key=v1,v2[,...]``: one key, two distinct values or more, each read as
    ``--set`` reads its value (so a value cannot hold a comma)."""
    expected = "SECTION.KEY=V1,V2[,...]"
    section, key, rest = _key_and_value(text, expected)
    texts = [t.strip() for t in rest.split(",")]
    if len(texts) < 2 or not all(texts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected} (two values or more)")
    values = [_yaml_value(t, text) for t in texts]
    for i, v in enumerate(values):
        if any(v == w and type(v) is type(w) for w in values[:i]):
            raise argparse.ArgumentTypeError(f"{text!r}: {texts[i]!r} is given twice")
    return Vary(section, key, tuple(values), tuple(texts))


def rounds_arg(text: str) -> int:
    """``--rounds``: a positive number."""
    try:
        rounds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of rounds, got {text!r}") from None
    if rounds < 1:
        raise argparse.ArgumentTypeError(f"rounds must be at least 1, got {rounds}")
    return rounds


def vary_options(p: argparse.ArgumentParser) -> None:
    """``--vary`` and ``--rounds`` of gateway: service variants compared in one run."""
    p.add_argument(
        "--vary",
        type=vary_arg,
        default=None,
        metavar="SECTION.KEY=V1,V2[,...]",
        help="run the service once per value of one config key (YAML values, as --set's; "
        "on top of --set), each a responder of its own named 'service SECTION.KEY=VALUE'; "
        "the report compares them, e.g. experience.enabled=false,true",
    )
    p.add_argument(
        "--rounds",
        type=rounds_arg,
        default=1,
        help="at each client count, run the responders (floors, variants) this often, "
        "alternating; the variants' order is reversed every other round, since the first "
        "run of a pair is often the faster (default: %(default)s)",
    )


def service_options(p: argparse.ArgumentParser, *, level_list: bool) -> None:
    """How the service under test is deployed (one value, or a list to compare)."""
    g = p.add_argument_group("service configuration")
    g.add_argument(
        "--pool",
        type=_pools if level_list else _pool,
        default=[default_pool()] if level_list else default_pool(),
        help=f"Celery worker pool, one of {', '.join(POOLS)} (default: solo, "
        "one solo worker per --concurrency)" + (", several as solo,prefork" if level_list else ""),
    )
    g.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="worker pool size; with --pool solo, the number of solo worker processes",
    )
    g.add_argument(
        "--cache",
        choices=("on", "off"),
        default="on",
        help="caching.enabled of the service",
    )
    g.add_argument(
        "--level",
        type=_levels if level_list else _level,
        default=[None] if level_list else None,
        help="fallback level forced and held: 3 cpu worker, 4 '-Q rules' worker, 5 bridge "
        "only (answers 255)" + (", several as 3,4,5" if level_list else "") + "; default: "
        "none forced, the service as deployed (its probes may move the level)",
    )
    g.add_argument(
        "--set",
        dest="overrides",
        type=_override,
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="one more key of the service's config (YAML value), e.g. "
        "inference.max_waiting_batches=2; repeatable",
    )
    g.add_argument(
        "--degrade",
        action="store_true",
        help="with --level: still let the probes and failure counters move the level",
    )


def bulk_options(p: argparse.ArgumentParser) -> None:
    """The open-loop load of ``bulk`` and ``cache``, and when a step holds."""
    p.add_argument(
        "--mobs",
        type=int,
        default=1,
        help="with --states: mob ids per state, one drawn per request (L2 keys on the mob, "
        "L3 on the archetype)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per step")
    p.add_argument("--tick-ms", type=float, default=5.0, help="one COPY batch per tick")
    p.add_argument(
        "--timeout-ms", type=int, default=100, help="the bridge's deadline (the game's timeout)"
    )
    p.add_argument("--p99-ms", type=float, default=50.0, help="a step holds with p99 within")
    p.add_argument("--min-answered", type=float, default=0.99, help="... and this share answered")
    p.add_argument(
        "--drain-s", type=float, default=20.0, help="wait at most this for the last answers"
    )
