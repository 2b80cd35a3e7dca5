"""The Phase 11 family: discovery, placement, working memory, fusion, `models check`.

Model files are real ONNX (the demo writer's exporter form); Redis is the test server.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mltasks.cache.client import Cache
from mltasks.config import Config, load_config
from mltasks.contract import ARCHETYPES, MODEL_TYPES, N_ACTIONS, STATE_DIM, Action
from mltasks.errors import ConfigError
from mltasks.models.demo import write_corrupt_model, write_demo_models
from mltasks.models.discovery import find
from mltasks.models.engine import Engine
from mltasks.models.family import Scores
from mltasks.models.fusion import FusionRule, Member, fuse, fuse_groups
from mltasks.models.history import window
from mltasks.models.loaded import TypeOutput
from mltasks.serving.inference import answer_batch
from mltasks.state import ENCODER


def make_config(tmp_path: Path, text: str = "") -> Config:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path, environ={})


# -- discovery ---------------------------------------------------------------------------


def test_the_plain_onnx_wins_over_the_fp16_export(tmp_path: Path) -> None:
    write_demo_models(tmp_path, archetypes=["mage"])
    assert find(tmp_path, "mage", "combat_dqn").path.name == "combat_dqn_fp16.onnx"  # type: ignore[union-attr]
    write_demo_models(tmp_path, archetypes=["mage"], precision="fp32")
    found = find(tmp_path, "mage", "combat_dqn")
    assert found is not None
    assert (found.path.name, found.shadowed.name if found.shadowed else None) == (
        "combat_dqn.onnx",
        "combat_dqn_fp16.onnx",
    )
    assert find(tmp_path, "tank", "combat_dqn") is None


# -- the engine, both precisions -----------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_every_signature_kind_is_loaded_and_fed(
    tmp_path: Path, precision: str, models_dir: Path
) -> None:
    if precision == "fp16":
        root = models_dir
    else:
        root = tmp_path
        write_demo_models(root, archetypes=list(ARCHETYPES), precision="fp32")
    cfg = make_config(tmp_path, f"models:\n  dir: {root}\n  preload: all\n")
    engine = Engine(cfg, level=1).load()
    assert len(engine.models) == 54 and not engine.skipped
    # No GPU here: level 1 runs as the CPU level does, on INT8 variants (float32 I/O) built
    # from the master, or on the master itself where a variant was refused.
    stem = "_fp16" if precision == "fp16" else ""
    names = {m.path.name.removeprefix(m.model_type) for m in engine.models.values()}
    assert f"{stem}.int8.onnx" in names  # the variants, float32 in and out
    assert names <= {f"{stem}.int8.onnx", f"{stem}.onnx"}  # or a master whose variant failed
    for m in engine.models.values():
        assert m.precision == ("fp32" if m.path.name.endswith(".int8.onnx") else precision)
    x = ENCODER.sample(np.random.default_rng(0), 5, "ranged")
    kinds = set()
    for (archetype, _), model in engine.models.items():
        if archetype != "ranged":
            continue
        kinds.add(model.sig.input)
        out = model.run(x)
        assert out.rows() == 5 and out.finite().all()
    assert kinds == {"state", "sequence", "state_action"}
    members = [m.model_type for m, _ in engine.fusion("ranged")]
    assert members == list(MODEL_TYPES)  # level 1: all nine, in the family's order


def test_level3_engine_loads_its_fusion_set_only(models_dir: Path, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, f"models:\n  dir: {models_dir}\n")
    engine = Engine(cfg, level=3).load()
    loaded = {t for _, t in engine.models}
    assert loaded == set(cfg.models.fusion.level3)
    assert len(loaded) >= 2
    assert engine.loaded_types()["combat_dqn"] == len(ARCHETYPES)
    assert "pattern_recognition" not in engine.loaded_types()  # not served at level 3


# -- fusion --------------------------------------------------------------------------------


def _scores(action: int, margin: float = 4.0, n: int = 1) -> np.ndarray:
    z = np.zeros((n, N_ACTIONS), dtype=np.float32)
    z[:, action] = margin
    return z


def _member(t: str, w: float, out: TypeOutput, ok: list[bool] | None = None) -> Member:
    n = out.rows()
    return Member(t, w, "logits", out, np.array(ok if ok is not None else [True] * n))


def test_fusion_is_a_weighted_average_of_probabilities() -> None:
    a = _member("a", 3.0, TypeOutput(scores=_scores(1)))
    b = _member("b", 1.0, TypeOutput(scores=_scores(2)))
    fused = fuse([a, b], 1, FusionRule(threat_shift=0.0, value_shift=0.0))
    p1 = np.exp(4) / (np.exp(4) + 9)
    p_other = 1 / (np.exp(4) + 9)
    assert fused.probs[0, 1] == pytest.approx(0.75 * p1 + 0.25 * p_other, rel=1e-5)
    assert fused.probs[0, 2] == pytest.approx(0.25 * p1 + 0.75 * p_other, rel=1e-5)
    assert fused.probs.sum() == pytest.approx(1.0, rel=1e-5)
    assert fused.choice()[0].tolist() == [1]
    assert fused.used == [("a", "b")]


def test_a_missing_member_renormalises_the_weights() -> None:
    a = _member("a", 1.0, TypeOutput(scores=_scores(1, n=2)))
    b = _member("b", 5.0, TypeOutput(scores=_scores(2, n=2)), ok=[False, True])
    fused = fuse([a, b], 2, FusionRule(threat_shift=0.0, value_shift=0.0))
    alone = fuse([a], 2, FusionRule(threat_shift=0.0, value_shift=0.0))
    np.testing.assert_allclose(fused.probs[0], alone.probs[0], rtol=1e-6)  # b's weight gone
    assert fused.choice()[0].tolist() == [1, 2]
    assert fused.used == [("a",), ("a", "b")]


def test_q_values_go_through_the_temperature() -> None:
    q = Member("q", 1.0, "q_values", TypeOutput(scores=_scores(3, margin=2.0)), np.array([True]))
    cold = fuse([q], 1, FusionRule(q_temperature=0.5, threat_shift=0.0, value_shift=0.0))
    hot = fuse([q], 1, FusionRule(q_temperature=4.0, threat_shift=0.0, value_shift=0.0))
    assert cold.probs[0, 3] > hot.probs[0, 3] > 0.1


def test_high_threat_moves_mass_to_flee_and_move_away() -> None:
    actor = _member("a", 1.0, TypeOutput(scores=np.log(np.full((2, N_ACTIONS), 0.1))))
    danger = _member("t", 1.0, TypeOutput(threat=np.array([1.0, 0.4], dtype=np.float32)))
    fused = fuse([actor, danger], 2, FusionRule(threat_shift=0.5, value_shift=0.0))
    retreat = fused.probs[:, [Action.FLEE, Action.MOVE_AWAY]].sum(axis=1)
    assert retreat[0] == pytest.approx(0.2 * 0.5 + 0.5, rel=1e-4)  # half the mass moved
    assert retreat[1] == pytest.approx(0.2, rel=1e-4)  # threat below 0.5: nothing moves
    assert fused.probs.sum(axis=1) == pytest.approx([1.0, 1.0], rel=1e-5)
    assert fused.used == [("a", "t"), ("a", "t")]


def test_a_bad_state_value_also_leans_to_retreat() -> None:
    actor = _member("a", 1.0, TypeOutput(scores=_scores(1)))
    worse = _member("v", 1.0, TypeOutput(value=np.array([-20.0], dtype=np.float32)))
    fused = fuse([actor, worse], 1, FusionRule(threat_shift=0.0, value_shift=0.2))
    plain = fuse([actor], 1, FusionRule(threat_shift=0.0, value_shift=0.2))
    moved = fused.probs[0, [Action.FLEE, Action.MOVE_AWAY]].sum()
    before = plain.probs[0, [Action.FLEE, Action.MOVE_AWAY]].sum()
    assert moved == pytest.approx(0.8 * before + 0.2, rel=1e-3)


def test_threat_alone_answers_nothing() -> None:
    danger = _member("t", 1.0, TypeOutput(threat=np.array([0.9], dtype=np.float32)))
    assert not fuse([danger], 1, FusionRule()).answered[0]


def _random_group(rng: np.random.Generator, n: int, weights: list[float]) -> list[Member]:
    """Members of one archetype's fusion on n rows: an actor with logits, one with
    Q-values, a threat and a value head; rows missing at random, and NaN and infinities
    in rows that may not speak (as inference hands them over)."""

    def member(t: str, w: float, kind: Scores, scores: bool, value: bool, threat: bool) -> Member:
        out = TypeOutput(
            rng.normal(0, 3, (n, 10)).astype(np.float32) if scores else None,
            rng.normal(0, 3, n).astype(np.float32) if value else None,
            rng.random(n).astype(np.float32) if threat else None,
        )
        ok = rng.random(n) > 0.2
        for a in (out.scores, out.value, out.threat):
            if a is not None:
                a[~ok] = rng.choice([np.nan, np.inf, -np.inf, 0.0])
        return Member(t, w, kind, out, ok)

    return [
        member("combat_dqn", weights[0], "q_values", True, False, False),
        member("skill_dqn", weights[1], "logits", True, False, False),
        member("threat_assessment", weights[2], "logits", False, False, True),
        member("movement_ppo", 1.0, "logits", True, True, False),
    ]


@pytest.mark.parametrize("seed", range(20))
def test_fusing_archetypes_together_changes_no_bit(seed: int) -> None:
    """fuse_groups stacks the archetypes whose members line up into one call: each
    group's probabilities, answered rows and types are exactly one call's per group.
    Groups that do not line up (other weights, a member short) are fused apart."""
    rng = np.random.default_rng(seed)
    rule = FusionRule(q_temperature=float(rng.choice([0.5, 1.0, 2.0])))
    groups: list[tuple[list[Member], int]] = []
    for _ in range(int(rng.integers(2, 7))):
        n = int(rng.integers(1, 6))
        weights = [1.0, 0.5, 1.0] if rng.random() < 0.7 else [0.0, 2.0, 1.0]
        members = _random_group(rng, n, weights)
        if rng.random() < 0.2:
            members = members[:2]
        groups.append((members, n))
    together = fuse_groups(groups, rule)
    assert len(together) == len(groups)
    for (members, n), got in zip(groups, together, strict=True):
        alone = fuse(members, n, rule)
        assert got.probs.tobytes() == alone.probs.tobytes()
        assert got.answered.tolist() == alone.answered.tolist()
        assert got.used == alone.used


# -- working memory ------------------------------------------------------------------------


def test_a_short_history_is_front_padded_with_its_oldest_state() -> None:
    states = np.arange(4 * STATE_DIM, dtype=np.float32).reshape(4, STATE_DIM)
    w = window(states[3], states[:3])
    assert w.shape == (10, STATE_DIM)
    np.testing.assert_array_equal(w[:7], np.repeat(states[:1], 7, axis=0))  # 6 copies + itself
    np.testing.assert_array_equal(w[7:], states[1:4])
    alone = window(states[0], None)
    np.testing.assert_array_equal(alone, np.repeat(states[:1], 10, axis=0))
    full = window(states[0], np.repeat(states[1:2], 12, axis=0))
    np.testing.assert_array_equal(full[:9], np.repeat(states[1:2], 9, axis=0))


@pytest.fixture
def seq_engine(models_dir: Path, tmp_path: Path) -> Engine:
    """temporal_transformer alone answers at level 3."""
    cfg = make_config(
        tmp_path,
        f"models:\n  dir: {models_dir}\n  fusion:\n    level3: {{temporal_transformer: 1}}\n",
    )
    return Engine(cfg, level=3).load()


@pytest.fixture
def cache(config: Config, redis_cache: Any) -> Iterator[Cache]:
    c = Cache(config)
    yield c
    c.close()


def _row(rid: int, state: np.ndarray, monster: int = 1002) -> list[Any]:
    return [rid, "aggressive", monster, state.tolist(), monster]


def test_sequence_model_reads_the_history_from_working_memory(
    seq_engine: Engine, cache: Cache
) -> None:
    """Same current state (HP 30%, target adjacent), two monsters: one steady, one whose
    HP fell from 90%; their histories come from L1 in the batch's one lookup."""
    now = ENCODER.state("aggressive", hp=0.3, target_distance=0.05)
    for step in range(9):
        hp = 0.9 + (0.3 - 0.9) * step / 9
        cache.remember_states([(1, now), (2, ENCODER.with_hp(now[None], hp)[0])])
    outcome = answer_batch([_row(10, now, 1), _row(11, now, 2)], seq_engine, cache)
    got = {a.request_id: a for a in outcome.answers}
    assert got[10].action_id == Action.ATTACK
    assert got[11].action_id == Action.FLEE
    version = seq_engine.models[("aggressive", "temporal_transformer")].version
    assert got[10].model == f"aggressive/temporal_transformer@{version}"
    outcome.remember()
    assert len(cache.recent_states(2)) == 10  # the current state pushed after answering


