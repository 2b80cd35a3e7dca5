"""What the family buys: each type's and each level's fused answer against the rule teacher.

``mltasks models agreement DIR`` (and ``--json``) reports, per archetype:

- per type that proposes actions, the share of sampled situations on which its argmax is its
  teacher's action: ``policy.decide`` for the state types, ``policy.decide_history`` on
  sampled 10-state histories for the three sequence types;
- ``threat_assessment``'s mean absolute error against ``policy.threat``;
- per model level, the fused answer's agreement with ``policy.decide`` (on steady histories,
  where both teachers agree) and the share of decisions where it differs from
  ``combat_dqn`` alone.

Files are found and loaded as the service does (CPU); a type without a loadable file is
left out, as in the service.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mltasks.config import Config
from mltasks.contract import ARCHETYPES
from mltasks.errors import ModelError
from mltasks.fallback.policy import decide, decide_history, threat
from mltasks.models.discovery import find
from mltasks.models.family import SEQUENCE_LEN
from mltasks.models.fusion import Member, fuse, rule_of
from mltasks.models.loaded import LoadedModel, TypeOutput, load_model
from mltasks.state import get_layout


@dataclass(slots=True)
class ArchetypeAgreement:
    archetype: str
    per_type: dict[str, float] = field(default_factory=dict)
    threat_mae: float | None = None
    fused: dict[int, float] = field(default_factory=dict)
    differs_from_combat_dqn: dict[int, float] = field(default_factory=dict)


def _load(models_dir: Path, archetype: str) -> dict[str, LoadedModel]:
    from mltasks.contract import MODEL_TYPES

    loaded = {}
    for model_type in MODEL_TYPES:
        found = find(models_dir, archetype, model_type)
        if found is None:
            continue
        try:
            loaded[model_type] = load_model(
                found.path, archetype, model_type, ["CPUExecutionProvider"]
            )
        except ModelError:
            continue
    return loaded


def agreement(
    models_dir: Path, config: Config, *, n: int = 2000, seed: int = 1
) -> list[ArchetypeAgreement]:
    """The report's rows, one per archetype, on ``n`` states sampled in the config's layout."""
    from mltasks.models.demo import sample_windows

    layout = get_layout(config.state.layout)
    rule = rule_of(config)
    out = []
    for a_idx, archetype in enumerate(ARCHETYPES):
        row = ArchetypeAgreement(archetype)
        models = _load(Path(models_dir), archetype)
        rng = np.random.default_rng([seed, a_idx])
        windows = sample_windows(layout, rng, n, archetype)
        states = windows[:, -1, :]
        steady = np.repeat(states[:, None, :], SEQUENCE_LEN, axis=1)
        teacher, _ = decide(states, archetype, layout.name)
        trend, _ = decide_history(windows, archetype, layout.name)
        outputs: dict[str, TypeOutput] = {}
        for model_type, model in models.items():
            if model.sequence:
                got = model.run(states, windows).scores
                if got is not None:
                    row.per_type[model_type] = float(np.mean(got.argmax(axis=1) == trend))
                outputs[model_type] = model.run(states, steady)
                continue
            o = outputs[model_type] = model.run(states)
            if o.scores is not None:
                row.per_type[model_type] = float(np.mean(o.scores.argmax(axis=1) == teacher))
            if o.threat is not None:
                row.threat_mae = float(np.mean(np.abs(o.threat - threat(states, layout.name))))
        alone = outputs.get("combat_dqn")
        for level in (1, 2, 3):
            weights = config.models.fusion.for_level(level)
            members = [
                Member(t, w, models[t].scores_kind, outputs[t], np.ones(n, dtype=np.bool_))
                for t, w in weights.items()
                if t in outputs
            ]
            if not members:
                continue
            actions, _ = fuse(members, n, rule).choice()
            row.fused[level] = float(np.mean(actions == teacher))
            if alone is not None and alone.scores is not None:
                diff = np.mean(actions != alone.scores.argmax(axis=1))
                row.differs_from_combat_dqn[level] = float(diff)
        out.append(row)
    return out


def render(rows: list[ArchetypeAgreement]) -> str:
    """A Markdown table per archetype row: types, threat error, fusion per level."""
    from mltasks.contract import MODEL_TYPES

    acting = [t for t in MODEL_TYPES if any(t in r.per_type for r in rows)]
    head = ["archetype", *acting, "threat MAE"]
    levels = sorted({lv for r in rows for lv in r.fused})
    head += [f"fused L{lv}" for lv in levels] + [f"L{lv} != combat_dqn" for lv in levels]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r.archetype]
        cells += [f"{r.per_type[t]:.3f}" if t in r.per_type else "-" for t in acting]
        cells.append("-" if r.threat_mae is None else f"{r.threat_mae:.3f}")
        cells += [f"{r.fused[lv]:.3f}" if lv in r.fused else "-" for lv in levels]
        cells += [
            f"{r.differs_from_combat_dqn[lv]:.1%}" if lv in r.differs_from_combat_dqn else "-"
            for lv in levels
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
