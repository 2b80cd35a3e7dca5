"""A model's plain files: ``<models_dir>/<archetype>/<type>.onnx`` or ``<type>_fp16.onnx``
(the preference between them: `mltasks.models.discovery`). Below both discovery and the
version store, which adopts a plain file as a model's first version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mltasks.contract import ARCHETYPES, MODEL_TYPES
from mltasks.errors import ModelError

SUFFIXES: tuple[str, ...] = (".onnx", "_fp16.onnx")
"""File name endings in order of preference."""


@dataclass(frozen=True, slots=True)
class Found:
    archetype: str
    model_type: str
    path: Path
    shadowed: Path | None = None
    """The other file of the same model, present but not served."""
    version: str | None = None
    """The active version when the model is versioned (its pointer), else None."""

    @property
    def name(self) -> str:
        return f"{self.archetype}/{self.model_type}"


def candidates(models_dir: Path, archetype: str, model_type: str) -> list[Path]:
    """The file names a model may have, preferred first."""
    if archetype not in ARCHETYPES or model_type not in MODEL_TYPES:
        raise ModelError(f"unknown model {archetype}/{model_type}")
    return [Path(models_dir) / archetype / f"{model_type}{s}" for s in SUFFIXES]


def plain_find(models_dir: Path, archetype: str, model_type: str) -> Found | None:
    """The plain file (``<type>.onnx`` or ``<type>_fp16.onnx``) of a model, or None."""
    present = [p for p in candidates(models_dir, archetype, model_type) if p.is_file()]
    if not present:
        return None
    return Found(archetype, model_type, present[0], present[1] if len(present) > 1 else None)
