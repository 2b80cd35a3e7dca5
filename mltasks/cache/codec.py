"""What each cache layer stores: its keys and values, encoded and decoded.

L2 is the game's (CONTRACT.md section 4): the key is ``ml:action:`` + md5 of the state's
C ``%.2f`` text, the value ``"<action>:<confidence %.3f>"``; both must match what the map
server computes and parses byte for byte. L3 and L1 are ours: model outputs per quantized
state, and each monster's last states, as float32 bytes. Pure functions, no Redis.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from mltasks import keys
from mltasks.contract import N_ACTIONS, STATE_DIM

# --- L2: the game's key and value ----------------------------------------------------------


def as_state(state: Any) -> np.ndarray:
    """One state as float32 [64]; ValueError for any other shape."""
    vec = np.asarray(state, dtype=np.float32)
    if vec.shape != (STATE_DIM,):
        raise ValueError(f"a state has {STATE_DIM} values, got shape {vec.shape}")
    return vec


def _c_fixed2(v: float) -> str:
    """glibc's ``%.2f``, including what Python spells differently: ``-nan``."""
    if math.isnan(v):
        return "-nan" if math.copysign(1.0, v) < 0 else "nan"
    return f"{v:.2f}"


def state_text(state: Any, mob_id: int) -> str:
    """The text the gateway hashes: each float32 value as C ``%.2f``, then ``:mob_id``.

    Python's ``.2f`` rounds the exact binary value half-to-even like glibc, once the
    float32 is widened exactly to a Python float (``tolist`` does that): 0.125 -> 0.12,
    float32(0.005) -> 0.00, -0.001 -> -0.00, -0.0 -> -0.00.
    """
    values = as_state(state).tolist()
    if all(math.isfinite(v) for v in values):
        text = ",".join([f"{v:.2f}" for v in values])
    else:
        text = ",".join([_c_fixed2(v) for v in values])
    return f"{text}:{int(mob_id)}"


def action_key(state: Any, mob_id: int) -> str:
    """The game's L2 key: ``ml:action:`` + md5 hex of `state_text`."""
    return action_keys(as_state(state)[None, :], [mob_id])[0]


# `%.2f` of every value in hundredths within +-_TEXT_LIMIT, by table: index a + (N+1) * sign.
_TEXT_LIMIT = 10_000
_TEXT_TABLE = np.array(
    [f"{a // 100}.{a % 100:02d}" for a in range(_TEXT_LIMIT + 1)]
    + [f"-{a // 100}.{a % 100:02d}" for a in range(_TEXT_LIMIT + 1)],
    dtype=object,
)


def action_keys(states: np.ndarray, mob_ids: Sequence[int]) -> list[str]:
    """`action_key` for a batch (float32 [n, 64]): the text of typical states by table.

    float32 x 100 is exact in float64 (24 + 7 bits), so ``rint`` of it is C's round-half-
    even of the exact value, which `state_text` gets from Python's formatting. Rows with a
    value beyond +-100.00 or not finite take `state_text` itself.
    """
    states = np.asarray(states, dtype=np.float32)
    if states.ndim != 2 or states.shape[1] != STATE_DIM:
        raise ValueError(f"states must be [n, {STATE_DIM}], got shape {states.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        hundredths = np.rint(states.astype(np.float64) * 100.0)
        finite_rows = np.all(np.isfinite(hundredths), axis=1)
        within = np.all(np.abs(hundredths) <= _TEXT_LIMIT, axis=1)
    small: list[bool] = np.logical_and(finite_rows, within).tolist()
    index = np.where(np.isfinite(hundredths), np.abs(hundredths), 0).astype(np.int64)
    index += np.signbit(states) * (_TEXT_LIMIT + 1)
    out = []
    for i, mob_id in enumerate(mob_ids):
        if small[i]:
            text = f"{','.join(_TEXT_TABLE[index[i]])}:{int(mob_id)}"
        else:
            text = state_text(states[i], mob_id)
        digest = hashlib.md5(text.encode("ascii"), usedforsecurity=False)
        out.append(keys.GAME_ACTION_PREFIX + digest.hexdigest())
    return out


def format_value(action: int | np.integer[Any], confidence: float | np.floating[Any]) -> str | None:
    """``"<action>:<confidence %.3f>"``, or None for anything the game must not read.

    The map server parses the value with std::stoi/std::stof and crashes on a throw, so
    only a real action (never 255, the traditional-AI fallback) and a finite confidence
    in [0, 1] are ever formatted.
    """
    if isinstance(action, bool) or not isinstance(action, (int, np.integer)):
        return None
    if not 0 <= int(action) < N_ACTIONS:
        return None
    try:
        conf = float(confidence)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(conf) and 0.0 <= conf <= 1.0):
        return None
    return f"{int(action)}:{conf + 0.0:.3f}"  # + 0.0: no "-0.000"


