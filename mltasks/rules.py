"""Level 4: the rule policy (mltasks.policy) behind the same interface as a model.

Used by `rules` workers, and by the bridge itself when it cannot publish a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mltasks import policy
from mltasks.contract import ARCHETYPES


@dataclass(frozen=True, slots=True)
class RuleModel:
    archetype: str

    @property
    def name(self) -> str:
        return f"{self.archetype}/rules"

    @property
    def source(self) -> str:
        return "rules"

    def logits(self, states: np.ndarray) -> np.ndarray:
        """Log-probabilities whose softmax gives the policy's own confidence."""
        return policy.logits(states, self.archetype)


class RulesEngine:
    """Answers every known archetype; needs no file, no GPU, almost no CPU."""

    _models = {a: RuleModel(a) for a in ARCHETYPES}

    def serving(self, archetype: str) -> RuleModel | None:
        return self._models.get(archetype)


RULES = RulesEngine()
