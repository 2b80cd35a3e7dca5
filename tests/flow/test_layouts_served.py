"""The game's situations, written in each state layout, answered by a deployed tier.

Real parts: a bridge, a real Celery worker process (`-Q rules` or `-Q cpu` with freshly
written demo models), the game's statements. The three situations of issue "read the state
as the game's encoder writes it": FLEE at 10% HP next to the target, ATTACK at full HP,
neither without a target.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mltasks.config import Config
from mltasks.contract import Action
from mltasks.models.demo import write_demo_models
from mltasks.state import LAYOUT_NAMES, get_layout
from tests import game
from tests.conftest import wait_for
from tests.world import World


@pytest.fixture(params=LAYOUT_NAMES)
def world(
    request: pytest.FixtureRequest, config: Config, tmp_path: Path, models_dir: Path
) -> Iterator[World]:
    with World(config, tmp_path, models_dir, layout=request.param) as w:
        yield w


def situations(layout: str) -> list[list[float]]:
    lay = get_layout(layout)
    return [
        lay.state("aggressive", hp=0.1, target_distance=0.05).tolist(),
        lay.state("aggressive", hp=1.0, target_distance=0.05).tolist(),
        lay.state("aggressive", hp=1.0).tolist(),
    ]


def answered(pg: psycopg.Connection[Any], rids: list[int]) -> dict[int, tuple[int, str]]:
    rows = pg.execute(
        "SELECT request_id, action_id, source FROM ai_responses WHERE request_id = ANY(%s)",
        (rids,),
    ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def ask(world: World, pg: psycopg.Connection[Any], source: str) -> list[Action]:
    layout = world.cfg.state.layout
    with world.bridge():
        rids = [game.insert(pg, s, archetype="aggressive") for s in situations(layout)]
        wait_for(lambda: len(answered(pg, rids)) == len(rids), 30, f"{source} answers")
    got = answered(pg, rids)
    assert {s for _, s in got.values()} == {source}
    return [Action(got[r][0]) for r in rids]


def test_rules_tier(world: World, pg: psycopg.Connection[Any]) -> None:
    world.start_worker("rules")
    world.store.set(4, "test")
    flee, attack, alone = ask(world, pg, "rules")
    assert (flee, attack) == (Action.FLEE, Action.ATTACK)
    assert alone not in (Action.FLEE, Action.ATTACK)


def test_model_tier(world: World, pg: psycopg.Connection[Any], tmp_path: Path) -> None:
    models = tmp_path / "fresh-models"
    write_demo_models(models, archetypes=["aggressive"], layout=world.cfg.state.layout)
    world.start_worker("cpu", models_dir=models)
    flee, attack, alone = ask(world, pg, "model")
    assert (flee, attack) == (Action.FLEE, Action.ATTACK)
    assert alone not in (Action.FLEE, Action.ATTACK)
