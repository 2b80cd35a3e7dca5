"""Level 4: the rule policy (mltasks.policy) behind the same interface as a model.

Used by `rules` workers, and by the bridge itself when it cannot publish a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from mltasks import policy
from mltasks.contract import ARCHETYPES
from mltasks.state import DEFAULT_LAYOUT, get_layout


@dataclass(frozen=True, slots=True)
class RuleModel:
    archetype: str
    layout: str = DEFAULT_LAYOUT

    @property
    def name(self) -> str:
        return f"{self.archetype}/rules"

    @property
    def source(self) -> str:
        return "rules"

    def logits(self, states: np.ndarray) -> np.ndarray:
        """Log-probabilities whose softmax gives the policy's own confidence."""
        return policy.logits(states, self.archetype, self.layout)


class RulesEngine:
    """Answers every known archetype; needs no file, no GPU, almost no CPU."""

    def __init__(self, layout: str = DEFAULT_LAYOUT) -> None:
        self.layout = get_layout(layout).name
        self._models = {a: RuleModel(a, self.layout) for a in ARCHETYPES}

    def serving(self, archetype: str) -> RuleModel | None:
        return self._models.get(archetype)


@cache
def rules_engine(layout: str = DEFAULT_LAYOUT) -> RulesEngine:
    """The rule tier reading states in ``layout`` (the config's ``state.layout``)."""
    return RulesEngine(layout)
