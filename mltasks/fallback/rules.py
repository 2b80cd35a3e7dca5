"""Level 4: the rule policy (mltasks.fallback.policy) behind the same interface as a model.

Used by `rules` workers, and by the bridge itself when it cannot publish a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from mltasks.contract import ARCHETYPES, N_ACTIONS
from mltasks.fallback import policy
from mltasks.models.family import Scores
from mltasks.models.loaded import TypeOutput
from mltasks.state import DEFAULT_LAYOUT, get_layout


@dataclass(frozen=True, slots=True)
class RuleModel:
    """The policy as a one-member fusion: ``<archetype>/rules`` answers, never cached."""

    archetype: str
    layout: str = DEFAULT_LAYOUT
    model_type: str = "rules"
    source: str = "rules"
    sequence: bool = False
    cacheable: bool = False
    scores_kind: Scores = "logits"
    packed_width: int = N_ACTIONS

    @property
    def name(self) -> str:
        return f"{self.archetype}/rules"

    def unpack(self, packed: np.ndarray) -> TypeOutput:
        return TypeOutput(scores=packed)

    def run(self, states: np.ndarray, windows: np.ndarray | None = None) -> TypeOutput:
        """Log-probabilities whose softmax gives the policy's own confidence."""
        return TypeOutput(scores=policy.logits(states, self.archetype, self.layout))


class RulesEngine:
    """Answers every known archetype; needs no file, no GPU, almost no CPU."""

    def __init__(self, layout: str = DEFAULT_LAYOUT) -> None:
        self.layout = get_layout(layout).name
        self._models = {a: RuleModel(a, self.layout) for a in ARCHETYPES}

    def fusion(self, archetype: str) -> list[tuple[RuleModel, float]]:
        model = self._models.get(archetype)
        return [] if model is None else [(model, 1.0)]


@cache
def rules_engine(layout: str = DEFAULT_LAYOUT) -> RulesEngine:
    """The rule tier reading states in ``layout`` (the config's ``state.layout``)."""
    return RulesEngine(layout)
