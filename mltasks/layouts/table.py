"""A state layout as data: one row per named slot, how features are read, which keywords
build a state. The two layouts (``encoder``, ``seed``) are tables of these, so each fact is
spelled once and ``mltasks.state`` serves both with one piece of code.

The row's draw, read and knob types are small values with a method each; a layout module
adds code only where its slots are drawn together (a scene) or derived from each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

NO_TARGET: Final = 0.99
"""A target distance at or above this means no target (both layouts encode it as 1.0)."""

FLAG: Final = 0.5
"""A 0/1 flag slot counts as set at or above this."""


class Draw(Protocol):
    """How the sampler fills one slot of every row."""

    def column(
        self, rng: np.random.Generator, x: FloatArray, slot: Slot, at: Mapping[str, int], a: int
    ) -> npt.ArrayLike:
        """The slot's values for the batch ``x`` (``a``: the archetype's index or -1)."""
        ...


@dataclass(frozen=True, slots=True)
class Slot:
    """One named value of the state vector."""

    name: str
    index: int
    meaning: str
    scale: float = 1.0
    """The value is a quantity divided by this (a count / 10, an archetype id / 5)."""
    calm: float = 0.0
    """Its value in a calm monster (`Layout.state` starts there)."""
    engaged: float | None = None
    """Its value in `Layout.state` once a target is given, unless a keyword sets it."""
    draw: Draw | None = None
    """How `Layout.sample` fills it on its own; None: a scene or a derivation does."""
    policy: bool = False
    """The rule policy reads it (the demo models see only these slots)."""


# ---------------------------------------------------------------------------- draws


@dataclass(frozen=True, slots=True)
class Uniform:
    """Uniform in [lo, hi); a share of the rows pinned at ``hi`` (full HP is common)."""

    lo: float = 0.0
    hi: float = 1.0
    pinned_hi: float = 0.0

    def column(
        self, rng: np.random.Generator, x: FloatArray, slot: Slot, at: Mapping[str, int], a: int
    ) -> npt.ArrayLike:
        n = len(x)
        values = rng.uniform(self.lo, self.hi, n).astype(np.float32)
        if self.pinned_hi:
            values[rng.random(n) < self.pinned_hi] = self.hi
        return values


@dataclass(frozen=True, slots=True)
class Choice:
    """One of a few values, with these probabilities (equal when None)."""

    values: tuple[float, ...]
    p: tuple[float, ...] | None = None

    def column(
        self, rng: np.random.Generator, x: FloatArray, slot: Slot, at: Mapping[str, int], a: int
    ) -> npt.ArrayLike:
        values = np.asarray(self.values, dtype=np.float32)
        return rng.choice(values, len(x), p=self.p).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Count:
    """A whole count in [lo, hi), divided by the slot's scale."""

    lo: int
    hi: int

    def column(
        self, rng: np.random.Generator, x: FloatArray, slot: Slot, at: Mapping[str, int], a: int
    ) -> npt.ArrayLike:
        return rng.integers(self.lo, self.hi, len(x)) / slot.scale


@dataclass(frozen=True, slots=True)
class Flag:
    """1 with probability ``p``, else 0."""

    p: float

    def column(
        self, rng: np.random.Generator, x: FloatArray, slot: Slot, at: Mapping[str, int], a: int
    ) -> npt.ArrayLike:
        return (rng.random(len(x)) < self.p).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Archetype:
    """The archetype's id over the slot's scale: the one asked for, else any."""

    count: int

    def column(
        self, rng: np.random.Generator, x: FloatArray, slot: Slot, at: Mapping[str, int], a: int
    ) -> npt.ArrayLike:
        if a >= 0:
            return a / slot.scale
        return Choice(tuple(i / slot.scale for i in range(self.count))).column(rng, x, slot, at, a)


@dataclass(frozen=True, slots=True)
class Constant:
    """Always its calm value; draws nothing."""

    def column(
        self, rng: np.random.Generator, x: FloatArray, slot: Slot, at: Mapping[str, int], a: int
    ) -> npt.ArrayLike:
        return slot.calm


@dataclass(frozen=True, slots=True)
class WithTarget:
    """Drawn as ``draw``, but 0 in rows without a target."""

    draw: Draw

    def column(
        self, rng: np.random.Generator, x: FloatArray, slot: Slot, at: Mapping[str, int], a: int
    ) -> npt.ArrayLike:
        values = self.draw.column(rng, x, slot, at, a)
        return np.where(x[:, at["target_distance"]] < NO_TARGET, values, 0.0)


@dataclass(frozen=True, slots=True)
class From:
    """Another slot's value (drawn before it) over this slot's scale."""

    source: str

    def column(
        self, rng: np.random.Generator, x: FloatArray, slot: Slot, at: Mapping[str, int], a: int
    ) -> npt.ArrayLike:
        return x[:, at[self.source]] / slot.scale