def test_with_redis_down_sequence_models_see_the_current_state_alone(
    seq_engine: Engine, config: Config
) -> None:
    dead = dataclasses.replace(
        config, redis=dataclasses.replace(config.redis, url="redis://127.0.0.1:1")
    )
    cache = Cache(dead)
    now = ENCODER.state("aggressive", hp=0.3, target_distance=0.05)
    outcome = answer_batch([_row(1, now)], seq_engine, cache)
    (answer,) = outcome.answers
    ((model, _),) = seq_engine.fusion("aggressive")
    expected = model.run(now[None], np.repeat(now[None, None], 10, axis=1)).scores
    assert expected is not None
    assert answer.action_id == int(expected.argmax()) == Action.ATTACK
    assert cache.breaker.state == "open"


class Counting:
    """A member wrapper that counts the rows it was asked to run."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.rows = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, states: np.ndarray, windows: np.ndarray | None = None) -> TypeOutput:
        self.rows += len(states)
        out: TypeOutput = self.inner.run(states, windows)
        return out


class Wrapped:
    def __init__(self, engine: Engine) -> None:
        self.members = {a: [(Counting(m), w) for m, w in engine.fusion(a)] for a in ARCHETYPES}

    def fusion(self, archetype: str) -> list[tuple[Counting, float]]:
        return self.members[archetype]


def test_a_type_that_hit_in_l3_is_not_run_again(
    models_dir: Path, tmp_path: Path, cache: Cache
) -> None:
    cfg = make_config(tmp_path, f"models:\n  dir: {models_dir}\n")
    engine = Wrapped(Engine(cfg, level=3).load())
    x = ENCODER.sample(np.random.default_rng(5), 4, "tank")
    rows = [[i + 1, "tank", None, s.tolist()] for i, s in enumerate(x)]  # no mob: no L2
    first = answer_batch(rows, engine, cache)
    first.remember()
    counts = [c.rows for c, _ in engine.fusion("tank")]
    assert counts == [4] * len(counts)
    second = answer_batch(rows, engine, cache)
    assert [c.rows for c, _ in engine.fusion("tank")] == counts  # nothing ran again
    assert {a.source for a in second.answers} == {"cache"}
    assert [a.action_id for a in second.answers] == [a.action_id for a in first.answers]
    assert all("+" in (a.model or "") for a in second.answers)


def test_without_lookup_the_types_run_and_the_answers_are_still_written(
    models_dir: Path, tmp_path: Path, cache: Cache
) -> None:
    """A level outside caching.lookup_levels reads neither L2 nor L3 (the game has just
    looked L2 up itself), but writes L2: the game's next identical state is its hit. It
    keeps no L3 output (only a level that reads L3 does)."""
    from mltasks.cache.codec import action_keys, output_key, state_digests

    cfg = make_config(tmp_path, f"models:\n  dir: {models_dir}\n")
    engine = Wrapped(Engine(cfg, level=3).load())
    x = ENCODER.sample(np.random.default_rng(6), 4, "tank")
    rows = [[i + 1, "tank", 1002, s.tolist()] for i, s in enumerate(x)]
    first = answer_batch(rows, engine, cache, lookup=False)
    first.remember()
    written = cache.lookup_actions(action_keys(x, [1002] * 4))
    assert [w and w[0] for w in written] == [a.action_id for a in first.answers]
    counts = [c.rows for c, _ in engine.fusion("tank")]
    second = answer_batch(rows, engine, cache, lookup=False)
    assert [c.rows for c, _ in engine.fusion("tank")] == [2 * n for n in counts]  # ran again
    assert {a.source for a in second.answers} == {"model"}
    assert [a.action_id for a in second.answers] == [a.action_id for a in first.answers]
    third = answer_batch(rows, engine, cache)  # a level that looks up: the L2 hit
    assert {a.source for a in third.answers} == {"cache"}

    def l3_names(x: np.ndarray) -> list[str | None]:
        members = [m for m, _ in engine.fusion("tank") if m.cacheable]
        return [
            output_key("tank", m.model_type, d, getattr(m, "version", ""))
            for d in state_digests(x)
            for m in members
        ]

    names = l3_names(x)
    assert names and cache.lookup([None] * 4, names).outputs == [None] * len(names)
    y = ENCODER.sample(np.random.default_rng(7), 4, "tank")
    answer_batch(
        [[i + 1, "tank", 1002, s.tolist()] for i, s in enumerate(y)], engine, cache
    ).remember()
    assert all(o is not None for o in cache.lookup([None] * 4, l3_names(y)).outputs)


def test_without_lookup_sequence_types_still_read_their_history(
    seq_engine: Engine, cache: Cache
) -> None:
    now = ENCODER.state("aggressive", hp=0.3, target_distance=0.05)
    for step in range(9):
        hp = 0.9 + (0.3 - 0.9) * step / 9
        cache.remember_states([(1, now), (2, ENCODER.with_hp(now[None], hp)[0])])
    outcome = answer_batch([_row(10, now, 1), _row(11, now, 2)], seq_engine, cache, lookup=False)
    got = {a.request_id: a for a in outcome.answers}
    assert (got[10].action_id, got[11].action_id) == (Action.ATTACK, Action.FLEE)


# -- configuration -------------------------------------------------------------------------


def test_serve_model_type_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\.serve_model_type: no longer exists.*fusion"):
        make_config(tmp_path, "models:\n  serve_model_type: combat_dqn\n")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("models:\n  fusion:\n    level3: {chess: 1}\n", "models.fusion.level3.chess"),
        ("models:\n  fusion:\n    level1: {combat_dqn: 0}\n", "models.fusion.level1.combat_dqn"),
        ("models:\n  fusion:\n    level2: {threat_assessment: 1}\n", "models.fusion.level2"),
        ("models:\n  fusion:\n    level3: [combat_dqn]\n", "models.fusion.level3"),
        ("models:\n  fusion:\n    q_temperature: 0\n", "models.fusion.q_temperature"),
    ],
)
def test_bad_fusion_settings_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"c.yaml: {key}"):
        make_config(tmp_path, text)


def test_default_fusion_sets() -> None:
    f = load_config(environ={}).models.fusion
    assert set(f.level1) == set(f.level2) == set(MODEL_TYPES)
    assert 2 <= len(f.level3) < len(MODEL_TYPES)
    assert not {"pattern_recognition", "spatial_vit"} & set(f.level3)  # the costly ones


# -- models check --------------------------------------------------------------------------


def _check(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mltasks.cli", "models", "check", str(root), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_models_check_passes_the_exporter_form_and_names_a_broken_file(
    models_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "m"
    shutil.copytree(models_dir, root)
    done = _check(root, "--json")
    assert done.returncode == 0, done.stderr
    reports = json.loads(done.stdout)
    assert len(reports) == 54 and all(r["ok"] for r in reports)
    by_model = {r["model"]: r for r in reports}
    assert by_model["mage/soft_actor_critic"]["input"] == "state_action"
    assert by_model["mage/soft_actor_critic"]["roles"] == ["critic"]
    assert by_model["tank/movement_ppo"]["roles"] == ["actions", "value"]
    assert by_model["tank/team_coordination"]["input"] == "sequence"
    assert by_model["tank/threat_assessment"]["precision"] == "fp16"
    assert {"model", "file", "ok", "reason"} <= set(reports[0])

    write_corrupt_model(root / "tank" / "skill_dqn_fp16.onnx")
    (root / "tank" / "notes.onnx").write_bytes(b"x")
    done = _check(root, "--json")
    assert done.returncode == 1
    bad = [r for r in json.loads(done.stdout) if not r["ok"]]
    assert [(r["model"], Path(r["file"]).name) for r in bad] == [
        ("", "notes.onnx"),
        ("tank/skill_dqn", "skill_dqn_fp16.onnx"),
    ]
    assert "cannot load" in bad[1]["reason"]
    text = _check(root)
    assert "FAIL tank/skill_dqn" in text.stdout and "55 files, 53 load, 2 do not" in text.stdout


def test_models_init_refuses_to_overwrite_a_file_that_differs(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "mltasks.cli", "models", "init", str(tmp_path)]
    target = tmp_path / "mage" / "combat_dqn_fp16.onnx"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"a model somebody trained")
    done = subprocess.run(run, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1
    assert "mage/combat_dqn_fp16.onnx" in done.stderr and "--force" in done.stderr
    assert target.read_bytes() == b"a model somebody trained"
    assert not (tmp_path / "tank").exists()
    done = subprocess.run(
        [*run, "--force"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() != b"a model somebody trained"
    assert "fused L3" in done.stdout  # the agreement table
    again = subprocess.run(run, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0  # identical files are not "differing"
