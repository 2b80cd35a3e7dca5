"""An archetype's members as one ONNX Runtime session (mltasks/models/merged.py): the same
outputs bit for bit, refused wherever they could differ, built off the batch path, and a
failing merged call never costs a member its own say."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from mltasks.config import Config
from mltasks.errors import ModelError
from mltasks.models.engine import Engine
from mltasks.models.loaded import LoadedModel, TypeOutput
from mltasks.models.merged import Merged, merge
from mltasks.serving.inference import answer_batch
from mltasks.state import sample_states


def _states(n: int, seed: int = 1) -> np.ndarray:
    return sample_states(np.random.default_rng(seed), n).astype(np.float32)


def _level3(engine: Engine, archetype: str) -> list[LoadedModel]:
    return [engine.models[(archetype, t)] for t in ("combat_dqn", "skill_dqn", "threat_assessment")]


def _same(a: TypeOutput, b: TypeOutput) -> bool:
    pairs = ((a.scores, b.scores), (a.value, b.value), (a.threat, b.threat))
    return all(
        (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
        for x, y in pairs
    )


def test_a_merged_session_says_what_each_member_says(all_models_cfg: Config) -> None:
    cfg = all_models_cfg
    engine = Engine(cfg).load()
    for archetype in ("tank", "mage"):
        members = _level3(engine, archetype)
        merged = merge(members, _states(8))
        assert merged is not None and merged.serves(members)
        for n in (1, 3, 64):
            states = _states(n, seed=n)
            for member, said in zip(members, merged.run(states), strict=True):
                assert _same(said, member.run(states)), member.name


def test_members_that_could_differ_are_not_merged(all_models_cfg: Config) -> None:
    cfg = all_models_cfg
    engine = Engine(cfg).load()
    members = _level3(engine, "tank")
    # A sequence member reads [N, 10, 64] windows: it keeps its own call.
    assert merge([*members, engine.models[("tank", "temporal_transformer")]], _states(4)) is None
    assert merge(members[:1], _states(4)) is None  # one member: nothing to save
    assert merge(members, _states(4), max_bytes=1000) is None  # larger than the limit
    assert merge(members, _states(4), max_bytes=100_000) is not None
    # A member whose session is not the graph of its file: the probe finds out.
    odd = dataclasses.replace(members[1], session=members[0].session)
    assert merge([members[0], odd, members[2]], _states(4)) is None


def _wait_merged(engine: Engine, archetype: str, members: list[LoadedModel]) -> Merged:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = engine.merged(archetype, members)
        if got is not None:
            return got
        time.sleep(0.02)
    raise AssertionError("the merged session was never built")


def test_the_engine_builds_off_the_batch_path_and_again_after_a_swap(
    all_models_cfg: Config,
) -> None:
    cfg = all_models_cfg
    engine = Engine(cfg).load()
    members = _level3(engine, "ranged")
    assert engine.merged("ranged", members) is None  # not built yet: the members serve alone
    first = _wait_merged(engine, "ranged", members)
    assert first.serves(members)
    # A deploy swaps in another loaded model: the old session no longer serves.
    swapped = [members[0], dataclasses.replace(members[1]), members[2]]
    assert engine.merged("ranged", swapped) is None
    second = _wait_merged(engine, "ranged", swapped)
    assert second is not first and second.serves(swapped)

    off = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, merge_max_mb=0))
    quiet = Engine(off).load()
    quiet.merge_all()
    time.sleep(0.1)
    assert quiet.merged("ranged", _level3(quiet, "ranged")) is None


class _Broken:
    """A merged session whose run fails."""

    def run(self, states: np.ndarray) -> list[TypeOutput]:
        raise ModelError("merged: broken")


def test_a_failing_merged_call_falls_back_to_one_call_a_member(all_models_cfg: Config) -> None:
    cfg = all_models_cfg
    engine = Engine(cfg).load()
    rows = [
        [i + 1, a, 1002, s]
        for i, (a, s) in enumerate(zip(["tank", "mage"] * 4, _states(8).tolist(), strict=True))
    ]

    class Engines:
        def __init__(self, merged: object) -> None:
            self.made = merged

        def fusion(self, archetype: str) -> list[tuple[LoadedModel, float]]:
            return engine.fusion(archetype)

        def merged(self, archetype: str, members: list[LoadedModel]) -> object:
            return self.made

    class Counted:
        """The tank's real merged session, counting its runs."""

        def __init__(self) -> None:
            self.inner = merge([m for m, _ in engine.fusion("tank")], _states(4))
            self.runs = 0

        def run(self, states: np.ndarray) -> list[TypeOutput]:
            self.runs += 1
            assert self.inner is not None
            return self.inner.run(states)

    alone = answer_batch(rows, Engines(None))
    counted = Counted()
    merged = answer_batch(rows[::2], Engines(counted))  # the tanks only
    broken = answer_batch(rows, Engines(_Broken()))
    assert counted.runs == 1  # one call for the tank's three members
    assert not alone.failures and not broken.failures
    key = lambda a: a.request_id  # noqa: E731
    assert sorted(broken.answers, key=key) == sorted(alone.answers, key=key)
    assert sorted(merged.answers, key=key) == sorted(alone.answers, key=key)[::2]
    assert all(a.action_id != 255 for a in broken.answers)
