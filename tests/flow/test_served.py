"""Each worker process's versions, for `mltasks status` (issue 27): published by the
process, pruned when it is gone, shown per worker with a mark while it has not swapped."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from mltasks.config import Config
from mltasks.models import served
from mltasks.models.engine import Engine
from mltasks.ops.status_render import served_rows
from mltasks.ops.status_snapshot import Reach, Status


def test_a_process_publishes_its_versions_and_is_dropped_when_gone(
    config: Config, models_dir: Path, redis_cache: Any
) -> None:
    cfg = dataclasses.replace(config, models=dataclasses.replace(config.models, dir=models_dir))
    engine = Engine(cfg, 3).load()
    served.publish(engine, redis_cache)
    (doc,) = served.read(redis_cache)
    assert doc["level"] == 3 and doc["worker"].endswith(f":{os.getpid()}")
    m = engine.models[("aggressive", "combat_dqn")]
    assert doc["versions"]["aggressive/combat_dqn"] == m.version and doc["candidates"] == {}
    served.prune(redis_cache, {os.getpid()})  # alive: kept
    assert len(served.read(redis_cache)) == 1
    served.prune(redis_cache, set())  # this host's process is gone: dropped
    assert served.read(redis_cache) == []


def test_status_shows_each_worker_and_which_has_not_swapped() -> None:
    status = Status(time.time(), Reach("pg", True), Reach("redis", True))
    status.versions = [{"model": "tank/combat_dqn", "active": {"version": "bbbbbbbbbbbb"}}]
    status.served = [
        {"worker": "h:1", "level": 3, "versions": {"tank/combat_dqn": "bbbbbbbbbbbb"}},
        {
            "worker": "h:2",
            "level": 3,
            "versions": {"tank/combat_dqn": "aaaaaaaaaaaa", "tank/skill_dqn": "cccccccccccc"},
            "candidates": {"tank/combat_dqn": "bbbbbbbbbbbb"},
        },
    ]
    rows = served_rows(status)
    assert rows[0] == ("worker h:1 level 3", "tank/combat_dqn@bbbbbbbbbbbb", "-")
    assert rows[1][1] == ("tank/combat_dqn@aaaaaaaaaaaa (shadows bbbbbbbbbbbb) (not swapped yet)")
    assert "served" in status.to_dict()
