"""Where a model lives: ``<models_dir>/<archetype>/<type>.onnx`` or ``<type>_fp16.onnx``.

The fork's Phase 11 exporter writes ``<type>_fp16.onnx`` (FP16 weights and I/O); its
continuous-training script, and this service's earlier releases, ``<type>.onnx`` (FP32).
When both exist, **``<type>.onnx`` wins**: it is the later export in the fork's workflow
(retraining writes it), and the FP32 file is the exact master from which the service builds
every other precision. The other file is reported (``mltasks models check``) and ignored.

A model that was deployed (`mltasks.models.versions`) has a ``<type>.versions`` folder whose
``pointer.json`` names the active version: that file serves, and the plain files are ignored.

Only names from the contract ever reach a path: never a value read from the database.
Precision variants the service caches beside a master (``<stem>.fp16.onnx``,
``<stem>.fp32.onnx``, ``<stem>.int8.onnx``) are not masters and are never discovered as
such.
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


def find(models_dir: Path, archetype: str, model_type: str) -> Found | None:
    """The file that serves this model, or None when there is none: the active version of
    a versioned model, else the preferred plain file."""
    from mltasks.models.versions import active_file

    active = active_file(models_dir, archetype, model_type)
    if active is not None:
        plain = plain_find(models_dir, archetype, model_type)
        return Found(archetype, model_type, active[0], plain.path if plain else None, active[1])
    return plain_find(models_dir, archetype, model_type)


def plain_find(models_dir: Path, archetype: str, model_type: str) -> Found | None:
    """The plain file (``<type>.onnx`` or ``<type>_fp16.onnx``) of a model, or None."""
    present = [p for p in candidates(models_dir, archetype, model_type) if p.is_file()]
    if not present:
        return None
    return Found(archetype, model_type, present[0], present[1] if len(present) > 1 else None)


def discover(
    models_dir: Path,
    archetypes: tuple[str, ...] = ARCHETYPES,
    model_types: tuple[str, ...] = MODEL_TYPES,
) -> tuple[list[Found], list[str]]:
    """(found files, names of the models with no file), archetype-major."""
    found: list[Found] = []
    missing: list[str] = []
    for archetype in archetypes:
        for model_type in model_types:
            f = find(models_dir, archetype, model_type)
            if f is None:
                missing.append(f"{archetype}/{model_type}")
            else:
                found.append(f)
    return found, missing
