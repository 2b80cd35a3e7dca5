"""L1 states are written only where a worker that reads them can exist
(`mltasks.serving.process.histories_read`): a level whose own fusion reads histories, or a
live worker of a tier whose fusion does. Real Redis, the in-process task."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from mltasks.config import Config, FusionConfig, set_config
from mltasks.keys import WORKING_MEMORY_PREFIX, heartbeat
from mltasks.serving import process
from tests import game
from tests.game import TOKEN, claim

STATE = [0.8, 0.5] + [0.0] * 62


def with_fusion(config: Config, **levels: Mapping[str, float]) -> Config:
    fusion = dataclasses.replace(config.models.fusion, **levels)  # type: ignore[arg-type]
    return dataclasses.replace(config, models=dataclasses.replace(config.models, fusion=fusion))


def test_the_queues_that_read_histories_follow_the_fusion(config: Config) -> None:
    assert process.history_queues(config) == {"gpu"}  # levels 1-2 hold the sequence types
    cpu_reads = with_fusion(config, level3={"combat_dqn": 1.0, "temporal_transformer": 1.0})
    assert process.history_queues(cpu_reads) == {"gpu", "cpu"}
    default = FusionConfig()
    nobody = with_fusion(config, level1=default.level3, level2=default.level3)
    assert process.history_queues(nobody) == frozenset()


def test_level_3_writes_states_only_while_a_reader_is_alive(
    config: Config, redis_cache: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "HISTORY_READERS_RECHECK_S", 0.0)
    assert not process.histories_read(config, 3)  # no GPU worker: nobody reads L1
    redis_cache.set(heartbeat("gpu"), "1", px=60_000)
    assert process.histories_read(config, 3)
    assert process.histories_read(config, 1)  # the GPU tier reads its own
    redis_cache.delete(heartbeat("gpu"))
    assert not process.histories_read(config, 3)
    cpu_reads = with_fusion(config, level3={"combat_dqn": 1.0, "temporal_transformer": 1.0})
    assert process.histories_read(cpu_reads, 3)  # its own fusion reads them


def test_the_last_look_is_kept_for_the_recheck_interval(
    config: Config, redis_cache: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "HISTORY_READERS_RECHECK_S", 60.0)
    assert not process.histories_read(config, 3)
    redis_cache.set(heartbeat("gpu"), "1", px=60_000)
    assert not process.histories_read(config, 3)  # not looked at again yet: one read a second
    process.close_pool()  # a new process state looks again
    assert process.histories_read(config, 3)


def test_in_doubt_the_states_are_written(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis away: write (the cache's own breaker then decides), never guess 'unread'."""
    monkeypatch.setattr(process, "HISTORY_READERS_RECHECK_S", 0.0)
    gone = dataclasses.replace(
        config, redis=dataclasses.replace(config.redis, url="redis://127.0.0.1:1/0")
    )
    set_config(gone)
    process.close_pool()
    assert process.histories_read(gone, 3)


def test_a_level_3_batch_pushes_its_state_only_for_a_live_reader(
    config: Config, pg: psycopg.Connection[Any], redis_cache: redis.Redis, models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from mltasks.serving.batch import infer_batch

    monkeypatch.setattr(process, "HISTORY_READERS_RECHECK_S", 0.0)

    def answer(monster: int) -> None:
        rid = game.insert(pg, STATE, archetype="tank")
        claim(pg, rid)
        row = [rid, "tank", 1002, STATE, monster]
        assert infer_batch.apply(args=[[row], 3, time.time(), None, TOKEN]).get() == 1
        got = pg.execute(
            "SELECT action_id, source FROM ai_responses WHERE request_id = %s", (rid,)
        ).fetchone()
        assert got is not None and got[0] != 255 and got[1] == "model"

    answer(7001)
    assert redis_cache.llen(f"{WORKING_MEMORY_PREFIX}7001") == 0
    redis_cache.set(heartbeat("gpu"), "1", px=60_000)
    answer(7002)
    assert redis_cache.llen(f"{WORKING_MEMORY_PREFIX}7002") == 1
