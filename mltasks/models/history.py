"""Working memory as a sequence model's input: the last 10 states of a monster.

The window of a row is the monster's last 9 states from L1 (oldest first; the cache keeps
up to 10 per ``monster_id``, pushed after each answer), then the current state as the last
row. A monster with less history is **padded at the front with copies of its oldest known
state**, so a window never invents a situation the monster was not in; with no history at
all (a first sighting, a row without ``monster_id``, or Redis away) the window is the
current state ten times. The game writes the mob *class* id into ``monster_id``, so one
history can mix monsters of one class: the service reads ``monster_id`` as given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from mltasks.contract import STATE_DIM
from mltasks.models.family import SEQUENCE_LEN

FloatArray = npt.NDArray[np.float32]


def window(current: FloatArray, past: FloatArray | None) -> FloatArray:
    """[10, 64]: up to 9 past states (oldest first) and the current one, front-padded."""
    rows = [] if past is None else list(past[-(SEQUENCE_LEN - 1) :])
    rows.append(current)
    pad = [rows[0]] * (SEQUENCE_LEN - len(rows))
    return np.stack([*pad, *rows]).astype(np.float32)


def windows(
    states: FloatArray,
    monsters: Sequence[int | None],
    histories: Mapping[int, FloatArray],
) -> FloatArray:
    """[N, 10, 64] for a batch: each row's window from its monster's history."""
    out = np.empty((len(states), SEQUENCE_LEN, STATE_DIM), dtype=np.float32)
    for i, (state, monster) in enumerate(zip(states, monsters, strict=True)):
        out[i] = window(state, histories.get(monster) if monster is not None else None)
    return out
