"""The fallback ladder is one table (mltasks.fallback.ladder): everyone reads it, the
configuration's defaults and keys agree with it."""

from __future__ import annotations

from beat.schedule import SCHEDULE
from mltasks.broker.celery_app import QUEUES, settings_for
from mltasks.config import Config
from mltasks.fallback import probes
from mltasks.fallback.ladder import (
    BEST,
    JOBS_QUEUE,
    LADDER,
    LEVEL_QUEUE,
    MODEL_LEVELS,
    MODEL_QUEUES,
    PRECISIONS,
    QUEUE_LEVELS,
    Level,
    rung,
)
from mltasks.ops import status, status_render, status_snapshot


def test_the_ladder_has_five_levels_in_order() -> None:
    assert [r.level for r in LADDER] == list(Level) == [1, 2, 3, 4, 5]
    assert BEST == Level.GPU_FP16 and MODEL_LEVELS == (1, 2, 3)
    assert [r.tier for r in LADDER] == ["gpu", "gpu", "cpu", "rules", "none"]
    assert LEVEL_QUEUE == {1: "gpu", 2: "gpu", 3: "cpu", 4: "rules"}
    assert QUEUE_LEVELS == {"gpu": (1, 2), "cpu": (3,), "rules": (4,)}
    assert MODEL_QUEUES == ("gpu", "cpu") and JOBS_QUEUE == "cpu"
    assert [r.label for r in LADDER] == [
        "GPU FP16",
        "GPU INT8",
        "CPU",
        "rules",
        "traditional AI (255)",
    ]
    assert PRECISIONS == ("fp32", "fp16", "int8")
    assert rung(Level.TRADITIONAL).queue is None  # the bridge answers 255 itself


def test_every_reader_takes_its_levels_from_the_ladder() -> None:
    assert QUEUES == ("gpu", "cpu", "rules")
    assert probes.TIERS == ("gpu_fp16", "gpu_int8", "cpu")
    declared = [q.name for q in settings_for(Config())["task_queues"]]
    assert declared == list(QUEUES)


def test_configuration_defaults_and_keys_are_the_ladders() -> None:
    cfg = Config()
    for level in MODEL_LEVELS:
        r = rung(level)
        assert r.profile_key == f"fallback.level{level}"
        assert r.fusion_key == f"models.fusion.level{level}"
        assert getattr(cfg.fallback, r.profile_key.split(".")[-1]) == r.default_profile
        assert cfg.fallback.level_profile(level) == (r.provider, r.precision)
        fusion = getattr(cfg.models.fusion, r.fusion_key.split(".")[-1])
        assert dict(cfg.models.fusion.for_level(level)) == dict(fusion)
    for level in (Level.RULES, Level.TRADITIONAL):
        assert rung(level).profile_key is None and rung(level).fusion_key is None


def test_status_and_beat_read_the_ladder() -> None:
    assert {r.level: r.label for r in LADDER} == status_snapshot.LEVEL_NAMES
    assert status_render.TIERS == (
        ("levels 1-2 GPU", "gpu", (1, 2)),
        ("level 3 CPU", "cpu", (3,)),
        ("level 4 rules", "rules", (4,)),
    )
    assert status_render.BRIDGE_TIER == "level 5 255"
    assert {job["options"]["queue"] for job in SCHEDULE.values()} == {JOBS_QUEUE}
    live = dict.fromkeys(QUEUES, True)
    assert status.best_reachable(live, gpu_present=True) == Level.GPU_FP16
    assert status.best_reachable(live, gpu_present=False) == Level.CPU
    assert status.best_reachable({"gpu": True}, gpu_present=False) == Level.CPU
    assert status.best_reachable({"rules": True}, gpu_present=None) == Level.RULES
    assert status.best_reachable({}, gpu_present=True) == Level.TRADITIONAL