@dataclass(frozen=True, slots=True)
class Complement:
    """1 minus another slot's value (drawn before it)."""

    source: str

    def column(
        self, rng: np.random.Generator, x: FloatArray, slot: Slot, at: Mapping[str, int], a: int
    ) -> npt.ArrayLike:
        return 1.0 - x[:, at[self.source]]


# ---------------------------------------------------------------------------- reads


class Read(Protocol):
    """How one feature of `mltasks.state.Features` is read from a batch."""

    def read(self, x: FloatArray, at: Mapping[str, int]) -> npt.NDArray[Any]:
        """The feature's N values."""
        ...


@dataclass(frozen=True, slots=True)
class Value:
    """The slot as it is."""

    slot: str

    def read(self, x: FloatArray, at: Mapping[str, int]) -> npt.NDArray[Any]:
        return x[:, at[self.slot]]


@dataclass(frozen=True, slots=True)
class Below:
    """True where the slot is below ``limit`` (a target: distance below NO_TARGET)."""

    slot: str
    limit: float = NO_TARGET

    def read(self, x: FloatArray, at: Mapping[str, int]) -> npt.NDArray[Any]:
        return x[:, at[self.slot]] < self.limit


@dataclass(frozen=True, slots=True)
class AtLeast:
    """True where the slot is at or above ``limit`` (a flag: at or above FLAG)."""

    slot: str
    limit: float = FLAG

    def read(self, x: FloatArray, at: Mapping[str, int]) -> npt.NDArray[Any]:
        return x[:, at[self.slot]] >= self.limit


@dataclass(frozen=True, slots=True)
class Positive:
    """True where the slot is above 0."""

    slot: str

    def read(self, x: FloatArray, at: Mapping[str, int]) -> npt.NDArray[Any]:
        return x[:, at[self.slot]] > 0


@dataclass(frozen=True, slots=True)
class AllOf:
    """True where every one of ``reads`` is."""

    reads: tuple[Read, ...]

    def read(self, x: FloatArray, at: Mapping[str, int]) -> npt.NDArray[Any]:
        first, *rest = (r.read(x, at) for r in self.reads)
        for other in rest:
            first = first & other
        return first


@dataclass(frozen=True, slots=True)
class Missing:
    """A feature the layout lacks, read as all zeros (or all False) so every rule can run."""

    dtype: type[np.generic] = np.float32

    def read(self, x: FloatArray, at: Mapping[str, int]) -> npt.NDArray[Any]:
        return np.zeros(x.shape[0], dtype=self.dtype)


# ---------------------------------------------------------------------------- knobs


@dataclass(frozen=True, slots=True)
class Knob:
    """A keyword of `Layout.state` and the slots its value goes to. None (or no keyword)
    leaves the slots calm, or engaged when a target is given."""

    slots: tuple[str, ...]
    flag: tuple[float, float] | None = None
    """The (yes, no) values of a yes/no keyword."""
    each: bool = False
    """A tuple gives each slot its own value (a scalar goes to all of them)."""
    mirror: tuple[str, float] | None = None
    """Another slot that gets the value times this factor."""
    marks: tuple[str, float] | None = None
    """Another slot set to this value when the keyword's value is above 0."""
    needs_target: bool = False
    """Ignored unless a target is given (the target's own slots)."""

    def write(self, x: FloatArray, at: Mapping[str, int], value: Any) -> None:
        """Write ``value`` into the one state ``x`` [64]."""
        values = value if self.each and isinstance(value, tuple) else (value,) * len(self.slots)
        for name, v in zip(self.slots, values, strict=False):
            x[at[name]] = v if self.flag is None else self.flag[0 if v else 1]
        if self.mirror is not None:
            x[at[self.mirror[0]]] = float(value) * self.mirror[1]
        if self.marks is not None and value > 0:
            x[at[self.marks[0]]] = self.marks[1]


# ---------------------------------------------------------------------------- the table

Reading: TypeAlias = Read | tuple[Read, Read, Read] | None
"""How a feature is read: one read, three (the three skills), or None (no such feature)."""

Scene = Callable[[np.random.Generator, FloatArray], None]
"""Draws several slots of a batch together, in place (a target and what comes with it)."""


@dataclass(frozen=True, slots=True)
class Table:
    """One layout: its slots, its reads, its keywords, its sampler's order."""

    slots: tuple[Slot, ...]
    reads: Mapping[str, Reading]
    """How each feature of `Features` is read."""
    knobs: Mapping[str, Knob]
    """The keywords of `Layout.state`, in the order its error message lists them."""
    draw_order: tuple[range | Scene, ...]
    """The sampler's steps: the slots of a range each by its own draw (index order), or a
    scene. The order fixes the random stream: change it and every sample changes."""
    noise: float | None = None
    """The slots nothing draws hold uniform noise in [0, noise) (None: they hold 0)."""
    couple: Callable[[FloatArray], None] | None = None
    """Rewrites, in place [N, 64], the slots the layout derives from others."""
