"""The game's side of the protocol (shared/CONTRACT.md), as constants.

Everything the C++ map server fixes lives here so that no other module spells a
magic number: the state layout, the archetypes, the model types and the actions.
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


class Idx:
    """Indices into the 64-float state vector (CONTRACT.md section 2).

    The contract names ranges; the exact slot inside each range is ours, and the
    rule policy and the demo models agree on it through this class alone.
    """

    HP = 0
    SP = 1
    POS_X, POS_Y, POS_Z = 2, 3, 4
    ATK, DEF, MATK = 5, 6, 7
    # 11-20 enemy information
    ENEMY_DIST = 11  # nearest enemy, normalised: 0 adjacent .. 1 out of sight
    ENEMY_HP = 12
    ENEMY_THREAT = 13
    ENEMY_COUNT = 14  # normalised count of enemies in sight
    SECOND_THREAT = 15  # threat of the most dangerous enemy that is not the target
    # 21-30 ally information
    ALLY_COUNT = 21
    ALLY_MIN_HP = 22  # lowest HP ratio among allies (1.0 when none)
    ALLY_UNDER_ATTACK = 23  # 1.0 when an ally is being hit
    # 31-40 skills: availability (1 ready) for skills 1..3
    SKILL_1_READY, SKILL_2_READY, SKILL_3_READY = 31, 32, 33
    # 41-50 status effects
    STUNNED = 41
    # 61-63 temporal features
    IDLE_TIME = 61  # normalised time since the last action


# Statuses of ai_requests.status; the CHECK constraint in sql/schema.sql lists the same.
STATUSES: Final[tuple[str, ...]] = (
    "pending",
    "processing",
    "completed",
    "invalid",
    "expired",
    "timeout",
)
