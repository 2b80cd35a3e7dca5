"""The five fallback levels: routing, the shared state, every way down and every way
back up, on real Redis and real worker processes, driven by injected probe readings."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import redis

from mltasks import keys
from mltasks.broker.celery_app import CANARY_TASK
from mltasks.config import Config
from mltasks.fallback import recovery
from mltasks.fallback.ladder import QUEUES, route
from mltasks.fallback.levels import LevelStore
from mltasks.fallback.probes import Readings
from mltasks.fallback.registry import WorkerRegistry
from mltasks.serving.monitor import Monitor
from tests import game
from tests.conftest import wait_for
from tests.game import TOKEN, claim
from tests.world import World

STATE = [0.8, 0.5] + [0.0] * 62


_rng = np.random.default_rng(2024)


def fresh_states(n: int) -> np.ndarray:
    """States no earlier request used, so no cache layer can answer them."""
    from mltasks.state import sample_states

    return sample_states(_rng, n)


def readings(**kw: Any) -> Readings:
    base: dict[str, Any] = dict(
        gpu_present=True,
        vram_used_bytes=1 << 30,
        vram_total_bytes=8 << 30,
        cpu_load_per_core=0.5,
        ram_used_fraction=0.3,
        queue_lag_s=None,
        taken_at=time.time(),
        gpu_status="ok",
    )
    base.update(kw)
    return Readings(**base)


@pytest.fixture
def store(config: Config) -> Iterator[LevelStore]:
    s = LevelStore(config)
    yield s
    s.redis.close()


@pytest.fixture
def world(config: Config, tmp_path: Path, models_dir: Path) -> Iterator[World]:
    with World(config, tmp_path, models_dir) as w:
        yield w


# -- routing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "live", "served"),
    [
        (1, {"gpu", "cpu", "rules"}, 1),
        (2, {"gpu", "cpu", "rules"}, 2),
        (1, {"cpu", "rules"}, 3),  # no GPU worker: straight to the CPU tier
        (2, {"rules"}, 4),
        (3, {"gpu", "rules"}, 4),  # never climbs above the shared level
        (4, {"gpu", "cpu"}, 5),
        (1, set(), 5),
        (5, {"gpu", "cpu", "rules"}, 5),
    ],
)
def test_route_skips_tiers_without_a_consumer(level: int, live: set[str], served: int) -> None:
    assert route(level, {q: q in live for q in QUEUES}) == served


# -- shared state -----------------------------------------------------------------------


def test_level_starts_at_the_configured_level_and_moves_once_per_failure(
    store: LevelStore,
) -> None:
    assert store.read().level == 1
    assert store.degrade(2, "VRAM", from_level=1)
    assert not store.degrade(2, "VRAM", from_level=1)  # a second reporter: no double step
    assert not store.degrade(3, "late", from_level=1)  # the level has moved on since
    state = store.read()
    assert (state.level, state.reason) == (2, "VRAM")
    assert not store.lift(1, expected=3, reason="stale")
    assert store.lift(1, expected=2, reason="recovered")
    assert store.read().level == 1
    assert store.redis.ttl(keys.LEVEL) > 0


def test_n_consecutive_failures_degrade_one_level(config: Config, store: LevelStore) -> None:
    store.set(3, "test")
    n = config.fallback.failure_threshold
    for _ in range(n - 1):
        assert not store.report_failure(3, "boom")
    store.report_success(3)  # a success breaks the run
    for _ in range(n - 1):
        assert not store.report_failure(3, "boom")
    assert store.read().level == 3
    assert store.report_failure(3, "boom")
    assert store.read().level == 4


def test_unreadable_redis_keeps_the_last_known_level(config: Config, store: LevelStore) -> None:
    store.set(4, "test")
    assert store.read().level == 4
    dead = LevelStore(config, redis.Redis(port=1, socket_connect_timeout=0.2))
    dead.last = store.read()
    assert dead.read().level == 4


# -- probes (injected readings) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("queues", "start", "probe", "after", "others"),
    [
        ("gpu", 1, readings(vram_used_bytes=int(7.8 * (1 << 30))), 2, ()),  # VRAM above 95%
        ("gpu", 2, readings(gpu_present=False, vram_used_bytes=None, vram_total_bytes=None), 3, ()),
        ("gpu", 1, readings(gpu_present=False, vram_used_bytes=None, vram_total_bytes=None), 3, ()),
        ("cpu", 3, readings(cpu_load_per_core=9.0), 4, ()),
        ("cpu", 3, readings(queue_lag_s=0.5), 4, ()),
        # a GPU worker serves level 2: the CPU tier's load is not the service's
        ("cpu", 2, readings(cpu_load_per_core=9.0), 2, ("gpu",)),
        ("gpu", 1, readings(), 1, ()),
        # no GPU worker: the CPU tier serves although the shared level reads 1 or 2
        ("cpu", 1, readings(cpu_load_per_core=9.0), 4, ("rules",)),
        ("cpu", 2, readings(queue_lag_s=0.5), 4, ()),
        ("cpu", 1, readings(), 1, ()),
    ],
)
def test_probe_readings_move_the_level_down(
    config: Config,
    store: LevelStore,
    queues: str,
    start: int,
    probe: Readings,
    after: int,
    others: tuple[str, ...],
) -> None:
    store.set(start, "test")
    for q in others:
        WorkerRegistry(store.redis).beat([q], 10_000)
    Monitor(config, [queues], store).evaluate(probe)
    assert store.read().level == after


def test_without_a_gpu_worker_failed_batches_degrade_from_the_level_that_serves(
    config: Config, store: LevelStore
) -> None:
    # Nothing ever set the shared level: it reads the start level, 1, while cpu serves.
    assert store.read().level == 1
    WorkerRegistry(store.redis).beat(["cpu", "rules"], 10_000)
    n = config.fallback.failure_threshold
    assert not any(store.report_failure(3, "boom") for _ in range(n - 1))
    assert store.report_failure(3, "boom")
    assert store.read().level == 4
    # ... but not while a GPU worker serves above: a late CPU batch moves nothing.
    store.set(1, "test")
    WorkerRegistry(store.redis).beat(["gpu"], 10_000)
    assert not any(store.report_failure(3, "boom") for _ in range(n))
    assert not store.degrade(5, "no usable model", from_level=3)
    assert store.read().level == 1


def test_without_a_gpu_worker_no_usable_model_means_level_5(
    config: Config, store: LevelStore
) -> None:
    WorkerRegistry(store.redis).beat(["cpu"], 10_000)
    assert store.degrade(5, "no usable model", from_level=3)
    assert store.read().level == 5


def test_healthy_probes_start_the_hysteresis_clock_and_bad_ones_reset_it(
    config: Config, store: LevelStore
) -> None:
    mon = Monitor(config, ["gpu", "cpu"], store)
    mon.evaluate(readings())
    since = {lv: store.redis.get(keys.healthy_since(lv)) for lv in (1, 2, 3)}
    assert all(since.values())
    mon.evaluate(readings())
    assert store.redis.get(keys.healthy_since(1)) == since[1]  # unbroken: unchanged
    mon.evaluate(readings(vram_used_bytes=8 << 30))
    assert store.redis.get(keys.healthy_since(1)) is None
    assert store.redis.get(keys.healthy_since(2)) == since[2]
    assert store.redis.ttl(keys.probes("gpu")) > 0


# -- failures reported by batches ----------------------------------------------------------


def test_rule_failures_take_the_service_to_level_5(
    config: Config, store: LevelStore, pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mltasks.fallback import policy
    from mltasks.serving.batch import infer_batch

    def broken(states: np.ndarray, archetype: str) -> np.ndarray:
        raise RuntimeError("rule policy bug")

    monkeypatch.setattr(policy, "logits", broken)
    store.set(4, "test")
    for _i in range(config.fallback.failure_threshold):
        rid = game.insert(pg, STATE)
        claim(pg, rid)
        infer_batch.apply(args=[[[rid, "tank", 1002, STATE]], 4, 0.0, None, TOKEN]).get()
        assert game.poll(pg, rid) == (255, 0.0)  # still answered, never stranded
    assert store.read().level == 5


def test_out_of_memory_degrades_at_once(
    config: Config,
    store: LevelStore,
    pg: psycopg.Connection[Any],
    models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mltasks.errors import ModelError
    from mltasks.models.engine import get_engine
    from mltasks.models.loaded import LoadedModel
    from mltasks.serving.batch import infer_batch

    get_engine(config, 3)  # loaded (and checked) before the allocator starts failing

    def oom(self: LoadedModel, states: np.ndarray, windows: np.ndarray | None = None) -> Any:
        raise ModelError(f"{self.name}: Failed to allocate memory for requested buffer")

    monkeypatch.setattr(LoadedModel, "run", oom)
    store.set(3, "test")
    rid = game.insert(pg, STATE)
    claim(pg, rid)
    infer_batch.apply(args=[[[rid, "tank", 1002, STATE]], 3, 0.0, None, TOKEN]).get()
    assert game.poll(pg, rid) == (255, 0.0)
    state = store.read()
    assert (state.level, state.reason) == (4, "out of memory")


def test_no_usable_model_at_all_means_level_5(
    config: Config, store: LevelStore, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    from mltasks.serving.batch import infer_batch
    from tests.conftest import use_config

    use_config(dataclasses.replace(config, models=dataclasses.replace(config.models, dir=tmp_path)))
    store.set(3, "test")
    rid = game.insert(pg, STATE)
    claim(pg, rid)
    infer_batch.apply(args=[[[rid, "mage", 1002, STATE]], 3, 0.0, None, TOKEN]).get()
    assert store.read().level == 5


# -- levels end to end -------------------------------------------------------------------


def answered(pg: psycopg.Connection[Any], rids: list[int]) -> bool:
    row = pg.execute(
        "SELECT count(*) FROM ai_responses WHERE request_id = ANY(%s)", (rids,)
    ).fetchone()
    return row is not None and row[0] == len(rids)


def sources(pg: psycopg.Connection[Any], rids: list[int]) -> dict[int, tuple[str, str | None]]:
    rows = pg.execute(
        "SELECT request_id, source, reason FROM ai_responses WHERE request_id = ANY(%s)", (rids,)
    ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_level_5_is_answered_with_no_worker_at_all(
    world: World, pg: psycopg.Connection[Any]
) -> None:
    with world.bridge() as b:
        rids = [game.insert(pg, STATE) for _ in range(5)]
        wait_for(lambda: answered(pg, rids), 10, "255 answers from the bridge")
        assert b.bridge.level == 5
    assert set(sources(pg, rids).values()) == {("bridge", "fallback_level_5")}
    assert all(game.poll(pg, r) == (255, 0.0) for r in rids)


def test_level_3_serves_without_a_gpu_worker(world: World, pg: psycopg.Connection[Any]) -> None:
    world.start_worker("cpu")
    assert world.store.read().level == 1  # the shared level says GPU ...
    with world.bridge() as b:
        rids = [game.insert(pg, s.tolist(), archetype="ranged") for s in fresh_states(5)]
        wait_for(lambda: answered(pg, rids), 20, "answers from the cpu worker")
        assert b.bridge.level == 3  # ... but nobody consumes `gpu`
    assert {s for s, _ in sources(pg, rids).values()} == {"model"}


def test_level_4_rules_worker_answers(world: World, pg: psycopg.Connection[Any]) -> None:
    world.start_worker("rules")
    world.store.set(4, "test")
    with world.bridge():
        rids = [game.insert(pg, STATE, archetype=a) for a in ("tank", "mage", "support")]
        wait_for(lambda: answered(pg, rids), 20, "answers from the rules worker")
    assert {s for s, _ in sources(pg, rids).values()} == {"rules"}
    assert all(0 <= (game.poll(pg, r) or (255, 0))[0] <= 9 for r in rids)


def test_killing_the_only_cpu_worker_moves_traffic_down_and_back(
    world: World, config: Config
) -> None:
    cpu = world.start_worker("cpu")
    world.start_worker("rules")
    with world.bridge() as b, psycopg.connect(config.database.conninfo, autocommit=True) as pg:

        def decide_until(cond: Any, what: str, limit: float = 20) -> list[int]:
            rids: list[int] = []
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                state = fresh_states(1)[0].tolist()  # never a cache hit: the tier answers
                rid, _ = game.decide(pg, state, timeout_ms=3000, archetype="tank")
                rids.append(rid)
                if cond():
                    return rids
            raise AssertionError(f"timed out waiting for {what}")

        before = decide_until(lambda: True, "a first answer")
        assert b.bridge.level == 3
        world.kill(cpu)
        killed_at = time.monotonic()
        during = decide_until(lambda: b.bridge.level == 4, "traffic to move to the rules tier")
        moved_after = time.monotonic() - killed_at
        later = decide_until(lambda: True, "a rules answer")
        world.start_worker("cpu")
        after = decide_until(lambda: b.bridge.level == 3, "traffic to come back to the cpu tier")
        back = decide_until(lambda: True, "a cpu answer")
        everything = before + during + later + after + back
        wait_for(lambda: answered(pg, everything), 20, "every request answered")
        got = sources(pg, everything)
    assert moved_after < 2.0, f"traffic moved after {moved_after:.2f}s"
    assert got[later[-1]][0] == "rules"
    assert got[back[-1]][0] == "model"
    assert got[before[0]][0] == "model"
    # Exactly one answer each, none lost; those caught in the dead worker got 255.
    assert len(got) == len(set(everything))


# -- recovery ---------------------------------------------------------------------------


def send_via(world: World) -> recovery.SendCanary:
    def send(canary_id: str, level: int, queue: str) -> None:
        world.app.send_task(CANARY_TASK, args=[canary_id, level], queue=queue)

    return send


@pytest.mark.parametrize(("queue", "start"), [("rules", 5), ("cpu", 4), ("gpu", 3), ("gpu", 2)])
def test_recovery_climbs_one_level_after_a_canary(world: World, queue: str, start: int) -> None:
    world.start_worker(queue)
    world.store.set(start, "test")
    target = start - 1
    wait_for(lambda: world.redis.exists(keys.healthy_since(target)), 10, "healthy probes")
    result = recovery.attempt(world.cfg, world.store, send_via(world))
    assert (result.outcome, result.target) == ("canary_sent", target)
    wait_for(lambda: world.store.read().level == target, 20, f"level {target}")
    assert world.store.read().reason.startswith("recovered")
    assert world.redis.get(keys.canary(result.canary_id or "")) == b"ok"


def test_failed_canary_backs_off_and_doubles(
    world: World, tmp_path: Path, models_dir: Path
) -> None:
    import shutil

    # Alive and healthy, but with one archetype's model only: canaries get 255s. (With no
    # model at all it would not beat: a worker that cannot answer does not look healthy.)
    few = tmp_path / "few-models"
    (few / "tank").mkdir(parents=True)
    name = "combat_dqn_fp16.onnx"  # as the exporter names it
    shutil.copy(models_dir / "tank" / name, few / "tank" / name)
    world.start_worker("cpu", models_dir=few)
    world.store.set(4, "test")
    send = send_via(world)
    assert recovery.attempt(world.cfg, world.store, send).outcome == "canary_sent"
    wait_for(lambda: world.redis.exists(keys.RECOVERY_BACKOFF), 20, "the back-off")
    assert world.store.read().level == 4
    assert recovery.attempt(world.cfg, world.store, send).outcome == "backing_off"
    first = float(world.redis.get(keys.RECOVERY_BACKOFF_S) or 0)
    wait_for(lambda: not world.redis.exists(keys.RECOVERY_BACKOFF), 10, "the back-off to end")
    assert recovery.attempt(world.cfg, world.store, send).outcome == "canary_sent"
    wait_for(lambda: world.redis.exists(keys.RECOVERY_BACKOFF), 20, "the second back-off")
    assert float(world.redis.get(keys.RECOVERY_BACKOFF_S) or 0) == 2 * first


def test_recovery_waits_for_a_consumer_hysteresis_and_a_lost_canary(world: World) -> None:
    world.store.set(4, "test")
    send = send_via(world)
    assert recovery.attempt(world.cfg, world.store, send).outcome == "no_consumer"
    world.start_worker("cpu")
    wait_for(lambda: world.redis.exists(keys.healthy_since(3)), 10, "healthy probes")
    strict = dataclasses.replace(
        world.cfg, fallback=dataclasses.replace(world.cfg.fallback, recovery_hysteresis_s=60)
    )
    assert recovery.attempt(strict, world.store, send).outcome == "not_healthy_long_enough"
    lost = recovery.attempt(world.cfg, world.store, lambda *_: None)  # the canary never arrives
    assert lost.outcome == "canary_sent"
    assert recovery.attempt(world.cfg, world.store, send).outcome == "canary_pending"
    later = time.time() + world.cfg.fallback.canary_timeout_s + 1
    assert recovery.attempt(world.cfg, world.store, send, now=later).outcome == "canary_lost"
    assert world.redis.exists(keys.RECOVERY_BACKOFF)
    assert world.store.read().level == 4


def test_at_the_best_level_there_is_nothing_to_recover(world: World) -> None:
    assert recovery.attempt(world.cfg, world.store, send_via(world)).outcome == "at_best"


def test_a_live_gpu_worker_steps_down_on_its_probes(world: World) -> None:
    world.start_worker("gpu")
    assert world.store.read().level == 1
    world.set_probes(vram_used_bytes=int(7.9 * (1 << 30)))
    wait_for(lambda: world.store.read().level == 2, 10, "level 2 on VRAM pressure")
    assert world.store.read().reason.startswith("VRAM")
    world.set_probes(gpu_present=False, vram_used_bytes=None, vram_total_bytes=None)
    wait_for(lambda: world.store.read().level == 3, 10, "level 3 once the GPU is gone")
    assert "GPU missing" in world.store.read().reason


def test_the_registry_counts_each_live_worker_once_across_its_queues(store: LevelStore) -> None:
    registry = WorkerRegistry(store.redis)
    registry.beat(["cpu", "rules"], 10_000, member="host:1")
    registry.beat(["cpu"], 10_000, member="host:2")
    store.redis.zadd(keys.workers("cpu"), {"host:3": time.time() - 60})  # beat a minute ago
    assert registry.live(["gpu", "cpu", "rules"], 5) == {"host:1", "host:2"}
    assert registry.live(["cpu"], 120) == {"host:1", "host:2", "host:3"}
    assert registry.live(["gpu"], 5) == set()
