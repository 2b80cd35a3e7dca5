"""A batch's plan: its valid rows, the fusion members of each archetype, and what one
cache round trip found for them (L2 answers, L3 outputs, L1 histories).

The records the answering path passes between `mltasks.serving.inference` (validate,
assemble) and `mltasks.serving.voices` (run the members) live here, with the protocols
of what answers a level (the ONNX engine, the rule policy) and of the cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mltasks.errors import ModelError
from mltasks.models.family import Scores
from mltasks.models.loaded import TypeOutput
from mltasks.serving.records import Answer

if TYPE_CHECKING:
    from mltasks.cache.client import BatchLookup


class Predictor(Protocol):
    """What one model type (or the rule policy) is to the answering path."""

    @property
    def name(self) -> str: ...

    @property
    def model_type(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def sequence(self) -> bool:
        """Reads [N, 10, 64] history windows rather than [N, 64] states."""
        ...

    @property
    def cacheable(self) -> bool:
        """Its output depends on the state alone, so L3 may keep it."""
        ...

    @property
    def scores_kind(self) -> Scores: ...

    @property
    def packed_width(self) -> int: ...

    def unpack(self, packed: np.ndarray) -> TypeOutput: ...

    def run(self, states: np.ndarray, windows: np.ndarray | None = None) -> TypeOutput: ...


class Predictors(Protocol):
    """What answers a level: per archetype, the members of its fusion and their weights."""

    def fusion(self, archetype: str) -> Sequence[tuple[Predictor, float]]: ...


class BatchCache(Protocol):
    """The part of mltasks.cache.Cache a batch uses: one read and one write per batch."""

    def lookup(
        self,
        action_names: Sequence[str | None],
        output_names: Sequence[str | None],
        monsters: Sequence[int] = (),
    ) -> BatchLookup: ...

    def store_batch(
        self,
        actions: Iterable[tuple[str, int, float]],
        logits: Iterable[tuple[str | None, Any]],
        states: Iterable[tuple[int, Any]],
    ) -> int: ...


@dataclass(frozen=True, slots=True)
class Valid:
    request_id: int
    archetype: str
    vec: np.ndarray
    mob_id: int | None
    monster_id: int | None


@dataclass(slots=True)
class Plan:
    """The cache's part of a batch: what to ask, and what it answered."""

    valid: list[Valid]
    members: dict[str, Sequence[tuple[Predictor, float]]]
    action_names: list[str | None]
    output_names: dict[tuple[int, str], str]  # (row, model type) -> L3 key
    found: BatchLookup
    # (row, model type) -> its place in found.outputs: made once, read by every member
    output_index: dict[tuple[int, str], int] = field(default_factory=dict)
    # Seconds each model call of the batch took: recorded once, after the batch.
    timings: list[float] = field(default_factory=list)
    # Per archetype, its members as one session where the engine has built one
    # (`mltasks.models.merged`): one call for all of them.
    merged: dict[str, Any] = field(default_factory=dict)
    # The answers go to L2 (caching.write_actions); else the game writes its own keys.
    write_actions: bool = True


def plan_batch(
    valid: list[Valid],
    engine: Predictors,
    cache: BatchCache | None,
    lookup: bool = True,
    write_actions: bool = True,
) -> Plan:
    """Keys of the batch, and one cache round trip for L2, L3 and L1 (without ``lookup``:
    no L3 key at all, and a round trip for L1 alone where a member reads a history; without
    ``lookup`` or ``write_actions``: no L2 key either, the costliest key of a row)."""
    from mltasks.cache.client import BatchLookup
    from mltasks.cache.codec import action_keys, output_key, state_digests

    members = {a: engine.fusion(a) for a in {v.archetype for v in valid}}
    merged = _merged(engine, members)
    empty = BatchLookup([None] * len(valid), [], {})
    if cache is None:
        return Plan(valid, members, [None] * len(valid), {}, empty, merged=merged)
    names: list[str | None] = [None] * len(valid)
    with_mob = [i for i, v in enumerate(valid) if v.mob_id is not None]
    if with_mob and (lookup or write_actions):
        found = action_keys(
            np.stack([valid[i].vec for i in with_mob]),
            [int(valid[i].mob_id or 0) for i in with_mob],
        )
        for i, key in zip(with_mob, found, strict=True):
            names[i] = key
    # L3 keys only where L3 is read: an output kept by a level that never looks it up
    # would serve only a level that does, were it to come back within L3's TTL (10 s),
    # and would give it another precision's numbers (INT8 on the CPU, FP16 on a GPU).
    digests = state_digests(np.stack([v.vec for v in valid])) if lookup else []
    outputs: dict[tuple[int, str], str] = {}
    monsters: set[int] = set()
    for i, v in enumerate(valid):
        for member, _ in members[v.archetype]:
            if lookup and member.cacheable:
                version = getattr(member, "version", "")
                out_key = output_key(v.archetype, member.model_type, digests[i], version)
                if out_key is not None:
                    outputs[(i, member.model_type)] = out_key
            if member.sequence and v.monster_id is not None:
                monsters.add(v.monster_id)
    if lookup:
        looked = cache.lookup(names, list(outputs.values()), sorted(monsters))
    elif monsters:
        looked = cache.lookup([None] * len(valid), [], sorted(monsters))
    else:
        looked = empty
    index = {k: j for j, k in enumerate(outputs)}
    return Plan(
        valid, members, names, outputs, looked, index, merged=merged, write_actions=write_actions
    )


def _merged(
    engine: Predictors, members: dict[str, Sequence[tuple[Predictor, float]]]
) -> dict[str, Any]:
    """Each archetype's merged session, where the engine (not the rule policy) has one."""
    merge = getattr(engine, "merged", None)
    if merge is None:
        return {}
    found = {}
    for archetype, ms in members.items():
        if len(ms) > 1 and (m := merge(archetype, [p for p, _ in ms])) is not None:
            found[archetype] = m
    return found


@dataclass(slots=True)
class Group:
    """The rows of one archetype that no L2 answer covered, through its fusion."""

    archetype: str
    rows: list[int]  # indices into the plan's valid rows
    # Several archetypes answered as one (`voices_alike`): (archetype, rows) in row order.
    parts: list[tuple[str, int]] = field(default_factory=list)
    failed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    non_finite: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    ran: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))


@dataclass(slots=True)
class Results:
    """What a batch gathers on its way: its answers, and what goes to the ladder and cache."""

    answers: list[Answer]
    failures: list[ModelError] = field(default_factory=list)
    fresh: list[tuple[str, int, float]] = field(default_factory=list)  # L2: key, action, conf
    computed: list[tuple[str | None, Any]] = field(default_factory=list)  # L3: key, output
    fused: dict[str, int] = field(default_factory=lambda: {"single": 0, "fused": 0})
    shadow: list[Any] = field(default_factory=list)