_VALUE = re.compile(rb"\s*(\d{1,3}):(\d+(?:\.\d*)?|\.\d+)\s*")


def parse_value(raw: bytes | str | None) -> tuple[int, float] | None:
    """(action, confidence) from an L2 value, or None for anything else (never raises)."""
    if raw is None:
        return None
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    if not isinstance(data, bytes):
        return None
    m = _VALUE.fullmatch(data)
    if m is None:
        return None
    action, conf = int(m.group(1)), float(m.group(2))
    if not (0 <= action < N_ACTIONS and 0.0 <= conf <= 1.0):
        return None
    return action, conf


# --- L3: our key for model outputs ----------------------------------------------------------


def logits_key(archetype: str, model_type: str, state: Any) -> str | None:
    """L3 key: the state rounded to 2 decimals (as int32 hundredths), hashed; None if not finite.

    Rounding lets states the game would call the same (its own key uses 2 decimals) share
    one model run.
    """
    return logits_keys([(archetype, model_type, state)])[0]


def logits_keys(where: Sequence[tuple[str, str, Any]]) -> list[str | None]:
    """`logits_key` for a whole batch: the rounding done once, as one array."""
    if not where:
        return []
    digests = state_digests(np.stack([as_state(s) for _, _, s in where]))
    return [
        output_key(archetype, model_type, d)
        for (archetype, model_type, _), d in zip(where, digests, strict=True)
    ]


def state_digests(states: np.ndarray) -> list[str | None]:
    """Per state of float32 [n, 64]: the hash of its values rounded to 2 decimals (as int32
    hundredths), None when not finite. Computed once per row, shared by every model type."""
    if not len(states):
        return []
    finite = np.isfinite(states).all(axis=1)
    wide = np.where(finite[:, None], states, 0).astype(np.float64) * 100.0
    hundredths = np.clip(np.rint(wide), -(2**31), 2**31 - 1).astype("<i4")
    return [
        hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() if ok else None
        for ok, row in zip(finite.tolist(), hundredths, strict=True)
    ]


def output_key(
    archetype: str, model_type: str, digest: str | None, version: str = ""
) -> str | None:
    """L3 key of one model type's output for a state digest (`state_digests`); with the
    model's version (``<type>@<version>``), so a new version never reads an old one's."""
    if digest is None:
        return None
    typed = f"{model_type}@{version}" if version else model_type
    return f"{keys.LOGITS_PREFIX}{archetype}:{typed}:{digest}"


def vector_value(raw: Any) -> np.ndarray | None:
    """A stored model output (finite float32, at most 64 values), or None for a miss or
    anything malformed. Its length is the model's to check (`LoadedModel.packed_width`)."""
    if not isinstance(raw, bytes) or not raw or len(raw) % 4 or len(raw) > 4 * STATE_DIM:
        return None
    arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return arr if np.isfinite(arr).all() else None


def logits_value(raw: Any) -> np.ndarray | None:
    """A stored row of 10 action scores, or None."""
    arr = vector_value(raw)
    return arr if arr is not None and arr.shape == (N_ACTIONS,) else None


def history_array(blobs: Sequence[Any]) -> np.ndarray:
    """An L1 list (newest first) as float32 [k, 64], oldest first; malformed entries dropped."""
    good = [b for b in reversed(blobs) if isinstance(b, bytes) and len(b) == 4 * STATE_DIM]
    return (
        np.frombuffer(b"".join(good), dtype="<f4").reshape(len(good), STATE_DIM).astype(np.float32)
    )
