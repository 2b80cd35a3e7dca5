"""The 64-value state vector, read by name: the service's one door to the state layouts.

Two layouts ship (``state.layout`` in the config), each a table in ``mltasks.layouts``:
``encoder`` (the default, what the game's map server really sends, CONTRACT.md section 2b)
and ``seed`` (the seed document's table, section 2). This module reads, samples and builds
states from either table with the same code; docs/state.md shows both side by side.

Everything else in the service (the rule policy, the demo models' sampler, the benchmarks,
the tests) asks a `Layout` for named features (`Features`) or builds a state from named
values (`Layout.state`); no other module indexes a state vector.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

import numpy as np
import numpy.typing as npt

from mltasks.contract import ARCHETYPES, STATE_DIM
from mltasks.layouts import encoder, seed
from mltasks.layouts.table import Archetype, BoolArray, FloatArray, Read, Table

LayoutName = Literal["encoder", "seed"]
LAYOUT_NAMES: Final[tuple[LayoutName, ...]] = get_args(LayoutName)
DEFAULT_LAYOUT: Final[LayoutName] = "encoder"


@dataclass(frozen=True, slots=True)
class Features:
    """The named situation of a batch, one float32 (or bool) array of N rows per feature.

    ``idle_time`` and ``explores`` exist in one layout each (None in the other); every
    other feature exists in both, some derived (each layout's ``READS`` says how).
    """

    hp: FloatArray
    sp: FloatArray
    has_target: BoolArray
    target_distance: FloatArray
    target_hp: FloatArray
    target_threat: FloatArray
    enemies: FloatArray
    other_threat: FloatArray
    pack: FloatArray
    pack_hp: FloatArray
    ally_under_attack: BoolArray
    skill_ready: tuple[BoolArray, BoolArray, BoolArray]
    stunned: BoolArray
    idle_time: FloatArray | None
    explores: BoolArray | None


@dataclass(frozen=True, slots=True)
class Layout:
    """One state layout: its named slots, how to read features, sample and build states."""

    name: LayoutName
    table: Table = field(repr=False)

    slots: Mapping[str, int] = field(init=False)
    """Named indices of this layout (documentation and the rare direct read)."""
    read_slots: tuple[int, ...] = field(init=False)
    """The only indices the rule policy reads in this layout (the demo models see these)."""
    situation: tuple[str, ...] = field(init=False)
    """The keywords `state` accepts."""

    def __post_init__(self) -> None:
        slots = {slot.name: slot.index for slot in self.table.slots}
        object.__setattr__(self, "slots", slots)
        policy = (slot.index for slot in self.table.slots if slot.policy)
        object.__setattr__(self, "read_slots", tuple(sorted(policy)))
        object.__setattr__(self, "situation", tuple(self.table.knobs))

    def read(self, states: npt.ArrayLike) -> Features:
        """Named features of a batch float32 [N, 64]; raises ValueError on another shape."""
        x = check_states(states)
        done: dict[Read, Any] = {}

        def one(read: Read) -> Any:
            if read not in done:
                done[read] = read.read(x, self.slots)
            return done[read]

        features: dict[str, Any] = {}
        for name, reading in self.table.reads.items():
            if reading is None:
                features[name] = None
            elif isinstance(reading, tuple):
                features[name] = tuple(one(r) for r in reading)
            else:
                features[name] = one(reading)
        return Features(**features)

    def sample(self, rng: np.random.Generator, n: int, archetype: str | None = None) -> FloatArray:
        """``n`` plausible states (float32 [n, 64], values in [0, 1]) that exercise every
        rule; ``archetype`` fixes what the layout says about the monster's kind."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        a = ARCHETYPES.index(archetype) if archetype is not None else -1
        table = self.table
        if table.noise is None:
            x = np.zeros((n, STATE_DIM), dtype=np.float32)
        else:
            x = (rng.random((n, STATE_DIM)) * table.noise).astype(np.float32)
        by_index = {slot.index: slot for slot in table.slots}
        for step in table.draw_order:
            if not isinstance(step, range):
                step(rng, x)
                continue
            for i in step:
                slot = by_index.get(i)
                if slot is not None and slot.draw is not None:
                    x[:, i] = slot.draw.column(rng, x, slot, self.slots, a)
        if table.couple is not None:
            table.couple(x)
        return x

    def with_hp(self, states: npt.ArrayLike, hp: npt.ArrayLike) -> FloatArray:
        """A copy of the batch with each row's HP ratio replaced, and every slot the layout
        derives from it (the encoder's repeats and complements) rewritten to match."""
        x = check_states(states).copy()
        x[:, self.slots["hp"]] = np.broadcast_to(np.asarray(hp, dtype=np.float32), (x.shape[0],))
        if self.table.couple is not None:
            self.table.couple(x)
        return x

    def state(self, archetype: str | None = None, **situation: Any) -> FloatArray:
        """One state float32 [64] of a calm monster (full HP and SP, no target, nobody
        around, skills not ready) with the named situation applied, written as this layout
        writes it (coupled slots included). Unknown names raise ValueError."""
        unknown = sorted(set(situation) - set(self.situation))
        if unknown:
            raise ValueError(
                f"layout {self.name!r} has no {unknown}; it takes {list(self.situation)}"
            )
        a = ARCHETYPES.index(archetype) if archetype is not None else 0
        x = np.zeros(STATE_DIM, dtype=np.float32)
        for slot in self.table.slots:
            if slot.calm:
                x[slot.index] = slot.calm
            if isinstance(slot.draw, Archetype):
                x[slot.index] = a / slot.scale
        target = situation.get("target_distance") is not None
        engaged = {slot.name: slot.engaged for slot in self.table.slots}
        if target:
            for name, value in engaged.items():
                if value is not None:
                    x[self.slots[name]] = value
        for name, knob in self.table.knobs.items():
            value = situation.get(name)
            if value is None and target:
                value = engaged[knob.slots[0]]
            if value is not None and (target or not knob.needs_target):
                knob.write(x, self.slots, value)
        if self.table.couple is not None:
            self.table.couple(x[None, :])
        return x


def check_states(states: npt.ArrayLike) -> FloatArray:
    """The batch as float32 [N, 64], rejecting anything else."""
    arr = np.asarray(states)
    if arr.ndim != 2 or arr.shape[1] != STATE_DIM:
        raise ValueError(f"states must have shape [N, {STATE_DIM}], got {list(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"states must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


ENCODER: Final = Layout("encoder", encoder.TABLE)
SEED: Final = Layout("seed", seed.TABLE)
LAYOUTS: Final[Mapping[str, Layout]] = {"encoder": ENCODER, "seed": SEED}
assert tuple(LAYOUTS) == LAYOUT_NAMES


def get_layout(name: str) -> Layout:
    """A layout by name; an unknown one raises ValueError naming the choices."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown state layout {name!r}; expected one of {LAYOUT_NAMES}") from None


def sample_states(
    rng: np.random.Generator,
    n: int,
    layout: str = DEFAULT_LAYOUT,
    archetype: str | None = None,
) -> FloatArray:
    """``n`` plausible states in a layout (the encoder's unless told): tests, benchmarks,
    canaries and the demo models' training sets all draw from here."""
    return get_layout(layout).sample(rng, n, archetype)
