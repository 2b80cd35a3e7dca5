"""The game's side of the protocol (shared/CONTRACT.md), as constants.

Everything the C++ map server fixes lives here so that no other module spells a
magic number: the archetypes, the model types and the actions. The meaning of each of
the 64 state values is the layouts' (``mltasks.layouts``, read through ``mltasks.state``).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

STATE_DIM: Final = 64
N_ACTIONS: Final = 10

ARCHETYPES: Final[tuple[str, ...]] = (
    "aggressive",
    "defensive",
    "support",
    "mage",
    "tank",
    "ranged",
)

MODEL_TYPES: Final[tuple[str, ...]] = (
    "combat_dqn",
    "movement_ppo",
    "skill_dqn",
    "threat_assessment",
    "team_coordination",
    "spatial_vit",
    "temporal_transformer",
    "pattern_recognition",
    "soft_actor_critic",
)


class Action(IntEnum):
    IDLE = 0
    ATTACK = 1
    MOVE_CLOSER = 2
    MOVE_AWAY = 3
    MOVE_RANDOM = 4
    SKILL_1 = 5
    SKILL_2 = 6
    SKILL_3 = 7
    CHANGE_TARGET = 8
    FLEE = 9
    TRADITIONAL_AI = 255


TRADITIONAL_AI: Final = int(Action.TRADITIONAL_AI)


# Statuses of ai_requests.status; the CHECK constraint in sql/schema.sql lists the same.
STATUSES: Final[tuple[str, ...]] = (
    "pending",
    "processing",
    "completed",
    "invalid",
    "expired",
    "timeout",
)
