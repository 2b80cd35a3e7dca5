"""The Phase 11 model family as data: what each type reads and what each output means.

One row per model type (shared/MODELS.md): adding a type is adding a row. The loader
(`mltasks.models.loaded`) places a file's inputs and outputs with this table alone, and
skips a file the table cannot place, naming the input or output that did not fit.

Roles of an output:

- ``actions``: one score per action, logits or Q-values (``scores``); the game executes
  actions 0-9, so a head wider than 10 is served on its first 10 columns, but only where the
  row lists that width (the fork's mage ``combat_dqn`` and ranged ``movement_ppo`` are 12
  wide by default).
- ``value``: the state value ``[N, 1]`` of an actor-critic.
- ``threat``: the threat score ``[N, 1]`` of ``threat_assessment``.
- ``critic``: one of the twin critics ``q1``/``q2`` ``[N, 1]`` of ``soft_actor_critic``,
  which reads (state, action): the service evaluates each of the 10 actions (one-hot) and
  takes the lower critic, so the pair becomes Q-values for actions 0-9.
- ``ignore``: a tensor that is not for the service (``team_coordination`` exports its
  LSTM's h_n ``[6, N, 256]`` under the name ``value``).

An export that names its only output otherwise (the fork's continuous-training script
writes ``input`` -> ``output`` in FP32) is placed by position: a single output takes the
row's single non-ignored role.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from mltasks.contract import MODEL_TYPES, N_ACTIONS

InputKind = Literal["state", "sequence", "state_action"]
Role = Literal["actions", "value", "threat", "critic", "ignore"]
Scores = Literal["logits", "q_values"]

SEQUENCE_LEN: Final = 10
"""States per history window of a sequence model: the monster's last 10, oldest first."""


@dataclass(frozen=True, slots=True)
class Signature:
    """What one model type reads and writes."""

    model_type: str
    input: InputKind
    outputs: Mapping[str, Role]
    """Output name -> role."""
    scores: Scores = "logits"
    """What the action scores are: Q-values go through a softmax with a temperature."""
    action_widths: tuple[int, ...] = (N_ACTIONS,)
    """Accepted widths of the action head (and of a critic's action input)."""

    @property
    def roles(self) -> frozenset[Role]:
        return frozenset(r for r in self.outputs.values() if r != "ignore")

    @property
    def acts(self) -> bool:
        """Whether the type proposes actions (else it only adjusts the fusion: threat)."""
        return bool(self.roles & {"actions", "critic"})


FAMILY: Final[Mapping[str, Signature]] = {
    s.model_type: s
    for s in (
        Signature("combat_dqn", "state", {"output": "actions"}, "q_values", (10, 12)),
        Signature(
            "movement_ppo",
            "state",
            {"action_logits": "actions", "value": "value"},
            "logits",
            (10, 12),
        ),
        Signature("skill_dqn", "state", {"output": "actions"}, "q_values"),
        Signature("threat_assessment", "state", {"output": "threat"}),
        Signature("team_coordination", "sequence", {"action_logits": "actions", "value": "ignore"}),
        Signature("spatial_vit", "state", {"output": "actions"}),
        Signature("temporal_transformer", "sequence", {"output": "actions"}),
        Signature("pattern_recognition", "sequence", {"output": "actions"}),
        Signature(
            "soft_actor_critic", "state_action", {"q1": "critic", "q2": "critic"}, "q_values"
        ),
    )
}
assert tuple(FAMILY) == MODEL_TYPES, "one signature per model type of the contract"


def signature(model_type: str) -> Signature:
    """The row of a type; a name outside the contract never reaches a file name."""
    try:
        return FAMILY[model_type]
    except KeyError:
        raise ValueError(
            f"unknown model type {model_type!r}; expected one of {MODEL_TYPES}"
        ) from None
